"""Sparse experts: Mixtral's mixture-of-experts MLP (``model.config.num_local_experts > 1``).

Each token's router logits pick its ``num_experts_per_tok`` (k) experts; their outputs are mixed with
the softmax probabilities of the chosen k, renormalised to sum to one (Mixtral). Every expert is a
SwiGLU MLP. Routing is dropless: every token reaches all of its k experts, whatever the load (no
capacity factor). The token slots are sorted by expert and each expert multiplies only its own
contiguous rows: one grouped matmul for all experts (``torch.nn.functional.grouped_mm``) where the
shapes allow it, else a loop over the experts' slices. No expert ever sees a token it was not chosen for.

Parameter names follow Hugging Face's in-memory ``MixtralSparseMoeBlock`` (transformers 5):
``gate.weight`` (E, d), ``experts.gate_up_proj`` (E, 2I, d: gate rows then up rows) and
``experts.down_proj`` (E, d, I). Stacked 3-D expert tensors make the grouped matmul possible and let
FSDP2 shard them along the expert dimension like any other weight.

Load balancing, both optional:
- Mixtral's auxiliary loss (``router_aux_loss_coef``): per layer E x sum_e f_e P_e, with f_e the
  fraction of token slots routed to e (no gradient) and P_e the mean router probability of e; the
  model adds coef x its mean over layers to the training loss. (Hugging Face computes the same
  quantities over all layers' tokens at once; for one layer the two are equal.)
- The auxiliary-loss-free bias (DeepSeek-V3; ``router_bias_update_rate`` > 0): a per-expert bias,
  added to the router's scores for choosing the k experts only (the mixing weights stay the
  probabilities), nudged after every optimizer step by rate x sign(mean load - expert's load), the
  loads counted over the step's tokens on every rank. The bias is a persistent buffer
  (``expert_bias``): checkpoints, converted weights and averages carry it.

``router_jitter_noise`` (Mixtral's multiplicative noise on the router's input while training) is read
from Hugging Face configs and written back, but training refuses it: its draws would come from a
generator no checkpoint holds, and resume would no longer be exact.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tinytrain.errors import ConfigError


class Experts(nn.Module):
    """E SwiGLU MLPs as two stacked tensors."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, counts: torch.Tensor, grouped: Optional[bool] = None) -> torch.Tensor:
        """x: (S, d) token slots sorted by expert, ``counts[e]`` rows for expert e. Returns (S, d), in
        autocast's dtype where autocast is on (grouped_mm is not on its list: cast here)."""
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        x, gate_up, down = x.to(dtype), self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        if grouped is None:
            grouped = can_group(x, gate_up, down)
        if grouped:
            offs = counts.cumsum(0).to(torch.int32)
            h = F.grouped_mm(x, gate_up.transpose(-2, -1), offs=offs)
            gate, up = h.chunk(2, dim=-1)
            return F.grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):  # one host sync per layer: the sizes of the slices
            if n:
                gate, up = F.linear(x[start : start + n], gate_up[e]).chunk(2, dim=-1)
                out.append(F.linear(F.silu(gate) * up, down[e]))
            start += n
        return torch.cat(out) if out else x.new_zeros(0, x.size(1))


def can_group(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether grouped_mm takes these operands: bf16 (or fp32 run eager on CPU, which its kernel
    takes and its compiled form does not) with 16-byte aligned rows, on a CPU or a Hopper-or-newer GPU."""
    fp32_ok = x.device.type == "cpu" and not torch.compiler.is_compiling()
    if not hasattr(F, "grouped_mm") or x.dtype not in ((torch.float32, torch.bfloat16) if fp32_ok else (torch.bfloat16,)):
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (9, 0):
        return False  # the kernel torchtitan relies on is Hopper's; elsewhere the loop
    return all(t.size(-1) * t.element_size() % 16 == 0 and t.size(-2) * t.element_size() % 16 == 0
               for t in (x, *weights))


class MoE(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        E, d, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts, self.top_k = E, config.num_experts_per_tok
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = Experts(E, d, i)
        if config.router_bias_update_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(E))
        else:
            self.expert_bias = None
        # Token slots per expert since the last step (training only; None before the first forward):
        # the bias update's input and the logged load. Not saved: a step's count starts from zero.
        self.load: Optional[torch.Tensor] = None
        self.counts: Optional[torch.Tensor] = None  # token slots per expert of this forward (training)
        self.aux_loss: Optional[torch.Tensor] = None  # this forward's balancing loss (training, with gradient)
        self.entropy: Optional[torch.Tensor] = None  # mean router entropy of this forward (no gradient)
        self.grouped: Optional[bool] = None  # None: grouped_mm where it applies; False: the loop

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> (router probabilities (N, E) fp32, chosen experts (N, k), mixing weights (N, k) fp32)."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        scores = probs if self.expert_bias is None else probs + self.expert_bias
        chosen = scores.topk(self.top_k, dim=-1).indices
        weights = probs.gather(1, chosen)
        return probs, chosen, weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        N, k = x.size(0), self.top_k
        probs, chosen, weights = self.route(x)
        flat = chosen.reshape(-1)  # (N k,) the expert of every token slot, token-major
        order = flat.argsort(stable=True)  # slots sorted by expert
        counts = flat.new_zeros(self.num_experts).scatter_add_(0, flat, torch.ones_like(flat))  # static shape
        # Every gather below is a permutation or a broadcast, never a scatter-add into repeated rows:
        # forward and backward add in a fixed order, so a step is repeatable bit for bit on any device.
        slots = x.unsqueeze(1).expand(N, k, x.size(1)).reshape(N * k, -1)[order]
        y = self.experts(slots, counts, self.grouped)
        unsort = torch.empty_like(order).scatter_(0, order, torch.arange(N * k, device=order.device))
        out = (y[unsort].view(N, k, -1).float() * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)
        if self.training and torch.is_grad_enabled():
            # Read once per forward by the model (training_forward), outside any recomputation of the
            # block (activation checkpointing runs this again in backward: it only rewrites these).
            self.counts = counts.detach()
            with torch.no_grad():
                self.entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
            fraction = counts.float() / N  # sums to k
            self.aux_loss = self.num_experts * (fraction * probs.mean(0)).sum()
        return out.reshape(shape)

    @torch.no_grad()
    def update_bias(self, rate: float, load: torch.Tensor) -> None:
        """DeepSeek-V3's step: raise the bias of experts below the mean load, lower those above."""
        self.expert_bias += rate * torch.sign(load.mean() - load)


def check_trainable(config, optimizer: str) -> None:
    """Refuse, by name, the settings experts are not trained with here."""
    if not config.moe:
        return
    if config.router_jitter_noise > 0:
        raise ConfigError(f"model.config.router_jitter_noise is {config.router_jitter_noise}: tinytrain trains "
                          "routers without input noise (its draws would come from no saved generator, so resume "
                          "would not be exact); set it to 0.0")
    if optimizer == "muon":
        raise ConfigError("model.optim.optimizer muon orthogonalises 2-D matrices and the experts are stacked 3-D "
                          "tensors (model.config.num_local_experts > 1); use adamw with experts")


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def training_forward(layers: list[MoE]) -> torch.Tensor:
    """After a training forward: adds each layer's counts to its load, and returns the mean over
    layers of the balancing loss."""
    with torch.no_grad():
        for m in layers:
            m.load = m.counts.float() if m.load is None else m.load + m.counts
    return torch.stack([m.aux_loss for m in layers]).mean()


@torch.no_grad()
def figures(model: nn.Module) -> dict[str, torch.Tensor]:
    """The step's routing, per layer, as device tensors (logged as ``moe/...``): ``imbalance`` (most
    loaded expert / mean load over the step's token slots on this rank: 1 is perfect balance),
    ``entropy`` of the router's probabilities in nats, and ``aux_loss`` (both of the last micro-batch)."""
    out = {}
    layers = moe_layers(model)
    for n, m in enumerate(layers):
        if m.load is not None:
            out[f"layer_{n}/imbalance"] = m.load.max() / m.load.mean().clamp_min(1e-9)
        if m.entropy is not None:
            out[f"layer_{n}/entropy"] = m.entropy
    aux = [m.aux_loss.detach() for m in layers if m.aux_loss is not None]
    if aux:
        out["aux_loss"] = torch.stack(aux).mean()
    return out


@torch.no_grad()
def after_step(model: nn.Module, rate: float, group=None) -> None:
    """After an optimizer step: the auxiliary-loss-free bias update when ``rate`` > 0 (the loads summed
    over the ranks of ``group`` first, so every rank takes the same step), then the loads restart."""
    layers = [m for m in moe_layers(model) if m.load is not None]
    if rate > 0 and layers:
        loads = torch.stack([m.load for m in layers])  # (L, E)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loads, group=group)
        for m, load in zip(layers, loads):
            m.update_bias(rate, load)
    for m in layers:
        m.load = None
