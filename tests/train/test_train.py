"""End to end through the real `tinytrain` command, on the ci recipe and a corpus written by the tests."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ci_args, metric_rows, run_tinytrain, series, tinytrain_in_process, tree_digest


def model_weights(checkpoint_dir):
    state = torch.load(checkpoint_dir / "state.ckpt", map_location="cpu", weights_only=True)
    return state


@pytest.fixture
def trained(ci_run):
    """The shared ci run (conftest.ci_run): 40 steps, checkpoints at 20 and 40."""
    return ci_run


def test_loss_falls_and_validation_is_logged(trained):
    _, run, _ = trained
    rows = metric_rows(run)
    train = series(rows, "train/loss")
    val = series(rows, "val/loss")
    assert [s for s, _ in val] == [19, 39]
    assert train[0][1] > 4.5  # step 4; ln(512) = 6.24 at step 0
    assert val[-1][1] < val[0][1] < train[0][1] - 1.0
    assert val[-1][1] < 0.5 * train[0][1]
    ppl = series(rows, "val/ppl")
    assert ppl[-1][1] == pytest.approx(torch.tensor(val[-1][1]).exp().item(), rel=1e-4)
    assert all(v > 0 for _, v in series(rows, "train/tokens_per_sec"))
    assert all(v > 0 for _, v in series(rows, "train/tflops_per_device"))
    # On CPU, MFU is against a matmul peak measured once at the start: one ratio for every step.
    mfu, tflops = dict(series(rows, "train/mfu")), dict(series(rows, "train/tflops_per_device"))
    assert mfu and all(0 < v < 1.5 for v in mfu.values())
    ratios = [tflops[s] / mfu[s] for s in mfu]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-4)


def test_checkpoint_layout(trained):
    _, run, _ = trained
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last", "step-00000020", "step-00000040"]
    assert os.readlink(ckpts / "last") == "step-00000040"
    last = ckpts / "last"
    for name in ("state.ckpt", "config.yaml", "model_config.json", "tokenizer.model", "meta.json"):
        assert (last / name).is_file(), name
    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] == 40 and meta["tokens"] == 40 * 16 * 64 and meta["world_size"] == 1
    assert meta["environment"]["torch"] == torch.__version__
    config = (last / "config.yaml").read_text()
    assert "global_batch_size: 16" in config and "hidden_size: 64" in config
    assert json.loads((last / "model_config.json").read_text())["vocab_size"] == 512
    # Only our checkpoints: Lightning's own ModelCheckpoint is off.
    assert not list(run.glob("logs/*/checkpoints"))


def test_rerun_resumes_from_newest_checkpoint_and_prunes(trained, code_corpus, tmp_path):
    cwd, run, _ = trained
    work = tmp_path / "copy"
    import shutil

    shutil.copytree(cwd, work, symlinks=True)
    proc = tinytrain_in_process(*ci_args(code_corpus, "--trainer.max_steps", "60"), cwd=work, check=True)
    assert "resuming from" in proc.stderr and "step-00000040" in proc.stderr
    ckpts = work / "runs" / "ci" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last", "step-00000040", "step-00000060"]
    steps = [s for s, _ in series(metric_rows(work / "runs" / "ci"), "train/loss")]
    assert max(steps) == 59 and steps.count(9) == 1  # steps 40.. ran; 0..39 were not replayed


def test_generate_prints_a_continuation(trained):
    cwd, run, _ = trained
    proc = subprocess.run([sys.executable, "-m", "tinytrain", "generate", str(run), "--prompt", "def ",
                           "--max_new_tokens", "40", "--temperature", "0.8", "--top_k", "20"],
                          cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("def ") and len(text.strip()) > 20


def test_bad_corpus_stops_before_training_and_leaves_checkpoints_alone(trained, tmp_path):
    import shutil

    cwd = tmp_path / "copy"  # the shared run stays as it was
    shutil.copytree(trained[0], cwd, symlinks=True)
    run = cwd / "runs" / "ci"
    before = tree_digest(run / "checkpoints")
    missing = tmp_path / "no-such-corpus"
    proc = tinytrain_in_process(*ci_args(missing, "--trainer.max_steps", "60"), cwd=cwd)
    assert proc.returncode != 0
    assert f"corpus folder {missing} does not exist" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = tinytrain_in_process(*ci_args(empty, "--trainer.max_steps", "60"), cwd=cwd)
    assert proc.returncode != 0 and f"corpus folder {empty} holds no text files" in proc.stderr
    assert tree_digest(run / "checkpoints") == before
    assert os.readlink(run / "checkpoints" / "last") == "step-00000040"


def test_vocab_smaller_than_the_shards_is_refused(prepared, tmp_path):
    before = tree_digest(prepared)
    proc = tinytrain_in_process("fit", "--config", ci_args(prepared)[2], "--data.path", prepared,
                         "--model.config.vocab_size", "300", cwd=tmp_path)
    assert proc.returncode != 0
    assert "train-000000-00000.bin: holds token id" in proc.stderr and "vocab_size is 300" in proc.stderr
    assert not (tmp_path / "runs" / "ci" / "checkpoints").exists()
    assert tree_digest(prepared) == before


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(code_corpus, tmp_path):
    """SIGKILL at an arbitrary step after the first checkpoint; the same command continues to
    bit-identical final weights and the same per-step losses as an uninterrupted run."""
    extra = ["--trainer.max_steps", "80", "--checkpoint.every_n_steps", "20", "--trainer.log_every_n_steps", "1",
             "--model.optim.decay_steps", "80"]
    straight = tmp_path / "straight"
    straight.mkdir()
    tinytrain_in_process(*ci_args(code_corpus, *extra), cwd=straight, check=True)

    killed = tmp_path / "killed"
    killed.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TINYTRAIN_CACHE": str(killed / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "tinytrain", *map(str, ci_args(code_corpus, *extra))],
                            cwd=killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "runs" / "ci" / "checkpoints" / "step-00000020"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the run ended before its first checkpoint"
    assert not (killed / "runs" / "ci" / "checkpoints" / "step-00000080").exists()

    resumed = tinytrain_in_process(*ci_args(code_corpus, *extra), cwd=killed, check=True)
    assert "resuming from" in resumed.stderr

    a = model_weights(straight / "runs" / "ci" / "checkpoints" / "last")
    b = model_weights(killed / "runs" / "ci" / "checkpoints" / "last")
    assert a["global_step"] == b["global_step"] == 80
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    a_opt, b_opt = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for idx in a_opt:
        assert torch.equal(a_opt[idx]["exp_avg_sq"], b_opt[idx]["exp_avg_sq"])
    losses_a = dict(series(metric_rows(straight / "runs" / "ci"), "train/loss"))
    losses_b = dict(series(metric_rows(killed / "runs" / "ci"), "train/loss"))
    resumed_steps = [s for s in losses_b if s >= 40]
    assert resumed_steps and all(losses_a[s] == losses_b[s] for s in resumed_steps)


def test_wandb_offline_logging(code_corpus, tmp_path):
    run_tinytrain(*ci_args(code_corpus, "--trainer.max_steps", "10", "--trainer.log_every_n_steps", "2",
                           "--trainer.logger+=lightning.pytorch.loggers.WandbLogger",
                           "--trainer.logger.init_args.project", "tinytrain-test",
                           "--trainer.logger.init_args.save_dir", "runs/ci", "--model.peak_flops", "1e11"),
                  cwd=tmp_path, env={"WANDB_MODE": "offline"})
    runs = list((tmp_path / "runs" / "ci" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    assert b"train/loss" in runs[0].read_bytes()
    rows = metric_rows(tmp_path / "runs" / "ci")
    assert series(rows, "train/loss")  # the CSV logger still runs beside it
    # with a peak given, MFU = achieved FLOP/s over the peak
    mfu, tflops = dict(series(rows, "train/mfu")), dict(series(rows, "train/tflops_per_device"))
    assert mfu and all(mfu[s] == pytest.approx(tflops[s] * 1e12 / 1e11, rel=1e-4) for s in mfu)


@pytest.mark.slow
def test_fsdp2_two_processes_sharded_checkpoint_resumes_on_one(code_corpus, tmp_path):
    """FSDP2 on CPU with gloo: each rank writes its own shard; the run resumes on one process;
    generate reads the sharded checkpoint without a process group."""
    fsdp = ["--trainer.strategy", "fsdp2", "--checkpoint.every_n_steps", "10"]
    run_tinytrain(*ci_args(code_corpus, *fsdp, "--trainer.devices", "2", "--trainer.max_steps", "20"), cwd=tmp_path)
    state = tmp_path / "runs" / "ci" / "checkpoints" / "step-00000020" / "state.ckpt"
    assert state.is_dir() and sorted(p.name for p in state.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    meta = json.loads((state.parent / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["strategy"] == "FSDP2"

    proc = run_tinytrain(*ci_args(code_corpus, *fsdp, "--trainer.devices", "1", "--trainer.max_steps", "30"),
                         cwd=tmp_path)
    assert "resuming from" in proc.stderr and "step-00000020" in proc.stderr
    steps = [s for s, _ in series(metric_rows(tmp_path / "runs" / "ci"), "train/loss")]
    assert max(steps) == 29

    out = tmp_path / "weights.pt"
    tinytrain_in_process("consolidate", tmp_path / "runs" / "ci" / "checkpoints" / "step-00000020", out, cwd=tmp_path,
                         check=True)
    weights = torch.load(out, weights_only=True)
    assert sum(v.numel() for v in weights.values()) == 158_016
    gen = tinytrain_in_process("generate", tmp_path / "runs" / "ci", "--prompt", "def ", "--max_new_tokens", "10",
                               cwd=tmp_path, check=True)
    assert gen.stdout.startswith("def ")

    # The sharded checkpoint exports to a Hugging Face folder on CPU, without a process group.
    transformers = pytest.importorskip("transformers")
    tinytrain_in_process("convert", "to-hf", state.parent, tmp_path / "hf", cwd=tmp_path, check=True)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = {k: v for k, v in torch.load(out, weights_only=True).items()}
    theirs = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_mixture_run_logs_source_epochs_and_validation(prepared, tmp_path):
    from conftest import RECIPES, write_code_corpus

    from tinytrain.data.corpus import prepare_text_folder
    from tinytrain.data.datamodule import TokenData

    more = prepare_text_folder(write_code_corpus(tmp_path / "more-corpus", files=30, seed=1), tmp_path / "more", 512,
                               tokenizer=prepared / "tokenizer.model", val_fraction=0.3)
    sources = [{"path": str(prepared), "weight": 0.75, "name": "code"},
               {"path": str(more), "weight": 0.25, "name": "more"}]
    tinytrain_in_process("fit", "--config", RECIPES / "ci.yaml", "--data.sources", json.dumps(sources),
                         "--trainer.max_steps", "10", "--trainer.val_check_interval", "5",
                         "--trainer.log_every_n_steps", "1", cwd=tmp_path, check=True)
    rows = metric_rows(tmp_path / "runs" / "ci")
    dm = TokenData(sources=sources, vocab_size=512, seq_len=64, global_batch_size=16, micro_batch_size=8)
    dm.open()
    for name in ("code", "more"):
        logged = series(rows, f"data/epochs/{name}")
        assert len(logged) == 10
        assert logged[-1][1] == pytest.approx(dm.epochs_completed(10)[name], rel=1e-5)
    assert dm.epochs_completed(10)["more"] == pytest.approx(40 / len(dm.order.blocks[1]))  # 10 x 16 x 0.25 samples
    val = dict(series(rows, "val/loss"))
    per_source = {name: dict(series(rows, f"val/loss/{name}")) for name in ("code", "more")}
    assert len(val) == 2 and all(len(v) == 2 for v in per_source.values())
    n_code, n_more = dm.val_batches_per_source
    for step, loss in val.items():
        mean = (per_source["code"][step] * n_code + per_source["more"][step] * n_more) / (n_code + n_more)
        assert loss == pytest.approx(mean, rel=1e-5)


def test_speed_switches_train_through_the_recipe(code_corpus, tmp_path):
    """The recipe's speed switches reach the model: chunked and compiled loss, a forced SDPA kernel and
    fused AdamW; the run trains and logs throughput and MFU."""
    proc = tinytrain_in_process(*ci_args(code_corpus, "--trainer.max_steps", "12", "--trainer.log_every_n_steps", "1",
                                         "--model.compile_loss", "true", "--model.loss_chunk_size", "32",
                                         "--model.attention", "sdpa-math", "--model.optim.fused", "true"),
                                cwd=tmp_path, check=True)
    assert "attention backend: sdpa-math" in proc.stderr
    rows = metric_rows(tmp_path / "runs" / "ci")
    losses = dict(series(rows, "train/loss"))
    assert losses[11] < losses[0] - 1.0
    assert len(series(rows, "train/mfu")) == 11  # every step after the first (throughput needs two step starts)


def test_float8_switch_trains_through_the_recipe(code_corpus, tmp_path):
    """`model.float8` (with torchao) swaps every projection for a float8 linear and the run still learns.
    Few steps: float8 matmuls on a CPU run through a slow reference kernel (about 4 s per ci step on a
    Xeon with AMX); their agreement with plain math is tested in test_parallel."""
    pytest.importorskip("torchao.float8")
    proc = tinytrain_in_process(*ci_args(code_corpus, "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1",
                                         "--model.float8", "true"), cwd=tmp_path, check=True)
    assert "float8 matmuls in 14 linear layers" in proc.stderr
    losses = dict(series(metric_rows(tmp_path / "runs" / "ci"), "train/loss"))
    assert sorted(losses) == [0, 1, 2, 3] and losses[3] < losses[0] - 0.2


def test_cpu_peak_measured_under_load_is_measured_again():
    """A CPU peak measured at start-up while the cores were busy is too low; the first step that
    beats it triggers a new measurement, so MFU does not stay above 1."""
    from tinytrain.train.monitor import Throughput

    lit = Throughput()
    lit.peak, lit._peak_measured = 1e6, True  # as if measured on a machine busy with other work
    peak = lit.mfu_peak(achieved_flops=5e6)
    assert peak > 5e6 and lit.peak == peak
    assert lit.mfu_peak(achieved_flops=1e3) == peak  # no new measurement below the peak
    lit.peak, lit._peak_measured = 1e6, False  # a given or datasheet peak is never replaced
    assert lit.mfu_peak(achieved_flops=5e6) == 1e6


def test_resume_refuses_a_different_data_stream(trained, code_corpus, tmp_path):
    import shutil

    cwd, run, _ = trained
    work = tmp_path / "copy"
    shutil.copytree(cwd, work, symlinks=True)
    before = tree_digest(work / "runs" / "ci" / "checkpoints")
    for extra, expected in ((["--data.seq_len", "32"], "data.seq_len: checkpoint 64, recipe 32"),
                            (["--data.seed", "1"], "data.seed: checkpoint 3407, recipe 1"),
                            (["--data.global_batch_size", "32"], "data.global_batch_size is 32, the checkpoint's is 16")):
        proc = tinytrain_in_process(*ci_args(code_corpus, "--trainer.max_steps", "60", *extra), cwd=work)
        assert proc.returncode == 1, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("tinytrain fit: error: ") and expected in line, line
    assert "--data.resize_global_batch true" in line
    assert tree_digest(work / "runs" / "ci" / "checkpoints") == before


def test_a_larger_global_batch_continues_where_the_stream_stopped(trained, code_corpus, tmp_path):
    """16 sequences per step for 40 steps, then 32 for 10: the second run reads samples 640..959,
    every one once, and counts its tokens so."""
    import shutil

    import numpy as np

    from tinytrain.data.datamodule import TokenData

    cwd, _, _ = trained
    work = tmp_path / "copy"
    shutil.copytree(cwd, work, symlinks=True)
    tinytrain_in_process(*ci_args(code_corpus, "--trainer.max_steps", "50", "--data.global_batch_size", "32",
                                  "--data.resize_global_batch", "true", "--checkpoint.every_n_steps", "10"),
                         cwd=work, check=True)
    last = work / "runs" / "ci" / "checkpoints" / "last"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] == 50 and meta["tokens"] == (40 * 16 + 10 * 32) * 64
    state = torch.load(last / "state.ckpt", weights_only=False)["TokenData"]
    assert (state["step"], state["samples_seen"], state["global_batch_size"]) == (50, 960, 32)
    # The stream state the run saved, loaded into a fresh data module: steps 40..49 are samples 640..959.
    dm = TokenData(corpus=str(code_corpus), cache_dir=str(work / "cache"), vocab_size=512, seq_len=64,
                   global_batch_size=32, micro_batch_size=8, val_fraction=0.1, resize_global_batch=True)
    dm.open()
    at_40 = torch.load(work / "runs" / "ci" / "checkpoints" / "step-00000040" / "state.ckpt",
                       weights_only=False)["TokenData"]
    dm.load_state_dict(at_40)
    read = torch.cat([b.reshape(-1, 65) for b in dm.train_dataset(40, 50)]).long()
    assert torch.equal(read, torch.from_numpy(dm.order.gather(np.arange(640, 960))))
    rows = metric_rows(work / "runs" / "ci")
    assert dict(series(rows, "train/tokens"))[49] == (40 * 16 + 10 * 32) * 64
