"""SIGUSR1, SLURM's warning before a time limit or a preemption, as a flag.

`tinytrain fit` installs the handler before it imports anything heavy: until then SIGUSR1's
default action would kill the process, and Lightning's own SLURM handler (which Lightning installs
only where no handler is set yet) saves a checkpoint from inside the handler, which can interrupt
a backward pass or an FSDP collective. The handler only raises a flag; the Checkpointing callback
acts on it at a step boundary, where every rank agrees.
"""

from __future__ import annotations

import signal
import threading

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
