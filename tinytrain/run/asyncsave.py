"""Asynchronous checkpoint writes (``checkpoint.async_save: true``).

At the step boundary every rank copies its part of the state to CPU memory (the stall), and a
background thread writes the copy while training goes on. The files are those of a synchronous
save, in the same layout: under FSDP2 torch.distributed.checkpoint's ``async_save`` writes each
rank's shards (its collectives run on a gloo group of their own, never on the group the training
step uses) and rank 0 writes Lightning's ``meta.pt``; otherwise rank 0 writes the one
``state.ckpt`` file. What makes a checkpoint visible (the rename, ``last``, pruning) stays with
tinytrain.run.checkpointing.Checkpointing, once the returned future is done.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from tinytrain.lightning_private import SHARDED_META, dump_checkpoint, saves_sharded
from tinytrain.store.fsutil import fsync_path


def to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` that later training steps cannot change: tensors copied to CPU memory,
    containers rebuilt, anything else deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = obj.copy()  # keeps OrderedDict, defaultdict
        for key, value in obj.items():
            out[key] = to_cpu(value)
        return out
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _done(value: Any = None) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class AsyncWriter:
    """Starts one checkpoint write at a time; the caller waits for the previous one first."""

    def __init__(self) -> None:
        self._group = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._staging = None  # DCP's stager, reused by every sharded save

    def prepare(self, strategy) -> None:
        """Create the gloo group the sharded writes use, on every rank: at train start, where a
        misresolved address (see GLOO_SOCKET_IFNAME in slurm/README.md) fails at once rather than
        hours into the run, at the first save."""
        sharded = saves_sharded(strategy)
        if self._group is None and sharded and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")

    def start(self, trainer, path: Path) -> Future:
        """Stage ``trainer``'s full state and start writing it to ``path`` (``.../state.ckpt``).
        Every rank calls this at the same step. The future raises what the write raised."""
        strategy = trainer.strategy
        checkpoint = dump_checkpoint(trainer)
        if saves_sharded(strategy):
            return self._start_sharded(strategy, checkpoint, path)
        if not strategy.is_global_zero:  # one file, written by rank 0 (as Lightning's save does)
            return _done()
        staged = to_cpu(checkpoint)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tinytrain-checkpoint")
        return self._pool.submit(_write_file, strategy.checkpoint_io, staged, path)

    def _start_sharded(self, strategy, checkpoint: dict, path: Path) -> Future:
        import torch.distributed.checkpoint as dcp

        # The same split as ModelParallelStrategy.save_checkpoint: tensors sharded, the rest in meta.pt.
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        self.prepare(strategy)
        path.mkdir(parents=True, exist_ok=True)
        # Staged (copied to host memory) before it returns, into the same buffers every save: pinned,
        # with non-blocking copies, on a GPU. The state dicts come without Lightning's offload copy
        # (tinytrain.train.strategy.FSDP2), so this is the one copy a save makes.
        future = dcp.async_save(state, checkpoint_id=path, process_group=self._group, async_stager=self._stager())
        if strategy.global_rank == 0:  # small, and written now: no copy needed
            torch.save(checkpoint, path / SHARDED_META)
        return future

    def _stager(self):
        if self._staging is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            gpu = torch.cuda.is_available()
            self._staging = DefaultStager(StagingOptions(use_pinned_memory=gpu, use_shared_memory=False,
                                                         use_async_staging=False, use_non_blocking_copy=gpu))
        return self._staging

    def close(self) -> None:
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _write_file(checkpoint_io, staged: dict, path: Path) -> None:
    checkpoint_io.save_checkpoint(staged, path)
    fsync_path(path)  # here, not in the step loop (publishing fsyncs again: cheap once clean)
