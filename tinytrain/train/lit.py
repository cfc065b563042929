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
from typing import Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from tinytrain.data.datamodule import DataSpec
from tinytrain.errors import ConfigError
from tinytrain.lightning_private import should_log
from tinytrain.model import moe
from tinytrain.model.llama import Llama, LlamaConfig
from tinytrain.store.checkpoint import check_resumable
from tinytrain.store.layout import FACTS
from tinytrain.store.rollbacks import Rollback
from tinytrain.train import parallel
from tinytrain.train.ema import WeightAverage, check_decay, match_saved_average
from tinytrain.train.init_from import check_given, check_tokenizer, load_initial_weights
from tinytrain.train.local_sgd import OuterState, check_islands, local_sgd_of
from tinytrain.train.monitor import Throughput, log_step, process_description
from tinytrain.train.optim import OptimConfig, build_optimizer, check_state_layout, state_layout
from tinytrain.train.spikes import RollbackRequest, SpikeConfig, SpikeGuard
from tinytrain.train.step import train_step
from tinytrain.train.strategy import build_model
from tinytrain.train.validation import ValidationPass, token_bytes

log = logging.getLogger(__name__)


class LitLlama(L.LightningModule):
    def __init__(
        self,
        config: LlamaConfig = LlamaConfig(),
        optim: OptimConfig = OptimConfig(),
        attention: str = "auto",
        activation_checkpointing: bool = False,
        compile: Union[bool, Literal["auto"]] = False,
        init_from: Optional[str] = None,
        peak_flops: Optional[float] = None,
        loss_chunk_size: int = 0,
        compile_loss: Union[bool, Literal["auto"]] = False,
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
            compile: torch.compile each transformer block; "auto": if torch.compile works here (a one-line
                function compiled and run at the start: on a CPU it needs a C++ compiler).
            init_from: Start from these weights (a tinytrain checkpoint folder, e.g. one made by
                `tinytrain convert from-hf`, or a Hugging Face Llama folder) with a fresh optimizer
                and step 0. Ignored when resuming a run from its own checkpoint.
            peak_flops: Peak FLOP/s of one device, for the logged MFU; None looks GPUs up in a table
                of bf16 peaks (tinytrain.train.flops.PEAK_FLOPS) and, on CPU, measures a matrix product
                at the start of training.
            loss_chunk_size: > 0 computes the loss this many tokens at a time, never holding fp32
                logits for the whole micro-batch (0: the plain cross-entropy).
            compile_loss: torch.compile the output head and cross-entropy; "auto" as for compile.
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
        check_given(init_from)
        check_decay(ema_decay)
        if loss_by_position < 0:
            raise ConfigError(f"model.loss_by_position must be >= 0, got {loss_by_position}")
        if not z_loss >= 0:
            raise ConfigError(f"model.z_loss must be >= 0, got {z_loss}")
        moe.check_trainable(config, optim.optimizer)
        self.config, self.optim, self.init_from, self.peak_flops = config, optim, init_from, peak_flops
        # The recipe keeps its keys flat (model.compile, ...); from here on they travel as one object.
        self.switches = parallel.Switches(attention, activation_checkpointing, compile, compile_loss, loss_chunk_size,
                                          float8, document_masking, document_positions)
        self.ema_decay, self.loss_by_position, self.z_loss = ema_decay, loss_by_position, z_loss
        self.spike_guard = SpikeGuard(spikes) if spikes.enabled else None
        self.rollback_request: Optional[RollbackRequest] = None  # set when spikes call for one (`fit` acts on it)
        self.pending_rollback: Optional[Rollback] = None  # the rollback this run resumes from (set by `fit`)
        self.automatic_optimization = False
        self.model: Optional[Llama] = None
        self.ema = None  # tinytrain.train.ema.WeightAverage when ema_decay is set
        self.outer = None  # tinytrain.train.local_sgd.OuterState with local_sgd
        self.local_sgd = None  # the run's tinytrain.train.local_sgd.LocalSGD, when enabled
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
        trainer = self.trainer if self._trainer is not None else None
        model = build_model(trainer, self.config, self.switches, self.data_spec)
        if self.init_from:
            load_initial_weights(model, self.init_from, self.config)
        model.z_loss = self.z_loss
        self.model = model
        if self.ema_decay is not None:
            self.ema = WeightAverage(model, self.ema_decay)
        self.local_sgd = local_sgd_of(trainer)
        if self.local_sgd is not None:
            self.outer = OuterState(model, momentum=self.local_sgd.mode == "sync")
        sharded = trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)
        log.info("model: %s%s", self.config.describe(), ", sharded with FSDP2" if sharded else "")

    def setup(self, stage: str) -> None:
        if self._trainer is None:
            return
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            # Lightning evaluates under torch.inference_mode except on gloo; FSDP2 allocates its
            # unsharded parameters lazily, and made under inference_mode they break the first
            # forward ("Inference tensors do not track version counter"). no_grad is enough.
            for loop in (self.trainer.validate_loop, self.trainer.test_loop, self.trainer.predict_loop):
                loop.inference_mode = False
        log.info("%s", process_description(self.trainer))
        max_steps = self.trainer.max_steps
        if stage == "fit" and 0 < max_steps < self.optim.warmup_steps and self.trainer.is_global_zero:
            log.warning("model.optim.warmup_steps (%d) is beyond trainer.max_steps (%d): the learning rate reaches only "
                        "%.3g of its peak model.optim.lr %g", self.optim.warmup_steps, max_steps,
                        self.optim.lr_at(max_steps - 1), self.optim.lr)
        dm = self.trainer.datamodule
        self.data_spec = spec = dm.spec() if dm is not None and hasattr(dm, "spec") else None
        if spec is None:
            return
        if self.init_from:
            check_tokenizer(self.init_from, spec)
        if spec.seq_len > self.config.max_position_embeddings:
            raise ConfigError(f"data.seq_len={spec.seq_len} exceeds model.config.max_position_embeddings="
                              f"{self.config.max_position_embeddings}")

    def configure_optimizers(self):
        return build_optimizer(self.model, self.optim)

    # --- training -----------------------------------------------------------------------------

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # Token ids arrive as int16/int32 in pinned memory; copy without waiting, widen on the device.
        return batch.to(device, non_blocking=True)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # batch: (accumulation, micro batch, seq_len + 1) token ids for this rank and this step.
        step, guard = self.global_step, self.spike_guard
        lr = self.optim.lr_at(step)
        accept = (lambda loss, norm: guard.accept(step, loss, norm, self.trainer)) if guard is not None else None
        loss, grad_norm = train_step(self.model, self.optimizers(), batch, lr, self.optim.grad_clip,
                                     backward=self.manual_backward, accept=accept)
        if guard is not None and (request := guard.rollback_request(step)) is not None:
            self.rollback_request = request
            self.trainer.should_stop = True
        routing = moe.figures(self.model) if should_log(self.trainer) else {}  # before after_step resets the loads
        skipped = guard is not None and guard.skipped_at(step)
        moe.after_step(self.model, 0.0 if skipped else self.config.router_bias_update_rate)
        if self.ema is not None:
            self.ema.update(self.model, step)
        if self.local_sgd is not None:
            self.local_sgd.after_step(self, step)
        if should_log(self.trainer):  # the values written are the same as logging every step
            log_step(self, step, loss, lr, grad_norm, routing)
            if self.local_sgd is not None:
                self.local_sgd.log_figures(self, step)
        return loss

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
        checkpoint[FACTS] = {"model_config": self.config.to_dict(),
                             "tokenizer_sha256": spec.tokenizer_sha256 if spec is not None else None,
                             "optimizer": state_layout(self.optim)}
        if self.local_sgd is not None:
            checkpoint[FACTS]["islands"] = self.local_sgd.islands.count
        if self.spike_guard is not None:
            checkpoint[FACTS]["spikes"] = self.spike_guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, spec = checkpoint.get(FACTS, {}), self.data_spec
        check_resumable(saved, self.config, spec.tokenizer_sha256 if spec is not None else None,
                        spec.tokenizer if spec is not None else None)
        check_state_layout(saved.get("optimizer"), self.optim)
        check_islands(saved.get("islands"), self.local_sgd.islands.count if self.local_sgd is not None else None)
        match_saved_average(checkpoint.get("state_dict"), self.model if self.ema is not None else None)
        if self.spike_guard is not None:
            self.spike_guard.load_state_dict(saved.get("spikes", {}))
            if self.pending_rollback is not None:
                self.spike_guard.rollbacks.append(self.pending_rollback.to_json())

    def checkpoint_meta(self) -> dict:
        """What meta.json records beside the usual: skipped steps and rollbacks."""
        return self.spike_guard.meta() if self.spike_guard is not None else {}
