"""Proxy-tuning (Liu et al., 2024, "Tuning Language Models by Proxy"): a large model steered at decoding
time by a small tuned model and the same small model before tuning.

At every position the next-token scores are ``large + alpha * (tuned - base)``. The three models share a
tokenizer, so their rows mean the same pieces; each reads the same ids with its own KV cache. Raw logits
or log-probabilities give the same distribution after the softmax (each model's per-position constant
shifts the whole row), so the raw logits are combined, in fp32.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from tinytrain.model.llama import KVCache, Llama


class ProxyTuned(nn.Module):
    """Looks like a ``Llama`` to what reads one (generation, bits per byte, the lm-eval adapter, passkey):
    ``config`` (the large model's, with the shortest context window of the three and the rows they all
    have), ``forward(idx, pos=, cache=)`` returning logits, ``new_kv_cache``. With ``alpha`` 0 the small
    models are not run: the output is the large model's alone."""

    def __init__(self, large: Llama, tuned: Llama, base: Llama, alpha: float = 1.0) -> None:
        super().__init__()
        self.large, self.tuned, self.base = large, tuned, base
        self.alpha = float(alpha)
        models = (large, tuned, base)
        self.vocab = min(m.config.vocab_size for m in models)
        window = min(m.config.max_position_embeddings for m in models)
        self.config = replace(large.config, max_position_embeddings=window, vocab_size=self.vocab)

    def _models(self) -> tuple[Llama, ...]:
        return (self.large,) if self.alpha == 0 else (self.large, self.tuned, self.base)

    def new_kv_cache(self, batch: int, length: Optional[int] = None, dtype=None) -> tuple[KVCache, ...]:
        """One cache per model that runs (the large model's alone when alpha is 0)."""
        length = length or self.config.max_position_embeddings
        return tuple(m.new_kv_cache(batch, length, dtype) for m in self._models())

    def forward(self, idx: torch.Tensor, pos: int = 0, *, cache: Optional[tuple[KVCache, ...]] = None) -> torch.Tensor:
        """Combined logits (B, T, vocab) in fp32."""
        models = self._models()
        caches = cache if cache is not None else (None,) * len(models)
        if len(caches) != len(models):
            raise ValueError(f"expected {len(models)} KV caches (one per model), got {len(caches)}")
        logits = [m(idx, pos=pos, cache=c)[..., :self.vocab].float() for m, c in zip(models, caches)]
        return logits[0] if len(logits) == 1 else logits[0] + self.alpha * (logits[1] - logits[2])
