"""Checkpoint faults: damaged folders, a kill in the middle of a save, a full disk, and resuming
with a different model or tokenizer."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ci_args, run_tinytrain, small_tmpfs, tinytrain_in_process, tree_digest, write_code_corpus

from tinytrain.store.checkpoint import damage, latest_checkpoint, load_model_weights


@pytest.fixture(scope="module")
def four_checkpoints(tmp_path_factory, code_corpus):
    cwd = tmp_path_factory.mktemp("ckpts")
    tinytrain_in_process(*ci_args(code_corpus, "--checkpoint.every_n_steps", "10", "--checkpoint.keep_last", "0"),
                         cwd=cwd, check=True)
    return cwd


def test_damaged_checkpoints_are_skipped_with_a_warning(four_checkpoints, code_corpus, tmp_path, caplog):
    cwd = tmp_path / "copy"
    shutil.copytree(four_checkpoints, cwd, symlinks=True)
    ckpts = cwd / "runs" / "ci" / "checkpoints"
    meta = json.loads((ckpts / "step-00000040" / "meta.json").read_text())
    assert meta["files"]["state.ckpt"] == (ckpts / "step-00000040" / "state.ckpt").stat().st_size
    # truncated state, missing metadata, a leftover temporary folder from a killed save
    state = ckpts / "step-00000040" / "state.ckpt"
    state.write_bytes(state.read_bytes()[:1000])
    (ckpts / "step-00000030" / "meta.json").unlink()
    (ckpts / ".tmp-step-00000050").mkdir()
    assert "state.ckpt has 1000 bytes" in damage(ckpts / "step-00000040")
    assert latest_checkpoint(ckpts) == ckpts / "step-00000020"
    assert "skipping damaged checkpoint" in caplog.text
    proc = tinytrain_in_process(*ci_args(code_corpus, "--trainer.max_steps", "50", "--checkpoint.every_n_steps", "10",
                                         "--checkpoint.keep_last", "0"), cwd=cwd, check=True)
    assert "skipping damaged checkpoint" in proc.stderr and "resuming from" in proc.stderr
    assert "step-00000020" in proc.stderr.split("resuming from")[1].splitlines()[0]
    assert os.readlink(ckpts / "last") == "step-00000050"
    assert not (ckpts / ".tmp-step-00000050").exists()


def test_resume_with_a_different_model_config_is_refused(four_checkpoints, code_corpus, tmp_path):
    cwd = tmp_path / "copy"
    shutil.copytree(four_checkpoints, cwd, symlinks=True)
    before = tree_digest(cwd / "runs" / "ci" / "checkpoints")
    proc = tinytrain_in_process(*ci_args(code_corpus, "--trainer.max_steps", "50", "--model.config.intermediate_size", "160"),
                         cwd=cwd)
    assert proc.returncode != 0
    assert "model.config.intermediate_size: checkpoint 176, recipe 160" in proc.stderr
    assert tree_digest(cwd / "runs" / "ci" / "checkpoints") == before


def test_resume_with_a_different_tokenizer_is_refused(four_checkpoints, tmp_path):
    cwd = tmp_path / "copy"
    shutil.copytree(four_checkpoints, cwd, symlinks=True)
    other = write_code_corpus(tmp_path / "other", files=60, seed=5)  # another corpus: another tokenizer
    before = tree_digest(cwd / "runs" / "ci" / "checkpoints")
    proc = tinytrain_in_process(*ci_args(other, "--trainer.max_steps", "50"), cwd=cwd)
    assert proc.returncode != 0 and "tokenized with tokenizer sha256" in proc.stderr
    assert tree_digest(cwd / "runs" / "ci" / "checkpoints") == before


@pytest.mark.slow
@pytest.mark.parametrize("async_save", ["false", "true"])
def test_killed_during_a_save_the_previous_checkpoint_is_used(code_corpus, tmp_path, async_save):
    """A model large enough that saving takes a while; SIGKILL while a .tmp-step folder exists
    (with async_save: while the background thread writes it, training going on)."""
    big = ["--model.config.hidden_size", "512", "--model.config.intermediate_size", "1408",
           "--model.config.num_hidden_layers", "4", "--checkpoint.every_n_steps", "4", "--checkpoint.keep_last", "0",
           "--trainer.max_steps", "12", "--checkpoint.async_save", async_save]
    args = [sys.executable, "-m", "tinytrain", *map(str, ci_args(code_corpus, *big))]
    env = {**os.environ, "TINYTRAIN_CACHE": str(tmp_path / "cache")}
    ckpts = tmp_path / "runs" / "ci" / "checkpoints"
    for attempt in range(3):
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        caught = None
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if (ckpts / "step-00000004").is_dir():
                tmp = list(ckpts.glob(".tmp-step-00000008"))
                if tmp:
                    proc.send_signal(signal.SIGKILL)
                    caught = tmp[0]
                    break
            time.sleep(0.002)
        proc.wait()
        if caught is not None and not (ckpts / "step-00000008").exists():
            break  # killed in the middle of writing step 8
    else:
        pytest.fail("never caught the process inside a save")
    assert os.readlink(ckpts / "last") == "step-00000004" and damage(ckpts / "step-00000004") is None
    resumed = tinytrain_in_process(*ci_args(code_corpus, *big), cwd=tmp_path, check=True)
    assert "resuming from" in resumed.stderr and "step-00000004" in resumed.stderr
    assert os.readlink(ckpts / "last") == "step-00000012"
    assert not list(ckpts.glob(".tmp-*"))


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: room for one ci checkpoint (about 2 MB), not two."""
    yield from small_tmpfs(tmp_path, "3m")


def test_disk_full_during_a_save(small_disk, code_corpus, tmp_path):
    proc = run_tinytrain(*ci_args(code_corpus, "--checkpoint.dirpath", small_disk, "--checkpoint.every_n_steps", "10",
                                  "--checkpoint.keep_last", "0", "--trainer.max_steps", "30"), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert f"saving checkpoint {small_disk / 'step-00000020'} failed: No space left on device" in proc.stderr
    assert f"{small_disk / 'last'} -> step-00000010 is intact" in proc.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["last", "step-00000010"]  # the partial one is gone
    assert damage(small_disk / "step-00000010") is None
    weights = load_model_weights(small_disk / "step-00000010")
    assert sum(v.numel() for v in weights.values()) == 158_016 and all(torch.isfinite(v).all() for v in weights.values())


def test_a_damaged_checkpoint_is_set_aside_and_saved_again(four_checkpoints, code_corpus, tmp_path):
    """step-40 truncated: the run resumes from step 30, renames the damaged folder out of the way
    (keeping it), saves a new step-40 that loads, points `last` at it, and pruning keeps it."""
    cwd = tmp_path / "copy"
    shutil.copytree(four_checkpoints, cwd, symlinks=True)
    ckpts = cwd / "runs" / "ci" / "checkpoints"
    state = ckpts / "step-00000040" / "state.ckpt"
    with open(state, "r+b") as f:
        f.truncate(100_000)
    proc = tinytrain_in_process(*ci_args(code_corpus, "--checkpoint.every_n_steps", "10",
                                         "--checkpoint.keep_last", "1"), cwd=cwd, check=True)
    assert "set aside damaged checkpoint" in proc.stderr and "step-00000030" in proc.stderr.split("resuming from")[1]
    (aside,) = ckpts.glob("step-00000040.damaged-*")
    assert (aside / "state.ckpt").stat().st_size == 100_000  # kept as it was, for inspection
    assert os.readlink(ckpts / "last") == "step-00000040" and damage(ckpts / "step-00000040") is None
    assert sum(v.numel() for v in load_model_weights(ckpts / "last").values()) == 158_016
    assert sorted(p.name for p in ckpts.glob("step-*") if not p.name.startswith("step-00000040.")) == ["step-00000040"]


def test_commands_name_a_truncated_checkpoint_and_fall_back_for_a_run_folder(four_checkpoints, tmp_path):
    cwd = tmp_path / "copy"
    shutil.copytree(four_checkpoints, cwd, symlinks=True)
    run = cwd / "runs" / "ci"
    state = run / "checkpoints" / "step-00000040" / "state.ckpt"
    with open(state, "r+b") as f:
        f.truncate(1_000_000)
    for args in (["generate", run / "checkpoints" / "step-00000040", "--max_new_tokens", "2"],
                 ["convert", "to-hf", run / "checkpoints" / "step-00000040", cwd / "hf"],
                 ["consolidate", run / "checkpoints" / "step-00000040", cwd / "w.pt"]):
        proc = run_tinytrain(*args, cwd=cwd, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(f"tinytrain {args[0]}: error: ") and "step-00000040: damaged checkpoint: " \
            "state.ckpt has 1000000 bytes" in line, line
    # the run folder: its newest intact checkpoint
    proc = tinytrain_in_process("generate", run, "--max_new_tokens", "2", cwd=cwd, check=True)
    assert "using the newest intact checkpoint, step-00000030" in proc.stderr
    out = cwd / "w.pt"
    tinytrain_in_process("consolidate", run / "checkpoints" / "last", out, cwd=cwd, check=True)
    assert sum(v.numel() for v in torch.load(out, weights_only=True).values()) == 158_016
    # A checkpoint with no size record (as older tinytrain wrote) is still named when torch cannot read it.
    meta = json.loads((state.parent / "meta.json").read_text())
    meta.pop("files")
    (state.parent / "meta.json").write_text(json.dumps(meta))
    proc = tinytrain_in_process("consolidate", state.parent, cwd / "x.pt", cwd=cwd, check=False)
    assert proc.returncode == 1 and f"{state}: unreadable, damaged or truncated" in proc.stderr
