"""AdamW and its learning-rate schedule: a pure function of the optimizer step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from tinytrain.errors import ConfigError


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (linear warmup, cosine decay, then constant)."""

    lr: float = 4e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 4e-5
    """Learning rate at decay_steps and after."""
    warmup_steps: int = 2000
    """Optimizer steps of linear warmup from 0."""
    decay_steps: int = 1_430_512
    """Step at which the cosine decay reaches min_lr."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices and embeddings, not to norm weights."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    fused: Optional[bool] = None
    """Use the fused AdamW kernel; None lets PyTorch choose."""

    def __post_init__(self) -> None:
        problems = [f"{key} must be >= 0, got {getattr(self, key)}" for key in
                    ("lr", "min_lr", "warmup_steps", "decay_steps", "weight_decay", "grad_clip") if getattr(self, key) < 0]
        if self.warmup_steps > self.decay_steps:
            problems.append(f"warmup_steps ({self.warmup_steps}) must not exceed decay_steps ({self.decay_steps}): the "
                            "learning rate would jump from the warmup's peak to min_lr")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            problems.append(f"eps must be > 0, got {self.eps}")
        if problems:
            raise ConfigError("; ".join(f"model.optim.{p}" for p in problems))

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if step >= self.decay_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)


def adamw(model: torch.nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings, none on norm weights."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr_at(0), betas=tuple(o.betas), eps=o.eps, fused=o.fused)
