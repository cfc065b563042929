"""Passkey retrieval: a number hidden at some depth of filler text, asked for at the end (the test
of "Landmark Attention", arXiv 2305.16300, used by most context-extension papers). A model that can
use its whole context repeats the number; accuracy by prompt length shows how far it can look back.

Prompts are built in tokens, not characters: [BOS] intro, filler up to the depth, the needle,
filler, the question; the answer is read from a greedy continuation.
"""

from __future__ import annotations

import random
import re

import torch

from tinytrain.errors import ConfigError

INTRO = "There is an important number hidden inside a lot of irrelevant text. Find it and remember it. "
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def prompt(tok, length: int, depth: float, key: int) -> list[int]:
    """Token ids of exactly ``length`` tokens with the needle after ``depth`` (0 to 1) of the filler."""
    intro, needle, question = tok.encode(INTRO, bos=True), tok.encode(NEEDLE.format(key=key)), tok.encode(QUESTION)
    room = length - len(intro) - len(needle) - len(question)
    if room < 1:
        raise ConfigError(f"a passkey prompt needs more than {length - room} tokens; got length {length}")
    unit = tok.encode(FILLER)
    filler = (unit * (room // len(unit) + 1))[:room]
    at = round(depth * room)
    return intro + filler[:at] + needle + filler[at:] + question


@torch.no_grad()
def passkey_accuracy(model, tok, lengths: list[int], depths: list[float], trials: int, seed: int = 0) -> dict:
    """Accuracy at each length (over depths x trials) and at each (length, depth)."""
    from tinytrain.model.sampling import generate

    limit = model.config.max_position_embeddings
    too_long = [n for n in lengths if n + 8 > limit]
    if too_long:
        raise ConfigError(f"passkey lengths {too_long} leave no room for the answer under max_position_embeddings="
                          f"{limit}")
    rng = random.Random(seed)
    device = next(model.parameters()).device
    by_length, by_depth = {}, {}
    for length in lengths:
        hits = 0
        for depth in depths:
            found = 0
            for _ in range(trials):
                key = rng.randint(10_000, 99_999)
                ids = torch.tensor([prompt(tok, length, depth, key)], device=device)
                out = generate(model, ids, 8, temperature=0.0, top_k=None, vocab=tok.vocab_size)
                answer = re.search(r"\d+", tok.decode(out[0, length:].tolist()))
                found += answer is not None and answer.group() == str(key)
            by_depth[f"{length}@{depth:g}"] = found / trials
            hits += found
        by_length[str(length)] = hits / (trials * len(depths))
    return {"lengths": lengths, "depths": depths, "trials": trials, "accuracy": by_length,
            "accuracy_by_depth": by_depth}
