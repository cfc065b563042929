"""Islands of unequal speed: synchronous DiLoCo against asynchronous Local SGD with and without the
two fixes of Liu et al. (2024), delayed Nesterov and dynamic local updates. Two islands of one
process each on this machine; island 1's process is held to ``--slow_quota`` of a core by a CPU
cgroup (v1 ``cpu.cfs_quota_us`` or v2 ``cpu.max``), island 0 runs free. Every mode trains the ci
recipe's model for the same wall time (``trainer.max_time``), from the same seed and data, one
after the other:

- sync: one job of 2 processes, `local_sgd.mode sync`, islands of 1: every round waits for island 1;
- async: `tinytrain island-server` and two island jobs, `local_sgd.mode async`, without the fixes;
- async+dn+dylu: the same with `delayed_nesterov 2` and `dynamic_local_updates true`.

Reported per mode: island 0's validation loss against its training wall seconds and against the
global updates it has seen (its validations fall right after a round's exchange, so they score the
global weights), the steps each island took, the updates the server applied. Needs root (cgroups).

    sudo .venv/bin/python -m benchmarks.local_sgd_async --out benchmarks/results/local_sgd_async-cpu2.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import command, machine, split_at_dashes, write_result

ROOT = Path(__file__).resolve().parents[1]


class SlowGroup:
    """A CPU cgroup holding its processes to ``quota`` of one core."""

    def __init__(self, quota: float) -> None:
        v1 = Path("/sys/fs/cgroup/cpu")
        v2 = Path("/sys/fs/cgroup")
        period = 100_000
        if (v1 / "cpu.cfs_quota_us").exists():
            self.path = v1 / "tinytrain-slow-island"
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.cfs_period_us").write_text(str(period))
            (self.path / "cpu.cfs_quota_us").write_text(str(int(quota * period)))
        elif (v2 / "cgroup.controllers").exists() and "cpu" in (v2 / "cgroup.controllers").read_text():
            self.path = v2 / "tinytrain-slow-island"
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.max").write_text(f"{int(quota * period)} {period}")
        else:
            raise SystemExit("benchmarks.local_sgd_async: error: no CPU cgroup controller to slow an island with")

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                (self.path.parent / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        self.path.rmdir()


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def fit(args: list[str], cwd: Path, env: dict, log_name: str) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    log = open(cwd / log_name, "w")
    return subprocess.Popen([sys.executable, "-m", "tinytrain", "fit", *args], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait(proc: subprocess.Popen, what: str, cwd: Path, log_name: str) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"benchmarks.local_sgd_async: error: {what} failed:\n"
                         f"{(cwd / log_name).read_text()[-4000:]}")


def curve(run: Path) -> list[dict]:
    """Each validation of the run: step, training wall seconds, global updates seen, val/loss."""
    from tinytrain.train.plot import read_run

    metrics = read_run(run)
    seconds, updates = metrics.get("train/wall_seconds", {}), metrics.get("local_sgd/outer_steps", {})
    return [{"step": s, "seconds": seconds.get(s), "updates": updates.get(s), "val_loss": loss}
            for s, loss in sorted(metrics.get("val/loss", {}).items())]


def last_step(run: Path) -> int:
    """The optimizer steps the run took (its last logged train/loss step + 1)."""
    from tinytrain.train.plot import read_run

    return max(read_run(run).get("train/loss", {-1: 0})) + 1


def plot(results: dict, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        c = r["curve"]
        axes[0].plot([p["seconds"] for p in c], [p["val_loss"] for p in c], marker="o", label=name)
        axes[1].plot([p["updates"] for p in c], [p["val_loss"] for p in c], marker="o", label=name)
    axes[0].set_xlabel("island 0's training wall seconds")
    axes[1].set_xlabel("global updates seen by island 0")
    for ax in axes:
        ax.set_ylabel("validation loss (island 0)")
        ax.legend()
    fig.suptitle("two islands, island 1 at a reduced CPU quota")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def main(argv: list[str] | None = None) -> None:
    all_args, own, passed = split_at_dashes(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=150, help="each mode's training time (trainer.max_time)")
    p.add_argument("--inner_steps", type=int, default=20)
    p.add_argument("--slow_quota", type=float, default=0.5, help="island 1's share of one core")
    p.add_argument("--out", default="benchmarks/results/local_sgd_async-cpu2.json")
    args = p.parse_args(own)
    if sys.platform != "linux" or os.geteuid() != 0:
        raise SystemExit("benchmarks.local_sgd_async: error: needs root on Linux (a CPU cgroup)")
    h = args.inner_steps
    work = Path(tempfile.mkdtemp(prefix="tinytrain-local-sgd-async-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TINYTRAIN_CACHE": str(work / "cache")}
    # Validation after every H steps of island 0 (the fast one, whose rounds last H in every mode):
    # right after its exchange, so it scores the global weights.
    recipe = ["--config", str(ROOT / "recipes" / "ci.yaml"), "--trainer.strategy", "fsdp2", "--trainer.max_steps",
              "100000", "--trainer.max_time", f"00:00:{args.seconds // 60:02d}:{args.seconds % 60:02d}",
              "--model.optim.decay_steps", "1000", "--trainer.val_check_interval", str(h),
              "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
              "--checkpoint.every_n_steps", "100000", "--local_sgd.inner_steps", str(h), *passed]
    slow = SlowGroup(args.slow_quota)
    results = {}
    try:
        # The data, prepared once outside every timed run.
        prep = fit([*recipe, "--trainer.max_steps", "1", "--trainer.max_time", "null"], work / "prepare", env, "log")
        wait(prep, "preparing the data", work / "prepare", "log")

        cwd = work / "sync"
        proc = fit([*recipe, "--trainer.devices", "2", "--local_sgd.mode", "sync", "--local_sgd.island_size", "1"],
                   cwd, env, "log")
        deadline = time.monotonic() + 120
        while not children(proc.pid) and time.monotonic() < deadline:  # Lightning starts rank 1 as a child
            time.sleep(0.05)
        for pid in children(proc.pid):
            slow.add(pid)
        wait(proc, "the synchronous run", cwd, "log")
        run = cwd / "runs" / "ci"
        results["sync"] = {"curve": curve(run), "island_steps": [last_step(run)] * 2}

        for name, fixes in (("async", []), ("async+dn+dylu", ["--local_sgd.delayed_nesterov", "2",
                                                              "--local_sgd.dynamic_local_updates", "true"])):
            cwd = work / name
            cwd.mkdir()
            address_file = cwd / "address"
            server = subprocess.Popen([sys.executable, "-m", "tinytrain", "island-server", cwd / "server", "--port",
                                       "0", "--address_file", address_file], cwd=cwd, env=env,
                                      stdout=open(cwd / "server.log", "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True)
            try:
                while not address_file.exists():
                    time.sleep(0.05)
                island = [*recipe, "--local_sgd.mode", "async", "--local_sgd.server", address_file.read_text().strip(),
                          "--local_sgd.islands", "2", *fixes]
                procs = [fit([*island, "--local_sgd.island_index", str(i)], cwd / f"island{i}", env, "log")
                         for i in range(2)]
                slow.add(procs[1].pid)
                for i, proc in enumerate(procs):
                    wait(proc, f"{name} island {i}", cwd / f"island{i}", "log")
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(60)
            from tinytrain.train.island_server import IslandServer

            state = IslandServer(cwd / "server")
            results[name] = {"curve": curve(cwd / "island0" / "runs" / "ci"),
                             "island_steps": [last_step(cwd / f"island{i}" / "runs" / "ci") for i in range(2)],
                             "server_updates": state.outer.updates,
                             "island_updates": [state.islands[i].updates for i in range(2) if i in state.islands],
                             "round_lengths_seen": sorted({r[2] for i in state.islands for r in
                                                           state.islands[i].rounds})}
    finally:
        slow.remove()
    for r in results.values():
        r["final_val_loss"] = r["curve"][-1]["val_loss"] if r["curve"] else None
    result = {"benchmark": "local_sgd_async", "command": command("local_sgd_async", all_args), "machine": machine(),
              "seconds": args.seconds, "inner_steps": h, "slow_quota": args.slow_quota, "results": results}
    out = write_result(result, args.out)
    picture = plot(results, out.with_suffix(".png"))
    print(f"wrote {out}" + (f" and {picture}" if picture else ""))
    for name, r in results.items():
        print(f"{name}: island steps {r['island_steps']}, final val loss {r['final_val_loss']}, "
              f"updates {r['curve'][-1]['updates'] if r['curve'] else None}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
