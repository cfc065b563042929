"""Proxy-tuning's gap closed, at a size a CPU trains in minutes (the measure of Liu et al., 2024).

Two corpora that differ: A, English prose (the Python reference manual's topics, which every CPython
ships as `pydoc_data.topics`), and B, Python source (the standard library, as the tiny recipe reads it).
One tokenizer is trained on both. Four models: a large and a small base trained on A, and each continued
on B (`--model.init_from`): the large one "truly tuned", the small one the proxy. Held-out B (the
standard-library files the preparation holds out) is scored in bits per byte by the large base, the
truly tuned large model, the proxy-tuned large model (large base + tuned small - base small), and the
two small ones; the gap closed is (base - proxy) / (base - truly tuned). Also timed: greedy generation
by the large model alone and proxy-tuned (median tokens/s, the two timed in turn). Writes JSON.

    python -m benchmarks.proxy_tuning --out benchmarks/results/proxy_tuning-cpu2.json
    python -m benchmarks.proxy_tuning --scale test --out /tmp/proxy.json     # about two minutes: the test's
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import command, machine, write_result

ROOT = Path(__file__).resolve().parents[1]

# per scale: corpus sizes, the held-out shares of A and B (B's 0.02 is the tiny recipe's split), tokenizer,
# batch, the two shapes (layers, width, heads, kv heads, SwiGLU width), steps on A and then on B, and the
# learning rates of the two phases
SCALES = {
    "laptop": {"prose_docs": None, "code_bytes": None, "val_fraction_a": 0.15, "val_fraction": 0.02,
               "vocab": 8192, "seq_len": 256, "batch": 16, "large": (6, 192, 3, 1, 512), "small": (2, 96, 3, 1, 256),
               "steps_a": 300, "steps_b": 200, "lr_a": 3e-3, "lr_b": 1e-3},
    "test": {"prose_docs": 40, "code_bytes": 600_000, "val_fraction_a": 0.25, "val_fraction": 0.25,
             "vocab": 1024, "seq_len": 128, "batch": 8, "large": (2, 96, 3, 1, 256), "small": (1, 48, 3, 1, 128),
             "steps_a": 60, "steps_b": 40, "lr_a": 3e-3, "lr_b": 1e-3},
}


def write_corpora(work: Path, scale: dict) -> tuple[Path, Path]:
    """(prose folder, code folder): one file per reference topic; standard-library files, all of them or
    the first ``code_bytes`` worth in sorted order."""
    from pydoc_data.topics import topics

    from tinytrain.data.corpus import list_corpus_files, stdlib_dir

    prose = work / "corpus-a-prose"
    prose.mkdir(parents=True)
    names = sorted(topics)[:scale["prose_docs"]] if scale["prose_docs"] else sorted(topics)
    for name in names:
        (prose / f"{name}.txt").write_text(topics[name])
    code = work / "corpus-b-code"
    code.mkdir()
    total = 0
    for path in list_corpus_files(stdlib_dir()):
        if scale["code_bytes"] and total >= scale["code_bytes"]:
            break
        rel = path.relative_to(stdlib_dir())
        (code / rel).parent.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes()
        (code / rel).write_bytes(data)
        total += len(data)
    return prose, code


def shared_tokenizer(prose: Path, code: Path, out: Path, vocab: int) -> Path:
    """One BPE tokenizer on lines of both corpora (the proxies and the large model must share one)."""
    from tinytrain.data.corpus import list_corpus_files, read_documents
    from tinytrain.data.tokenizer import train_tokenizer

    lines = [line for folder in (prose, code) for _, text in read_documents(list_corpus_files(folder))
             for line in text.splitlines() if line.strip()]
    random.Random(0).shuffle(lines)
    train_tokenizer(lines, out, vocab)
    return out


def fit(work: Path, name: str, data: Path, shape: tuple, scale: dict, steps: int, lr: float,
        init_from: Path | None = None) -> float:
    """`tinytrain fit` of the tiny recipe with this shape, data and length; its wall seconds."""
    layers, width, heads, kv, mlp = shape
    run = f"runs/{name}"
    args = ["fit", "--config", str(ROOT / "recipes" / "tiny.yaml"), "--data.path", str(data), "--data.corpus", "null",
            "--model.config.vocab_size", str(scale["vocab"]), "--model.config.num_hidden_layers", str(layers),
            "--model.config.hidden_size", str(width), "--model.config.num_attention_heads", str(heads),
            "--model.config.num_key_value_heads", str(kv), "--model.config.intermediate_size", str(mlp),
            "--model.config.max_position_embeddings", str(scale["seq_len"]), "--data.seq_len", str(scale["seq_len"]),
            "--data.global_batch_size", str(scale["batch"]), "--data.micro_batch_size", str(scale["batch"]),
            "--trainer.max_steps", str(steps), "--model.optim.decay_steps", str(steps), "--model.optim.lr", str(lr),
            "--model.optim.min_lr", str(lr / 100), "--model.optim.warmup_steps", str(min(20, steps // 5)),
            "--trainer.val_check_interval", str(steps), "--checkpoint.every_n_steps", str(steps),
            "--trainer.default_root_dir", run, "--trainer.logger.init_args.save_dir", run,
            # the recipe's schedule at these shapes, with the optimizer and architecture measured here
            "--model.optim.optimizer", "adamw", "--model.config.value_embeddings", "0",
            "--model.compile", "false", "--model.compile_loss", "false"]
    if init_from is not None:
        args += ["--model.init_from", str(init_from), "--data.step_offset", "0"]
    env = {**os.environ, "TINYTRAIN_CACHE": str(work / "cache"), "WANDB_MODE": "offline"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tinytrain", *args], cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"proxy_tuning: `tinytrain fit` of {name} failed with exit code {proc.returncode}")
    return time.perf_counter() - start


def generation_speeds(models: dict, tok, tokens: int, repeats: int = 5) -> dict[str, float]:
    """Median tokens/s of greedy decoding ``tokens`` new tokens after a short prompt, for each model,
    timed in turn within each repeat (side by side: the machine's load changes both alike)."""
    import torch

    from tinytrain.model.sampling import generate

    prompt = torch.tensor([tok.encode("def main(", bos=True)])
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            out = generate(model, prompt, tokens, temperature=0.0)
            rates[name].append((out.size(1) - prompt.size(1)) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="laptop")
    parser.add_argument("--out", default="benchmarks/results/proxy_tuning.json")
    parser.add_argument("--keep", default=None, help="work in this (new) folder and keep its corpora and runs")
    parser.add_argument("--speed_of", default=None, help="only time generation (large alone, proxy-tuned) with the "
                        "runs of a folder an earlier --keep kept")
    args = parser.parse_args(argv)
    scale = SCALES[args.scale]
    if args.speed_of:
        return speed_only(Path(args.speed_of), args, argv)

    import torch

    from tinytrain.data.corpus import list_corpus_files, prepare_text_folder, read_documents
    from tinytrain.data.prep import is_validation
    from tinytrain.eval.tasks import bits_per_byte
    from tinytrain.store.checkpoint import load_checkpoint, load_proxy_tuned

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.keep or scratch)
        work.mkdir(parents=True, exist_ok=True)
        prose, code = write_corpora(work, scale)
        started = time.perf_counter()
        tok = shared_tokenizer(prose, code, work / "tokenizer.model", scale["vocab"])
        data_a = prepare_text_folder(prose, work / "prepared-a", scale["vocab"], tok, scale["val_fraction_a"])
        data_b = prepare_text_folder(code, work / "prepared-b", scale["vocab"], tok, scale["val_fraction"])
        prep_s = time.perf_counter() - started
        walls = {}
        for size in ("large", "small"):
            walls[f"{size}-base"] = fit(work, f"{size}-base", data_a, scale[size], scale, scale["steps_a"],
                                        scale["lr_a"])
            walls[f"{size}-tuned"] = fit(work, f"{size}-tuned", data_b, scale[size], scale, scale["steps_b"],
                                         scale["lr_b"], init_from=work / "runs" / f"{size}-base")
        held_out = [text for path, text in read_documents(list_corpus_files(code))
                    if is_validation(path.relative_to(code).as_posix(), scale["val_fraction"])]
        runs = {name: work / "runs" / name for name in walls}
        scores = {}
        with torch.no_grad():
            for name, run in runs.items():
                model, tokenizer = load_checkpoint(run)
                scores[name] = bits_per_byte(model, tokenizer, held_out)["bits_per_byte"]
            proxy, tokenizer = load_proxy_tuned(runs["large-base"], runs["small-tuned"], runs["small-base"])
            scores["large-proxy-tuned"] = bits_per_byte(proxy, tokenizer, held_out)["bits_per_byte"]
            speeds = generation_speeds({"large alone": load_checkpoint(runs["large-base"])[0], "proxy-tuned": proxy},
                                       tokenizer, 200)
            gained = [(alpha, bits_per_byte(load_proxy_tuned(runs["large-base"], runs["small-tuned"],
                                                             runs["small-base"], alpha)[0], tokenizer,
                                            held_out)["bits_per_byte"]) for alpha in (0.5, 2.0)]
    gap = scores["large-base"] - scores["large-tuned"]
    result = {
        "benchmark": "proxy_tuning", "scale": args.scale, "settings": {k: v for k, v in scale.items()},
        "corpora": {"a": "pydoc_data.topics (English prose)", "b": "the standard library's source",
                    "held_out_documents": len(held_out), "held_out_bytes": sum(len(t.encode()) for t in held_out)},
        "parameters": {size: _params(scale, size) for size in ("large", "small")},
        "bits_per_byte_on_held_out_b": scores,
        "proxy_alpha_sweep": {str(alpha): bpb for alpha, bpb in gained},
        "gap_closed": (scores["large-base"] - scores["large-proxy-tuned"]) / gap if gap > 0 else None,
        "generation_tokens_per_s": speeds,
        "wall_s": {"prepare": round(prep_s, 1), **{k: round(v, 1) for k, v in walls.items()}},
        "command": command("proxy_tuning", argv), "machine": machine(),
    }
    write_result(result, args.out)
    print(", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + f" bits per byte; gap closed {result['gap_closed']}")
    return result


def speed_only(work: Path, args, argv) -> dict:
    """Generation speed alone, side by side, with the runs an earlier ``--keep`` left in ``work``."""
    import torch

    from tinytrain.store.checkpoint import load_checkpoint, load_proxy_tuned

    runs = work / "runs"
    with torch.no_grad():
        proxy, tokenizer = load_proxy_tuned(runs / "large-base", runs / "small-tuned", runs / "small-base")
        speeds = generation_speeds({"large alone": load_checkpoint(runs / "large-base")[0], "proxy-tuned": proxy},
                                   tokenizer, 200)
    result = {"benchmark": "proxy_tuning", "scale": args.scale, "speed_of": str(work),
              "generation_tokens_per_s": speeds, "proxy_slowdown": speeds["large alone"] / speeds["proxy-tuned"],
              "command": command("proxy_tuning", argv), "machine": machine()}
    write_result(result, args.out)
    print(", ".join(f"{k} {v:.1f} tokens/s" for k, v in speeds.items()))
    return result


def _params(scale: dict, size: str) -> int:
    from tinytrain.model.llama import LlamaConfig

    layers, width, heads, kv, mlp = scale[size]
    return LlamaConfig(vocab_size=scale["vocab"], hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv,
                       max_position_embeddings=scale["seq_len"]).num_params()


if __name__ == "__main__":
    main()
