"""`tinytrain convert`'s two directions: a Hugging Face Llama folder to a tinytrain checkpoint folder,
and any tinytrain checkpoint (plain, sharded or converted) to a Hugging Face folder. Both stream:
each tensor is read, converted and written before the next."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Optional

from tinytrain.data.tokenizer import Tokenizer
from tinytrain.errors import ConfigError
from tinytrain.store.checkpoint import load_pretrained
from tinytrain.store.fsutil import atomic_folder
from tinytrain.store.hf import (
    DTYPE_NAMES,
    HFFormatError,
    check_hf_folder,
    config_to_hf,
    hf_layout,
    hf_tensors,
    split_for_hf,
    write_safetensors,
    write_tokenizer_files,
    write_weights_folder,
)
from tinytrain.store.layout import TOKENIZER, WEIGHTS


def from_hf(hf_dir: Path, out: Path) -> Path:
    """Convert a HF LlamaForCausalLM folder into a tinytrain checkpoint folder (weights as stored)."""
    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder")
    config, hf_config = check_hf_folder(hf_dir)
    shapes, stream = hf_tensors(hf_dir, config)
    return write_weights_folder(out, config, shapes, stream, hf_dir / TOKENIZER, {
        "step": 0, "source": {"format": "huggingface", "path": str(hf_dir.resolve()),
                              "torch_dtype": hf_config.get("torch_dtype", hf_config.get("dtype"))},
    }, metadata={"source": hf_dir.name})


def to_hf(checkpoint, out: Path, dtype: Optional[str] = None) -> Path:
    """Write a tinytrain checkpoint (plain, sharded or converted) as a HF LlamaForCausalLM (or Mixtral) folder."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    source = load_pretrained(checkpoint, need_tokenizer=True)
    if source.kind == "huggingface":
        raise HFFormatError(f"{checkpoint} is already a Hugging Face folder")
    config, tok = source.config, Tokenizer(source.tokenizer)
    expected, tensors = source.tensors()
    first_name, first = next(tensors)
    target = DTYPE_NAMES[dtype] if dtype else first.dtype
    hf_config = config_to_hf(config, target, tok.bos_id, tok.eos_id)  # before any weight is written
    layout = hf_layout(config)
    shapes = {hf_name: shape for name in expected for hf_name, shape in layout[name]}

    def hf_stream():
        for name, tensor in itertools.chain([(first_name, first)], tensors):
            yield from ((hf_name, part) for (hf_name, _), part in zip(layout[name], split_for_hf(name, tensor)))

    with atomic_folder(out) as tmp:
        write_safetensors(tmp / WEIGHTS, hf_stream(), shapes, target, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "max_length": config.max_position_embeddings},
            indent=2) + "\n")
        write_tokenizer_files(tmp, source.tokenizer, config.max_position_embeddings)
    return out
