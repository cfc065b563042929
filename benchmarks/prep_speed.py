"""Data preparation throughput against raw sentencepiece encode speed, measured side by side.

The corpus is this Python's standard library source, one jsonl.zst line per file (the shape of
SlimPajama's files), split into ``--files`` files. The tokenizer is a 32,000-piece BPE trained on
it (Llama-2's size), or ``--tokenizer``. Each round, in rotating order:

- raw: ``SentencePieceProcessor.encode(text)`` over every document, one thread, texts already in
  memory (the ceiling of one core);
- pipeline with 1 worker and with ``--workers`` workers: `tinytrain.data.prep.prepare` end to end
  (read + decompress + parse + tokenize + write shards + checksums + manifest) into a new folder.

Writes JSON with medians, the pipeline/raw ratio per core, the scaling from 1 to N workers, and
the hours per billion tokens that the measured per-core rate gives on 8 to 128 cores.

    python -m benchmarks.prep_speed --out benchmarks/results/prep_speed.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import command, machine, write_result
from tinytrain.data.corpus import list_corpus_files, read_documents, stdlib_dir
from tinytrain.data.prep import PrepSpec, Source, prepare
from tinytrain.data.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(folder: Path, n_files: int, max_docs: int) -> list[str]:
    import zstandard

    docs = [text for _, text in read_documents(list_corpus_files(stdlib_dir()))][:max_docs]
    folder.mkdir(parents=True)
    per = -(-len(docs) // n_files)
    for i in range(n_files):
        lines = [json.dumps({"text": t, "meta": {"source": "stdlib"}}) for t in docs[i * per:(i + 1) * per]]
        data = ("\n".join(lines) + "\n").encode()
        (folder / f"chunk-{i:04d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    return docs


def time_raw(tok: Tokenizer, docs: list[str]) -> tuple[float, int]:
    encode = tok.processor.encode
    start = time.perf_counter()
    tokens = sum(len(encode(t)) for t in docs)
    return time.perf_counter() - start, tokens


def time_pipeline(corpus: Path, tok: Tokenizer, workers: int, work: Path) -> tuple[float, int]:
    out = work / f"out-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    # One file per unit, as with SlimPajama's ~60k chunk files on a few dozen cores.
    spec = PrepSpec(out=str(out), tokenizer=str(tok.path), workers=workers, val_fraction=0.01,
                    unit_bytes=1, sources=[Source(name="stdlib", path=str(corpus))])
    start = time.perf_counter()
    prepare(spec, show_progress=False)
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "stdlib" / "manifest.json").read_text())
    return seconds, sum(manifest["tokens"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--max_docs", type=int, default=100_000)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--tokenizer", help="an existing sentencepiece .model (default: train one on the corpus)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="prep_speed.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        docs = write_corpus(work / "corpus", args.files, args.max_docs)
        if args.tokenizer:
            tok = Tokenizer(args.tokenizer)
        else:
            lines = (line for t in docs for line in t.split("\n") if line.strip())
            tok = train_tokenizer(lines, work / "tok.model", args.vocab_size, sample_lines=200_000)
        input_bytes = sum(len(t.encode()) for t in docs)
        runs = {"raw": [], "pipeline_1": [], f"pipeline_{args.workers}": []}
        tokens = {}
        for r in range(args.rounds):
            order = list(runs)
            order = order[r % len(order):] + order[:r % len(order)]
            for name in order:
                if name == "raw":
                    seconds, n = time_raw(tok, docs)
                else:
                    seconds, n = time_pipeline(work / "corpus", tok, int(name.split("_")[1]), work)
                runs[name].append(seconds)
                tokens[name] = n
                print(f"round {r} {name}: {n / seconds:,.0f} tokens/s ({seconds:.2f} s)", flush=True)

    median = {k: statistics.median(v) for k, v in runs.items()}
    rate = {k: tokens[k] / median[k] for k in runs}
    per_core = rate["pipeline_1"]
    result = {
        "benchmark": "prep_speed",
        "corpus": f"{len(docs)} Python standard library files as jsonl.zst lines in {args.files} files, "
                  f"{input_bytes / 1e6:.1f} MB of text",
        "tokenizer": {"vocab_size": tok.vocab_size, "sha256": tok.sha256},
        "tokens": tokens,
        "seconds": runs,
        "median_seconds": median,
        "tokens_per_s": rate,
        "raw_encode_tokens_per_s_one_core": rate["raw"],
        "pipeline_tokens_per_s_per_core": {k: rate[k] / int(k.split("_")[1]) for k in runs if k != "raw"},
        "pipeline_over_raw_one_core": rate["pipeline_1"] / rate["raw"],
        f"scaling_1_to_{args.workers}_workers": rate[f"pipeline_{args.workers}"] / rate["pipeline_1"],
        "hours_per_billion_tokens_at_the_measured_per_core_rate": {
            str(n): 1e9 / (per_core * n) / 3600 for n in (8, 16, 32, 64, 128)},
        "bytes_per_token": input_bytes / tokens["raw"],
        "command": command("prep_speed"),
        "machine": machine(),
    }
    write_result(result, args.out)
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "pipeline_over_raw_one_core",
                                             f"scaling_1_to_{args.workers}_workers")}, indent=2))


if __name__ == "__main__":
    main()
