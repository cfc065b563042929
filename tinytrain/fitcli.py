"""LightningCLI for `tinytrain fit` and `tinytrain validate` (kept apart: importing Lightning takes seconds)."""

from __future__ import annotations

import logging

from lightning.pytorch.cli import LightningCLI

from tinytrain.checkpoint import Checkpointing, latest_checkpoint

log = logging.getLogger("tinytrain")


class TinyTrainCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Checkpointing, "checkpoint")
        # The data must know the model's vocabulary (to train a tokenizer, to check token ids).
        parser.link_arguments("model.config.vocab_size", "data.vocab_size")
        # Checkpoints are ours (atomic folders + `last`); Lightning's ModelCheckpoint would write a second set.
        parser.set_defaults({"trainer.enable_checkpointing": False})

    def before_fit(self) -> None:
        fit_config = self.config_init[self.subcommand]
        if fit_config.get("ckpt_path") is None:
            ckpt_cb = next(cb for cb in self.trainer.callbacks if isinstance(cb, Checkpointing))
            found = latest_checkpoint(ckpt_cb.folder(self.trainer)) if ckpt_cb.resume else None
            if found is not None:
                if self.trainer.is_global_zero:
                    log.info("resuming from %s", found)
                fit_config["ckpt_path"] = str(found / "state.ckpt")
        if fit_config.get("ckpt_path") is not None and getattr(self.model, "init_from", None):
            # The restored checkpoint replaces the weights: loading init_from too would only cost time.
            log.info("resuming, so model.init_from %s is not loaded", self.model.init_from)
            self.model.init_from = None
