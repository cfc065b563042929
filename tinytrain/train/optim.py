"""The optimizers (AdamW; or Muon for the hidden matrices with AdamW for the rest) and the
learning-rate schedule: a pure function of the optimizer step.

Schedules (all after a linear warmup from 0):
  cosine    cosine from lr down to min_lr at decay_steps, then min_lr (TinyLlama's)
  wsd       warmup-stable-decay: lr until the cooldown, then down to min_lr at decay_steps over
            cooldown_steps (or cooldown_fraction of the run), shaped linear, 1-sqrt or cosine
  constant  lr for ever
A WSD run whose end is not known sets decay_steps far ahead; a cooldown branch (a new run started
with `--checkpoint.branch_from` a checkpoint of it) sets decay_steps = that step + its length and
cooldown_steps = its length: the branch's first step has the stable learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from tinytrain.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")
COOLDOWN_SHAPES = ("linear", "1-sqrt", "cosine")


OPTIMIZERS = ("adamw", "muon")
MUON_ADJUST_LR = ("original", "match_rms_adamw")
MUON_NS_DTYPES = ("auto", "bfloat16", "float32")


@dataclass
class OptimConfig:
    """The optimizer (AdamW, or Muon with AdamW) and its learning-rate schedule (linear warmup, then
    cosine, warmup-stable-decay or constant)."""

    lr: float = 4e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 4e-5
    """Learning rate at decay_steps and after."""
    warmup_steps: int = 2000
    """Optimizer steps of linear warmup from 0."""
    decay_steps: int = 1_430_512
    """Step at which the decay reaches min_lr (cosine and wsd)."""
    schedule: str = "cosine"
    """cosine, wsd (warmup-stable-decay) or constant."""
    cooldown_steps: Optional[int] = None
    """wsd: steps of the final decay, ending at decay_steps; None: cooldown_fraction of the run after warmup."""
    cooldown_fraction: float = 0.2
    """wsd: the cooldown's share of the steps from the end of warmup to decay_steps, when cooldown_steps is None."""
    cooldown_shape: str = "1-sqrt"
    """wsd: linear, 1-sqrt (lr x (1 - sqrt(t))) or cosine, t going from 0 to 1 over the cooldown."""
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
    optimizer: str = "adamw"
    """adamw (TinyLlama's), or muon: torch.optim.Muon for the blocks' matrices and AdamW (lr, betas,
    weight_decay above) for the embedding, the output head and the norms."""
    embedding_lr: Optional[float] = None
    """Peak learning rate of the token embedding (AdamW), following the same schedule (embedding_lr x
    lr_at(step) / lr); None: lr. Its weight decay is scaled by lr / embedding_lr, so that it shrinks by
    the same fraction per step as the other matrices. With tied embeddings it is the head's rate too."""
    muon_lr: float = 0.02
    """muon: Muon's peak learning rate; it follows the same schedule (muon_lr x lr_at(step) / lr)."""
    muon_weight_decay: float = 0.0
    """muon: decoupled weight decay of the matrices Muon trains."""
    muon_momentum: float = 0.95
    """muon: momentum (Nesterov) of Muon."""
    muon_ns_steps: int = 5
    """muon: Newton-Schulz iterations per orthogonalisation."""
    muon_adjust_lr: str = "original"
    """muon: how the learning rate scales with a matrix's shape: original (x sqrt(max(1, rows / cols)),
    Keller Jordan's) or match_rms_adamw (x 0.2 sqrt(max(rows, cols)), Moonlight's: updates of AdamW's size)."""
    muon_ns_dtype: str = "auto"
    """muon: the Newton-Schulz iteration's precision: bfloat16 (PyTorch's), float32, or auto: bfloat16 where
    the device multiplies it fast (CUDA, CPUs with AMX), float32 elsewhere (where bf16 is emulated)."""

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
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.cooldown_shape not in COOLDOWN_SHAPES:
            problems.append(f"cooldown_shape must be one of {', '.join(COOLDOWN_SHAPES)}, got {self.cooldown_shape!r}")
        if not 0 < self.cooldown_fraction <= 1:
            problems.append(f"cooldown_fraction must be in (0, 1], got {self.cooldown_fraction}")
        if self.cooldown_steps is not None and not 0 < self.cooldown_steps <= self.decay_steps - self.warmup_steps:
            problems.append(f"cooldown_steps must be in [1, decay_steps - warmup_steps = "
                            f"{self.decay_steps - self.warmup_steps}], got {self.cooldown_steps}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.embedding_lr is not None and not self.embedding_lr > 0:
            problems.append(f"embedding_lr must be > 0 (or null: lr), got {self.embedding_lr}")
        if self.muon_lr < 0 or self.muon_weight_decay < 0:
            problems.append(f"muon_lr and muon_weight_decay must be >= 0, got {self.muon_lr}, {self.muon_weight_decay}")
        if not 0 <= self.muon_momentum < 1:
            problems.append(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not 1 <= self.muon_ns_steps < 100:
            problems.append(f"muon_ns_steps must be in [1, 99], got {self.muon_ns_steps}")
        if self.muon_adjust_lr not in MUON_ADJUST_LR:
            problems.append(f"muon_adjust_lr must be one of {', '.join(MUON_ADJUST_LR)}, got {self.muon_adjust_lr!r}")
        if self.muon_ns_dtype not in MUON_NS_DTYPES:
            problems.append(f"muon_ns_dtype must be one of {', '.join(MUON_NS_DTYPES)}, got {self.muon_ns_dtype!r}")
        if problems:
            raise ConfigError("; ".join(f"model.optim.{p}" for p in problems))

    @property
    def cooldown_length(self) -> int:
        """wsd: the steps of the final decay."""
        return self.cooldown_steps or max(1, round(self.cooldown_fraction * (self.decay_steps - self.warmup_steps)))

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        if step >= self.decay_steps:
            return self.min_lr
        if self.schedule == "cosine":
            progress = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
            return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)
        start = self.decay_steps - self.cooldown_length
        if step < start:
            return self.lr
        t = (step - start) / self.cooldown_length
        left = {"linear": 1 - t, "1-sqrt": 1 - math.sqrt(t), "cosine": 0.5 * (1 + math.cos(math.pi * t))}
        return self.min_lr + left[self.cooldown_shape] * (self.lr - self.min_lr)


def adamw(model: torch.nn.Module, o: OptimConfig, params: Optional[list] = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings, none on norm weights (of ``params``, by
    default every parameter of ``model``); with ``embedding_lr``, the token embedding (and the value
    embeddings, if any) in a third group at its own rate. ``lr_ratios`` holds each group's peak over
    ``lr`` (read by tinytrain.train.step)."""
    params = list(model.parameters()) if params is None else params
    tables = [model.embed_tokens.weight] + [t.weight for t in getattr(model, "value_embeds", ())]
    embedding = [p for p in params if any(p is t for t in tables)] if o.embedding_lr is not None else []
    decay = [p for p in params if p.ndim >= 2 and not any(p is e for e in embedding)]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    ratios = [1.0, 1.0]
    if embedding:  # only then a third group: checkpoints of runs without it keep their two
        ratio = o.embedding_lr / o.lr if o.lr > 0 else 0.0
        groups.append({"params": embedding, "weight_decay": o.weight_decay / ratio if ratio else 0.0})
        ratios.append(ratio)
    optimizer = torch.optim.AdamW(groups, lr=o.lr_at(0), betas=tuple(o.betas), eps=o.eps, fused=o.fused)
    optimizer.lr_ratios = ratios
    return optimizer


def build_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of a step: AdamW, or Muon for the hidden matrices with AdamW for the rest, as one
    optimizer (see tinytrain.train.muon)."""
    if o.optimizer == "adamw":
        return adamw(model, o)
    from tinytrain.train.muon import MuonAdamW, ShardedMuon, split_parameters

    hidden, rest = split_parameters(model)
    muon = ShardedMuon(hidden, ns_dtype=muon_ns_dtype(o, hidden[0].device if hidden else torch.device("cpu")),
                       lr=o.muon_lr, weight_decay=o.muon_weight_decay, momentum=o.muon_momentum,
                       nesterov=True, ns_steps=o.muon_ns_steps,
                       adjust_lr_fn=None if o.muon_adjust_lr == "original" else o.muon_adjust_lr)
    return MuonAdamW(adamw(model, o, rest), muon, muon_lr_ratio=o.muon_lr / o.lr if o.lr > 0 else 0.0)


def state_layout(o: OptimConfig) -> dict:
    """What shapes the optimizer's saved state (its parameter groups): kept in every checkpoint, so
    that a resume with another layout is refused by name before PyTorch fails to load the state."""
    return {"optimizer": o.optimizer, "embedding_group": o.embedding_lr is not None}


def check_state_layout(saved: Optional[dict], o: OptimConfig) -> None:
    """The checkpoint's optimizer layout (None for checkpoints older than the record) against the recipe's."""
    if not saved:
        return
    now = state_layout(o)
    if saved.get("optimizer", now["optimizer"]) != now["optimizer"]:
        raise ConfigError(f"model.optim.optimizer is {now['optimizer']}, but the checkpoint's optimizer state is "
                          f"{saved['optimizer']}'s; resume with --model.optim.optimizer {saved['optimizer']}, or "
                          "start a new run from its weights (--model.init_from)")
    if saved.get("embedding_group", now["embedding_group"]) != now["embedding_group"]:
        given = "is set" if now["embedding_group"] else "is null"
        was = "with" if saved["embedding_group"] else "without"
        raise ConfigError(f"model.optim.embedding_lr {given}, but the checkpoint was trained {was} the embedding's "
                          "own rate (a different set of optimizer groups); resume with the recipe it was trained with, "
                          "or start a new run from its weights (--model.init_from)")


def muon_ns_dtype(o: OptimConfig, device: torch.device) -> torch.dtype:
    """The dtype of Muon's Newton-Schulz iteration on ``device``: the recipe's, or by the device for auto."""
    if o.muon_ns_dtype == "auto":
        from tinytrain.train.parallel import bf16_is_fast

        return torch.bfloat16 if bf16_is_fast(device.type)[0] else torch.float32
    return getattr(torch, o.muon_ns_dtype)
