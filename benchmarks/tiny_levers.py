"""What each lever buys on the laptop recipe at equal training time: the tiny recipe as it is, and
with one switch changed (or all of them), each given the same seconds of training on this machine,
scored on the held-out standard-library files as benchmarks/tiny_quality scores them.

Equal time, not equal steps: a lever that makes a step slower (Muon's Newton-Schulz iterations)
must pay for it in steps. For each variant a short probe fit measures its training tokens/s (the
median of what it logs, so compilation is left out); the full fit then gets ``--seconds`` x that
speed in tokens, rounded to whole steps, with the recipe's schedule ending at its last step. The data
is prepared once and shared, so the fits' wall times compare training alone (startup, compilation
and validation included). Writes JSON; ``bits_per_byte_minus_recipe`` is each variant against the
recipe as it is.

    python -m benchmarks.tiny_levers --seconds 240 --out benchmarks/results/tiny_levers-cpu2.json
    python -m benchmarks.tiny_levers --only recipe adamw -- --trainer.precision bf16-mixed
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import command, machine, split_at_dashes, write_result
from benchmarks.moe_vs_dense import tokens_per_second
from benchmarks.tiny_quality import held_out_texts, train
from tinytrain.data.corpus import stdlib_dir

ROOT = Path(__file__).resolve().parents[1]
# The tiny recipe trains its matrices with Muon. Its AdamW twin: AdamW for every matrix at 3e-3, the
# rate the recipe was swept to when it trained with AdamW (the embedding keeps its own rate, the
# schedule stays).
ADAMW = ["--model.optim.optimizer", "adamw", "--model.optim.lr", "3e-3"]
# The recipe has QK-norm, value embeddings and compilation (where torch.compile works): a variant each
# without; and each switch it leaves off, alone and all together.
NO_QK_NORM = ["--model.config.qk_norm", "false"]
NO_VALUE_EMBEDDINGS = ["--model.config.value_embeddings", "0"]
NO_COMPILE = ["--model.compile", "false", "--model.compile_loss", "false"]
Z_LOSS = ["--model.z_loss", "1e-4"]
SOFTCAP = ["--model.config.logit_softcap", "15"]
ZERO_INIT = ["--model.config.zero_init_outputs", "true"]
VARIANTS = {
    "recipe": [],
    "adamw": ADAMW,
    "muon-bf16-ns": ["--model.optim.muon_ns_dtype", "bfloat16"],
    "no-qk-norm": NO_QK_NORM,
    "no-value-embeddings": NO_VALUE_EMBEDDINGS,
    "no-compile": NO_COMPILE,
    "z-loss": Z_LOSS,
    "softcap": SOFTCAP,
    "zero-init": ZERO_INIT,
    "all": [*Z_LOSS, *SOFTCAP, *ZERO_INIT],
}


def main(argv=None) -> dict:
    argv, own, fit_args = split_at_dashes(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="tiny_levers.py [options] [-- tinytrain fit arguments for every variant]")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny.yaml"))
    parser.add_argument("--seconds", type=float, default=240, help="training seconds each variant gets")
    parser.add_argument("--probe_steps", type=int, default=40, help="steps of the speed probe before each fit")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--corpus", default=None, help="the recipe's corpus (default: this Python's standard library)")
    parser.add_argument("--val_fraction", type=float, default=0.02, help="the recipe's data.val_fraction")
    parser.add_argument("--out", default="benchmarks/results/tiny_levers.json")
    args = parser.parse_args(own)

    import torch
    import yaml

    from tinytrain.eval.tasks import bits_per_byte
    from tinytrain.store.checkpoint import load_checkpoint

    recipe = Path(args.recipe).resolve()
    batch = yaml.safe_load(recipe.read_text())["data"]
    tokens_per_step = batch["global_batch_size"] * batch["seq_len"]
    corpus = Path(args.corpus) if args.corpus else stdlib_dir()
    texts = held_out_texts(corpus, args.val_fraction)
    common = [*(["--data.corpus", str(corpus)] if args.corpus else []), *fit_args]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cache.mkdir()

        def fit(name: str, *extra: str) -> tuple[float, list[dict], Path]:
            work = Path(tmp) / name
            work.mkdir()
            (work / "cache").symlink_to(cache, target_is_directory=True)
            wall, timeline = train(recipe, work, [*common, *extra])
            return wall, timeline, next((work / "runs").iterdir())

        for name in args.only:
            switches = VARIANTS[name]
            n = str(args.probe_steps)  # validated and saved once, at the end; logged every 5 steps
            probe_wall, _, probe = fit(f"{name}-probe", *switches, "--trainer.max_steps", n,
                                       "--model.optim.decay_steps", n, "--model.optim.warmup_steps", "0",
                                       "--trainer.val_check_interval", n,
                                       "--checkpoint.every_n_steps", n, "--trainer.log_every_n_steps", "5")
            speed = tokens_per_second(probe)
            if not speed > 0:
                raise SystemExit(f"tiny_levers: error: the {name} probe logged no training speed in "
                                 f"{args.probe_steps} steps; give --probe_steps 10 or more")
            steps = max(10, round(args.seconds * speed / tokens_per_step / 10) * 10)
            wall, timeline, run = fit(name, *switches, "--trainer.max_steps", str(steps),
                                      "--model.optim.decay_steps", str(steps))
            model, tok = load_checkpoint(run)
            start = time.perf_counter()
            with torch.no_grad():
                score = bits_per_byte(model, tok, texts)
            rows[name] = {"switches": switches, "probe_tokens_per_s": round(speed, 1),
                          "probe_wall_s": round(probe_wall, 1), "steps": steps, "tokens": steps * tokens_per_step,
                          "wall_s": round(wall, 1), "logged_tokens_per_s": round(tokens_per_second(run), 1),
                          "bits_per_byte": score["bits_per_byte"],
                          "val_bpb_last": timeline[-1]["val_bpb"] if timeline else None,
                          "scoring_s": round(time.perf_counter() - start, 1), "validation_timeline": timeline}
            print(f"{name}: {steps} steps at {speed:,.0f} tokens/s, fit {wall:.0f} s, "
                  f"{score['bits_per_byte']:.3f} bits per byte", flush=True)
    base = rows.get("recipe")
    result = {
        "benchmark": "tiny_levers", "recipe": str(recipe), "seconds": args.seconds, "fit_arguments": common,
        "amx": torch.cpu._is_amx_tile_supported(), "rows": rows,
        "bits_per_byte_minus_recipe": {n: round(r["bits_per_byte"] - base["bits_per_byte"], 4)
                                      for n, r in rows.items()} if base else None,
        "held_out": {"documents": len(texts), "bytes": sum(len(t.encode()) for t in texts), "corpus": str(corpus)},
        "command": command("tiny_levers", argv), "machine": machine(),
    }
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
