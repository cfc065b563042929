"""Do the speed switches change the math? Loss curves of the plain and the fast settings, side by side.

Every run starts from the same weights (drawn once, loaded into each) and reads the same batches
of a prepared data folder in the same order, for --steps optimizer steps with a short warm-up to
--lr. Runs:
  plain      throughput.py's defaults (SDPA, eager, plain cross-entropy, for-each AdamW)
  fast       the switches given with --fast
  reference  (with --reference) the plain settings in fp32, micro-batches of --reference_micro_batch:
             how far bf16 alone moves the curve, the yardstick for "within bf16 noise"
After training, each run's loss on --val_batches validation batches. Writes JSON with every
curve and the differences, and prints a summary.

    python -m benchmarks.loss_parity --data DIR --preset tinyllama-1.1b --micro_batch 8 --accum 2 \\
        --fast "--fsdp --compile --compile_loss --fused_adamw on" --reference --reference_micro_batch 2 \\
        --out benchmarks/results/loss_parity-h100.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import command, machine, write_result
from benchmarks.throughput import Runner, add_switches
from tinytrain.data.datamodule import TokenData
from tinytrain.data.order import ValBatches
from tinytrain.model.llama import Llama, LlamaConfig


def train(name: str, args, weights: dict, batches: list[torch.Tensor], val: list[torch.Tensor]) -> dict:
    start = time.perf_counter()
    runner = Runner(args, weights=weights)
    losses = []
    for batch in batches:
        if args.micro_batch != batch.size(1):  # same sequences, cut into other micro-batches
            batch = batch.reshape(-1, args.micro_batch, batch.size(-1))
        losses.append(runner.step(batch.to(runner.device))[0])
    model = runner.model
    model.eval()
    with torch.no_grad(), runner.autocast:
        val_losses = [model(b[:, :-1].to(runner.device).long(), b[:, 1:].to(runner.device).long()).item() for b in val]
    result = {"name": name, "precision": runner.precision, "micro_batch": args.micro_batch,
              "attention": runner.attention_used(), "losses": losses, "val_loss": sum(val_losses) / len(val_losses),
              "seconds": round(time.perf_counter() - start, 1)}
    print(f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, val {result['val_loss']:.4f} "
          f"({result['seconds']} s)", flush=True)
    del runner, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def compare(a: dict, b: dict, tail: int = 10) -> dict:
    diffs = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
    return {"max_abs_diff": max(diffs), f"mean_abs_diff_last_{tail}": sum(diffs[-tail:]) / len(diffs[-tail:]),
            "final_diff": b["losses"][-1] - a["losses"][-1], "val_diff": b["val_loss"] - a["val_loss"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_switches(parser)
    parser.set_defaults(lr=4e-4, warmup_steps=10)
    parser.add_argument("--data", required=True, help="a prepared folder (tinytrain prepare)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--fast", default="--compile --compile_loss --fused_adamw on",
                        help="the switches of the fast run, as throughput.py flags")
    parser.add_argument("--reference", action="store_true", help="also run the plain settings in fp32")
    parser.add_argument("--reference_micro_batch", type=int, default=None)
    parser.add_argument("--val_batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/loss_parity.json")
    args = parser.parse_args(argv)

    config = LlamaConfig.from_name(args.preset)
    seq = args.seq or config.max_position_embeddings
    data = TokenData(path=args.data, vocab_size=config.vocab_size, seq_len=seq,
                     global_batch_size=args.micro_batch * args.accum, micro_batch_size=args.micro_batch,
                     seed=args.seed, val_batches=args.val_batches)
    data.open()
    batches = list(data.train_dataset(0, args.steps))
    val = list(ValBatches(data.val_sets[0], data.val_batches_per_source[0], args.micro_batch, rank=0, world_size=1))

    torch.manual_seed(args.seed)
    weights = Llama(config).state_dict()  # fp32, on CPU, drawn once

    runs = {"plain": train("plain", args, weights, batches, val)}
    fast_args = parser.parse_args([*(argv if argv is not None else sys.argv[1:]), *shlex.split(args.fast)])
    runs["fast"] = train("fast", fast_args, weights, batches, val)
    if args.reference:
        ref_args = copy.copy(args)
        ref_args.precision = "32-true"
        ref_args.micro_batch = args.reference_micro_batch or args.micro_batch
        runs["reference"] = train("reference", ref_args, weights, batches, val)

    result = {"benchmark": "loss_parity", "preset": args.preset, "seq_len": seq, "steps": args.steps,
              "tokens_per_step": args.micro_batch * args.accum * seq, "lr": args.lr, "warmup_steps": args.warmup_steps,
              "data": str(Path(args.data).resolve()), "fast_switches": args.fast, "runs": runs,
              "fast_vs_plain": compare(runs["plain"], runs["fast"])}
    if args.reference:
        result["plain_vs_reference"] = compare(runs["reference"], runs["plain"])
        result["fast_vs_reference"] = compare(runs["reference"], runs["fast"])
        # bf16 noise = how far the plain bf16 run is from fp32; the fast run may stray twice that
        # (or 0.01 nats, whichever is larger) on the last ten steps and on validation.
        key = "mean_abs_diff_last_10"
        noise_tail = max(2 * result["plain_vs_reference"][key], 0.01)
        noise_val = max(2 * abs(result["plain_vs_reference"]["val_diff"]), 0.01)
        result["within_bf16_noise"] = (result["fast_vs_reference"][key] <= noise_tail
                                       and abs(result["fast_vs_reference"]["val_diff"]) <= noise_val)
        result["within_bf16_noise_rule"] = ("fast vs fp32 <= max(2 x (plain bf16 vs fp32), 0.01), on the mean "
                                            "absolute loss difference of the last 10 steps and on validation loss")
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result["command"] = command("loss_parity", argv)
    result["machine"] = machine()
    write_result(result, args.out)
    for key in ("fast_vs_plain", "plain_vs_reference", "fast_vs_reference"):
        if key in result:
            print(key, json.dumps({k: round(v, 5) for k, v in result[key].items()}))
    if "within_bf16_noise" in result:
        print("within bf16 noise:", result["within_bf16_noise"])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
