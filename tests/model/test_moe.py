"""Sparse experts (model/moe.py): dropless routing against a per-token reference, the two expert
kernels against each other, the balancing terms against their formulas and transformers' own, and
Mixtral folders both ways against transformers' MixtralForCausalLM."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from tinytrain.model import moe
from tinytrain.model.llama import Llama, LlamaConfig
from tinytrain.model.sampling import generate
from tinytrain.store import convert
from tinytrain.store.checkpoint import load_checkpoint
from tinytrain.store.hf import HFFormatError, config_to_hf

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402


def moe_config(**overrides) -> LlamaConfig:
    return LlamaConfig.from_name("ci", **{"num_local_experts": 4, "num_experts_per_tok": 2, **overrides})


def reference_moe(layer: moe.MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token: softmax, top-k, renormalise, run each chosen expert (output, slots per expert)."""
    gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj
    out, counts = torch.zeros_like(x), torch.zeros(layer.num_experts, dtype=torch.long)
    for t in range(x.size(0)):
        probs = F.softmax(layer.gate.weight @ x[t], dim=-1)
        top = probs.topk(layer.top_k)
        for w, e in zip(top.values / top.values.sum(), top.indices.tolist()):
            g, u = (gate_up[e] @ x[t]).chunk(2)
            out[t] += w * (down[e] @ (F.silu(g) * u))
            counts[e] += 1
    return out, counts


@pytest.mark.parametrize("grouped", [True, False])
def test_every_token_reaches_its_k_experts_and_no_other(grouped):
    torch.manual_seed(0)
    model = Llama(moe_config(num_local_experts=8, num_experts_per_tok=3)).train()
    layer = model.layers[0].mlp
    layer.grouped = grouped
    with torch.no_grad():  # an unbalanced router: expert 0 takes every token, 7 none
        layer.gate.weight[0] = 1.0
        layer.gate.weight[7] = -1.0
    x = torch.randn(2, 37, 64).abs()
    out = layer(x)
    expected, counts = reference_moe(layer, x.reshape(-1, 64))
    torch.testing.assert_close(out.reshape(-1, 64), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.counts, counts) and int(counts.sum()) == 2 * 37 * 3  # dropless
    assert counts[7] == 0 and counts[0] == 2 * 37  # the load really was uneven


def test_grouped_matmul_and_loop_give_the_same_gradients():
    torch.manual_seed(1)
    model = Llama(moe_config()).train()
    idx = torch.randint(0, 512, (2, 32))
    grads = []
    for grouped in (True, False):
        for m in model.moe_layers:
            m.grouped = grouped
        model.zero_grad()
        model(idx[:, :-1], idx[:, 1:]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert moe.can_group(torch.zeros(4, 64), *model.moe_layers[0].experts.parameters())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_aux_loss_is_mixtrals_and_enters_the_training_loss_only():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(2)
    config = moe_config(num_hidden_layers=1, router_aux_loss_coef=0.25)
    model = Llama(config).train()
    idx = torch.randint(0, 512, (3, 20))
    loss = model(idx[:, :-1], idx[:, 1:])
    layer = model.moe_layers[0]
    x = model.layers[0].post_attention_layernorm(model.embed_tokens(idx[:, :-1]) + model.layers[0].self_attn(
        model.layers[0].input_layernorm(model.embed_tokens(idx[:, :-1])), model.rope_cos[:19], model.rope_sin[:19]))
    hf_aux = load_balancing_loss_func((layer.gate(x.reshape(-1, 64)),), 4, 2)
    torch.testing.assert_close(layer.aux_loss, hf_aux)
    model.eval()
    with torch.no_grad():
        plain = model(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(loss.detach(), plain + 0.25 * hf_aux.detach())
    # the auxiliary loss reaches the router through its gradient
    model.train()
    model.zero_grad()
    (model(idx[:, :-1], idx[:, 1:]) - plain).backward()
    with_aux = model.moe_layers[0].gate.weight.grad.clone()
    config.router_aux_loss_coef = 0.0
    model.zero_grad()
    model(idx[:, :-1], idx[:, 1:]).backward()
    assert not torch.allclose(with_aux, model.moe_layers[0].gate.weight.grad)


def test_bias_moves_load_toward_balance_and_only_chooses():
    torch.manual_seed(3)
    model = Llama(moe_config(router_bias_update_rate=0.01)).train()
    layer = model.moe_layers[0]
    with torch.no_grad():
        layer.gate.weight[0] += 0.02  # expert 0 is everyone's favourite
    x = torch.randn(64, 64).abs()
    imbalance = []
    for _ in range(60):
        with torch.enable_grad():
            layer(x)
        moe.training_forward([layer])
        imbalance.append(float(layer.load.max() / layer.load.mean()))
        moe.after_step(model, 0.01)
    print(f"imbalance {imbalance[0]:.2f} -> {imbalance[-1]:.2f}")
    assert imbalance[0] > 1.5 and imbalance[-1] < 1.2 and layer.expert_bias[0] < 0
    assert layer.load is None
    # the mixing weights are the router's renormalised probabilities, the bias only picks the experts
    probs, chosen, weights = layer.route(x)
    torch.testing.assert_close(weights, probs.gather(1, chosen) / probs.gather(1, chosen).sum(-1, keepdim=True))
    assert "layers.0.mlp.expert_bias" in model.state_dict()
    assert model.config.parameter_shapes()["layers.0.mlp.expert_bias"] == (4,)


def test_counts_parameters_total_and_active():
    config = moe_config(num_local_experts=8, num_experts_per_tok=2)
    model = Llama(config)
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    expert = 3 * 64 * 176
    assert config.num_params() - config.num_active_params() == 6 * expert * 2
    dense = LlamaConfig.from_name("ci")
    assert config.num_active_params() == dense.num_params() + 2 * (expert + 8 * 64)  # one more expert + router
    with pytest.raises(Exception, match="num_experts_per_tok"):
        moe_config(num_experts_per_tok=5)


def make_mixtral_folder(path, prepared, tied=False, seed=0):
    config = transformers.MixtralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif "experts" in n or "gate" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    shutil.copyfile(prepared / "tokenizer.model", path / "tokenizer.model")
    return model


def test_mixtral_folders_both_ways_match_transformers(prepared, tmp_path):
    hf_model = make_mixtral_folder(tmp_path / "hf", prepared)
    convert.from_hf(tmp_path / "hf", tmp_path / "tt")
    ours, _ = load_checkpoint(tmp_path / "tt")
    assert ours.config.num_local_experts == 4 and ours.config.router_aux_loss_coef == 0.001
    idx = torch.randint(3, 512, (2, 40))
    with torch.no_grad():
        diff = (ours(idx) - hf_model(idx).logits).abs().max().item()
    assert diff < 1e-5
    # generation with the KV cache equals transformers' greedy continuation
    prompt = idx[:1, :8]
    mine = generate(ours, prompt, 12, temperature=0.0)
    theirs = hf_model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert mine.tolist() == theirs.tolist()
    # and back: the same file, tensor for tensor, and transformers loads it
    convert.to_hf(tmp_path / "tt", tmp_path / "hf2")
    original, exported = load_file(str(tmp_path / "hf" / "model.safetensors")), \
        load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    again = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    with torch.no_grad():
        assert torch.equal(again(idx).logits, hf_model(idx).logits)


def test_export_refuses_the_routing_bias_by_name():
    with pytest.raises(HFFormatError, match="router_bias_update_rate"):
        config_to_hf(moe_config(router_bias_update_rate=0.001), torch.float32)
    assert config_to_hf(moe_config(), torch.float32)["architectures"] == ["MixtralForCausalLM"]


@pytest.mark.parametrize("how", ["activation_checkpointing", pytest.param("compile", marks=pytest.mark.slow)])
def test_recomputed_and_compiled_blocks_route_count_and_learn_alike(how):
    """Activation checkpointing runs each block again in backward: the loads are counted once. A
    compiled block (graph broken where the experts' slices are sized on the host) gives eager's
    loss and gradients."""
    from tinytrain.train import parallel

    torch.manual_seed(4)
    config = moe_config(num_hidden_layers=1 if how == "compile" else 2, router_aux_loss_coef=0.01)
    eager, other = Llama(config).train(), Llama(config).train()
    other.load_state_dict(eager.state_dict())
    (parallel.apply_activation_checkpointing if how == "activation_checkpointing" else parallel.apply_compile)(other)
    idx = torch.randint(0, 512, (4, 33))
    losses = [m(idx[:, :-1], idx[:, 1:]) for m in (eager, other)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(eager.moe_layers, other.moe_layers):
        assert torch.equal(a.load, b.load) and int(a.load.sum()) == 4 * 32 * 2
