"""The Lightning DataModule: prepared folders (or a corpus prepared on first use), checked at
start-up, read in the order of tinytrain.data.order, with the stream's identity kept in checkpoints."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from tinytrain.data import corpus as corpus_mod
from tinytrain.data import shards
from tinytrain.data.order import Blocks, SampleOrder, TrainSteps, ValBatches, grad_accumulation, step_start
from tinytrain.errors import ConfigError

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class DataSpec:
    """The data as the model side sees it: sizes, source names and the tokenizer's identity."""

    seq_len: int
    global_batch_size: int
    source_names: tuple[str, ...]
    tokenizer: Optional[Path]
    """The tokenizer file the shards were made with (None if it is not beside them)."""
    tokenizer_sha256: Optional[str]
    """Its sha256, as the manifest records it (or of data.tokenizer, when given)."""
    bos_id: Optional[int] = None
    """The tokenizer's BOS id."""
    bos_per_document: bool = True
    """Every document of the shards starts with BOS (the preparation's setting)."""
    islands: int = 1
    """Asynchronous Local SGD's island count: this job trains on 1/islands of every global batch."""

    @property
    def tokens_per_step(self) -> int:
        """Tokens this job trains on per optimizer step."""
        return self.global_batch_size * self.seq_len // self.islands


@dataclass(frozen=True)
class RollbackSkip:
    """A resume from the checkpoint of step ``at_step`` that goes on at sample ``resume_at_sample``,
    past the data of steps that spiked (see tinytrain.store.rollbacks)."""

    at_step: int
    resume_at_sample: int
    skipped_samples: int
    spike_steps: tuple[int, ...]


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
        allow_repeats_in_step: bool = False,
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
            allow_repeats_in_step: Train on a split (or a mixture's source) that holds fewer blocks
                than one optimizer step reads from it, so that a step reads some blocks several
                times. Refused otherwise, naming the sizes.
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
        self.allow_repeats_in_step = allow_repeats_in_step
        if step_offset < 0:
            raise ConfigError(f"data.step_offset must be >= 0, got {step_offset}")
        self.step_offset, self.resize_global_batch = step_offset, resize_global_batch
        # Step origin[0] reads global sample origin[1]: moved on resume when the global batch changes.
        self.origin = (0, step_offset * global_batch_size)
        self.first_sample = self.origin[1]
        self.skipped_samples = 0  # by rollbacks after loss spikes (tinytrain.train.spikes)
        self.rollback_skip: Optional[RollbackSkip] = None  # the rollback a resume applies (set by `tinytrain fit`)
        # (index, count) with asynchronous Local SGD: this job is island `index` of `count`, each a job of the same
        # size, and its rank r reads the slice of rank index x world + r of count x world (set by local_sgd).
        self.island_share: tuple[int, int] = (0, 1)
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
    def train_blocks(self) -> Optional[Blocks]:
        return self.order.blocks[0] if self.order is not None else None

    def prepare_data(self) -> None:
        # Called on one process per node before setup(): tokenize the corpus once.
        self.source_folders(prepare=True)

    def spec(self) -> "DataSpec":
        """What the model side needs to know about the data, once it is open."""
        assert self.order is not None, "setup() first"
        return DataSpec(self.seq_len, self.global_batch_size, tuple(self.names), self.tokenizer, self.tokenizer_sha256,
                        self.bos_id, self.bos_per_document, self.island_share[1])

    def open(self, world_size: int = 1) -> None:
        """Check and memory-map every source's splits; raise before any training on bad data."""
        folders = self.source_folders(prepare=False)
        names = [self._source_name(s) for s in self.sources] if self.sources else [folders[0].name]
        # All sources share one tokenizer: data.tokenizer if given, else the one the first was made with.
        sha = shards.sha256_file(self.tokenizer_file) if self.tokenizer_file is not None else \
            shards.read_manifest(folders[0])["tokenizer"].get("sha256")
        tokenizer = self.tokenizer_file or folders[0] / shards.TOKENIZER
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
        self._check_step_fits(folders, train_sets)
        self.fingerprints = [shards.split_fingerprint(folder, "train") for folder in folders]
        self.folders, self.names, self.val_sets, self.val_batches_per_source = folders, names, val_sets, val_batches
        self.tokenizer = tokenizer if tokenizer.is_file() else None
        self.tokenizer_sha256 = sha
        manifests = [shards.read_manifest(folder) for folder in folders]
        self.bos_id = manifests[0]["tokenizer"].get("bos_id")
        self.bos_per_document = all(m.get("settings", {}).get("bos", True) for m in manifests)
        if self._is_rank_zero():
            for name, folder, train, w, vb in zip(names, folders, train_sets, self.order.mixture.weights, val_batches):
                log.info("data %s (%s): weight %.6f, %d train blocks of %d tokens (%.1f epochs per 1000 steps), "
                         "%d validation batches", name, folder, w, len(train), self.seq_len + 1,
                         1000 * self.global_batch_size * w / len(train), vb)

    def _check_step_fits(self, folders: list[Path], train_sets: list[Blocks]) -> None:
        """A step that reads some blocks of a split several times is refused unless asked for."""
        for folder, train, w in zip(folders, train_sets, self.order.mixture.weights):
            per_step = self.global_batch_size * w
            if len(train) >= per_step:
                continue
            share = f" x weight {w:.4f}" if len(train_sets) > 1 else ""
            message = (f"{folder}: training split holds {len(train)} blocks of {self.seq_len + 1} tokens, fewer than the "
                       f"{per_step:.0f} sequences one step reads from it (data.global_batch_size {self.global_batch_size}"
                       f"{share}): each block would be read about {per_step / len(train):.1f} times within a step")
            if not self.allow_repeats_in_step:
                raise ConfigError(message + "; add data, lower data.global_batch_size or data.seq_len, or pass "
                                  "--data.allow_repeats_in_step true")
            if self._is_rank_zero():
                log.warning("%s (data.allow_repeats_in_step)", message)

    def samples_before(self, step: int) -> int:
        """The global sample that optimizer step ``step`` starts at."""
        return step_start(step, self.global_batch_size, self.origin)

    def tokens_trained(self, steps: int) -> int:
        """Tokens the first ``steps`` optimizer steps of this run trained on (every global batch size it
        had; samples skipped by a rollback after loss spikes not counted)."""
        # An asynchronous island trains on its share of each global batch only.
        return (self.samples_before(steps) - self.first_sample - self.skipped_samples) * self.seq_len \
            // self.island_share[1]

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
                "samples_seen": self.samples_before(step), "first_sample": self.first_sample,
                "skipped_samples": self.skipped_samples}

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
        self.skipped_samples = state.get("skipped_samples", 0)
        skip = self.rollback_skip
        if skip is not None and skip.at_step == state["step"]:
            # loss spikes after this checkpoint: go on from the sample after the last of them
            self.origin = (state["step"], skip.resume_at_sample)
            self.skipped_samples += skip.skipped_samples
            if self._is_rank_zero():
                log.info("rolled back to step %d: skipping samples %d to %d (the data of the spikes at steps %s)",
                         state["step"], state["samples_seen"], skip.resume_at_sample - 1,
                         ", ".join(map(str, skip.spike_steps)))

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
        index, count = self.island_share  # asynchronous islands: this job's ranks are a share of a larger world
        rank, world = index * world + rank, count * world
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
