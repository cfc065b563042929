"""Each private Lightning name tinytrain reaches for (tinytrain.lightning_private), checked against
the installed Lightning: an upgrade that moves one fails here, by name."""

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import ModelParallelStrategy

from tinytrain import lightning_private as lp


class Probe(L.Callback):
    def __init__(self):
        self.seen = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.setdefault("should_log", []).append(lp.should_log(trainer))
        if batch_idx == 0:
            self.seen["checkpoint"] = lp.dump_checkpoint(trainer)
            self.seen["optimizer"] = lp.unwrap_optimizer(pl_module.optimizers())

    def on_train_start(self, trainer, pl_module):
        lp.drop_sigterm_broadcast(trainer)
        self.seen["broadcast"] = trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor()


def test_the_private_names_are_where_tinytrain_reaches_for_them(tmp_path):
    probe = Probe()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, log_every_n_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[probe], default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    assert probe.seen["should_log"] == [False, True, False, True]  # every log_every_n_steps
    assert {"state_dict", "optimizer_states", "loops", "global_step"} <= set(probe.seen["checkpoint"])
    assert type(probe.seen["optimizer"]) is torch.optim.SGD
    assert probe.seen["broadcast"] is None


def test_sharded_saving_and_the_name_of_its_non_tensor_file():
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    assert lp.SHARDED_META == _METADATA_FILENAME
    assert lp.saves_sharded(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    assert not lp.saves_sharded(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1,
                                                      save_distributed_checkpoint=False))
    assert not lp.saves_sharded(L.pytorch.strategies.SingleDeviceStrategy("cpu"))


def test_a_moved_name_is_an_error_that_names_it():
    class Elsewhere:
        pass

    with pytest.raises(lp.LightningMoved, match=r"has no Trainer\._logger_connector\.should_update_logs"):
        lp.should_log(Elsewhere())
    with pytest.raises(lp.LightningMoved, match="_broadcast_sigterm_tensor"):
        lp.drop_sigterm_broadcast(Elsewhere())
