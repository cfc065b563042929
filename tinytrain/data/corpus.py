"""A folder of text files as a prepared folder: the laptop path, and the embedded default corpus.

The default corpus is the source of the running Python's standard library (about 14 MB of .py
files, test suites left out): present on every machine, so the laptop recipe needs no download.
A folder of text files is a spec of one source for the one preparation pipeline (tinytrain.data.prep):
each file one document with BOS in front, held out for validation by the pipeline's hash rule,
tokenized with a given tokenizer or one trained on the corpus first. The prepared folder appears
only when complete, so several processes (nodes) may prepare the same cached corpus at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from tinytrain.data import shards
from tinytrain.data.prep import (
    PREP_VERSION,
    PrepError,
    PrepSpec,
    Source,
    is_validation,
    prepare,
    source_files,
    train_spec_tokenizer,
)
from tinytrain.data.tokenizer import Tokenizer
from tinytrain.errors import TinyTrainError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = [".py", ".txt", ".md", ".rst"]
EXCLUDE_DIRS = ["site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"]
TOKENIZER_LINES = 300_000  # lines sentencepiece trains a corpus's own tokenizer on


class CorpusError(TinyTrainError, ValueError):
    """A corpus folder that cannot be prepared."""


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_cache_dir() -> Path:
    return Path(os.environ.get("TINYTRAIN_CACHE", Path.home() / ".cache" / "tinytrain"))


def corpus_source(folder: Path, name: str = "corpus") -> Source:
    """The spec source of a folder of text files: every .py, .txt, .md and .rst file is one document."""
    return Source(name=name, path=str(folder), text_suffixes=TEXT_SUFFIXES, exclude_dirs=EXCLUDE_DIRS)


def list_corpus_files(folder: Path) -> list[Path]:
    """The corpus's text files in a fixed order; errors name the folder and what was expected."""
    folder = Path(folder)
    if not folder.exists():
        raise CorpusError(f"corpus folder {folder} does not exist")
    if not folder.is_dir():
        raise CorpusError(f"corpus path {folder} is not a folder (expected a folder of {', '.join(TEXT_SUFFIXES)} files)")
    try:
        return source_files(corpus_source(folder))[1]
    except PrepError:
        raise CorpusError(f"corpus folder {folder} holds no text files (looked for {', '.join(TEXT_SUFFIXES)})") from None


def read_documents(files: list[Path]) -> Iterator[tuple[Path, str]]:
    """(path, text) of every readable UTF-8 file with some non-blank text."""
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            yield path, text


def prepare_text_folder(corpus: Path, out: Path, vocab_size: int, tokenizer: Optional[Path] = None,
                        val_fraction: float = 0.02) -> Path:
    """Prepare ``corpus`` into ``out`` (shards, manifest.json, tokenizer.model); return ``out``.

    The folder appears only when complete; an existing ``out`` is never replaced."""
    corpus, out = Path(corpus), Path(out)
    files = list_corpus_files(corpus)
    readable = [path for path, _ in read_documents(files)]
    if not readable:
        raise CorpusError(f"corpus folder {corpus}: none of its {len(files)} files holds readable UTF-8 text")
    held = sum(is_validation(path.relative_to(corpus).as_posix(), val_fraction) for path in readable)
    if not held or held == len(readable):
        raise CorpusError(f"corpus folder {corpus}: {len(readable)} documents are too few to hold out a validation "
                          f"split (val_fraction={val_fraction}); add files or raise val_fraction")
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    # The source's name (a folder name in a spec) is the output folder's, made one where --out is any path.
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", out.name).strip(".") or "corpus"
    try:
        spec = PrepSpec(out=str(work), tokenizer=str(work / shards.TOKENIZER), sources=[corpus_source(corpus, name)],
                        val_fraction=val_fraction, bos=True, eos=False)
        if tokenizer is None:
            log.info("training a %d-piece BPE tokenizer on %s", vocab_size, corpus)
            tok = train_spec_tokenizer(spec, work / shards.TOKENIZER, vocab_size, len(readable), TOKENIZER_LINES)
        else:
            shutil.copyfile(tokenizer, work / shards.TOKENIZER)
            tok = Tokenizer(work / shards.TOKENIZER)
        if tok.vocab_size > vocab_size:
            raise CorpusError(f"tokenizer {tokenizer or 'trained'} has {tok.vocab_size} pieces, more than "
                              f"vocab_size={vocab_size}")
        log.info("tokenizing %d documents of %s", len(readable), corpus)
        prepare(spec, show_progress=False)
        if out.exists():  # made meanwhile by another process: keep theirs
            return out
        os.replace(work / name, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def corpus_fingerprint(folder: Path, files: list[Path]) -> str:
    """Changes when any file is added, removed, or changes size or mtime."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


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
