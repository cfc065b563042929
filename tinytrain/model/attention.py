"""Causal attention kernels: PyTorch SDPA (with its choice of kernel, or one forced), or the
flash-attn package. The model calls ``causal`` for a whole sequence and ``after_cache`` when
decoding with a KV cache; which kernel runs is chosen once per backend (``Kernel``), so a
compiled block only reads attributes.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tinytrain.errors import ConfigError, UnsupportedError

log = logging.getLogger(__name__)

# Backends a recipe can name (model.attention). "flex" attends within documents through
# FlexAttention (what "auto" and "sdpa" do on CUDA without flash-attn) and is SDPA otherwise. "sdpa-<kernel>" pins PyTorch's
# scaled_dot_product_attention to one kernel for the training forward (a failure to run it is an
# error, not a silent fallback); plain "sdpa" lets PyTorch choose.
SDPA_KERNELS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}
# CUDA-only kernels, which may also not take grouped KV heads (they are given one K/V copy per head).
CUDA_SDPA_KERNELS = ("sdpa-cudnn", "sdpa-efficient")
BACKENDS = ("auto", "sdpa", *SDPA_KERNELS, "flash-attn", "flex")


class Documents(NamedTuple):
    """Which document each token belongs to, with what the chosen kernel needs to attend within
    documents, built once per forward (``Kernel.documents``) rather than in every layer."""

    ids: torch.Tensor
    """(B, T) document index of each token (0 before a block's first BOS)."""
    cu_seqlens: Optional[torch.Tensor] = None
    """flash-attn varlen: int32 offsets of every document of the flattened batch, then B T."""
    block_mask: Optional[Any] = None
    """FlexAttention: the causal, same-document BlockMask."""


@functools.cache
def flash_attn_func():
    """flash-attn's kernel when the package is installed, else None (looked up once per process)."""
    try:
        from flash_attn import flash_attn_func as fn
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return fn


_logged: set[str] = set()


def _note(name: str) -> None:
    # is_compiling first: a compiled block must not read _logged, or it would guard on the set's
    # contents and recompile once eager code (validation) has logged a name.
    if not torch.compiler.is_compiling() and name not in _logged:
        _logged.add(name)
        log.info("attention backend: %s", name)


def forget_notes() -> None:
    """Each kernel is noted once per model, not once per process: a process that builds a second
    model (a second fit, an evaluation beside training) logs its backends again."""
    _logged.clear()


class Kernel:
    """The causal attention of one backend (see ``BACKENDS``) for n_head query heads sharing n_kv
    key/value heads. Tensors are (B, heads, T, head_dim)."""

    def __init__(self, backend: str, n_head: int, n_kv: int) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"attention backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        self.backend, self.n_head, self.n_kv = backend, n_head, n_kv
        self.flash_fn = flash_attn_func() if backend in ("auto", "flash-attn") else None
        if backend == "flash-attn" and self.flash_fn is None:
            raise UnsupportedError("attention backend 'flash-attn' asked for, but the flash-attn package is not "
                                   "importable (pip install 'tinytrain[flash]' on a CUDA machine), or use 'sdpa'")
        self.sdpa_kernels = [SDPA_KERNELS[backend]] if backend in SDPA_KERNELS else None

    def documents(self, ids: torch.Tensor) -> Documents:
        """What attending within documents needs, for a batch of document ids (B, T): flash-attn's
        varlen offsets (one host sync per forward, not three per layer), or FlexAttention's block
        mask (on CUDA without flash-attn, or with backend "flex"), or the ids alone (the dense
        mask of SDPA, built per layer: fine at CPU sizes, T^2 memory at long contexts)."""
        if self.flash_fn is not None and ids.is_cuda:
            return Documents(ids, cu_seqlens=document_offsets(ids))
        # FlexAttention has no backward on CPU: a CPU training step keeps the dense mask.
        if (self.backend == "flex" and (ids.is_cuda or not torch.is_grad_enabled())) or \
                (ids.is_cuda and self.backend in ("auto", "sdpa")):
            return Documents(ids, block_mask=document_block_mask(ids))
        return Documents(ids)

    def causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               documents: Optional[Documents] = None) -> torch.Tensor:
        """Attention of every position to itself and the ones before it; with ``documents`` (B, T)
        ids, only to those of its own document."""
        if documents is not None:
            return self._within_documents(q, k, v, documents)
        if self._use_flash(q):
            _note("flash-attn")
            # flash-attn takes (B, T, heads, hd) and handles grouped KV heads natively.
            return self.flash_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
        _note(self.backend if self.sdpa_kernels else "sdpa")
        # enable_gqa lets each group of query heads read its KV head without copying K and V.
        gqa = self.n_kv != self.n_head
        if self.sdpa_kernels is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if self.backend in CUDA_SDPA_KERNELS:
            if not q.is_cuda:
                raise UnsupportedError(f"attention backend {self.backend!r} is a CUDA kernel; on {q.device.type} "
                                       "use 'sdpa', 'sdpa-flash' or 'sdpa-math'")
            if gqa:  # give each query head its own copy of its K and V
                rep = self.n_head // self.n_kv
                k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
        with sdpa_kernel(self.sdpa_kernels):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def _within_documents(self, q, k, v, documents: Documents) -> torch.Tensor:
        if self._use_flash(q):
            _note("flash-attn varlen (document masking)")
            cu = documents.cu_seqlens if documents.cu_seqlens is not None else document_offsets(documents.ids)
            return _flash_varlen(q, k, v, cu)
        if documents.block_mask is not None:
            _note("FlexAttention with a document block mask")
            return _flex()(q, k, v, block_mask=documents.block_mask, enable_gqa=k.size(1) != q.size(1))
        _note("sdpa with a document mask")
        T, ids = q.size(2), documents.ids
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = (ids[:, :, None] == ids[:, None, :]) & causal  # (B, T, T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=k.size(1) != q.size(1))

    def _use_flash(self, q: torch.Tensor) -> bool:
        if self.flash_fn is None:
            return False
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            if self.backend == "flash-attn":
                raise UnsupportedError(f"attention backend 'flash-attn' needs CUDA tensors in bf16 or fp16, got "
                                       f"{q.device.type} {q.dtype}; use 'sdpa' or 'auto'")
            return False
        return True


@functools.cache
def _flash_varlen_func():
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def document_offsets(ids: torch.Tensor) -> torch.Tensor:
    """flash-attn varlen's cu_seqlens for (B, T) document ids: the start of every document of the
    flattened batch (a row's start always starts one), then B T, as int32. One host sync (nonzero)."""
    B, T = ids.shape
    flat = (ids + torch.arange(B, device=ids.device)[:, None] * (T + 1)).flatten()  # unique per row
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=flat.device), flat[1:] != flat[:-1]])
    end = torch.full((1,), B * T, dtype=torch.int64, device=flat.device)
    return torch.cat([torch.nonzero(starts).flatten(), end]).to(torch.int32)


def document_block_mask(ids: torch.Tensor):
    """FlexAttention's block mask: causal, and within the same document."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (ids[b, q_idx] == ids[b, kv_idx])

    B, T = ids.shape
    return create_block_mask(same_document, B, None, T, T, device=ids.device)


@functools.cache
def _flex():
    """flex_attention, compiled on CUDA (its fused kernel); eager elsewhere (CPU tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if torch.cuda.is_available() else flex_attention


def _flash_varlen(q, k, v, cu: torch.Tensor) -> torch.Tensor:
    """flash-attn's variable-length kernel over every document of the batch as its own sequence.
    max_seqlen is T, an upper bound known without a sync."""
    B, H, T, D = q.shape
    q, k, v = (x.transpose(1, 2).reshape(B * T, x.size(1), D) for x in (q, k, v))  # (B T, heads, hd)
    y = _flash_varlen_func()(q, k, v, cu, cu, T, T, causal=True)
    return y.reshape(B, T, H, D).transpose(1, 2)


def after_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
    """T new queries after ``offset`` cached positions, attending to the S = offset + T keys in
    (k, v). Decoding always uses SDPA's own choice of kernel."""
    gqa = k.size(1) != q.size(1)
    T, S = q.size(2), k.size(2)
    if offset == 0 and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if T == 1:  # one new token attends to everything cached
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=offset)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
