"""What a training run will hold in memory, per GPU, before it is queued: `tinytrain plan`.

    tinytrain plan --config recipes/tinyllama-1.1b.yaml --world_size 8 [--gpu_memory_gib 80]
    tinytrain plan --config recipes/tiny.yaml --measure        # also run a step here and compare

The estimate counts tensor bytes (what torch.cuda.max_memory_allocated reports), part by part:
master weights, gradients and AdamW state (sharded over the world with FSDP2), FSDP2's working
set (gathered parameters, gradients accumulated across micro-batches), the activations one
micro-batch saves for backward, and the loss's logits. The activation terms count the tensors
tinytrain's own blocks save (listed in ``_layer_bytes``) and were checked against measured peaks
on CPU (``--measure``, ``LiveTensorMemory``) in fp32, bf16 autocast and bf16 FSDP2, at 1 and 2
processes, with and without accumulation, activation checkpointing and the chunked loss.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from tinytrain.model.llama import LlamaConfig

GIB = 2**30


@dataclass
class Setup:
    """Everything the memory of a training step depends on."""

    config: LlamaConfig
    seq_len: int
    micro_batch: int
    accumulation: int
    world_size: int = 1
    precision: str = "32-true"
    fsdp: bool = False
    gather_once_per_step: bool = True
    activation_checkpointing: bool = False
    loss_chunk_size: int = 0
    fused_adamw: bool = False
    optimizer: str = "adamw"  # or muon (model.optim.optimizer)

    @property
    def compute_bytes(self) -> int:
        return 2 if self.precision.startswith(("bf16", "16")) else 4

    @property
    def regime(self) -> str:
        """fp32; autocast (fp32 parameters, bf16 matmuls); or half (parameters in bf16: FSDP2's
        param_dtype under bf16-mixed, or bf16-true)."""
        if self.compute_bytes == 4:
            return "fp32"
        return "half" if self.fsdp or self.precision.endswith("true") else "autocast"


def _layer_bytes(c: LlamaConfig, regime: str) -> int:
    """Bytes one block saves for backward, per token, as tinytrain's block computes it.

    Saved: each RMSNorm's input (in fp32: under bf16 parameters the norm upcasts a copy) and its
    normalised output; the projections' input; q and k after RoPE, v, the attention output and its
    log-sum-exp (flash-style kernels keep no T x T scores); the MLP's gate, SiLU(gate), up and
    their product. Under autocast each projection casts its fp32 input to bf16 separately. With experts,
    all of the MLP's once per chosen expert, and the routing's own."""
    d, kvd, i, h = c.hidden_size, c.num_key_value_heads * c.head_dim, c.intermediate_size, c.num_attention_heads
    if regime == "fp32":
        norms = 2 * (4 * d + 4 * d)          # input, normalised output
        inputs = 4 * d + 4 * d               # attention projections' input, MLP's input
        attn, mlp = 4 * (2 * d + 2 * kvd), 4 * 4 * i
    elif regime == "autocast":
        norms = 2 * (4 * d + 4 * d)
        inputs = 3 * 2 * d + 2 * 2 * d      # one bf16 cast per projection (q, k, v; gate, up)
        attn, mlp = 2 * (2 * d + 2 * kvd), 2 * 4 * i
    else:
        norms = 2 * (4 * d + 2 * d)          # fp32 copy of the input, bf16 output
        inputs = 2 * d + 2 * d
        attn, mlp = 2 * (2 * d + 2 * kvd), 2 * 4 * i
    if c.moe:  # each token's k experts each keep a dense MLP's tensors; its k input and output copies
        # (compute dtype), the router's fp32 logits, probabilities and choices, the sort's int64 indices
        k, E = c.num_experts_per_tok, c.num_local_experts
        mlp = k * mlp + 2 * k * d * (4 if regime == "fp32" else 2) + 4 * (3 * E + 3 * k) + 8 * 3 * k
    return norms + inputs + attn + mlp + 4 * h + 8  # + log-sum-exp, 2 x rstd


def _residual_bytes(regime: str) -> int:
    return 2 if regime == "half" else 4


def _hidden_shapes(c: LlamaConfig) -> list[tuple[int, int]]:
    """The shapes of the matrices Muon trains (tinytrain.train.muon.is_hidden_matrix)."""
    from tinytrain.train.muon import is_hidden_matrix

    return [tuple(shape) for name, shape in c.parameter_shapes().items()
            if is_hidden_matrix(name, len(shape))]


def _hidden_matrix_params(c: LlamaConfig) -> int:
    return sum(rows * cols for rows, cols in _hidden_shapes(c))


def _block_params(c: LlamaConfig) -> int:
    return (c.num_params(include_embedding=False) - c.vocab_size * c.hidden_size - c.hidden_size) // c.num_hidden_layers


@dataclass
class Estimate:
    """Bytes per GPU (rank); ``parts`` adds up to ``peak``."""

    setup: Setup
    parts: dict[str, int] = field(default_factory=dict)
    phase: str = ""

    @property
    def peak(self) -> int:
        return sum(self.parts.values())


def estimate(s: Setup) -> Estimate:
    """The peak tensor memory of one rank in steady state (from the second step on)."""
    c, regime = s.config, s.regime
    n_all = c.num_params()
    local = math.ceil(n_all / s.world_size) if s.fsdp else n_all
    weight_bytes = 2 if s.precision.endswith("true") and s.compute_bytes == 2 else 4
    tokens = s.micro_batch * s.seq_len
    parts = {"master weights": local * weight_bytes, "AdamW state": 2 * local * weight_bytes}
    if s.optimizer == "muon":  # one momentum per hidden matrix, AdamW's two moments for the rest
        hidden = _hidden_matrix_params(c)
        local_hidden = math.ceil(hidden / s.world_size) if s.fsdp else hidden
        parts["AdamW state"] = 2 * (local - local_hidden) * weight_bytes
        parts["Muon momentum"] = local_hidden * weight_bytes

    # Activations of one micro-batch, and the loss: the peak is reached as backward starts at the
    # head, with every block's saved tensors still held (with activation checkpointing, only each
    # block's input; a block recomputed later in backward may then set the peak instead).
    layer = _layer_bytes(c, regime)
    norm_saved = (4 + (2 if regime == "half" else 4)) * c.hidden_size  # final norm: input (fp32) + output
    blocks = c.num_hidden_layers * (_residual_bytes(regime) * c.hidden_size if s.activation_checkpointing else layer)
    parts["activations"] = tokens * (blocks + norm_saved)
    if s.loss_chunk_size > 0:  # one chunk of fp32 logits at a time; gradients made in forward
        half = 2 if regime == "half" else 4  # the head's input and weight: bf16 only under bf16 parameters
        loss = (12 * min(s.loss_chunk_size, tokens) * c.vocab_size + tokens * half * c.hidden_size
                + (4 + half) * c.vocab_size * c.hidden_size)
    else:
        # the head's input (in the compute dtype); fp32 log-softmax kept for backward, and its two
        # fp32 gradients while backward passes through the cross-entropy
        loss = tokens * (s.compute_bytes * c.hidden_size + 12 * c.vocab_size)
    if s.activation_checkpointing and tokens * layer > loss:
        parts["recomputed block"] = tokens * layer
    else:
        parts["loss"] = loss

    if s.accumulation > 1 and not s.fsdp:  # micro-batches after the first run with the step's gradients
        parts["gradients"] = local * weight_bytes
    if regime == "autocast":  # bf16 copies of the weights, cached for the step
        parts["autocast weight copies"] = 2 * (n_all - c.vocab_size * c.hidden_size)
    if s.fsdp:
        head = c.vocab_size * c.hidden_size + c.hidden_size
        if s.accumulation > 1:  # unsharded and fp32 until the last micro-batch reduce-scatters them
            parts["FSDP2 accumulated gradients"] = 4 * n_all
        if s.accumulation > 1 and s.gather_once_per_step:
            parts["FSDP2 gathered parameters"] = s.compute_bytes * n_all
        else:  # the last block and the norm + head stay gathered into backward
            parts["FSDP2 gathered parameters"] = s.compute_bytes * (_block_params(c) + head)
    est = Estimate(s, parts, "forward and backward")

    # The optimizer step: weights, state, gradients and for-each AdamW's temporary copy.
    step = {"master weights": parts["master weights"], "AdamW state": parts["AdamW state"],
            "gradients": local * weight_bytes, "optimizer temporaries": 0 if s.fused_adamw else local * weight_bytes}
    if s.optimizer == "muon":
        step["Muon momentum"] = parts["Muon momentum"]
        rows, cols = max(_hidden_shapes(c), key=lambda shape: shape[0] * shape[1])
        short = min(rows, cols)
        # for-each AdamW's copy of the rest; Muon's largest matrix: its update and the gathered whole
        # (fp32), the Newton-Schulz iterate, its next value and result (bf16), two small Gram matrices
        step["optimizer temporaries"] = (0 if s.fused_adamw else (local - local_hidden) * weight_bytes) \
            + 4 * rows * cols * 2 + 2 * rows * cols * 3 + 2 * short * short * 2
    if sum(step.values()) > est.peak:
        est = Estimate(s, step, "optimizer step")
    return est


def fits(s: Setup, budget: int) -> Optional[int]:
    """The largest micro batch (dividing the global batch per rank) whose estimate fits ``budget`` bytes."""
    per_rank = s.micro_batch * s.accumulation
    best = None
    for m in range(1, per_rank + 1):
        if per_rank % m == 0:
            trial = Setup(**{**s.__dict__, "micro_batch": m, "accumulation": per_rank // m})
            if estimate(trial).peak <= budget:
                best = m
    return best


# --- measuring ----------------------------------------------------------------------------------

class LiveTensorMemory(TorchDispatchMode):
    """Live and peak bytes of every tensor storage made inside the block, on any device (what
    the CUDA allocator's max_memory_allocated reports, also on CPU): each op's outputs are counted
    once per storage until the storage is freed, storage resizes (FSDP2 frees and refills its
    gathered parameters so) are followed, and tensor subclasses (DTensor) count their local data."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def _add(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        if is_traceable_wrapper_subclass(t):
            for name in t.__tensor_flatten__()[0]:
                self.track(getattr(t, name))
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return

        def freed(_, key=key) -> None:
            if self._refs.pop(key, None) is not None:
                self.live -= self._sizes.pop(key)

        self._refs[key] = weakref.ref(storage, freed)
        self._sizes[key] = storage.nbytes()
        self._add(storage.nbytes())

    def __enter__(self):
        original, tracker = torch.UntypedStorage.resize_, self

        def resize_(storage, n):
            out = original(storage, n)
            key = storage._cdata
            if key in tracker._sizes:
                tracker._add(n - tracker._sizes[key])
                tracker._sizes[key] = n
            return out

        self._original_resize = original
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


def measure(s: Setup, steps: int = 2, device: Optional[torch.device] = None, mesh=None) -> int:
    """Peak tensor bytes of ``steps`` real training steps of ``s`` on this process (one rank; with
    ``s.fsdp``, ``mesh`` is the FSDP mesh of an initialised process group, default one process)."""
    from tinytrain.data.order import transit_dtype
    from tinytrain.model.llama import Llama
    from tinytrain.train import parallel
    from tinytrain.train.optim import OptimConfig, build_optimizer
    from tinytrain.train.step import train_step

    device = device or torch.device("cpu")
    half = torch.bfloat16 if s.compute_bytes == 2 else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if s.precision == "bf16-mixed" else contextlib.nullcontext()
    switches = parallel.Switches(activation_checkpointing=s.activation_checkpointing, loss_chunk_size=s.loss_chunk_size)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    tracker = contextlib.nullcontext() if cuda else LiveTensorMemory()
    with tracker:
        if s.fsdp:
            if mesh is None:
                from torch.distributed.device_mesh import init_device_mesh

                mesh = init_device_mesh(device.type, (1,))
            model = parallel.build_sharded(s.config, mesh, device, half, s.gather_once_per_step, switches)
        else:
            with torch.device(device):
                model = Llama(s.config)
            if s.precision.endswith("true") and half is not None:
                model = model.to(half)
            parallel.prepare(model, switches, device)
        optimizer = build_optimizer(model, OptimConfig(lr=1e-4, warmup_steps=0, fused=s.fused_adamw,
                                                       optimizer=s.optimizer))
        dtype = getattr(torch, transit_dtype(s.config.vocab_size).name)
        batch = torch.randint(0, s.config.vocab_size, (s.accumulation, s.micro_batch, s.seq_len + 1), dtype=dtype,
                              device=device)
        for _ in range(steps):
            with autocast:
                train_step(model, optimizer, batch, 1e-4, 1.0)
    return torch.cuda.max_memory_allocated(device) if cuda else tracker.peak


# --- the command ---------------------------------------------------------------------------------

def setup_from_recipe(argv: list[str], world_size: Optional[int]) -> tuple[Setup, list[str]]:
    """The Setup a recipe (with --key value overrides) trains with; notes on what was assumed."""
    from tinytrain.commands.fit import read_recipe
    from tinytrain.data.order import grad_accumulation

    cfg = read_recipe(argv)
    notes = []
    trainer, model, data = cfg.trainer, cfg.model, cfg.data
    strategy = trainer.strategy
    name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", "")
    fsdp = name == "fsdp2" or name.endswith(("FSDP2", "ModelParallelStrategy"))
    init = getattr(strategy, "init_args", None)
    if world_size is None:
        devices = trainer.devices if isinstance(trainer.devices, int) else None
        if devices is None:
            notes.append(f"trainer.devices is {trainer.devices!r}: assumed 1 process per node (--world_size sets it)")
        world_size = (devices or 1) * (trainer.num_nodes or 1)
    accum = grad_accumulation(data.global_batch_size, data.micro_batch_size, world_size)
    setup = Setup(LlamaConfig(**vars(model.config)), data.seq_len, data.micro_batch_size, accum, world_size,
                  str(trainer.precision), fsdp, getattr(init, "gather_once_per_step", True) if init else True,
                  model.activation_checkpointing, model.loss_chunk_size, bool(model.optim.fused),
                  model.optim.optimizer)
    return setup, notes


def report(s: Setup, gpu_memory_gib: float, reserve_gib: float, notes: list[str]) -> str:
    e = estimate(s)
    c = s.config
    experts = (f" ({c.num_active_params():,} active per token: {c.num_experts_per_tok} of {c.num_local_experts} "
               "experts and the router)" if c.moe else "")
    lines = [f"model {c.num_params():,} parameters{experts}; {s.seq_len}-token sequences; "
             f"micro batch {s.micro_batch} x "
             f"{s.accumulation} micro-batches per step on each of {s.world_size} process(es)",
             f"{s.precision}, {'FSDP2' if s.fsdp else 'one device per process, unsharded'}"
             + (", activation checkpointing" if s.activation_checkpointing else "")
             + (f", chunked loss ({s.loss_chunk_size})" if s.loss_chunk_size else "")
             + (", Muon for the hidden matrices" if s.optimizer == "muon" else ""),
             "", f"per GPU at its peak ({e.phase}):"]
    width = max(len(k) for k in e.parts)
    lines += [f"  {k:<{width}}  {v / GIB:8.2f} GiB" for k, v in e.parts.items()]
    lines.append(f"  {'total':<{width}}  {e.peak / GIB:8.2f} GiB")
    budget = int((gpu_memory_gib - reserve_gib) * GIB)
    verdict = "fits" if e.peak <= budget else "does NOT fit"
    lines += ["", f"{verdict} in {gpu_memory_gib:g} GiB, keeping {reserve_gib:g} GiB for the CUDA context, NCCL "
              "buffers and allocator fragmentation (an allowance, not a measurement)"]
    plain = Setup(**{**s.__dict__, "activation_checkpointing": False})
    checkpointed = Setup(**{**s.__dict__, "activation_checkpointing": True})
    for label, trial in (("without", plain), ("with", checkpointed)):
        best = fits(trial, budget)
        lines.append(f"largest micro batch that fits {label} activation checkpointing: "
                     + (f"{best}" if best else "none, even 1") + f" (of divisors of {s.micro_batch * s.accumulation})")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from tinytrain.errors import argument_parser

    parser = argument_parser(
        prog="tinytrain plan", description="Memory per GPU of a recipe's training step, before the job is queued.",
        epilog="Every other argument is a recipe override, as for `tinytrain fit` (e.g. --data.micro_batch_size 16).")
    parser.add_argument("--config", required=True, help="the recipe")
    parser.add_argument("--world_size", type=int, default=None, help="processes (GPUs) in all; default: the recipe's")
    parser.add_argument("--gpu_memory_gib", type=float, default=80.0, help="memory of one GPU (H100: 80)")
    parser.add_argument("--reserve_gib", type=float, default=2.0, help="kept free for context, NCCL, fragmentation")
    parser.add_argument("--measure", action="store_true",
                        help="also run two real steps here (one process, at most 2 micro-batches) and compare")
    args, overrides = parser.parse_known_args(argv)
    if args.world_size is not None and args.world_size <= 0:
        parser.error(f"--world_size must be positive, got {args.world_size}")
    setup, notes = setup_from_recipe(["--config", args.config, *overrides], args.world_size)
    print(report(setup, args.gpu_memory_gib, args.reserve_gib, notes))
    if args.measure:
        local = Setup(**{**setup.__dict__, "world_size": 1, "accumulation": min(setup.accumulation, 2)})
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        with _one_process_group(local.fsdp, device):
            measured = measure(local, device=device)
        predicted = estimate(local).peak
        print(f"\nmeasured on {device.type}, one process, {local.accumulation} micro-batch(es): {measured / GIB:.3f} GiB; "
              f"estimated {predicted / GIB:.3f} GiB ({predicted / measured - 1:+.1%})")


@contextlib.contextmanager
def _one_process_group(needed: bool, device: torch.device):
    from tinytrain.train.parallel import init_one_process_group

    made = needed and init_one_process_group(device)
    try:
        yield
    finally:
        if made:
            torch.distributed.destroy_process_group()
