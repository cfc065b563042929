"""Checkpoints that are either complete or invisible.

Layout under ``<default_root_dir>/checkpoints``::

    step-00000100/
        state.ckpt          Lightning's checkpoint (weights, optimizer, loop state); a file, or a
                            folder of per-rank shards under a model-parallel strategy
        config.yaml         the resolved recipe the run was started with
        model_config.json   the architecture, for loading without the recipe
        tokenizer.model     the tokenizer the data was made with
        meta.json           step, tokens seen, versions, git SHA, devices
    last -> step-00000100   always a complete checkpoint

Everything is written into ``.tmp-step-N`` and renamed to ``step-N`` once complete; ``last`` is
then replaced with an atomic rename of a fresh symlink. A process killed mid-save leaves only a
``.tmp-*`` folder, which the next save removes; the previous checkpoint stays usable.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import subprocess
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback

from tinytrain import preemption
from tinytrain.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

STATE = "state.ckpt"
WEIGHTS = "model.safetensors"  # converted weights (tinytrain convert from-hf)
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dirs(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete-looking checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def damage(path: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be loaded, or None if it looks complete: meta.json must parse,
    the weights must be there (a training state, or converted weights), and every file meta.json
    lists must exist with the size it had when saved."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return "no meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable meta.json ({e})"
    if not (path / STATE).exists() and not (path / WEIGHTS).is_file():
        return f"no {STATE}"
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} when saved"
    return None


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The newest complete checkpoint folder in ``folder``; damaged ones are skipped with a warning."""
    for step, path in reversed(step_dirs(Path(folder))):
        problem = damage(path)
        if problem is None:
            return path
        log.warning("skipping damaged checkpoint %s: %s", path, problem)
    return None


def resolve_checkpoint(path: os.PathLike | str) -> Path:
    """A checkpoint folder from what a user may pass: a step folder (or a converted one), ``last``,
    a run folder, or its checkpoints folder. A step folder named explicitly must be intact (the
    error names the damaged file); for ``last`` or a run folder, a damaged newest checkpoint gives
    way to the newest intact one, with a warning."""
    p = Path(path).expanduser()
    if p.name != "last" and (p / "meta.json").is_file():
        problem = damage(p)
        if problem is not None:
            raise CheckpointError(f"{p}: damaged checkpoint: {problem}")
        return p.resolve()
    if (p / "config.json").is_file():
        raise CheckpointError(f"{p} is a Hugging Face folder; convert it first: tinytrain convert from-hf {p} OUT")
    for last in (p, p / "last", p / "checkpoints" / "last"):
        if last.name == "last" and (last.is_symlink() or last.exists()):
            if last.exists() and damage(last) is None:
                return last.resolve()
            found = latest_checkpoint(last.parent)
            if found is not None:
                log.warning("%s -> %s is damaged or missing (%s); using the newest intact checkpoint, %s", last,
                            os.readlink(last) if last.is_symlink() else last, damage(last), found.name)
                return found.resolve()
    for folder in (p, p / "checkpoints"):
        found = latest_checkpoint(folder)
        if found is not None:
            return found.resolve()
    raise FileNotFoundError(f"{p}: no tinytrain checkpoint there (expected a folder with meta.json and {STATE})")


def git_sha() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict:
    import lightning
    import numpy

    from tinytrain import __version__

    env = {
        "tinytrain": __version__, "git_sha": git_sha(), "python": platform.python_version(),
        "torch": torch.__version__, "lightning": lightning.__version__, "numpy": numpy.__version__,
        "platform": platform.platform(), "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


class ConfigSaver(SaveConfigCallback):
    """Saves config.yaml in the log folder (as Lightning does) and keeps the text for checkpoints."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.config_text = self.parser.dump(self.config, skip_none=False)
        super().setup(trainer, pl_module, stage)


class Checkpointing(Callback):
    def __init__(self, dirpath: Optional[str] = None, every_n_steps: int = 1000, keep_last: int = 3,
                 resume: bool = True, save_on_signal: bool = True, signal_check_every_n_steps: int = 5) -> None:
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
        """
        if every_n_steps <= 0:
            raise ConfigError(f"checkpoint.every_n_steps must be positive, got {every_n_steps}")
        if keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last must be >= 0, got {keep_last}")
        if signal_check_every_n_steps <= 0:
            raise ConfigError(f"checkpoint.signal_check_every_n_steps must be positive, got {signal_check_every_n_steps}")
        self.dirpath = Path(dirpath).expanduser() if dirpath else None
        self.every_n_steps, self.keep_last, self.resume = every_n_steps, keep_last, resume
        self.save_on_signal, self.signal_check_every_n_steps = save_on_signal, signal_check_every_n_steps
        self._last_saved_step: Optional[int] = None
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
        if not self.save_on_signal:
            return False
        if trainer.world_size == 1:
            return preemption.requested()
        if not force_check and trainer.global_step % self.signal_check_every_n_steps:
            return False
        return trainer.strategy.reduce_boolean_decision(preemption.requested(), all=False)  # any rank signalled

    def on_train_start(self, trainer, pl_module) -> None:
        if self._stop_requested(trainer, force_check=True):
            # Signalled while the model was built, compiled or restored: nothing new to save.
            log.info("SIGUSR1 before the first step: stopping at step %d without training", trainer.global_step)
            self._stop_for_preemption(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self._stop_requested(trainer)
        if trainer.global_step % self.every_n_steps == 0 or stop:
            self.save(trainer)
        if stop:
            log.info("SIGUSR1: saved step %d; stopping", trainer.global_step)
            self._stop_for_preemption(trainer)

    def _stop_for_preemption(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            requeue_slurm_job()
        trainer.should_stop = True

    def save(self, trainer: L.Trainer) -> Optional[Path]:
        step = trainer.global_step
        folder = self.folder(trainer)
        final = folder / f"step-{step:08d}"
        if step == self._last_saved_step or (step == 0):
            return None
        if final.exists() and damage(final) is None:
            # This run's own checkpoint of this step, already complete (a resumed run that ends, or
            # is preempted, where it started): the state is the same, so nothing is written again.
            if trainer.is_global_zero:
                point_last(folder, final)
            trainer.strategy.barrier("tinytrain.checkpoint.exists")
            self._last_saved_step = step
            return final
        tmp = folder / f".tmp-step-{step:08d}"
        if trainer.is_global_zero:
            if self.lock is not None:
                self.lock.check()  # never write into a run folder another process has taken over
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        trainer.strategy.barrier("tinytrain.checkpoint.mkdir")
        started = time.perf_counter()
        try:
            trainer.save_checkpoint(tmp / STATE, weights_only=False)  # every rank; ends with a barrier
            if trainer.is_global_zero:
                self._write_sidecars(trainer, tmp, step, time.perf_counter() - started)
        except OSError as e:
            if trainer.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            last = folder / "last"
            previous = f"{last} -> {os.readlink(last)} is intact" if last.is_symlink() else "no earlier checkpoint"
            raise CheckpointError(f"saving checkpoint {final} failed: {e.strerror or e}; {previous}") from e
        if trainer.is_global_zero:
            if final.exists():  # damaged (checked above): kept aside, never deleted
                set_aside(final, damage(final) or "replaced")
            _fsync_tree(tmp)
            os.replace(tmp, final)
            _fsync_dir(folder)
            point_last(folder, final)
            self._prune(folder, final)
            log.info("saved checkpoint %s", final)
        trainer.strategy.barrier("tinytrain.checkpoint.done")
        self._last_saved_step = step
        return final

    def _write_sidecars(self, trainer: L.Trainer, folder: Path, step: int, seconds: float) -> None:
        module, dm = trainer.lightning_module, trainer.datamodule
        saver = next((cb for cb in trainer.callbacks if isinstance(cb, ConfigSaver)), None)
        if saver is not None and getattr(saver, "config_text", None):
            (folder / "config.yaml").write_text(saver.config_text)
        config = getattr(module, "config", None)
        if config is not None:
            (folder / "model_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        tokenizer = getattr(dm, "tokenizer_path", None) if dm is not None else None
        if tokenizer is not None and Path(tokenizer).is_file():
            shutil.copyfile(tokenizer, folder / "tokenizer.model")
        meta = {
            "step": step,
            "tokens": dm.tokens_trained(step) if hasattr(dm, "tokens_trained") else None,
            "global_batch_size": getattr(dm, "global_batch_size", None),
            "seq_len": getattr(dm, "seq_len", None),
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "save_seconds": round(seconds, 3),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": environment(),
            # Every file with its size, so a truncated or partly copied checkpoint is recognised.
            "files": {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()},
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

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


def set_aside(path: Path, reason: str) -> Path:
    """Rename a damaged checkpoint folder out of the way (``step-N.damaged-<time>``, which resume
    and pruning ignore), keeping its files for inspection; return the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        n += 1
    os.replace(path, target)
    log.warning("set aside damaged checkpoint %s as %s (%s)", path, target.name, reason)
    return target


def requeue_slurm_job() -> bool:
    """Put this SLURM job back in the queue (it restarts with the same command and resumes)."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not requeue SLURM job %s: %s", job, e)
        return False
    if result.returncode:
        log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job)
    return True


def point_last(folder: Path, target: Path) -> None:
    tmp_link = folder / ".last.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(target.name)
    os.replace(tmp_link, folder / "last")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def load_model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model's weights (tinytrain names) from a checkpoint folder: converted weights
    (model.safetensors), a single Lightning state file, or a state sharded by several ranks.
    Needs no GPU and no process group, and reads no optimizer state."""
    folder = Path(folder)
    if (folder / WEIGHTS).is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(folder / WEIGHTS))
        except Exception as e:  # safetensors' own error types differ by version
            raise CheckpointError(f"{folder / WEIGHTS}: unreadable ({e})") from e
    state_path = folder / STATE
    if state_path.is_file():
        try:
            ckpt = torch.load(state_path, map_location="cpu", mmap=True, weights_only=True)
        except (RuntimeError, EOFError, OSError) as e:  # "PytorchStreamReader failed reading zip archive", ...
            raise CheckpointError(f"{state_path}: unreadable, damaged or truncated ({e})") from e
        return {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not state_path.is_dir():
        raise FileNotFoundError(f"{state_path}: no checkpoint state there")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    try:
        metadata = dcp.FileSystemReader(str(state_path)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{state_path}: unreadable sharded checkpoint ({e})") from e
    prefix = "state_dict.model."
    weights = {
        key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and hasattr(meta, "size")
    }
    if not weights:
        raise CheckpointError(f"{state_path}: sharded checkpoint holds no model weights (no '{prefix}*' keys)")
    wrapped = {"state_dict": {"model." + k: v for k, v in weights.items()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(wrapped, checkpoint_id=str(state_path), planner=DefaultLoadPlanner(allow_partial_load=True),
                 no_dist=True)
    return {k.removeprefix("model."): v for k, v in wrapped["state_dict"].items()}


def consolidate(checkpoint, out: os.PathLike | str) -> Path:
    """Write a checkpoint's model weights as one plain state-dict file (torch.save), atomically."""
    folder = resolve_checkpoint(checkpoint)
    weights = load_model_weights(folder)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(weights, tmp)
    os.replace(tmp, out)
    return out
