"""Time to quality of the laptop recipe: bits per byte of held-out standard-library source against
wall-clock time, from a cold cache, beside what zlib, bz2 and xz make of the same bytes.

Runs `tinytrain fit --config recipes/tiny.yaml` in a fresh folder with an empty cache (so the
tokenizer training and the tokenization are timed too), timestamps every validation line it prints,
then scores the final checkpoint on the held-out documents (the files the preparation held out, each
one document, every token predicted once) in bits per UTF-8 byte, and compresses the same bytes
(concatenated: the compressors get the benefit of one long stream). Or, with --run, scores a
finished run folder. Writes JSON.

    python -m benchmarks.tiny_quality --out benchmarks/results/tiny_quality-cpu2.json
"""

from __future__ import annotations

import argparse
import bz2
import lzma
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from benchmarks.common import command, machine, split_at_dashes, write_result
from tinytrain.data.corpus import list_corpus_files, read_documents, stdlib_dir
from tinytrain.data.prep import is_validation
from tinytrain.eval.tasks import bits_per_byte

ROOT = Path(__file__).resolve().parents[1]
VALIDATION = re.compile(r"step (\d+): val/loss ([0-9.]+) .*?, ([0-9.]+) bits per byte")


def held_out_texts(corpus: Path, val_fraction: float) -> list[str]:
    """The documents a preparation of ``corpus`` holds out for validation, as text."""
    return [text for path, text in read_documents(list_corpus_files(corpus))
            if is_validation(path.relative_to(corpus).as_posix(), val_fraction)]


def compressors(data: bytes) -> dict[str, float]:
    """Bits per byte of the best settings of zlib (-9), bz2 (-9) and xz (-9e)."""
    def rate(packed: bytes) -> float:
        return 8 * len(packed) / len(data)

    return {"zlib -9": rate(zlib.compress(data, 9)), "bz2 -9": rate(bz2.compress(data, 9)),
            "xz -9e": rate(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))}


def train(recipe: Path, work: Path, extra: list[str]) -> tuple[float, list[dict]]:
    """Wall seconds of `tinytrain fit` from a cold cache, and (seconds, step, val loss, bpb) of each validation."""
    env = {**os.environ, "TINYTRAIN_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tinytrain", "fit", "--config", str(recipe), *extra], cwd=work,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    timeline, tail = [], []
    for line in proc.stderr:
        tail = (tail + [line])[-60:]
        m = VALIDATION.search(line)
        if m:
            timeline.append({"seconds": round(time.perf_counter() - start, 1), "step": int(m.group(1)),
                             "val_loss": float(m.group(2)), "val_bpb": float(m.group(3))})
    if proc.wait():
        sys.stderr.write("".join(tail))
        raise SystemExit(f"tiny_quality: `tinytrain fit` failed with exit code {proc.returncode}")
    return time.perf_counter() - start, timeline


def main(argv=None) -> dict:
    argv, own, fit_args = split_at_dashes(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="tiny_quality.py [options] [-- tinytrain fit arguments]")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny.yaml"))
    parser.add_argument("--run", default=None, help="score this finished run folder instead of training")
    parser.add_argument("--corpus", default=None, help="the recipe's corpus (default: this Python's standard library)")
    parser.add_argument("--val_fraction", type=float, default=0.02, help="the recipe's data.val_fraction")
    parser.add_argument("--out", default="benchmarks/results/tiny_quality.json")
    parser.add_argument("--keep", default=None, help="train in this (new, empty) folder and keep it, to look at the run")
    args = parser.parse_args(own)

    import torch

    from tinytrain.store.checkpoint import load_checkpoint

    corpus = Path(args.corpus) if args.corpus else stdlib_dir()
    texts = held_out_texts(corpus, args.val_fraction)
    data = "".join(texts).encode("utf-8")
    if args.keep and Path(args.keep).exists() and any(Path(args.keep).iterdir()):
        raise SystemExit(f"tiny_quality: error: --keep {args.keep} is not empty; a cold-cache run needs an empty folder")
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        wall, timeline = None, []
        run = Path(args.run) if args.run else None
        if run is None:
            wall, timeline = train(Path(args.recipe).resolve(), Path(tmp), fit_args)
            run = Path(tmp) / "runs" / "tiny"
        model, tok = load_checkpoint(run)
        with torch.no_grad():
            score = bits_per_byte(model, tok, texts)
    result = {
        "benchmark": "tiny_quality", "recipe": args.recipe, "fit_arguments": fit_args, "run": args.run,
        "wall_s_cold_cache": round(wall, 1) if wall is not None else None,
        "validation_timeline": timeline,
        "held_out": {"documents": len(texts), "bytes": len(data), "val_fraction": args.val_fraction,
                     "corpus": str(corpus)},
        "model": score, "bits_per_byte": score["bits_per_byte"], "compressors_bits_per_byte": compressors(data),
        "command": command("tiny_quality", argv), "machine": machine(),
    }
    write_result(result, args.out)
    print(f"{result['bits_per_byte']:.3f} bits per byte of {len(data):,} held-out bytes"
          + (f" after {wall:.0f} s from a cold cache" if wall else "") + "; "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["compressors_bits_per_byte"].items()))
    return result


if __name__ == "__main__":
    main()
