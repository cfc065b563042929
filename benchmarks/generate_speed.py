"""Generation tokens/s on CPU, with and without the KV cache, for short and long prompts.

With the cache, each new token costs the same whatever the prompt length; without it, the whole
sequence is recomputed per token. Writes JSON.

    python -m benchmarks.generate_speed --preset tiny --out benchmarks/results/generate_speed-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import command, machine, write_result
from tinytrain.model.llama import Llama, LlamaConfig
from tinytrain.model.sampling import generate


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 160])
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/generate_speed.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = LlamaConfig.from_name(args.preset)
    model = Llama(config).eval()
    rows = []
    for prompt_len in args.prompts:
        prompt = torch.randint(3, config.vocab_size, (1, prompt_len))
        row = {"prompt_tokens": prompt_len, "new_tokens": args.new_tokens}
        for use_cache in (True, False):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                generate(model, prompt, args.new_tokens, temperature=0.0, use_cache=use_cache)
                times.append(time.perf_counter() - start)
            row["tokens_per_s_" + ("cache" if use_cache else "no_cache")] = args.new_tokens / statistics.median(times)
        row["speedup"] = row["tokens_per_s_cache"] / row["tokens_per_s_no_cache"]
        rows.append(row)
    result = {"benchmark": "generate_speed", "preset": args.preset, "params": config.num_params(), "rows": rows,
              "command": command("generate_speed", argv), "machine": machine()}
    write_result(result, args.out)
    print(json.dumps(rows, indent=2))
    return result


if __name__ == "__main__":
    main()
