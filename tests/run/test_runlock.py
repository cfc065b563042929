"""One writer per run folder: tinytrain's run lock, with real processes."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ci_args, tinytrain_in_process

from tinytrain.run.lock import EXPIRY, LOCK, RunLock, RunLocked


def test_two_runs_started_together_on_one_folder(code_corpus, tmp_path):
    """A double-submitted job: one trains, the other stops at once naming the holder."""
    env = {**os.environ, "TINYTRAIN_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    tinytrain_in_process(*ci_args(code_corpus, "--trainer.max_steps", "1"), cwd=tmp_path, check=True)  # the corpus
    # 120 steps hold the lock for about 20 s on 2 busy cores: far longer than the two starts differ
    args = [sys.executable, "-m", "tinytrain", *map(str, ci_args(code_corpus, "--trainer.max_steps", "120",
                                                                     "--checkpoint.resume", "false",
                                                                     "--trainer.default_root_dir", "runs/shared"))]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.pid, p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for _, code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, [(c, e[-2000:]) for _, c, e in results]
    (winner,) = [pid for pid, code, _ in results if code == 0]
    (err,) = [e for _, code, e in results if code != 0]
    line = err.strip().splitlines()[-1]
    assert line.startswith("tinytrain fit: error: ") and "is being written by another tinytrain process" in line
    assert f"pid {winner}" in line and "Traceback" not in err
    ckpts = tmp_path / "runs" / "shared" / "checkpoints"
    assert os.readlink(ckpts / "last") == "step-00000120" and not (ckpts / LOCK).exists()


def _write_lock(folder, **info) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "theirs", **info}))


def test_a_lock_is_free_once_its_holder_is_gone(tmp_path):
    # On this host, a process that has exited: free at once.
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    _write_lock(tmp_path / "a", host=socket.gethostname(), pid=int(done.stdout))
    lock = RunLock(tmp_path / "a")
    lock.acquire()
    lock.check()
    lock.release()
    assert not (tmp_path / "a" / LOCK).exists()
    # On another host, with a fresh heartbeat: held, and the error names the holder.
    _write_lock(tmp_path / "b", slurm_job="77")
    with pytest.raises(RunLocked, match="host elsewhere pid 1, SLURM job 77"):
        RunLock(tmp_path / "b").acquire()
    # ... and once the heartbeat is older than the expiry: free.
    old = time.time() - EXPIRY - 5
    os.utime(tmp_path / "b" / LOCK, (old, old))
    lock = RunLock(tmp_path / "b")
    lock.acquire()
    assert json.loads((tmp_path / "b" / LOCK).read_text())["token"] == lock.token
    lock.release()


def test_a_requeued_slurm_job_takes_its_own_lock_back(tmp_path, monkeypatch):
    """scontrol requeue kills a job and starts it again, possibly on another node, while its lock's
    heartbeat is still fresh: the same job with a higher restart count gets in."""
    _write_lock(tmp_path, slurm_job="4242", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()
    _write_lock(tmp_path, slurm_job="4243", slurm_restart=0)  # another job: still held
    with pytest.raises(RunLocked):
        RunLock(tmp_path).acquire()


def test_a_holder_that_lost_its_lock_does_not_write(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    (tmp_path / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 9, "token": "someone-else"}))
    with pytest.raises(RunLocked, match="no longer holds the run lock"):
        lock.check()
    lock.release()
    assert (tmp_path / LOCK).exists()  # not ours: left alone
