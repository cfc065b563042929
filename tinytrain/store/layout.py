"""The run folder's layout: the one place that names its files and keys.

    runs/NAME/checkpoints/
        step-00000100/        a complete checkpoint (see tinytrain.store.checkpoint)
        .tmp-step-00000200/   one being written; renamed to step-N once complete
        last -> step-00000100
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from tinytrain.data import shards

STATE = "state.ckpt"              # Lightning's checkpoint: a file, or a folder of per-rank shards
WEIGHTS = "model.safetensors"     # converted weights (tinytrain convert from-hf), tinytrain names
META = "meta.json"
MODEL_CONFIG = "model_config.json"
TOKENIZER = shards.TOKENIZER      # the tokenizer, named as beside the data's manifest
CONFIG = "config.yaml"
MODEL_PREFIX = "model."           # LitLlama holds the Llama as `self.model`: its keys in Lightning's state dict
EMA_PREFIX = "ema."               # and the weights' moving average as `self.ema` (tinytrain.train.ema)
OUTER_PREFIX = "outer."           # and Local SGD's global weights and momentum as `self.outer` (tinytrain.train.local_sgd)
TMP_PREFIX = ".tmp-"              # a checkpoint being written
FACTS = "tinytrain"               # tinytrain's own entry in Lightning's state: architecture, tokenizer, spikes

_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_folder(step: int) -> str:
    """The name of step ``step``'s checkpoint folder."""
    return f"step-{step:08d}"


def step_of(path: Path) -> Optional[int]:
    """The step a checkpoint folder's name says (None for any other name)."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def step_dirs(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete-looking checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((step, p) for p in folder.iterdir() if (step := step_of(p)) is not None and p.is_dir())


def write_meta(folder: Path, meta: dict) -> None:
    """Write ``folder``/meta.json: ``meta`` and every file in the folder with its size, so a truncated
    or partly copied folder is recognised (tinytrain.store.checkpoint.damage reads it). The one writer
    of meta.json, for step checkpoints and converted folders alike; written last."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != META}
    (folder / META).write_text(json.dumps({**meta, "files": files}, indent=2) + "\n")


def ema_buffer_name(parameter: str) -> str:
    """The moving average's buffer for a parameter (buffer names hold no dots)."""
    return parameter.replace(".", "/")


def ema_parameter_name(buffer: str) -> str:
    return buffer.replace("/", ".")
