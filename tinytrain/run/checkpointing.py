"""The Lightning side of checkpoints: the periodic, atomic save with `last` and pruning, the save
and requeue on SIGUSR1, and the resolved recipe kept beside every checkpoint. The layout and
everything that reads checkpoints (without Lightning) is tinytrain.store.checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback

from tinytrain.errors import CheckpointError, ConfigError
from tinytrain.run import preemption
from tinytrain.run.asyncsave import AsyncWriter
from tinytrain.store.checkpoint import damage, point_last, set_aside
from tinytrain.store.fsutil import fsync_path, fsync_tree
from tinytrain.store.layout import (
    CONFIG,
    META,
    MODEL_CONFIG,
    STATE,
    TMP_PREFIX,
    TOKENIZER,
    step_dirs,
    step_folder,
    write_meta,
)
from tinytrain.store.provenance import environment
from tinytrain.train.spikes import rollback_requested

log = logging.getLogger(__name__)


class ConfigSaver(SaveConfigCallback):
    """Saves config.yaml in the log folder (as Lightning does) and keeps the text for checkpoints."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.config_text = self.parser.dump(self.config, skip_none=False)
        super().setup(trainer, pl_module, stage)


class Checkpointing(Callback):
    def __init__(self, dirpath: Optional[str] = None, every_n_steps: int = 1000, keep_last: int = 3,
                 resume: bool = True, save_on_signal: bool = True, signal_check_every_n_steps: int = 5,
                 branch_from: Optional[str] = None, async_save: bool = False) -> None:
        """Periodic, atomic checkpoints, automatic resume, and checkpoint-and-requeue on SIGUSR1.

        Args:
            dirpath: Checkpoint folder; default ``<trainer.default_root_dir>/checkpoints``.
            every_n_steps: Save after every this many optimizer steps (and always at the end).
            keep_last: Keep this many newest checkpoints; older ones are deleted. 0 keeps all.
            resume: On start, continue from the newest complete checkpoint in dirpath, if any.
            save_on_signal: On SIGUSR1 (SLURM's warning before a time limit or preemption), finish
                the current step, save a checkpoint, requeue the SLURM job (when in one) and stop.
            signal_check_every_n_steps: With several processes, the ranks agree on whether a
                SIGUSR1 arrived every this many steps (a collective and a host sync each time), so
                the warning must cover this many steps plus a save. One process checks every step.
            branch_from: A checkpoint of another run (run folder, ``last`` or ``step-N``) to start
                this run from whole: weights, optimizer state, step and data position, as a resume
                would, e.g. a cooldown branch of a warmup-stable-decay run. Only while this run has
                no checkpoint of its own (after that it resumes from its own); the other run's
                folder is only read.
            async_save: Periodic saves copy the state to CPU memory at the step boundary and write
                it in the background while training goes on (torch.distributed.checkpoint's
                async_save under FSDP2). The checkpoint appears, and ``last`` moves, only once
                every file is written; the next save, the end of training and a SIGUSR1 wait for
                a write in flight. Costs host memory for one copy of this rank's state. A failed
                write stops the run (with several processes, at the next agreement step).
        """
        if every_n_steps <= 0:
            raise ConfigError(f"checkpoint.every_n_steps must be positive, got {every_n_steps}")
        if keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last must be >= 0, got {keep_last}")
        if signal_check_every_n_steps <= 0:
            raise ConfigError(f"checkpoint.signal_check_every_n_steps must be positive, got {signal_check_every_n_steps}")
        self.dirpath = Path(dirpath).expanduser() if dirpath else None
        self.branch_from = branch_from
        self.branched_from: Optional[str] = None  # the checkpoint this run started from, for meta.json
        self.every_n_steps, self.keep_last, self.resume = every_n_steps, keep_last, resume
        self.save_on_signal, self.signal_check_every_n_steps = save_on_signal, signal_check_every_n_steps
        self._last_saved_step: Optional[int] = None
        self.busy_seconds = 0.0  # spent saving: not training time (tinytrain.train.monitor leaves it out)
        self.async_save = async_save
        self._writer = AsyncWriter() if async_save else None
        self._pending: Optional[_Pending] = None  # the write in flight
        self._failed: Optional[CheckpointError] = None  # a background write that failed on this rank
        self._writing: Optional[Path] = None  # the newest checkpoint started in the background
        self.lock = None  # the run folder's lock, held by global rank 0 (set by `tinytrain fit`)

    def folder(self, trainer: L.Trainer) -> Path:
        return self.dirpath if self.dirpath is not None else Path(trainer.default_root_dir) / "checkpoints"

    # --- preemption ----------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if self.save_on_signal:
            preemption.install()  # `tinytrain fit` did at start; a Trainer built in Python may not have
        else:
            preemption.uninstall()

    def _stop_requested(self, trainer: L.Trainer, force_check: bool = False) -> bool:
        """Whether any rank got SIGUSR1; raises when a background write failed on any rank. With
        several processes the ranks agree every ``signal_check_every_n_steps`` steps (one
        all-reduce), so every rank stops at the same step."""
        signalled = self.save_on_signal and preemption.requested()
        failed = self._failed is not None
        if trainer.world_size > 1:
            if not (self.save_on_signal or self._writer is not None):
                return False
            if not force_check and trainer.global_step % self.signal_check_every_n_steps:
                return False
            flags = torch.tensor([float(signalled), float(failed)], device=trainer.strategy.root_device)
            flags = trainer.strategy.reduce(flags, reduce_op="max")  # any rank
            signalled, failed = (bool(v) for v in flags.tolist())  # one host sync
        if failed:
            self._raise_failed()
        return signalled

    def on_train_start(self, trainer, pl_module) -> None:
        preemption.take_sigterm_from_lightning(trainer)
        if self._writer is not None:
            self._writer.prepare(trainer.strategy)
        if self._stop_requested(trainer, force_check=True):
            # Signalled while the model was built, compiled or restored: nothing new to save.
            log.info("SIGUSR1 before the first step: stopping at step %d without training", trainer.global_step)
            self._stop_for_preemption(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if rollback_requested(pl_module):
            self._finish_pending(trainer)  # saved before the spikes: a checkpoint to go back to
            return  # the state holds the spikes: the run goes back to its newest checkpoint instead
        self.save(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._writer is not None:
            self._writer.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A failed fit gives its run folder back now, once any background write has ended: a process
        that goes on (a caller of `tinytrain.commands.main.main`) would otherwise hold it until it exits."""
        self.teardown(trainer, pl_module, "fit")
        if self.lock is not None:
            self.lock.release()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._poll(trainer)
        if rollback_requested(pl_module):
            return  # never save a state that holds the spikes
        stop = self._stop_requested(trainer)
        if trainer.global_step % self.every_n_steps == 0 or stop:
            self.save(trainer, background=not stop)
        if stop:
            log.info("SIGUSR1: saved step %d; stopping", trainer.global_step)
            self._stop_for_preemption(trainer)

    def _stop_for_preemption(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            requeue_slurm_job()
        trainer.should_stop = True

    def save(self, trainer: L.Trainer, background: bool = False) -> Optional[Path]:
        """Save the state at this step (every rank calls this at the same step). With
        ``async_save`` and ``background``, return once the state is copied; the checkpoint
        appears later (None is returned). Otherwise return the checkpoint folder."""
        started = time.perf_counter()
        try:
            return self._save(trainer, background and self._writer is not None)
        finally:
            self.busy_seconds += time.perf_counter() - started

    def _save(self, trainer: L.Trainer, background: bool) -> Optional[Path]:
        self._finish_pending(trainer)  # one write at a time, and this step's may already exist
        step = trainer.global_step
        folder = self.folder(trainer)
        final = folder / step_folder(step)
        if step == self._last_saved_step or (step == 0):
            return None
        if final.exists() and damage(final) is None:
            # This run's own checkpoint of this step, already complete (a resumed run that ends, or
            # is preempted, where it started): the state is the same, so nothing is written again.
            if trainer.is_global_zero:
                point_last(folder, final)
            trainer.strategy.barrier("tinytrain.store.checkpoint.exists")
            self._last_saved_step = step
            return final
        tmp = folder / (TMP_PREFIX + step_folder(step))
        if trainer.is_global_zero:
            if self.lock is not None:
                self.lock.check()  # never write into a run folder another process has taken over
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(TMP_PREFIX + "step-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        trainer.strategy.barrier("tinytrain.store.checkpoint.mkdir")
        started = time.perf_counter()
        try:
            meta = self._write_sidecars(trainer, tmp, step) if trainer.is_global_zero else None
            if background:
                future = self._writer.start(trainer, tmp / STATE)  # every rank; returns once staged
                self._pending = _Pending(tmp, final, future, meta, started, time.perf_counter() - started)
                self._last_saved_step, self._writing = step, final
                return None
            trainer.save_checkpoint(tmp / STATE, weights_only=False)  # every rank; ends with a barrier
        except (OSError, RuntimeError, _checkpoint_exception()) as e:  # torch's writers: RuntimeError, DCP's
            if trainer.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            raise self._save_error(folder, final, e) from e
        if trainer.is_global_zero:
            meta["save_seconds"] = round(time.perf_counter() - started, 3)
            self._publish(trainer, folder, tmp, final, meta)
        trainer.strategy.barrier("tinytrain.store.checkpoint.done")
        self._last_saved_step = step
        return final

    @staticmethod
    def _save_error(folder: Path, final: Path, e: BaseException) -> CheckpointError:
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint: {rank: (error, trace)}
        errors = [error for error, _ in failures.values()] if failures else [e]
        errors = [_os_error(error) or error for error in errors]
        e = next((error for error in errors if isinstance(error, OSError)), errors[0])
        if isinstance(e, OSError):
            reason = e.strerror or str(e)
        else:
            reason = str(e).strip().splitlines()[-1]
            full = _disk_full(folder)  # torch's file writer reports a full disk without its errno
            if full:
                reason = f"No space left on device ({full}; the writer said: {reason})"
        last = folder / "last"
        previous = f"{last} -> {os.readlink(last)} is intact" if last.is_symlink() else "no earlier checkpoint"
        return CheckpointError(f"saving checkpoint {final} failed: {reason}; {previous}")

    def _publish(self, trainer: L.Trainer, folder: Path, tmp: Path, final: Path, meta: dict) -> None:
        """Rank 0: meta.json with every file's size, then the rename that makes the checkpoint
        exist, ``last``, pruning."""
        if self.lock is not None:
            self.lock.check()  # never write into a run folder another process has taken over
        write_meta(tmp, meta)
        if final.exists():  # damaged (checked before saving): kept aside, never deleted
            set_aside(final, damage(final) or "replaced")
        fsync_tree(tmp)
        os.replace(tmp, final)
        fsync_path(folder)
        point_last(folder, final)
        self._prune(folder, final)
        log.info("saved checkpoint %s", final)

    # --- asynchronous saves --------------------------------------------------------------------

    def _poll(self, trainer: L.Trainer) -> None:
        """At a step boundary: publish a background write that has finished (rank 0), or record
        its failure. No collective: every rank looks at its own write only."""
        pending = self._pending
        if pending is None or not pending.future.done():
            return
        started = time.perf_counter()
        self._pending = None
        self._complete(trainer, pending)
        self.busy_seconds += time.perf_counter() - started

    def _finish_pending(self, trainer: L.Trainer) -> None:
        """Wait for the write in flight (every rank, at the same step) and publish it; raise if a
        background write failed on any rank."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.future.exception()  # waits; _complete reads the outcome
            self._complete(trainer, pending)
        if self._writer is None:
            return
        failed = self._failed is not None
        if trainer.world_size > 1:
            failed = trainer.strategy.reduce_boolean_decision(failed, all=False)
        if failed:
            self._raise_failed()

    def _raise_failed(self) -> None:
        """Every rank stops once any rank's background write failed (the ranks have agreed on it)."""
        raise self._failed or CheckpointError(f"saving checkpoint {self._writing} failed on another rank; see its log")

    def _complete(self, trainer: L.Trainer, pending: "_Pending") -> None:
        error = pending.future.exception()
        folder = pending.final.parent
        if error is not None:
            self._failed = self._save_error(folder, pending.final, error)
            log.error("%s", self._failed)
            if trainer.is_global_zero:
                shutil.rmtree(pending.tmp, ignore_errors=True)
            return
        if trainer.is_global_zero:
            seconds = time.perf_counter() - pending.started
            pending.meta.update(save_seconds=round(pending.stall, 3), write_seconds=round(seconds, 3))
            self._publish(trainer, folder, pending.tmp, pending.final, pending.meta)

    def _write_sidecars(self, trainer: L.Trainer, folder: Path, step: int) -> dict:
        """config.yaml, model_config.json and the tokenizer into ``folder``; returns meta.json's
        content but for the file list (see store.layout.write_meta), which needs the written state."""
        module, dm = trainer.lightning_module, trainer.datamodule
        saver = next((cb for cb in trainer.callbacks if isinstance(cb, ConfigSaver)), None)
        if saver is not None and getattr(saver, "config_text", None):
            (folder / CONFIG).write_text(saver.config_text)
        config = getattr(module, "config", None)
        if config is not None:
            (folder / MODEL_CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        spec = getattr(module, "data_spec", None)
        if spec is not None and spec.tokenizer is not None:
            shutil.copyfile(spec.tokenizer, folder / TOKENIZER)
        meta = {
            "step": step,
            "tokens": dm.tokens_trained(step) if spec is not None else None,
            "global_batch_size": spec.global_batch_size if spec is not None else None,
            "seq_len": spec.seq_len if spec is not None else None,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "async_save": self.async_save,
            **({"branched_from": self.branched_from} if self.branched_from else {}),
            **(module.checkpoint_meta() if hasattr(module, "checkpoint_meta") else {}),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": environment(),
        }
        return meta

    def _prune(self, folder: Path, keep: Path) -> None:
        """Delete intact checkpoints older than the newest ``keep_last`` intact ones (a damaged
        folder never counts as one of those, so the newest intact one always stays)."""
        if not self.keep_last:
            return
        intact = [path for _, path in step_dirs(folder) if damage(path) is None]
        for path in intact[: max(0, len(intact) - self.keep_last)]:
            if path.resolve() == keep.resolve():
                continue
            doomed = path.with_name(".del-" + path.name)
            os.replace(path, doomed)  # never leave a half-deleted step-N behind
            shutil.rmtree(doomed, ignore_errors=True)


def requeue_slurm_job() -> bool:
    """Put this SLURM job back in the queue (it restarts with the same command and resumes).

    Said before it is done: SLURM ends the job's tasks (SIGTERM) as soon as the requeue is
    accepted, often before ``scontrol`` has returned here."""
    job = preemption.slurm_job()
    if not job:
        return False
    log.info("requeueing SLURM job %s", job)
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not requeue SLURM job %s: %s", job, e)
        return False
    if result.returncode:
        log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
        return False
    return True


def _checkpoint_exception() -> type:
    """torch.distributed.checkpoint's error (a BaseException: ``except Exception`` misses it)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind ``e`` (itself, or what it was raised from), if any."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _disk_full(folder: Path) -> Optional[str]:
    """A description when the file system of ``folder`` has less room than its newest checkpoint
    takes (or under 1 MiB with none), else None."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    newest = None
    last = folder / "last"
    try:
        newest = sum(json.loads((last / META).read_text())["files"].values()) if last.exists() else None
    except (OSError, ValueError, KeyError, AttributeError):
        newest = None
    if free >= (newest or 1 << 20):
        return None  # (the free bytes themselves differ from rank to rank as the writes are undone)
    return (f"its file system has less room than the newest checkpoint's {newest:,} bytes" if newest
            else "its file system has under 1 MiB free")


@dataclass
class _Pending:
    """A checkpoint being written in the background."""

    tmp: Path  # where it is written
    final: Path  # its name once complete
    future: Future  # the write
    meta: Optional[dict]  # meta.json but for the file list (rank 0)
    started: float  # perf_counter() when the save began
    stall: float  # seconds the step loop waited for it
