"""tinytrain's lines on the console, each once, and the known third-party noise filtered.

Lightning prints its own lines through its own handler; tinytrain's go through one handler on the
`tinytrain` logger (nothing on the root logger, which would print Lightning's lines a second
time). Known noise is filtered by its exact text: Lightning's advertisement, a deprecation inside
Lightning's pytree helper, its note on tinytrain's own ``transfer_batch_to_device``, and torchao's
report of optional kernels it could not load. Every other warning still shows. No Lightning here:
every command sets this up first.
"""

from __future__ import annotations

import logging
import warnings

# (logger name, text in the message) of records that are noise for a tinytrain user
_NOISE = (("lightning", "litlogger"), ("torchao", "Failed to load"))


class _Quiet(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def setup_logging() -> None:
    """tinytrain's INFO lines to stderr once, and the known third-party noise filtered."""
    ours = logging.getLogger("tinytrain")
    if not any(getattr(h, "_tinytrain", False) for h in ours.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[tinytrain] %(message)s"))
        handler._tinytrain = True
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
    for name, text in _NOISE:
        for logger_name in (name, f"{name}.pytorch.utilities.rank_zero", f"{name}.fabric.utilities.rank_zero"):
            logging.getLogger(logger_name).addFilter(_Quiet(text))
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device` in `LightningModule`")


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


