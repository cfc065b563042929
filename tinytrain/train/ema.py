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

import logging
from typing import Optional

import torch
from torch import nn

from tinytrain.errors import ConfigError
from tinytrain.store.layout import EMA_PREFIX, MODEL_PREFIX, ema_buffer_name

log = logging.getLogger(__name__)


def check_decay(decay: Optional[float]) -> None:
    if decay is not None and not 0 < decay < 1:
        raise ConfigError(f"model.ema_decay must be in (0, 1) or null, got {decay}")


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


def match_saved_average(state: Optional[dict], model: Optional[nn.Module]) -> None:
    """Fit a checkpoint's state (a full one; None when sharded, which the strategy reads into the
    module itself) to whether this run keeps an average (``model`` given) or not: a checkpoint saved
    without one starts the average at the resumed weights; one saved with it, resumed without, drops
    it. Each is said in the log."""
    if state is None:
        return
    saved = [k for k in state if k.startswith(EMA_PREFIX)]
    if model is None and saved:
        log.info("the checkpoint holds a weight average; model.ema_decay is not set, so it is dropped")
        for k in saved:
            del state[k]
    elif model is not None and not saved:
        log.info("the checkpoint holds no weight average: model.ema_decay starts it at the resumed weights")
        for name in dict(model.named_parameters()):
            state[EMA_PREFIX + ema_buffer_name(name)] = state[MODEL_PREFIX + name].clone()
