"""A Llama-2 style decoder, single device, readable top to bottom.

RMSNorm -> RoPE -> grouped-query attention -> SwiGLU MLP -> block -> model.

Module and parameter names follow Hugging Face's ``LlamaForCausalLM`` (minus its ``model.``
prefix), so the HF key map stays a prefix rename. Nothing here imports Lightning or
torch.distributed: parallelism is applied from outside (see ``tinytrain.train.parallel``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tinytrain.errors import ConfigError
from tinytrain.model import attention, loss, moe
from tinytrain.model.moe import MoE

# Named architectures: LlamaConfig.from_name(name). Recipes spell theirs out in full.
PRESETS: dict[str, dict] = {
    # TinyLlama 1.1B (arXiv 2401.02385): exactly 1,100,048,384 parameters.
    "tinyllama-1.1b": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
    ),
    # 7.1M parameters (4.7M of them embeddings and head): the laptop recipe, sized by measurement; QK-norm
    # and value embeddings measured to pay on it (README).
    "tiny": dict(
        vocab_size=8192, hidden_size=192, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256, qk_norm=True,
        value_embeddings=3,
    ),
    # Sparse experts at the same active size: 8 experts of half the width, 2 per token (recipes/*-moe.yaml).
    "tiny-moe": dict(
        vocab_size=8192, hidden_size=192, intermediate_size=256, num_hidden_layers=6,
        num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256,
        num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.01,
    ),
    "tinyllama-1.1b-moe": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.01,
    ),
    # Under 1M parameters: a few dozen steps in seconds, for tests.
    "ci": dict(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ),
}


@dataclass
class LlamaConfig:
    """Architecture of a Llama-2 style model. Field names are those of HF's ``LlamaConfig``."""

    vocab_size: int = 32000
    """Rows of the input embedding and the output head."""
    hidden_size: int = 2048
    """Width of the residual stream."""
    intermediate_size: int = 5632
    """Width of the SwiGLU hidden layer."""
    num_hidden_layers: int = 22
    """Number of transformer blocks."""
    num_attention_heads: int = 32
    """Query heads per block."""
    num_key_value_heads: int = 4
    """Key/value heads per block (grouped-query attention); must divide num_attention_heads."""
    max_position_embeddings: int = 2048
    """Longest sequence the RoPE tables are built for."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside RMSNorm."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output head (TinyLlama does not)."""
    initializer_std: Optional[float] = None
    """Std of the normal init of embeddings and linears; None means TinyLlama's sqrt(2 / (5 * hidden_size))."""
    zero_init_outputs: bool = False
    """Start every block's output projections (o_proj, down_proj) and the output head (unless tied to
    the embedding) at zero, as modded-nanogpt and nanochat do: each block begins as the identity and
    the first logits are uniform. Only the initialisation changes, so Hugging Face export is unaffected."""
    logit_scaling_window: Optional[int] = None
    """Entropy-aware ABF (arXiv 2401.07004): the context window the model was trained at. Each query
    at position p (from 0) is multiplied by max(1, log(p + 1) / log(window)), from layer
    logit_scaling_from_layer on, so attention entropy stays as it was beyond the old window (the
    factor is 1 inside it). None: off. No Hugging Face Llama has it."""
    logit_scaling_from_layer: int = 2
    """The first layer (from 0) whose queries are scaled; the paper leaves the first two alone."""
    logit_softcap: float = 0.0
    """> 0: the output logits are logit_softcap x tanh(logits / logit_softcap), in training, evaluation
    and decoding alike (Gemma 2's final-logit soft-capping at 30; modded-nanogpt's at 15-30). 0: off.
    No Hugging Face Llama has it, so `convert to-hf` refuses it."""
    qk_norm: bool = False
    """RMSNorm (with a weight, over the head's dimensions) on every head's queries and keys before
    RoPE, as Qwen3 and Gemma 3 do: attention logits stay bounded at high learning rates. No Hugging
    Face Llama has it, so `convert to-hf` refuses it."""
    value_embeddings: int = 0
    """Value embeddings (modded-nanogpt): this many more token-embedding tables, each as wide as a block's
    values (num_key_value_heads x head_dim). Table j is added to the attention values of block j and of
    block num_hidden_layers - value_embeddings + j, so the first and the last blocks share them; at most
    num_hidden_layers / 2. They add parameters (trained with the token embedding, at embedding_lr) and
    next to no FLOPs. 0: none. No Hugging Face Llama has them, so `convert to-hf` refuses them."""
    num_local_experts: int = 1
    """1: every block's MLP is one SwiGLU. More: a Mixtral mixture of that many SwiGLU experts of
    intermediate_size each, a router choosing num_experts_per_tok of them per token (model/moe.py)."""
    num_experts_per_tok: int = 2
    """Experts each token is sent to (k), when num_local_experts > 1."""
    router_aux_loss_coef: float = 0.0
    """Weight of Mixtral's load-balancing loss in the training loss (0: off; Mixtral's config says 0.001,
    Switch Transformer used 0.01)."""
    router_jitter_noise: float = 0.0
    """Mixtral's router input noise: kept from Hugging Face configs; training refuses it (see model/moe.py)."""
    router_bias_update_rate: float = 0.0
    """> 0: auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias on the routing scores, moved by
    this much after every step toward equal loads (DeepSeek-V3 used 0.001)."""

    FLOAT_FIELDS = ("rope_theta", "rms_norm_eps", "initializer_std", "logit_softcap", "router_aux_loss_coef",
                    "router_jitter_noise", "router_bias_update_rate")

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self.FLOAT_FIELDS or isinstance(value, bool):
                continue
            if f.name == "logit_scaling_window" and value is None:
                continue
            if f.name in ("logit_scaling_from_layer", "value_embeddings"):
                if not isinstance(value, int) or value < 0:
                    problems.append(f"{f.name} must be an integer >= 0, got {value!r}")
                continue
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{f.name} must be a positive integer, got {value!r}")
        if not problems:
            if self.hidden_size % self.num_attention_heads:
                problems.append(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
                )
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append(
                    f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                    f"num_key_value_heads ({self.num_key_value_heads})"
                )
            if self.logit_scaling_window is not None and self.logit_scaling_window < 2:
                problems.append(f"logit_scaling_window must be >= 2 (a log base), got {self.logit_scaling_window}")
            if 2 * self.value_embeddings > self.num_hidden_layers:
                problems.append(f"value_embeddings ({self.value_embeddings}) must be at most half of num_hidden_layers "
                                f"({self.num_hidden_layers}): each table serves one of the first and one of the last blocks")
            if self.num_local_experts > 1 and self.num_experts_per_tok > self.num_local_experts:
                problems.append(f"num_experts_per_tok ({self.num_experts_per_tok}) must be at most num_local_experts "
                                f"({self.num_local_experts})")
            for name in ("logit_softcap", "router_aux_loss_coef", "router_jitter_noise", "router_bias_update_rate"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                    problems.append(f"{name} must be a number >= 0, got {value!r}")
            if (self.hidden_size // self.num_attention_heads) % 2:
                problems.append(f"head size {self.hidden_size // self.num_attention_heads} must be even for RoPE")
        if problems:
            raise ConfigError("invalid LlamaConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def value_embedding_tables(self) -> list[Optional[int]]:
        """For each block, the index of the value-embedding table added to its values (None: none)."""
        k, n = self.value_embeddings, self.num_hidden_layers
        return [i if i < k else i - (n - k) if i >= n - k else None for i in range(n)] if k else [None] * n

    @property
    def moe(self) -> bool:
        """Whether the blocks' MLPs are mixtures of experts."""
        return self.num_local_experts > 1

    @classmethod
    def from_name(cls, name: str, **overrides) -> "LlamaConfig":
        """A named preset (see ``PRESETS``), with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor a checkpoint holds, in the model's order: each distinct parameter
        (a tied head is the embedding, so has no entry of its own) and the experts' routing bias when
        there is one. The one place shapes are known without a model."""
        d, hd, i = self.hidden_size, self.head_dim, self.intermediate_size
        shapes = {"embed_tokens.weight": (self.vocab_size, d)}
        for j in range(self.value_embeddings):
            shapes[f"value_embeds.{j}.weight"] = (self.vocab_size, self.num_key_value_heads * hd)
        for n in range(self.num_hidden_layers):
            p = f"layers.{n}."
            shapes.update({
                p + "input_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (self.num_attention_heads * hd, d),
                p + "self_attn.k_proj.weight": (self.num_key_value_heads * hd, d),
                p + "self_attn.v_proj.weight": (self.num_key_value_heads * hd, d),
                p + "self_attn.o_proj.weight": (d, self.num_attention_heads * hd),
                **({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)} if self.qk_norm else {}),
                p + "post_attention_layernorm.weight": (d,),
            })
            if self.moe:
                E = self.num_local_experts
                shapes.update({p + "mlp.gate.weight": (E, d), p + "mlp.experts.gate_up_proj": (E, 2 * i, d),
                               p + "mlp.experts.down_proj": (E, d, i)})
                if self.router_bias_update_rate > 0:
                    shapes[p + "mlp.expert_bias"] = (E,)
            else:
                shapes.update({p + "mlp.gate_proj.weight": (i, d), p + "mlp.up_proj.weight": (i, d),
                               p + "mlp.down_proj.weight": (d, i)})
        shapes["norm.weight"] = (d,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        return shapes

    def num_params(self, include_embedding: bool = True) -> int:
        """Exact parameter count, from the shapes (no model needed). Without the embedding (nor the value
        embeddings: lookups, not products), a tied matrix still counts once, as the output head."""
        n = sum(math.prod(shape) for name, shape in self.parameter_shapes().items() if not name.endswith("expert_bias"))
        if include_embedding:
            return n
        n -= self.value_embeddings * self.vocab_size * self.num_key_value_heads * self.head_dim
        return n if self.tie_word_embeddings else n - self.vocab_size * self.hidden_size

    def num_active_params(self, include_embedding: bool = True) -> int:
        """Parameters one token is computed with: all of them but the experts it is not routed to."""
        idle = self.num_local_experts - self.num_experts_per_tok if self.moe else 0
        return self.num_params(include_embedding) - idle * self.num_hidden_layers * 3 * self.hidden_size * \
            self.intermediate_size

    def describe(self) -> str:
        """'5,507,520 parameters, 6 layers, width 192' (with experts: how many are active per token)."""
        active = (f" ({self.num_active_params():,} active per token: {self.num_experts_per_tok} of "
                  f"{self.num_local_experts} experts)" if self.moe else "")
        return f"{self.num_params():,} parameters{active}, {self.num_hidden_layers} layers, width {self.hidden_size}"

    # What continued pretraining may change in a trained model: its context window.
    CONTEXT_FIELDS = ("max_position_embeddings", "rope_theta", "logit_scaling_window", "logit_scaling_from_layer")

    # What only draws the first weights: trained weights mean the same whatever these said.
    INIT_FIELDS = ("initializer_std", "zero_init_outputs")

    def architecture(self) -> dict:
        """The fields that fix the weights' meaning: all but the context window's (CONTEXT_FIELDS) and
        the initialisation's (INIT_FIELDS)."""
        return {k: v for k, v in self.trained().items() if k not in self.CONTEXT_FIELDS}

    def trained(self) -> dict:
        """Every field but the initialisation's: what a resumed run must keep."""
        return {k: v for k, v in asdict(self).items() if k not in self.INIT_FIELDS}

    def differences(self, other: "LlamaConfig", mine: str, theirs: str) -> str:
        """'model.config.FIELD: <mine> X, <theirs> Y' for every field that differs, the initialisation's
        aside; '' if none."""
        return ", ".join(f"model.config.{k}: {mine} {v!r}, {theirs} {getattr(other, k)!r}"
                         for k, v in self.trained().items() if getattr(other, k) != v)

    def training_flops_per_token(self, seq_len: int) -> int:
        """FLOPs of one training token (forward + backward): 6 N + 12 L H Q T (PaLM, appendix B),
        N the parameters without the input embedding (with experts: the active ones), H heads of size Q,
        T the sequence length. The attention term counts the full T x T score matrix, as published MFU
        figures do."""
        n = self.num_active_params(include_embedding=False)
        return 6 * n + 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the compute dtype, as HF Llama does, then scale in x's dtype.
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rope_tables(head_dim: int, length: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (length, head_dim) in fp32, in HF's rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)  # (T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, n_heads, T, hd); cos/sin: (T, hd). Rotate-half: pairs are (i, i + hd/2), not (2i, 2i+1).
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LayerKV:
    """Preallocated keys and values of one block, for incremental decoding."""

    def __init__(self, batch: int, n_kv: int, length: int, head_dim: int, dtype, device) -> None:
        shape = (batch, n_kv, length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = pos + k.size(2)
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """A decoding session's keys and values, one LayerKV per block (Llama.new_kv_cache). It belongs
    to the caller, who passes it to each forward: the model itself holds no decoding state."""

    def __init__(self, layers: list[LayerKV]) -> None:
        self.layers = layers


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.set_backend("auto")

    def set_backend(self, backend: str) -> None:
        """One of attention.BACKENDS (see Llama.set_attention_backend)."""
        # Resolved here, not per call: the compiled forward then only reads attributes.
        self.kernel = attention.Kernel(backend, self.n_head, self.n_kv)
        self.backend, self.flash_fn, self.sdpa_kernels = backend, self.kernel.flash_fn, self.kernel.sdpa_kernels

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int = 0,
                documents: Optional[attention.Documents] = None, query_scale: Optional[torch.Tensor] = None,
                kv: Optional[LayerKV] = None, ve: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x)
        if ve is not None:  # the token's value embedding (LlamaConfig.value_embeddings)
            v = v + ve.to(v.dtype)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # (B, T, heads, hd) -> (B, heads, T, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if query_scale is not None:  # entropy-aware ABF: scaled logits beyond the old window
            q = q * query_scale.to(q.dtype)
        if kv is not None:
            k, v = kv.update(pos, k, v)
            y = attention.after_cache(q, k, v, pos)
        else:
            y = self.kernel.causal(q, k, v, documents)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, d)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig, index: int = 0) -> None:
        super().__init__()
        # entropy-aware ABF scales this block's queries (see LlamaConfig.logit_scaling_window)
        self.scaled = config.logit_scaling_window is not None and index >= config.logit_scaling_from_layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.moe else LlamaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int = 0,
                documents: Optional[attention.Documents] = None, query_scale: Optional[torch.Tensor] = None,
                kv: Optional[LayerKV] = None, ve: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, documents,
                               query_scale if self.scaled else None, kv, ve)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        attention.forget_notes()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.value_embeds = nn.ModuleList(nn.Embedding(config.vocab_size, config.num_key_value_heads * config.head_dim)
                                          for _ in range(config.value_embeddings))
        self.layers = nn.ModuleList(LlamaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.loss_chunk_size = 0  # > 0: chunked cross-entropy (set from outside, like the attention backend)
        self.z_loss = 0.0  # > 0: the training loss adds z_loss x mean(logsumexp^2) (set from outside)
        # A token id that starts every document (BOS): tokens then attend only within their own
        # document; with document_positions, RoPE positions also restart at each document.
        self.document_boundary: Optional[int] = None
        self.document_positions = False
        # Compiled versions of the blocks and of logits_loss (set from outside, by tinytrain.train.parallel):
        # used for the training step only (train mode, gradients on). Validation, evaluation and
        # decoding run eager, so their other shapes and modes never add graphs to the compiled ones.
        self.compiled_layers: tuple = ()
        self.compiled_logits_loss = None
        cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self, generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> None:
        """TinyLlama's initialisation; also rebuilds the RoPE tables (after meta-device construction).

        Embeddings and linears: normal(0, sqrt(2 / (5 d))) (small init, Nguyen & Salazar 2019).
        Output projections of attention and MLP: normal(0, 1 / (sqrt(d) * n_layers)), which keeps
        the residual stream's variance from growing with depth. Norm weights: ones.

        The same weights on one device and sharded over any number of ranks: each parameter is drawn
        whole from its own generator, seeded with a base seed plus its index, and a sharded parameter
        (a DTensor under FSDP2) keeps its rank's part of that whole tensor. The base is ``seed``
        (training passes the run's seed) or else one draw from ``generator`` (default: torch's
        global generator). On the meta device nothing is drawn.
        """
        if self.embed_tokens.weight.device.type == "meta":
            return
        c = self.config
        std = c.initializer_std if c.initializer_std is not None else math.sqrt(2.0 / (5 * c.hidden_size))
        out_std = 1.0 / math.sqrt(c.hidden_size) / c.num_hidden_layers
        base = seed if seed is not None else int(torch.randint(0, 2**62, (), generator=generator))
        outputs = ("o_proj.weight", "down_proj.weight", "experts.down_proj")
        zeroed = outputs + (() if c.tie_word_embeddings else ("lm_head.weight",))
        for index, (name, p) in enumerate(self.named_parameters()):
            if c.zero_init_outputs and name.endswith(zeroed):
                with torch.no_grad():
                    p.zero_()
            elif name.endswith(outputs):
                _init_whole(p, out_std, base + index)
            elif p.ndim >= 2:
                _init_whole(p, std, base + index)
            else:
                nn.init.ones_(p)
        for m in self.moe_layers:
            if m.expert_bias is not None:
                m.expert_bias.zero_()
        self.init_rope()

    def init_rope(self) -> None:
        """(Re)build the RoPE tables on the weights' device; they are buffers no checkpoint stores."""
        c = self.config
        device = self.embed_tokens.weight.device
        self.rope_cos, self.rope_sin = rope_tables(c.head_dim, c.max_position_embeddings, c.rope_theta, device=device)

    def load_weights(self, weights: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Load a full set of weights (strict). With tied embeddings the head may be absent."""
        self.load_state_dict(with_tied_head(weights, self.config), strict=True, assign=assign)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # assign=True would have untied them

    def set_attention_backend(self, backend: str) -> None:
        """One of attention.BACKENDS: "auto" (flash-attn on CUDA when installed, else SDPA), "sdpa" (PyTorch picks the kernel),
        "sdpa-flash" / "sdpa-cudnn" / "sdpa-efficient" / "sdpa-math" (one SDPA kernel, forced) or
        "flash-attn". Decoding with KV caches always uses SDPA's own choice."""
        for block in self.layers:
            block.self_attn.set_backend(backend)

    def forward(
        self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, pos: int = 0, per_token: bool = False,
        *, cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T); with targets (B, T), the mean next-token loss,
        or with ``per_token`` the loss at every position (B, T), in fp32 (for evaluation: no graph).

        Decoding passes a ``cache`` (new_kv_cache): idx's keys and values are written into it at
        positions pos .. pos + T - 1 and attention reads every position before; ``pos`` is the
        position of idx[:, 0].
        """
        x = self.hidden(idx, pos, cache)
        if targets is None:
            return loss.soft_cap(self.lm_head(self.norm(x)), self.config.logit_softcap)  # (B, T, V)
        if per_token:
            return loss.token_losses(self.norm(x), self.lm_head.weight, targets, softcap=self.config.logit_softcap)
        if self.moe_layers and self._training_step():
            aux = moe.training_forward(self.moe_layers)
            if self.config.router_aux_loss_coef > 0:
                return self.head_loss(x, targets) + self.config.router_aux_loss_coef * aux
        return self.head_loss(x, targets)

    @property
    def moe_layers(self) -> list[MoE]:
        """Every block's mixture of experts (none in a dense model)."""
        return [block.mlp for block in self.layers if isinstance(getattr(block, "mlp", None), MoE)]

    def hidden(self, idx: torch.Tensor, pos: int = 0, cache: Optional[KVCache] = None) -> torch.Tensor:
        """The last block's output (B, T, d), before the final norm."""
        T = idx.size(1)
        if pos + T > self.config.max_position_embeddings:
            raise ConfigError(
                f"sequence of {pos + T} tokens exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )
        documents = None
        if self.document_boundary is not None and pos == 0 and cache is None:
            ids = (idx == self.document_boundary).cumsum(dim=1)  # (B, T); 0 before a block's first BOS
            documents = self.layers[0].self_attn.kernel.documents(ids)  # once, for every layer
        if documents is not None and self.document_positions:
            positions = positions_in_documents(idx == self.document_boundary)  # (B, T)
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B, 1, T, hd)
        else:
            positions = None  # pos .. pos + T - 1, made only when logit scaling needs them
            cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        query_scale = None
        if self.config.logit_scaling_window is not None:  # (T, 1) or (B, 1, T, 1), broadcast over heads
            if positions is None:
                positions = torch.arange(pos, pos + T, device=idx.device)
            query_scale = ((positions + 1).float().log() / math.log(self.config.logit_scaling_window)).clamp(min=1.0)
            query_scale = query_scale[..., None] if positions.dim() == 1 else query_scale[:, None, :, None]
        x = self.embed_tokens(idx)  # (B, T, d)
        tables = [table(idx) for table in self.value_embeds]  # (B, T, kv width) each
        ves = [None if j is None else tables[j] for j in self.config.value_embedding_tables]
        if cache is not None:
            for block, kv, ve in zip(self.layers, cache.layers, ves):
                x = block(x, cos, sin, pos, None, query_scale, kv, ve)
            return x
        layers = self.compiled_layers if self.compiled_layers and self._training_step() else self.layers
        for block, ve in zip(layers, ves):
            x = block(x, cos, sin, pos, documents, query_scale, None, ve)
        return x

    def _training_step(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Final norm, output head and mean cross-entropy."""
        # The norm runs as a module (FSDP2 gathers the norm + head group in its forward hook);
        # the rest reads the head's weight as a tensor, so ``compile_loss`` can compile it whole.
        fn = self.compiled_logits_loss if self.compiled_logits_loss is not None and self._training_step() \
            else self.logits_loss
        return fn(self.norm(x), self.lm_head.weight, targets)

    def logits_loss(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the logits x @ weight.T against targets, with the z-loss while training
        (validation reports the cross-entropy alone): the part ``compile_loss`` compiles."""
        return loss.logits_loss(x, weight, targets, self.loss_chunk_size, self.z_loss if self.training else 0.0,
                                self.config.logit_softcap)

    def new_kv_cache(self, batch: int, length: Optional[int] = None, dtype=None) -> KVCache:
        """An empty cache for decoding ``batch`` sequences of up to ``length`` tokens (default: the
        context window), on the weights' device and in their dtype unless told."""
        length = length or self.config.max_position_embeddings
        dtype = dtype or self.lm_head.weight.dtype
        device = self.lm_head.weight.device
        c = self.config
        return KVCache([LayerKV(batch, c.num_key_value_heads, length, c.head_dim, dtype, device) for _ in self.layers])


@torch.no_grad()
def _init_whole(p: torch.Tensor, std: float, seed: int) -> None:
    """normal(0, std) into ``p``, drawn whole from a generator seeded with ``seed``; a DTensor keeps
    its own part of the whole draw (no communication), so the values do not depend on the sharding."""
    local = p.to_local() if hasattr(p, "to_local") else p
    gen = torch.Generator(device=local.device).manual_seed(seed)
    if local is p:
        p.normal_(0.0, std, generator=gen)
        return
    from torch.distributed.tensor import distribute_tensor

    whole = torch.empty(p.shape, dtype=local.dtype, device=local.device).normal_(0.0, std, generator=gen)
    local.copy_(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local())


def positions_in_documents(starts: torch.Tensor) -> torch.Tensor:
    """Each token's position within its document, from a (B, T) mask of document starts (a block's
    first tokens, before any start, count from 0 as a document of their own)."""
    index = torch.arange(starts.size(1), device=starts.device).expand_as(starts)
    return index - torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values


def with_tied_head(weights: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """A full state dict from a set of weights: with tied embeddings the head is the embedding
    (checkpoints and HF folders may leave it out; state dicts list it under both names)."""
    if config.tie_word_embeddings and "lm_head.weight" not in weights:
        return {**weights, "lm_head.weight": weights["embed_tokens.weight"]}
    return weights
