"""Time to quality of the laptop recipe: bits per byte of held-out standard-library source against
wall-clock time, from a cold cache, beside what general-purpose compressors make of the same bytes.

Runs `tinytrain fit --config recipes/tiny.yaml` in a fresh folder with an empty cache (so the
tokenizer training and the tokenization are timed too), timestamps every validation line it prints,
then scores the final checkpoint on the held-out documents (the files the preparation held out, each
one document, every token predicted once) in bits per UTF-8 byte: as trained, and adapting as it
reads (dynamic evaluation: an SGD step on each window once it is scored, the way a compressor's model
learns from the bytes it has coded). Or, with --run, scores a finished run folder. Writes JSON.

The compressors get the held-out bytes concatenated (one long stream), twice: alone, and having
read the training split first (compressed size of training split + held-out minus that of the
training split alone: what they make of the held-out bytes knowing the data the model learnt from).
xz comes from Python's lzma; `zstd -19 --long` and `zpaq -m5` (a context-mixing archiver) from the
programs of those names, recorded as null when they are not installed.

    python -m benchmarks.tiny_quality --out benchmarks/results/tiny_quality-cpu2.json
"""

from __future__ import annotations

import argparse
import bz2
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Optional

from benchmarks.common import command, machine, split_at_dashes, write_result
from tinytrain.data.corpus import list_corpus_files, read_documents, stdlib_dir
from tinytrain.data.prep import is_validation
from tinytrain.eval.tasks import adaptive_bits_per_byte, bits_per_byte

ROOT = Path(__file__).resolve().parents[1]
# Dynamic evaluation's SGD learning rate and window stride (a step every ADAPT_STRIDE tokens), chosen on
# other Python source than the held-out files (lightning's trainer package), never on the held-out files
# themselves (README, "What the tiny run does").
ADAPT_LR, ADAPT_STRIDE = 0.5, 32
VALIDATION = re.compile(r"step (\d+): val/loss ([0-9.]+) .*?, ([0-9.]+) bits per byte")


def held_out_texts(corpus: Path, val_fraction: float) -> list[str]:
    """The documents a preparation of ``corpus`` holds out for validation, as text."""
    return [text for path, text in read_documents(list_corpus_files(corpus))
            if is_validation(path.relative_to(corpus).as_posix(), val_fraction)]


def training_texts(corpus: Path, val_fraction: float) -> list[str]:
    """The documents a preparation of ``corpus`` trains on (all but the held-out ones), as text."""
    return [text for path, text in read_documents(list_corpus_files(corpus))
            if not is_validation(path.relative_to(corpus).as_posix(), val_fraction)]


def _xz(data: bytes) -> int:
    return len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def _zstd(data: bytes) -> Optional[int]:
    if shutil.which("zstd") is None:
        return None
    # --long: a 128 MiB window, so the held-out bytes can refer back to the whole training split
    # (level 19 alone keeps 8 MiB).
    out = subprocess.run(["zstd", "-19", "--long=27", "-q", "-c"], input=data, capture_output=True, check=True)
    return len(out.stdout)


def _zpaq(data: bytes) -> Optional[int]:
    if shutil.which("zpaq") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "data").write_bytes(data)
        subprocess.run(["zpaq", "a", "archive.zpaq", "data", "-m5"], cwd=tmp, capture_output=True, check=True)
        return (Path(tmp) / "archive.zpaq").stat().st_size


def compressors(data: bytes, training: Optional[bytes] = None) -> dict[str, Optional[float]]:
    """Bits per held-out byte of each compressor at its strongest setting: on ``data`` alone, and
    (`<name>, after the training split`) as the extra size ``data`` adds after ``training``. None
    where the program is not installed."""
    def rate(size: Optional[int]) -> Optional[float]:
        return None if size is None else round(8 * size / len(data), 4)

    out = {"zlib -9": rate(len(zlib.compress(data, 9))), "bz2 -9": rate(len(bz2.compress(data, 9)))}
    for name, size in (("xz -9e", _xz), ("zstd -19 --long", _zstd), ("zpaq -m5", _zpaq)):
        out[name] = rate(size(data))
        if training:
            alone, both = size(training), size(training + data)
            out[f"{name}, after the training split"] = None if alone is None else rate(both - alone)
    return out


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
    parser.add_argument("--adapt", type=float, default=ADAPT_LR,
                        help="also score the held-out files adapting as it reads (evaluate --text --adapt) at this "
                             "learning rate; 0: not")
    parser.add_argument("--adapt_stride", type=int, default=ADAPT_STRIDE,
                        help="the sliding window's stride when adapting (one step per stride)")
    parser.add_argument("--keep", default=None, help="train in this (new, empty) folder and keep it, to look at the run")
    args = parser.parse_args(own)

    import json

    import torch

    from tinytrain.store.checkpoint import load_checkpoint, resolve_checkpoint
    from tinytrain.store.layout import META

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
            runs = [p for p in (Path(tmp) / "runs").iterdir() if p.is_dir()]
            if len(runs) != 1:
                raise SystemExit(f"tiny_quality: error: expected one run folder under {Path(tmp) / 'runs'}, found "
                                 f"{sorted(p.name for p in runs)}")
            run = runs[0]
        meta = json.loads((resolve_checkpoint(run) / META).read_text())
        model, tok = load_checkpoint(run)
        started = time.perf_counter()
        score = bits_per_byte(model, tok, texts)
        score["seconds"] = round(time.perf_counter() - started, 1)
        adaptive = None
        if args.adapt:
            started = time.perf_counter()
            adaptive = adaptive_bits_per_byte(model, tok, texts, args.adapt, args.adapt_stride)
            adaptive["seconds"] = round(time.perf_counter() - started, 1)
    training = "".join(training_texts(corpus, args.val_fraction)).encode("utf-8")
    result = {
        "benchmark": "tiny_quality", "recipe": args.recipe, "fit_arguments": fit_args, "run": args.run,
        # what a reader compares first: the CPU's bf16 units, the precision trained in, the time, the score
        "amx": torch.cpu._is_amx_tile_supported(), "precision": meta.get("precision"),
        "wall_seconds": round(wall, 1) if wall is not None else None,
        "bits_per_byte": score["bits_per_byte"],
        # the same model scoring the same bytes while it learns from them as it reads, as the compressors do
        "bits_per_byte_adapting": adaptive["bits_per_byte"] if adaptive else None,
        "compressors": compressors(data, training),
        "validation_timeline": timeline,
        "held_out": {"documents": len(texts), "bytes": len(data), "val_fraction": args.val_fraction,
                     "corpus": str(corpus), "training_split_bytes": len(training)},
        "model": score, "adapting": adaptive, "steps": meta.get("step"), "tokens": meta.get("tokens"),
        "command": command("tiny_quality", argv), "machine": machine(),
    }
    write_result(result, args.out)
    print(f"{result['bits_per_byte']:.3f} bits per byte of {len(data):,} held-out bytes"
          + (f" after {wall:.0f} s from a cold cache" if wall else "")
          + (f", {adaptive['bits_per_byte']:.3f} adapting as it reads" if adaptive else "") + "; "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["compressors"].items() if v is not None))
    return result


if __name__ == "__main__":
    main()
