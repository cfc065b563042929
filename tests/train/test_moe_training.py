"""Training a mixture of experts: the loss falls, routing is logged, 2 FSDP2 processes (experts
sharded like every weight) train with the 1-process losses, and a resumed run ends bit for bit where
an uninterrupted one did, the auxiliary-loss-free bias and a moving average included."""

import shutil

import pytest
import torch
from conftest import ci_args, metric_rows, one_line, run_tinytrain, tinytrain_in_process, train_losses

from tinytrain.store.checkpoint import load_model_weights

MOE = ("--model.config.num_local_experts", "4", "--model.config.num_experts_per_tok", "2",
       "--model.config.router_aux_loss_coef", "0.01", "--model.config.router_bias_update_rate", "0.001")
FSDP2_2 = ("--trainer.strategy", "fsdp2", "--trainer.devices", "2")


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory, code_corpus):
    """ci runs of 8 steps with 4 experts (checkpoints at 4 and 8), each made once per module; with
    ``resume_from_4`` a copy of another run goes back to its step-4 checkpoint and trains on."""
    root = tmp_path_factory.mktemp("moe")
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
            proc = run_tinytrain(*ci_args(code_corpus, *MOE, "--trainer.max_steps", "8", "--data.micro_batch_size", "4",
                                          "--checkpoint.every_n_steps", "4", "--trainer.log_every_n_steps", "1",
                                          "--model.optim.warmup_steps", "2", "--model.optim.decay_steps", "8",
                                          "--model.ema_decay", "0.9", *extra), cwd=cwd)
            assert resume_from_4 is None or "step-00000004" in proc.stderr
            (cwd / "stderr.txt").write_text(proc.stderr)
            done[name] = cwd
        return done[name]

    return run


def test_a_mixture_of_experts_trains_and_logs_its_routing(moe_runs):
    cwd = moe_runs("plain")
    losses = train_losses(cwd)
    assert losses[0] > losses[7] + 0.5
    stderr = (cwd / "stderr.txt").read_text()
    assert "active per token: 2 of 4 experts" in stderr
    rows = metric_rows(cwd / "runs" / "ci")
    imbalance = [float(r["moe/layer_1/imbalance"]) for r in rows if r.get("moe/layer_1/imbalance")]
    aux = [float(r["moe/aux_loss"]) for r in rows if r.get("moe/aux_loss")]
    entropy = [float(r["moe/layer_0/entropy"]) for r in rows if r.get("moe/layer_0/entropy")]
    assert len(imbalance) == 8 and all(1.0 <= v <= 4.0 for v in imbalance)
    assert all(0.9 < v < 4.0 for v in aux)  # 2 (= k) when balanced
    assert all(0 < v <= torch.log(torch.tensor(4.0)) + 1e-4 for v in entropy)
    w = load_model_weights(cwd / "runs" / "ci" / "checkpoints" / "step-00000008")
    assert w["layers.0.mlp.experts.gate_up_proj"].shape == (4, 2 * 176, 64)
    assert w["layers.0.mlp.expert_bias"].abs().max() > 0  # the bias moved, and was saved


@pytest.mark.slow
def test_two_fsdp2_processes_train_with_the_one_process_losses(moe_runs):
    one, two = train_losses(moe_runs("plain")), train_losses(moe_runs("fsdp2-2", *FSDP2_2))
    for step in range(8):
        assert two[step] == pytest.approx(one[step], rel=1e-4), step


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [(), FSDP2_2], ids=["plain", "fsdp2-2"])
def test_a_moe_run_resumes_exactly(moe_runs, strategy):
    name = "fsdp2-2" if strategy else "plain"
    straight = moe_runs(name, *strategy)
    resumed = moe_runs(f"{name}-from-4", *strategy, resume_from_4=name)
    assert train_losses(resumed)[7] == train_losses(straight)[7]
    ckpt = "runs/ci/checkpoints/step-00000008"
    for average in (False, True):
        a, b = load_model_weights(straight / ckpt, average=average), load_model_weights(resumed / ckpt, average=average)
        assert "layers.1.mlp.expert_bias" in a
        for k in a:
            assert torch.equal(a[k], b[k]), (average, k)


@pytest.mark.parametrize("extra, message", [
    (("--model.config.router_jitter_noise", "0.01"), "router_jitter_noise is 0.01"),
    (("--model.optim.optimizer", "muon"), "optimizer muon orthogonalises 2-D matrices"),
])
def test_what_training_refuses_with_experts(code_corpus, tmp_path, extra, message):
    proc = tinytrain_in_process(*ci_args(code_corpus, *MOE, *extra, "--trainer.max_steps", "1"), cwd=tmp_path)
    assert message in one_line(proc, "fit")
    assert not (tmp_path / "runs" / "ci" / "checkpoints").exists()


def test_a_trained_mixture_generates_and_scores_text(moe_runs, code_corpus, tmp_path):
    """generate and evaluate read an MoE checkpoint like any other (cached decoding; --text scoring)."""
    import json

    run = moe_runs("plain") / "runs" / "ci"
    gen = tinytrain_in_process("generate", run, "--prompt", "def ", "--max_new_tokens", "8", cwd=tmp_path, check=True)
    assert gen.stdout.startswith("def ") and len(gen.stdout) > len("def ")
    held = sorted(code_corpus.glob("*.py"))[-1]
    tinytrain_in_process("evaluate", run, "--text", held, "--out", tmp_path / "bpb.json", cwd=tmp_path, check=True)
    text = json.loads((tmp_path / "bpb.json").read_text())["text"]
    assert text["bytes"] == len(held.read_bytes()) and 0 < text["bits_per_byte"] < 8
