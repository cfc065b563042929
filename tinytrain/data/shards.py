"""Token shards: the one module that writes and reads them.

A shard is a flat file of token ids behind a 32-byte header:

    offset  size  field
    0       8     magic b"TTSHARD\\0"
    8       4     format version (little-endian uint32), currently 1
    12      4     bytes per token: 2 (uint16) or 4 (uint32)
    16      8     number of tokens (uint64)
    24      8     reserved, zero

A prepared folder holds the shards of each split and ``manifest.json``, which lists every
file with its token count, largest token id and sha256, plus the tokenizer's sha256 and the
document convention (BOS before each document by default). Shards never contain padding.

Readers memory-map the files. ``open_dataset`` checks everything that is cheap to check
(headers, sizes, counts, largest id against the model's vocab, the tokenizer hash) before any
training starts, and with ``verify="full"`` also the checksums and every token id.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tinytrain.errors import ConfigError, TinyTrainError

MAGIC = b"TTSHARD\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")  # 32 bytes
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"  # beside the manifest: the tokenizer the shards were made with
MANIFEST_FORMAT = "tinytrain-shards"
MANIFEST_VERSION = 1
SHARD_TOKENS = 1 << 26  # the largest shard, in tokens: 128 MiB at uint16


class ShardError(TinyTrainError, ValueError):
    """A prepared data folder or one of its files is not what the trainer expects."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_shard(path: Path, tokens: np.ndarray, dtype: np.dtype) -> dict:
    """Write one shard atomically (temp file, fsync, rename); return its manifest entry."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise ShardError(f"{path}: token ids outside the range of {dtype}")
    data = tokens.astype(dtype, copy=False).tobytes()
    header = HEADER.pack(MAGIC, VERSION, dtype.itemsize, tokens.size)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a full disk must not leave half a shard behind
        if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file: name the shard
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    digest = hashlib.sha256(header)
    digest.update(data)
    return {
        "file": path.name,
        "tokens": int(tokens.size),
        "max_token_id": int(tokens.max()) if tokens.size else -1,
        "sha256": digest.hexdigest(),
    }


def read_header(path: Path) -> tuple[np.dtype, int]:
    """(dtype, token count) of a shard, checking magic, version and file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e.strerror})") from e
    if len(raw) < HEADER.size:
        raise ShardError(f"{path}: truncated shard: {size} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, itemsize, count = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ShardError(
            f"{path}: not a tinytrain shard (magic {magic!r}, expected {MAGIC!r}); "
            "prepare the corpus with `tinytrain prepare`"
        )
    if version != VERSION:
        raise ShardError(f"{path}: shard format version {version}, this tinytrain reads version {VERSION}")
    if itemsize not in (2, 4):
        raise ShardError(f"{path}: {itemsize} bytes per token in the header, expected 2 or 4")
    expected = HEADER.size + count * itemsize
    if size != expected:
        raise ShardError(
            f"{path}: truncated or padded shard: header says {count} tokens ({expected} bytes), file has {size} bytes"
        )
    return np.dtype(np.uint16 if itemsize == 2 else np.uint32), count


def open_shard(path: Path) -> np.ndarray:
    dtype, count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))


class ShardWriter:
    """Append token ids; cut shards of ``shard_tokens`` tokens; write the manifest at the end.

    Files go to ``<folder>/<prefix>-<NNNNN>.bin`` (the prefix is the split, or the split and a unit
    of work). Nothing is visible as a complete folder until ``write_manifest``: readers refuse a
    folder without one.
    """

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype, shard_tokens: int = SHARD_TOKENS) -> None:
        self.folder, self.prefix, self.dtype, self.shard_tokens = Path(folder), prefix, np.dtype(dtype), shard_tokens
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict] = []
        self.documents = 0
        self._pending: list[np.ndarray] = []
        self._pending_count = 0

    def add_document(self, ids: Sequence[int]) -> None:
        self.add(np.asarray(ids, dtype=np.int64), documents=1)

    def add(self, tokens: np.ndarray, documents: int = 0) -> None:
        """Append the concatenated tokens of ``documents`` documents."""
        self.documents += documents
        if not tokens.size:
            return
        self._pending.append(tokens)
        self._pending_count += tokens.size
        while self._pending_count >= self.shard_tokens:
            flat = np.concatenate(self._pending)
            self._flush(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens :]
            self._pending, self._pending_count = [rest], rest.size

    def close(self) -> list[dict]:
        if self._pending_count:
            self._flush(np.concatenate(self._pending))
        self._pending, self._pending_count = [], 0
        return self.entries

    def _flush(self, tokens: np.ndarray) -> None:
        path = self.folder / f"{self.prefix}-{len(self.entries):05d}.bin"
        self.entries.append(write_shard(path, tokens, self.dtype))


def write_manifest(
    folder: Path, dtype: np.dtype, splits: dict[str, list[dict]], tokenizer: dict, settings: dict, documents: dict,
    extra: Optional[dict] = None,
) -> Path:
    """Write manifest.json atomically; ``extra`` adds keys (token counts, a per-file report, ...)."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "dtype": np.dtype(dtype).name,
        "tokenizer": tokenizer,
        "settings": settings,
        "documents": documents,
        "tokens": {split: sum(e["tokens"] for e in entries) for split, entries in splits.items()},
        **(extra or {}),
        "splits": splits,
    }
    path = Path(folder) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ShardError(f"{folder}: prepared data folder does not exist")
    if not path.is_file():
        raise ShardError(f"{path}: missing; {folder} is not a prepared data folder (or its preparation did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ShardError(f"{path}: 'format' is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ShardError(f"{path}: manifest version {manifest.get('version')!r}, this tinytrain reads {MANIFEST_VERSION}")
    for key in ("splits", "tokenizer"):
        if key not in manifest:
            raise ShardError(f"{path}: missing key {key!r}")
    return manifest


def split_fingerprint(folder: Path, split: str) -> str:
    """A short hash of a split's shards (names, token counts, checksums): which tokens, not where they live."""
    entries = read_manifest(folder)["splits"].get(split, [])
    digest = hashlib.sha256(json.dumps([[e["file"], e["tokens"], e["sha256"]] for e in entries]).encode())
    return digest.hexdigest()[:16]


class TokenStream:
    """The concatenated tokens of one split, over shards opened (memory-mapped) on first use.

    At most ``max_open`` shards stay mapped (least recently used closed first), so a split of tens
    of thousands of shards never runs out of file descriptors; the open maps are not pickled, so a
    DataLoader worker started by spawn opens its own instead of copying data.
    """

    def __init__(self, files: Sequence[Path], counts: Sequence[int], max_open: int = 128) -> None:
        self.files = [Path(f) for f in files]
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])  # shard start offsets
        self.max_open = max_open
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}

    def shard(self, i: int) -> np.ndarray:
        tokens = self._open.get(i)
        if tokens is None:
            tokens = open_shard(self.files[i])
            if tokens.size != self.starts[i + 1] - self.starts[i]:
                raise ShardError(f"{self.files[i]}: changed since it was opened "
                                 f"({tokens.size} tokens, expected {self.starts[i + 1] - self.starts[i]})")
            self._open[i] = tokens
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(i)
        return tokens

    def file_at(self, position: int) -> Path:
        """The shard holding token ``position`` of the concatenation."""
        return self.files[int(np.searchsorted(self.starts, position, side="right")) - 1]

    def slice(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] of the concatenation, across shard boundaries."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        out, pos = [], start
        while pos < stop:
            lo = pos - int(self.starts[i])
            hi = min(stop, int(self.starts[i + 1])) - int(self.starts[i])
            out.append(self.shard(i)[lo:hi])
            pos += hi - lo
            i += 1
        return out[0] if len(out) == 1 else np.concatenate(out)


def open_split(
    folder: Path,
    split: str,
    vocab_size: Optional[int] = None,
    tokenizer_sha256: Optional[str] = None,
    verify: str = "header",
) -> TokenStream:
    """Open one split of a prepared folder after checking it; raise ShardError naming the file.

    verify: "header" checks headers, sizes and the manifest's counts and largest ids;
    "full" also re-hashes every file and scans every token id.
    """
    if verify not in ("header", "full"):
        raise ConfigError(f"verify must be 'header' or 'full', got {verify!r}")
    folder = Path(folder)
    manifest = read_manifest(folder)
    mpath = folder / MANIFEST
    if tokenizer_sha256 is not None and manifest["tokenizer"].get("sha256") != tokenizer_sha256:
        raise ShardError(
            f"{mpath}: shards were made with tokenizer sha256 {manifest['tokenizer'].get('sha256')} "
            f"({manifest['tokenizer'].get('file', 'unknown file')}), but the given tokenizer has sha256 "
            f"{tokenizer_sha256}; prepare the data again with this tokenizer, or use the one it was made with"
        )
    entries = manifest["splits"].get(split)
    if not entries:
        raise ShardError(f"{mpath}: no shards listed for split {split!r} (splits: {sorted(manifest['splits'])})")
    files, counts = [], []
    for entry in entries:
        path = folder / entry["file"]
        if not path.is_file():
            raise ShardError(f"{path}: listed in {mpath} but missing")
        dtype, count = read_header(path)
        if count != entry["tokens"]:
            raise ShardError(f"{path}: header says {count} tokens, {mpath} says {entry['tokens']}")
        if vocab_size is not None and entry.get("max_token_id", -1) >= vocab_size:
            raise ShardError(
                f"{path}: holds token id {entry['max_token_id']}, but the model's vocab_size is {vocab_size}; "
                "use a model with a larger vocabulary or the tokenizer the model was built for"
            )
        if verify == "full":
            tokens = open_shard(path)
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                raise ShardError(f"{path}: sha256 {digest} differs from {mpath} ({entry['sha256']}): the file was altered")
            if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
                raise ShardError(f"{path}: holds token id {int(tokens.max())} >= the model's vocab_size {vocab_size}")
        files.append(path)
        counts.append(count)
    return TokenStream(files, counts)
