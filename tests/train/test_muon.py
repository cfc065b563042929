"""model.optim.optimizer: muon — torch.optim.Muon for the blocks' matrices, AdamW for the rest, one
optimizer to Lightning; under FSDP2 each matrix is orthogonalised once, on one rank, and the step is
the single process's; a resumed run ends where an uninterrupted one does."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ci_args, one_line, run_tinytrain, tinytrain_in_process, train_losses, tree_digest

from tinytrain.errors import ConfigError
from tinytrain.model.llama import Llama, LlamaConfig
from tinytrain.store.checkpoint import load_model_weights
from tinytrain.train.muon import MuonAdamW
from tinytrain.train.optim import OptimConfig, build_optimizer
from tinytrain.train.step import train_step

MUON = ("--model.optim.optimizer", "muon", "--model.optim.muon_lr", "0.02")


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = Llama(LlamaConfig.from_name("ci"))
    opt = build_optimizer(model, OptimConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, warmup_steps=0))
    assert isinstance(opt, MuonAdamW) and isinstance(opt.muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2}
    assert adamw == set(names.values()) - muon and "embed_tokens.weight" in adamw and "norm.weight" in adamw
    batch = torch.randint(0, 512, (1, 2, 65))
    train_step(model, opt, batch, lr=5e-4, grad_clip=1.0)
    assert {g["lr"] for g in opt.adamw.param_groups} == {5e-4}
    assert [g["lr"] for g in opt.muon.param_groups] == [pytest.approx(0.01)]  # muon_lr x lr_at / lr


def test_one_step_is_pytorchs_adamw_and_muon():
    """The combined optimizer takes exactly the steps of torch.optim.AdamW and torch.optim.Muon
    given the same gradients, and its state dict round-trips."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("ci"))
    twin = Llama(LlamaConfig.from_name("ci"))
    twin.load_state_dict(model.state_dict())
    config = OptimConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, muon_weight_decay=0.01, warmup_steps=0,
                         muon_ns_dtype="bfloat16")
    ours = build_optimizer(model, config)
    hidden = [p for n, p in twin.named_parameters() if n.startswith("layers.") and p.ndim == 2]
    rest = [p for n, p in twin.named_parameters() if not (n.startswith("layers.") and p.ndim == 2)]
    ref_muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True)
    ref_adamw = torch.optim.AdamW([{"params": [p for p in rest if p.ndim >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    for step in range(3):
        batch = torch.randint(0, 512, (2, 65))
        for m in (model, twin):
            m(batch[:, :-1], batch[:, 1:]).backward()
        for g in ours.param_groups:
            g["lr"] = 1e-3 * ours.lr_ratios[ours.param_groups.index(g)]
        ours.step()
        ref_adamw.step()
        ref_muon.step()
        for opt in (ours, ref_adamw, ref_muon):
            opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    again = build_optimizer(model, config)
    again.load_state_dict(ours.state_dict())
    assert again.adamw.state is again.state and again.muon.state is again.state
    assert torch.equal(again.state[model.layers[0].mlp.up_proj.weight]["momentum_buffer"],
                       ours.state[model.layers[0].mlp.up_proj.weight]["momentum_buffer"])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_embedding_takes_its_own_rate_with_the_same_decay_per_step(optimizer):
    """model.optim.embedding_lr: the token embedding alone in a third AdamW group at that peak (scheduled
    like the rest), its weight decay divided by the ratio; steps equal torch.optim.AdamW's so grouped."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("ci"))
    twin = Llama(LlamaConfig.from_name("ci"))
    twin.load_state_dict(model.state_dict())
    ours = build_optimizer(model, OptimConfig(optimizer=optimizer, lr=1e-3, embedding_lr=0.05, warmup_steps=0,
                                              muon_lr=0.02))
    adamw = ours.adamw if optimizer == "muon" else ours
    (embedding,) = adamw.param_groups[2]["params"]
    assert embedding is model.embed_tokens.weight and adamw.param_groups[2]["weight_decay"] == pytest.approx(0.1 / 50)
    assert not any(p is embedding for g in ours.param_groups[:2] for p in g["params"])
    assert ours.lr_ratios[:3] == [1.0, 1.0, pytest.approx(50.0)]
    embedding = twin.embed_tokens.weight
    ref_embedding = torch.optim.AdamW([embedding], lr=5e-4 * 50, weight_decay=0.1 / 50, betas=(0.9, 0.95))
    batch = torch.randint(0, 512, (1, 2, 65))
    train_step(model, ours, batch, lr=5e-4, grad_clip=0.0)
    twin(batch[0, :, :-1], batch[0, :, 1:]).backward()
    ref_embedding.step()
    assert adamw.param_groups[2]["lr"] == pytest.approx(5e-4 * 50)
    assert torch.equal(model.embed_tokens.weight, embedding)


def test_an_embedding_rate_of_zero_is_refused_by_name():
    with pytest.raises(ConfigError, match="model.optim.embedding_lr must be > 0"):
        OptimConfig(embedding_lr=0.0)


def test_a_resume_with_another_optimizer_layout_is_refused_by_name(tmp_path, code_corpus):
    """Another optimizer, or the embedding's own rate switched on or off, gives the optimizer state other
    groups: the resume is refused in one line naming the key, and the checkpoint is left as it was."""
    args = ci_args(code_corpus, "--checkpoint.every_n_steps", "2")
    tinytrain_in_process(*args, "--trainer.max_steps", "2", cwd=tmp_path, check=True)
    before = tree_digest(tmp_path / "runs" / "ci" / "checkpoints")
    for extra, named in ((MUON, "model.optim.optimizer is muon, but the checkpoint's optimizer state is adamw's"),
                         (("--model.optim.embedding_lr", "0.01"), "model.optim.embedding_lr is set")):
        proc = tinytrain_in_process(*args, "--trainer.max_steps", "4", *extra, cwd=tmp_path)
        assert named in one_line(proc, "fit")
        assert tree_digest(tmp_path / "runs" / "ci" / "checkpoints") == before


def test_newton_schulz_in_fp32_is_the_same_iteration_with_less_rounding():
    """orthogonalise in fp32 follows PyTorch's bf16 iteration (the same steps, coefficients and
    orientation), to fp32's rounding where PyTorch's is to bf16's; both give near-orthogonal matrices."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

    from tinytrain.train.muon import orthogonalise

    coefficients = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    torch.manual_seed(0)
    for shape in ((48, 80), (80, 48)):  # wide and tall
        g = torch.randn(shape)
        exact = orthogonalise(g.double(), coefficients, 5, EPS, torch.float64)
        fp32 = orthogonalise(g, coefficients, 5, EPS, torch.float32)
        bf16 = orthogonalise(g, coefficients, 5, EPS, torch.bfloat16)
        assert fp32.dtype == torch.float32 and fp32.shape == shape
        assert torch.equal(bf16, _zeropower_via_newtonschulz(g, coefficients, 5, EPS))
        err32, err16 = (fp32.double() - exact).abs().max(), (bf16.double() - exact).abs().max()
        assert err32 < 1e-5 and err16 < 0.05 and err32 < err16 / 100, (err32, err16)
        singular = torch.linalg.svdvals(fp32)
        assert 0.4 < singular.min() and singular.max() < 1.6, singular


def test_a_step_with_fp32_newton_schulz_is_muons_formula():
    """ns_dtype float32 on plain tensors: Nesterov momentum, orthogonalised in fp32, decoupled weight
    decay, the learning rate scaled by shape (PyTorch's Muon step, with the iteration in fp32)."""
    import math

    from tinytrain.train.muon import ShardedMuon, orthogonalise

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 48))
    expected, buf = p.detach().clone(), torch.zeros(32, 48)
    opt = ShardedMuon([p], ns_dtype=torch.float32, lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True)
    group = opt.param_groups[0]
    for _ in range(2):
        g = torch.randn(32, 48)
        p.grad = g.clone()
        opt.step()
        buf.lerp_(g, 0.05)
        update = orthogonalise(g.lerp(buf, 0.95), group["ns_coefficients"], 5, group["eps"], torch.float32)
        expected.mul_(1 - 0.02 * 0.01).add_(update, alpha=-0.02 * math.sqrt(max(1, 32 / 48)))
    assert torch.equal(p.detach(), expected)


def test_newton_schulz_precision_follows_the_device_or_the_recipe():
    from tinytrain.errors import ConfigError
    from tinytrain.train.optim import muon_ns_dtype

    cpu = torch.device("cpu")
    amx = torch.cpu._is_amx_tile_supported()
    assert muon_ns_dtype(OptimConfig(optimizer="muon"), cpu) == (torch.bfloat16 if amx else torch.float32)
    assert muon_ns_dtype(OptimConfig(optimizer="muon", muon_ns_dtype="float32"), cpu) == torch.float32
    assert muon_ns_dtype(OptimConfig(optimizer="muon", muon_ns_dtype="bfloat16"), cpu) == torch.bfloat16
    opt = build_optimizer(Llama(LlamaConfig.from_name("ci")), OptimConfig(optimizer="muon", muon_ns_dtype="float32"))
    assert opt.muon.ns_dtype == torch.float32
    with pytest.raises(ConfigError, match="muon_ns_dtype must be one of auto, bfloat16, float32, got 'fp8'"):
        OptimConfig(optimizer="muon", muon_ns_dtype="fp8")


@pytest.fixture(scope="module")
def muon_runs(tmp_path_factory, code_corpus):
    """ci runs of 8 steps with Muon (checkpoints at 4 and 8), each made once per module; with
    ``resume_from_4`` a copy of another run goes back to its step-4 checkpoint and trains on."""
    root = tmp_path_factory.mktemp("muon")
    done = {}

    def run(name, *extra, resume_from_4=None):
        if name not in done:
            cwd = root / name
            if resume_from_4 is not None:
                shutil.copytree(root / resume_from_4, cwd, symlinks=True)
                ckpts = cwd / "runs" / "ci" / "checkpoints"
                shutil.rmtree(ckpts / "step-00000008")
                (ckpts / "last").unlink()
                (ckpts / "last").symlink_to("step-00000004")
            else:
                cwd.mkdir()
            proc = run_tinytrain(*ci_args(code_corpus, *MUON, "--trainer.max_steps", "8",
                                          "--data.micro_batch_size", "4", "--checkpoint.every_n_steps", "4",
                                          "--trainer.log_every_n_steps", "1", "--model.optim.warmup_steps", "2",
                                          "--model.optim.decay_steps", "8", *extra), cwd=cwd)
            assert resume_from_4 is None or "step-00000004" in proc.stderr
            done[name] = cwd
        return done[name]

    return run


def weights(cwd, step=8):
    return load_model_weights(cwd / "runs" / "ci" / "checkpoints" / f"step-{step:08d}")


FSDP2_2 = ("--trainer.strategy", "fsdp2", "--trainer.devices", "2")


def test_the_sharded_step_is_the_single_process_step(tmp_path):
    """Two processes holding the model sharded by FSDP2 and the same model whole, given the same
    gradients: after three steps every weight agrees to fp32 rounding (the matrices to the bit:
    each is orthogonalised by one rank from the gathered whole and sent to the others)."""
    out = tmp_path / "diff.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).parent / "muon_sharded_step.py"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert sorted(report) == ["bfloat16", "float32"]  # the Newton-Schulz iteration's precisions
    for diff in report.values():
        hidden = [n for n in diff if n.startswith("layers.") and n.endswith("proj.weight")]
        assert len(hidden) == 14
        assert all(diff[n] == 0.0 for n in hidden), {n: diff[n] for n in hidden if diff[n]}
        assert max(diff.values()) < 1e-6, diff


@pytest.mark.slow
def test_two_processes_train_as_one(muon_runs):
    """End to end under FSDP2: the per-step losses of 2 processes are those of one (gradients
    reduced across ranks differ from one process's in the last bits; bf16 Newton-Schulz carries
    that into the weights at about 1e-3 of their size)."""
    one, two = muon_runs("plain"), muon_runs("fsdp2-2", *FSDP2_2)
    l1, l2 = train_losses(one), train_losses(two)
    assert sorted(l1) == sorted(l2) == list(range(8))
    assert l1[0] > l1[7] + 0.5  # it trains
    for step in range(8):
        assert l2[step] == pytest.approx(l1[step], rel=1e-4), step


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [(), FSDP2_2], ids=["plain", "fsdp2-2"])
def test_a_muon_run_resumes_exactly(muon_runs, strategy):
    name = "fsdp2-2" if strategy else "plain"
    straight = muon_runs(name, *strategy)
    resumed = muon_runs(f"{name}-from-4", *strategy, resume_from_4=name)
    assert train_losses(resumed)[7] == train_losses(straight)[7]
    a, b = weights(straight), weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_muon_with_the_model_levers_resumes_exactly_under_fsdp2(muon_runs):
    """Muon, the embedding's own rate, QK-norm, the z-loss, soft-capped logits, zero-initialised outputs, a
    value embedding, a moving average and spike recovery together, on 2 processes: a run resumed from its
    step-4 checkpoint ends at the uninterrupted run's weights and average."""
    levers = (*FSDP2_2, "--model.config.qk_norm", "true", "--model.z_loss", "1e-4", "--model.ema_decay", "0.9",
              "--model.spikes.enabled", "true", "--model.optim.embedding_lr", "0.01",
              "--model.config.logit_softcap", "15", "--model.config.zero_init_outputs", "true",
              "--model.config.value_embeddings", "1")
    straight = muon_runs("levers", *levers)
    resumed = muon_runs("levers-from-4", *levers, resume_from_4="levers")
    assert train_losses(straight)[0] > train_losses(straight)[7] + 0.5
    for average in (False, True):
        ckpt = "runs/ci/checkpoints/step-00000008"
        a = load_model_weights(straight / ckpt, average=average)
        b = load_model_weights(resumed / ckpt, average=average)
        assert "layers.0.self_attn.q_norm.weight" in a and "value_embeds.0.weight" in a
        assert float(a["layers.0.mlp.down_proj.weight"].abs().sum()) > 0  # zero at the start, trained since
        for k in a:
            assert torch.equal(a[k], b[k]), (average, k)
