"""An exponential moving average of the weights, kept during training (`model.ema_decay`).

The average lives beside the model as buffers of a module that LitLlama holds as ``ema``, so its
values travel in Lightning's state dict under ``ema.<parameter name>`` (with ``/`` for ``.``): in
every checkpoint, sharded like the parameters under FSDP2 (each buffer is a clone of its sharded
parameter, a DTensor with the same placement), and restored exactly on resume. The update after
each optimizer step touches local shards only: no communication.

The decay ramps up as min(decay, (1 + t) / (10 + t)) at optimizer step t (as TensorFlow's
ExponentialMovingAverage with num_updates), so the random initial weights are forgotten early;
it is a pure function of the step, so resume stays exact.
"""

from __future__ import annotations

import torch
from torch import nn

from tinytrain.store.layout import ema_buffer_name


class WeightAverage(nn.Module):
    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        with torch.no_grad():
            for name, p in model.named_parameters():
                self.register_buffer(ema_buffer_name(name), p.detach().clone())

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average toward the weights just written by optimizer step ``step``."""
        averages, weights = [], []
        for name, p in model.named_parameters():
            averages.append(_local(getattr(self, ema_buffer_name(name))))
            weights.append(_local(p.detach()))
        torch._foreach_lerp_(averages, weights, 1.0 - self.decay_at(step))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
