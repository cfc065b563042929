"""One optimizer step: the training step LitLlama runs and the benchmarks time.

A step takes this rank's tokens of one global batch, shaped (accumulation, micro batch,
seq_len + 1), in any integer dtype (the loader sends int16 or int32 to keep transfers small;
ids are widened on the device). It returns device tensors and never waits for the device, so
the host can queue the next step while this one runs.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from torch import nn

from tinytrain.train import parallel


class StepTimer:
    """Times the parts of a step without waiting for the device after each one: CUDA events are
    recorded as the host queues the work and read once, after the step (``times``); on CPU,
    where work runs as it is queued, the host clock serves."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def times(self) -> list[tuple[str, float]]:
        """(name, seconds since the previous mark) for every mark after the first; waits for the
        device once."""
        if self.cuda and self.marks:
            self.marks[-1][1].synchronize()
        out = []
        for (_, before), (name, after) in zip(self.marks, self.marks[1:]):
            out.append((name, before.elapsed_time(after) / 1e3 if self.cuda else after - before))
        return out


def grad_norm(model: nn.Module, clip: float) -> torch.Tensor:
    """The global gradient norm (before clipping), clipping to ``clip`` when it is > 0."""
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2


def train_step(model: nn.Module, optimizer, batch: torch.Tensor, lr: float, grad_clip: float,
               backward: Optional[Callable[[torch.Tensor], None]] = None,
               timer: Optional[StepTimer] = None,
               accept: Optional[Callable[[torch.Tensor, torch.Tensor], bool]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the gradients of every micro-batch of ``batch``, clip, and take one optimizer
    step at learning rate ``lr``. Returns (mean loss, gradient norm before clipping).

    ``backward`` defaults to ``Tensor.backward`` (Lightning passes its ``manual_backward``).
    ``accept(loss, grad_norm)`` returning False skips the update: the optimizer steps with no
    gradients (AdamW and Muon leave parameters and state alone), so the step still counts.
    Under FSDP2, gradients are reduced once, after the last micro-batch, and with several
    micro-batches each block's parameters are gathered once per step, not twice per micro-batch
    (see ``parallel.gathered_for_step``).
    """
    ratios = getattr(optimizer, "lr_ratios", None)  # Muon's groups run at their own peak (see muon.py)
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr * (ratios[i] if ratios is not None else 1.0)
    accum = batch.size(0)
    total = torch.zeros((), device=batch.device)
    if timer is not None:
        timer.mark("start")
    with parallel.gathered_for_step(model, accum):
        for i in range(accum):
            parallel.set_gradient_sync(model, i == accum - 1)
            tokens = batch[i].long()  # (micro, seq_len + 1)
            loss = model(tokens[:, :-1], tokens[:, 1:])
            (backward or torch.Tensor.backward)(loss / accum)
            total += loss.detach()
            if timer is not None:
                timer.mark("micro_batch")
    norm = grad_norm(model, grad_clip)
    if accept is not None and not accept(total / accum, norm):
        optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if timer is not None:
        timer.mark("optimizer")
    return total / accum, norm
