"""Downstream evaluation inside the training loop: the recipe's `eval:` section.

    eval:
      tasks: [tinyllama]      # lm-evaluation-harness tasks or groups (empty: off)
      every_n_steps: 5000
      limit: 500              # examples per task, to keep it to minutes

Every rank runs its share of the requests on the model as it trains (sharded under FSDP2), rank 0
gathers the metrics and every logger receives `eval/<task>/<metric>` and `eval/seconds` at that
step. The training stream is untouched: the data position is a function of the step, and the
random number generators are restored after each evaluation (the harness seeds them).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from tinytrain.errors import ConfigError
from tinytrain.train.metrics import EVAL_SECONDS, EVAL_TINYLLAMA_AVERAGE

log = logging.getLogger(__name__)


class DownstreamEval(Callback):
    def __init__(self, tasks: Optional[list[str]] = None, every_n_steps: int = 1000, limit: Optional[float] = None,
                 num_fewshot: Optional[int] = None, batch_size: int = 8, include_path: Optional[list[str]] = None,
                 at_end: bool = True) -> None:
        """Downstream tasks (EleutherAI's lm-evaluation-harness) during training.

        Args:
            tasks: Task or group names (e.g. [tinyllama], [arc_easy, piqa]); empty or None: off.
            every_n_steps: Evaluate after every this many optimizer steps.
            limit: Examples per task (an integer), or a fraction of each task; None: all.
            num_fewshot: Examples in each prompt; None: each task's default.
            batch_size: Requests per forward pass.
            include_path: Folders of your own task YAMLs.
            at_end: Also evaluate after the last step.
        """
        if every_n_steps <= 0:
            raise ConfigError(f"eval.every_n_steps must be positive, got {every_n_steps}")
        if batch_size <= 0:
            raise ConfigError(f"eval.batch_size must be positive, got {batch_size}")
        self.tasks, self.every_n_steps, self.limit = list(tasks or []), every_n_steps, limit
        self.num_fewshot, self.batch_size, self.include_path, self.at_end = num_fewshot, batch_size, include_path, at_end
        self._manager = None
        self._done_at: Optional[int] = None
        self.busy_seconds = 0.0  # spent evaluating: not training time (tinytrain.train.monitor leaves it out)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.tasks and stage == "fit":
            from tinytrain.eval.tasks import resolve_tasks, task_manager

            self._manager = task_manager(self.include_path)  # an unknown task stops the run before training
            resolve_tasks(self.tasks, self._manager)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.tasks and trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.tasks and self.at_end and self._done_at != trainer.global_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        from tinytrain.data.tokenizer import Tokenizer
        from tinytrain.eval.harness import TinyTrainLM
        from tinytrain.eval.tasks import rows, run_tasks, tinyllama_average

        started = time.perf_counter()
        model, spec = pl_module.model, pl_module.data_spec
        states = _rng_states()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                lm = TinyTrainLM(model, Tokenizer(spec.tokenizer), self.batch_size)
                results = run_tasks(lm, self.tasks, self._manager, self.num_fewshot, self.limit)
        finally:
            model.train(was_training)
            _set_rng_states(states)
        metrics = {}
        if results is not None:  # rank 0 holds the gathered results
            table = rows(results)
            metrics = {f"eval/{r['task']}/{r['metric']}": float(r["value"]) for r in table}
            average = tinyllama_average(table)
            if average is not None:
                metrics[EVAL_TINYLLAMA_AVERAGE] = average
        metrics = trainer.strategy.broadcast(metrics, src=0)
        metrics[EVAL_SECONDS] = time.perf_counter() - started
        self.busy_seconds += metrics[EVAL_SECONDS]
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # straight to the loggers: this step may not be one Lightning writes
                logger.log_metrics(metrics, step=trainer.global_step)
            log.info("step %d: %s", trainer.global_step, ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        self._done_at = trainer.global_step
        return metrics


def _rng_states() -> dict:
    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_states(states: dict) -> None:
    random.setstate(states["random"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])
