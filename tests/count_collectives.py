"""Runs `tinytrain fit` with every torch.distributed collective, and every read of a tensor's value
to the host, counted per optimizer step.

    python tests/count_collectives.py OUT.json fit --config ... --trainer.callbacks+=count_collectives.PerStep

The real collectives run; each call is only counted on the way (nested calls count once). Lightning
starts the other ranks by running this same script again, so every rank counts. Rank r writes
OUT.json.r: {"steps": [{"all_gather": n, "reduce_scatter": n, "all_reduce": n, ...}, ...]}.
"""

import collections
import json
import sys
import threading
import traceback

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

KINDS = {"all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather", "all_gather": "all_gather",
         "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
         "all_reduce": "all_reduce", "broadcast": "broadcast", "barrier": "barrier"}
counts: collections.Counter = collections.Counter()
_depth = threading.local()
where: collections.Counter = collections.Counter()  # caller of each host read, for a failing test's message


def _counted(name, fn):
    def wrapper(*args, **kwargs):
        outer = getattr(_depth, "n", 0) == 0
        if outer:
            counts[KINDS[name]] += 1
        _depth.n = getattr(_depth, "n", 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _depth.n -= 1
    return wrapper


for _name in KINDS:
    if hasattr(dist, _name):
        setattr(dist, _name, _counted(_name, getattr(dist, _name)))


def _read_counted(fn):
    """A tensor read to the host (a device sync on a GPU) asked for by Lightning or tinytrain (not
    the optimizer's own reads of its CPU step counters, which are not syncs)."""
    def wrapper(self, *args, **kwargs):
        caller = traceback.extract_stack(limit=2)[0]  # who asked: a call straight from their code
        if "lightning" in caller.filename or "tinytrain" in caller.filename:
            counts["host_read"] += 1
            where[f"{caller.filename.split('site-packages/')[-1]}:{caller.lineno}"] += 1
        return fn(self, *args, **kwargs)
    return wrapper


for _name in ("item", "tolist", "__float__", "__int__"):
    setattr(torch.Tensor, _name, _read_counted(getattr(torch.Tensor, _name)))


class PerStep(Callback):
    """Records the collectives of each training step: the first from its batch start to its batch
    end, every later one from the previous batch end to its own, so that what the training loop
    does between batches (before the batch-start hooks run) counts too."""

    def __init__(self) -> None:
        self.steps, self._start = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = collections.Counter(counts)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = collections.Counter(counts)
        self.steps.append(dict(now - self._start))
        self._start = now

    def on_train_end(self, trainer, pl_module) -> None:
        with open(f"{sys.argv[1]}.{trainer.global_rank}", "w") as f:
            json.dump({"steps": self.steps, "host_reads_from": dict(where)}, f)


if __name__ == "__main__":
    from tinytrain.commands.main import main

    main(sys.argv[2:])
