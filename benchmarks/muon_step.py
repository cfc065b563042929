"""What Muon costs per step at TinyLlama's shape, at a reduced depth: the optimizer step of AdamW and
of Muon (with AdamW for the embedding, the head and the norms: `model.optim.optimizer: muon`), its
Newton-Schulz iteration in bf16 (PyTorch's) and in fp32, timed in turn on the same model and
gradients, beside one forward and backward of a sequence; the Newton-Schulz FLOPs counted from the
matrices' shapes.

Each round times one forward+backward, then one step of each optimizer; figures are medians over
rounds (AdamW's state is made before the rounds; Muon's one momentum buffer per matrix in its first
round). Muon's extra time over AdamW is its momentum and orthogonalisation; scaled to the full depth
it says what one process would add per step (under FSDP2 the orthogonalisations are spread over the
ranks).

    python -m benchmarks.muon_step --layers 1 --rounds 2 --out benchmarks/results/muon_step-cpu2.json
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import command, machine, write_result


def newton_schulz_flops(shapes: list[tuple[int, int]], steps: int) -> int:
    """FLOPs of ``steps`` quintic Newton-Schulz iterations on each (rows, cols) matrix: with m <= n the
    shorter side, A = X X^T (2 m m n), B = b A + c A A (2 m^3), X = a X + B X (2 m m n)."""
    total = 0
    for rows, cols in shapes:
        m, n = min(rows, cols), max(rows, cols)
        total += steps * (4 * m * m * n + 2 * m ** 3)
    return total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tinyllama-1.1b")
    parser.add_argument("--layers", type=int, default=2, help="blocks kept of the preset's depth")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of the timed forward+backward (one sequence)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ns_steps", type=int, default=5)
    parser.add_argument("--ns_dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--out", default="benchmarks/results/muon_step.json")
    args = parser.parse_args(argv)

    import torch

    from tinytrain.model.llama import LlamaConfig
    from tinytrain.train.muon import is_hidden_matrix
    from tinytrain.train.optim import OptimConfig, build_optimizer
    from tinytrain.train.parallel import build

    torch.manual_seed(0)
    full = LlamaConfig.from_name(args.preset)
    config = LlamaConfig.from_name(args.preset, num_hidden_layers=args.layers)
    model = build(config)
    schedule = {"warmup_steps": 0, "decay_steps": 10, "muon_ns_steps": args.ns_steps}
    optimizers = {"adamw": build_optimizer(model, OptimConfig(**schedule))}
    for dtype in args.ns_dtypes:
        optimizers[f"muon_{dtype}"] = build_optimizer(model, OptimConfig(optimizer="muon", muon_ns_dtype=dtype,
                                                                         **schedule))
    idx = torch.randint(0, config.vocab_size, (1, args.tokens + 1))

    def forward_backward() -> None:
        model.zero_grad(set_to_none=False)
        model(idx[:, :-1], idx[:, 1:]).backward()

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    forward_backward()
    optimizers["adamw"].step()  # its two moments, allocated
    times: dict[str, list[float]] = {"forward_backward": [], **{name: [] for name in optimizers}}
    for _ in range(args.rounds):
        times["forward_backward"].append(timed(forward_backward))
        for name, opt in optimizers.items():
            times[name].append(timed(opt.step))
    median = {k: statistics.median(v) for k, v in times.items()}

    shapes = [tuple(p.shape) for n, p in model.named_parameters() if is_hidden_matrix(n, p.ndim)]
    flops = newton_schulz_flops(shapes, args.ns_steps)
    extra = {name: median[name] - median["adamw"] for name in optimizers if name != "adamw"}
    result = {
        "benchmark": "muon_step", "preset": args.preset, "layers": args.layers, "full_depth": full.num_hidden_layers,
        "parameters": config.num_params(), "hidden_matrices": len(shapes), "tokens_forward_backward": args.tokens,
        "rounds": args.rounds, "ns_steps": args.ns_steps, "torch_threads": torch.get_num_threads(),
        "amx": torch.cpu._is_amx_tile_supported(), "median_s": median, "all_s": times,
        "over_adamw_step": {name: median[name] / median["adamw"] for name in extra},
        "extra_s": extra,
        "newton_schulz_flops": flops,
        "newton_schulz_gflops_per_s": {name: flops / e / 1e9 if e > 0 else None for name, e in extra.items()},
        # what the extra costs at the preset's depth, in one process (the per-layer part scaled)
        "newton_schulz_flops_full_depth": flops * full.num_hidden_layers // args.layers,
        "extra_s_full_depth": {name: e * full.num_hidden_layers / args.layers for name, e in extra.items()},
        "command": command("muon_step", argv), "machine": machine(),
    }
    write_result(result, args.out)
    print(f"{args.preset} at {args.layers} of {full.num_hidden_layers} layers: forward+backward of {args.tokens} "
          f"tokens {median['forward_backward']:.3f} s, AdamW step {median['adamw']:.3f} s; Newton-Schulz "
          f"{flops:.3g} FLOPs; " + ", ".join(f"{name} step {median[name]:.3f} s ({median[name] / median['adamw']:.1f}x "
                                            f"AdamW's), {result['extra_s_full_depth'][name]:.1f} s extra at full depth"
                                            for name in extra))
    return result


if __name__ == "__main__":
    main()
