import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def pytest_configure(config):
    """Under `-n N`, each worker (and every process it starts) gets its share of the cores as torch
    threads. Left at torch's default, two workers each run one thread per core: OpenMP threads that
    spin-wait on a busy core cost a third of the throughput of one thread each (measured: two
    processes training a small MLP, 2 threads each 20 steps/s together, 1 thread each 60)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_code_corpus(folder: Path, files: int = 80, seed: int = 0) -> Path:
    """A deterministic corpus of small Python-like files: structured enough that a tiny model's loss
    falls within a few dozen steps."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "count", "total", "index", "value", "items", "result"]
    ops = [("+", "sum"), ("-", "difference"), ("*", "product"), ("//", "quotient")]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        lines = [f'"""Module {i}: arithmetic helpers."""', ""]
        for j in range(rng.randint(6, 12)):
            a, b = rng.sample(names, 2)
            op, word = rng.choice(ops)
            lines += [
                f"def {word}_{a}_{b}_{j}({a}, {b}):",
                f'    """Return the {word} of {a} and {b}."""',
                f"    {names[j % len(names)]} = {a} {op} {b}",
                f"    return {names[j % len(names)]}",
                "",
            ]
        (folder / f"mod_{i:03d}.py").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def code_corpus(tmp_path_factory) -> Path:
    return write_code_corpus(tmp_path_factory.mktemp("corpus") / "code")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, code_corpus) -> Path:
    """The code corpus prepared with a 512-piece tokenizer (a session-wide, read-only folder)."""
    from tinytrain.data.corpus import prepare_text_folder

    return prepare_text_folder(code_corpus, tmp_path_factory.mktemp("prepared") / "code-512", 512, val_fraction=0.1)


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory, code_corpus):
    """The ci recipe as it is: 40 steps, checkpoints at 20 and 40, on the code corpus; (working folder,
    run folder, the finished process). Shared by every test that only reads a trained run: tests that
    change it copy it first."""
    cwd = tmp_path_factory.mktemp("ci-run")
    proc = run_tinytrain(*ci_args(code_corpus), cwd=cwd)  # a process of its own: tests read its console
    return cwd, cwd / "runs" / "ci", proc


@pytest.fixture(scope="session")
def fsdp2_run(tmp_path_factory, code_corpus) -> Path:
    """A 20-step ci run under FSDP2 (one process): its folder, holding sharded checkpoints at steps
    10 and 20 and `last`. Read-only: tests that alter a checkpoint copy it first."""
    cwd = tmp_path_factory.mktemp("fsdp2-run")
    run_tinytrain(*ci_args(code_corpus, "--trainer.strategy", "fsdp2", "--trainer.max_steps", "20"), cwd=cwd)
    return cwd


def small_tmpfs(tmp_path: Path, size: str):
    """A tmpfs of ``size`` (e.g. "3m") mounted under tmp_path, for disk-full tests; skips without root.
    A generator for fixtures: yields the mount point, unmounts afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def metric_rows(run: Path) -> list[dict]:
    """Every row of a run's CSV logs (``run`` is the recipe's run folder; resumed runs add versions)."""
    import csv

    rows = []
    for path in sorted((run / "logs").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def train_losses(cwd: Path, recipe: str = "ci") -> dict[int, float]:
    """step -> train/loss of the run made in ``cwd``."""
    return dict(series(metric_rows(cwd / "runs" / recipe), "train/loss"))


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder (to show nothing was modified)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()
    }


def processes() -> list[dict]:
    """Every process in /proc: pid, state (R, S, Z, ...), ppid and process group."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while being read
        found.append({"pid": int(stat.parent.name), "state": fields[0], "ppid": int(fields[1]),
                      "pgrp": int(fields[2])})
    return found


def run_tinytrain(*args, cwd: Path, env: dict | None = None, timeout: float = 600, check: bool = True):
    """Run the real `tinytrain` command in a subprocess; return the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TINYTRAIN_CACHE": str(cwd / "cache"),
                "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "tinytrain", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"tinytrain {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def tinytrain_in_process(*args, cwd: Path, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """`tinytrain ARGS` called in this process: what run_tinytrain returns (exit code, stdout, stderr),
    without a second interpreter that spends seconds importing Lightning. For refusals and other short
    commands, where a process of its own is not what the test is about. The working folder, the
    environment and torch's random state are restored afterwards; tinytrain's and Lightning's log lines
    are captured in stderr, as a process's would be. A bug's exception becomes a traceback in stderr and
    exit code 1, so `one_line` fails on it as on a process's; with check=True a non-zero exit fails the test.
    Not for runs of several processes (Lightning's launcher would start this interpreter's command again),
    nor for what needs a process: signals, a kill, an exec after a rollback, wandb."""
    import contextlib
    import io
    import logging
    import traceback

    from tinytrain.commands.main import main
    from tinytrain.logs import setup_logging

    setup_logging()
    out, err = io.StringIO(), io.StringIO()
    # every plain stream handler of every logger (an earlier test's may hold a stream since closed)
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    handlers = list({id(h): h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler}.values())
    streams = [h.stream for h in handlers]  # not setStream: it flushes the old stream, which an earlier
    for h in handlers:                       # test's captured output may have closed
        h.stream = err
    saved_env, saved_cwd, rng = dict(os.environ), os.getcwd(), torch.random.get_rng_state()
    os.environ.update({"TINYTRAIN_CACHE": str(cwd / "cache"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                       **(env or {})})
    code = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([*map(str, args)])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.random.set_rng_state(rng)
        for handler, stream in zip(handlers, streams):
            handler.stream = stream
    if check and code != 0:
        raise AssertionError(f"tinytrain {' '.join(map(str, args))} failed ({code}):\n{out.getvalue()[-3000:]}\n"
                             f"{err.getvalue()[-6000:]}")
    return subprocess.CompletedProcess(["tinytrain", *map(str, args)], code, out.getvalue(), err.getvalue())


def make_cli(*args):
    """The `fit` command's LightningCLI, parsed in-process from ``args`` without running anything."""
    from tinytrain.commands.main import TinyTrainCLI
    from tinytrain.data.datamodule import TokenData
    from tinytrain.run.checkpointing import ConfigSaver
    from tinytrain.train.lit import LitLlama

    return TinyTrainCLI(LitLlama, TokenData, run=False, save_config_callback=ConfigSaver,
                        args=[*map(str, args)], auto_configure_optimizers=False)


def ci_args(corpus: Path, *extra) -> list:
    """`fit` on the ci recipe, reading the given corpus."""
    return ["fit", "--config", RECIPES / "ci.yaml", "--data.corpus", corpus, "--data.val_fraction", "0.1", *extra]


def one_line(proc, command: str) -> str:
    """The one-line error a failed command printed last (`tinytrain <command>: error: ...`), with no traceback."""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"tinytrain {command}: error: "), line
    return line
