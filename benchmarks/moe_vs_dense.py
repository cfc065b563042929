"""Sparse experts against the dense model they cost the same per token as: the tiny recipe and
tiny-moe (8 experts of half the MLP width, 2 per token), trained on the same data for the same steps,
one after the other on this machine. Reports held-out bits per byte (the standard library files the
preparation held out, scored as benchmarks/tiny_quality does), wall seconds of each fit, the median
training tokens/s each logged, and parameters total and active; then times a training step of the two
models in turn, in one process (`speed`: the figure to compare, since fits minutes apart meet
different loads on a shared machine). Writes JSON.

    python -m benchmarks.moe_vs_dense --out benchmarks/results/moe_vs_dense-cpu2.json
    python -m benchmarks.moe_vs_dense --steps 300 -- --trainer.precision bf16-mixed   # shorter; arguments after
                                                                                     # -- go to both fits
    python -m benchmarks.moe_vs_dense --speed_only --out X.json    # the alternating step timing alone

The data is prepared once (by the first fit) and shared, so the wall times compare training alone.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import command, machine, split_at_dashes, write_result
from benchmarks.tiny_quality import held_out_texts, train
from tinytrain.data.corpus import stdlib_dir

ROOT = Path(__file__).resolve().parents[1]


def tokens_per_second(run: Path) -> float:
    """Median of the train/tokens_per_sec the run logged."""
    values = []
    for path in sorted((run / "logs").glob("version_*/metrics.csv")):
        with open(path) as f:
            values += [float(r["train/tokens_per_sec"]) for r in csv.DictReader(f) if r.get("train/tokens_per_sec")]
    return statistics.median(values) if values else float("nan")


def alternating_speed(recipes: dict[str, str], rounds: int, steps: int) -> dict:
    """Training tokens/s of each recipe's model (fresh weights, its batch shape and precision choice),
    timed in turn: ``rounds`` rounds of ``steps`` optimizer steps each, after one warm-up step; medians."""
    import statistics
    import time

    import torch
    import yaml

    from tinytrain.model.llama import Llama, LlamaConfig
    from tinytrain.train.optim import OptimConfig, build_optimizer
    from tinytrain.train.step import train_step

    setups = {}
    for name, recipe in recipes.items():
        r = yaml.safe_load(Path(recipe).read_text())
        torch.manual_seed(0)
        model = Llama(LlamaConfig(**r["model"]["config"])).train()
        optim = {**r["model"]["optim"], "optimizer": "adamw"}  # the experts take AdamW only: both do
        opt = build_optimizer(model, OptimConfig(**optim))
        seq, batch = r["data"]["seq_len"], r["data"]["micro_batch_size"]
        tokens = torch.randint(0, model.config.vocab_size, (1, batch, seq + 1))
        setups[name] = (model, opt, tokens)
    times = {name: [] for name in setups}
    for r in range(rounds + 1):
        for name, (model, opt, tokens) in setups.items():
            start = time.perf_counter()
            for _ in range(1 if r == 0 else steps):
                train_step(model, opt, tokens, 1e-3, 1.0)
            if r:
                times[name].append((time.perf_counter() - start) / steps)
    out = {name: round(setups[name][2][0].numel() / statistics.median(t), 1) for name, t in times.items()}
    return {"tokens_per_s": out, "rounds": rounds, "steps_per_round": steps, "precision": "32-true",
            "torch_threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    argv, own, fit_args = split_at_dashes(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="moe_vs_dense.py [options] [-- tinytrain fit arguments for both]")
    parser.add_argument("--dense", default=str(ROOT / "recipes" / "tiny.yaml"))
    parser.add_argument("--moe", default=str(ROOT / "recipes" / "tiny-moe.yaml"))
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps of both (default: the recipes')")
    parser.add_argument("--corpus", default=None, help="the recipes' corpus (default: this Python's standard library)")
    parser.add_argument("--val_fraction", type=float, default=0.02, help="the recipes' data.val_fraction")
    parser.add_argument("--out", default="benchmarks/results/moe_vs_dense.json")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the alternating step timing")
    parser.add_argument("--speed_only", action="store_true", help="only the alternating step timing")
    args = parser.parse_args(own)
    recipes = {"dense": args.dense, "moe": args.moe}
    if args.speed_only:
        speed = alternating_speed(recipes, args.rounds, 3)
        result = {"benchmark": "moe_vs_dense", "speed": speed, "command": command("moe_vs_dense", argv),
                  "machine": machine()}
        write_result(result, args.out)
        print(speed)
        return result

    import torch

    from tinytrain.eval.tasks import bits_per_byte
    from tinytrain.store.checkpoint import load_checkpoint

    corpus = Path(args.corpus) if args.corpus else stdlib_dir()
    texts = held_out_texts(corpus, args.val_fraction)
    extra = ["--model.optim.optimizer", "adamw",  # Muon refuses the experts' 3-D weights: both models on AdamW
             *(["--data.corpus", str(corpus)] if args.corpus else []),
             *(["--trainer.max_steps", str(args.steps), "--model.optim.decay_steps", str(args.steps)] if args.steps
               else []), *fit_args]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for name, recipe in recipes.items():
            work = Path(tmp) / name
            work.mkdir()
            (work / "cache").symlink_to(cache, target_is_directory=True)
            cache.mkdir(exist_ok=True)
            wall, timeline = train(Path(recipe).resolve(), work, extra)
            run = next((work / "runs").iterdir())
            model, tok = load_checkpoint(run)
            with torch.no_grad():
                score = bits_per_byte(model, tok, texts)
            c = model.config
            rows[name] = {"recipe": recipe, "wall_s": round(wall, 1),
                          "logged_tokens_per_s": round(tokens_per_second(run), 1),
                          "bits_per_byte": score["bits_per_byte"], "params": c.num_params(),
                          "active_params": c.num_active_params(), "experts": c.num_local_experts,
                          "experts_per_token": c.num_experts_per_tok if c.moe else 1,
                          "validation_timeline": timeline}
    dense, moe = rows["dense"], rows["moe"]
    speed = alternating_speed(recipes, args.rounds, 3)
    result = {
        "benchmark": "moe_vs_dense", "fit_arguments": extra, "rows": rows,
        "held_out": {"documents": len(texts), "bytes": sum(len(t.encode()) for t in texts), "corpus": str(corpus)},
        "bits_per_byte_moe_minus_dense": round(moe["bits_per_byte"] - dense["bits_per_byte"], 4),
        "speed": speed,
        "tokens_per_s_moe_over_dense": round(speed["tokens_per_s"]["moe"] / speed["tokens_per_s"]["dense"], 3),
        "command": command("moe_vs_dense", argv), "machine": machine(),
    }
    write_result(result, args.out)
    for name, r in rows.items():
        print(f"{name}: {r['bits_per_byte']:.3f} bits per byte, {speed['tokens_per_s'][name]:,.0f} tokens/s, "
              f"fit {r['wall_s']:.0f} s; "
              f"{r['params']:,} parameters, {r['active_params']:,} active")
    return result


if __name__ == "__main__":
    main()
