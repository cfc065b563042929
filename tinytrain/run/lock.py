"""One writer per run folder: a lock file that names its holder and does not outlive it.

``<checkpoints>/.lock`` is created with O_CREAT | O_EXCL (atomic on local disks, NFS v3+, Lustre
and GPFS) and holds the holder's host, pid, start time, SLURM job and a random token. The holder
touches it every ``HEARTBEAT`` seconds. Another process finds the lock held unless:

- the holder is on this host and its pid is gone (or is another process now), or
- its last heartbeat is older than ``EXPIRY`` seconds (a SIGKILL'd process or a lost node elsewhere), or
- it is an earlier run of this same SLURM job (a requeued job restarts where it was killed).

Taking over a stale lock renames it first, which only one contender can do; the holder checks
that the lock is still its own before every checkpoint it writes.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from tinytrain.errors import TinyTrainError
from tinytrain.run.preemption import slurm_job

log = logging.getLogger(__name__)

LOCK = ".lock"
HEARTBEAT = 15.0  # seconds between touches of the lock file
EXPIRY = 120.0    # a lock untouched this long belongs to no live process


class RunLocked(TinyTrainError, RuntimeError):
    """Another process is writing to this run folder."""


def _process_start(pid: int) -> Optional[str]:
    """Start time of a process (Linux), to tell a pid from a later process given the same number."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive_here(info: dict) -> bool:
    pid = int(info.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = info.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def _job() -> Optional[str]:
    return slurm_job()


def describe(info: dict, age: float) -> str:
    job = f", SLURM job {info['slurm_job']} (restart {info.get('slurm_restart', 0)})" if info.get("slurm_job") else ""
    return (f"host {info.get('host')} pid {info.get('pid')}{job}, since {info.get('started')}, "
            f"last heartbeat {age:.0f} s ago")


class RunLock:
    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _info(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "slurm_job": _job(),
                "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0), "token": self.token}

    def _read(self) -> tuple[Optional[dict], float]:
        """(holder info, seconds since its last heartbeat), or (None, 0) if there is no lock."""
        try:
            age = time.time() - self.path.stat().st_mtime
            return json.loads(self.path.read_text() or "{}"), age
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError):  # half-written by a contender this very moment: judge it by age alone
            return {}, 0.0

    def _why_stale(self, info: dict, age: float) -> Optional[str]:
        if info.get("host") == socket.gethostname() and info.get("pid") is not None and not _alive_here(info):
            return f"its process {info['pid']} on this host is gone"
        if age > EXPIRY:
            return f"its last heartbeat was {age:.0f} s ago (more than {EXPIRY:.0f} s)"
        job = _job()
        restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
        if job and info.get("slurm_job") == job and int(info.get("slurm_restart", 0)) < restart:
            return f"it is held by an earlier run of this SLURM job ({job}, restart {info.get('slurm_restart', 0)})"
        return None

    def acquire(self) -> None:
        self._made_folder = not self.path.parent.exists()  # removed again on release if nothing else was written
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._unwritable(e) from e
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info, age = self._read()
                if info is None:
                    continue  # released meanwhile
                why = self._why_stale(info, age)
                if why is None:
                    raise RunLocked(f"{self.path.parent} is being written by another tinytrain process "
                                    f"({describe(info, age)}); one run folder takes one writer. Wait for it, or "
                                    f"use another --trainer.default_root_dir; a dead holder's lock ({self.path}) "
                                    f"expires {EXPIRY:.0f} s after its last heartbeat")
                self._break(info, why)
                continue
            except OSError as e:  # a read-only file system, no permission, no room
                raise self._unwritable(e) from e
            with os.fdopen(fd, "w") as f:
                json.dump(self._info(), f)
            self._thread = threading.Thread(target=self._beat, name="tinytrain-run-lock", daemon=True)
            self._thread.start()
            return
        raise RunLocked(f"{self.path}: could not take the lock (contended); try again")

    def _unwritable(self, e: OSError) -> TinyTrainError:
        return TinyTrainError(f"{self.path.parent}: cannot write to the run folder ({e.strerror or e}); training "
                              "writes its checkpoints there: make it writable or use another --trainer.default_root_dir")

    def _break(self, info: dict, why: str) -> None:
        aside = self.path.with_name(f"{LOCK}.stale-{os.getpid()}-{self.token}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return  # another contender moved it first
        try:
            moved = json.loads(aside.read_text() or "{}")
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") != info.get("token"):  # a contender's fresh lock was taken instead: give it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        else:
            log.warning("took over the run lock %s: %s (%s)", self.path, why, describe(info, 0.0).rsplit(",", 1)[0])
        aside.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def check(self) -> None:
        """Raise RunLocked unless this process still holds the lock (before writing a checkpoint)."""
        info, age = self._read()
        if not info or info.get("token") != self.token:
            raise RunLocked(f"{self.path}: this process no longer holds the run lock"
                            + (f" (now {describe(info, age)})" if info else "") + "; stopping before writing")

    def release(self) -> None:
        self._stop.set()
        info, _ = self._read()
        if info and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)
            if getattr(self, "_made_folder", False):
                try:
                    self.path.parent.rmdir()  # only if empty: a run that stopped before its first checkpoint
                except OSError:
                    pass
