"""Resume cost does not grow with the step count: the data position is computed, never replayed.

Trains a recipe to step 10, copies the checkpoint and sets its progress counters to step
1,000,000, then times `tinytrain fit` resuming each for one step (alternating, several rounds):
seconds from process start to the restored state and to the end of the first resumed step.
Also times the data path alone (building the loader at a step and reading its first batch) at
steps 10, 10^6 and 10^9. Writes JSON, with the checkpoint's size and save time.

    python -m benchmarks.resume_cost --recipe recipes/tiny.yaml --out benchmarks/results/resume_cost-tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import command, machine, write_result
from tinytrain.store.checkpoint import STATE, point_last

ROOT = Path(__file__).resolve().parents[1]

FAR = 1_000_000


def fit(cwd: Path, args: list, env: dict) -> dict:
    """Run `tinytrain fit`, timestamping its log lines; seconds to restore and to exit."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tinytrain", "fit", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marks, tail = {}, []
    for line in proc.stderr:
        tail = (tail + [line])[-40:]
        now = time.perf_counter() - start
        if "Restored all states" in line:
            marks.setdefault("restored_s", now)
    proc.wait()
    if proc.returncode:
        raise RuntimeError("".join(tail))
    marks["exit_s"] = time.perf_counter() - start
    return marks


def move_to_step(folder: Path, old: int, new: int) -> Path:
    """A copy of checkpoint step `old` whose progress counters say `new`."""
    src = folder / f"step-{old:08d}"
    dst = folder / f"step-{new:08d}"
    shutil.copytree(src, dst)
    state = torch.load(dst / STATE, weights_only=True)

    def bump(d):
        for k, v in d.items():
            if isinstance(v, dict):
                bump(v)
            elif isinstance(v, int) and not isinstance(v, bool) and v == old:
                d[k] = new
    bump(state["loops"])
    state["global_step"] = new
    for s in state["optimizer_states"][0]["state"].values():
        s["step"] = torch.tensor(float(new))
    torch.save(state, dst / STATE)
    meta = json.loads((dst / "meta.json").read_text())
    meta["step"] = new
    meta["files"] = {k: (dst / k).stat().st_size for k in meta["files"]}
    (dst / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(src)  # the far copy must be the newest and only one
    point_last(folder, dst)
    return dst


def data_path_seconds(recipe: Path, corpus: str | None, env: dict, steps: list[int]) -> dict:
    """Seconds to build the loader at each step and read its first batch (in a fresh process)."""
    code = """
import json, sys, time, yaml
from tinytrain.data.datamodule import TokenData
recipe = yaml.safe_load(open(sys.argv[1]))
data = {k: v for k, v in recipe["data"].items() if k not in ("corpus", "num_workers")}
dm = TokenData(vocab_size=recipe["model"]["config"]["vocab_size"], corpus=sys.argv[2] or None, num_workers=0, **data)
dm.prepare_data()
dm.open()
out = {}
for step in map(int, sys.argv[3:]):
    t = time.perf_counter()
    next(iter(dm.train_dataset(step, None)))
    out[str(step)] = time.perf_counter() - t
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code, str(recipe), corpus or "", *map(str, steps)], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "ci.yaml"))
    parser.add_argument("--corpus", default=None, help="text folder (default: the recipe's corpus)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/resume_cost.json")
    args = parser.parse_args(argv)
    args.recipe = str(Path(args.recipe).resolve())
    args.corpus = str(Path(args.corpus).resolve()) if args.corpus else None

    work = Path(tempfile.mkdtemp(prefix="tt-resume-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TINYTRAIN_CACHE": os.environ.get(
        "TINYTRAIN_CACHE", str(Path.home() / ".cache" / "tinytrain"))}
    base = ["--config", args.recipe, "--checkpoint.every_n_steps", "10", "--checkpoint.keep_last", "0",
            "--trainer.val_check_interval", "1000000", "--trainer.num_sanity_val_steps", "0"]
    if args.corpus:
        base += ["--data.corpus", args.corpus]
    try:
        near, far = work / "near", work / "far"
        near.mkdir()
        fit(near, [*base, "--trainer.max_steps", 10], env)
        ckpt = near / "runs" / Path(args.recipe).stem / "checkpoints"
        meta = json.loads((ckpt / "step-00000010" / "meta.json").read_text())
        shutil.copytree(near, far, symlinks=True)
        move_to_step(far / "runs" / Path(args.recipe).stem / "checkpoints", 10, FAR)
        pristine = {name: work / f"{name}.pristine" for name in ("near", "far")}
        for name, path in (("near", near), ("far", far)):
            shutil.copytree(path, pristine[name], symlinks=True)
        timings = {"near": [], "far": []}
        for r in range(args.rounds):
            for name in (("near", "far") if r % 2 == 0 else ("far", "near")):
                run = work / name
                shutil.rmtree(run)
                shutil.copytree(pristine[name], run, symlinks=True)
                target = 11 if name == "near" else FAR + 1
                timings[name].append(fit(run, [*base, "--trainer.max_steps", target], env))
        data = data_path_seconds(Path(args.recipe), args.corpus, env, [10, FAR, 10**9])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(name, key):
        return statistics.median(t[key] for t in timings[name])

    result = {
        "benchmark": "resume_cost",
        "recipe": Path(args.recipe).stem,
        "steps": {"near": 10, "far": FAR},
        "median_restored_s": {"near": med("near", "restored_s"), "far": med("far", "restored_s")},
        "median_first_step_exit_s": {"near": med("near", "exit_s"), "far": med("far", "exit_s")},
        "ratio_far_over_near": med("far", "exit_s") / med("near", "exit_s"),
        "runs": timings,
        "data_path_first_batch_s": data,
        "checkpoint": {"bytes": sum(meta["files"].values()), "save_seconds": meta["save_seconds"]},
        "command": command("resume_cost", argv),
        "machine": machine(),
    }
    write_result(result, args.out)
    print(json.dumps({k: result[k] for k in ("median_restored_s", "median_first_step_exit_s",
                                             "ratio_far_over_near", "data_path_first_batch_s", "checkpoint")},
                     indent=2))
    return result


if __name__ == "__main__":
    main()
