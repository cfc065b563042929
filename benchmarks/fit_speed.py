"""Throughput of `tinytrain fit` itself: the recipe, the Lightning trainer, the loader, FSDP2.

Runs `tinytrain fit --config RECIPE --data.path DATA` for --steps optimizer steps in a fresh run
folder (no validation, no checkpoint until the end), then reads the run's own metrics: tokens/s
per device, MFU and peak memory, medians over the steps after --skip. A crash anywhere in the
product path fails the benchmark. Arguments after `--` go to `tinytrain fit` (switches, sizes).

    python -m benchmarks.fit_speed --recipe recipes/tinyllama-1.1b.yaml --data DIR --steps 20 \\
        --out benchmarks/results/fit_speed-h100.json -- --trainer.devices 1 --data.global_batch_size 16
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import command, machine, split_at_dashes, write_result

ROOT = Path(__file__).resolve().parents[1]


def metric_rows(run: Path) -> list[dict]:
    rows = []
    for path in sorted(run.glob("logs/version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def column(rows: list[dict], key: str, skip: int) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) and int(r["step"]) >= skip]


def main(argv=None) -> dict:
    argv, own, fit_args = split_at_dashes(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="fit_speed.py [options] -- [tinytrain fit arguments]")
    parser.add_argument("--recipe", default="recipes/tiny.yaml")
    parser.add_argument("--data", default=None, help="a prepared folder (default: the recipe's data)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the medians (compilation, warm-up)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", default="benchmarks/results/fit_speed.json")
    args = parser.parse_args(own)
    if args.steps <= args.skip:
        parser.error(f"--steps {args.steps} must be larger than --skip {args.skip}")

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        never = str(10 * args.steps)
        cmd = [sys.executable, "-m", "tinytrain", "fit", "--config", str(Path(args.recipe).resolve()),
               *(["--data.path", str(Path(args.data).resolve())] if args.data else []),
               "--trainer.max_steps", str(args.steps), "--trainer.log_every_n_steps", "1",
               "--trainer.val_check_interval", never, "--trainer.num_sanity_val_steps", "0",
               "--checkpoint.every_n_steps", never, "--trainer.default_root_dir", str(run),
               "--trainer.logger.init_args.save_dir", str(run), *fit_args]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.stderr.write(proc.stderr[-6000:])
            raise SystemExit(f"fit_speed: `tinytrain fit` failed with exit code {proc.returncode}")
        rows = metric_rows(run)
    per_device = column(rows, "train/tokens_per_sec_per_device", args.skip)
    if not per_device:
        raise SystemExit(f"fit_speed: no throughput logged after step {args.skip}")
    mfu = column(rows, "train/mfu", args.skip)
    peak_gpu = column(rows, "train/peak_memory_gib", 0)
    result = {
        "benchmark": "fit_speed",
        "recipe": args.recipe,
        "fit_arguments": fit_args,
        "steps": args.steps,
        "skipped_steps": args.skip,
        "tokens_per_s_per_device": statistics.median(per_device),
        "tokens_per_s": statistics.median(column(rows, "train/tokens_per_sec", args.skip)),
        "tokens_per_s_per_device_by_step": per_device,
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_memory_gib": max(peak_gpu) if peak_gpu else None,
        "memory_kind": "CUDA max_memory_allocated (train/peak_memory_gib)" if peak_gpu else "process peak RSS",
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
        "final_loss": column(rows, "train/loss", 0)[-1],
        "wall_s": round(wall, 1),
        "command": command("fit_speed", argv),
        "fit_command": shlex.join(cmd[1:]),
        "machine": machine(),
    }
    write_result(result, args.out)
    print(json.dumps({k: result[k] for k in ("tokens_per_s_per_device", "mfu", "peak_memory_gib", "peak_rss_gib",
                                             "final_loss", "wall_s")}, indent=2))
    return result


if __name__ == "__main__":
    main()
