"""A prepared folder checked again, and a tokenizer trained on a sample of a spec's sources."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Iterator

from tinytrain.data import shards
from tinytrain.data.prep.pipeline import plan_units
from tinytrain.data.prep.readers import unit_documents
from tinytrain.data.prep.spec import PrepSpec, check_sources
from tinytrain.data.tokenizer import Tokenizer, train_tokenizer


def prepared_folders(path: Path) -> list[Path]:
    """The prepared folder itself, or the prepared folders directly inside it (a spec's out)."""
    path = Path(path)
    if (path / shards.MANIFEST).is_file() or not path.is_dir():
        return [path]
    found = sorted(p.parent for p in path.glob(f"*/{shards.MANIFEST}"))
    return found or [path]


def verify_folder(folder: Path) -> str:
    """Re-check every shard's checksum and token ids and the tokenizer; raise ShardError naming the file."""
    manifest = shards.read_manifest(folder)
    vocab = manifest["tokenizer"].get("vocab_size")
    tok_path = Path(folder) / shards.TOKENIZER
    if tok_path.is_file() and Tokenizer(tok_path).sha256 != manifest["tokenizer"].get("sha256"):
        raise shards.ShardError(f"{tok_path}: sha256 differs from the manifest's tokenizer: the file was replaced")
    summary = []
    for split, entries in manifest["splits"].items():
        if not entries:
            continue
        stream = shards.open_split(folder, split, vocab, None, verify="full")
        summary.append(f"{split} {len(entries)} shards, {len(stream):,} tokens")
    return f"{folder}: ok ({'; '.join(summary)})"


def sample_lines(spec: PrepSpec, documents: int) -> Iterator[str]:
    """Lines of about ``documents`` documents spread over every unit of every source."""
    for source in spec.sources:
        root, units = plan_units(source, spec.unit_bytes)
        per_unit = max(1, math.ceil(documents / len(spec.sources) / len(units)))
        for unit in units:
            docs = unit_documents(source, root, unit, False, [], lambda n: None)
            for _, text in itertools.islice(docs, per_unit):
                yield from (line for line in text.split("\n") if line.strip())


def train_spec_tokenizer(spec: PrepSpec, out: Path, vocab_size: int, documents: int, max_lines: int) -> Tokenizer:
    """Train a BPE tokenizer (byte fallback, Llama's special ids) on a sample of the spec's sources."""
    check_sources(spec)
    return train_tokenizer(sample_lines(spec, documents), out, vocab_size, sample_lines=max_lines)
