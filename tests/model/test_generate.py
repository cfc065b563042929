import torch

from tinytrain.model.llama import Llama, LlamaConfig
from tinytrain.model.sampling import generate, sample_next


def test_greedy_picks_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    assert sample_next(logits, 0.0, None, 1.0, None).flatten().tolist() == [1, 0]


def test_top_k_and_top_p_restrict_the_support():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]]).repeat(500, 1)
    top2 = sample_next(logits, 1.0, 2, 1.0, gen).flatten()
    assert set(top2.tolist()) == {0, 1}
    # p(0) ~ 0.71: with top_p 0.5 only token 0 remains
    assert set(sample_next(logits, 1.0, None, 0.5, gen).flatten().tolist()) == {0}
    assert set(sample_next(logits, 1.0, None, 0.9, gen).flatten().tolist()) == {0, 1}


def test_kv_cache_generation_equals_recomputation():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("ci")).eval()
    prompt = torch.randint(3, 512, (2, 7))
    with_cache = generate(model, prompt, 20, temperature=0.0, use_cache=True)
    without = generate(model, prompt, 20, temperature=0.0, use_cache=False)
    assert torch.equal(with_cache, without) and with_cache.shape == (2, 27)
    assert set(dict(model.named_buffers())) == {"rope_cos", "rope_sin"}  # no decoding state left in the model


class AlwaysEOS(torch.nn.Module):
    """An output head whose argmax is EOS (id 2) from the given step on."""

    def __init__(self, vocab: int, after: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.after, self.calls = vocab, after, 0

    def forward(self, x):
        logits = torch.zeros(*x.shape[:-1], self.vocab)
        logits[..., 3 + self.calls % 5] = 1.0
        if self.calls >= self.after:
            logits[..., 2] = 2.0
        self.calls += 1
        return logits


def test_generation_stops_at_eos():
    model = Llama(LlamaConfig.from_name("ci")).eval()
    model.lm_head = AlwaysEOS(512, after=3)
    prompt = torch.randint(3, 512, (1, 5))
    out = generate(model, prompt, 50, temperature=0.0, eos_id=2)
    assert out[0, 5:].tolist() == [3, 4, 5, 2]  # three tokens, then EOS, then nothing more


def test_sampling_is_reproducible_with_a_seed():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("ci")).eval()
    prompt = torch.randint(3, 512, (1, 4))
    a = generate(model, prompt, 15, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, 15, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
