"""Local SGD between islands (DiLoCo): the recipe's ``local_sgd:`` section.

The processes of a run form islands of ``island_size`` processes (by default those of one node).
Inside an island, FSDP2 shards the model and reduces gradients every step as usual; between
islands nothing travels for ``inner_steps`` (H) steps. Then each island's change of the weights
since the round began, the pseudo-gradient ``global - local``, is averaged over the islands (one
all-reduce of the weights' size, over gloo or NCCL), an outer optimizer (SGD with Nesterov momentum,
as the DiLoCo paper) moves the global weights by it, and every island starts the next round from
them. Communication between islands drops by a factor of H against data-parallel training.

Where the state lives, so that resume is exact at any step:

- The global weights and the outer momentum are buffers of a module beside the model (LitLlama's
  ``outer``, like the weight average), sharded like the parameters inside each island. They are
  the same on every island, so a checkpoint holds them once (``outer.weights.*``,
  ``outer.momentum.*``).
- Each island's own weights and inner optimizer state (AdamW's moments, Muon's momentum) differ
  between rounds: island 0 saves them under the usual keys, island i under ``island<i>.<key>``
  (tinytrain.train.strategy.FSDP2 renames them), so every reader of checkpoints sees island 0's
  weights, which at the end of a round are the global ones. The last step of a run ends a round.
- Each island reads its own share of every global batch (rank r reads slice r, as without
  islands): the data position stays a pure function of the step.

Rounds end after steps H, 2H, ... and after the run's last step: a pure function of the step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import nn

from tinytrain.errors import ConfigError
from tinytrain.store.layout import ema_buffer_name
from tinytrain.train.metrics import (
    LOCAL_SGD_EXCHANGED_BYTES,
    LOCAL_SGD_INNER_STEPS,
    LOCAL_SGD_OUTER_STEPS,
    LOCAL_SGD_STALENESS,
)

log = logging.getLogger(__name__)

BUCKET_ELEMENTS = 1 << 25  # pseudo-gradients are all-reduced in flat buckets of at most this many fp32 values


@dataclass(frozen=True)
class Islands:
    """Where this process sits: ``count`` islands of ``size`` processes; ``index`` is its island,
    ``peers`` the process group of the processes at its place in every island (None with one)."""
    count: int
    size: int
    index: int
    peers: Optional[object] = None

    def key_prefix(self) -> str:
        """What this island's own entries of a checkpoint are saved under ("" for island 0)."""
        return f"island{self.index}." if self.index else ""


class LocalSGD(Callback):
    def __init__(self, mode: Literal["off", "sync", "async"] = "off", inner_steps: int = 100, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, nesterov: bool = True, island_size: Optional[int] = None,
                 server: Optional[str] = None, island_index: Optional[int] = None, islands: Optional[int] = None,
                 delayed_nesterov: int = 0, dynamic_local_updates: bool = False,
                 connect_seconds: float = 600.0) -> None:
        """Local SGD (DiLoCo) between islands of processes; needs ``--trainer.strategy fsdp2``.

        Args:
            mode: "off"; "sync": every island trains ``inner_steps`` steps on its share of each
                global batch, then all average their change of the weights and an outer optimizer
                applies it (DiLoCo), all islands in one job; "async": each island is a job of its
                own that sends its change to ``server`` (`tinytrain island-server`) when its round
                ends and goes on at once from the global weights it gets back.
            inner_steps: Steps between two exchanges between islands (H).
            outer_lr: The outer optimizer's learning rate (DiLoCo: 0.7).
            outer_momentum: The outer optimizer's momentum (DiLoCo: 0.9).
            nesterov: Nesterov momentum for the outer step (DiLoCo's choice).
            island_size: sync: processes per island (FSDP2 shards inside one); must divide the world
                size. Default: the processes of one node (trainer.devices).
            server: async: the island server's address (`tinytrain island-server` prints it).
            island_index: async: this job's island, 0 to islands - 1: it trains on that share of
                every global batch.
            islands: async: how many islands share the data (each a job of the same size).
            delayed_nesterov: async: N > 1 applies the outer momentum once every N updates, each update
                taking lr x its pseudo-gradient / N meanwhile (Liu et al., 2024); 0: Nesterov at every
                update.
            dynamic_local_updates: async: each island's rounds last in proportion to its measured speed
                (the fastest island's ``inner_steps``), so slow and fast islands end them together.
            connect_seconds: async: how long an island waits for the server (at start, or after it
                went away) before it gives up.
        """
        if inner_steps < 1:
            raise ConfigError(f"local_sgd.inner_steps must be >= 1, got {inner_steps}")
        if not outer_lr > 0:
            raise ConfigError(f"local_sgd.outer_lr must be > 0, got {outer_lr}")
        if not 0 <= outer_momentum < 1:
            raise ConfigError(f"local_sgd.outer_momentum must be in [0, 1), got {outer_momentum}")
        if island_size is not None and island_size < 1:
            raise ConfigError(f"local_sgd.island_size must be >= 1, got {island_size}")
        if mode == "async":
            if not server:
                raise ConfigError("local_sgd.mode async needs local_sgd.server (the address `tinytrain island-server` "
                                  "prints)")
            if islands is None or island_index is None or not 0 <= island_index < islands:
                raise ConfigError(f"local_sgd.mode async needs local_sgd.islands (how many) and local_sgd.island_index "
                                  f"(0 to islands - 1), got islands={islands}, island_index={island_index}")
            if delayed_nesterov > 1 and not nesterov:
                raise ConfigError("local_sgd.delayed_nesterov is a delayed Nesterov momentum: it needs "
                                  "local_sgd.nesterov: true")
        if delayed_nesterov < 0:
            raise ConfigError(f"local_sgd.delayed_nesterov must be >= 0, got {delayed_nesterov}")
        self.mode, self.inner_steps, self.island_size = mode, inner_steps, island_size
        self.outer_lr, self.outer_momentum, self.nesterov = outer_lr, outer_momentum, nesterov
        self.server, self.island_index, self.island_count = server, island_index, islands
        self.delayed_nesterov, self.dynamic_local_updates = delayed_nesterov, dynamic_local_updates
        self.connect_seconds = connect_seconds
        self.islands: Optional[Islands] = None  # set in setup()
        self.round = AsyncRound(inner_steps)  # async: where this island is in its round (in checkpoints)
        self.resumed = False  # async: the round was restored from a checkpoint
        self._client = None

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    # --- set-up -----------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Split the processes into islands: a (island, shard) mesh whose shard dimension FSDP2
        shards over (so gradients are reduced inside an island only) and whose island dimension
        joins the processes that hold the same shards in every island."""
        if not self.enabled or stage != "fit":
            return
        from tinytrain.train.strategy import FSDP2

        strategy = trainer.strategy
        if not isinstance(strategy, FSDP2):
            raise ConfigError("local_sgd needs --trainer.strategy fsdp2 (FSDP2 inside each island, even of one "
                              f"process), got {type(strategy).__name__}")
        if strategy.hybrid:
            raise ConfigError("local_sgd and trainer.strategy.hybrid both split the processes into groups; use one")
        if not strategy._save_distributed_checkpoint:
            raise ConfigError("local_sgd saves each island's state in a sharded checkpoint; keep "
                              "trainer.strategy.save_distributed_checkpoint: true")
        world = trainer.world_size
        if self.mode == "async":
            from tinytrain.train.island_server import require_torchft

            require_torchft()
            self.islands = Islands(self.island_count, world, self.island_index, None)
            trainer.datamodule.island_share = (self.island_index, self.island_count)
            if trainer.is_global_zero:
                log.info("local_sgd: island %d of %d (%d process(es)), asynchronous, server %s, rounds of %d steps%s%s",
                         self.island_index, self.island_count, world, self.server, self.inner_steps,
                         f", delayed Nesterov every {self.delayed_nesterov}" if self.delayed_nesterov > 1 else "",
                         ", dynamic local updates" if self.dynamic_local_updates else "")
            return
        size = self.island_size or strategy.num_processes
        if world % size:
            raise ConfigError(f"local_sgd.island_size={size} does not divide the world size {world} "
                              f"({trainer.num_nodes} nodes x {strategy.num_processes} processes)")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(strategy.root_device.type, (world // size, size), mesh_dim_names=("island", "shard"))
        count = world // size
        self.islands = Islands(count, size, trainer.global_rank // size,
                               mesh["island"].get_group() if count > 1 else None)
        strategy.fsdp_mesh, strategy.islands = mesh["shard"], self.islands
        if trainer.is_global_zero:
            log.info("local_sgd: %d island(s) of %d process(es), %s exchange every %d steps (outer lr %g, momentum %g%s)",
                     count, size, self.mode, self.inner_steps, self.outer_lr, self.outer_momentum,
                     ", Nesterov" if self.nesterov else "")
        max_steps, val_every = trainer.max_steps, trainer.val_check_interval
        if isinstance(val_every, int) and val_every % self.inner_steps and trainer.is_global_zero:
            log.warning("trainer.val_check_interval (%d) is not a multiple of local_sgd.inner_steps (%d): validation "
                        "then scores each island's weights mid-round (averaged over islands), not the global ones",
                        val_every, self.inner_steps)
        if max_steps is not None and 0 < max_steps < self.inner_steps and trainer.is_global_zero:
            log.warning("trainer.max_steps (%d) is below local_sgd.inner_steps (%d): one round only", max_steps,
                        self.inner_steps)

    def on_train_start(self, trainer, pl_module) -> None:
        """Every island starts from island 0's global weights; a fresh run's inner weights are them."""
        if not self.enabled:
            return
        outer = pl_module.outer
        if self.mode == "async":
            self.round.started = time.perf_counter()
            if not self.resumed:  # a fresh island: the server's weights (or, the first, its own start them)
                self._exchange(trainer, pl_module, join=True)
            return
        if self.islands.peers is not None:
            for b in outer.buffers():
                dist.broadcast(_local(b), group=self.islands.peers, group_src=0)
        if trainer.global_step == 0 and not outer.restored:
            with torch.no_grad():
                torch._foreach_copy_(outer.locals_of(pl_module.model), outer.local_weights())

    # --- the round's end ----------------------------------------------------------------------------

    def ends_round(self, step: int, max_steps: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is the last of a round."""
        return (step + 1) % self.inner_steps == 0 or step + 1 == max_steps

    def outer_steps_after(self, step: int, max_steps: int) -> int:
        """Rounds ended once step ``step`` is done."""
        return (step + 1) // self.inner_steps + int((step + 1) % self.inner_steps != 0 and step + 1 == max_steps)

    def after_step(self, module, step: int) -> None:
        """Called by LitLlama after optimizer step ``step``: end the round when it is time."""
        trainer = module.trainer
        if self.mode == "async":
            self.round.done += 1
            if self.round.done >= self.round.length or step + 1 == trainer.max_steps:
                self._exchange(trainer, module, join=False)
            return
        if self.ends_round(step, trainer.max_steps):
            outer_step(module.model, module.outer, self.islands, self.outer_lr, self.outer_momentum, self.nesterov)

    # --- asynchronous rounds --------------------------------------------------------------------

    def settings(self):
        from tinytrain.train.island_server import OuterSettings

        return OuterSettings(self.outer_lr, self.outer_momentum, self.nesterov, self.delayed_nesterov,
                             self.dynamic_local_updates, self.inner_steps, self.island_count)

    @torch.no_grad()
    def _exchange(self, trainer, module, join: bool) -> None:
        """Island rank 0 sends the round's pseudo-gradient (or, joining, its weights) to the server and
        every rank of the island takes the global weights it sends back."""
        from tinytrain.train.island_server import IslandClient

        model, outer, r = module.model, module.outer, self.round
        seconds = time.perf_counter() - r.started
        params = list(model.parameters())
        source = params if join else [w - p for w, p in zip(outer.weights.buffers(), params)]
        flat = torch.cat([_full(t).reshape(-1).float().cpu() for t in source])  # every rank: all-gathers
        reply = torch.zeros(3, dtype=torch.int64)
        if trainer.is_global_zero:
            if self._client is None:
                self._client = IslandClient(self.server, self.island_index, self.settings(), self.connect_seconds)
            if join:
                version, length, weights = self._client.join(flat)
                staleness = 0
            else:
                version, staleness, length, weights = self._client.push(r.version, r.done, seconds, flat)
                r.exchanged_bytes += 2 * flat.numel() * 4
            reply = torch.tensor([version, staleness, length])
        else:
            weights = torch.empty_like(flat)
        if trainer.world_size > 1:
            dist.broadcast(reply, src=0)
            dist.broadcast(weights, src=0)
        r.version, r.staleness, r.length = (int(v) for v in reply.tolist())
        r.done, r.started = 0, time.perf_counter()
        r.rounds += 0 if join else 1
        _load_flat(weights, params, list(outer.weights.buffers()))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def state_dict(self) -> dict:
        return self.round.state_dict() if self.mode == "async" else {}

    def load_state_dict(self, state: dict) -> None:
        if self.mode == "async" and state:
            self.round.load_state_dict(state)
            self.resumed = True

    def log_figures(self, module, step: int) -> None:
        if self.mode == "async":
            r = self.round
            module.log(LOCAL_SGD_OUTER_STEPS, float(r.version))
            module.log(LOCAL_SGD_INNER_STEPS, float(r.length))
            module.log(LOCAL_SGD_STALENESS, float(r.staleness))
            module.log(LOCAL_SGD_EXCHANGED_BYTES, float(r.exchanged_bytes))
            return
        rounds = self.outer_steps_after(step, module.trainer.max_steps)
        module.log(LOCAL_SGD_OUTER_STEPS, float(rounds))
        module.log(LOCAL_SGD_INNER_STEPS, float(self.inner_steps))
        exchanged = rounds * module.outer.payload_bytes if self.islands.count > 1 else 0
        module.log(LOCAL_SGD_EXCHANGED_BYTES, float(exchanged))


@dataclass
class AsyncRound:
    """Where an asynchronous island is: the global version its round started from, the round's length
    and steps done, what it has sent. Saved in every checkpoint (Lightning's callback state)."""
    length: int
    done: int = 0
    version: int = 0
    staleness: int = 0
    rounds: int = 0
    exchanged_bytes: int = 0
    started: float = 0.0  # perf_counter at the round's start (not saved: the round's time restarts at resume)

    def state_dict(self) -> dict:
        return {"length": self.length, "done": self.done, "version": self.version, "staleness": self.staleness,
                "rounds": self.rounds, "exchanged_bytes": self.exchanged_bytes}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _load_flat(flat: torch.Tensor, *targets: list) -> None:
    """Copy the global weights ``flat`` (the model's parameter order) into each list of tensors laid
    out like the parameters (this rank's slice of each, under FSDP2)."""
    offset = 0
    for tensors in zip(*targets):
        like = tensors[0]
        n = like.numel()
        whole = flat[offset:offset + n].view(like.shape)
        offset += n
        if hasattr(like, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            whole = distribute_tensor(whole.to(like.to_local().device), like.device_mesh, like.placements,
                                      src_data_rank=None).to_local()
        for t in tensors:
            _local(t.detach() if t.requires_grad else t).copy_(whole)


def check_islands(saved: Optional[int], now: Optional[int]) -> None:
    """A checkpoint of a Local SGD run holds one inner state per island: resume with as many."""
    from tinytrain.errors import CheckpointError

    if saved is not None and now is not None and saved != now:
        raise CheckpointError(f"the checkpoint was saved by {saved} local_sgd islands and this run has {now}; each "
                              "island's weights and optimizer state are its own: resume with the same number "
                              "(world size / local_sgd.island_size)")
    if saved is not None and now is None:
        log.info("the checkpoint was saved by %d local_sgd islands: continuing without local_sgd from island 0's "
                 "weights and optimizer state", saved)


def local_sgd_of(trainer) -> Optional[LocalSGD]:
    """The run's enabled LocalSGD callback, or None."""
    if trainer is None:
        return None
    return next((c for c in trainer.callbacks if isinstance(c, LocalSGD) and c.enabled), None)


class _Copies(nn.Module):
    """One buffer per parameter of a model, sharded like it (a DTensor clone under FSDP2)."""

    def __init__(self, model: nn.Module, zero: bool) -> None:
        super().__init__()
        with torch.no_grad():
            for name, p in model.named_parameters():
                t = p.detach().clone()
                self.register_buffer(ema_buffer_name(name), t.zero_() if zero else t)


class OuterState(nn.Module):
    """The global weights and the outer optimizer's momentum (``outer.weights.*``, ``outer.momentum.*``
    in a checkpoint)."""

    def __init__(self, model: nn.Module, momentum: bool = True) -> None:
        super().__init__()
        self.weights = _Copies(model, zero=False)
        self.momentum = _Copies(model, zero=True) if momentum else None  # async: the server keeps it
        self.restored = False  # set when a checkpoint's outer state was loaded into it
        # The pseudo-gradient's size: what one island puts into the all-reduce at each round's end.
        self.payload_bytes = sum(p.numel() * 4 for p in model.parameters())

    def local_weights(self) -> list[torch.Tensor]:
        return [_local(b) for b in self.weights.buffers()]

    def local_momentum(self) -> list[torch.Tensor]:
        return [_local(b) for b in self.momentum.buffers()]

    @staticmethod
    def locals_of(model: nn.Module) -> list[torch.Tensor]:
        return [_local(p.detach()) for p in model.parameters()]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def outer_step(model: nn.Module, outer: OuterState, islands: Islands, lr: float, momentum: float,
               nesterov: bool) -> None:
    """End a round: average the pseudo-gradients (global - local) over the islands, take one SGD step
    of the global weights with them (torch.optim's SGD, with momentum), and start every island's
    next round from the new global weights. Touches this process's shards only."""
    from torch.optim.sgd import sgd

    weights, params = outer.local_weights(), outer.locals_of(model)
    deltas = torch._foreach_sub(weights, params)
    if islands.peers is not None:
        _average(deltas, islands)
    sgd(weights, deltas, outer.local_momentum(), foreach=True, weight_decay=0.0, momentum=momentum, lr=lr,
        dampening=0.0, nesterov=nesterov, maximize=False)
    torch._foreach_copy_(params, weights)


def _average(tensors: list[torch.Tensor], islands: Islands) -> None:
    """Average ``tensors`` over the islands in place: flat fp32 buckets, one all-reduce each (gloo has
    no AVG, so SUM and divide)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=islands.peers)
        flat.div_(islands.count)
        torch._foreach_copy_(bucket, _unflatten_dense_tensors(flat, bucket))

    for t in tensors:
        if bucket and size + t.numel() > BUCKET_ELEMENTS:
            flush()
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        flush()
