"""Generation tokens/s on CPU, with and without the KV cache, for short and long prompts.

With the cache, each new token costs the same whatever the prompt length; without it, the whole
sequence is recomputed per token. Writes JSON.

    python benchmarks/generate_speed.py --preset tiny --out benchmarks/results/generate_speed-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinytrain.generate import generate  # noqa: E402
from tinytrain.model import Llama, LlamaConfig  # noqa: E402


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
              "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "python": platform.python_version()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    return result


if __name__ == "__main__":
    main()
