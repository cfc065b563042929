"""What `tinytrain prepare --config` reads: a spec of sources, and the rules it implies."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tinytrain.data import shards
from tinytrain.errors import TinyTrainError

PREP_VERSION = 2  # bump when the output for the same input and settings changes


class PrepError(TinyTrainError, ValueError):
    """A spec, an input or an output folder that preparation cannot go on with."""


# --- the spec ---------------------------------------------------------------------------------


@dataclass
class Filter:
    """Keep or drop documents by the value of one field."""

    field: str
    """Dotted path of the field in each record, e.g. meta.redpajama_set_name."""
    drop: list[str] = field(default_factory=list)
    """Drop documents whose value is one of these."""
    keep: list[str] = field(default_factory=list)
    """When not empty, keep only documents whose value is one of these."""

    def passes(self, record: dict) -> bool:
        value = lookup(record, self.field)
        value = None if value is None else str(value)
        return value not in self.drop and (not self.keep or value in self.keep)


@dataclass
class Source:
    """One corpus; it becomes the prepared folder <out>/<name>."""

    name: str
    """Folder name of the prepared source (letters, digits, '.', '_', '-')."""
    path: Optional[str] = None
    """A local file, folder (searched recursively) or glob of jsonl[.zst|.gz], parquet or txt files."""
    hub: Optional[str] = None
    """Instead of path: a dataset name on the Hugging Face Hub (or a local dataset folder), streamed."""
    hub_config: Optional[str] = None
    """The hub dataset's configuration name, if it has several."""
    split: str = "train"
    """The hub dataset's split to read."""
    text_field: str = "text"
    """Dotted path of the document text in each record (e.g. content for StarCoderData)."""
    text_suffixes: list[str] = field(default_factory=lambda: [".txt"])
    """Files with these endings are read whole, one document each (e.g. [.py, .md] for code)."""
    exclude_dirs: list[str] = field(default_factory=list)
    """Folders of these names, anywhere under path, are left out (e.g. [tests, __pycache__])."""
    filters: list[Filter] = field(default_factory=list)
    """Every filter must pass for a document to be kept."""
    val_fraction: Optional[float] = None
    """Share of documents held out for validation (default: the spec's val_fraction)."""
    min_tokens: int = 0
    """Leave out documents of fewer tokens (BOS and EOS included), e.g. 8192 for long-context
    training; the manifest's report counts them as too_short. 0 keeps all."""


@dataclass
class PrepSpec:
    """What `tinytrain prepare --config` reads; every key can be overridden on the command line."""

    out: str
    """Folder that receives one prepared folder per source."""
    tokenizer: str
    """The sentencepiece .model to tokenize with (e.g. Llama-2's tokenizer.model)."""
    sources: list[Source]
    """The corpora to prepare."""
    workers: int = 1
    """Worker processes; the output is identical for any number."""
    bos: bool = True
    """Put BOS in front of every document (TinyLlama's published convention)."""
    eos: bool = False
    """Put EOS after every document."""
    val_fraction: float = 0.001
    """Share of each source's documents held out for validation, chosen by a hash of (file, line)."""
    shard_tokens: int = shards.SHARD_TOKENS
    """Largest shard, in tokens (64 Mi tokens = 128 MiB at uint16)."""
    unit_bytes: int = 1 << 28
    """Input bytes per unit of work: consecutive files are grouped up to this size."""
    strict: bool = False
    """Stop at the first malformed record instead of counting and skipping it."""


def lookup(record: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def check_sources(spec: PrepSpec) -> None:
    if not spec.sources:
        raise PrepError("the spec lists no sources")
    names = [s.name for s in spec.sources]
    if len(set(names)) != len(names):
        raise PrepError(f"source names must be distinct, got {names}")
    for s in spec.sources:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.name) or s.name in (".", ".."):
            raise PrepError(f"source name {s.name!r}: use letters, digits, '.', '_' or '-' (it names a folder)")
        if (s.path is None) == (s.hub is None):
            raise PrepError(f"source {s.name!r}: give exactly one of 'path' (local files) or 'hub' (a dataset name)")
        if s.min_tokens < 0:
            raise PrepError(f"source {s.name!r}: min_tokens must be >= 0, got {s.min_tokens}")
        frac = spec.val_fraction if s.val_fraction is None else s.val_fraction
        if not 0 <= frac < 1:
            raise PrepError(f"source {s.name!r}: val_fraction must be in [0, 1), got {frac}")


def check_spec(spec: PrepSpec) -> None:
    check_sources(spec)
    for key in ("workers", "shard_tokens", "unit_bytes"):
        if getattr(spec, key) <= 0:
            raise PrepError(f"{key} must be positive, got {getattr(spec, key)}")
    if not Path(spec.tokenizer).expanduser().is_file():
        raise PrepError(f"tokenizer {spec.tokenizer}: file not found (expected a sentencepiece .model)")




def is_validation(key: str, val_fraction: float) -> bool:
    """Whether a document is held out: a hash of its key ("file\\0line" for a record, the file's
    path for a whole-file document), so the choice depends neither on the order of reading nor on
    the number of workers."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "little") / 2**64
    return bucket < val_fraction
