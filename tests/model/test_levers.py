"""Model levers beyond TinyLlama's architecture: QK-norm (model.config.qk_norm), the z-loss
(model.z_loss), logit soft-capping (model.config.logit_softcap), zero-initialised outputs
(model.config.zero_init_outputs) and value embeddings (model.config.value_embeddings)."""

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


@pytest.mark.parametrize("softcap", [0.0, 3.0], ids=["plain", "soft-capped"])
@pytest.mark.parametrize("chunk", [0, 7])
def test_z_loss_and_soft_cap_match_autograd_of_the_formula(chunk, softcap):
    """Mean cross-entropy plus the z-loss of the (soft-capped) logits: value and gradients equal
    autograd's of the formula, chunked (gradients made by hand) and plain."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (2, 9))
    logits = (x.double() @ w.double().T).flatten(0, 1)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    reference = torch.nn.functional.cross_entropy(logits, targets.flatten()) \
        + 1e-2 * (torch.logsumexp(logits, -1) ** 2).mean()
    expected = torch.autograd.grad(reference, (x, w))
    got = loss.logits_loss(x, w, targets, chunk, z_loss=1e-2, softcap=softcap)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-6)
    if softcap:  # the cap matters at these logits
        assert abs(float(got) - float(loss.logits_loss(x, w, targets, chunk, z_loss=1e-2))) > 0.1
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


def test_soft_cap_bounds_the_logits_of_decoding_training_and_evaluation_alike():
    """The logits a sampler sees, the training loss and the per-token losses of evaluation are one
    function of the same capped logits."""
    torch.manual_seed(0)
    config = LlamaConfig.from_name("ci", logit_softcap=2.0)
    model = Llama(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # raw logits far beyond the cap
    idx = torch.randint(0, 512, (2, 17))
    with torch.no_grad():
        logits = model(idx[:, :-1])
    assert float(logits.abs().max()) <= 2.0
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten(), reduction="none")
    torch.testing.assert_close(model(idx[:, :-1], idx[:, 1:], per_token=True).flatten(), expected)
    torch.testing.assert_close(model(idx[:, :-1], idx[:, 1:]), expected.mean())
    model.loss_chunk_size = 5
    torch.testing.assert_close(model(idx[:, :-1], idx[:, 1:]), expected.mean())
    uncapped = Llama(LlamaConfig.from_name("ci"))
    uncapped.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert float(uncapped(idx[:, :-1]).abs().max()) > 10.0


def test_soft_cap_must_be_a_number_at_least_zero():
    from tinytrain.model.llama import ConfigError

    with pytest.raises(ConfigError, match="logit_softcap must be a number >= 0, got -1"):
        LlamaConfig.from_name("ci", logit_softcap=-1.0)


def test_zero_init_outputs_starts_every_block_as_the_identity_and_the_logits_uniform():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("ci", zero_init_outputs=True))
    idx = torch.randint(0, 512, (2, 17))
    with torch.no_grad():
        x = model.embed_tokens(idx)
        torch.testing.assert_close(model.hidden(idx), x)
        assert float(model(idx).abs().max()) == 0.0
    loss_value = model(idx[:, :-1], idx[:, 1:])
    assert float(loss_value) == pytest.approx(torch.log(torch.tensor(512.0)).item(), rel=1e-5)
    loss_value.backward()  # the head learns first; the blocks' input side gets no gradient until it has
    assert float(model.lm_head.weight.grad.abs().sum()) > 0
    plain = Llama(LlamaConfig.from_name("ci"))
    assert all(float(p.abs().sum()) > 0 for p in plain.parameters())
    tied = Llama(LlamaConfig.from_name("ci", zero_init_outputs=True, tie_word_embeddings=True))
    assert float(tied.embed_tokens.weight.abs().sum()) > 0  # a tied head is the embedding: never zeroed


def test_export_to_hugging_face_refuses_soft_capping_by_name():
    from tinytrain.store.hf import HFFormatError, config_to_hf

    with pytest.raises(HFFormatError, match=r"model\.config\.logit_softcap"):
        config_to_hf(LlamaConfig.from_name("ci", logit_softcap=30.0), torch.float32)
    assert config_to_hf(LlamaConfig.from_name("ci", zero_init_outputs=True), torch.float32)["architectures"] \
        == ["LlamaForCausalLM"]


def test_the_initialisation_is_not_part_of_the_architecture():
    """A run may resume, or start from a checkpoint, under a recipe whose initialisation differs (the
    weights are read, not drawn); any other field still refuses, by name."""
    from tinytrain.store.checkpoint import CheckpointError, check_resumable

    plain = LlamaConfig.from_name("ci")
    other_init = LlamaConfig.from_name("ci", zero_init_outputs=True, initializer_std=0.02)
    assert plain.architecture() == other_init.architecture() and plain.differences(other_init, "a", "b") == ""
    check_resumable({"model_config": other_init.to_dict()}, plain, None, None)
    with pytest.raises(CheckpointError, match=r"model\.config\.logit_softcap: checkpoint 15\.0, recipe 0\.0"):
        check_resumable({"model_config": LlamaConfig.from_name("ci", logit_softcap=15.0).to_dict()}, plain, None, None)


def test_value_embeddings_add_a_token_table_to_the_values_of_the_first_and_last_blocks():
    """Table j feeds block j and block L - k + j; the model with its tables at zero is the plain model;
    incremental decoding agrees with the whole-sequence forward; the tables learn; FLOPs count them as
    lookups (no 6N term)."""
    torch.manual_seed(0)
    config = LlamaConfig.from_name("ci", num_hidden_layers=4, value_embeddings=2)
    assert config.value_embedding_tables == [0, 1, 0, 1]
    assert LlamaConfig.from_name("ci", num_hidden_layers=5, value_embeddings=1).value_embedding_tables == \
        [0, None, None, None, 0]
    model = Llama(config).eval()
    assert list(dict(model.named_parameters())) == list(config.parameter_shapes())
    assert {n: tuple(p.shape) for n, p in model.named_parameters()}["value_embeds.1.weight"] == (512, 2 * 16)
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    plain_config = LlamaConfig.from_name("ci", num_hidden_layers=4)
    assert config.num_params(include_embedding=False) == plain_config.num_params(include_embedding=False)
    assert config.training_flops_per_token(64) == plain_config.training_flops_per_token(64)

    idx = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(2)
        parts = torch.cat([model(idx[:, :10], cache=cache), model(idx[:, 10:], pos=10, cache=cache)], dim=1)
        torch.testing.assert_close(parts, full, atol=1e-5, rtol=1e-5)
        plain = Llama(plain_config).eval()
        plain.load_weights({k: v for k, v in model.state_dict().items() if not k.startswith("value_embeds.")})
        assert not torch.allclose(plain(idx), full, atol=1e-3)
        for table in model.value_embeds:
            table.weight.zero_()
        torch.testing.assert_close(model(idx), plain(idx))

    model.train()
    model(idx[:, :-1], idx[:, 1:]).backward()
    used = idx[:, :-1].unique()
    for table in model.value_embeds:
        grad = table.weight.grad
        assert float(grad[used].abs().sum(dim=1).min()) > 0 and float(grad.abs().sum()) == float(grad[used].abs().sum())


def test_value_embeddings_are_at_most_half_the_blocks_and_export_refuses_them():
    from tinytrain.errors import ConfigError
    from tinytrain.store.hf import HFFormatError, config_to_hf

    with pytest.raises(ConfigError, match=r"value_embeddings \(2\) must be at most half of num_hidden_layers \(2\)"):
        LlamaConfig.from_name("ci", value_embeddings=2)
    with pytest.raises(ConfigError, match="value_embeddings must be an integer >= 0, got -1"):
        LlamaConfig.from_name("ci", value_embeddings=-1)
    with pytest.raises(HFFormatError, match=r"model\.config\.value_embeddings"):
        config_to_hf(LlamaConfig.from_name("ci", value_embeddings=1), torch.float32)


def test_value_embeddings_train_with_the_token_embedding_not_with_muon():
    from tinytrain.train.optim import OptimConfig, build_optimizer

    model = Llama(LlamaConfig.from_name("ci", value_embeddings=1))
    optimizer = build_optimizer(model, OptimConfig(optimizer="muon", embedding_lr=0.3, lr=1e-2))
    table, embedding = model.value_embeds[0].weight, model.embed_tokens.weight
    assert not any(p is table for group in optimizer.muon.param_groups for p in group["params"])
    groups = [g for g in optimizer.adamw.param_groups if any(p is table for p in g["params"])]
    assert len(groups) == 1 and any(p is embedding for p in groups[0]["params"])
    assert optimizer.adamw.param_groups.index(groups[0]) == 2 and optimizer.adamw.lr_ratios[2] == pytest.approx(30.0)
