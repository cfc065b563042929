"""Plain-text corpora (a folder of files) to prepared shards, and the embedded default corpus.

The default corpus is the source of the running Python's standard library (about 14 MB of .py
files, test suites left out): present on every machine, so the laptop recipe needs no download.
Preparation trains a tokenizer on the corpus (unless one is given), tokenizes every file as one
document with BOS in front, holds out a deterministic set of files for validation, and writes
shards + manifest + the tokenizer into one folder, atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

from tinytrain import shards
from tinytrain.errors import TinyTrainError
from tinytrain.fsutil import atomic_folder
from tinytrain.tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger(__name__)

PREP_VERSION = 1  # bump when the output of prepare_text_folder changes for the same input
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class CorpusError(TinyTrainError, ValueError):
    """A corpus folder that cannot be prepared."""


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_corpus_files(folder: Path, suffixes=TEXT_SUFFIXES) -> list[Path]:
    """The corpus's text files in a fixed order; errors name the folder and what was expected."""
    folder = Path(folder)
    if not folder.exists():
        raise CorpusError(f"corpus folder {folder} does not exist")
    if not folder.is_dir():
        raise CorpusError(f"corpus path {folder} is not a folder (expected a folder of {', '.join(suffixes)} files)")
    files = sorted(
        p for p in folder.rglob("*")
        if p.suffix in suffixes and p.is_file() and not _SKIP_PARTS & set(p.relative_to(folder).parts[:-1])
    )
    if not files:
        raise CorpusError(f"corpus folder {folder} holds no text files (looked for {', '.join(suffixes)})")
    return files


def read_documents(files: list[Path]) -> Iterator[tuple[Path, str]]:
    """(path, text) of every readable UTF-8 file with some non-blank text; others are skipped and counted."""
    skipped = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            skipped += 1
            continue
        if text.strip():
            yield path, text
    if skipped:
        log.warning("skipped %d unreadable or non-UTF-8 files", skipped)


def corpus_fingerprint(folder: Path, files: list[Path]) -> str:
    """Changes when any file is added, removed, or changes size or mtime."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def is_validation(key: str, val_fraction: float) -> bool:
    """Deterministic held-out choice by a hash of a document's key (its path inside the corpus, or
    file and line), so it depends neither on the order of reading nor on the number of workers."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "little") / 2**64
    return bucket < val_fraction


def prepare_text_folder(
    corpus: Path,
    out: Path,
    vocab_size: int,
    tokenizer: Optional[Path] = None,
    val_fraction: float = 0.02,
    shard_tokens: int = 1 << 24,
) -> Path:
    """Prepare ``corpus`` into ``out`` (shards, manifest.json, tokenizer.model); return ``out``.

    The folder appears only when complete; an existing ``out`` is never replaced.
    """
    corpus, out = Path(corpus), Path(out)
    files = list_corpus_files(corpus)
    docs = list(read_documents(files))
    if not docs:
        raise CorpusError(f"corpus folder {corpus}: none of its {len(files)} files holds readable UTF-8 text")
    with atomic_folder(out) as tmp:
        tok_path = tmp / "tokenizer.model"
        if tokenizer is None:
            log.info("training a %d-piece BPE tokenizer on %s", vocab_size, corpus)
            lines = (line for _, text in docs for line in text.split("\n") if line.strip())
            tok = train_tokenizer(lines, tok_path, vocab_size)
        else:
            shutil.copyfile(tokenizer, tok_path)
            tok = Tokenizer(tok_path)
        if tok.vocab_size > vocab_size:
            raise CorpusError(f"tokenizer {tokenizer or tok_path} has {tok.vocab_size} pieces, more than vocab_size={vocab_size}")

        train, val = [], []
        for path, text in docs:
            rel = path.relative_to(corpus).as_posix()
            (val if is_validation(rel, val_fraction) else train).append(text)
        if not val or not train:
            raise CorpusError(
                f"corpus folder {corpus}: {len(docs)} documents are too few to hold out a validation split "
                f"(val_fraction={val_fraction}); add files or raise val_fraction"
            )
        log.info("tokenizing %d documents (%d held out for validation)", len(docs), len(val))
        shards.documents_to_shards(
            tmp,
            {"train": (tok.encode(t, bos=True) for t in train), "val": (tok.encode(t, bos=True) for t in val)},
            vocab_size=tok.vocab_size,
            tokenizer=tok.describe(),
            settings={"source": str(corpus), "bos": True, "eos": False, "val_fraction": val_fraction,
                      "prep_version": PREP_VERSION},
            shard_tokens=shard_tokens,
        )
    return out


def cached_prepare_path(corpus: Optional[Path], cache_dir: Path, vocab_size: int, val_fraction: float = 0.02) -> Path:
    """Where ``cached_prepare`` keeps a corpus: a folder named by the corpus's content and settings."""
    corpus = Path(corpus) if corpus is not None else stdlib_dir()
    files = list_corpus_files(corpus)
    key = hashlib.sha256(
        f"{corpus_fingerprint(corpus, files)}|{vocab_size}|{val_fraction}|{PREP_VERSION}".encode()
    ).hexdigest()[:12]
    name = ("stdlib-py" + sysconfig.get_python_version().replace(".", "")) if corpus == stdlib_dir() else corpus.name
    return Path(cache_dir) / f"{name}-v{vocab_size}-{key}"


def cached_prepare(corpus: Optional[Path], cache_dir: Path, vocab_size: int, val_fraction: float = 0.02) -> Path:
    """Prepare a text corpus (default: the standard library) once; later calls reuse the folder."""
    out = cached_prepare_path(corpus, cache_dir, vocab_size, val_fraction)
    if not (out / shards.MANIFEST).is_file():
        try:
            prepare_text_folder(corpus if corpus is not None else stdlib_dir(), out, vocab_size,
                                val_fraction=val_fraction)
        except FileExistsError:  # another process (another node) finished it first
            pass
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("TINYTRAIN_CACHE", Path.home() / ".cache" / "tinytrain"))
