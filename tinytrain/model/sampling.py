"""Sampling text from a trained model, with a KV cache (cost per new token does not grow with the prompt)."""

from __future__ import annotations

from typing import Optional

import torch

from tinytrain.errors import ConfigError
from tinytrain.model.llama import Llama


def sample_next(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next token ids (B, 1) from last-position logits (B, V). temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop tokens once the mass before them already reaches top_p (the top token always stays).
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model: Llama, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
             top_k: Optional[int] = 50, top_p: float = 1.0, eos_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, use_cache: bool = True,
             vocab: Optional[int] = None) -> torch.Tensor:
    """Prompt (B, T) followed by up to max_new_tokens sampled ids; stops early when every row hit EOS.
    With ``vocab``, only ids below it are sampled (a tokenizer may have fewer pieces than the
    model has rows)."""
    limit = model.config.max_position_embeddings
    if prompt.size(1) >= limit:
        raise ConfigError(f"prompt of {prompt.size(1)} tokens leaves no room under max_position_embeddings={limit}")
    max_new_tokens = min(max_new_tokens, limit - prompt.size(1))
    tokens = prompt
    done = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)
    cache = model.new_kv_cache(prompt.size(0), prompt.size(1) + max_new_tokens) if use_cache else None
    pos, step_input = 0, prompt
    for _ in range(max_new_tokens):
        if cache is not None:
            logits = model(step_input, pos=pos, cache=cache)[:, -1]
            pos += step_input.size(1)
        else:
            logits = model(tokens)[:, -1]
        if vocab is not None:
            logits = logits[:, :vocab]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(done.unsqueeze(1), eos_id)
            done |= nxt.squeeze(1) == eos_id
        tokens = torch.cat([tokens, nxt], dim=1)
        step_input = nxt
        if eos_id is not None and done.all():
            break
    return tokens
