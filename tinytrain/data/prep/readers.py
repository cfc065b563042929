"""Reading a source's records: jsonl (plain, .zst, .gz), parquet, whole text files and hub
datasets, each file's problems counted in its report.

jsonl is parsed here, line by line, so a malformed line or a non-UTF-8 byte costs that line only
(`datasets`' JSON reader rejects the whole file); parquet is read by row group with pyarrow (the
columnar library `datasets` is built on), loading only the columns the spec needs; hub datasets go
through `datasets.load_dataset(..., streaming=True)`, one unit per shard.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from tinytrain.data.prep.spec import PrepError, Source, lookup

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".jsonl.zst": "jsonl", ".json.zst": "jsonl",
           ".jsonl.gz": "jsonl", ".json.gz": "jsonl", ".parquet": "parquet"}
COUNTERS = ("documents", "malformed_json", "non_utf8", "missing_field", "empty", "filtered")


def file_format(path: Path, text_suffixes=(".txt",)) -> Optional[str]:
    """"jsonl", "parquet", "text" (one document per file) or None (not read)."""
    name = path.name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    return "text" if name.endswith(tuple(s.lower() for s in text_suffixes)) else None


class FileReport:
    """Per-file counts of documents kept and records skipped, and the error that ended the file."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.error: Optional[str] = None
        self.fields: list[str] = []  # what a record lacking the text field had instead (the first such)

    def as_dict(self) -> dict:
        return {"file": self.name, **self.counts, **({"error": self.error} if self.error else {}),
                **({"fields_found": self.fields} if self.fields else {})}


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


def parquet_records(path: Path, columns: list[str], report: FileReport) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    present = [c for c in columns if c in pf.schema_arrow.names]
    if len(present) < len(columns):
        report.fields = list(pf.schema_arrow.names[:20])
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

    def kept(report: FileReport, where: str, records: Iterator[tuple[int, Any]],
             whole_file: bool = False) -> Iterator[tuple[str, str]]:
        for index, record in records:
            text = lookup(record, source.text_field)
            if not isinstance(text, str):
                _skip(report, "missing_field", f"{where}:{index}: no string field {source.text_field!r}", strict)
                if not report.fields and isinstance(record, dict):
                    report.fields = sorted(map(str, record))[:20]
                continue
            if not text.strip():
                report.counts["empty"] += 1
                continue
            if not all(f.passes(record) for f in source.filters):
                report.counts["filtered"] += 1
                continue
            report.counts["documents"] += 1
            yield (where if whole_file else f"{where}\0{index}"), text  # the key that decides held-out documents

    def guarded(report: FileReport, where: str, records: Callable[[], Iterator[tuple[int, Any]]],
                nbytes: int, whole_file: bool = False) -> Iterator[tuple[str, str]]:
        try:
            yield from kept(report, where, records(), whole_file)
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
        fmt = file_format(path, source.text_suffixes)
        if fmt == "jsonl":
            records = lambda: jsonl_records(path, report, strict)  # noqa: E731
        elif fmt == "parquet":
            records = lambda: parquet_records(path, columns, report)  # noqa: E731
        else:
            records = lambda: text_records(path, source.text_field, report, strict)  # noqa: E731
        yield from guarded(report, entry["file"], records, entry["bytes"], whole_file=fmt == "text")


