"""Training throughput and MFU of a model preset on the device at hand (CUDA GPU or CPU).

Runs real training steps (forward, backward, gradient clipping, AdamW; optionally FSDP2 over
this one device, as the recipe runs) after a warm-up, and writes JSON: tokens/s, median step
time and its parts, MFU by 6N + 12LHQT FLOPs per token against the device's peak (a table of GPU
bf16 peaks; on CPU a measured matmul peak), peak memory, the switches, and the versions.

    python -m benchmarks.throughput --preset tinyllama-1.1b --micro_batch 8 --fsdp --compile \\
        --out benchmarks/results/h100.json
    python -m benchmarks.throughput --preset tiny --micro_batch 8 --seq 256          # CPU

Each switch is the recipe's switch of the same name (see README, Performance). The step is the
trainer's own (tinytrain.train.step.train_step). The timed step is --accum micro-batches and one
optimizer step; each micro-batch and the optimizer are timed apart too (CUDA events, read after
the step: no synchronisation between the parts), so `tokens_per_s_at_accum` gives the rate at the
recipe's accumulation (1024 sequences / micro batch on one GPU) without running minute-long steps.
`python -m benchmarks.fit_speed` measures `tinytrain fit` itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import time

import torch

from benchmarks.common import command, machine, write_result
from tinytrain.data.order import transit_dtype
from tinytrain.model.attention import BACKENDS
from tinytrain.model.llama import Llama, LlamaConfig
from tinytrain.train import parallel
from tinytrain.train.flops import measured_cpu_peak, peak_flops
from tinytrain.train.optim import OptimConfig, adamw
from tinytrain.train.step import StepTimer, train_step

TINYLLAMA_GLOBAL_BATCH = 1024  # sequences per optimizer step in recipes/tinyllama-1.1b.yaml


def add_switches(parser: argparse.ArgumentParser) -> None:
    """The model, batch and speed switches shared with loss_parity.py."""
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's maximum)")
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--precision", choices=["bf16-mixed", "32-true"], default=None,
                        help="default: bf16-mixed on CUDA, 32-true on CPU")
    parser.add_argument("--attention", choices=BACKENDS, default="sdpa")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--compile_loss", action="store_true", help="torch.compile norm + head + cross-entropy")
    parser.add_argument("--activation_checkpointing", action="store_true")
    parser.add_argument("--fused_adamw", choices=["auto", "on", "off"], default="off")
    parser.add_argument("--loss_chunk_size", type=int, default=0, help="chunked cross-entropy (0: plain)")
    parser.add_argument("--float8", action="store_true", help="experimental: torchao float8 linears")
    parser.add_argument("--document_masking", action="store_true",
                        help="attend within documents (batches then start a document every --document_length tokens)")
    parser.add_argument("--document_length", type=int, default=0,
                        help="tokens per document in the batches (a BOS id every N tokens; 0: random ids only)")
    parser.add_argument("--fsdp", action="store_true",
                        help="FSDP2 over this one device with bf16 parameters, as `strategy: fsdp2` trains")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup_steps", type=int, default=0, help="learning-rate warm-up (optimizer steps)")
    parser.add_argument("--grad_clip", type=float, default=1.0, help="gradient clipping, as the recipes (0: none)")


def switches_of(args) -> parallel.Switches:
    return parallel.Switches(args.attention, args.activation_checkpointing, args.compile, args.compile_loss,
                             args.loss_chunk_size, args.float8, args.document_masking)


def device_and_precision(args) -> tuple[torch.device, str]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")


class Runner:
    """A model, its optimizer and one training step, built as the recipe builds them."""

    def __init__(self, args, seed: int = 0, weights: dict | None = None) -> None:
        self.device, self.precision = device_and_precision(args)
        self.config = LlamaConfig.from_name(args.preset)
        self.seq = args.seq or self.config.max_position_embeddings
        torch.manual_seed(seed)
        bf16 = self.precision == "bf16-mixed"
        if args.fsdp:
            from torch.distributed.device_mesh import init_device_mesh

            parallel.init_one_process_group(self.device)
            mesh = init_device_mesh(self.device.type, (1,))
            self.model = parallel.build_sharded(self.config, mesh, self.device, torch.bfloat16 if bf16 else None,
                                                switches=switches_of(args))
        else:
            with torch.device(self.device):
                self.model = Llama(self.config)
            parallel.prepare(self.model, switches_of(args), self.device)
        if weights is not None:  # the same starting point for every variant compared
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            # a copy of the dict: loading into FSDP2 replaces its entries with DTensor shards
            set_model_state_dict(self.model, dict(weights), options=StateDictOptions(full_state_dict=True, strict=True))
        fused = {"auto": None, "on": True, "off": False}[args.fused_adamw]
        self.optim = OptimConfig(lr=args.lr, warmup_steps=args.warmup_steps, fused=fused, grad_clip=args.grad_clip)
        self.optimizer = adamw(self.model, self.optim)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        self.steps_done = 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, batch: torch.Tensor, timed: bool = False) -> tuple[float, list[float], float]:
        """One optimizer step over batch (accum, micro, seq + 1), by the training step the trainer
        runs (tinytrain.train.step.train_step). Returns the mean loss, and with ``timed`` each
        micro-batch's forward + backward time and the optimizer's time, from timestamps recorded
        as the work is queued (CUDA events), read once after the step."""
        timer = StepTimer(self.device) if timed else None
        with self.autocast:
            loss, _ = train_step(self.model, self.optimizer, batch, self.optim.lr_at(self.steps_done),
                                 self.optim.grad_clip, timer=timer)
        self.steps_done += 1
        loss = loss.item()  # waits for the step
        if timer is None:
            return loss, [], 0.0
        parts = timer.times()
        return loss, [t for name, t in parts if name == "micro_batch"], sum(t for name, t in parts if name == "optimizer")

    def attention_used(self) -> str:
        attn = self.model.layers[0].self_attn
        if attn.flash_fn is not None and self.device.type == "cuda" and self.precision == "bf16-mixed":
            return "flash-attn"
        return attn.backend


def random_batches(config: LlamaConfig, accum: int, micro: int, seq: int, device, n: int = 4,
                   document_length: int = 0) -> list[torch.Tensor]:
    """Token batches as the loader sends them (its transit dtype); with ``document_length``, BOS (id
    1) starts a document every that many tokens, shifted per row (random ids avoid id 1 then)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, transit_dtype(config.vocab_size).name)
    out = []
    for _ in range(n):
        low = 2 if document_length else 0
        batch = torch.randint(low, config.vocab_size, (accum, micro, seq + 1), generator=gen, dtype=dtype)
        if document_length:
            shift = torch.randint(0, document_length, (accum, micro, 1), generator=gen)
            batch[(torch.arange(seq + 1) + shift) % document_length == 0] = 1
        out.append(batch.to(device))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_switches(parser)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--peak_flops", type=float, default=None, help="override the device's peak FLOP/s")
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    runner = Runner(args)
    device, config, seq = runner.device, runner.config, runner.seq
    batches = random_batches(config, args.accum, args.micro_batch, seq, device, document_length=args.document_length)
    for i in range(args.warmup):
        runner.step(batches[i % len(batches)])
    runner.sync()
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times, micro_times, optimizer_times = [], [], []
    for i in range(args.steps):
        t = time.perf_counter()
        _, micro, opt = runner.step(batches[i % len(batches)], timed=True)
        step_times.append(time.perf_counter() - t)
        micro_times += micro
        optimizer_times.append(opt)

    median = statistics.median(step_times)
    tokens_per_step = args.accum * args.micro_batch * seq
    tokens_per_s = tokens_per_step / median
    micro_median, optimizer_median = statistics.median(micro_times), statistics.median(optimizer_times)
    recipe_accum = max(1, TINYLLAMA_GLOBAL_BATCH // args.micro_batch)
    at_recipe_accum = recipe_accum * args.micro_batch * seq / (recipe_accum * micro_median + optimizer_median)
    flops_per_token = config.training_flops_per_token(seq)
    if args.peak_flops:
        peak, peak_source = args.peak_flops, "given"
    elif device.type == "cuda":
        peak, peak_source = peak_flops(torch.cuda.get_device_name(device)), "bf16 datasheet table"
    else:
        peak, peak_source = measured_cpu_peak(), "measured 1024^3 matmul (fastest of fp32, bf16)"

    def mfu(rate: float):
        return rate * flops_per_token / peak if peak else None

    result = {
        "benchmark": "throughput",
        "preset": args.preset,
        "params": config.num_params(),
        "seq_len": seq,
        "micro_batch": args.micro_batch,
        "accum": args.accum,
        "precision": runner.precision,
        "attention": runner.attention_used(),
        "compile": args.compile,
        "compile_loss": args.compile_loss,
        "activation_checkpointing": args.activation_checkpointing,
        "fused_adamw": args.fused_adamw,
        "loss_chunk_size": args.loss_chunk_size,
        "float8": args.float8,
        "document_masking": args.document_masking,
        "document_length": args.document_length,
        "fsdp": args.fsdp,
        "steps": args.steps,
        "warmup_s": round(warmup_s, 2),
        "median_step_s": median,
        "step_times_s": step_times,
        "micro_step_median_s": micro_median,
        "optimizer_median_s": optimizer_median,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s),
        "recipe_accum": recipe_accum,
        "tokens_per_s_at_accum": at_recipe_accum,
        "mfu_at_accum": mfu(at_recipe_accum),
        "at_accum_note": "recipe_accum x micro-batch median + optimizer median, both measured here",
        "flops_per_token": flops_per_token,
        "achieved_flops": tokens_per_s * flops_per_token,
        "peak_flops": peak,
        "peak_source": peak_source,
        "peak_memory_bytes": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "memory_kind": "CUDA max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "reserved_memory_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "command": command("throughput", argv),
        "machine": machine(),
    }
    write_result(result, args.out)
    print(json.dumps({k: result[k] for k in ("device", "tokens_per_s", "mfu", "tokens_per_s_at_accum", "mfu_at_accum",
                                             "peak_memory_bytes", "attention", "compile")}, indent=2))
    if args.fsdp:
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
