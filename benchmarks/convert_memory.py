"""Peak memory and time of `tinytrain convert` on a TinyLlama-1.1B-shaped checkpoint.

Writes a Hugging Face folder of random 1.1B weights (made tensor by tensor), then times
`convert from-hf` and `convert to-hf` (as stored, and widened to float32), each in a fresh
process whose own peak RSS is recorded. Conversion streams tensors, so the peak should stay near
one copy of the weights or below. Writes JSON.

    python -m benchmarks.convert_memory --out benchmarks/results/convert_memory.json [--preset tinyllama-1.1b]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import HF_LLAMA, command, machine, write_result
from tinytrain.data.tokenizer import train_tokenizer
from tinytrain.model.llama import LlamaConfig
from tinytrain.store import hf

ROOT = Path(__file__).resolve().parents[1]

# Runs one command and prints its peak RSS in KiB (ru_maxrss of the only child).
_MEASURE = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def measured(*args) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "tinytrain", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_bytes": int(proc.stdout.strip().splitlines()[-1]) * 1024}


def folder_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in path.glob(f"*{suffix}"))


def make_hf_folder(folder: Path, config: LlamaConfig, dtype: torch.dtype) -> None:
    folder.mkdir(parents=True)
    shapes = {hf.to_hf_name(k): v for k, v in config.parameter_shapes().items()}
    gen = torch.Generator().manual_seed(0)
    stream = ((name, torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype))
              for name, shape in shapes.items())
    hf.write_safetensors(folder / hf.WEIGHTS, stream, shapes, dtype)
    (folder / "config.json").write_text(json.dumps(hf.config_to_hf(config, dtype)))
    lines = [f"sample line {i} with words alpha beta gamma {i % 97}" for i in range(20000)]
    train_tokenizer(lines, folder / "tokenizer.model", 1000)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tinyllama-1.1b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default="benchmarks/results/convert_memory.json")
    args = parser.parse_args(argv)

    config = LlamaConfig.from_name(args.preset, **HF_LLAMA)
    dtype = getattr(torch, args.dtype)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tt-convert-"))
    try:
        start = time.perf_counter()
        make_hf_folder(work / "hf", config, dtype)
        made_s = time.perf_counter() - start
        weights = folder_bytes(work / "hf")
        results = {
            "from_hf": measured("convert", "from-hf", work / "hf", work / "tt"),
            "to_hf": measured("convert", "to-hf", work / "tt", work / "hf-out"),
            "to_hf_float32": measured("convert", "to-hf", work / "tt", work / "hf-out32", "--dtype", "float32"),
        }
        sizes = {"hf": weights, "to_hf": folder_bytes(work / "hf-out"), "to_hf_float32": folder_bytes(work / "hf-out32")}
        exact = torch.equal(_first_tensor(work / "hf" / hf.WEIGHTS), _first_tensor(work / "hf-out" / hf.WEIGHTS))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    # A python process with torch imported, doing nothing: the floor under every figure.
    baseline = measured("--help")
    for r in results.values():
        r["peak_rss_over_weights"] = round(r["peak_rss_bytes"] / weights, 3)
        r["peak_rss_above_baseline_over_weights"] = round(
            (r["peak_rss_bytes"] - baseline["peak_rss_bytes"]) / weights, 3)
    result = {
        "benchmark": "convert_memory",
        "preset": args.preset,
        "params": config.num_params(),
        "dtype": args.dtype,
        "weights_bytes": weights,
        "output_bytes": sizes,
        "make_input_seconds": round(made_s, 1),
        "process_baseline_rss_bytes": baseline["peak_rss_bytes"],
        "conversions": results,
        "round_trip_first_tensor_equal": exact,
        "command": command("convert_memory", argv),
        "machine": machine(),
    }
    write_result(result, args.out)
    print(json.dumps(result, indent=2))
    return result


def _first_tensor(path: Path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("model.embed_tokens.weight")


if __name__ == "__main__":
    main()
