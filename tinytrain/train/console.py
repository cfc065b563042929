"""What a user reads while training: a progress bar of optimizer steps, one line per validation,
and at the end what happened and what to do next (with the plot of the run)."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from tinytrain.lightning_private import should_log
from tinytrain.logs import duration
from tinytrain.train.metrics import TOKENS_PER_SEC, TRAIN_LOSS, VAL_BPB, VAL_LOSS
from tinytrain.train.spikes import rollback_requested

log = logging.getLogger(__name__)


class StepProgress(ProgressBar):
    """A bar over the optimizer steps of max_steps, with its ETA, the loss, tokens/s and the latest
    validation loss; one printed line per validation. Without a terminal (a SLURM log), a plain line
    every twentieth of the run instead of a bar."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled, self.bar, self._val = True, None, ""
        self._shown = ""  # loss and tokens/s as of the last step Lightning wrote logs
        self._logged = False  # whether the previous step was one

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        self.total = trainer.max_steps if trainer.max_steps > 0 else None
        self.tty, self.started = sys.stderr.isatty(), time.perf_counter()
        self.first = trainer.global_step
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=trainer.global_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, desc="train", leave=True)

    def _metrics(self, trainer) -> str:
        # Training metrics are logged without prog_bar: Lightning converts progress-bar metrics to
        # Python numbers after every batch (a host read, so a device sync, per value and step). The
        # bar reads the callback metrics (tensors) once per logging interval, at the step after
        # Lightning wrote logs (when every callback has logged), and keeps the text between.
        logged_last, self._logged = self._logged, should_log(trainer)
        if logged_last:
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if k in (TRAIN_LOSS, TOKENS_PER_SEC)}
            self._shown = " · ".join(p for p in (f"loss {m[TRAIN_LOSS]:.3f}" if TRAIN_LOSS in m else "",
                                                 f"{m[TOKENS_PER_SEC]:,.0f} tok/s"
                                                 if TOKENS_PER_SEC in m else "") if p)
        return " · ".join(p for p in (self._shown, self._val) if p)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        step = trainer.global_step
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(self._metrics(trainer), refresh=False)
            self.bar.refresh()
        elif self.total and (step - self.first) % max(1, (self.total - self.first) // 20) == 0:
            done = (step - self.first) / max(1, self.total - self.first)
            elapsed = time.perf_counter() - self.started
            eta = f", ETA {duration(elapsed / done * (1 - done))}" if done else ""
            print(f"step {step}/{self.total} ({done:.0%}{eta}) · {self._metrics(trainer)}", file=sys.stderr, flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not (self._enabled and trainer.is_global_zero) or trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        if VAL_LOSS not in m:
            return
        loss = float(m[VAL_LOSS])
        self._val = f"val {loss:.3f}"
        line = f"step {trainer.global_step}: val/loss {loss:.3f} (perplexity {math.exp(min(loss, 50)):,.1f})"
        if VAL_BPB in m:
            line += f", {float(m[VAL_BPB]):.3f} bits per byte"
        (self.bar.write if self.bar is not None else print)(line, file=sys.stderr)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def print(self, *args, **kwargs) -> None:
        (self.bar.write if self.bar is not None else print)(" ".join(map(str, args)), file=sys.stderr)


class RunSummary(Callback):
    """At the end of `fit`, on rank 0: what was trained, the final validation, where the checkpoint
    and the plot are, and the commands to go on with."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started, self.first_step = time.perf_counter(), trainer.global_step

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.global_step == self.first_step:
            return
        if rollback_requested(pl_module):
            return  # not done: the run goes back to a checkpoint (tinytrain.train.spikes)
        run = Path(trainer.default_root_dir)
        plot = None
        try:
            from tinytrain.train.plot import plot_runs

            plot = plot_runs([run], run / "plot.png")
        except ImportError:
            log.info("no plot written: pip install 'tinytrain[plot]' (matplotlib) for %s", run / "plot.png")
        except Exception as e:  # a plot must never fail a finished run
            log.warning("no plot written: %s", e)
        print(summary(trainer, time.perf_counter() - self.started, plot, self.first_step), file=sys.stderr, flush=True)


def summary(trainer, seconds: float, plot: Optional[Path], first_step: int) -> str:
    dm, m = trainer.datamodule, trainer.callback_metrics
    steps = trainer.global_step - first_step
    tokens = dm.tokens_trained(trainer.global_step) - dm.tokens_trained(first_step)
    run = Path(trainer.default_root_dir)
    last = next((cb.folder(trainer) / "last" for cb in trainer.callbacks if hasattr(cb, "busy_seconds")), None)
    lines = ["", f"done: {steps:,} steps, {tokens:,} tokens in {duration(seconds)} ({tokens / max(seconds, 1e-9):,.0f} "
             f"tokens/s), now at step {trainer.global_step:,}"]
    if VAL_LOSS in m:
        loss = float(m[VAL_LOSS])
        bpb = f", {float(m[VAL_BPB]):.3f} bits per byte" if VAL_BPB in m else ""
        lines.append(f"validation: {loss:.3f} nats per token (perplexity {math.exp(min(loss, 50)):,.1f}){bpb}")
    if last is not None and last.exists():
        lines.append(f"checkpoint: {last.resolve()}")
    if plot is not None:
        lines.append(f"plot: {plot}")
    commands = [(f"tinytrain generate {run} --prompt \"def \"", "sample from it"),
                (f"tinytrain evaluate {run} --tasks arc_easy --limit 100", "downstream tasks (pip install -e \".[eval]\")"),
                (f"tinytrain convert to-hf {run} {run}-hf", "a Hugging Face folder"),
                (f"tinytrain plot {run}", "the curves (again, or beside other runs)")]
    width = max(len(c) for c, _ in commands)
    lines += ["next:", *(f"  {c.ljust(width)}   # {why}" for c, why in commands)]
    return "\n".join(lines)
