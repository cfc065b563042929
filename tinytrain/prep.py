"""Corpus preparation at scale: a YAML spec of sources -> one prepared folder per source.

    tinytrain prepare --config data_prep/tinyllama.yaml [--workers 64 --out /data/tinyllama ...]

Each source (a local folder of jsonl / jsonl.zst / jsonl.gz / parquet / txt files, or a dataset
on the Hugging Face Hub, streamed with `datasets`) becomes ``<out>/<name>/``: shards, the
tokenizer, and a manifest with documents, tokens, checksums, settings and a per-file report of
what was skipped. The work is cut into units (consecutive input files up to ``unit_bytes``, or
one shard of a hub dataset), and a unit's output depends on nothing but its input and the
settings, so:

- N worker processes produce byte-identical folders whatever N is;
- a finished unit is recorded in ``<out>/<name>/.prep/`` the moment its shards are on disk, and an
  interrupted run (killed, preempted, disk full) verifies those and does only the rest;
- the held-out validation documents are chosen by a hash of (file, line), not by position in a
  worker's queue.

Documents are tokenized one by one (BOS in front by default, as in TinyLlama's published run;
EOS optional; both recorded in the manifest) and concatenated, never padded.

Reading: jsonl is parsed here, line by line, so a malformed line or a non-UTF-8 byte costs that
line only (`datasets`' JSON reader rejects the whole file); parquet is read by row group with
pyarrow (the columnar library `datasets` is built on), loading only the columns the spec needs;
hub datasets go through `datasets.load_dataset(..., streaming=True)`, one unit per shard.
"""

from __future__ import annotations

import errno
import gzip
import io
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from tinytrain import shards
from tinytrain.errors import TinyTrainError
from tinytrain.corpus import is_validation
from tinytrain.tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger(__name__)

PREP_VERSION = 1  # bump when the output for the same input and settings changes
WORK = ".prep"    # per-source folder of the plan and finished-unit records while preparing
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".jsonl.zst": "jsonl", ".json.zst": "jsonl",
           ".jsonl.gz": "jsonl", ".json.gz": "jsonl", ".parquet": "parquet", ".txt": "text"}
COUNTERS = ("documents", "malformed_json", "non_utf8", "missing_field", "empty", "filtered")


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
    """Dotted path of the document text in each record (e.g. content for StarCoderData); txt files
    are one document per file."""
    filters: list[Filter] = field(default_factory=list)
    """Every filter must pass for a document to be kept."""
    val_fraction: Optional[float] = None
    """Share of documents held out for validation (default: the spec's val_fraction)."""


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
    shard_tokens: int = 1 << 26
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


# --- units of work ----------------------------------------------------------------------------


def file_format(path: Path) -> Optional[str]:
    name = path.name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    return None


def source_files(source: Source) -> tuple[Path, list[Path]]:
    """(root, files in a fixed order) of a local source; errors name the path and what was expected."""
    raw = os.path.expanduser(source.path)
    if any(c in raw for c in "*?["):
        import glob

        parts = Path(raw).parts
        fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
        root = Path(*parts[:fixed]) if fixed else Path(".")
        candidates = [Path(p) for p in glob.glob(raw, recursive=True) if Path(p).is_file()]
    else:
        root = Path(raw)
        if not root.exists():
            raise PrepError(f"source {source.name!r}: path {root} does not exist")
        candidates = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        root = root.parent if root.is_file() else root
    files = sorted((p for p in candidates if file_format(p)), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise PrepError(f"source {source.name!r}: no jsonl, jsonl.zst, jsonl.gz, parquet or txt files under {raw}")
    return root, files


def plan_units(source: Source, unit_bytes: int) -> tuple[Optional[Path], list[dict]]:
    """The source's root folder (None for a hub dataset) and units of work, in output order."""
    if source.hub is not None:
        from datasets import load_dataset

        ds = load_dataset(source.hub, source.hub_config, split=source.split, streaming=True)
        return None, [{"id": i, "hub_shard": i, "hub_shards": ds.num_shards} for i in range(ds.num_shards)]
    root, files = source_files(source)
    units, current, size = [], [], 0
    for path in files:
        st = path.stat()
        if current and size + st.st_size > unit_bytes:
            units.append({"id": len(units), "files": current, "bytes": size})
            current, size = [], 0
        current.append({"file": path.relative_to(root).as_posix(), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
        size += st.st_size
    units.append({"id": len(units), "files": current, "bytes": size})
    return root, units


def plan_for(source: Source, spec: PrepSpec, tokenizer: Tokenizer) -> dict:
    """Everything the output depends on; a resumed run must find the same plan."""
    root, units = plan_units(source, spec.unit_bytes)
    return {
        "prep_version": PREP_VERSION,
        "source": asdict(source),
        "root": str(root.resolve()) if root is not None else None,
        "tokenizer_sha256": tokenizer.sha256,
        "settings": settings_for(source, spec),
        "units": units,
    }


def settings_for(source: Source, spec: PrepSpec) -> dict:
    return {"bos": spec.bos, "eos": spec.eos, "concatenated": True, "padding": False,
            "val_fraction": spec.val_fraction if source.val_fraction is None else source.val_fraction,
            "val_choice": "sha256(file \\0 line) < val_fraction", "shard_tokens": spec.shard_tokens,
            "unit_bytes": spec.unit_bytes, "strict": spec.strict, "prep_version": PREP_VERSION}


# --- reading records --------------------------------------------------------------------------


class FileReport:
    """Per-file counts of documents kept and records skipped, and the error that ended the file."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.error: Optional[str] = None

    def as_dict(self) -> dict:
        return {"file": self.name, **self.counts, **({"error": self.error} if self.error else {})}


def _skip(report: FileReport, what: str, where: str, strict: bool) -> None:
    if strict:
        raise PrepError(f"{where}: {what.replace('_', ' ')} (the spec says strict: true)")
    report.counts[what] += 1


class ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every frame of a .zst file, in order. A file that ends inside a
    frame (truncated, or partly copied) raises EOFError at its end, as gzip does; zstandard's own
    stream reader would end there without a word."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self.path, self.file = path, open(path, "rb")
        self.context = zstandard.ZstdDecompressor()
        self.frame = None
        self.out, self.at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.at == len(self.out):
            chunk = self.file.read(1 << 20)
            if not chunk:
                if self.frame is not None and not self.frame.eof:
                    raise EOFError(f"{self.path}: compressed file ended inside a zstd frame (truncated?)")
                return 0
            parts = []
            while chunk:
                if self.frame is None or self.frame.eof:  # a file may hold several frames, one after another
                    self.frame = self.context.decompressobj()
                parts.append(self.frame.decompress(chunk))
                chunk = self.frame.unused_data if self.frame.eof else b""
            self.out, self.at = b"".join(parts), 0
        n = min(len(buffer), len(self.out) - self.at)
        buffer[:n] = self.out[self.at:self.at + n]
        self.at += n
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


def _open_binary(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".zst"):
        return io.BufferedReader(ZstdFrames(path), buffer_size=1 << 20)
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def jsonl_records(path: Path, report: FileReport, strict: bool) -> Iterator[tuple[int, Any]]:
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the JSON
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                _skip(report, "non_utf8", f"{path}:{line_no}", strict)
                continue
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                _skip(report, "malformed_json", f"{path}:{line_no}", strict)
                continue
            yield line_no, record


def parquet_records(path: Path, columns: list[str]) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    present = [c for c in columns if c in pf.schema_arrow.names]
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=present):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def text_records(path: Path, text_field: str, report: FileReport, strict: bool) -> Iterator[tuple[int, Any]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        _skip(report, "non_utf8", str(path), strict)
        return
    record: dict = {}
    node = record
    keys = text_field.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = text
    yield 1, record


def unit_documents(source: Source, root: Optional[Path], unit: dict, strict: bool,
                   reports: list[FileReport], on_file_done: Callable[[int], None]) -> Iterator[tuple[str, str]]:
    """(hash key, text) of every kept document of a unit, in order; skipped records go to ``reports``."""
    columns = sorted({source.text_field.split(".")[0], *(f.field.split(".")[0] for f in source.filters)})

    def kept(report: FileReport, where: str, records: Iterator[tuple[int, Any]]) -> Iterator[tuple[str, str]]:
        for index, record in records:
            text = lookup(record, source.text_field)
            if not isinstance(text, str):
                _skip(report, "missing_field", f"{where}:{index}: no string field {source.text_field!r}", strict)
                continue
            if not text.strip():
                report.counts["empty"] += 1
                continue
            if not all(f.passes(record) for f in source.filters):
                report.counts["filtered"] += 1
                continue
            report.counts["documents"] += 1
            yield f"{where}\0{index}", text

    def guarded(report: FileReport, where: str, records: Callable[[], Iterator[tuple[int, Any]]],
                nbytes: int) -> Iterator[tuple[str, str]]:
        try:
            yield from kept(report, where, records())
        except PrepError:
            raise
        except Exception as e:  # unreadable, truncated, not what its suffix says: report it, go on
            if strict:
                raise PrepError(f"{where}: cannot be read ({type(e).__name__}: {e}) (the spec says strict: true)") from e
            report.error = f"{type(e).__name__}: {e}"
            log.warning("%s: skipped the rest: %s", where, report.error)
        on_file_done(nbytes)

    if "hub_shard" in unit:
        def hub_records() -> Iterator[tuple[int, Any]]:
            from datasets import load_dataset

            ds = load_dataset(source.hub, source.hub_config, split=source.split, streaming=True)
            return enumerate(ds.shard(num_shards=unit["hub_shards"], index=unit["hub_shard"]), 1)

        report = FileReport(f"{source.hub}#shard{unit['hub_shard']}")
        reports.append(report)
        yield from guarded(report, report.name, hub_records, 0)
        return
    for entry in unit["files"]:
        path = root / entry["file"]
        report = FileReport(entry["file"])
        reports.append(report)
        fmt = file_format(path)
        if fmt == "jsonl":
            records = lambda: jsonl_records(path, report, strict)  # noqa: E731
        elif fmt == "parquet":
            records = lambda: parquet_records(path, columns)  # noqa: E731
        else:
            records = lambda: text_records(path, source.text_field, report, strict)  # noqa: E731
        yield from guarded(report, entry["file"], records, entry["bytes"])


# --- one unit ---------------------------------------------------------------------------------


def unit_record_path(folder: Path, unit_id: int) -> Path:
    return folder / WORK / f"unit-{unit_id:06d}.json"


def val_part_path(folder: Path, unit_id: int) -> Path:
    return folder / WORK / f"val-{unit_id:06d}.bin"


_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(path: str) -> Tokenizer:
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = Tokenizer(path)
    return _TOKENIZERS[path]


_PROGRESS = None  # a queue to the parent process, set in each worker


def _init_worker(queue) -> None:
    global _PROGRESS
    _PROGRESS = queue
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="tinytrain-orphan-check", daemon=True).start()


def _exit_with_parent(parent: int, interval: float = 1.0) -> None:
    """A worker whose parent died (killed, out of memory) is re-parented: then it ends at once,
    instead of waiting forever for work that will never come."""
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


def run_unit(folder: str, plan: dict, unit: dict, tokenizer_path: str, strict: bool,
             progress: Optional[Callable[[int, int, int], None]] = None) -> dict:
    """Tokenize one unit into its train shards and validation part; record it; return the record."""
    folder_p = Path(folder)
    source = Source(**{**plan["source"], "filters": [Filter(**f) for f in plan["source"]["filters"]]})
    settings = plan["settings"]
    tok = _tokenizer(tokenizer_path)
    dtype = shards.dtype_for_vocab(tok.vocab_size)
    proc = tok.processor
    bos, eos, frac, shard_tokens = settings["bos"], settings["eos"], settings["val_fraction"], settings["shard_tokens"]
    queue = _PROGRESS

    pending = [0, 0, 0]  # bytes, documents, tokens not yet reported
    last = [time.monotonic()]

    def report_progress(force: bool = False) -> None:
        now = time.monotonic()
        if force or now - last[0] > 0.5:
            if progress is not None:
                progress(*pending)
            elif queue is not None:
                queue.put(tuple(pending))
            pending[:] = [0, 0, 0]
            last[0] = now

    def file_done(nbytes: int) -> None:
        pending[0] += nbytes
        report_progress()

    train = shards.ShardWriter(folder_p, f"train-{unit['id']:06d}", dtype, shard_tokens)
    val: list[np.ndarray] = []  # the unit's held-out documents, joined across units at the end
    reports: list[FileReport] = []

    def flat(documents: list[list[int]]) -> np.ndarray:
        n = sum(map(len, documents))
        return np.fromiter(itertools.chain.from_iterable(documents), dtype=dtype, count=n)

    root = Path(plan["root"]) if plan["root"] else None
    batch_keys, batch_texts = [], []

    def encode_batch() -> None:
        encoded = proc.encode(batch_texts, add_bos=bos, add_eos=eos, num_threads=1)
        held = [is_validation(key, frac) for key in batch_keys]
        train.add(flat([ids for ids, v in zip(encoded, held) if not v]), documents=len(held) - sum(held))
        val.append(flat([ids for ids, v in zip(encoded, held) if v]))
        pending[1] += len(batch_texts)
        pending[2] += sum(map(len, encoded))
        batch_keys.clear()
        batch_texts.clear()
        report_progress()

    for key, text in unit_documents(source, root, unit, strict, reports, file_done):
        batch_keys.append(key)
        batch_texts.append(text)
        if len(batch_texts) >= 64:
            encode_batch()
    if batch_texts:
        encode_batch()
    held_out = np.concatenate(val) if val else np.zeros(0, dtype)
    try:
        entries = train.close()
        val_entry = shards.write_shard(val_part_path(folder_p, unit["id"]), held_out, dtype) if held_out.size else None
    except OSError as e:
        raise _writing_error(e) from e
    report_progress(force=True)
    documents = sum(r.counts["documents"] for r in reports)
    record = {"unit": unit["id"], "train": entries, "val_part": val_entry,
              "documents": {"train": train.documents, "val": documents - train.documents},
              "files": [r.as_dict() for r in reports]}
    _write_json(unit_record_path(folder_p, unit["id"]), record)  # from here on the unit counts as done
    return record


def _writing_error(e: OSError, path: Optional[Path] = None) -> PrepError:
    path = path or e.filename
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return PrepError(f"{path}: {os.strerror(e.errno)} while writing; nothing partial was kept. Free space "
                         "and run the same command again: finished units are kept and not redone")
    return PrepError(f"{path}: cannot write ({e})")


def _write_json(path: Path, obj: dict) -> None:
    """Write a JSON file atomically; on failure leave nothing (not even the temp file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _writing_error(e, path) from e


# --- a source ---------------------------------------------------------------------------------


def unit_is_intact(folder: Path, record: dict) -> Optional[str]:
    """None when every file the record lists is on disk with its checksum; else what is wrong."""
    files = [e for e in record["train"]]
    if record.get("val_part"):
        files.append({**record["val_part"], "file": f"{WORK}/{record['val_part']['file']}"})
    for entry in files:
        path = folder / entry["file"]
        if not path.is_file():
            return f"{path} is missing"
        if shards.sha256_file(path) != entry["sha256"]:
            return f"{path} does not match its checksum"
    return None


def _difference(old: dict, new: dict, prefix: str = "") -> Optional[str]:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            if key == "units":
                return "the input files (added, removed, or changed in size or time)"
            return f"{prefix}{key}: was {a!r}, now {b!r}"
    return None


def prepare_source(source: Source, spec: PrepSpec, tokenizer: Tokenizer, executor=None,
                   progress: Optional["Progress"] = None) -> Path:
    """Prepare (or finish preparing) one source into <out>/<name>; return the folder."""
    folder = Path(spec.out).expanduser() / source.name
    if (folder / shards.MANIFEST).is_file():
        log.info("%s: already prepared (%s); `tinytrain prepare --verify %s` re-checks it", source.name, folder, folder)
        return folder
    plan = plan_for(source, spec, tokenizer)
    work = folder / WORK
    plan_path = work / "plan.json"
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        diff = _difference(old, plan)
        if diff:
            raise PrepError(f"{folder}: an unfinished preparation with different input is there ({diff}); "
                            f"finish it with the settings it started with, or remove {folder} to start over")
    else:
        work.mkdir(parents=True, exist_ok=True)
        _write_json(plan_path, plan)
    for stray in itertools.chain(folder.glob("*.tmp"), work.glob("*.tmp")):
        stray.unlink()

    records: dict[int, dict] = {}
    for unit in plan["units"]:
        path = unit_record_path(folder, unit["id"])
        if path.is_file():
            record = json.loads(path.read_text())
            problem = unit_is_intact(folder, record)
            if problem is None:
                records[unit["id"]] = record
                continue
            log.warning("%s: unit %d is redone: %s", source.name, unit["id"], problem)
            path.unlink()
    todo = [u for u in plan["units"] if u["id"] not in records]
    if records:
        log.info("%s: %d of %d units already done and verified; %d to go", source.name, len(records),
                 len(plan["units"]), len(todo))
    if progress is not None:
        progress.start(source.name, sum(u.get("bytes", 0) for u in todo) if source.path else None)
    args = (str(folder), plan)
    if executor is None:
        for unit in todo:
            records[unit["id"]] = run_unit(*args, unit, str(tokenizer.path), spec.strict,
                                           progress.update if progress else None)
    else:
        futures = {executor.submit(run_unit, *args, unit, str(tokenizer.path), spec.strict): unit for unit in todo}
        try:
            while futures:
                done, _ = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                if progress is not None:
                    progress.drain()
                for fut in done:
                    records[futures.pop(fut)["id"]] = fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    if progress is not None:
        progress.drain()
        progress.close()
    return finish_source(folder, source, plan, [records[u["id"]] for u in plan["units"]], tokenizer)


def finish_source(folder: Path, source: Source, plan: dict, records: list[dict], tokenizer: Tokenizer) -> Path:
    """Join the units' validation parts into val shards, write the tokenizer and the manifest."""
    dtype = shards.dtype_for_vocab(tokenizer.vocab_size)
    val = shards.ShardWriter(folder, "val", dtype, plan["settings"]["shard_tokens"])
    try:
        for record in records:
            if record.get("val_part"):
                val.add(np.array(shards.open_shard(val_part_path(folder, record["unit"]))))
        val_entries = val.close()
    except OSError as e:
        raise _writing_error(e) from e
    if not val_entries:
        log.warning("%s: no document was held out for validation (val_fraction %s); training needs a val "
                    "split: raise val_fraction", source.name, plan["settings"]["val_fraction"])
    try:
        shutil.copyfile(tokenizer.path, folder / "tokenizer.model.tmp")
        os.replace(folder / "tokenizer.model.tmp", folder / "tokenizer.model")
    except OSError as e:
        (folder / "tokenizer.model.tmp").unlink(missing_ok=True)
        raise _writing_error(e, folder / "tokenizer.model") from e
    files = [f for r in records for f in r["files"]]
    totals = {k: sum(f[k] for f in files) for k in COUNTERS}
    problems = [f for f in files if f.get("error") or any(f[k] for k in COUNTERS if k not in ("documents", "filtered"))]
    described_source = {k: v for k, v in plan["source"].items() if v not in (None, [])}
    try:
        shards.write_manifest(
            folder, dtype, {"train": [e for r in records for e in r["train"]], "val": val_entries},
            tokenizer.describe(), {"source": described_source, "root": plan["root"], **plan["settings"]},
            {split: sum(r["documents"][split] for r in records) for split in ("train", "val")},
            extra={"report": {"files": len(files), "units": len(records), **totals, "files_with_problems": problems}},
        )
    except OSError as e:
        (folder / (shards.MANIFEST + ".tmp")).unlink(missing_ok=True)
        raise _writing_error(e, folder / shards.MANIFEST) from e
    shutil.rmtree(folder / WORK, ignore_errors=True)
    log.info("%s: %d train / %d val documents, %d skipped (%s); manifest %s", source.name, totals["documents"] -
             sum(r["documents"]["val"] for r in records), sum(r["documents"]["val"] for r in records),
             sum(totals[k] for k in COUNTERS if k != "documents"),
             ", ".join(f"{k} {totals[k]}" for k in COUNTERS[1:] if totals[k]) or "none", folder / shards.MANIFEST)
    return folder


# --- progress ---------------------------------------------------------------------------------


class Progress:
    """A progress bar over input bytes (so it has an ETA) with documents, tokens and tokens/s."""

    def __init__(self, queue=None, enabled: bool = True) -> None:
        self.queue, self.enabled, self.bar = queue, enabled, None

    def start(self, name: str, total_bytes: Optional[int]) -> None:
        from tqdm import tqdm

        self.docs = self.tokens = 0
        self.t0 = time.monotonic()
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=name, disable=not self.enabled,
                        file=sys.stderr, dynamic_ncols=True)

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(nbytes)
            rate = self.tokens / max(1e-9, time.monotonic() - self.t0)
            self.bar.set_postfix_str(f"{self.docs:,} docs, {self.tokens:,} tokens, {rate:,.0f} tok/s", refresh=False)

    def drain(self) -> None:
        if self.queue is None:
            return
        import queue as queue_mod

        while True:
            try:
                self.update(*self.queue.get_nowait())
            except queue_mod.Empty:
                return

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def prepare(spec: PrepSpec, show_progress: bool = True) -> list[Path]:
    """Prepare every source of the spec; return their folders."""
    check_spec(spec)
    tokenizer = Tokenizer(Path(spec.tokenizer).expanduser())
    Path(spec.out).expanduser().mkdir(parents=True, exist_ok=True)
    if spec.workers == 1:
        progress = Progress(enabled=show_progress)
        return [prepare_source(s, spec, tokenizer, None, progress) for s in spec.sources]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    progress = Progress(queue, enabled=show_progress)
    with ProcessPoolExecutor(spec.workers, mp_context=ctx, initializer=_init_worker, initargs=(queue,)) as pool:
        return [prepare_source(s, spec, tokenizer, pool, progress) for s in spec.sources]


# --- verify and tokenizer training --------------------------------------------------------------


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
    tok_path = Path(folder) / "tokenizer.model"
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
