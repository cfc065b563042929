"""The LightningModule: builds the model, runs the training step, validates, and records what a
checkpoint must know (the architecture and the data's tokenizer).

One Lightning batch is one optimizer step: the loader hands this rank all its micro-batches of
the step at once, shaped (accumulation, micro batch, seq_len + 1), and ``training_step``
accumulates over them (tinytrain.train.step). So ``global_step``, ``batch_idx``, ``max_steps``,
``val_check_interval`` and checkpoint intervals all count optimizer steps, and the learning rate
is a pure function of the step (nothing to restore on resume).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from tinytrain.data.datamodule import DataSpec
from tinytrain.errors import CheckpointError, ConfigError
from tinytrain.lightning_private import should_log
from tinytrain.model import moe
from tinytrain.model.llama import Llama, LlamaConfig
from tinytrain.store.rollbacks import Rollback
from tinytrain.train import parallel
from tinytrain.train.ema import match_saved_average
from tinytrain.train.metrics import (
    GRAD_NORM,
    LR,
    MOE,
    SPIKE_GRAD_NORM,
    SPIKE_LOSS,
    SPIKES_SKIPPED,
    TOKENS,
    TRAIN_LOSS,
)
from tinytrain.train.monitor import Throughput
from tinytrain.train.optim import OptimConfig, build_optimizer
from tinytrain.train.spikes import RollbackRequest, SpikeConfig, SpikeGuard
from tinytrain.train.step import train_step
from tinytrain.train.validation import ValidationPass, token_bytes

log = logging.getLogger(__name__)


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
        document_masking: bool = False,
        document_positions: bool = False,
        ema_decay: Optional[float] = None,
        spikes: SpikeConfig = SpikeConfig(),
        loss_by_position: int = 0,
        z_loss: float = 0.0,
    ) -> None:
        """A Llama model trained on next-token prediction.

        Args:
            config: The architecture (see tinytrain.model.llama.LlamaConfig and its presets).
            optim: AdamW, learning-rate schedule and gradient clipping.
            attention: "auto" (flash-attn when installed on CUDA, else PyTorch SDPA), "sdpa" (PyTorch
                chooses the kernel), "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math" (that SDPA
                kernel only), "flash-attn", or "flex" (document masking through FlexAttention).
            activation_checkpointing: Recompute each block's activations in backward, to save memory.
            compile: torch.compile each transformer block.
            init_from: Start from these weights (a tinytrain checkpoint folder, e.g. one made by
                `tinytrain convert from-hf`, or a Hugging Face Llama folder) with a fresh optimizer
                and step 0. Ignored when resuming a run from its own checkpoint.
            peak_flops: Peak FLOP/s of one device, for the logged MFU; None looks GPUs up in a table
                of bf16 peaks (tinytrain.train.flops.PEAK_FLOPS) and, on CPU, measures a matrix product
                at the start of training.
            loss_chunk_size: > 0 computes the loss this many tokens at a time, never holding fp32
                logits for the whole micro-batch (0: the plain cross-entropy).
            compile_loss: torch.compile the output head and cross-entropy.
            float8: Experimental. Float8 matmuls in the blocks' linear layers (torchao, dynamic
                tensorwise scaling; needs compute capability 8.9+, e.g. H100). Changes the numerics.
            document_masking: Tokens attend only within their own document (documents start with BOS
                in the shards; a block that starts mid-document treats its start as one), as Llama 3.
            document_positions: With document_masking, RoPE positions restart at each document.
            ema_decay: Keep an exponential moving average of the weights with this decay (e.g. 0.999;
                ramped up as min(decay, (1 + t) / (10 + t))), sharded like the parameters, saved in
                every checkpoint; `tinytrain average --ema CHECKPOINT OUT` writes it as a model.
            spikes: Loss-spike recovery (tinytrain.train.spikes): skip the update of a step whose loss or
                gradient norm is not finite or far above its recent history; roll back to the newest
                checkpoint after several, skipping the data that caused them.
            loss_by_position: Validation also logs the loss in this many equal spans of positions,
                `val/loss_by_position/<first>-<last>` (e.g. to see what a context extension did
                beyond the old window). 0: off.
            z_loss: Add z_loss x mean(log Z ** 2) to the training loss, log Z each token's logsumexp of
                the logits (PaLM used 1e-4): keeps the output logits from drifting. train/loss then
                includes it; validation reports the cross-entropy alone. 0: off.
        """
        super().__init__()
        if init_from == "???":
            raise ConfigError("model.init_from is required by this recipe: pass --model.init_from with a checkpoint "
                              "folder (e.g. from `tinytrain convert from-hf`) or a Hugging Face Llama folder")
        self.config, self.optim, self.init_from, self.peak_flops = config, optim, init_from, peak_flops
        # The recipe keeps its keys flat (model.compile, ...); from here on they travel as one object.
        self.switches = parallel.Switches(attention, activation_checkpointing, compile, compile_loss, loss_chunk_size,
                                          float8, document_masking, document_positions)
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ConfigError(f"model.ema_decay must be in (0, 1) or null, got {ema_decay}")
        self.ema_decay = ema_decay
        if loss_by_position < 0:
            raise ConfigError(f"model.loss_by_position must be >= 0, got {loss_by_position}")
        self.loss_by_position = loss_by_position
        if not z_loss >= 0:
            raise ConfigError(f"model.z_loss must be >= 0, got {z_loss}")
        self.z_loss = z_loss
        if config.moe and config.router_jitter_noise > 0:
            raise ConfigError(f"model.config.router_jitter_noise is {config.router_jitter_noise}: tinytrain trains "
                              "routers without input noise (its draws would come from no saved generator, so resume "
                              "would not be exact); set it to 0.0")
        if config.moe and optim.optimizer == "muon":
            raise ConfigError("model.optim.optimizer muon orthogonalises 2-D matrices and the experts are stacked 3-D "
                              "tensors (model.config.num_local_experts > 1); use adamw with experts")
        self.spike_guard = SpikeGuard(spikes) if spikes.enabled else None
        self.rollback_request: Optional[RollbackRequest] = None  # set when spikes call for one (`fit` acts on it)
        self.pending_rollback: Optional[Rollback] = None  # the rollback this run resumes from (set by `fit`)
        self.automatic_optimization = False
        self.model: Optional[Llama] = None
        self.ema = None  # tinytrain.train.ema.WeightAverage when ema_decay is set
        self._token_bytes: Optional[torch.Tensor] = None  # UTF-8 bytes per token id, for val/bpb
        self._validation: Optional[ValidationPass] = None
        # What the model side knows of the data (sequence length, tokenizer, source names): read from
        # the datamodule once, in setup(); None without one (a bare validate of weights).
        self.data_spec: Optional[DataSpec] = None

    def configure_callbacks(self):
        from tinytrain.train.console import RunSummary

        return [Throughput(self.peak_flops), RunSummary()]

    # --- building -----------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        strategy = self.trainer.strategy if self._trainer is not None else None
        spec = self.data_spec
        bos_id = spec.bos_id if spec is not None and spec.bos_id is not None else 1
        if self.switches.document_masking and spec is not None and not spec.bos_per_document:
            raise ConfigError("model.document_masking finds documents by the BOS in front of each, but the data was "
                              "prepared without it (its manifest says bos: false); prepare it with bos: true")
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
                                           getattr(strategy, "gather_once_per_step", True), self.switches, bos_id)
        else:
            model = parallel.build(self.config, self.switches, strategy.root_device if strategy is not None else None,
                                   bos_id)
        if self.init_from:
            self._load_initial_weights(model)
        model.z_loss = self.z_loss
        self.model = model
        if self.ema_decay is not None:
            from tinytrain.train.ema import WeightAverage

            self.ema = WeightAverage(model, self.ema_decay)
        c = self.config
        active = (f" ({c.num_active_params():,} active per token: {c.num_experts_per_tok} of {c.num_local_experts} "
                  "experts)" if c.moe else "")
        log.info("model: %s parameters%s, %d layers, width %d%s", f"{c.num_params():,}", active,
                 c.num_hidden_layers, c.hidden_size,
                 ", sharded with FSDP2" if isinstance(strategy, ModelParallelStrategy) else "")

    def _load_initial_weights(self, model: Llama) -> None:
        from tinytrain.store.checkpoint import load_pretrained

        source = load_pretrained(self.init_from)
        if source.config.architecture() != self.config.architecture():
            raise ConfigError(f"model.init_from {self.init_from} has a different architecture: "
                              + source.config.differences(self.config, "init_from", "recipe"))
        if source.config != self.config:  # only the context window: a context extension
            log.info("extending the context of %s: %s", self.init_from,
                     source.config.differences(self.config, "from", "to"))
        parallel.load_full_weights(model, source.weights())
        log.info("initialised from %s", self.init_from)

    def setup(self, stage: str) -> None:
        if self._trainer is None:
            return
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            # Lightning evaluates under torch.inference_mode except on gloo; FSDP2 allocates its
            # unsharded parameters lazily, and made under inference_mode they break the first
            # forward ("Inference tensors do not track version counter"). no_grad is enough.
            for loop in (self.trainer.validate_loop, self.trainer.test_loop, self.trainer.predict_loop):
                loop.inference_mode = False
        log.info("%s", self._process_description())
        max_steps = self.trainer.max_steps
        if stage == "fit" and 0 < max_steps < self.optim.warmup_steps and self.trainer.is_global_zero:
            log.warning("model.optim.warmup_steps (%d) is beyond trainer.max_steps (%d): the learning rate reaches only "
                        "%.3g of its peak model.optim.lr %g", self.optim.warmup_steps, max_steps,
                        self.optim.lr_at(max_steps - 1), self.optim.lr)
        self.data_spec = spec = self._read_data_spec()
        if spec is None:
            return
        if self.init_from:
            from tinytrain.data.shards import sha256_file
            from tinytrain.store.checkpoint import load_pretrained

            source = load_pretrained(self.init_from)
            if source.tokenizer is not None and spec.tokenizer_sha256 != sha256_file(source.tokenizer):
                raise ConfigError(
                    f"model.init_from {self.init_from} was trained with another tokenizer than the data's "
                    f"({spec.tokenizer}); prepare the data with {source.tokenizer}")
        if spec.seq_len > self.config.max_position_embeddings:
            raise ConfigError(f"data.seq_len={spec.seq_len} exceeds model.config.max_position_embeddings="
                              f"{self.config.max_position_embeddings}")

    def _read_data_spec(self) -> Optional[DataSpec]:
        dm = self.trainer.datamodule
        return dm.spec() if dm is not None and hasattr(dm, "spec") else None

    def _process_description(self) -> str:
        """Where this rank runs and what it may use: wrong CPU or GPU binding shows here first."""
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return (f"rank {self.trainer.global_rank} of {self.trainer.world_size} on {socket.gethostname()}: "
                f"{cpus} CPUs, {torch.get_num_threads()} torch threads, device {self.trainer.strategy.root_device}"
                + (f" of {torch.cuda.device_count()} visible GPUs" if torch.cuda.is_available() else ""))

    def configure_optimizers(self):
        return build_optimizer(self.model, self.optim)

    # --- training -----------------------------------------------------------------------------

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # Token ids arrive as int16/int32 in pinned memory; copy without waiting, widen on the device.
        return batch.to(device, non_blocking=True)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # batch: (accumulation, micro batch, seq_len + 1) token ids for this rank and this step.
        step = self.global_step
        lr = self.optim.lr_at(step)
        loss, grad_norm = train_step(self.model, self.optimizers(), batch, lr, self.optim.grad_clip,
                                     backward=self.manual_backward,
                                     accept=self._accept_step if self.spike_guard is not None else None)
        if self.spike_guard is not None and self.spike_guard.skipped[-1:] == [step] \
                and self.spike_guard.rollback_due(step):
            self.rollback_request = RollbackRequest(
                tuple(s for s in self.spike_guard.skipped if s > step - self.spike_guard.config.window), step)
            self.trainer.should_stop = True
        routing = moe.figures(self.model) if should_log(self.trainer) else {}  # before after_step resets the loads
        skipped = self.spike_guard is not None and self.spike_guard.skipped[-1:] == [step]
        moe.after_step(self.model, 0.0 if skipped else self.config.router_bias_update_rate)
        if self.ema is not None:
            self.ema.update(self.model, step)
        # Only on the steps Lightning writes logs: each logged value costs a device sync, and the
        # loss a collective (sync_dist). The values written are the same as logging every step.
        if should_log(self.trainer):
            dm = self.trainer.datamodule
            self.log(TRAIN_LOSS, loss, sync_dist=True)  # not prog_bar: see console.StepProgress
            self.log(LR, lr)
            self.log(GRAD_NORM, grad_norm)
            self.log(TOKENS, float(dm.tokens_trained(step + 1)))
            if self.spike_guard is not None:
                self.log(SPIKES_SKIPPED, float(len(self.spike_guard.skipped)))
            for name, epochs in dm.epochs_completed(step + 1).items():
                self.log(f"data/epochs/{name}", epochs)
            for name, value in routing.items():
                self.log(f"{MOE}/{name}", value)
        return loss

    def _accept_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether this step's update is taken (see tinytrain.train.spikes); the same answer on every rank."""
        step = self.global_step
        mean_loss = float(self.trainer.strategy.reduce(loss.detach(), reduce_op="mean"))
        reason = self.spike_guard.check(step, mean_loss, float(grad_norm))
        if reason is None:
            return True
        if self.trainer.is_global_zero:
            log.warning("step %d: loss spike (%s): update skipped", step + 1, reason)
            if self.logger is not None:
                self.logger.log_metrics({SPIKE_LOSS: mean_loss, SPIKE_GRAD_NORM: float(grad_norm)},
                                        step=step)
        return False

    def on_validation_epoch_start(self) -> None:
        spec = self.data_spec
        if self._token_bytes is None and spec is not None and spec.tokenizer is not None:
            self._token_bytes = token_bytes(spec.tokenizer, self.config.vocab_size)
        if self._token_bytes is not None:
            self._token_bytes = self._token_bytes.to(self.device)
        self._validation = ValidationPass(self._token_bytes, self.loss_by_position)

    def validation_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._validation.add(self.model, batch, dataloader_idx)  # one dataloader per source of a mixture

    def on_validation_epoch_end(self) -> None:
        self._validation.log(self, list(self.data_spec.source_names) if self.data_spec is not None else [])

    # --- checkpoints --------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        spec = self.data_spec
        checkpoint["tinytrain"] = {"model_config": self.config.to_dict(),
                                   "tokenizer_sha256": spec.tokenizer_sha256 if spec is not None else None}
        if self.spike_guard is not None:
            checkpoint["tinytrain"]["spikes"] = self.spike_guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("tinytrain", {})
        spec = self.data_spec
        current = spec.tokenizer_sha256 if spec is not None else None
        if saved.get("tokenizer_sha256") and current and saved["tokenizer_sha256"] != current:
            raise CheckpointError(
                f"the checkpoint was trained on data tokenized with tokenizer sha256 {saved['tokenizer_sha256']}, but "
                f"the data now given ({spec.tokenizer}) was made with sha256 {current}; resume with the original "
                "data, or start a new run (--checkpoint.resume false, or --model.init_from)")
        match_saved_average(checkpoint.get("state_dict"), self.model if self.ema is not None else None)
        if self.spike_guard is not None:
            self.spike_guard.load_state_dict(saved.get("spikes", {}))
            if self.pending_rollback is not None:
                self.spike_guard.rollbacks.append(self.pending_rollback.to_json())
        if saved.get("model_config") is not None and LlamaConfig(**saved["model_config"]) != self.config:
            raise CheckpointError("the checkpoint was trained with a different model config; differing fields "
                                  + LlamaConfig(**saved["model_config"]).differences(self.config, "checkpoint", "recipe"))

    def checkpoint_meta(self) -> dict:
        """What meta.json records beside the usual: skipped steps and rollbacks."""
        if self.spike_guard is None:
            return {}
        return {"spikes": {"skipped_steps": [s + 1 for s in self.spike_guard.skipped],
                           "rollbacks": self.spike_guard.rollbacks}}
