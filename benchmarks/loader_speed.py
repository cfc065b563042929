"""Tokens per second that one rank's loader delivers from prepared shards, with a two-source mixture.

Writes two prepared folders of random token ids (by default 96 Mi and 48 Mi tokens, in 16 Mi-token
shards), then reads TinyLlama's shape of batches through ``TrainSteps``: weights 0.693584 /
0.306416, global batch 1024 x 2048, rank 0 of 8 (128 sequences of 2049 tokens per step), from
steps 0, 10^6 and 10^9. Rounds alternate; the figure is the median over steps after the first
(the first pays page faults). Compared with the ~70k tokens/s an H100 trains the 1.1B model at.

    python -m benchmarks.loader_speed --out benchmarks/results/loader_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import command, machine, write_result
from tinytrain.data import shards
from tinytrain.data.order import Blocks, SampleOrder, TrainSteps

ROOT = Path(__file__).resolve().parents[1]

GPU_TOKENS_PER_S = 70_000  # the 1.1B model on one H100, the consumer this loader must outrun


def write_source(folder: Path, tokens: int, shard_tokens: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    writer = shards.ShardWriter(folder, "train", np.dtype(np.uint16), shard_tokens)
    left = tokens
    while left:
        n = min(left, 1 << 22)
        writer.add_document(rng.integers(3, 32000, n, dtype=np.int64))
        left -= n
    train = writer.close()
    val = shards.ShardWriter(folder, "val", np.dtype(np.uint16), shard_tokens)
    val.add_document(rng.integers(3, 32000, 1 << 16, dtype=np.int64))
    shards.write_manifest(folder, np.dtype(np.uint16), {"train": train, "val": val.close()},
                          {"sha256": "random", "vocab_size": 32000}, {"bos": False}, {"train": 1, "val": 1})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs=2, default=[96 << 20, 48 << 20])
    parser.add_argument("--shard_tokens", type=int, default=16 << 20)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--global_batch", type=int, default=1024)
    parser.add_argument("--world_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="loader_speed.json")
    args = parser.parse_args()

    starts = [0, 10**6, 10**9]
    with tempfile.TemporaryDirectory() as tmp:
        folders = [Path(tmp) / "slimpajama", Path(tmp) / "starcoder"]
        for i, (folder, n) in enumerate(zip(folders, args.tokens)):
            write_source(folder, n, args.shard_tokens, i)
        blocks = [Blocks(shards.open_split(f, "train", 32000), args.seq_len) for f in folders]
        order = SampleOrder(blocks, seed=3407, weights=[0.693584, 0.306416])
        per_step = args.global_batch // args.world_size * args.seq_len  # trained tokens per step and rank
        times = {s: [] for s in starts}
        for r in range(args.rounds):
            for start in starts[r % 3:] + starts[:r % 3]:
                steps = TrainSteps(order, args.global_batch, 8, 0, args.world_size, start, start + args.steps)
                t = time.perf_counter()
                for batch in steps:
                    now = time.perf_counter()
                    times[start].append(now - t)
                    t = now
                assert batch.shape == (args.global_batch // args.world_size // 8, 8, args.seq_len + 1)
                times[start].pop(0 - args.steps)  # the first step of each pass pays page faults

    med = {s: statistics.median(v) for s, v in times.items()}
    rate = {str(s): per_step / med[s] for s in starts}
    overall = per_step / statistics.median([x for v in times.values() for x in v])
    result = {
        "benchmark": "loader_speed",
        "sources_tokens": dict(zip(["slimpajama", "starcoder"], args.tokens)),
        "weights": [0.693584, 0.306416],
        "shape": {"seq_len": args.seq_len, "global_batch": args.global_batch, "world_size": args.world_size,
                  "sequences_per_step_per_rank": args.global_batch // args.world_size},
        "median_step_s": {str(s): med[s] for s in starts},
        "tokens_per_s_by_start_step": rate,
        "tokens_per_s": overall,
        "over_h100_consumption": overall / GPU_TOKENS_PER_S,
        "command": command("loader_speed"),
        "machine": machine(),
    }
    write_result(result, args.out)
    print(json.dumps({k: result[k] for k in ("tokens_per_s_by_start_step", "tokens_per_s", "over_h100_consumption")},
                     indent=2))


if __name__ == "__main__":
    main()
