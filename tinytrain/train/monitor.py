"""What training reports: the step's values (``log_step``), where each rank runs
(``process_description``), and throughput and MFU, logged on the steps Lightning writes (a callback
LitLlama adds).

Tokens/s is measured between the ends of consecutive steps, which in steady state is the step time
with no extra device synchronisation; time other callbacks report as spent (``busy_seconds``:
checkpoint saves) is taken out, and intervals that held validation or a new measurement of the CPU
peak are not timed. MFU = achieved FLOP/s / peak: the peak from model.peak_flops, a table of GPU bf16
datasheet figures, or on a CPU a matrix product measured at the start of training.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Optional

import torch
from lightning.pytorch.callbacks import Callback

from tinytrain.lightning_private import should_log
from tinytrain.train.flops import measured_cpu_peak, peak_flops
from tinytrain.train.metrics import (
    GRAD_NORM,
    LR,
    MFU,
    MOE,
    PEAK_MEMORY_GIB,
    SPIKES_SKIPPED,
    TFLOPS_PER_DEVICE,
    TOKENS,
    TOKENS_PER_SEC,
    TOKENS_PER_SEC_PER_DEVICE,
    TRAIN_LOSS,
    WALL_SECONDS,
)

log = logging.getLogger(__name__)


def log_step(module, step: int, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor, routing: dict) -> None:
    """Log optimizer step ``step``'s values through the LightningModule. Called only on the steps
    Lightning writes logs: each value costs a device sync, and the loss a collective (sync_dist)."""
    dm = module.trainer.datamodule
    module.log(TRAIN_LOSS, loss, sync_dist=True)  # not prog_bar: see console.StepProgress
    module.log(LR, lr)
    module.log(GRAD_NORM, grad_norm)
    module.log(TOKENS, float(dm.tokens_trained(step + 1)))
    if module.spike_guard is not None:
        module.log(SPIKES_SKIPPED, float(len(module.spike_guard.skipped)))
    for name, epochs in dm.epochs_completed(step + 1).items():
        module.log(f"data/epochs/{name}", epochs)
    for name, value in routing.items():
        module.log(f"{MOE}/{name}", value)


def process_description(trainer) -> str:
    """Where this rank runs and what it may use: wrong CPU or GPU binding shows here first."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"rank {trainer.global_rank} of {trainer.world_size} on {socket.gethostname()}: "
            f"{cpus} CPUs, {torch.get_num_threads()} torch threads, device {trainer.strategy.root_device}"
            + (f" of {torch.cuda.device_count()} visible GPUs" if torch.cuda.is_available() else ""))


class Throughput(Callback):
    def __init__(self, peak: Optional[float] = None) -> None:
        self.peak = peak              # FLOP/s of one device; None: looked up or measured at the start
        self._peak_measured = False   # True: a CPU measurement, which may be measured again
        self._last: Optional[tuple[float, float]] = None  # (end of the last step, busy seconds then)
        self._started = time.perf_counter()  # when this process began training (reset in on_train_start)

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()
        device = pl_module.device
        if self.peak is None and device.type == "cuda":
            self.peak = peak_flops(torch.cuda.get_device_name(device))
            if self.peak is None:
                log.info("no bf16 peak known for %s: set model.peak_flops to log MFU", torch.cuda.get_device_name(device))
        elif self.peak is None and device.type == "cpu":
            self.peak, self._peak_measured = measured_cpu_peak(), True
            log.info("CPU peak for MFU: %.1f GFLOP/s (fastest measured matmul)", self.peak / 1e9)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last = None  # validation time is not training throughput

    @staticmethod
    def _busy(trainer) -> float:
        return sum(getattr(cb, "busy_seconds", 0.0) for cb in trainer.callbacks)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now, busy = time.perf_counter(), self._busy(trainer)
        last, self._last = self._last, (now, busy)
        if should_log(trainer):
            pl_module.log(WALL_SECONDS, now - self._started)
        if last is None or not should_log(trainer):
            return
        spec = pl_module.data_spec
        tokens_per_sec = spec.tokens_per_step / max(1e-9, (now - last[0]) - (busy - last[1]))
        per_device = tokens_per_sec / trainer.world_size
        flops = per_device * pl_module.config.training_flops_per_token(spec.seq_len)
        pl_module.log(TOKENS_PER_SEC, tokens_per_sec)
        pl_module.log(TOKENS_PER_SEC_PER_DEVICE, per_device)
        pl_module.log(TFLOPS_PER_DEVICE, flops / 1e12)
        if self.peak is not None:
            pl_module.log(MFU, flops / self.mfu_peak(flops, trainer))
        if pl_module.device.type == "cuda":
            pl_module.log(PEAK_MEMORY_GIB, torch.cuda.max_memory_allocated(pl_module.device) / 2**30)

    def mfu_peak(self, achieved_flops: float, trainer=None) -> float:
        """The peak MFU is taken against. A CPU peak measured at start-up while other work held
        the cores comes out low (MFU over 1); it is measured again then, keeping the larger, and
        the interval it ran in is not timed."""
        if self._peak_measured and achieved_flops > self.peak:
            self.peak = max(self.peak, measured_cpu_peak())
            self._last = (time.perf_counter(), self._busy(trainer)) if trainer is not None else None
            log.info("CPU peak for MFU measured again: %.1f GFLOP/s", self.peak / 1e9)
        return self.peak
