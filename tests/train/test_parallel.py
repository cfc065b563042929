"""The wrappers applied from outside the model must not change its math."""

import copy

import pytest
import torch

from tinytrain.model.llama import Llama, LlamaConfig
from tinytrain.train import parallel


def loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
                           for n, p in model.named_parameters()}


def assert_same_loss_and_grads(model, variant, idx, targets, loss_tol: float, grad_rtol: float, grad_atol: float):
    """``variant`` (a switched copy of ``model``) computes the same loss and gradients."""
    loss, grads = loss_and_grads(model, idx, targets)
    loss_v, grads_v = loss_and_grads(variant, idx, targets)
    torch.testing.assert_close(loss_v, loss, rtol=loss_tol, atol=loss_tol)
    for name, g in grads.items():
        torch.testing.assert_close(grads_v[name], g, rtol=grad_rtol, atol=grad_atol)


@pytest.fixture
def model_and_batch():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("ci"))
    idx, targets = torch.randint(0, 512, (2, 2, 32)).unbind(0)
    return model, idx, targets


def test_activation_checkpointing_gives_the_same_loss_and_gradients(model_and_batch):
    model, idx, targets = model_and_batch
    wrapped = copy.deepcopy(model)
    parallel.apply_activation_checkpointing(wrapped)
    assert type(wrapped.layers[0]).__name__ == "CheckpointWrapper"
    assert wrapped.state_dict().keys() == model.state_dict().keys()  # checkpoints keep plain names
    loss, grads = loss_and_grads(model, idx, targets)
    loss_w, grads_w = loss_and_grads(wrapped, idx, targets)
    assert torch.equal(loss, loss_w)
    for name, g in grads.items():
        torch.testing.assert_close(grads_w[name], g, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("value_embeddings", [0, 1], ids=["plain", "value-embeddings"])
def test_compiled_blocks_give_the_same_loss_and_gradients(model_and_batch, value_embeddings):
    model, idx, targets = model_and_batch
    if value_embeddings:  # blocks that take a value embedding (the first and the last) and blocks that do not
        model = Llama(LlamaConfig.from_name("ci", num_hidden_layers=3, value_embeddings=value_embeddings))
    compiled = copy.deepcopy(model)
    parallel.apply_compile(compiled)
    assert_same_loss_and_grads(model, compiled, idx, targets, 1e-5, 1e-4, 1e-6)


@pytest.mark.slow
def test_compile_auto_compiles_where_torch_compile_works_and_not_where_it_fails(tmp_path):
    """`model.compile: auto` on a CPU: with the C++ compiler Inductor uses, the blocks and the loss are
    compiled; with none (CXX naming a missing program, and an empty Inductor cache so that nothing built
    before is reused) training goes on eager, saying why."""
    import os
    import shutil
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from tinytrain.model.llama import LlamaConfig\nfrom tinytrain.train import parallel\n"
            "m = parallel.build(LlamaConfig.from_name('ci'), parallel.Switches(compile='auto', compile_loss='auto'))\n"
            "print('compiled', bool(m.compiled_layers), m.compiled_logits_loss is not None)\n")

    def run(cxx):
        env = {**os.environ, "CXX": cxx, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / cxx.replace("/", "_"))}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)

    missing = run("/nonexistent/c++")
    assert missing.returncode == 0, missing.stderr
    assert "compiled False False" in missing.stdout
    assert "model.compile / compile_loss auto: off (torch.compile failed here:" in missing.stderr
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine")
    found = run(compiler)
    assert found.returncode == 0, found.stderr
    assert "compiled True True" in found.stdout and "auto: on (torch.compile works on cpu here)" in found.stderr


def test_compile_switches_are_true_false_or_auto():
    from tinytrain.errors import ConfigError

    with pytest.raises(ConfigError, match="model.compile_loss must be true, false or auto, got 'yes'"):
        parallel.Switches(compile_loss="yes")


@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_chunked_cross_entropy_gives_the_same_loss_and_gradients(model_and_batch, chunk):
    model, idx, targets = model_and_batch
    chunked = copy.deepcopy(model)
    chunked.loss_chunk_size = chunk
    assert_same_loss_and_grads(model, chunked, idx, targets, 1e-6, 1e-5, 1e-7)


def test_chunked_cross_entropy_under_bf16_autocast(model_and_batch):
    model, idx, targets = model_and_batch
    chunked = copy.deepcopy(model)
    chunked.loss_chunk_size = 16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = loss_and_grads(model, idx, targets)
        loss_c, grads_c = loss_and_grads(chunked, idx, targets)
    assert abs(loss_c.item() - loss.item()) < 2e-2 and all(torch.isfinite(g).all() for g in grads_c.values())


@pytest.mark.parametrize("chunk", [0, 16])
def test_compiled_loss_gives_the_same_loss_and_gradients(model_and_batch, chunk):
    model, idx, targets = model_and_batch
    model.loss_chunk_size = chunk
    compiled = copy.deepcopy(model)
    parallel.apply_compile_loss(compiled)
    assert_same_loss_and_grads(model, compiled, idx, targets, 1e-5, 1e-4, 1e-6)


@pytest.mark.parametrize("backend", ["sdpa-flash", "sdpa-math"])
def test_forced_sdpa_kernels_give_the_same_loss_and_gradients(model_and_batch, backend):
    model, idx, targets = model_and_batch
    forced = copy.deepcopy(model)
    forced.set_attention_backend(backend)
    assert forced.layers[0].self_attn.sdpa_kernels is not None
    assert_same_loss_and_grads(model, forced, idx, targets, 1e-5, 1e-4, 1e-6)


def test_attention_backend_errors_name_the_backend(model_and_batch):
    model, idx, targets = model_and_batch
    with pytest.raises(ValueError, match="attention backend must be one of .*sdpa-cudnn.*got 'cudnn'"):
        model.set_attention_backend("cudnn")
    model.set_attention_backend("sdpa-cudnn")
    with pytest.raises(RuntimeError, match="'sdpa-cudnn' is a CUDA kernel; on cpu use"):
        model(idx, targets)
    from tinytrain.model.attention import flash_attn_func

    if flash_attn_func() is None:
        with pytest.raises(RuntimeError, match="'flash-attn' asked for, but the flash-attn package is not importable"):
            model.set_attention_backend("flash-attn")


def test_float8_linears_stay_close_to_the_plain_math(model_and_batch):
    """Float8 is an approximation (3 mantissa bits forward, 2 for gradients), so this checks closeness,
    not equality: the loss within 2%, every gradient pointing the same way (cosine > 0.95)."""
    pytest.importorskip("torchao.float8")
    model, idx, targets = model_and_batch
    fp8 = copy.deepcopy(model)
    assert parallel.apply_float8(fp8) == 2 * 7  # every projection of both blocks; not the output head
    assert type(fp8.lm_head).__name__ == "Linear"
    assert fp8.state_dict().keys() == model.state_dict().keys()  # checkpoints keep plain names
    loss, grads = loss_and_grads(model, idx, targets)
    loss_8, grads_8 = loss_and_grads(fp8, idx, targets)
    assert loss_8.item() != loss.item() and abs(loss_8.item() - loss.item()) < 0.02 * loss.item()
    for name, g in grads.items():
        assert torch.nn.functional.cosine_similarity(grads_8[name].flatten(), g.flatten(), dim=0) > 0.95, name


@pytest.mark.slow
def test_every_lever_together_trains_like_the_plain_path(model_and_batch):
    """Six AdamW steps: compiled blocks and loss, chunked loss, a forced SDPA kernel, activation
    checkpointing and fused AdamW against the plain path, from the same weights and batches."""
    from tinytrain.train.optim import OptimConfig, adamw

    model, _, _ = model_and_batch
    batches = torch.randint(0, 512, (1, 2, 4, 33)).expand(6, -1, -1, -1)  # one batch, learnt step by step
    fast = copy.deepcopy(model)
    parallel.prepare(fast, parallel.Switches(attention="sdpa-flash", loss_chunk_size=24, activation_checkpointing=True,
                                             compile=True, compile_loss=True))

    def train(m, fused):
        opt = adamw(m, OptimConfig(lr=3e-3, warmup_steps=0, fused=fused))
        losses = []
        for batch in batches:
            for micro in batch:
                loss = m(micro[:, :-1], micro[:, 1:])
                (loss / len(batch)).backward()
            losses.append(loss.item())
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return losses

    plain_losses, fast_losses = train(model, fused=False), train(fast, fused=True)
    assert plain_losses[-1] < plain_losses[0] - 0.1  # the steps were large enough to move the model
    torch.testing.assert_close(fast_losses, plain_losses, rtol=1e-4, atol=1e-5)
    # Adam divides by the gradient's running RMS, so where a gradient is near zero, rounding-level
    # differences move a weight by up to a fraction of lr (3e-3): compare weights at that scale.
    fast_weights = fast.state_dict()
    for name, w in model.state_dict().items():
        torch.testing.assert_close(fast_weights[name], w, rtol=1e-4, atol=1e-4)


def _cuda_model_and_batch():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("ci")).cuda()
    idx, targets = torch.randint(0, 512, (2, 4, 128), device="cuda").unbind(0)
    return model, idx, targets


def _bf16_loss_and_grads(model, idx, targets):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return loss_and_grads(model, idx, targets)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient"])
def test_cuda_sdpa_kernels_match_the_math_kernel(backend):
    """Each CUDA attention kernel against SDPA's math kernel, in bf16: same loss to bf16 rounding,
    gradients within 2% relative norm."""
    model, idx, targets = _cuda_model_and_batch()
    fast = copy.deepcopy(model)
    model.set_attention_backend("sdpa-math")
    fast.set_attention_backend(backend)
    loss, grads = _bf16_loss_and_grads(model, idx, targets)
    loss_f, grads_f = _bf16_loss_and_grads(fast, idx, targets)
    assert abs(loss_f.item() - loss.item()) < 1e-2
    for name, g in grads.items():
        assert (grads_f[name] - g).norm() <= 2e-2 * g.norm() + 1e-6, name


@pytest.mark.gpu
def test_cuda_float8_stays_close_to_bf16():
    pytest.importorskip("torchao.float8")
    if torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(RuntimeError, match="compute capability 8.9"):
            parallel.apply_float8(copy.deepcopy(_cuda_model_and_batch()[0]), torch.device("cuda"))
        return
    model, idx, targets = _cuda_model_and_batch()
    fp8 = copy.deepcopy(model)
    parallel.apply_float8(fp8, torch.device("cuda"))
    loss, grads = _bf16_loss_and_grads(model, idx, targets)
    loss_8, grads_8 = _bf16_loss_and_grads(fp8, idx, targets)
    assert abs(loss_8.item() - loss.item()) < 0.02 * loss.item()
    for name, g in grads.items():
        assert torch.nn.functional.cosine_similarity(grads_8[name].flatten().float(), g.flatten().float(), dim=0) > 0.95
