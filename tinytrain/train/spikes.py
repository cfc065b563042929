"""Loss-spike recovery (`model.spikes`): skip the update of a step whose loss or gradient norm is
not finite or far above its recent history, and after several such steps close together roll the
run back to its newest checkpoint and go on past the data that caused them.

A skipped step still counts (the optimizer is stepped with no gradients, which AdamW ignores), so
the learning rate and the data position stay pure functions of the step. The decision uses the
loss averaged over all ranks and the global gradient norm, so every rank decides alike; it costs
one all-reduce and one host sync per step. The history and the skipped steps are kept in every
checkpoint, so a resumed run decides exactly as the uninterrupted one would.

A rollback ends `fit` without saving, appends to ``<checkpoints>/rollbacks.json`` (tinytrain.store.rollbacks) (from which step,
to which checkpoint, which samples are skipped), and starts again: a single process re-executes its
own command, a SLURM job requeues itself, other launchers are told to run the same command again.
The resumed run starts at the checkpoint's step reading the samples after the last spike; the
skip becomes part of the data stream's state and of every later checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

from tinytrain.errors import ConfigError
from tinytrain.train.metrics import SPIKE_GRAD_NORM, SPIKE_LOSS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RollbackRequest:
    """Spikes call for a rollback: set on the module at step ``at_step`` (0-based), acted on by `fit`
    once training stops."""

    spikes: tuple[int, ...]  # the 0-based steps skipped within the window
    at_step: int


def rollback_requested(module) -> bool:
    """Whether a LightningModule's spikes called for a rollback (a module without spike recovery: no)."""
    return getattr(module, "rollback_request", None) is not None


@dataclass
class SpikeConfig:
    """Loss-spike recovery: off unless enabled."""

    enabled: bool = False
    """Check every step's loss and gradient norm; skip the update of a spike."""
    window: int = 50
    """Steps of history (of accepted steps) for the mean and standard deviation; also the span within
    which rollback_after spikes trigger a rollback."""
    threshold: float = 6.0
    """A loss or gradient norm more than this many standard deviations above the window's mean is a spike."""
    min_history: int = 20
    """Accepted steps needed before the statistical test applies (a non-finite value is always a spike)."""
    rollback_after: int = 3
    """Roll back to the newest checkpoint after this many spikes within `window` steps; 0: never."""

    def __post_init__(self) -> None:
        problems = []
        if self.window < 2:
            problems.append(f"window must be >= 2, got {self.window}")
        if not self.threshold > 0:
            problems.append(f"threshold must be > 0, got {self.threshold}")
        if not 2 <= self.min_history <= self.window:
            problems.append(f"min_history must be in [2, window={self.window}], got {self.min_history}")
        if self.rollback_after < 0:
            problems.append(f"rollback_after must be >= 0, got {self.rollback_after}")
        if problems:
            raise ConfigError("; ".join(f"model.spikes.{p}" for p in problems))


class SpikeGuard:
    def __init__(self, config: SpikeConfig) -> None:
        self.config = config
        self.history: deque[tuple[float, float]] = deque(maxlen=config.window)
        self.skipped: list[int] = []
        self.rollbacks: list[dict] = []

    def check(self, step: int, loss: float, grad_norm: float) -> Optional[str]:
        """Why step ``step`` is a spike, or None (then its values join the history)."""
        reason = None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            reason = f"loss {loss}, gradient norm {grad_norm}"
        elif len(self.history) >= self.config.min_history:
            for i, (name, value) in enumerate((("loss", loss), ("gradient norm", grad_norm))):
                values = [h[i] for h in self.history]
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                if value > mean + self.config.threshold * std:
                    reason = (f"{name} {value:.4g} is {(value - mean) / max(std, 1e-12):.1f} standard deviations above "
                              f"the mean {mean:.4g} of the last {len(values)} steps")
                    break
        if reason is None:
            self.history.append((loss, grad_norm))
        else:
            self.skipped.append(step)
        return reason

    def accept(self, step: int, loss, grad_norm, trainer) -> bool:
        """Whether step ``step``'s update is taken, the same answer on every rank (the loss is averaged
        over the ranks first); rank zero logs a spike."""
        mean_loss = float(trainer.strategy.reduce(loss.detach(), reduce_op="mean"))
        reason = self.check(step, mean_loss, float(grad_norm))
        if reason is None:
            return True
        if trainer.is_global_zero:
            log.warning("step %d: loss spike (%s): update skipped", step + 1, reason)
            if trainer.logger is not None:
                trainer.logger.log_metrics({SPIKE_LOSS: mean_loss, SPIKE_GRAD_NORM: float(grad_norm)}, step=step)
        return False

    def skipped_at(self, step: int) -> bool:
        """Whether step ``step``'s update was skipped (asked after the step)."""
        return self.skipped[-1:] == [step]

    def rollback_due(self, step: int) -> bool:
        n = self.config.rollback_after
        return n > 0 and sum(s > step - self.config.window for s in self.skipped) >= n

    def rollback_request(self, step: int) -> Optional[RollbackRequest]:
        """The rollback that step ``step``'s spike calls for, if it does."""
        if not (self.skipped_at(step) and self.rollback_due(step)):
            return None
        return RollbackRequest(tuple(s for s in self.skipped if s > step - self.config.window), step)

    def meta(self) -> dict:
        """What meta.json records of the spikes: skipped steps (1-based) and rollbacks."""
        return {"spikes": {"skipped_steps": [s + 1 for s in self.skipped], "rollbacks": self.rollbacks}}

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history], "skipped": list(self.skipped),
                "rollbacks": list(self.rollbacks)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque((tuple(h) for h in state.get("history", [])), maxlen=self.config.window)
        self.skipped = list(state.get("skipped", []))
        self.rollbacks = list(state.get("rollbacks", []))
