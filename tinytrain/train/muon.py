"""Muon for the hidden matrices, AdamW for the rest (``model.optim.optimizer: muon``).

Muon (Jordan et al., 2024) replaces each hidden matrix's update by the orthogonalised momentum of
its gradient (a few Newton-Schulz iterations). tinytrain uses PyTorch's own ``torch.optim.Muon``
for every block's attention and MLP matrices; the embedding, the output head and the norm weights
stay with AdamW, as in the speedrun and Moonlight recipes. The two are one optimizer to Lightning
and to checkpoints (``MuonAdamW``: one step per batch, one state), each part at its own peak learning
rate on the one schedule (Muon's is ``muon_lr x lr_at(step) / lr``).

Under FSDP2 each rank holds a slice of every matrix, but the orthogonalisation needs the whole
matrix. ``ShardedMuon`` keeps PyTorch's update and momentum on the local slices (they are
element-wise) and orthogonalises each matrix once: the matrices are dealt round-robin to the ranks
of the shard group, each matrix is all-gathered, orthogonalised by its owner alone (PyTorch's
Newton-Schulz function) and broadcast, and every rank keeps its slice. The update is the one a
single process takes, and the Newton-Schulz work is spread over the ranks instead of repeated on
each.

PyTorch's Newton-Schulz runs in bf16, which is right where bf16 multiplies fast (GPUs, CPUs with
AMX) and several times slower than fp32 elsewhere (most laptops: 59 GFLOP/s against 250 on 2 cores
of an AVX-512 Xeon without AMX, benchmarks/muon_step.py). ``ns_dtype`` float32 runs the same iteration in fp32 through
``orthogonalise`` (``muon_ns_dtype: auto`` picks by the device, as ``trainer.precision: null`` does).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz


def orthogonalise(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration of the matrix ``g``, computed in ``dtype``: PyTorch's own
    function for bf16, the same steps in ``dtype`` otherwise (normalise to spectral norm at most one, on
    the wide orientation; then X <- aX + (bA + cA^2)X with A = XX^T, ``steps`` times)."""
    if dtype == torch.bfloat16:
        return _zeropower_via_newtonschulz(g, coefficients, steps, eps)
    a, b, c = coefficients
    tall = g.size(0) > g.size(1)
    x = g.to(dtype).T if tall else g.to(dtype)
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def is_hidden_matrix(name: str, ndim: int) -> bool:
    """The parameters Muon trains: every 2-D weight but the embeddings and the output head."""
    return ndim == 2 and not name.startswith(("embed_tokens.", "value_embeds.", "lm_head."))


def _shard_dim(p) -> int:
    """The mesh dimension a DTensor parameter is sharded over (the last one with a Shard placement)."""
    from torch.distributed.tensor import Shard

    dims = [i for i, placement in enumerate(p.placements) if isinstance(placement, Shard)]
    return dims[-1] if dims else -1


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon whose parameters may be DTensors sharded by FSDP2, and whose Newton-Schulz
    iteration may run in fp32 (``ns_dtype``; plain tensors in bf16: PyTorch's own step)."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype  # not a group setting: a machine's choice, not part of the saved state

    @torch.no_grad()
    def step(self, closure=None):
        sharded = any(hasattr(p, "device_mesh") for group in self.param_groups for p in group["params"])
        if not sharded and self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0  # the same order on every rank: owners agree
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            lr, momentum = group["lr"], group["momentum"]
            for p, grad, buf in zip(params, grads, bufs):
                buf.lerp_(grad, 1 - momentum)  # element-wise: on the local slices
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                if sharded:
                    update = self._orthogonalised(update, index, group, self.ns_dtype)
                else:
                    update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                           self.ns_dtype)
                index += 1
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss

    @staticmethod
    def _orthogonalised(update, index: int, group: dict, dtype: torch.dtype):
        """Newton-Schulz of the whole matrix ``update`` (a DTensor), computed on one rank of the
        shard group and returned as a DTensor laid out like ``update``."""
        from torch.distributed.tensor import distribute_tensor

        mesh, placements = update.device_mesh, update.placements
        dim = _shard_dim(update)
        whole = update.full_tensor()
        if dim < 0:  # replicated only: every rank has it all
            result = orthogonalise(whole, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
        else:
            pg = mesh.get_group(dim)
            owner = index % dist.get_world_size(pg)
            if dist.get_rank(pg) == owner:
                result = orthogonalise(whole, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
                result = result.contiguous()  # a tall matrix comes back as a transposed view
            else:
                result = torch.empty(whole.shape, dtype=dtype, device=whole.device)
            dist.broadcast(result, group=pg, group_src=owner)
        return distribute_tensor(result, mesh, placements, src_data_rank=None)  # this rank's slice, no communication


def split_parameters(model: torch.nn.Module) -> tuple[list, list]:
    """(hidden matrices for Muon, everything else for AdamW), in the model's order."""
    hidden, rest = [], []
    for name, p in model.named_parameters():
        (hidden if is_hidden_matrix(name, p.ndim) else rest).append(p)
    return hidden, rest


class MuonAdamW(torch.optim.Optimizer):
    """An AdamW and a Muon over disjoint parameters, stepped together as one optimizer: Lightning
    counts one optimizer step per batch, and checkpoints (plain or sharded) hold one state. The parts
    are PyTorch's own optimizers; this object shares its parameter groups and state with them."""

    def __init__(self, adamw: torch.optim.Optimizer, muon: torch.optim.Optimizer, muon_lr_ratio: float) -> None:
        self.adamw, self.muon = adamw, muon
        super().__init__(adamw.param_groups + muon.param_groups, defaults={})  # the same group dicts
        self._share()
        # the scheduled learning rate times this, per group (read by tinytrain.train.step)
        self.lr_ratios = (list(getattr(adamw, "lr_ratios", [1.0] * len(adamw.param_groups)))
                          + [muon_lr_ratio] * len(muon.param_groups))

    def _share(self) -> None:
        n = len(self.adamw.param_groups)
        self.adamw.param_groups, self.muon.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.adamw.state = self.muon.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # new group dicts and a new state: share them again
        self._share()
