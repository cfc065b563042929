"""Training across a slow link: FSDP2 across two nodes against synchronous DiLoCo (local_sgd) with
each node an island, on the two-node test cluster (slurm/local-cluster.sh start --nodes 2: each node a
network namespace with its own address, joined by a bridge), with each node's outgoing link limited
by a token bucket (tc tbf, ``--rate``). Both runs train the ci recipe's model on the same data for
the same steps, one after the other, through slurm/train-multinode.sbatch and
slurm/train-islands.sbatch. Reports, for each: validation loss against the training's wall seconds
(train/wall_seconds: model build and data preparation excluded), the bytes that crossed node 1's
link (the kernel's counters of its veth), the wall seconds to the validation loss both reach, and a
plot. Needs root on Linux (namespaces, tc). Writes JSON (and a PNG beside it, with matplotlib).

    sudo .venv/bin/python -m benchmarks.local_sgd --out benchmarks/results/local_sgd-cpu2.json
    sudo .venv/bin/python -m benchmarks.local_sgd --rate 100mbit --steps 100 -- --model.config.hidden_size 128

Added delay (tc netem) is used when the kernel has it (``--delay``); it is recorded either way.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import command, machine, split_at_dashes, write_result

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "slurm" / "local-cluster.sh"
NODES = ("tt-node1", "tt-node2")


def sh(*args: str, check: bool = True, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise SystemExit(f"benchmarks.local_sgd: error: {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return proc


def limit_links(rate: str, delay_ms: float) -> dict:
    """Each node's outgoing traffic through a token bucket of ``rate`` (and netem's delay where the
    kernel has it). Returns what was set."""
    applied = {"rate": rate, "delay_ms": None, "netem": None}
    for node in NODES:
        if delay_ms > 0:
            netem = sh("ip", "netns", "exec", node, "tc", "qdisc", "replace", "dev", "eth0", "root", "handle", "1:",
                       "netem", "delay", f"{delay_ms}ms", check=False)
            applied["netem"] = netem.returncode == 0 or netem.stderr.strip()
            if netem.returncode == 0:
                applied["delay_ms"] = delay_ms
                sh("ip", "netns", "exec", node, "tc", "qdisc", "add", "dev", "eth0", "parent", "1:", "handle", "2:",
                   "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms")
                continue
        sh("ip", "netns", "exec", node, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst",
           "32kbit", "latency", "400ms")
    return applied


def link_bytes() -> int:
    """Bytes through node 1's link so far, both ways (the bridge side of its veth)."""
    stats = Path("/sys/class/net/tt-veth1/statistics")
    return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())


def run_job(script: str, cwd: Path, env: dict, args: list[str]) -> dict:
    """Submit ``script`` on both nodes (one process each), wait for it; the bytes it moved and its log."""
    cwd.mkdir(parents=True, exist_ok=True)
    before, start = link_bytes(), time.perf_counter()
    proc = sh("sbatch", "--wait", "--parsable", "--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node", "0",
              "--cpus-per-task", "1", "--time", "60", str(ROOT / "slurm" / script), *args, check=False, env=env, cwd=cwd)
    job = proc.stdout.strip().split(";")[0]
    log = next(iter(cwd.glob(f"slurm-*-{job}.out")), None)
    text = log.read_text() if log is not None else ""
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks.local_sgd: error: job {job} ({script}) failed:\n{proc.stderr}\n{text[-4000:]}")
    return {"job_seconds": time.perf_counter() - start, "link_bytes": link_bytes() - before}


def curve(run: Path) -> list[tuple[int, float, float]]:
    """(step, train/wall_seconds, val/loss) of each validation of the run at ``run``. A validation after
    step s is logged at s; the wall seconds logged at that step precede it."""
    from tinytrain.train.plot import read_run

    metrics = read_run(run)
    seconds = metrics.get("train/wall_seconds", {})
    return [(s, seconds.get(s, float("nan")), loss) for s, loss in sorted(metrics.get("val/loss", {}).items())]


def seconds_to(points: list[tuple[int, float, float]], target: float) -> float | None:
    return next((sec for _, sec, loss in points if loss <= target), None)


def plot(results: dict, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        points = r["curve"]
        ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", label=name)
    ax.set_xlabel("training wall seconds")
    ax.set_ylabel("validation loss")
    ax.set_title("two nodes over a slow link")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def main(argv: list[str] | None = None) -> None:
    all_args, own, passed = split_at_dashes(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="10mbit", help="each node's outgoing bandwidth (tc's units)")
    p.add_argument("--delay", type=float, default=20.0, help="ms added each way where the kernel has netem")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--inner_steps", type=int, default=20)
    p.add_argument("--val_every", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results/local_sgd-cpu2.json")
    args = p.parse_args(own)
    if sys.platform != "linux" or os.geteuid() != 0:
        raise SystemExit("benchmarks.local_sgd: error: needs root on Linux (network namespaces, tc)")

    work = Path(tempfile.mkdtemp(prefix="tinytrain-local-sgd-"))
    env = {**os.environ, "TINYTRAIN_SLURM_DIR": str(work / "slurm"), "TINYTRAIN_HOME": str(ROOT),
           "TINYTRAIN": f"{sys.executable} -m tinytrain", "TINYTRAIN_CACHE": str(work / "cache"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("MASTER_ADDR", None)
    fit = ["--config", str(ROOT / "recipes" / "ci.yaml"), "--trainer.accelerator", "cpu", "--trainer.max_steps",
           str(args.steps), "--model.optim.decay_steps", str(args.steps), "--trainer.val_check_interval",
           str(args.val_every), "--checkpoint.every_n_steps", str(args.steps), "--trainer.log_every_n_steps", "1",
           "--trainer.enable_progress_bar", "false", *passed]
    modes = {
        "fsdp2": ("train-multinode.sbatch", ["--trainer.strategy", "fsdp2"]),
        "diloco": ("train-islands.sbatch", ["--local_sgd.inner_steps", str(args.inner_steps)]),
    }
    sh("bash", str(CLUSTER), "start", "--nodes", "2", env=env)
    try:
        # The data is prepared (into TINYTRAIN_CACHE, shared) by a one-step run before the link is slowed.
        run_job("train-multinode.sbatch", work / "prepare", env, [*fit, "--trainer.max_steps", "1",
                                                                  "--trainer.strategy", "fsdp2"])
        link = limit_links(args.rate, args.delay)
        results = {}
        for name, (script, extra) in modes.items():
            cwd = work / name
            job = run_job(script, cwd, env, [*fit, *extra])
            points = curve(cwd / "runs" / "ci")
            results[name] = {**job, "curve": points, "final_val_loss": points[-1][2] if points else None,
                             "train_seconds": points[-1][1] if points else None}
    finally:
        sh("bash", str(CLUSTER), "stop", env=env, check=False)
    target = max(r["final_val_loss"] for r in results.values())
    for r in results.values():
        r["seconds_to_shared_loss"] = seconds_to(r["curve"], target)
    f, d = results["fsdp2"], results["diloco"]
    result = {
        "benchmark": "local_sgd", "command": command("local_sgd", all_args), "machine": machine(),
        "link": link, "steps": args.steps, "inner_steps": args.inner_steps, "shared_val_loss": target,
        "results": results,
        "ratios": {"link_bytes_fsdp2_over_diloco": f["link_bytes"] / max(1, d["link_bytes"]),
                   "seconds_to_shared_loss_fsdp2_over_diloco":
                       (f["seconds_to_shared_loss"] / d["seconds_to_shared_loss"])
                       if f["seconds_to_shared_loss"] and d["seconds_to_shared_loss"] else None},
    }
    out = write_result(result, args.out)
    picture = plot(results, out.with_suffix(".png"))
    print(f"wrote {out}" + (f" and {picture}" if picture else ""))
    for name, r in results.items():
        print(f"{name}: {r['train_seconds']:.0f} s training, val loss {r['final_val_loss']:.3f}, "
              f"{r['link_bytes'] / 1e6:.1f} MB over the link, {r['seconds_to_shared_loss']} s to {target:.3f}")


if __name__ == "__main__":
    main()
