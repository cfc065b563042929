import math

import pytest
import torch

from tinytrain.model.llama import PRESETS, Llama, LlamaConfig


def test_tinyllama_preset_has_exactly_the_published_parameter_count():
    config = LlamaConfig.from_name("tinyllama-1.1b")
    with torch.device("meta"):
        model = Llama(config)
    assert sum(p.numel() for p in model.parameters()) == 1_100_048_384
    assert config.num_params() == 1_100_048_384
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (22, 2048, 32, 4, 5632, 32000)


def test_presets_sizes():
    # 5,507,520, QK-norm's 6 x 2 x 64 and three value-embedding tables of 8,192 x 64
    assert LlamaConfig.from_name("tiny").num_params() == 5_508_288 + 3 * 8192 * 64
    assert LlamaConfig.from_name("ci").num_params() < 1e6
    assert set(PRESETS) == {"tinyllama-1.1b", "tiny", "ci", "tinyllama-1.1b-moe", "tiny-moe"}
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        LlamaConfig.from_name("nope")


def test_config_errors_name_the_fields():
    with pytest.raises(ValueError, match="num_attention_heads \\(6\\) must be divisible by num_key_value_heads \\(4\\)"):
        LlamaConfig.from_name("ci", num_attention_heads=6, num_key_value_heads=4, hidden_size=96)
    with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
        LlamaConfig.from_name("ci", vocab_size=0)


@pytest.mark.parametrize("heads,kv_heads,theta,hidden,inter", [(4, 4, 10000.0, 64, 176), (8, 2, 500000.0, 96, 200)])
def test_logits_match_transformers(heads, kv_heads, theta, hidden, inter):
    transformers = pytest.importorskip("transformers")
    config = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=3,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         rope_theta=theta, rms_norm_eps=1e-6)
    hf_config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=3,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
        rope_theta=theta, rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    ours = Llama(config).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()}, strict=True)
    idx = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-5


def test_attention_is_causal():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("ci")).eval()
    idx = torch.randint(0, 512, (1, 32))
    changed = idx.clone()
    changed[0, 20:] = (changed[0, 20:] + 7) % 512
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_kv_cache_gives_the_full_forward_logits():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("ci")).eval()
    idx = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(2, 30)
        parts = [model(idx[:, :17], pos=0, cache=cache)] + [model(idx[:, i : i + 1], pos=i, cache=cache)
                                                             for i in range(17, 30)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_tinyllama_initialisation():
    config = LlamaConfig.from_name("ci", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                   vocab_size=2048)
    torch.manual_seed(0)
    model = Llama(config)
    small = math.sqrt(2 / (5 * 256))
    out = 1 / math.sqrt(256) / 4
    assert model.embed_tokens.weight.std().item() == pytest.approx(small, rel=0.05)
    assert model.layers[1].self_attn.q_proj.weight.std().item() == pytest.approx(small, rel=0.05)
    assert model.layers[1].mlp.up_proj.weight.std().item() == pytest.approx(small, rel=0.05)
    assert model.layers[1].self_attn.o_proj.weight.std().item() == pytest.approx(out, rel=0.05)
    assert model.layers[1].mlp.down_proj.weight.std().item() == pytest.approx(out, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_meta_construction_then_init_matches_eager_rope():
    config = LlamaConfig.from_name("ci")
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device="cpu")
    model.init_weights()
    eager = Llama(config)
    assert torch.equal(model.rope_cos, eager.rope_cos) and torch.equal(model.rope_sin, eager.rope_sin)
    assert torch.isfinite(model(torch.zeros(1, 8, dtype=torch.long))).all()


def test_loss_is_next_token_cross_entropy():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("ci"))
    idx = torch.randint(0, 512, (2, 16))
    targets = torch.randint(0, 512, (2, 16))
    logits = model(idx)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), targets.reshape(-1))
    torch.testing.assert_close(model(idx, targets), expected)


@pytest.mark.parametrize("preset", ["ci", "tiny"])
def test_training_flops_formula_matches_the_flop_counter(preset):
    """6N + 12LHQT against torch's own count of a forward and backward pass (matmuls and attention).
    The MATH attention backend is used because the counter has no formula for CPU's fused kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = LlamaConfig.from_name(preset)
    model = Llama(config)
    batch, seq = 2, config.max_position_embeddings
    idx = torch.randint(0, config.vocab_size, (batch, seq))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, idx).backward()
    counted = counter.get_total_flops() / (batch * seq)
    assert counted == pytest.approx(config.training_flops_per_token(seq), rel=0.01)


def test_tinyllama_flops_per_token_and_peak_table():
    from tinytrain.train.flops import peak_flops

    config = LlamaConfig.from_name("tinyllama-1.1b")
    # N without the input embedding: 1,100,048,384 - 32000 x 2048
    assert config.num_params(include_embedding=False) == 1_034_512_384
    assert config.training_flops_per_token(2048) == 6 * 1_034_512_384 + 12 * 22 * 32 * 64 * 2048
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("Some CPU") is None


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_fp32_within_bf16_tolerance():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("ci")).eval()
    idx = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        reference = model(idx)
        gpu = model.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = gpu(idx.cuda()).float().cpu()
    rel = (logits - reference).norm() / reference.norm()
    assert rel < 2e-2


def test_each_model_built_in_a_process_notes_its_attention_backend(caplog):
    """The backend is logged on a model's first forward, once per model: a second fit in the same
    process (a library user's loop, an in-process test) reports it too."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    idx = torch.randint(0, 64, (1, 8))
    for _ in range(2):
        model = Llama(cfg)
        model.set_attention_backend("sdpa-math")
        with caplog.at_level("INFO", logger="tinytrain.model.attention"):
            caplog.clear()
            model(idx)
            model(idx)
        assert [r.getMessage() for r in caplog.records].count("attention backend: sdpa-math") == 1
