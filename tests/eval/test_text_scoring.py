"""`evaluate --text` scores held-out text as compressors do: every token once, each with as much of
what precedes it as the model's window holds (a sliding window), not in disjoint windows."""

import math

import pytest
import torch

from tinytrain.data.tokenizer import Tokenizer
from tinytrain.eval.tasks import EvalError, adaptive_bits_per_byte, bits_per_byte, scoring_windows
from tinytrain.model.llama import Llama, LlamaConfig


@pytest.mark.parametrize("n,length,stride", [(2, 8, 2), (8, 8, 2), (9, 8, 2), (50, 8, 3), (50, 8, 8), (50, 8, 1),
                                             (1000, 128, 32)])
def test_each_target_is_scored_once_with_at_least_window_minus_stride_before_it(n, length, stride):
    scored = []
    for start, end, first in scoring_windows(n, length, stride):
        assert end - start <= length and start < first <= end  # a window's inputs fit the context
        for t in range(first, end + 1):
            scored.append(t)
            assert t - start >= min(t, length - stride + 1)  # ids[start:t] precede target t
    assert scored == list(range(1, n))


def test_a_stride_of_the_whole_window_gives_disjoint_windows():
    assert scoring_windows(20, 8, 8) == [(0, 8, 1), (8, 16, 9), (11, 19, 17)]  # the last one a full window too
    assert [(s, f) for s, _, f in scoring_windows(20, 8, 4)] == [(0, 1), (4, 9), (8, 13), (11, 17)]
    with pytest.raises(EvalError, match=r"stride must be in \[1, 8\]"):
        scoring_windows(20, 8, 9)


@pytest.fixture(scope="module")
def model_and_text(prepared):
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("ci", max_position_embeddings=32)).eval()
    tok = Tokenizer(prepared / "tokenizer.model")
    text = "def scale(values, factor):\n    return [v * factor for v in values]\n" * 4
    return model, tok, text


def test_the_score_is_each_tokens_loss_given_the_context_its_window_gave_it(model_and_text):
    model, tok, text = model_and_text
    ids = tok.encode(text, bos=True)
    assert len(ids) > 3 * 32
    expected = 0.0
    with torch.no_grad():
        for start, end, first in scoring_windows(len(ids), 32, 8):
            for t in range(first, end + 1):
                logits = model(torch.tensor([ids[start:t]]))[0, -1].float()
                expected -= float(torch.log_softmax(logits, -1)[ids[t]])
        got = bits_per_byte(model, tok, [text], batch=3, stride=8)
    assert got["tokens"] == len(ids) - 1 and got["stride"] == 8
    assert got["nats_per_token"] * got["tokens"] == pytest.approx(expected, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(expected / math.log(2) / len(text.encode()), rel=1e-5)


def test_within_one_window_the_stride_changes_nothing(model_and_text):
    model, tok, text = model_and_text
    short = text[:40]
    assert len(tok.encode(short, bos=True)) <= 32
    with torch.no_grad():
        scores = {s: bits_per_byte(model, tok, [short], stride=s)["bits_per_byte"] for s in (1, 8, 32)}
    assert scores[1] == pytest.approx(scores[8], rel=1e-6) and scores[8] == pytest.approx(scores[32], rel=1e-6)


def test_adapting_scores_each_token_before_learning_from_it(model_and_text):
    """Dynamic evaluation: a document's score depends only on what was read before it, the text read
    twice is predicted better the second time, and the model given is left as it was."""
    model, tok, text = model_and_text
    other = "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n" * 3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        static = bits_per_byte(model, tok, [text], stride=8)
    first = adaptive_bits_per_byte(model, tok, [text, other], lr=0.05, stride=8)
    changed = adaptive_bits_per_byte(model, tok, [text, text], lr=0.05, stride=8)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # the first document is read by the same sequence of models whatever follows it
    assert first["nats_per_document"][0] == changed["nats_per_document"][0]
    assert first["tokens"] == static["tokens"] + len(tok.encode(other, bos=True)) - 1
    # its first window is scored by the model as given; from the second on, by one that has learnt
    assert first["nats_per_document"][0] != pytest.approx(static["nats_per_token"] * static["tokens"], rel=1e-4)
    # a text met again is predicted better than the first time, and better than without adapting
    again = changed["nats_per_document"][1]
    assert again < 0.8 * changed["nats_per_document"][0] and again < 0.8 * static["nats_per_token"] * static["tokens"]
    assert changed["bits_per_byte"] == pytest.approx(
        sum(changed["nats_per_document"]) / math.log(2) / (2 * len(text.encode())))


def test_within_the_first_window_adapting_changes_nothing(model_and_text):
    model, tok, text = model_and_text
    short = text[:40]
    with torch.no_grad():
        static = bits_per_byte(model, tok, [short])
    adaptive = adaptive_bits_per_byte(model, tok, [short], lr=0.05)
    assert adaptive["nats_per_token"] == pytest.approx(static["nats_per_token"], rel=1e-6)
    with pytest.raises(EvalError, match="learning rate must be > 0, got 0"):
        adaptive_bits_per_byte(model, tok, [short], lr=0)


def test_scoring_builds_no_autograd_graph(model_and_text):
    model, tok, text = model_and_text
    modes = []
    handle = model.register_forward_hook(lambda *_: modes.append(torch.is_grad_enabled()))
    try:
        bits_per_byte(model, tok, [text], stride=8)  # called with gradients enabled, as `evaluate --text` does
    finally:
        handle.remove()
    assert modes and not any(modes)
