"""The wrappers applied from outside the model must not change its math."""

import copy

import pytest
import torch

from tinytrain import parallel
from tinytrain.model import Llama, LlamaConfig


def loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
                           for n, p in model.named_parameters()}


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
def test_compiled_blocks_give_the_same_loss_and_gradients(model_and_batch):
    model, idx, targets = model_and_batch
    compiled = copy.deepcopy(model)
    parallel.apply_compile(compiled)
    loss, grads = loss_and_grads(model, idx, targets)
    loss_c, grads_c = loss_and_grads(compiled, idx, targets)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_chunked_cross_entropy_gives_the_same_loss_and_gradients(model_and_batch, chunk):
    model, idx, targets = model_and_batch
    chunked = copy.deepcopy(model)
    chunked.loss_chunk_size = chunk
    loss, grads = loss_and_grads(model, idx, targets)
    loss_c, grads_c = loss_and_grads(chunked, idx, targets)
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-7)


def test_chunked_cross_entropy_under_bf16_autocast(model_and_batch):
    model, idx, targets = model_and_batch
    chunked = copy.deepcopy(model)
    chunked.loss_chunk_size = 16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = loss_and_grads(model, idx, targets)
        loss_c, grads_c = loss_and_grads(chunked, idx, targets)
    assert abs(loss_c.item() - loss.item()) < 2e-2 and all(torch.isfinite(g).all() for g in grads_c.values())
