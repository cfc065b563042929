"""LightningCLI for `tinytrain fit` and `tinytrain validate` (kept apart: importing Lightning takes seconds)."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningCLI

from tinytrain.data.datamodule import RollbackSkip
from tinytrain.data.order import grad_accumulation
from tinytrain.errors import ConfigError, TrainingError
from tinytrain.eval.loop import DownstreamEval
from tinytrain.run import preemption
from tinytrain.run.checkpointing import Checkpointing, requeue_slurm_job
from tinytrain.run.lock import RunLock
from tinytrain.store import safeload
from tinytrain.store.checkpoint import damage, latest_checkpoint, point_last, resolve_checkpoint, set_aside
from tinytrain.store.layout import STATE, step_dirs, step_of
from tinytrain.store.rollbacks import Rollback, read_rollbacks, record_rollback
from tinytrain.train.console import StepProgress
from tinytrain.train.local_sgd import LocalSGD
from tinytrain.train.spikes import RollbackRequest

log = logging.getLogger("tinytrain")


def checkpoint_state_path(value: str) -> str:
    """Lightning's ckpt_path from what a user may pass, as `generate` and `convert` accept it: a
    step folder, its `last` link, a run folder or its checkpoints folder (or the state itself)."""
    path = Path(value).expanduser()
    state = path if path.name == STATE and path.exists() else resolve_checkpoint(path) / STATE
    safeload.check_state(state)  # before Lightning reads it: nothing in it may need code to load
    return str(state)


def automatic_precision(accelerator: str) -> str:
    """`trainer.precision: null` picks bf16-mixed where the device multiplies bf16 fast (a CUDA GPU
    with bf16, a CPU with AMX tiles: about twice its fp32 speed on the tiny recipe) and 32-true
    elsewhere (older CPUs, where bf16 autocast is slower than fp32, and Apple MPS, unmeasured)."""
    import torch

    from tinytrain.train.parallel import bf16_is_fast

    cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if not cuda and accelerator in ("auto", "gpu", "mps") and torch.backends.mps.is_available():
        fast, why = False, "Apple MPS"
    else:
        fast, why = bf16_is_fast("cuda" if cuda else "cpu")
    choice = "bf16-mixed" if fast else "32-true"
    if rank_zero_only.rank == 0:
        log.info("trainer.precision: %s (null picks it: %s)", choice, why)
    return choice


class TinyTrainCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Checkpointing, "checkpoint")
        parser.add_lightning_class_args(DownstreamEval, "eval")
        parser.add_lightning_class_args(LocalSGD, "local_sgd")
        # The data must know the model's vocabulary (to train a tokenizer, to check token ids).
        parser.link_arguments("model.config.vocab_size", "data.vocab_size")
        # Checkpoints are ours (atomic folders + `last`); Lightning's ModelCheckpoint would write a second set.
        # The model's one line (parameters, layers, width) replaces Lightning's summary table.
        parser.set_defaults({"trainer.enable_checkpointing": False, "trainer.enable_model_summary": False})

    def _instantiate_trainer(self, config, callbacks):
        if config.get("precision") is None:
            config["precision"] = automatic_precision(str(config.get("accelerator") or "auto"))
        # A bar of optimizer steps (tinytrain.train.console) instead of Lightning's epochs of batches.
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in
                                                                            [*callbacks, *(config.get("callbacks") or [])]):
            callbacks = [*callbacks, StepProgress()]
        return super()._instantiate_trainer(config, callbacks)

    def _checkpointing(self) -> Checkpointing:
        return next(cb for cb in self.trainer.callbacks if isinstance(cb, Checkpointing))

    def before_fit(self) -> None:
        fit_config = self.config_init[self.subcommand]
        ckpt_cb = self._checkpointing()
        folder = ckpt_cb.folder(self.trainer)
        rank_zero = rank_zero_only.rank == 0  # from the environment: the strategy has not set ranks up yet
        # Before the launcher starts the other processes (the data module checks it again once open).
        dm = self.datamodule
        grad_accumulation(dm.global_batch_size, dm.micro_batch_size, self.trainer.num_devices * self.trainer.num_nodes)
        if rank_zero:  # before anything in the run folder is read or changed: one writer per run folder
            ckpt_cb.lock = RunLock(folder)
            ckpt_cb.lock.acquire()
            atexit.register(ckpt_cb.lock.release)
        try:
            self._find_start(fit_config, folder, ckpt_cb, rank_zero)
        except BaseException:
            if ckpt_cb.lock is not None:
                ckpt_cb.lock.release()  # a refused start leaves the run folder free at once
            raise

    def _find_start(self, fit_config: dict, folder: Path, ckpt_cb: Checkpointing, rank_zero: bool) -> None:
        """Resume, branch or a fresh start: the state file fit begins from (fit_config["ckpt_path"])."""
        if fit_config.get("ckpt_path") is not None:
            fit_config["ckpt_path"] = checkpoint_state_path(fit_config["ckpt_path"])
        else:
            branch = self._branch_state(folder, ckpt_cb) if ckpt_cb.branch_from is not None else None
            found = latest_checkpoint(folder) if ckpt_cb.resume else None
            if found is not None:
                safeload.check_state(found / STATE)
                if rank_zero:
                    log.info("resuming from %s", found)
                    self._set_aside_damaged(folder, found)
                fit_config["ckpt_path"] = str(found / STATE)
                self._pending_rollback(folder, step_of(found))
            elif branch is not None:
                ckpt_cb.branched_from = str(branch.parent)
                if rank_zero:
                    log.info("branching from %s: weights, optimizer state, step and data position continue "
                             "from there", branch.parent)
                fit_config["ckpt_path"] = str(branch)
        if fit_config.get("ckpt_path") is not None and getattr(self.model, "init_from", None):
            # The restored checkpoint replaces the weights: loading init_from too would only cost time.
            log.info("resuming, so model.init_from %s is not loaded", self.model.init_from)
            self.model.init_from = None

    @staticmethod
    def _branch_state(folder: Path, ckpt_cb: Checkpointing) -> Path:
        """The state file a branch starts from; never one of this run's own folder."""
        state = Path(checkpoint_state_path(ckpt_cb.branch_from)).resolve()
        if folder.resolve() in state.parents:
            raise ConfigError(f"checkpoint.branch_from {ckpt_cb.branch_from} is in this run's own checkpoint folder "
                              f"{folder}; a branch needs a run folder of its own (set trainer.default_root_dir)")
        return state

    @staticmethod
    def _set_aside_damaged(folder: Path, resumed: Path) -> None:
        """Damaged checkpoints newer than the one resumed from are renamed out of the way, so that
        `last`, pruning and the next resume only ever see checkpoints that load."""
        for step, path in step_dirs(folder):
            if step > step_of(resumed) and (problem := damage(path)) is not None:
                set_aside(path, problem)
        last = folder / "last"
        if last.is_symlink() and not last.exists():
            point_last(folder, resumed)

    def _pending_rollback(self, folder: Path, step: int) -> None:
        """A rollback after loss spikes that went back to this checkpoint: the resume skips their data."""
        matching = [r for r in read_rollbacks(folder) if r.to_checkpoint_step == step]
        if matching:
            r = self.model.pending_rollback = matching[-1]
            self.datamodule.rollback_skip = RollbackSkip(r.to_checkpoint_step, r.resume_at_sample, r.skipped_samples,
                                                         tuple(r.spike_steps))

    def after_fit(self) -> None:
        ckpt_cb = self._checkpointing()
        request = self.model.rollback_request
        if request is not None:
            self._roll_back(ckpt_cb.folder(self.trainer), request)
        lock = getattr(ckpt_cb, "lock", None)
        if lock is not None:
            lock.release()
        if request is not None:
            self._start_again()

    def _roll_back(self, folder: Path, request: RollbackRequest) -> None:
        spikes = [s + 1 for s in request.spikes]
        newest = latest_checkpoint(folder)
        if newest is None:
            raise TrainingError(f"loss spikes at steps {', '.join(map(str, spikes))} and no checkpoint in {folder} to "
                                "roll back to; lower the learning rate or raise model.spikes.threshold")
        to_step = step_of(newest)
        dm = self.datamodule
        resume_at = dm.samples_before(request.at_step + 1)
        entry = Rollback(spike_steps=spikes, to_checkpoint_step=to_step, resume_at_sample=resume_at,
                         skipped_samples=resume_at - dm.samples_before(to_step),
                         skipped_data_of_steps=[to_step + 1, request.at_step + 1])
        if self.trainer.is_global_zero:
            record_rollback(folder, entry)
            log.warning("loss spikes at steps %s: rolling back to %s and skipping the data of steps %d to %d",
                        ", ".join(map(str, spikes)), newest, to_step + 1, request.at_step + 1)
        self.trainer.strategy.barrier("tinytrain.rollback")

    def _start_again(self) -> None:
        """After a rollback: the same command again, from the checkpoint it went back to."""
        if preemption.slurm_job() is not None:
            if self.trainer.is_global_zero:
                requeue_slurm_job()
            raise SystemExit(0)
        if self.trainer.world_size == 1 and sys.argv[1:2] == ["fit"]:
            log.info("starting again from the rolled-back checkpoint")
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, "-m", "tinytrain", *sys.argv[1:]])
        raise TrainingError("rolled back after loss spikes (see rollbacks.json in the checkpoint folder); run the "
                            "same command again to go on")

    def before_validate(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") is not None:
            config["ckpt_path"] = checkpoint_state_path(config["ckpt_path"])


def read_recipe(argv: list[str]):
    """A recipe (with --key value overrides) resolved as `tinytrain fit` resolves it, building and
    seeding nothing: the parsed configuration (``.trainer``, ``.model``, ``.data``, ...)."""
    import warnings

    from tinytrain.data.datamodule import TokenData
    from tinytrain.train.lit import LitLlama
    from tinytrain.train.strategy import register_strategy

    class RecipeOnly(TinyTrainCLI):
        def _set_seed(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    register_strategy()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return RecipeOnly(LitLlama, TokenData, run=False, args=argv, save_config_callback=None,
                          auto_configure_optimizers=False).config
