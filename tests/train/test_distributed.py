"""Real multi-process runs (FSDP2 over gloo on CPU) at world sizes 1, 2 and 4: a seeded run starts
from the same weights at every world size, every global batch is read exactly once across ranks (so
the per-step loss equals the one-process loss), and a checkpoint written at one world size resumes
at another."""

import os
import shutil
import subprocess

import pytest
from conftest import ci_args, processes, run_tinytrain, tinytrain_in_process, train_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runner(tmp_path_factory, code_corpus):
    root = tmp_path_factory.mktemp("dist")

    done = {}

    def run(name, world, steps, copy_from=None, strategy=("--trainer.strategy", "fsdp2")):
        """A run in its own folder; the same name is run only once per module."""
        if name in done:
            return done[name]
        cwd = root / name
        if copy_from is not None:
            shutil.copytree(root / copy_from, cwd, symlinks=True)
        else:
            cwd.mkdir()
        proc = run_tinytrain(*ci_args(code_corpus, *strategy, "--trainer.devices", world,
                                      "--trainer.max_steps", steps, "--data.micro_batch_size", "4",
                                      "--checkpoint.every_n_steps", "4", "--trainer.log_every_n_steps", "1",
                                      "--model.optim.decay_steps", "12"), cwd=cwd)
        done[name] = cwd, proc
        return cwd, proc

    return run


def _initial_weights(cwd, code_corpus, *strategy):
    """The weights after one step at learning rate 0: the initial ones."""
    from tinytrain.store.checkpoint import load_model_weights

    cwd.mkdir()
    run_tinytrain(*ci_args(code_corpus, *strategy, "--trainer.max_steps", "1", "--model.optim.lr", "0",
                           "--data.micro_batch_size", "4"), cwd=cwd)
    return load_model_weights(cwd / "runs" / "ci" / "checkpoints" / "step-00000001")


@pytest.fixture(scope="module")
def plain_initial(tmp_path_factory, code_corpus):
    """A plain single-device run's initial weights, shared by the world sizes below."""
    return _initial_weights(tmp_path_factory.mktemp("plain-initial") / "plain", code_corpus)


@pytest.mark.parametrize("world", ["1", "2", "4"])
def test_a_seeded_run_starts_from_the_same_weights_at_any_world_size(plain_initial, code_corpus, tmp_path, world):
    """One step at learning rate 0 keeps the initial weights: FSDP2 on 1, 2 and 4 processes and a
    plain single-device run hold the same ones, to the bit."""
    import torch

    plain = plain_initial
    sharded = _initial_weights(tmp_path / f"fsdp2-{world}", code_corpus, "--trainer.strategy", "fsdp2",
                               "--trainer.devices", world)
    assert sorted(sharded) == sorted(plain)
    for k in plain:
        assert torch.equal(sharded[k], plain[k]), k


def test_every_sample_read_once_at_world_sizes_1_2_4(runner):
    one, _ = runner("w1-to-12", 1, 12)
    two, _ = runner("w2-to-8", 2, 8)
    four, _ = runner("w4-to-8", 4, 8)
    l1, l2, l4 = train_losses(one), train_losses(two), train_losses(four)
    assert sorted(l1) == list(range(12)) and sorted(l2) == sorted(l4) == list(range(8))
    for step in range(8):
        assert l2[step] == pytest.approx(l1[step], rel=1e-5), step
        assert l4[step] == pytest.approx(l1[step], rel=1e-5), step


@pytest.mark.parametrize("written,resumed", [(2, 4), (2, 1), (4, 2)])
def test_elastic_resume_continues_the_same_stream(runner, written, resumed):
    first, _ = runner(f"w{written}-to-8", written, 8)
    cont, proc = runner(f"w{written}-then-w{resumed}", resumed, 12, copy_from=first.name)
    assert "resuming from" in proc.stderr and "step-00000008" in proc.stderr
    # Losses do not depend on the world size (the test above), so one process is the reference.
    after, expected = train_losses(cont), train_losses(runner("w1-to-12", 1, 12)[0])
    assert [s for s in after if s >= 8] == [8, 9, 10, 11]
    for step in range(8, 12):
        assert after[step] == pytest.approx(expected[step], rel=1e-5), step


def test_hybrid_sharding_reads_the_same_stream_and_resumes_fully_sharded(runner):
    """HSDP: 4 processes as 2 replicas of 2-way shards; same losses as one process, and its
    checkpoint resumes under plain FSDP2 on 2 processes."""
    hybrid = ("--trainer.strategy", "tinytrain.train.strategy.FSDP2", "--trainer.strategy.hybrid", "true",
              "--trainer.strategy.shard_group_size", "2")
    hsdp, proc = runner("hsdp-w4-to-8", 4, 8, strategy=hybrid)
    assert "rank 3 of 4" in proc.stderr
    one = train_losses(runner("w1-to-12", 1, 12)[0])
    losses = train_losses(hsdp)
    assert sorted(losses) == list(range(8))
    for step in range(8):
        assert losses[step] == pytest.approx(one[step], rel=1e-5), step
    cont, proc = runner("hsdp-then-w2", 2, 12, copy_from=hsdp.name)
    assert "resuming from" in proc.stderr and "step-00000008" in proc.stderr
    after = train_losses(cont)
    for step in range(8, 12):
        assert after[step] == pytest.approx(one[step], rel=1e-5), step


def count_collectives(cwd, corpus, gather_once: bool) -> tuple[list[dict], dict[int, float]]:
    """Collectives per training step on rank 0 (tests/count_collectives.py), and the losses, of
    10 steps on 2 processes with 2 micro-batches each, logging every 5 steps."""
    import json
    import sys

    from conftest import ROOT

    cwd.mkdir()
    out = cwd / "counts.json"
    args = ci_args(corpus, "--trainer.strategy", "tinytrain.train.strategy.FSDP2", "--trainer.devices", "2",
                   "--trainer.strategy.gather_once_per_step", str(gather_once).lower(),
                   "--data.micro_batch_size", "4", "--trainer.max_steps", "10", "--trainer.log_every_n_steps", "5",
                   "--trainer.callbacks+=count_collectives.PerStep", "--checkpoint.every_n_steps", "100",
                   "--trainer.val_check_interval", "100")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "count_collectives.py"), str(out), *map(str, args)],
                          cwd=cwd, env={**os.environ, "TINYTRAIN_CACHE": str(cwd / "cache")}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.with_name(out.name + ".0").read_text())["steps"], train_losses(cwd)


def test_fsdp2_gathers_once_per_step_and_syncs_the_host_only_when_logging(code_corpus, tmp_path):
    """Groups: embedding, 2 blocks, final norm + head. With 2 micro-batches per step, FSDP2 would
    gather each group for every forward and the embedding and first block again for every backward
    (2 x (4 + 2) = 12 all-gathers); kept gathered for the step, each group is gathered once (4).
    Gradients are reduce-scattered once per group and step. Other collectives (the loss for the
    log, the agreement on SIGUSR1), and reads of device values to the host, happen only around every
    5th step; Lightning's broadcast of a SIGTERM
    flag before every batch (a collective and a host sync per step) is switched off. Both give the
    same losses."""
    once, losses_once = count_collectives(tmp_path / "once", code_corpus, True)
    twice, losses_twice = count_collectives(tmp_path / "per-micro-batch", code_corpus, False)
    assert len(once) == len(twice) == 10
    assert [s["all_gather"] for s in once] == [4] * 10
    assert [s["all_gather"] for s in twice] == [12] * 10
    assert [s["reduce_scatter"] for s in once] == [s["reduce_scatter"] for s in twice] == [4] * 10
    others = [{k: v for k, v in s.items() if k not in ("all_gather", "reduce_scatter", "host_read")} for s in once]
    # Steps 5 and 10 agree on SIGUSR1 in their batch-end hooks; step 5's logged loss is reduced in
    # the module's batch-end hook, which runs after the callbacks', so it falls in step 6's count
    # (step 10's, after the last count). Nothing else: no per-step broadcast between batches.
    assert [i for i, s in enumerate(others) if s] == [4, 5, 9]
    # Reads of device values to the host (each a sync on a GPU: the loss for the log, the progress
    # bar, the SIGUSR1 agreement) happen only at and right after the logging steps 5 and 10.
    reads = [s.get("host_read", 0) for s in once]
    assert all(reads[i] == 0 for i in (0, 1, 2, 3, 7, 8)) and sum(reads) > 0, reads
    assert sorted(losses_once) == sorted(losses_twice) == [4, 9]
    for step in losses_once:
        assert losses_once[step] == pytest.approx(losses_twice[step], rel=1e-6)


def test_world_size_that_does_not_divide_the_global_batch(code_corpus, tmp_path):
    # refused before the second process starts, so in this process
    proc = tinytrain_in_process(*ci_args(code_corpus, "--trainer.strategy", "fsdp2", "--trainer.devices", "2",
                                         "--data.micro_batch_size", "3"), cwd=tmp_path)
    assert proc.returncode != 0
    assert "global_batch_size=16 is not divisible by data.micro_batch_size=3 x world size 2 = 6" in proc.stderr
    assert not (tmp_path / "runs" / "ci" / "checkpoints").exists()


def test_sigterm_ends_every_process_at_once(code_corpus, tmp_path):
    """SIGTERM (what `scancel` and a requeue without warning send) ends a 2-process FSDP2 run at
    once, killed by the signal, workers included: no broadcast from inside the handler, no waiting
    for a step boundary. The newest complete checkpoint is where the next run resumes."""
    import signal
    import sys
    import time

    from tinytrain.store.checkpoint import damage

    args = ci_args(code_corpus, "--trainer.strategy", "fsdp2", "--trainer.devices", "2", "--trainer.max_steps", "5000",
                   "--model.optim.decay_steps", "5000", "--checkpoint.every_n_steps", "20",
                   "--trainer.val_check_interval", "5000")
    env = {**os.environ, "TINYTRAIN_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tinytrain", *map(str, args)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = tmp_path / "runs" / "ci" / "checkpoints" / "step-00000020"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.exists(), proc.communicate()[1][-3000:] if proc.poll() is not None else "no checkpoint in 300 s"
    time.sleep(1)  # mid-training
    worker = next(p["pid"] for p in processes() if p["ppid"] == proc.pid and p["state"] != "Z")
    # The worker has no one to forward SIGTERM to: it keeps the default action, which ends it even
    # while it waits in a collective (a Python handler would run only once the wait is over).
    assert not _catches(worker, signal.SIGTERM) and _catches(proc.pid, signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    try:
        stderr = proc.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("still running 30 s after SIGTERM")
    assert proc.returncode == -signal.SIGTERM, stderr[-3000:]
    def alive_in_group() -> list[int]:  # processes of the run's group, zombies aside
        return [p["pid"] for p in processes() if p["pgrp"] == proc.pid and p["state"] != "Z"]

    deadline = time.time() + 10
    while alive_in_group() and time.time() < deadline:
        time.sleep(0.2)
    assert not alive_in_group()  # the worker Lightning started is gone too
    last = tmp_path / "runs" / "ci" / "checkpoints" / "last"
    assert damage(last) is None


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its SigCgt mask in /proc)."""
    mask = next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (signum - 1) & 1)


def test_a_worker_dies_with_its_launcher(code_corpus, tmp_path):
    """SIGKILL of the process that started the workers (an OOM kill, a node agent) ends them too
    (PR_SET_PDEATHSIG), instead of leaving them waiting in a collective for its timeout."""
    import signal
    import sys
    import time

    args = ci_args(code_corpus, "--trainer.strategy", "fsdp2", "--trainer.devices", "2", "--trainer.max_steps", "5000",
                   "--model.optim.decay_steps", "5000", "--checkpoint.every_n_steps", "10",
                   "--trainer.val_check_interval", "5000")
    env = {**os.environ, "TINYTRAIN_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tinytrain", *map(str, args)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "runs/ci/checkpoints/step-00000010").exists() and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.2)  # both processes are in the training loop
        assert proc.poll() is None, "the run ended early"
        worker = next(p["pid"] for p in processes() if p["ppid"] == proc.pid and p["state"] != "Z")
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while any(p["pid"] == worker and p["state"] != "Z" for p in processes()) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(p["pid"] == worker and p["state"] != "Z" for p in processes())
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
