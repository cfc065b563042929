"""SentencePiece tokenizers: load one (Llama-2's or our own) and train one on a corpus."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

import sentencepiece as spm

from tinytrain.errors import ConfigError

if TYPE_CHECKING:
    import torch

# Llama's special ids.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


class Tokenizer:
    def __init__(self, path: os.PathLike | str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: tokenizer model not found (expected a sentencepiece .model file)")
        self.proto = self.path.read_bytes()
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(self.proto)
        except Exception as e:
            raise ConfigError(f"{self.path}: not a sentencepiece model ({e})") from e
        self.sha256 = hashlib.sha256(self.proto).hexdigest()  # = shards.sha256_file(path)

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.processor.encode(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode(list(ids))

    def difference(self, other: "Tokenizer") -> Optional[str]:
        """None when ``other`` maps every id to the same piece (the same file, or the same vocabulary
        serialized differently); otherwise what differs, naming both files."""
        if self.sha256 == other.sha256:
            return None
        if self.vocab_size != other.vocab_size:
            return f"{self.path} has {self.vocab_size} pieces, {other.path} {other.vocab_size}"
        for i in range(self.vocab_size):
            a, b = self.processor.id_to_piece(i), other.processor.id_to_piece(i)
            if a != b:
                return f"id {i} is {a!r} in {self.path} but {b!r} in {other.path}"
        for name in ("bos_id", "eos_id", "unk_id"):
            if getattr(self.processor, name)() != getattr(other.processor, name)():
                return f"{name} differs between {self.path} and {other.path}"
        return None

    def describe(self) -> dict:
        """What a manifest or a checkpoint records about this tokenizer."""
        return {"file": self.path.name, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}


def train_tokenizer(
    lines: Iterable[str], out: os.PathLike | str, vocab_size: int, sample_lines: int = 300_000, seed: int = 0,
    threads: Optional[int] = None,
) -> Tokenizer:
    """Train a BPE tokenizer in the style of Llama-2's: byte fallback, digits split, whitespace kept
    (so code indentation survives a round trip), unk=0, bos=1, eos=2, no pad id."""
    if vocab_size < 260:
        raise ConfigError(f"tokenizer vocab_size must be at least 260 (256 byte pieces + specials), got {vocab_size}")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=0.9995, input_sentence_size=sample_lines,
        shuffle_input_sentence=True, num_threads=threads or min(os.cpu_count() or 1, 8), minloglevel=2,
        hard_vocab_limit=False,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out)
    return Tokenizer(out)


def byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (a byte-fallback piece is one byte, control pieces
    none), so the bytes behind any token ids are known without decoding them."""
    import torch  # only here: preparing data needs no torch

    sp = tokenizer.processor
    out = torch.zeros(sp.get_piece_size(), dtype=torch.int64)
    for i in range(sp.get_piece_size()):
        if not (sp.is_control(i) or sp.is_unknown(i)):
            out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out
