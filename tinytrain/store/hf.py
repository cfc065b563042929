"""Hugging Face Llama folders: the key map, config translation, reading and writing their files
(the two directions of `tinytrain convert` are tinytrain.store.convert).

tinytrain's parameter names are HF Llama's without the ``model.`` prefix, so the map is a
prefix rename. Conversion streams: each tensor is read (memory-mapped), converted and written
before the next, so neither direction holds a second copy of the weights.

A HF folder holds config.json, weights (model.safetensors, sharded safetensors with an index,
or pytorch_model.bin) and the sentencepiece tokenizer.model. A converted tinytrain folder holds
model.safetensors (tinytrain names), model_config.json, tokenizer.model and meta.json.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from tinytrain.data.tokenizer import Tokenizer
from tinytrain.errors import TinyTrainError
from tinytrain.model.llama import LlamaConfig
from tinytrain.store.fsutil import atomic_folder
from tinytrain.store.layout import MODEL_CONFIG, TOKENIZER, WEIGHTS, write_meta

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Buffers some older checkpoints carry; tinytrain rebuilds them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFFormatError(TinyTrainError, ValueError):
    """A Hugging Face folder tinytrain cannot read faithfully."""


# --- names ---------------------------------------------------------------------------------------

def to_hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def from_hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else name.removeprefix("model.")


def hf_layout(config: LlamaConfig) -> dict[str, list[tuple[str, tuple]]]:
    """tinytrain name -> the Hugging Face tensors (name, shape) it is stored as, in file order. A
    prefix rename, but for experts: tinytrain stacks them (model/moe.py), HF files keep Mixtral's
    per-expert matrices (``block_sparse_moe.experts.<e>.w1`` gate, ``w3`` up, ``w2`` down), which
    is what transformers writes and reads."""
    E, d, i = config.num_local_experts, config.hidden_size, config.intermediate_size
    layout = {}
    for name, shape in config.parameter_shapes().items():
        if not (config.moe and ".mlp." in name):
            layout[name] = [(to_hf_name(name), shape)]
            continue
        layer, part = name.split(".mlp.")
        base = f"model.{layer}.block_sparse_moe."
        if part == "experts.gate_up_proj":
            layout[name] = [(f"{base}experts.{e}.{w}.weight", (i, d)) for e in range(E) for w in ("w1", "w3")]
        elif part == "experts.down_proj":
            layout[name] = [(f"{base}experts.{e}.w2.weight", (d, i)) for e in range(E)]
        else:  # gate.weight (the router); expert_bias has no HF counterpart: config_to_hf refuses it first
            layout[name] = [(base + part, shape)]
    return layout


def split_for_hf(name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
    """A tinytrain tensor as the HF tensors of hf_layout(config)[name], in that order."""
    if name.endswith("experts.gate_up_proj"):
        return [half for expert in tensor for half in expert.chunk(2, dim=0)]
    if name.endswith("experts.down_proj"):
        return list(tensor.unbind(0))
    return [tensor]


def join_from_hf(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of split_for_hf."""
    if name.endswith("experts.gate_up_proj"):
        return torch.stack([torch.cat(parts[e : e + 2]) for e in range(0, len(parts), 2)])
    if name.endswith("experts.down_proj"):
        return torch.stack(parts)
    return parts[0]


# --- config --------------------------------------------------------------------------------------

def config_from_hf(hf: dict, source: str = "config.json") -> LlamaConfig:
    """LlamaConfig from a HF config.json dict; every field tinytrain cannot honour is listed."""
    problems = []
    kind = hf.get("model_type")
    if kind not in ("llama", "mixtral"):
        problems.append(f"model_type is {kind!r}, tinytrain models 'llama' and 'mixtral'")
    expected = ["MixtralForCausalLM"] if kind == "mixtral" else ["LlamaForCausalLM"]
    archs = hf.get("architectures") or expected
    if archs != expected:
        problems.append(f"architectures is {archs}, expected {expected}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key} is true (tinytrain's linears have no bias)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {hf.get('hidden_act')!r}, tinytrain uses 'silu' (SwiGLU)")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    if hf.get("rope_scaling") not in (None, {}) and (hf["rope_scaling"].get("rope_type", hf["rope_scaling"].get("type"))
                                                    not in (None, "default")):
        problems.append(f"rope_scaling is {hf['rope_scaling']} (only unscaled RoPE is modelled)")
    elif rope_type != "default":
        problems.append(f"rope_parameters.rope_type is {rope_type!r} (only unscaled RoPE is modelled)")
    if hf.get("sliding_window") is not None:
        problems.append(f"sliding_window is {hf['sliding_window']} (tinytrain attends to the whole context)")
    heads = hf.get("num_attention_heads")
    if hf.get("head_dim") is not None and heads and hf["head_dim"] * heads != hf.get("hidden_size"):
        problems.append(f"head_dim {hf['head_dim']} x num_attention_heads {heads} != hidden_size {hf.get('hidden_size')}")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    problems += [f"{key} is missing" for key in required if key not in hf]
    if problems:
        raise HFFormatError(f"{source}: cannot be modelled faithfully by tinytrain: " + "; ".join(problems))
    theta = rope.get("rope_theta", hf.get("rope_theta", 1e6 if kind == "mixtral" else 10000.0))
    experts = {}
    if kind == "mixtral":
        experts = dict(num_local_experts=hf.get("num_local_experts", 8),
                       num_experts_per_tok=hf.get("num_experts_per_tok", 2),
                       router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
                       router_jitter_noise=float(hf.get("router_jitter_noise", 0.0)))
    return LlamaConfig(**experts,
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def config_to_hf(config: LlamaConfig, dtype: torch.dtype, bos_id: int = 1, eos_id: int = 2) -> dict:
    """The config.json of the same model as a HF LlamaForCausalLM, or MixtralForCausalLM with experts
    (refused where there is none)."""
    if config.logit_scaling_window is not None:
        raise HFFormatError(
            f"the model scales attention logits beyond position {config.logit_scaling_window} (entropy-aware ABF, "
            "model.config.logit_scaling_window); no Hugging Face Llama computes that, so an export would be a "
            "different model: continue training without it to export, or use the tinytrain checkpoint")
    if config.qk_norm:
        raise HFFormatError(
            "the model normalises each head's queries and keys (model.config.qk_norm); no Hugging Face Llama "
            "computes that, so an export would be a different model: use the tinytrain checkpoint")
    if config.value_embeddings:
        raise HFFormatError(
            f"the model adds {config.value_embeddings} value-embedding table(s) to its attention values "
            "(model.config.value_embeddings); no Hugging Face Llama computes that, so an export would be a "
            "different model: use the tinytrain checkpoint")
    if config.logit_softcap:
        raise HFFormatError(
            f"the model soft-caps its output logits at {config.logit_softcap} (model.config.logit_softcap); no "
            "Hugging Face Llama computes that, so an export would be a different model: use the tinytrain checkpoint")
    if config.router_bias_update_rate > 0:
        raise HFFormatError(
            "the model routes tokens with a learnt per-expert bias (model.config.router_bias_update_rate, "
            "auxiliary-loss-free balancing); Hugging Face's Mixtral has no such bias, so an export would route "
            "differently: use the tinytrain checkpoint")
    if config.moe:
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "num_local_experts": config.num_local_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "router_aux_loss_coef": config.router_aux_loss_coef,
            "router_jitter_noise": config.router_jitter_noise,
            "output_router_logits": False,
            "max_position_embeddings": config.max_position_embeddings,
            "rope_theta": config.rope_theta,
            "rms_norm_eps": config.rms_norm_eps,
            "sliding_window": None,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "tie_word_embeddings": config.tie_word_embeddings,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# --- safetensors, streamed -----------------------------------------------------------------------

def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]], shapes: dict[str, tuple],
                      dtype: Optional[torch.dtype], metadata: Optional[dict] = None) -> Path:
    """Write the safetensors format one tensor at a time (never all tensors in memory at once).

    ``shapes`` fixes the names, order and shapes up front (the header comes first); each tensor
    from ``tensors`` is cast to ``dtype`` (None keeps its own), checked and written, then dropped.
    """
    tensors = iter(tensors)
    first = None
    if dtype is None:  # the header needs the dtype now: take it from the first tensor
        first = next(tensors)
        dtype = first[1].dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    order = list(shapes)
    written = 0
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, tensor in itertools.chain([first] if first is not None else [], tensors):
            if written >= len(order) or name != order[written]:
                raise HFFormatError(f"tensor {name} is unexpected or out of order")
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise HFFormatError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(shapes[name])}")
            data = tensor.detach().to("cpu", dtype).contiguous()
            f.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
            written += 1
        f.flush()
        os.fsync(f.fileno())
    if written != len(order):
        tmp.unlink()
        missing = order[written:]
        raise HFFormatError(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    os.replace(tmp, path)
    return path


class TensorSource:
    """Lazy access to a folder's weights: safetensors (single or sharded, memory-mapped) or a
    pytorch_model.bin (memory-mapped torch.load)."""

    def __init__(self, files: dict[str, Path], kind: str) -> None:
        self.files, self.kind = files, kind  # tensor name -> file
        self._open: dict[Path, object] = {}

    @classmethod
    def open(cls, folder: Path) -> tuple[dict[str, tuple], "TensorSource"]:
        folder = Path(folder)
        st, st_index = folder / WEIGHTS, folder / "model.safetensors.index.json"
        bin_, bin_index = folder / "pytorch_model.bin", folder / "pytorch_model.bin.index.json"
        if st.is_file() or st_index.is_file():
            files = ({k: folder / v for k, v in json.loads(st_index.read_text())["weight_map"].items()}
                     if st_index.is_file() else None)
            if files is None:
                files = {name: st for name in _safetensors_names(st)}
            else:
                for part in sorted(set(files.values())):
                    _safetensors_names(part)
            source = cls(files, "safetensors")
        elif bin_.is_file() or bin_index.is_file():
            files = ({k: folder / v for k, v in json.loads(bin_index.read_text())["weight_map"].items()}
                     if bin_index.is_file() else None)
            if files is None:
                files = {name: bin_ for name in cls._bin(bin_)}
            source = cls(files, "bin")
        else:
            raise HFFormatError(f"{folder}: no weights (expected model.safetensors, model.safetensors.index.json "
                                "or pytorch_model.bin)")
        shapes = {name: tuple(source.get(name).shape) if source.kind == "bin" else source.shape(name)
                  for name in files}
        return shapes, source

    @staticmethod
    def _bin(path: Path) -> dict:
        from tinytrain.store.safeload import torch_load

        return torch_load(path, map_location="cpu", mmap=True)

    def _handle(self, path: Path):
        if path not in self._open:
            if self.kind == "safetensors":
                from safetensors import safe_open

                self._open[path] = safe_open(str(path), framework="pt")
            else:
                self._open[path] = self._bin(path)
        return self._open[path]

    def shape(self, name: str) -> tuple:
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        handle = self._handle(self.files[name])
        return handle.get_tensor(name) if self.kind == "safetensors" else handle[name]


def _safetensors_names(path: Path) -> list[str]:
    """The tensor names of a safetensors file, after checking that the file holds every byte its
    header promises (a truncated download or copy is named here, not deep inside a load)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 8 + n <= size else None
    except (struct.error, ValueError) as e:
        raise HFFormatError(f"{path}: not a safetensors file ({e})") from e
    if header is None:
        raise HFFormatError(f"{path}: truncated: {size} bytes, shorter than its {n}-byte header")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise HFFormatError(f"{path}: truncated: its header lists {8 + n + end} bytes, the file has {size}")
    return [k for k in header if k != "__metadata__"]


# --- import --------------------------------------------------------------------------------------

def check_hf_folder(folder: Path) -> tuple[LlamaConfig, dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise HFFormatError(f"{folder}: not a folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HFFormatError(f"{config_path}: missing (a Hugging Face model folder has config.json)")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{config_path}: not valid JSON ({e})") from e
    config = config_from_hf(hf_config, str(config_path))
    if not (folder / TOKENIZER).is_file():
        raise HFFormatError(f"{folder / TOKENIZER}: missing (tinytrain needs the sentencepiece tokenizer)")
    tok = Tokenizer(folder / TOKENIZER)
    if tok.vocab_size > config.vocab_size:
        raise HFFormatError(f"{folder / TOKENIZER} has {tok.vocab_size} pieces but {config_path} says "
                            f"vocab_size {config.vocab_size}: the model cannot embed every token")
    return config, hf_config


def hf_tensors(folder: Path, config: LlamaConfig) -> tuple[dict[str, tuple], Iterator[tuple[str, torch.Tensor]]]:
    """tinytrain name -> shape, and a stream of (tinytrain name, tensor) in that order, after
    checking every name and shape."""
    shapes, source = TensorSource.open(folder)
    layout = hf_layout(config)
    wanted = {hf_name: shape for parts in layout.values() for hf_name, shape in parts}
    present = {k for k in shapes if not k.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")  # some exporters write the tied copy too
    missing = [k for k in wanted if k not in present]
    unexpected = sorted(present - set(wanted))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append("unexpected " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
        raise HFFormatError(f"{folder}: weights do not match config.json: " + "; ".join(parts))
    for hf_name, shape in wanted.items():
        found = tuple(shapes[hf_name])
        if found != shape:
            raise HFFormatError(f"{folder}: tensor {hf_name} has shape {found}, config.json implies {shape}")

    def stream():
        for name, parts in layout.items():
            yield name, join_from_hf(name, [source.get(hf_name) for hf_name, _ in parts])

    return config.parameter_shapes(), stream()


def write_weights_folder(out: Path, config: LlamaConfig, shapes: dict[str, tuple],
                         tensors: Iterable[tuple[str, torch.Tensor]], tokenizer: Optional[Path], meta: dict,
                         metadata: Optional[dict] = None) -> Path:
    """A converted tinytrain checkpoint folder (model.safetensors with tinytrain names, the model
    config, the tokenizer, meta.json), written atomically: what `convert from-hf` and `average`
    write, and what init_from, generate, evaluate and `convert to-hf` read."""
    with atomic_folder(Path(out)) as tmp:
        write_safetensors(tmp / WEIGHTS, tensors, shapes, dtype=None, metadata=metadata or {})
        (tmp / MODEL_CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
        write_meta(tmp, {**meta, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return Path(out)


def write_tokenizer_files(folder: Path, model: Path, max_length: int) -> None:
    """tokenizer.model plus the configs transformers' LlamaTokenizer reads (BOS added, no EOS)."""
    shutil.copyfile(model, folder / TOKENIZER)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", **special, "pad_token": None, "add_bos_token": True,
        "add_eos_token": False, "legacy": False, "model_max_length": max_length,
        "clean_up_tokenization_spaces": False, "sp_model_kwargs": {},
    }, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
