"""Training throughput and MFU of a model preset on the device at hand (CUDA GPU or CPU).

Runs real training steps (forward, backward, gradient clipping, AdamW) on one device after a
warm-up, and writes JSON: tokens/s, median step time, MFU by 6N + 12LHQT FLOPs per token against
the device's peak (a table of GPU bf16 peaks; on CPU a measured fp32 matmul peak), peak memory,
the attention backend, compile and the other switches, and the versions.

    python benchmarks/throughput.py --preset tinyllama-1.1b --micro_batch 8 --compile --out benchmarks/results/h100.json
    python benchmarks/throughput.py --preset tiny --micro_batch 8 --seq 256          # CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from tinytrain import parallel  # noqa: E402
from tinytrain.lit import OptimConfig, adamw  # noqa: E402
from tinytrain.model import Llama, LlamaConfig, peak_flops  # noqa: E402

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


def measured_cpu_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of a few fp32 n x n x n matrix products on this CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's maximum)")
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=["bf16-mixed", "32-true"], default=None,
                        help="default: bf16-mixed on CUDA, 32-true on CPU")
    parser.add_argument("--attention", choices=["auto", "sdpa", "flash-attn"], default="auto")
    parser.add_argument("--sdpa_backend", choices=["any", *SDPA_BACKENDS], default="any")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--activation_checkpointing", action="store_true")
    parser.add_argument("--fused_adamw", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--loss_chunk_size", type=int, default=0, help="chunked cross-entropy (0: plain)")
    parser.add_argument("--peak_flops", type=float, default=None, help="override the device's peak FLOP/s")
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    config = LlamaConfig.from_name(args.preset)
    seq = args.seq or config.max_position_embeddings
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(config)
    model.set_attention_backend(args.attention)
    model.loss_chunk_size = args.loss_chunk_size
    if args.activation_checkpointing:
        parallel.apply_activation_checkpointing(model)
    if args.compile:
        parallel.apply_compile(model)
    fused = {"auto": None, "on": True, "off": False}[args.fused_adamw]
    optimizer = adamw(model, OptimConfig(lr=1e-4, warmup_steps=0, fused=fused))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    attention_ctx = contextlib.nullcontext
    if args.sdpa_backend != "any":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[args.sdpa_backend])
        attention_ctx = lambda: sdpa_kernel(backend)  # noqa: E731

    gen = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (args.micro_batch, seq + 1), generator=gen).to(device)
               for _ in range(4)]

    def step(i: int) -> None:
        tokens = batches[i % len(batches)]
        with autocast, attention_ctx():
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.steps):
        sync(device)
        t = time.perf_counter()
        step(i)
        sync(device)
        times.append(time.perf_counter() - t)

    median = statistics.median(times)
    tokens_per_s = args.micro_batch * seq / median
    flops_per_token = config.training_flops_per_token(seq)
    if args.peak_flops:
        peak, peak_source = args.peak_flops, "given"
    elif device.type == "cuda":
        peak, peak_source = peak_flops(torch.cuda.get_device_name(device)), "bf16 datasheet table"
    else:
        peak, peak_source = measured_cpu_peak(), "measured fp32 2048^3 matmul"
    uses_flash = args.attention == "flash-attn" or (
        args.attention == "auto" and device.type == "cuda" and precision == "bf16-mixed" and flash_attn_installed())
    result = {
        "benchmark": "throughput",
        "preset": args.preset,
        "params": config.num_params(),
        "seq_len": seq,
        "micro_batch": args.micro_batch,
        "precision": precision,
        "attention": "flash-attn" if uses_flash else f"sdpa ({args.sdpa_backend})",
        "compile": args.compile,
        "activation_checkpointing": args.activation_checkpointing,
        "fused_adamw": args.fused_adamw,
        "loss_chunk_size": args.loss_chunk_size,
        "steps": args.steps,
        "warmup_s": round(warmup_s, 2),
        "median_step_s": median,
        "step_times_s": times,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "achieved_flops": tokens_per_s * flops_per_token,
        "peak_flops": peak,
        "peak_source": peak_source,
        "mfu": tokens_per_s * flops_per_token / peak if peak else None,
        "peak_memory_bytes": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "memory_kind": "CUDA max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("device", "tokens_per_s", "median_step_s", "mfu", "peak_memory_bytes",
                                             "attention", "compile")}, indent=2))
    return result


def flash_attn_installed() -> bool:
    from tinytrain.model import _flash_attn_func

    return _flash_attn_func() is not None


if __name__ == "__main__":
    main()
