"""The global sample order, per-rank micro-batches, and the Lightning DataModule.

The data position is a pure function of the optimizer step. A global batch is a fixed number of
sequences G, set in the recipe. Sample k of the whole run is block ``permute(k mod n)`` of epoch
``k div n``, where n is the number of blocks of seq_len + 1 tokens in the training split and the
permutation is a keyed bijection of [0, n) (a Feistel network with cycle-walking), so finding
any sample costs O(1) time and memory at any scale: no permutation array, no replay on resume.
Global batch s is samples [s G, (s + 1) G); rank r of W reads its contiguous G / W of them,
as G / (W m) micro-batches of m. Resuming needs only the restored step, on any world size.

With a mixture of sources, a fixed interleaving by weight (``Mixture``) first maps sample k to
(source, sample number within the source), still in O(1); each source then runs through its own
epochs and permutations as above.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tinytrain import corpus as corpus_mod
from tinytrain import shards
from tinytrain.errors import ConfigError
from tinytrain.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _round_fn(x: np.ndarray, key: int) -> np.ndarray:
    # A strong 64-bit mix of (x xor key); arrays wrap on overflow, which is what we want.
    x = x ^ np.uint64(key)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, seed: int, epoch: int, rounds: int = 6) -> np.ndarray:
    """Image of ``index`` (values in [0, n)) under a keyed pseudo-random permutation of [0, n).

    A balanced Feistel network over the smallest even-bit domain 2^(2h) >= n, with cycle-walking
    (re-encrypt until the value falls inside [0, n)): a bijection for every n, O(1) per index.
    """
    index = np.asarray(index, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(index)
    half = max(1, math.ceil((n - 1).bit_length() / 2))
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    keys = [_splitmix64(_splitmix64(_splitmix64(seed) ^ epoch) ^ r) for r in range(rounds)]

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for key in keys:
            left, right = right, left ^ (_round_fn(right, key) & mask)
        return (left << shift) | right

    out = encrypt(index)
    outside = out >= np.uint64(n)
    while outside.any():
        out[outside] = encrypt(out[outside])
        outside = out >= np.uint64(n)
    return out


def sample_blocks(samples: np.ndarray, n_blocks: int, seed: int) -> np.ndarray:
    """Block index of each global sample id: epoch = k // n, then a fresh permutation per epoch."""
    samples = np.asarray(samples, dtype=np.int64)
    epochs, positions = np.divmod(samples, n_blocks)
    out = np.empty_like(samples)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = permute(positions[sel], n_blocks, seed, int(epoch)).astype(np.int64)
    return out


def rank_samples(step: int, global_batch: int, rank: int, world_size: int,
                 origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Global sample ids that rank ``rank`` reads at optimizer step ``step``, when step
    ``origin[0]`` starts at global sample ``origin[1]`` (where the stream was when the global
    batch took its current size)."""
    per_rank = global_batch // world_size
    start = origin[1] + (step - origin[0]) * global_batch + rank * per_rank
    return np.arange(start, start + per_rank, dtype=np.int64)


def grad_accumulation(global_batch: int, micro_batch: int, world_size: int) -> int:
    if global_batch % (micro_batch * world_size):
        raise ConfigError(
            f"data.global_batch_size={global_batch} is not divisible by data.micro_batch_size={micro_batch} "
            f"x world size {world_size} = {micro_batch * world_size}; choose a micro batch or number of "
            "devices that divides the global batch"
        )
    return global_batch // (micro_batch * world_size)


class Blocks:
    """Fixed-length blocks of seq_len + 1 tokens over a token stream, with stride seq_len, so each
    token after the first is a target exactly once per epoch. Blocks may span shard boundaries."""

    def __init__(self, stream: shards.TokenStream, seq_len: int) -> None:
        self.stream, self.seq_len = stream, seq_len
        self.n = (len(stream) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def block(self, b: int) -> np.ndarray:
        """The seq_len + 1 tokens of block b."""
        start = int(b) * self.seq_len
        return self.stream.slice(start, start + self.seq_len + 1)

    def gather(self, block_ids: np.ndarray, dtype=np.int64) -> torch.Tensor:
        out = np.empty((len(block_ids), self.seq_len + 1), dtype=dtype)
        for row, b in zip(out, block_ids):
            row[:] = self.block(b)
        return torch.from_numpy(out)

    def file_of(self, block: int, offset: int = 0) -> Path:
        """The shard holding token ``offset`` of block ``block``."""
        return self.stream.file_at(int(block) * self.seq_len + offset)


MIXTURE_PERIOD = 1_000_000
SOURCE_SEED_STRIDE = 1_000_003


class Mixture:
    """Which source, and which of that source's samples, global sample k is: O(1) per sample.

    Each period of P = 1,000,000 samples holds q_i = round(w_i P) samples of source i (largest
    remainders, so the q_i sum to P), in the order of their ideal times (j + 1/2) / q_i, ties to
    the lower source index. Any window of the order thus holds each source in proportion to its
    weight, up to one sample, and sample k is source ``pattern[k mod P]``'s sample number
    ``(k div P) q_i + rank[k mod P]``. A single source is the identity.
    """

    def __init__(self, weights: list[float], period: int = MIXTURE_PERIOD) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or not len(w) or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ConfigError(f"mixture weights must be positive numbers, got {list(weights)}")
        period = 1 if len(w) == 1 else period
        ideal = w / w.sum() * period
        quotas = np.floor(ideal).astype(np.int64)
        short = period - int(quotas.sum())
        quotas[np.argsort(-(ideal - quotas), kind="stable")[:short]] += 1
        if np.any(quotas == 0):
            raise ConfigError(f"mixture weight {w[quotas == 0][0]} is below 1/{period} of the total {w.sum()}")
        source = np.repeat(np.arange(len(w)), quotas)
        rank = np.concatenate([np.arange(q) for q in quotas])
        order = np.lexsort((source, (rank + 0.5) / quotas[source]))
        self.period, self.quotas = period, quotas
        self.weights = quotas / period
        self.pattern, self.rank = source[order], rank[order]
        # Where each source's samples sit in the period, ascending: counting is a binary search.
        self.positions = [np.flatnonzero(self.pattern == s) for s in range(len(w))]

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample number within the source) of each global sample id."""
        cycle, pos = np.divmod(np.asarray(samples, dtype=np.int64), self.period)
        source = self.pattern[pos]
        return source, cycle * self.quotas[source] + self.rank[pos]

    def drawn(self, n: int) -> np.ndarray:
        """How many of the first n global samples each source supplied."""
        cycle, pos = divmod(int(n), self.period)
        return cycle * self.quotas + np.array([np.searchsorted(p, pos) for p in self.positions])


class SampleOrder:
    """The run's global order over one or several sources: sample k -> tokens.

    Source s's own samples run through epochs of its n_s blocks, each a fresh permutation keyed
    by (seed + 1,000,003 s, epoch), so a source that runs out starts its next epoch, reshuffled,
    independently of the others.
    """

    def __init__(self, blocks: list[Blocks], seed: int, weights: Optional[list[float]] = None) -> None:
        self.blocks, self.seed = blocks, seed
        self.mixture = Mixture(weights if weights is not None else [1.0] * len(blocks))
        self.seq_len = blocks[0].seq_len

    def source_seed(self, source: int) -> int:
        return self.seed + SOURCE_SEED_STRIDE * source

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, block within the source) of each global sample id."""
        source, index = self.mixture.locate(samples)
        block = np.empty_like(index)
        for s in np.unique(source):
            sel = source == s
            block[sel] = sample_blocks(index[sel], len(self.blocks[s]), self.source_seed(int(s)))
        return source, block

    def gather(self, samples: np.ndarray, dtype=np.int64) -> np.ndarray:
        source, block = self.locate(samples)
        out = np.empty((len(block), self.seq_len + 1), dtype=dtype)
        for row, s, b in zip(out, source, block):
            row[:] = self.blocks[s].block(b)
        return out

    def file_of(self, sample: int, offset: int = 0) -> Path:
        """The shard holding token ``offset`` of global sample ``sample``."""
        source, block = self.locate(np.array([sample]))
        return self.blocks[int(source[0])].file_of(int(block[0]), offset)

    def epochs(self, samples: int) -> np.ndarray:
        """Epochs of each source that the first ``samples`` global samples cover (fractional)."""
        return self.mixture.drawn(samples) / np.array([len(b) for b in self.blocks], dtype=np.float64)


def _differences(saved: dict, now: dict, prefix: str) -> list[str]:
    """'key: checkpoint X, recipe Y' for every field of ``now`` that differs from ``saved``."""
    out = []
    for key in now:
        a, b = saved.get(key), now[key]
        if key == "sources" and isinstance(a, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                out += _differences(x, y, f"{prefix}sources[{i}].")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, recipe {b!r}")
    return out


def transit_dtype(vocab_size: Optional[int]) -> np.dtype:
    """The integer type token ids travel in from the loader to the device: int16 when the
    vocabulary fits (TinyLlama's 32,000 does), else int32; a quarter or half of int64's bytes in
    shared memory, pinned memory and the host-to-device copy. Ids are widened on the device."""
    return np.dtype(np.int16) if vocab_size is not None and vocab_size <= 2**15 else np.dtype(np.int32)


def check_ids(tokens: np.ndarray, vocab_size: Optional[int], file_at, raw_row) -> None:
    """Stop, naming the file, if a row holds an id outside [0, vocab_size) (a value too large for
    the transit type shows as negative). ``file_at(row, column)`` names the shard of a token,
    ``raw_row(row)`` reads a row again as int64, for the message."""
    if vocab_size is None or not tokens.size or (tokens.min() >= 0 and tokens.max() < vocab_size):
        return
    row, column = (int(i[0]) for i in np.nonzero((tokens < 0) | (tokens >= vocab_size)))
    raise shards.ShardError(f"{file_at(row, column)}: holds token id {int(raw_row(row)[column])} >= the model's "
                            f"vocab_size {vocab_size}; the file changed after preparation (check it with "
                            "`tinytrain prepare --verify`)")


class TrainSteps(IterableDataset):
    """Yields, for each optimizer step from ``start_step``, this rank's (accum, micro, seq_len + 1) tokens.

    With several loader workers, worker w yields steps start + w, start + w + n_workers, ...;
    the DataLoader interleaves them round-robin, so the order is unchanged. A token id at or above
    ``vocab_size`` (a shard altered after it was checked) stops the run naming its file, instead of
    reaching the embedding as an out-of-range index. Tokens are ``transit_dtype(vocab_size)``.
    """

    def __init__(self, order: SampleOrder, global_batch: int, micro_batch: int, rank: int,
                 world_size: int, start_step: int, stop_step: Optional[int], vocab_size: Optional[int] = None,
                 origin: tuple[int, int] = (0, 0)) -> None:
        self.order = order
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.accum = grad_accumulation(global_batch, micro_batch, world_size)
        self.start_step, self.stop_step = start_step, stop_step
        self.vocab_size, self.origin = vocab_size, origin

    def step_batch(self, step: int) -> torch.Tensor:
        samples = rank_samples(step, self.global_batch, self.rank, self.world_size, self.origin)
        tokens = self.order.gather(samples, transit_dtype(self.vocab_size))
        check_ids(tokens, self.vocab_size, lambda row, col: self.order.file_of(int(samples[row]), col),
                  lambda row: self.order.gather(samples[row:row + 1])[0])
        return torch.from_numpy(tokens).view(self.accum, self.micro_batch, -1)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        step = self.start_step + worker
        while self.stop_step is None or step < self.stop_step:
            yield self.step_batch(step)
            step += n_workers


class ValBatches(IterableDataset):
    """The first ``batches`` x world x micro blocks of the validation split, in order; each rank its
    share. Token ids are checked against ``vocab_size`` as training batches are."""

    def __init__(self, blocks: Blocks, batches: int, micro_batch: int, rank: int, world_size: int,
                 vocab_size: Optional[int] = None) -> None:
        self.blocks, self.batches, self.micro_batch = blocks, batches, micro_batch
        self.rank, self.world_size, self.vocab_size = rank, world_size, vocab_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        for b in range(self.batches):
            first = (b * self.world_size + self.rank) * self.micro_batch
            ids = np.arange(first, first + self.micro_batch)
            tokens = self.blocks.gather(ids, transit_dtype(self.vocab_size))
            check_ids(tokens.numpy(), self.vocab_size, lambda row, col: self.blocks.file_of(int(ids[row]), col),
                      lambda row: self.blocks.block(ids[row]))
            yield tokens


@dataclass
class DataSource:
    """One prepared folder of a training mixture."""

    path: str
    """A prepared folder (made by `tinytrain prepare`); a relative path is taken inside data.path."""
    weight: float = 1.0
    """Share of training samples drawn from this source (weights are normalized to sum to 1)."""
    name: Optional[str] = None
    """Name in logs and metrics (default: the folder's name)."""


class TokenData(L.LightningDataModule):
    def __init__(
        self,
        path: Optional[str] = None,
        sources: Optional[list[DataSource]] = None,
        corpus: Optional[str] = None,
        cache_dir: Optional[str] = None,
        tokenizer: Optional[str] = None,
        vocab_size: int = 32000,
        seq_len: int = 2048,
        global_batch_size: int = 1024,
        micro_batch_size: int = 8,
        seed: int = 3407,
        val_batches: int = 8,
        val_fraction: float = 0.02,
        verify: str = "header",
        num_workers: int = 1,
        step_offset: int = 0,
        resize_global_batch: bool = False,
    ) -> None:
        """Token shards for training and validation: one prepared folder, or a weighted mixture.

        Args:
            path: A prepared data folder (manifest.json + shards, made by `tinytrain prepare`); with
                ``sources``, the folder their relative paths are read from. When both are unset, the
                text files of ``corpus`` are prepared on first use and cached.
            sources: A training mixture: prepared folders with weights, e.g. TinyLlama's
                [{path: slimpajama, weight: 0.693584}, {path: starcoder, weight: 0.306416}]. Each
                source runs through its own epochs, reshuffled each time; validation reads every
                source (val/loss is their mean, val/loss/<name> each one).
            corpus: A folder of text files to prepare when ``path`` and ``sources`` are unset; unset
                means the embedded default corpus, this Python's standard library source.
            cache_dir: Where prepared corpora are cached (default $TINYTRAIN_CACHE or ~/.cache/tinytrain).
            tokenizer: A sentencepiece .model the shards must have been made with (checked by hash);
                unset means the tokenizer stored in the prepared folder.
            vocab_size: The model's vocabulary size (linked from model.config.vocab_size).
            seq_len: Tokens per training sequence (each sample reads seq_len + 1).
            global_batch_size: Sequences per optimizer step, whatever the number of devices.
            micro_batch_size: Sequences per forward/backward pass on one device.
            seed: Seed of the sample order.
            val_batches: Validation micro-batches per device and source at each validation.
            val_fraction: Share of documents held out for validation when preparing a corpus.
            verify: "header" checks shard headers, sizes and the manifest at start-up; "full" also
                re-hashes every file and scans every token id.
            num_workers: DataLoader worker processes.
            step_offset: Optimizer step s reads global batch s + step_offset of the sample order:
                where in the data stream a run (e.g. continued pretraining) starts.
            resize_global_batch: On resume, accept a global_batch_size other than the checkpoint's:
                the stream goes on from the sample where it stopped, in batches of the new size, so
                nothing is skipped or read twice. Otherwise a change is refused.
        """
        super().__init__()
        if path == "???":
            raise ConfigError("data.path is required by this recipe: pass --data.path with a prepared data folder "
                             "(made by `tinytrain prepare`)")
        self.path = Path(path).expanduser() if path else None
        self.sources = [s if isinstance(s, DataSource) else DataSource(**s) for s in (sources or [])]
        for i, src in enumerate(self.sources):
            if not src.weight > 0 or not math.isfinite(src.weight):
                raise ConfigError(f"data.sources[{i}].weight must be a positive number, got {src.weight}")
        names = [self._source_name(s) for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources have repeated names {names}; give each a distinct name")
        self.corpus = Path(corpus).expanduser() if corpus else None
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else corpus_mod.default_cache_dir()
        self.tokenizer_file = Path(tokenizer).expanduser() if tokenizer else None
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.seed, self.val_batches, self.val_fraction = seed, val_batches, val_fraction
        self.verify, self.num_workers = verify, num_workers
        if step_offset < 0:
            raise ConfigError(f"data.step_offset must be >= 0, got {step_offset}")
        self.step_offset, self.resize_global_batch = step_offset, resize_global_batch
        # Step origin[0] reads global sample origin[1]: moved on resume when the global batch changes.
        self.origin = (0, step_offset * global_batch_size)
        self.first_sample = self.origin[1]
        for name in ("seq_len", "global_batch_size", "micro_batch_size", "val_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if verify not in ("header", "full"):
            raise ConfigError(f"data.verify must be 'header' or 'full', got {verify!r}")
        self.folders: list[Path] = []
        self.names: list[str] = []
        self.order: Optional[SampleOrder] = None
        self.val_sets: list[Blocks] = []
        self.val_batches_per_source: list[int] = []

    # --- locating and checking the data -------------------------------------------------------

    @staticmethod
    def _source_name(source: DataSource) -> str:
        return source.name or Path(source.path).name

    def source_folders(self, prepare: bool) -> list[Path]:
        if self.sources:
            return [Path(s.path).expanduser() if self.path is None else self.path / Path(s.path).expanduser()
                    for s in self.sources]
        if self.path is not None:
            return [self.path]
        args = (self.corpus, self.cache_dir, self.vocab_size, self.val_fraction)
        return [corpus_mod.cached_prepare(*args) if prepare else corpus_mod.cached_prepare_path(*args)]

    @property
    def folder(self) -> Optional[Path]:
        """The (first) prepared folder, once opened."""
        return self.folders[0] if self.folders else None

    @property
    def train_blocks(self) -> Optional[Blocks]:
        return self.order.blocks[0] if self.order is not None else None

    def prepare_data(self) -> None:
        # Called on one process per node before setup(): tokenize the corpus once.
        self.source_folders(prepare=True)

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer the shards were made with."""
        assert self.folder is not None, "setup() first"
        if self.tokenizer_file is not None:
            return self.tokenizer_file
        path = self.folder / "tokenizer.model"
        if not path.is_file():
            raise shards.ShardError(f"{self.folder}: no tokenizer.model beside the shards; set data.tokenizer")
        return path

    def open(self, world_size: int = 1) -> None:
        """Check and memory-map every source's splits; raise before any training on bad data."""
        folders = self.source_folders(prepare=False)
        names = [self._source_name(s) for s in self.sources] if self.sources else [folders[0].name]
        sha = Tokenizer(self.tokenizer_file).sha256 if self.tokenizer_file is not None else None
        if sha is None and len(folders) > 1:
            # All sources must share one tokenizer: the first one's, unless data.tokenizer names it.
            sha = shards.read_manifest(folders[0])["tokenizer"].get("sha256")
        grad_accumulation(self.global_batch_size, self.micro_batch_size, world_size)
        per_val = self.micro_batch_size * world_size
        train_sets, val_sets, val_batches = [], [], []
        for folder in folders:
            train = Blocks(shards.open_split(folder, "train", self.vocab_size, sha, self.verify), self.seq_len)
            val = Blocks(shards.open_split(folder, "val", self.vocab_size, sha, self.verify), self.seq_len)
            if len(train) == 0:
                raise shards.ShardError(f"{folder}: training split has {len(train.stream)} tokens, "
                                        "fewer than seq_len + 1")
            if len(val) < per_val:
                raise shards.ShardError(
                    f"{folder}: validation split has {len(val.stream)} tokens, fewer than one validation batch "
                    f"({per_val} sequences of {self.seq_len + 1}); raise data.val_fraction or lower seq_len"
                )
            fit = min(self.val_batches, len(val) // per_val)
            if fit < self.val_batches and self._is_rank_zero():
                log.warning("%s: validation split holds %d batches, not %d: using %d", folder, fit,
                            self.val_batches, fit)
            train_sets.append(train)
            val_sets.append(val)
            val_batches.append(fit)
        for val, n in zip(val_sets, val_batches):  # the validation blocks every validation reads, checked now
            for rank in range(world_size):
                for _ in ValBatches(val, n, self.micro_batch_size, rank, world_size, self.vocab_size):
                    pass
        weights = [s.weight for s in self.sources] if self.sources else None
        self.order = SampleOrder(train_sets, self.seed, weights)
        self.fingerprints = [shards.split_fingerprint(folder, "train") for folder in folders]
        self.folders, self.names, self.val_sets, self.val_batches_per_source = folders, names, val_sets, val_batches
        if self._is_rank_zero():
            for name, folder, train, w, vb in zip(names, folders, train_sets, self.order.mixture.weights, val_batches):
                log.info("data %s (%s): weight %.6f, %d train blocks of %d tokens (%.1f epochs per 1000 steps), "
                         "%d validation batches", name, folder, w, len(train), self.seq_len + 1,
                         1000 * self.global_batch_size * w / len(train), vb)

    def samples_before(self, step: int) -> int:
        """The global sample that optimizer step ``step`` starts at."""
        return self.origin[1] + (step - self.origin[0]) * self.global_batch_size

    def tokens_trained(self, steps: int) -> int:
        """Tokens the first ``steps`` optimizer steps of this run trained on (every global batch size it had)."""
        return (self.samples_before(steps) - self.first_sample) * self.seq_len

    def epochs_completed(self, steps: int) -> dict[str, float]:
        """Epochs of each source read by the first ``steps`` optimizer steps (fractional), with step_offset."""
        assert self.order is not None, "setup() first"
        epochs = self.order.epochs(self.samples_before(steps))
        return dict(zip(self.names, epochs.tolist()))

    # --- the stream's identity, kept in every checkpoint ---------------------------------------

    def stream(self) -> dict:
        """What defines the sequence of samples: a resume must continue exactly this (or refuse)."""
        assert self.order is not None, "setup() first"
        return {"seq_len": self.seq_len, "seed": self.seed, "step_offset": self.step_offset,
                "sources": [{"name": name, "weight": float(w), "train_blocks": len(blocks), "shards": fingerprint}
                            for name, w, blocks, fingerprint in zip(self.names, self.order.mixture.weights,
                                                                    self.order.blocks, self.fingerprints)]}

    def state_dict(self) -> dict:
        step = self.trainer.global_step if self.trainer is not None else 0
        return {"stream": self.stream(), "global_batch_size": self.global_batch_size, "step": step,
                "samples_seen": self.samples_before(step), "first_sample": self.first_sample}

    def load_state_dict(self, state: dict) -> None:
        saved, now = state["stream"], self.stream()
        changed = _differences(saved, now, "data.")
        if changed:
            raise ConfigError(
                "resuming would change the run's data stream: " + "; ".join(changed) + ". Resume with the "
                "recipe's original data settings, or start a new run (a new --trainer.default_root_dir, with "
                "--model.init_from and --data.step_offset to choose where in the data it starts)")
        if state["global_batch_size"] != self.global_batch_size and not self.resize_global_batch:
            raise ConfigError(
                f"data.global_batch_size is {self.global_batch_size}, the checkpoint's is "
                f"{state['global_batch_size']}: to go on with the new size from step {state['step']} (sample "
                f"{state['samples_seen']:,}), nothing skipped or repeated, pass --data.resize_global_batch true")
        if state["global_batch_size"] != self.global_batch_size and self._is_rank_zero():
            log.info("global batch %d -> %d at step %d (sample %d)", state["global_batch_size"],
                     self.global_batch_size, state["step"], state["samples_seen"])
        self.origin, self.first_sample = (state["step"], state["samples_seen"]), state["first_sample"]

    def _is_rank_zero(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero

    def setup(self, stage: str) -> None:
        if self.order is None:
            self.open(self.trainer.world_size if self.trainer else 1)

    # --- loaders ------------------------------------------------------------------------------

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def train_dataset(self, start_step: int, stop_step: Optional[int]) -> TrainSteps:
        rank, world = self._rank()
        return TrainSteps(self.order, self.global_batch_size, self.micro_batch_size, rank, world, start_step,
                          stop_step, vocab_size=self.vocab_size, origin=self.origin)

    def train_dataloader(self) -> DataLoader:
        # The trainer has restored the step (and the stream's origin) from the checkpoint before asking for this.
        start = self.trainer.global_step if self.trainer else 0
        stop = self.trainer.max_steps if self.trainer and self.trainer.max_steps >= 0 else None
        return self._loader(self.train_dataset(start, stop))

    def val_dataloader(self):
        rank, world = self._rank()
        loaders = [self._loader(ValBatches(val, n, self.micro_batch_size, rank, world, self.vocab_size))
                   for val, n in zip(self.val_sets, self.val_batches_per_source)]
        return loaders[0] if len(loaders) == 1 else loaders

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=False)
