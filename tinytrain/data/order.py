"""The global sample order and each rank's batches: pure functions of the step, no Lightning.

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

import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from tinytrain.data import shards
from tinytrain.errors import ConfigError

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


def step_start(step: int, global_batch: int, origin: tuple[int, int] = (0, 0)) -> int:
    """The global sample optimizer step ``step`` starts at, when step ``origin[0]`` starts at global
    sample ``origin[1]`` (where the stream was when the global batch took its current size, or where
    a rollback went on from): the one function for a run's data position."""
    return origin[1] + (step - origin[0]) * global_batch


def rank_samples(step: int, global_batch: int, rank: int, world_size: int,
                 origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Global sample ids that rank ``rank`` reads at optimizer step ``step``."""
    per_rank = global_batch // world_size
    start = step_start(step, global_batch, origin) + rank * per_rank
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
