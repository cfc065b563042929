"""Model levers beyond TinyLlama's architecture: QK-norm (model.config.qk_norm) and the z-loss
(model.z_loss)."""

import pytest
import torch

from tinytrain.model import loss
from tinytrain.model.llama import Llama, LlamaConfig


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    """With QK-norm, scaling q_proj and k_proj up changes nothing (each head's queries and keys are
    normalised); without it, it sharpens attention. Its weights are in the config's shapes."""
    torch.manual_seed(0)
    idx = torch.randint(0, 512, (2, 24))
    for qk_norm in (True, False):
        config = LlamaConfig.from_name("ci", qk_norm=qk_norm)
        model = Llama(config).eval()
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        assert shapes == config.parameter_shapes() and sum(p.numel() for p in model.parameters()) == config.num_params()
        assert ("layers.0.self_attn.q_norm.weight" in shapes) == qk_norm
        with torch.no_grad():
            before = model(idx)
            for block in model.layers:
                block.self_attn.q_proj.weight.mul_(10.0)
                block.self_attn.k_proj.weight.mul_(10.0)
            after = model(idx)
        if qk_norm:
            torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
        else:
            assert not torch.allclose(after, before, atol=1e-3)


@pytest.mark.parametrize("chunk", [0, 7])
def test_z_loss_adds_the_mean_squared_log_partition_with_its_gradient(chunk):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (2, 9))
    logits = (x.double() @ w.double().T).flatten(0, 1)
    reference = torch.nn.functional.cross_entropy(logits, targets.flatten()) \
        + 1e-2 * (torch.logsumexp(logits, -1) ** 2).mean()
    expected = torch.autograd.grad(reference, (x, w))
    got = loss.logits_loss(x, w, targets, chunk, z_loss=1e-2)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, (x, w)), expected):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-6)


def test_z_loss_is_for_training_only():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("ci"))
    idx = torch.randint(0, 512, (2, 17))
    plain = model(idx[:, :-1], idx[:, 1:])
    model.z_loss = 1e-2
    assert float(model(idx[:, :-1], idx[:, 1:])) > float(plain)
    model.eval()
    assert float(model(idx[:, :-1], idx[:, 1:])) == pytest.approx(float(plain))


def test_export_to_hugging_face_refuses_qk_norm_by_name(tmp_path):
    from tinytrain.store.hf import HFFormatError, config_to_hf

    with pytest.raises(HFFormatError, match=r"model\.config\.qk_norm"):
        config_to_hf(LlamaConfig.from_name("ci", qk_norm=True), torch.float32)
