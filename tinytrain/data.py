"""The global sample order, per-rank micro-batches, and the Lightning DataModule.

The data position is a pure function of the optimizer step. A global batch is a fixed number of
sequences G, set in the recipe. Sample k of the whole run is block ``permute(k mod n)`` of epoch
``k div n``, where n is the number of blocks of seq_len + 1 tokens in the training split and the
permutation is a keyed bijection of [0, n) (a Feistel network with cycle-walking), so finding
any sample costs O(1) time and memory at any scale: no permutation array, no replay on resume.
Global batch s is samples [s G, (s + 1) G); rank r of W reads its contiguous G / W of them,
as G / (W m) micro-batches of m. Resuming needs only the restored step, on any world size.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterator, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tinytrain import corpus as corpus_mod
from tinytrain import shards
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


def rank_samples(step: int, global_batch: int, rank: int, world_size: int) -> np.ndarray:
    """Global sample ids that rank ``rank`` reads at optimizer step ``step``."""
    per_rank = global_batch // world_size
    start = step * global_batch + rank * per_rank
    return np.arange(start, start + per_rank, dtype=np.int64)


def grad_accumulation(global_batch: int, micro_batch: int, world_size: int) -> int:
    if global_batch % (micro_batch * world_size):
        raise ValueError(
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

    def gather(self, block_ids: np.ndarray) -> torch.Tensor:
        out = np.empty((len(block_ids), self.seq_len + 1), dtype=np.int64)
        for row, b in enumerate(block_ids):
            start = int(b) * self.seq_len
            out[row] = self.stream.slice(start, start + self.seq_len + 1)
        return torch.from_numpy(out)


class TrainSteps(IterableDataset):
    """Yields, for each optimizer step from ``start_step``, this rank's (accum, micro, seq_len + 1) tokens.

    With several loader workers, worker w yields steps start + w, start + w + n_workers, ...;
    the DataLoader interleaves them round-robin, so the order is unchanged.
    """

    def __init__(self, blocks: Blocks, seed: int, global_batch: int, micro_batch: int, rank: int,
                 world_size: int, start_step: int, stop_step: Optional[int]) -> None:
        self.blocks, self.seed = blocks, seed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.accum = grad_accumulation(global_batch, micro_batch, world_size)
        self.start_step, self.stop_step = start_step, stop_step

    def step_batch(self, step: int) -> torch.Tensor:
        ids = sample_blocks(rank_samples(step, self.global_batch, self.rank, self.world_size),
                            len(self.blocks), self.seed)
        return self.blocks.gather(ids).view(self.accum, self.micro_batch, -1)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        step = self.start_step + worker
        while self.stop_step is None or step < self.stop_step:
            yield self.step_batch(step)
            step += n_workers


class ValBatches(IterableDataset):
    """The first ``batches`` x world x micro blocks of the validation split, in order; each rank its share."""

    def __init__(self, blocks: Blocks, batches: int, micro_batch: int, rank: int, world_size: int) -> None:
        self.blocks, self.batches, self.micro_batch = blocks, batches, micro_batch
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        for b in range(self.batches):
            first = (b * self.world_size + self.rank) * self.micro_batch
            yield self.blocks.gather(np.arange(first, first + self.micro_batch))


class TokenData(L.LightningDataModule):
    def __init__(
        self,
        path: Optional[str] = None,
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
    ) -> None:
        """Token shards for training and validation.

        Args:
            path: A prepared data folder (manifest.json + shards, made by `tinytrain prepare`).
                When unset, the text files of ``corpus`` are prepared on first use and cached.
            corpus: A folder of text files to prepare when ``path`` is unset; unset means the
                embedded default corpus, this Python's standard library source.
            cache_dir: Where prepared corpora are cached (default $TINYTRAIN_CACHE or ~/.cache/tinytrain).
            tokenizer: A sentencepiece .model the shards must have been made with (checked by hash);
                unset means the tokenizer stored in the prepared folder.
            vocab_size: The model's vocabulary size (linked from model.config.vocab_size).
            seq_len: Tokens per training sequence (each sample reads seq_len + 1).
            global_batch_size: Sequences per optimizer step, whatever the number of devices.
            micro_batch_size: Sequences per forward/backward pass on one device.
            seed: Seed of the sample order.
            val_batches: Validation micro-batches per device at each validation.
            val_fraction: Share of documents held out for validation when preparing a corpus.
            verify: "header" checks shard headers, sizes and the manifest at start-up; "full" also
                re-hashes every file and scans every token id.
            num_workers: DataLoader worker processes.
            step_offset: Optimizer step s reads global batch s + step_offset of the sample order:
                where in the data stream a run (e.g. continued pretraining) starts.
        """
        super().__init__()
        if path == "???":
            raise ValueError("data.path is required by this recipe: pass --data.path with a prepared data folder "
                             "(made by `tinytrain prepare`)")
        self.path = Path(path).expanduser() if path else None
        self.corpus = Path(corpus).expanduser() if corpus else None
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else corpus_mod.default_cache_dir()
        self.tokenizer_file = Path(tokenizer).expanduser() if tokenizer else None
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.seed, self.val_batches, self.val_fraction = seed, val_batches, val_fraction
        self.verify, self.num_workers = verify, num_workers
        if step_offset < 0:
            raise ValueError(f"data.step_offset must be >= 0, got {step_offset}")
        self.step_offset = step_offset
        for name in ("seq_len", "global_batch_size", "micro_batch_size", "val_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")
        if verify not in ("header", "full"):
            raise ValueError(f"data.verify must be 'header' or 'full', got {verify!r}")
        self.folder: Optional[Path] = None
        self.train_blocks: Optional[Blocks] = None
        self.val_blocks: Optional[Blocks] = None

    # --- locating and checking the data -------------------------------------------------------

    def prepared_folder(self, prepare: bool) -> Path:
        if self.path is not None:
            return self.path
        return corpus_mod.cached_prepare(self.corpus, self.cache_dir, self.vocab_size, self.val_fraction) if prepare \
            else corpus_mod.cached_prepare_path(self.corpus, self.cache_dir, self.vocab_size, self.val_fraction)

    def prepare_data(self) -> None:
        # Called on one process per node before setup(): tokenize the corpus once.
        self.prepared_folder(prepare=True)

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
        """Check and memory-map both splits; raise before any training on bad data."""
        self.folder = self.prepared_folder(prepare=False)
        sha = Tokenizer(self.tokenizer_file).sha256 if self.tokenizer_file is not None else None
        train = shards.open_split(self.folder, "train", self.vocab_size, sha, self.verify)
        val = shards.open_split(self.folder, "val", self.vocab_size, sha, self.verify)
        self.train_blocks, self.val_blocks = Blocks(train, self.seq_len), Blocks(val, self.seq_len)
        if len(self.train_blocks) == 0:
            raise shards.ShardError(f"{self.folder}: training split has {len(train)} tokens, fewer than seq_len + 1")
        grad_accumulation(self.global_batch_size, self.micro_batch_size, world_size)
        per_val = self.micro_batch_size * world_size
        if len(self.val_blocks) < per_val:
            raise shards.ShardError(
                f"{self.folder}: validation split has {len(val)} tokens, fewer than one validation batch "
                f"({per_val} sequences of {self.seq_len + 1}); raise data.val_fraction or lower seq_len"
            )
        if len(self.val_blocks) < self.val_batches * per_val:
            fit = len(self.val_blocks) // per_val
            if self._is_rank_zero():
                log.warning("validation split holds %d batches, not %d: using %d", fit, self.val_batches, fit)
            self.val_batches = fit
        if self._is_rank_zero():
            log.info("data %s: %d train blocks of %d tokens (%.1f steps per epoch), %d validation batches",
                     self.folder, len(self.train_blocks), self.seq_len + 1,
                     len(self.train_blocks) / self.global_batch_size, self.val_batches)

    def _is_rank_zero(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero

    def setup(self, stage: str) -> None:
        if self.train_blocks is None:
            self.open(self.trainer.world_size if self.trainer else 1)

    # --- loaders ------------------------------------------------------------------------------

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def train_dataset(self, start_step: int, stop_step: Optional[int]) -> TrainSteps:
        rank, world = self._rank()
        return TrainSteps(self.train_blocks, self.seed, self.global_batch_size, self.micro_batch_size,
                          rank, world, start_step, stop_step)

    def train_dataloader(self) -> DataLoader:
        # The trainer has restored the step from the checkpoint (if any) before asking for this.
        start = (self.trainer.global_step if self.trainer else 0) + self.step_offset
        stop = self.trainer.max_steps + self.step_offset if self.trainer and self.trainer.max_steps >= 0 else None
        return self._loader(self.train_dataset(start, stop))

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        return self._loader(ValBatches(self.val_blocks, self.val_batches, self.micro_batch_size, rank, world))

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=False)
