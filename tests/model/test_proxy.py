"""Proxy-tuning (model/proxy.py): its identities on random models, and the tokenizer comparison it relies on."""

import random

import pytest
import torch

from tinytrain.data.tokenizer import Tokenizer, train_tokenizer
from tinytrain.model.llama import Llama, LlamaConfig
from tinytrain.model.proxy import ProxyTuned
from tinytrain.model.sampling import generate


def models(n: int, **overrides) -> list[Llama]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(Llama(LlamaConfig.from_name("ci", **overrides)).eval())
    return out


@torch.no_grad()
def test_steering_a_model_by_its_own_difference_from_a_tuned_one_gives_the_tuned_one():
    """large + (tuned - base) with base = large is tuned itself: logits to fp32 rounding, greedy text equal."""
    large, tuned = models(2)
    proxy = ProxyTuned(large, tuned, large, alpha=1.0)
    idx = torch.randint(3, 512, (2, 24))
    torch.testing.assert_close(proxy(idx), tuned(idx).float(), atol=1e-4, rtol=0)
    prompt = idx[:, :5]
    assert torch.equal(generate(proxy, prompt, 30, temperature=0.0), generate(tuned, prompt, 30, temperature=0.0))


@torch.no_grad()
def test_alpha_zero_is_the_large_model_alone_and_runs_nothing_else():
    large, tuned, base = models(3)
    calls = []
    for m in (tuned, base):
        m.register_forward_hook(lambda *_: calls.append(1))
    proxy = ProxyTuned(large, tuned, base, alpha=0.0)
    idx = torch.randint(3, 512, (2, 24))
    assert torch.equal(proxy(idx), large(idx).float())
    assert len(proxy.new_kv_cache(1, 40)) == 1
    prompt = idx[:1, :5]
    assert torch.equal(generate(proxy, prompt, 30, temperature=0.0), generate(large, prompt, 30, temperature=0.0))
    assert calls == []


@torch.no_grad()
def test_each_model_keeps_its_own_cache_so_decoding_equals_recomputation():
    large, tuned, base = models(3)
    proxy = ProxyTuned(large, tuned, base, alpha=0.7)
    prompt = torch.randint(3, 512, (2, 6))
    with_cache = generate(proxy, prompt, 25, temperature=0.0, use_cache=True)
    assert torch.equal(with_cache, generate(proxy, prompt, 25, temperature=0.0, use_cache=False))
    # the combination is a different model from each of its parts
    assert not torch.equal(with_cache, generate(large, prompt, 25, temperature=0.0))


@torch.no_grad()
def test_the_shortest_window_and_the_common_rows_bound_the_combination():
    large, = models(1)
    small = models(2, max_position_embeddings=64, vocab_size=500)
    proxy = ProxyTuned(large, *small)
    assert proxy.config.max_position_embeddings == 64 and proxy.config.vocab_size == 500
    assert proxy(torch.randint(3, 500, (1, 10))).shape == (1, 10, 500)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=64"):
        proxy(torch.randint(3, 500, (1, 65)))


def test_tokenizers_compare_by_their_pieces_not_their_size(prepared, tmp_path):
    """The same file, or the same pieces serialized again, agree; another vocabulary of the same size
    does not, and the difference names both files and the first id that differs."""
    ours = Tokenizer(prepared / "tokenizer.model")
    assert ours.difference(Tokenizer(prepared / "tokenizer.model")) is None
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(ours.proto)
    proto.trainer_spec.input_sentence_size += 1  # same pieces, different bytes
    (tmp_path / "same.model").write_bytes(proto.SerializeToString())
    same = Tokenizer(tmp_path / "same.model")
    assert same.sha256 != ours.sha256 and ours.difference(same) is None
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    other = train_tokenizer((" ".join(rng.sample(words, 12)) for _ in range(4000)), tmp_path / "other.model",
                            ours.vocab_size)
    assert other.vocab_size == ours.vocab_size
    message = ours.difference(other)
    assert message and str(prepared / "tokenizer.model") in message and str(tmp_path / "other.model") in message
    assert message.startswith("id ")
