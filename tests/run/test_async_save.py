"""Asynchronous checkpoints (checkpoint.async_save): the same files as a synchronous save, the
checkpoint appears and `last` moves only once written, a failed write stops the run naming the
checkpoint, on one process (a background thread writing state.ckpt) and under FSDP2 on two
(torch.distributed.checkpoint's async_save)."""

import json
import os

import pytest
import torch
from conftest import ci_args, run_tinytrain, small_tmpfs, tinytrain_in_process

from tinytrain.store.checkpoint import damage, load_model_weights

LAYOUTS = {"one-process": (), "fsdp2-2": ("--trainer.strategy", "fsdp2", "--trainer.devices", "2")}


def fit(corpus, cwd, layout, *extra, check=True):
    """One process: in this one (its writer thread is the point); FSDP2 on two: a launched run."""
    run = tinytrain_in_process if layout == "one-process" else run_tinytrain
    return run(*ci_args(corpus, *LAYOUTS[layout], "--checkpoint.every_n_steps", "10", "--checkpoint.keep_last", "0",
                        *extra), cwd=cwd, check=check)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_background_checkpoints_equal_synchronous_ones_and_resume_exactly(code_corpus, tmp_path, layout):
    """Sync run to step 40; async run to step 20, then resumed to 40 (from an async checkpoint).
    Every checkpoint's weights are equal bit for bit, and so are the final ones."""
    sync, bg = tmp_path / "sync", tmp_path / "async"
    sync.mkdir(), bg.mkdir()
    fit(code_corpus, sync, layout)
    first = fit(code_corpus, bg, layout, "--checkpoint.async_save", "true", "--trainer.max_steps", "20")
    # Published at a later step boundary (never before the state is written), and still in order.
    saved = [line.split("/")[-1] for line in first.stderr.splitlines() if "saved checkpoint" in line]
    assert saved == ["step-00000010", "step-00000020"], first.stderr[-2000:]
    second = fit(code_corpus, bg, layout, "--checkpoint.async_save", "true")
    assert "resuming from" in second.stderr and "step-00000020" in second.stderr
    ckpts = "runs/ci/checkpoints"
    for step in (10, 20, 30, 40):
        name = f"{ckpts}/step-{step:08d}"
        assert damage(bg / name) is None
        meta = json.loads((bg / name / "meta.json").read_text())
        assert meta["async_save"] is True and meta["write_seconds"] >= meta["save_seconds"] >= 0
        a, b = load_model_weights(sync / name), load_model_weights(bg / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
        assert sorted(p.name for p in (bg / name).rglob("*")) == sorted(p.name for p in (sync / name).rglob("*"))
    assert os.readlink(bg / ckpts / "last") == "step-00000040"
    assert not list((bg / ckpts).glob(".tmp-*"))


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: room for one ci checkpoint (about 2 MB), not two."""
    yield from small_tmpfs(tmp_path, "3m")


@pytest.mark.parametrize("layout,async_save", [("one-process", "true"), ("fsdp2-2", "true"), ("fsdp2-2", "false")])
def test_a_write_that_fails_stops_the_run_and_names_the_checkpoint(small_disk, code_corpus, tmp_path, layout,
                                                                   async_save):
    """A full disk (one process, synchronous: tests/store/test_checkpoint.py). torch's writers report it
    without its errno under FSDP2; the message still says what happened."""
    proc = fit(code_corpus, tmp_path, layout, "--checkpoint.dirpath", small_disk, "--checkpoint.async_save",
               async_save, "--trainer.max_steps", "30", check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tinytrain fit: error:")]
    assert lines and len(set(lines)) == 1, proc.stderr[-3000:]  # every rank stops, with the same line
    assert f"saving checkpoint {small_disk / 'step-00000020'} failed: No space left on device" in lines[0]
    assert f"{small_disk / 'last'} -> step-00000010 is intact" in lines[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["last", "step-00000010"]  # the partial one is gone
    assert damage(small_disk / "step-00000010") is None
