"""Every place tinytrain reaches into Lightning's private API, in one module.

Lightning (2.5 to 2.7) offers no public way to do these; each is a name an upgrade may move
without notice. tests/test_lightning_private.py checks each against the installed Lightning, so an
upgrade that moves one fails that test by name instead of changing a run's behaviour silently.

- ``should_log(trainer)``: whether this step is one where Lightning writes logs (its logger
  connector's ``should_update_logs``). Logging only then saves a device sync per value and step.
- ``dump_checkpoint(trainer)``: the full state Lightning would save (its checkpoint connector),
  which the background writer stages and writes itself.
- ``saves_sharded(strategy)``: whether a ModelParallelStrategy saves a sharded (DCP) checkpoint.
- ``drop_sigterm_broadcast(trainer)``: stop the training loop broadcasting a "SIGTERM seen" flag
  and reading it back on the host before every batch (see tinytrain.run.preemption).
- ``unwrap_optimizer(optimizer)``: the torch optimizer inside a LightningOptimizer.
- ``SHARDED_META``: the file beside DCP's shards holding a sharded checkpoint's non-tensor state.
"""

from __future__ import annotations

from typing import Any

from tinytrain.errors import TinyTrainError

SHARDED_META = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME


class LightningMoved(TinyTrainError, RuntimeError):
    """The installed Lightning lacks a private name tinytrain uses."""


def _moved(what: str) -> LightningMoved:
    import lightning

    return LightningMoved(f"Lightning {lightning.__version__} has no {what}, which tinytrain uses "
                          "(supported: lightning>=2.5,<2.8)")


def should_log(trainer) -> bool:
    try:
        return trainer._logger_connector.should_update_logs
    except AttributeError:
        raise _moved("Trainer._logger_connector.should_update_logs") from None


def dump_checkpoint(trainer) -> dict:
    try:
        dump = trainer._checkpoint_connector.dump_checkpoint
    except AttributeError:
        raise _moved("Trainer._checkpoint_connector.dump_checkpoint") from None
    return dump(weights_only=False)


def saves_sharded(strategy) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy):
        return False
    try:
        return bool(strategy._save_distributed_checkpoint)
    except AttributeError:
        raise _moved("ModelParallelStrategy._save_distributed_checkpoint") from None


def drop_sigterm_broadcast(trainer) -> None:
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    if epoch_loop is None or not hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
        raise _moved("fit_loop.epoch_loop._broadcast_sigterm_tensor")
    epoch_loop._broadcast_sigterm_tensor = lambda: None


def unwrap_optimizer(optimizer: Any):
    from lightning.pytorch.core.optimizer import LightningOptimizer

    if not isinstance(optimizer, LightningOptimizer):
        return optimizer
    try:
        return optimizer._optimizer
    except AttributeError:
        raise _moved("LightningOptimizer._optimizer") from None
