"""The LightningModule: next-token loss, AdamW with warmup + cosine, clipping, validation.

One Lightning batch is one optimizer step: the loader hands this rank all its micro-batches of
the step at once, shaped (accumulation, micro batch, seq_len + 1), and ``training_step``
accumulates over them. So ``global_step``, ``batch_idx``, ``max_steps``, ``val_check_interval``
and checkpoint intervals all count optimizer steps, and the learning rate is a pure function of
the step (nothing to restore on resume).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from tinytrain import parallel
from tinytrain.errors import CheckpointError, ConfigError
from tinytrain.model import Llama, LlamaConfig
from tinytrain.step import train_step

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (linear warmup, cosine decay, then constant)."""

    lr: float = 4e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 4e-5
    """Learning rate at decay_steps and after."""
    warmup_steps: int = 2000
    """Optimizer steps of linear warmup from 0."""
    decay_steps: int = 1_430_512
    """Step at which the cosine decay reaches min_lr."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices and embeddings, not to norm weights."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    fused: Optional[bool] = None
    """Use the fused AdamW kernel; None lets PyTorch choose."""

    def __post_init__(self) -> None:
        problems = [f"{key} must be >= 0, got {getattr(self, key)}" for key in
                    ("lr", "min_lr", "warmup_steps", "decay_steps", "weight_decay", "grad_clip") if getattr(self, key) < 0]
        if self.warmup_steps > self.decay_steps:
            problems.append(f"warmup_steps ({self.warmup_steps}) must not exceed decay_steps ({self.decay_steps}): the "
                            "learning rate would jump from the warmup's peak to min_lr")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            problems.append(f"eps must be > 0, got {self.eps}")
        if problems:
            raise ConfigError("; ".join(f"model.optim.{p}" for p in problems))

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if step >= self.decay_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)


def adamw(model: torch.nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings, none on norm weights."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr_at(0), betas=tuple(o.betas), eps=o.eps, fused=o.fused)


class LitLlama(L.LightningModule):
    def __init__(
        self,
        config: LlamaConfig = LlamaConfig(),
        optim: OptimConfig = OptimConfig(),
        attention: str = "auto",
        activation_checkpointing: bool = False,
        compile: bool = False,
        init_from: Optional[str] = None,
        peak_flops: Optional[float] = None,
        loss_chunk_size: int = 0,
        compile_loss: bool = False,
        float8: bool = False,
    ) -> None:
        """A Llama model trained on next-token prediction.

        Args:
            config: The architecture (see tinytrain.model.LlamaConfig and its presets).
            optim: AdamW, learning-rate schedule and gradient clipping.
            attention: "auto" (flash-attn when installed on CUDA, else PyTorch SDPA), "sdpa" (PyTorch
                chooses the kernel), "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math" (that SDPA
                kernel only) or "flash-attn".
            activation_checkpointing: Recompute each block's activations in backward, to save memory.
            compile: torch.compile each transformer block.
            init_from: Start from these weights (a tinytrain checkpoint folder, e.g. one made by
                `tinytrain convert from-hf`, or a Hugging Face Llama folder) with a fresh optimizer
                and step 0. Ignored when resuming a run from its own checkpoint.
            peak_flops: Peak FLOP/s of one device, for the logged MFU; None looks GPUs up in a table
                of bf16 peaks (tinytrain.model.PEAK_FLOPS) and, on CPU, measures a matrix product
                at the start of training.
            loss_chunk_size: > 0 computes the loss this many tokens at a time, never holding fp32
                logits for the whole micro-batch (0: the plain cross-entropy).
            compile_loss: torch.compile the output head and cross-entropy.
            float8: Experimental. Float8 matmuls in the blocks' linear layers (torchao, dynamic
                tensorwise scaling; needs compute capability 8.9+, e.g. H100). Changes the numerics.
        """
        super().__init__()
        if init_from == "???":
            raise ConfigError("model.init_from is required by this recipe: pass --model.init_from with a checkpoint "
                             "folder (e.g. from `tinytrain convert from-hf`) or a Hugging Face Llama folder")
        self.config, self.optim = config, optim
        self.attention, self.activation_checkpointing, self.compile_blocks = attention, activation_checkpointing, compile
        self.init_from = init_from
        self.peak_flops = peak_flops
        if loss_chunk_size < 0:
            raise ConfigError(f"model.loss_chunk_size must be >= 0, got {loss_chunk_size}")
        self.loss_chunk_size = loss_chunk_size
        self.compile_loss, self.float8 = compile_loss, float8
        self.automatic_optimization = False
        self.model: Optional[Llama] = None
        self._step_started: Optional[float] = None
        self._peak: Optional[float] = None
        self._peak_measured = False  # True: _peak is a CPU measurement, not a datasheet figure
        self._val_losses: list[torch.Tensor] = []

    # --- building -----------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        strategy = self.trainer.strategy if self._trainer is not None else None
        switches = dict(attention=self.attention, loss_chunk_size=self.loss_chunk_size, float8=self.float8,
                        activation_checkpointing=self.activation_checkpointing, compile=self.compile_blocks,
                        compile_loss=self.compile_loss)
        if isinstance(strategy, ModelParallelStrategy):
            precision = str(self.trainer.precision)
            if precision in ("bf16-true", "16-true"):
                raise ConfigError(
                    f"trainer.precision {precision} with FSDP2 would keep the master weights and AdamW state in "
                    f"{precision.split('-')[0]} as well; use {precision.replace('true', 'mixed')} (FSDP2 computes and "
                    "gathers parameters in that dtype, keeps fp32 master weights and reduces gradients in fp32)")
            param_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
            mesh = getattr(strategy, "fsdp_mesh", None) or strategy.device_mesh["data_parallel"]
            model = parallel.build_sharded(self.config, mesh, strategy.root_device, param_dtype,
                                           gather_once_per_step=getattr(strategy, "gather_once_per_step", True),
                                           **switches)
        else:
            model = Llama(self.config)
            parallel.prepare(model, device=strategy.root_device if strategy is not None else None, **switches)
        if self.init_from:
            self._load_initial_weights(model)
        self.model = model
        log.info("model: %s parameters, %d layers, width %d%s", f"{self.config.num_params():,}",
                 self.config.num_hidden_layers, self.config.hidden_size,
                 ", sharded with FSDP2" if isinstance(strategy, ModelParallelStrategy) else "")

    def _initial_weights(self) -> dict:
        """The weights of ``init_from``, after checking its architecture against the recipe's."""
        from tinytrain import hf
        from tinytrain.checkpoint import load_model_weights, resolve_checkpoint

        if hf.is_hf_folder(self.init_from):
            config, _ = hf.check_hf_folder(Path(self.init_from))
            _, stream = hf.hf_tensors(Path(self.init_from), config)
            weights = dict(stream)
        else:
            folder = resolve_checkpoint(self.init_from)
            config = LlamaConfig(**json.loads((folder / "model_config.json").read_text()))
            weights = load_model_weights(folder)
        if config != self.config:
            diff = {k: (v, getattr(self.config, k)) for k, v in asdict(config).items() if getattr(self.config, k) != v}
            raise ConfigError(f"model.init_from {self.init_from} has a different architecture: " + ", ".join(
                f"model.config.{k}: init_from {a!r}, recipe {b!r}" for k, (a, b) in diff.items()))
        return weights

    def _load_initial_weights(self, model: Llama) -> None:
        weights = self._initial_weights()
        with torch.no_grad():
            if any(hasattr(p, "full_tensor") for p in model.parameters()):  # FSDP2: each rank keeps its shard
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                if self.config.tie_word_embeddings:  # state dicts list the shared head under both names
                    weights = {**weights, "lm_head.weight": weights["embed_tokens.weight"]}

                set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))
            else:
                model.load_weights(weights)
        log.info("initialised from %s", self.init_from)

    def setup(self, stage: str) -> None:
        if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            # Lightning evaluates under torch.inference_mode except on gloo; FSDP2 allocates its
            # unsharded parameters lazily, and made under inference_mode they break the first
            # forward ("Inference tensors do not track version counter"). no_grad is enough.
            for loop in (self.trainer.validate_loop, self.trainer.test_loop, self.trainer.predict_loop):
                loop.inference_mode = False
        if self._trainer is not None:
            log.info("%s", self._process_description())
        dm = self.trainer.datamodule if self._trainer is not None else None
        if self.init_from and dm is not None and getattr(dm, "folder", None) is not None:
            from tinytrain import hf
            from tinytrain.checkpoint import resolve_checkpoint
            from tinytrain.tokenizer import Tokenizer

            src = Path(self.init_from) if hf.is_hf_folder(self.init_from) else resolve_checkpoint(self.init_from)
            if (src / "tokenizer.model").is_file() and \
                    Tokenizer(src / "tokenizer.model").sha256 != Tokenizer(dm.tokenizer_path).sha256:
                raise ConfigError(
                    f"model.init_from {self.init_from} was trained with another tokenizer than the data's "
                    f"({dm.tokenizer_path}); prepare the data with {src / 'tokenizer.model'}")
        seq_len = getattr(dm, "seq_len", None)
        if seq_len is not None and seq_len > self.config.max_position_embeddings:
            raise ConfigError(
                f"data.seq_len={seq_len} exceeds model.config.max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )

    def _process_description(self) -> str:
        """Where this rank runs and what it may use: wrong CPU or GPU binding shows here first."""
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return (f"rank {self.trainer.global_rank} of {self.trainer.world_size} on {socket.gethostname()}: "
                f"{cpus} CPUs, {torch.get_num_threads()} torch threads, device {self.trainer.strategy.root_device}"
                + (f" of {torch.cuda.device_count()} visible GPUs" if torch.cuda.is_available() else ""))

    def configure_optimizers(self):
        return adamw(self.model, self.optim)

    # --- training -----------------------------------------------------------------------------

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # Token ids arrive as int16/int32 in pinned memory; copy without waiting, widen on the device.
        return batch.to(device, non_blocking=True)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # batch: (accumulation, micro batch, seq_len + 1) token ids for this rank and this step.
        step = self.global_step
        lr = self.optim.lr_at(step)
        mean_loss, grad_norm = train_step(self.model, self.optimizers(), batch, lr, self.optim.grad_clip,
                                          backward=self.manual_backward)
        now = time.perf_counter()
        # Only on the steps Lightning writes logs: each logged value costs a device sync, and the
        # loss a collective (sync_dist). The values written are the same as logging every step.
        if self.trainer._logger_connector.should_update_logs:
            self._log_step(step, lr, mean_loss, grad_norm, now)
        self._step_started = now
        return mean_loss

    def _log_step(self, step: int, lr: float, mean_loss: torch.Tensor, grad_norm: torch.Tensor, now: float) -> None:
        dm = self.trainer.datamodule
        tokens_per_step = dm.global_batch_size * dm.seq_len
        self.log("train/loss", mean_loss, prog_bar=True, sync_dist=True)
        self.log("train/lr", lr)
        self.log("train/grad_norm", grad_norm)
        self.log("train/tokens", float(dm.tokens_trained(step + 1)))
        if hasattr(dm, "epochs_completed"):
            for name, epochs in dm.epochs_completed(step + 1).items():
                self.log(f"data/epochs/{name}", epochs)
        if self._step_started is not None:
            # Time between step starts: in steady state this is the step time, with no extra sync.
            tokens_per_sec = tokens_per_step / (now - self._step_started)
            per_device = tokens_per_sec / self.trainer.world_size
            flops = per_device * self.config.training_flops_per_token(dm.seq_len)
            self.log("train/tokens_per_sec", tokens_per_sec, prog_bar=True)
            self.log("train/tokens_per_sec_per_device", per_device)
            self.log("train/tflops_per_device", flops / 1e12)
            if self._peak is not None:
                self.log("train/mfu", flops / self._mfu_peak(flops), prog_bar=True)
            if self.device.type == "cuda":
                self.log("train/peak_memory_gib", torch.cuda.max_memory_allocated(self.device) / 2**30)

    def on_train_start(self) -> None:
        from tinytrain.model import measured_cpu_peak, peak_flops

        self._peak = self.peak_flops
        if self._peak is None and self.device.type == "cuda":
            self._peak = peak_flops(torch.cuda.get_device_name(self.device))
            if self._peak is None:
                log.info("no bf16 peak known for %s: set model.peak_flops to log MFU",
                         torch.cuda.get_device_name(self.device))
        elif self._peak is None and self.device.type == "cpu":
            self._peak = measured_cpu_peak()
            self._peak_measured = True
            log.info("CPU peak for MFU: %.1f GFLOP/s (fastest measured matmul)", self._peak / 1e9)

    def _mfu_peak(self, achieved_flops: float) -> float:
        """The peak MFU is taken against. A CPU peak measured at start-up while other work held
        the cores comes out low (MFU over 1); it is measured again then, keeping the larger."""
        if self._peak_measured and achieved_flops > self._peak:
            from tinytrain.model import measured_cpu_peak

            self._peak = max(self._peak, measured_cpu_peak())
            log.info("CPU peak for MFU measured again: %.1f GFLOP/s", self._peak / 1e9)
        return self._peak

    def on_train_epoch_start(self) -> None:
        self._step_started = None

    def on_validation_epoch_start(self) -> None:
        self._val_losses: dict[int, list[torch.Tensor]] = {}

    def validation_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        # One dataloader per source of a mixture; dataloader_idx says which.
        batch = batch.long()
        loss = self.model(batch[:, :-1], batch[:, 1:]).detach()
        self._val_losses.setdefault(dataloader_idx, []).append(loss)

    def on_validation_epoch_end(self) -> None:
        if not self._val_losses:
            return
        # Every rank reads the same number of equal-length batches, so means of means are exact.
        # The values are then identical on every rank; sync_dist only tells Lightning so (no warning).
        loss = self.trainer.strategy.reduce(torch.cat([torch.stack(v) for v in self._val_losses.values()]).mean(),
                                            reduce_op="mean")
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(loss), sync_dist=True)
        names = getattr(self.trainer.datamodule, "names", [])
        if len(self._val_losses) > 1 and len(names) == len(self._val_losses):
            for idx, losses in sorted(self._val_losses.items()):
                source_loss = self.trainer.strategy.reduce(torch.stack(losses).mean(), reduce_op="mean")
                self.log(f"val/loss/{names[idx]}", source_loss, sync_dist=True)
        self._step_started = None  # validation time is not training throughput

    # --- checkpoints --------------------------------------------------------------------------

    def _data_tokenizer_sha(self) -> Optional[str]:
        from tinytrain.tokenizer import Tokenizer

        dm = self.trainer.datamodule if self._trainer is not None else None
        try:
            return Tokenizer(dm.tokenizer_path).sha256 if dm is not None and dm.folder is not None else None
        except (AttributeError, OSError, ValueError):
            return None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tinytrain"] = {"model_config": asdict(self.config), "tokenizer_sha256": self._data_tokenizer_sha()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved_tok = checkpoint.get("tinytrain", {}).get("tokenizer_sha256")
        current_tok = self._data_tokenizer_sha()
        if saved_tok and current_tok and saved_tok != current_tok:
            raise CheckpointError(
                f"the checkpoint was trained on data tokenized with tokenizer sha256 {saved_tok}, but the data "
                f"now given ({self.trainer.datamodule.folder}) was made with sha256 {current_tok}; resume with "
                "the original data, or start a new run (--checkpoint.resume false, or --model.init_from)")
        saved = checkpoint.get("tinytrain", {}).get("model_config")
        if saved is not None and saved != asdict(self.config):
            diff = {k: (saved.get(k), v) for k, v in asdict(self.config).items() if saved.get(k) != v}
            raise CheckpointError(
                "the checkpoint was trained with a different model config; differing fields "
                + ", ".join(f"model.config.{k}: checkpoint {a!r}, recipe {b!r}" for k, (a, b) in diff.items())
            )
