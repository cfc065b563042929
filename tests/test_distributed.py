"""Real multi-process runs (FSDP2 over gloo on CPU) at world sizes 1, 2 and 4, all from the same
initial weights: every global batch is read exactly once across ranks (so the per-step loss equals
the one-process loss), and a checkpoint written at one world size resumes at another."""

import shutil

import pytest

from conftest import ci_args, run_tinytrain, train_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runner(tmp_path_factory, code_corpus):
    root = tmp_path_factory.mktemp("dist")
    init = root / "init"
    init.mkdir()
    # One step at learning rate 0: a checkpoint holding the initial weights, shared by every run.
    run_tinytrain(*ci_args(code_corpus, "--trainer.max_steps", "1", "--model.optim.lr", "0"), cwd=init)

    done = {}

    def run(name, world, steps, copy_from=None):
        """A run in its own folder; the same name is run only once per module."""
        if name in done:
            return done[name]
        cwd = root / name
        if copy_from is not None:
            shutil.copytree(root / copy_from, cwd, symlinks=True)
        else:
            cwd.mkdir()
        proc = run_tinytrain(*ci_args(code_corpus, "--trainer.strategy", "fsdp2", "--trainer.devices", world,
                                      "--trainer.max_steps", steps, "--data.micro_batch_size", "4",
                                      "--checkpoint.every_n_steps", "4", "--trainer.log_every_n_steps", "1",
                                      "--model.init_from", init / "runs" / "ci" / "checkpoints" / "last",
                                      "--model.optim.decay_steps", "12"), cwd=cwd)
        done[name] = cwd, proc
        return cwd, proc

    return run


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


def test_world_size_that_does_not_divide_the_global_batch(code_corpus, tmp_path):
    proc = run_tinytrain(*ci_args(code_corpus, "--trainer.strategy", "fsdp2", "--trainer.devices", "2",
                                  "--data.micro_batch_size", "3"), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "global_batch_size=16 is not divisible by data.micro_batch_size=3 x world size 2 = 6" in proc.stderr
    assert not (tmp_path / "runs" / "ci" / "checkpoints").exists()
