"""The pipeline: a spec's sources cut into units, each unit tokenized into shards (in worker
processes), the units joined into one prepared folder per source with its manifest.

A unit's output depends on nothing but its input and the settings, so N worker processes give
byte-identical folders whatever N is, and a finished unit is recorded in ``<out>/<name>/.prep/``
the moment its shards are on disk: an interrupted run (killed, preempted, disk full) verifies
those and does only the rest.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from tinytrain.data import shards
from tinytrain.data.prep.progress import Progress
from tinytrain.data.prep.readers import COUNTERS, FileReport, file_format, unit_documents
from tinytrain.data.prep.spec import PREP_VERSION, Filter, PrepError, PrepSpec, Source, check_spec, is_validation
from tinytrain.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

WORK = ".prep"  # per-source folder of the plan and finished-unit records while preparing


# --- units of work ----------------------------------------------------------------------------


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
    excluded = set(source.exclude_dirs)
    files = sorted((p for p in candidates if file_format(p, source.text_suffixes)
                    and not excluded & set(p.relative_to(root).parts[:-1])), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        kinds = ", ".join(["jsonl", "jsonl.zst", "jsonl.gz", "parquet", *(s.lstrip(".") for s in source.text_suffixes)])
        raise PrepError(f"source {source.name!r}: no {kinds} files under {raw}")
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
            "val_choice": "sha256(file \\0 line), or sha256(file) for a whole-file document, < val_fraction",
            "shard_tokens": spec.shard_tokens, "unit_bytes": spec.unit_bytes, "strict": spec.strict,
            "prep_version": PREP_VERSION}



# --- one unit ---------------------------------------------------------------------------------


def unit_record_path(folder: Path, unit_id: int) -> Path:
    return folder / WORK / f"unit-{unit_id:06d}.json"


def val_part_path(folder: Path, unit_id: int) -> Path:
    return folder / WORK / f"val-{unit_id:06d}.bin"


@functools.cache
def _tokenizer(path: str) -> Tokenizer:
    """One loaded tokenizer per worker process, whatever the number of units it runs."""
    return Tokenizer(path)


_PROGRESS = None  # a queue to the parent process, set in each worker by the pool's initializer


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


class _Progress:
    """Bytes, documents and tokens done since the last report, sent at most twice a second."""

    def __init__(self, send: Optional[Callable[[tuple[int, int, int]], None]]) -> None:
        self.send = send
        self.nbytes = self.documents = self.tokens = 0
        self.last = time.monotonic()

    def add(self, nbytes: int = 0, documents: int = 0, tokens: int = 0, last_of: Optional[int] = None) -> None:
        """Count; send when half a second has passed, or with ``last_of`` (a unit's id): the unit's last
        report, which the parent waits for (a worker's queue may deliver it after the unit's result)."""
        self.nbytes, self.documents, self.tokens = self.nbytes + nbytes, self.documents + documents, self.tokens + tokens
        now = time.monotonic()
        if self.send is not None and (last_of is not None or now - self.last > 0.5):
            self.send((self.nbytes, self.documents, self.tokens, last_of))
            self.nbytes = self.documents = self.tokens = 0
            self.last = now


def run_unit(folder: str, plan: dict, unit: dict, tokenizer_path: str, strict: bool,
             progress: Optional[Callable[[tuple[int, int, int]], None]] = None) -> dict:
    """Tokenize one unit into its train shards and validation part; record it; return the record."""
    folder_p = Path(folder)
    source = Source(**{**plan["source"], "filters": [Filter(**f) for f in plan["source"]["filters"]]})
    settings = plan["settings"]
    tok = _tokenizer(tokenizer_path)
    dtype = shards.dtype_for_vocab(tok.vocab_size)
    queue = _PROGRESS
    report = _Progress(progress or (queue.put if queue is not None else None))
    train = shards.ShardWriter(folder_p, f"train-{unit['id']:06d}", dtype, settings["shard_tokens"])
    held_out: list[np.ndarray] = []  # the unit's validation documents, joined across units at the end
    text_bytes = {"train": 0, "val": 0}  # UTF-8 bytes of each split's text: bits per byte need them
    reports: list[FileReport] = []

    def flat(documents: list[list[int]]) -> np.ndarray:
        return np.fromiter(itertools.chain.from_iterable(documents), dtype=dtype, count=sum(map(len, documents)))

    root = Path(plan["root"]) if plan["root"] else None
    documents = unit_documents(source, root, unit, strict, reports, lambda nbytes: report.add(nbytes=nbytes))
    too_short = 0
    while batch := list(itertools.islice(documents, 64)):
        keys, texts = zip(*batch)
        encoded = tok.processor.encode(list(texts), add_bos=settings["bos"], add_eos=settings["eos"], num_threads=1)
        report.add(documents=len(texts), tokens=sum(map(len, encoded)))
        if source.min_tokens:
            long_enough = [len(ids) >= source.min_tokens for ids in encoded]
            too_short += len(long_enough) - sum(long_enough)
            keys, texts, encoded = ([x for x, keep in zip(xs, long_enough) if keep] for xs in (keys, texts, encoded))
        held = [is_validation(key, settings["val_fraction"]) for key in keys]
        for text, v in zip(texts, held):
            text_bytes["val" if v else "train"] += len(text.encode("utf-8"))
        train.add(flat([ids for ids, v in zip(encoded, held) if not v]), documents=len(held) - sum(held))
        held_out.append(flat([ids for ids, v in zip(encoded, held) if v]))
    held = np.concatenate(held_out) if held_out else np.zeros(0, dtype)
    try:
        entries = train.close()
        val_entry = shards.write_shard(val_part_path(folder_p, unit["id"]), held, dtype) if held.size else None
    except OSError as e:
        raise _writing_error(e) from e
    report.add(last_of=unit["id"])
    kept = sum(r.counts["documents"] for r in reports) - too_short
    record = {"unit": unit["id"], "train": entries, "val_part": val_entry,
              "documents": {"train": train.documents, "val": kept - train.documents}, "bytes": text_bytes,
              "files": [r.as_dict() for r in reports], "too_short": too_short}
    _write_json(unit_record_path(folder_p, unit["id"]), record)  # from here on the unit counts as done
    return record


def _writing_error(e: OSError, path: Optional[Path] = None) -> PrepError:
    path = path or e.filename
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return PrepError(f"{path}: {os.strerror(e.errno)} while writing; nothing partial was kept. Free space "
                         "and run the same command again: finished units are kept and not redone")
    return PrepError(f"{path}: cannot write ({e})")


def _write_json(path: Path, obj: dict) -> None:
    """Write a JSON file atomically; on failure leave nothing (not even the temp file). The temp
    name holds the pid: several tasks of one preparation may write the same plan at once."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
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


@dataclass(frozen=True)
class Share:
    """Task ``index`` of ``count`` (a SLURM array, or separate machines on a shared filesystem)
    prepares the units whose id is ``index`` modulo ``count``; ``finalize`` only joins finished units."""

    index: int = 0
    count: int = 1
    finalize: bool = False

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise PrepError(f"--task_index must be in [0, --num_tasks={self.count}), got {self.index}")

    def owns(self, unit_id: int) -> bool:
        return not self.finalize and unit_id % self.count == self.index


FINALIZE_LOCK = "finalize.lock"


def prepare_source(source: Source, spec: PrepSpec, tokenizer: Tokenizer, executor=None,
                   progress: Optional[Progress] = None, share: Share = Share()) -> Optional[Path]:
    """Prepare (or finish preparing) one source into <out>/<name>; return the folder, or None when
    this task's share is done and other tasks' units are still missing."""
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
    mine = {u["id"] for u in plan["units"] if share.owns(u["id"])}
    for stray in itertools.chain(folder.glob("*.tmp"), work.glob("*.tmp")):
        # another task's temporary files are its own business
        owner = re.match(r"(?:unit|val|train)-(\d{6})", stray.name)
        if share.count == 1 or (owner is not None and int(owner.group(1)) in mine):
            stray.unlink(missing_ok=True)

    records = _finished_units(folder, source, plan, mine)
    todo = [u for u in plan["units"] if u["id"] in mine and u["id"] not in records]
    if records:
        log.info("%s: %d of %d units already done and verified; %d to go%s", source.name, len(records),
                 len(plan["units"]), len(todo), f" in task {share.index} of {share.count}" if share.count > 1 else "")
    if progress is not None:
        progress.start(source.name, sum(u.get("bytes", 0) for u in todo) if source.path else None)
    args = (str(folder), plan)
    if executor is None:
        for unit in todo:
            records[unit["id"]] = run_unit(*args, unit, str(tokenizer.path), spec.strict,
                                           (lambda counts: progress.update(*counts)) if progress else None)
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
        progress.drain(units={u["id"] for u in todo} if executor is not None else None)
        progress.close()
    if len(records) < len(plan["units"]):  # other tasks' units, finished since
        records.update(_finished_units(folder, source, plan, set()))
    missing = [u["id"] for u in plan["units"] if u["id"] not in records]
    if missing:
        tasks = sorted({i % share.count for i in missing})
        if share.finalize:
            owners = f", of tasks {_ids(tasks)} of {share.count}" if share.count > 1 else ""
            raise PrepError(f"{folder}: {len(missing)} of {len(plan['units'])} units are not done yet (units "
                            f"{_ids(missing)}{owners}); run those tasks again, then finalize")
        log.info("%s: task %d of %d done; %d units of tasks %s still to come (the last task to finish, or "
                 "--finalize, writes the manifest)", source.name, share.index, share.count, len(missing), _ids(tasks))
        return None
    if share.count > 1 and not share.finalize:
        try:  # the tasks that find every unit done: one of them writes the manifest
            os.close(os.open(work / FINALIZE_LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            log.info("%s: every unit is done; another task writes the manifest", source.name)
            return None
    return finish_source(folder, source, plan, [records[u["id"]] for u in plan["units"]], tokenizer)


def _ids(ids: list[int], most: int = 12) -> str:
    return ", ".join(map(str, ids[:most])) + (f" ... ({len(ids)} in all)" if len(ids) > most else "")


def _finished_units(folder: Path, source: Source, plan: dict, mine: set[int]) -> dict[int, dict]:
    """The units whose records are there and whose files are intact. A damaged unit of this task
    (``mine``) is removed, to be redone; another task's is left to that task."""
    records: dict[int, dict] = {}
    for unit in plan["units"]:
        path = unit_record_path(folder, unit["id"])
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = None
        problem = unit_is_intact(folder, record) if record is not None else "unreadable record"
        if problem is None:
            records[unit["id"]] = record
        elif unit["id"] in mine:
            log.warning("%s: unit %d is redone: %s", source.name, unit["id"], problem)
            path.unlink()
    return records


def skip_counts(records: list[dict]) -> dict[str, int]:
    """Records skipped across a source's units, by reason (too_short included)."""
    files = [f for r in records for f in r["files"]]
    return {**{k: sum(f[k] for f in files) for k in COUNTERS[1:]},
            "too_short": sum(r.get("too_short", 0) for r in records)}


def describe_skips(skipped: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in skipped.items() if n)


def check_has_documents(source: Source, records: list[dict]) -> None:
    """A source that yielded no document is an error naming it, with what was skipped and why."""
    if sum(r["documents"]["train"] + r["documents"]["val"] for r in records):
        return
    files = [f for r in records for f in r["files"]]
    skipped = skip_counts(records)
    errors = sum(1 for f in files if f.get("error"))
    why = describe_skips(skipped) or "nothing skipped"
    message = f"source {source.name!r} yielded no document from {len(files)} file(s) ({why}"
    message += f"; {errors} unreadable)" if errors else ")"
    found = next((f["fields_found"] for f in files if f.get("fields_found")), None)
    if skipped["missing_field"]:
        message += (f": its records have no string field {source.text_field!r}"
                    + (f"; fields found: {', '.join(found)} (set text_field)" if found else ""))
    raise PrepError(message)


def finish_source(folder: Path, source: Source, plan: dict, records: list[dict], tokenizer: Tokenizer) -> Path:
    """Join the units' validation parts into val shards, write the tokenizer and the manifest."""
    check_has_documents(source, records)
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
        os.replace(folder / (shards.TOKENIZER + ".tmp"), folder / shards.TOKENIZER)
    except OSError as e:
        (folder / "tokenizer.model.tmp").unlink(missing_ok=True)
        raise _writing_error(e, folder / shards.TOKENIZER) from e
    files = [f for r in records for f in r["files"]]
    totals = {k: sum(f[k] for f in files) for k in COUNTERS}
    problems = [f for f in files if f.get("error") or any(f[k] for k in COUNTERS if k not in ("documents", "filtered"))]
    described_source = {k: v for k, v in plan["source"].items() if v not in (None, [])}
    try:
        shards.write_manifest(
            folder, dtype, {"train": [e for r in records for e in r["train"]], "val": val_entries},
            tokenizer.describe(), {"source": described_source, "root": plan["root"], **plan["settings"]},
            {split: sum(r["documents"][split] for r in records) for split in ("train", "val")},
            extra={"bytes": {split: sum(r["bytes"][split] for r in records) for split in ("train", "val")},
                   "report": {"files": len(files), "units": len(records), **totals,
                              "too_short": sum(r.get("too_short", 0) for r in records),
                              "files_with_problems": problems}},
        )
    except OSError as e:
        (folder / (shards.MANIFEST + ".tmp")).unlink(missing_ok=True)
        raise _writing_error(e, folder / shards.MANIFEST) from e
    shutil.rmtree(folder / WORK, ignore_errors=True)
    skipped = skip_counts(records)
    log.info("%s: %d train / %d val documents, %d skipped (%s); manifest %s", source.name,
             sum(r["documents"]["train"] for r in records), sum(r["documents"]["val"] for r in records),
             sum(skipped.values()), describe_skips(skipped) or "none",
             folder / shards.MANIFEST)
    return folder



def prepare(spec: PrepSpec, show_progress: bool = True, share: Share = Share()) -> list[Path]:
    """Prepare every source of the spec (this task's share of it); return the folders finished."""
    check_spec(spec)
    tokenizer = Tokenizer(Path(spec.tokenizer).expanduser())
    Path(spec.out).expanduser().mkdir(parents=True, exist_ok=True)
    if spec.workers == 1 or share.finalize:
        progress = Progress(enabled=show_progress)
        done = [prepare_source(s, spec, tokenizer, None, progress, share) for s in spec.sources]
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        queue = ctx.Queue()
        progress = Progress(queue, enabled=show_progress)
        with ProcessPoolExecutor(spec.workers, mp_context=ctx, initializer=_init_worker, initargs=(queue,)) as pool:
            done = [prepare_source(s, spec, tokenizer, pool, progress, share) for s in spec.sources]
    return [folder for folder in done if folder is not None]
