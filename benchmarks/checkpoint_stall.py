"""How long training waits for a checkpoint: `checkpoint.async_save` false against true, side by side.

Runs `tinytrain fit --config RECIPE` for --steps steps with a checkpoint every --every steps and no
validation, alternating the two modes for --rounds rounds. A callback (StepClock, below) reads
the clock and the Checkpointing callback's own save time at every step's end. Per run:

- stall per save: the seconds the step loop spent inside the checkpoint code (staging, the write
  when synchronous, publishing: meta.json, fsync, rename, `last`, pruning), per periodic save;
- excess per save: (sum of step times - steps x median step time) / saves, which also counts a
  background write slowing the steps it overlaps (it shares the CPU cores and memory bandwidth);
- write seconds: from the checkpoints' meta.json (async: copy to written on disk).

The first --skip steps and the final save (at the end, always waited for) are not counted.
Medians over rounds.

    python -m benchmarks.checkpoint_stall --out benchmarks/results/checkpoint_stall-tiny-cpu2.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from benchmarks.common import command, machine, split_at_dashes, write_result

ROOT = Path(__file__).resolve().parents[1]
CLOCK_ENV = "TINYTRAIN_STEP_CLOCK"


class StepClock(Callback):
    """At every training step's end: (step, monotonic time, Checkpointing.busy_seconds); written to
    the JSON file named by $TINYTRAIN_STEP_CLOCK when training ends."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from tinytrain.run.checkpointing import Checkpointing

        busy = next(cb.busy_seconds for cb in trainer.callbacks if isinstance(cb, Checkpointing))
        self.rows.append((trainer.global_step, time.perf_counter(), busy))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and os.environ.get(CLOCK_ENV):
            Path(os.environ[CLOCK_ENV]).write_text(json.dumps(self.rows))


def one_run(args, fit_args: list[str], async_save: bool, tmp: Path) -> dict:
    run = tmp / f"run-{'async' if async_save else 'sync'}-{time.monotonic_ns()}"
    clock = run.with_suffix(".json")
    never = str(10 * args.steps)
    cmd = [sys.executable, "-m", "tinytrain", "fit", "--config", str(Path(args.recipe).resolve()),
           "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", never,
           "--trainer.num_sanity_val_steps", "0", "--trainer.default_root_dir", str(run),
           "--trainer.logger.init_args.save_dir", str(run), "--checkpoint.every_n_steps", str(args.every),
           "--checkpoint.keep_last", "2", "--checkpoint.async_save", str(async_save).lower(),
           "--trainer.callbacks+=benchmarks.checkpoint_stall.StepClock", *fit_args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", CLOCK_ENV: str(clock)})
    if proc.returncode:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"checkpoint_stall: `tinytrain fit` failed with exit code {proc.returncode}")
    rows = [r for r in json.loads(clock.read_text()) if r[0] >= args.skip]  # after warm-up
    steps = [r[0] for r in rows]
    times = [b[1] - a[1] for a, b in zip(rows, rows[1:])]  # step k's time: end k-1 to end k
    busy = rows[-1][2] - rows[0][2]
    saves = sum(1 for s in steps[1:] if s % args.every == 0)
    typical = statistics.median(times)
    metas = [json.loads(p.read_text()) for p in run.glob("checkpoints/step-*/meta.json")]
    return {
        "saves": saves,
        "stall_per_save_s": busy / saves,
        "excess_per_save_s": (sum(times) - len(times) * typical) / saves,
        "median_step_s": typical,
        "write_s": [m.get("write_seconds", m.get("save_seconds")) for m in metas],
        "checkpoint_bytes": max(sum(m["files"].values()) for m in metas),
        "fit_command": shlex.join(cmd[1:]),
    }


def main(argv=None) -> dict:
    argv, own, fit_args = split_at_dashes(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="checkpoint_stall.py [options] -- [tinytrain fit arguments]")
    parser.add_argument("--recipe", default="recipes/tiny.yaml")
    parser.add_argument("--steps", type=int, default=125, help="not a multiple of --every: the last save is periodic")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out (warm-up)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", default="benchmarks/results/checkpoint_stall.json")
    args = parser.parse_args(own)

    runs: dict[str, list[dict]] = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for mode in ("sync", "async"):
                runs[mode].append(one_run(args, fit_args, mode == "async", Path(tmp)))
                r = runs[mode][-1]
                print(f"{mode}: stall {r['stall_per_save_s']:.3f} s/save, excess {r['excess_per_save_s']:.3f} s/save, "
                      f"step {r['median_step_s']:.3f} s", flush=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    summary = {mode: {key: round(med(mode, key), 4) for key in ("stall_per_save_s", "excess_per_save_s",
                                                                 "median_step_s")} for mode in runs}
    summary["stall_ratio_sync_over_async"] = round(summary["sync"]["stall_per_save_s"]
                                                   / summary["async"]["stall_per_save_s"], 1)
    result = {
        "benchmark": "checkpoint_stall",
        "recipe": args.recipe,
        "fit_arguments": fit_args,
        "steps": args.steps,
        "every_n_steps": args.every,
        "skipped_steps": args.skip,
        "rounds": args.rounds,
        "median": summary,
        "runs": runs,
        "command": command("checkpoint_stall", argv),
        "machine": machine(),
    }
    write_result(result, args.out)
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
