"""SIGUSR1, SLURM's warning before a time limit or a preemption, as a flag.

`tinytrain fit` installs the handler before it imports anything heavy: until then SIGUSR1's
default action would kill the process, and Lightning's own SLURM handler (which Lightning installs
only where no handler is set yet) saves a checkpoint from inside the handler, which can interrupt
a backward pass or an FSDP collective. The handler only raises a flag; the Checkpointing callback
acts on it at a step boundary, where every rank agrees.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

_state = {"requested": False}


def _on_signal(signum, frame) -> None:
    _state["requested"] = True


def install() -> bool:
    """Raise the flag on SIGUSR1 from now on (main thread only); True if installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGUSR1, _on_signal)
    return True


def uninstall() -> None:
    """Give SIGUSR1 its default action back, if the handler is ours."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGUSR1) is _on_signal:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def requested() -> bool:
    return _state["requested"]


def slurm_job() -> Optional[str]:
    """This SLURM job's id (``JOB_TASK`` for an array task), or None outside SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID") or None


def take_sigterm_from_lightning(trainer) -> None:
    """Undo what Lightning (2.5 to 2.7) sets up for SIGTERM once training starts.

    Lightning's SIGTERM handler broadcasts a tensor from inside the signal handler (a collective
    that can interleave with the one the interrupted step was in), and its training loop
    broadcasts a "SIGTERM seen" flag and reads it back on the host before every batch: a
    collective and a device sync per step. On SLURM, SIGTERM reaches every task when the job is
    cancelled or requeued without warning; the newest complete checkpoint is the resume point, so
    the right answer is to end at once. The handler here forwards SIGTERM to the processes
    Lightning started (when it started them) and ends this one with the default action. SLURM's
    warning, SIGUSR1, is what saves a checkpoint (see install()).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    from tinytrain.lightning_private import drop_sigterm_broadcast

    drop_sigterm_broadcast(trainer)
    launcher = getattr(trainer.strategy, "launcher", None)
    children = list(getattr(launcher, "procs", None) or [])
    if not children:
        # Nothing to forward to: the default action, which the kernel applies even while this
        # process is blocked in a device sync or a collective (a Python handler would wait there,
        # up to the collective's timeout, when a peer has already gone).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if int(os.environ.get("LOCAL_RANK", 0) or 0) > 0:
            die_with_parent()  # a worker Lightning (or torchrun) started: never outlive the launcher
        return

    def on_sigterm(signum, frame) -> None:
        launcher.kill(signum)  # Lightning's local launcher: its worker processes
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def die_with_parent() -> bool:
    """Ask Linux to SIGKILL this process when the one that started it ends (PR_SET_PDEATHSIG);
    False where that is not available."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the parent ended before the request: it would never fire
        os.kill(os.getpid(), signal.SIGKILL)
    return True
