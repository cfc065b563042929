"""Hugging Face interop, checked against transformers itself on tiny random models made here."""

import json
import shutil

import pytest
import torch
from conftest import RECIPES, tinytrain_in_process

from tinytrain.data.tokenizer import Tokenizer
from tinytrain.model.llama import Llama, LlamaConfig
from tinytrain.model.sampling import generate
from tinytrain.store import convert, hf
from tinytrain.store.checkpoint import load_checkpoint
from tinytrain.store.hf import HFFormatError

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

CONFIGS = {
    # name: (heads, kv heads, hidden, intermediate, layers, rope_theta, tied)
    "mha": (4, 4, 64, 176, 2, 10000.0, False),
    "gqa-8-2": (8, 2, 128, 352, 3, 10000.0, False),
    "odd-sizes": (6, 3, 72, 200, 3, 10000.0, False),
    "rope-theta-5e5": (4, 1, 64, 96, 2, 500000.0, False),
    "tied": (4, 2, 64, 176, 2, 10000.0, True),
}


def make_hf_folder(path, prepared, name="gqa-8-2", vocab=512, seed=0, **overrides):
    heads, kv, hidden, inter, layers, theta, tied = CONFIGS[name]
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128, rope_theta=theta,
        rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, **overrides,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm weights start at ones; make them count
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)
    shutil.copyfile(prepared / "tokenizer.model", path / "tokenizer.model")
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_after_import(name, prepared, tmp_path):
    hf_model = make_hf_folder(tmp_path / "hf", prepared, name)
    convert.from_hf(tmp_path / "hf", tmp_path / "tt")
    ours, _ = load_checkpoint(tmp_path / "tt")
    idx = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        diff = (ours(idx) - hf_model(idx).logits).abs().max().item()
    print(f"{name}: max abs logit difference {diff:.3g}")
    assert diff < 1e-5


def _tensors_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["gqa-8-2", "tied"])
def test_hf_to_tinytrain_to_hf_is_bit_exact(name, prepared, tmp_path):
    make_hf_folder(tmp_path / "hf", prepared, name)
    convert.from_hf(tmp_path / "hf", tmp_path / "tt")
    convert.to_hf(tmp_path / "tt", tmp_path / "hf2")
    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    if CONFIGS[name][-1]:  # tied: transformers may or may not store the shared head
        original.pop("lm_head.weight", None)
    _tensors_equal(original, load_file(str(tmp_path / "hf2" / "model.safetensors")))
    # ... and back again
    convert.from_hf(tmp_path / "hf2", tmp_path / "tt2")
    _tensors_equal(load_file(str(tmp_path / "tt" / "model.safetensors")),
                   load_file(str(tmp_path / "tt2" / "model.safetensors")))


def test_export_loads_in_transformers_with_its_tokenizer(prepared, tmp_path):
    hf_model = make_hf_folder(tmp_path / "hf", prepared)
    convert.from_hf(tmp_path / "hf", tmp_path / "tt")
    convert.to_hf(tmp_path / "tt", tmp_path / "out", dtype="bfloat16")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "bfloat16"
    assert (config["num_key_value_heads"], config["rope_theta"], config["tie_word_embeddings"]) == (2, 10000.0, False)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    idx = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        diff = (loaded(idx).logits - hf_model(idx).logits).abs().max().item()
    assert diff < 0.1  # bf16 export of fp32 weights
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ours = Tokenizer(tmp_path / "out" / "tokenizer.model")
    texts = ["def foo(x):\n    return  x + 1\n", "Hello world, the sum of alpha and beta.", "ünïcödé 😀 end",
             "a\n\nb\tc", "x=1;y=22  # comment", "class A:\n    pass\n"]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == ours.encode(text, bos=True), text
        assert tok.decode(ids, skip_special_tokens=True) == ours.decode(ids[1:]) == text


def test_greedy_generation_matches_transformers(prepared, tmp_path):
    hf_model = make_hf_folder(tmp_path / "hf", prepared, "odd-sizes", seed=3)
    ours, _ = load_checkpoint(tmp_path / "hf")  # straight from the HF folder
    prompt = torch.randint(3, 512, (1, 9))
    theirs = hf_model.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                               min_new_tokens=32)
    mine = generate(ours, prompt, 32, temperature=0.0, eos_id=None)
    assert torch.equal(mine, theirs)


def test_hugging_face_folders_steer_and_are_steered(prepared, tmp_path):
    """Proxy-tuning with every model a HF folder, and mixed with a tinytrain checkpoint: steering a model
    by its own difference from another gives that other model's greedy text, as transformers writes it."""
    from tinytrain.store.checkpoint import load_proxy_tuned

    make_hf_folder(tmp_path / "large", prepared, "gqa-8-2", seed=1)
    tuned = make_hf_folder(tmp_path / "tuned", prepared, "mha", seed=2)
    convert.from_hf(tmp_path / "large", tmp_path / "large-tt")
    prompt = torch.randint(3, 512, (1, 9))
    theirs = tuned.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
                            min_new_tokens=24)
    for large in ("large", "large-tt"):
        proxy, tok = load_proxy_tuned(tmp_path / large, tmp_path / "tuned", tmp_path / "large")
        assert tok.vocab_size == 512
        assert torch.equal(generate(proxy, prompt, 24, temperature=0.0, eos_id=None), theirs), large


def test_tinyllama_1_1b_maps_every_key_and_shape_both_ways():
    config = LlamaConfig.from_name("tinyllama-1.1b")
    hf_config = transformers.LlamaConfig(**{k: v for k, v in hf.config_to_hf(config, torch.bfloat16).items()
                                            if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        theirs = transformers.LlamaForCausalLM(hf_config)
        ours = Llama(config)
    assert hf.config_from_hf(hf_config.to_dict() | {"architectures": ["LlamaForCausalLM"]}) == config
    hf_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {hf.from_hf_name(k): v for k, v in hf_shapes.items()} == our_shapes == config.parameter_shapes()
    assert {hf.to_hf_name(k): v for k, v in our_shapes.items()} == hf_shapes
    assert sum(v.numel() for v in theirs.parameters()) == 1_100_048_384


# --- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def hf_dir(prepared, tmp_path):
    make_hf_folder(tmp_path / "hf", prepared, "mha")
    return tmp_path / "hf"


@pytest.mark.parametrize("missing,message", [
    ("config.json", r"config\.json: missing"),
    ("model.safetensors", r"no weights \(expected model\.safetensors"),
    ("tokenizer.model", r"tokenizer\.model: missing"),
])
def test_missing_files(hf_dir, tmp_path, missing, message):
    (hf_dir / missing).unlink()
    with pytest.raises(HFFormatError, match=message):
        convert.from_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _edit_config(hf_dir, **changes):
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_unsupported_architecture_lists_every_field(hf_dir, tmp_path):
    _edit_config(hf_dir, attention_bias=True, mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0},
                 sliding_window=4096)
    with pytest.raises(HFFormatError) as err:
        convert.from_hf(hf_dir, tmp_path / "out")
    for field in ("attention_bias", "mlp_bias", "rope_scaling", "sliding_window"):
        assert field in str(err.value)


def test_other_model_type_is_refused(hf_dir, tmp_path):
    _edit_config(hf_dir, model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(HFFormatError, match="model_type is 'mistral'.*architectures"):
        convert.from_hf(hf_dir, tmp_path / "out")


def test_vocab_smaller_than_the_tokenizer(hf_dir, tmp_path):
    _edit_config(hf_dir, vocab_size=300)
    with pytest.raises(HFFormatError, match=r"tokenizer\.model has 512 pieces but .*vocab_size 300"):
        convert.from_hf(hf_dir, tmp_path / "out")


def test_wrong_shape_names_the_tensor(hf_dir, tmp_path):
    from safetensors.torch import save_file

    weights = load_file(str(hf_dir / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(170, 64)
    save_file(weights, str(hf_dir / "model.safetensors"))
    with pytest.raises(HFFormatError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight has shape \(170, 64\), "
                                            r"config\.json implies \(176, 64\)"):
        convert.from_hf(hf_dir, tmp_path / "out")


def test_pytorch_model_bin_is_read_too(prepared, tmp_path):
    model = make_hf_folder(tmp_path / "hf", prepared, "mha")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    convert.from_hf(tmp_path / "hf", tmp_path / "tt")
    ours, _ = load_checkpoint(tmp_path / "tt")
    idx = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert (ours(idx) - model(idx).logits).abs().max().item() < 1e-5


# --- continued pretraining -------------------------------------------------------------------


def test_continue_from_converted_checkpoint(prepared, tmp_path):
    """fit with init_from starts from the converted weights at step 0 with a fresh optimizer:
    with a zero learning rate the weights come out unchanged."""
    heads, kv, hidden, inter, layers, theta, _ = CONFIGS["mha"]
    make_hf_folder(tmp_path / "hf", prepared, "mha")
    tinytrain_in_process("convert", "from-hf", tmp_path / "hf", tmp_path / "tt", cwd=tmp_path, check=True)
    arch = ["--model.config.hidden_size", hidden, "--model.config.intermediate_size", inter,
            "--model.config.num_hidden_layers", layers, "--model.config.num_attention_heads", heads,
            "--model.config.num_key_value_heads", kv, "--model.config.rms_norm_eps", "1e-6"]
    def fit_args(steps):
        return ["fit", "--config", RECIPES / "ci.yaml", "--data.path", prepared, "--model.init_from", tmp_path / "tt",
                "--trainer.max_steps", steps, "--model.optim.lr", "0", "--model.optim.min_lr", "0",
                "--data.step_offset", "100", *arch]

    args = fit_args(3)
    proc = tinytrain_in_process(*args, cwd=tmp_path, check=True)
    assert "initialised from" in proc.stderr
    saved = torch.load(tmp_path / "runs" / "ci" / "checkpoints" / "last" / "state.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    converted = load_file(str(tmp_path / "tt" / "model.safetensors"))
    for k, v in converted.items():
        assert torch.equal(saved["state_dict"]["model." + k], v), k
    # Re-running the same command resumes the run: its own checkpoint, not init_from, is loaded.
    again = tinytrain_in_process(*fit_args(5), cwd=tmp_path, check=True)
    assert "resuming from" in again.stderr and "model.init_from" in again.stderr and "initialised from" not in again.stderr
    # A recipe whose architecture differs from init_from's is refused, naming the field.
    bad = tinytrain_in_process(*args[:-len(arch)], *arch[:-4], "--model.config.num_key_value_heads", "2",
                        "--trainer.default_root_dir", "runs/bad", cwd=tmp_path)
    assert bad.returncode != 0 and "model.config.num_key_value_heads: init_from 4, recipe 2" in bad.stderr


def test_convert_cli_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = tinytrain_in_process("convert", "from-hf", tmp_path / "empty", tmp_path / "out", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "config.json: missing" in proc.stderr and "Traceback" not in proc.stderr
