"""Checkpoints that are either complete or invisible.

Layout under ``<default_root_dir>/checkpoints``::

    step-00000100/
        state.ckpt          Lightning's checkpoint (weights, optimizer, loop state); a file, or a
                            folder of per-rank shards under a model-parallel strategy
        config.yaml         the resolved recipe the run was started with
        model_config.json   the architecture, for loading without the recipe
        tokenizer.model     the tokenizer the data was made with
        meta.json           step, tokens seen, versions, git SHA, devices
    last -> step-00000100   always a complete checkpoint

Everything is written into ``.tmp-step-N`` and renamed to ``step-N`` once complete; ``last`` is
then replaced with an atomic rename of a fresh symlink. A process killed mid-save leaves only a
``.tmp-*`` folder, which the next save removes; the previous checkpoint stays usable.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from tinytrain.data.tokenizer import Tokenizer
from tinytrain.errors import CheckpointError, ConfigError
from tinytrain.model.llama import Llama, LlamaConfig
from tinytrain.store.layout import (
    EMA_PREFIX,
    META,
    MODEL_CONFIG,
    MODEL_PREFIX,
    STATE,
    TOKENIZER,
    WEIGHTS,
    ema_parameter_name,
    step_dirs,
)

log = logging.getLogger(__name__)



def damage(path: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be loaded, or None if it looks complete: meta.json must parse,
    the weights must be there (a training state, or converted weights), and every file meta.json
    lists must exist with the size it had when saved."""
    meta_path = path / META
    if not meta_path.is_file():
        return "no meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable meta.json ({e})"
    if not (path / STATE).exists() and not (path / WEIGHTS).is_file():
        return f"no {STATE}"
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} when saved"
    return None


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The newest complete checkpoint folder in ``folder``; damaged ones are skipped with a warning."""
    for step, path in reversed(step_dirs(Path(folder))):
        problem = damage(path)
        if problem is None:
            return path
        log.warning("skipping damaged checkpoint %s: %s", path, problem)
    return None


def folder_kind(path: os.PathLike | str) -> Optional[str]:
    """"huggingface" for a HF model folder (config.json, no meta.json), "tinytrain" for anything
    else that exists (a run, its checkpoints, a step or converted folder), None if nothing is there."""
    p = Path(path).expanduser()
    if (p / "config.json").is_file() and not (p / META).is_file():
        return "huggingface"
    return "tinytrain" if p.exists() else None


def resolve_checkpoint(path: os.PathLike | str) -> Path:
    """A checkpoint folder from what a user may pass: a step folder (or a converted one), ``last``,
    a run folder, or its checkpoints folder. A step folder named explicitly must be intact (the
    error names the damaged file); for ``last`` or a run folder, a damaged newest checkpoint gives
    way to the newest intact one, with a warning."""
    p = Path(path).expanduser()
    if p.name != "last" and (p / META).is_file():
        problem = damage(p)
        if problem is not None:
            raise CheckpointError(f"{p}: damaged checkpoint: {problem}")
        return p.resolve()
    if folder_kind(p) == "huggingface":
        raise CheckpointError(f"{p} is a Hugging Face folder; convert it first: tinytrain convert from-hf {p} OUT")
    for last in (p, p / "last", p / "checkpoints" / "last"):
        if last.name == "last" and (last.is_symlink() or last.exists()):
            if last.exists() and damage(last) is None:
                return last.resolve()
            found = latest_checkpoint(last.parent)
            if found is not None:
                log.warning("%s -> %s is damaged or missing (%s); using the newest intact checkpoint, %s", last,
                            os.readlink(last) if last.is_symlink() else last, damage(last), found.name)
                return found.resolve()
    for folder in (p, p / "checkpoints"):
        found = latest_checkpoint(folder)
        if found is not None:
            return found.resolve()
    raise FileNotFoundError(f"{p}: no tinytrain checkpoint there (expected a folder with meta.json and {STATE})")


def set_aside(path: Path, reason: str) -> Path:
    """Rename a damaged checkpoint folder out of the way (``step-N.damaged-<time>``, which resume
    and pruning ignore), keeping its files for inspection; return the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        n += 1
    os.replace(path, target)
    log.warning("set aside damaged checkpoint %s as %s (%s)", path, target.name, reason)
    return target


def point_last(folder: Path, target: Path) -> None:
    """Point ``folder/last`` at ``target`` by renaming a fresh symlink over it (atomic)."""
    tmp_link = folder / ".last.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(target.name)
    os.replace(tmp_link, folder / "last")


def load_model_weights(folder: Path, average: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights (tinytrain names) from a checkpoint folder: converted weights
    (model.safetensors), a single Lightning state file, or a state sharded by several ranks.
    Needs no GPU and no process group, and reads no optimizer state. With ``average``, the moving
    average of the weights that training kept instead (model.ema_decay)."""
    folder = Path(folder)
    if average:
        return _load_average(folder)
    if (folder / WEIGHTS).is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(folder / WEIGHTS))
        except Exception as e:  # safetensors' own error types differ by version
            raise CheckpointError(f"{folder / WEIGHTS}: unreadable ({e})") from e
    weights = _load_state_entries(folder / STATE, MODEL_PREFIX)
    if not weights:
        raise CheckpointError(f"{folder / STATE}: checkpoint holds no model weights (no '{MODEL_PREFIX}*' keys)")
    return weights


def _load_average(folder: Path) -> dict[str, torch.Tensor]:

    if not (folder / STATE).exists():
        raise CheckpointError(f"{folder}: holds no training state, so no weight average (model.ema_decay)")
    found = _load_state_entries(folder / STATE, EMA_PREFIX)
    if not found:
        raise CheckpointError(f"{folder / STATE}: no weight average in this checkpoint (train with model.ema_decay)")
    average = {ema_parameter_name(k): v for k, v in found.items()}
    if (folder / MODEL_CONFIG).is_file() and read_model_config(folder / MODEL_CONFIG).router_bias_update_rate > 0:
        # the experts' routing bias is state, not a parameter: the average routes with the model's own
        average.update({k: v for k, v in _load_state_entries(folder / STATE, MODEL_PREFIX).items()
                        if k.endswith("expert_bias")})
    return average


def _load_state_entries(state_path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The entries of Lightning's state dict under ``prefix`` (prefix removed; none: {}), from a
    single file or sharded."""
    from tinytrain.store import safeload

    if state_path.is_file():
        try:
            ckpt = safeload.torch_load(state_path, map_location="cpu", mmap=True)
        except (RuntimeError, EOFError, OSError) as e:  # "PytorchStreamReader failed reading zip archive", ...
            raise CheckpointError(f"{state_path}: unreadable, damaged or truncated ({e})") from e
        return {k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state_path.is_dir():
        raise FileNotFoundError(f"{state_path}: no checkpoint state there")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    safeload.harden()
    metadata = safeload.read_metadata(state_path / ".metadata")
    outer = "state_dict." + prefix
    weights = {
        key[len(outer):]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(outer) and hasattr(meta, "size")
    }
    if not weights:
        return {}
    wrapped = {"state_dict": {prefix + k: v for k, v in weights.items()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(wrapped, checkpoint_id=str(state_path), planner=DefaultLoadPlanner(allow_partial_load=True),
                 no_dist=True)
    return {k.removeprefix(prefix): v for k, v in wrapped["state_dict"].items()}


def consolidate(checkpoint, out: os.PathLike | str) -> Path:
    """Write a checkpoint's model weights as one plain state-dict file (torch.save), atomically."""
    folder = resolve_checkpoint(checkpoint)
    weights = load_model_weights(folder)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(weights, tmp)
    os.replace(tmp, out)
    return out


@dataclass
class Pretrained:
    """Weights to start from or to use: a tinytrain checkpoint (any of the forms resolve_checkpoint
    takes) or a Hugging Face Llama folder, with its architecture and tokenizer."""

    kind: str
    folder: Path
    config: LlamaConfig
    tokenizer: Optional[Path]
    average: bool = False
    """Read the weight average training kept (model.ema_decay) instead of the weights."""

    def tensors(self) -> tuple[dict[str, tuple], Iterator[tuple[str, torch.Tensor]]]:
        """Parameter name -> shape, and the tensors one at a time in that order (streamed: never
        all in memory at once when the source is a HF folder)."""
        if self.kind == "huggingface":
            from tinytrain.store import hf

            return hf.hf_tensors(self.folder, self.config)
        weights = load_model_weights(self.folder, self.average)
        shapes = self.config.parameter_shapes()
        missing = [k for k in shapes if k not in weights]
        if missing:
            raise CheckpointError(f"{self.folder}: checkpoint lacks {', '.join(missing[:8])}")
        return shapes, ((k, weights[k]) for k in shapes)

    def meta(self) -> dict:
        """The folder's meta.json (step, tokens, ...); {} for a Hugging Face folder or none."""
        path = self.folder / META
        return read_json(path) if self.kind == "tinytrain" and path.is_file() else {}

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors()[1])


def check_resumable(saved: dict, config: LlamaConfig, tokenizer_sha256: Optional[str],
                    tokenizer: Optional[str]) -> None:
    """A run's saved facts (its state's FACTS entry) against the run resuming it: the data's tokenizer
    (its sha256 and path, None without data) and the recipe's architecture must be the saved ones."""
    if saved.get("tokenizer_sha256") and tokenizer_sha256 and saved["tokenizer_sha256"] != tokenizer_sha256:
        raise CheckpointError(
            f"the checkpoint was trained on data tokenized with tokenizer sha256 {saved['tokenizer_sha256']}, but "
            f"the data now given ({tokenizer}) was made with sha256 {tokenizer_sha256}; resume with the original "
            "data, or start a new run (--checkpoint.resume false, or --model.init_from)")
    if saved.get("model_config") is not None and LlamaConfig(**saved["model_config"]).trained() != config.trained():
        raise CheckpointError("the checkpoint was trained with a different model config; differing fields "
                              + LlamaConfig(**saved["model_config"]).differences(config, "checkpoint", "recipe"))


def read_json(path: Path) -> dict:
    """A JSON object from a checkpoint's file; anything else is a CheckpointError naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the checkpoint is damaged") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}; the checkpoint is damaged")
    return value


def read_model_config(path: Path) -> LlamaConfig:
    """The architecture a checkpoint records (model_config.json)."""
    fields = read_json(path)
    try:
        return LlamaConfig(**fields)
    except (TypeError, ConfigError) as e:  # an unknown field, or a value out of range
        raise CheckpointError(f"{path}: not a model config ({e})") from e


def load_pretrained(path: os.PathLike | str, need_tokenizer: bool = False) -> Pretrained:
    """The one way to open weights by path, for init_from, generate, evaluate and export."""
    p = Path(path).expanduser()
    if folder_kind(p) == "huggingface":
        from tinytrain.store import hf

        config, _ = hf.check_hf_folder(p)
        return Pretrained("huggingface", p, config, p / TOKENIZER)
    folder = resolve_checkpoint(p)
    if not (folder / MODEL_CONFIG).is_file():
        raise CheckpointError(f"{folder / MODEL_CONFIG}: missing from checkpoint {folder}")
    config = read_model_config(folder / MODEL_CONFIG)
    tokenizer = folder / TOKENIZER if (folder / TOKENIZER).is_file() else None
    if need_tokenizer and tokenizer is None:
        raise CheckpointError(f"{folder / TOKENIZER}: missing from checkpoint {folder}")
    return Pretrained("tinytrain", folder, config, tokenizer)


def load_checkpoint(path, device="cpu") -> tuple[Llama, Tokenizer]:
    """(model, tokenizer) from a tinytrain checkpoint (any form) or a Hugging Face Llama folder."""
    source = load_pretrained(path, need_tokenizer=True)
    with torch.device("meta"):
        model = Llama(source.config)
    model.load_weights(source.weights(), assign=True)
    model.init_rope()
    return model.to(device).eval(), Tokenizer(source.tokenizer)


def load_proxy_tuned(large, tuned, base, alpha: float = 1.0, device="cpu", prompt_tokens: Optional[int] = None):
    """(ProxyTuned model, the large model's tokenizer): ``large`` steered by ``tuned`` - ``base``
    (model/proxy.py). Each may be a tinytrain checkpoint or a Hugging Face Llama folder. Refused before
    any weights are read: tokenizers whose pieces differ, and, given ``prompt_tokens``, a context window
    that cannot hold the prompt and one new token."""
    from tinytrain.model.proxy import ProxyTuned

    roles = {"the large model": large, "--proxy_tuned": tuned, "--proxy_base": base}
    sources = {role: load_pretrained(path, need_tokenizer=True) for role, path in roles.items()}
    tokenizers = {role: Tokenizer(s.tokenizer) for role, s in sources.items()}
    reference = tokenizers["the large model"]
    for role, tok in tokenizers.items():
        differs = reference.difference(tok)
        if differs:
            raise ConfigError(f"{role} does not share the large model's tokenizer ({differs}); proxy-tuning adds "
                              "their logits id by id, so all three need one vocabulary")
    for role, source in sources.items():
        if source.config.vocab_size < reference.vocab_size:
            raise ConfigError(f"{role} ({source.folder}) has {source.config.vocab_size} output rows, fewer than the "
                              f"tokenizer's {reference.vocab_size} pieces")
        window = source.config.max_position_embeddings
        if prompt_tokens is not None and prompt_tokens >= window:
            raise ConfigError(f"{role} ({source.folder}) reads at most {window} tokens: the prompt's {prompt_tokens} "
                              "leave no room for a new one")
    models = [load_checkpoint(path, device=device)[0] for path in roles.values()]
    return ProxyTuned(*models, alpha=alpha).eval(), reference
