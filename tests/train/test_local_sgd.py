"""Local SGD between islands (DiLoCo, `local_sgd:`): the outer step against torch's SGD and a hand
average over two real processes; real runs of two islands of one process and of two processes each
(FSDP2 inside, gloo), resumed exactly from the middle of a round; the refusals."""

import shutil
import socket

import pytest
import torch
from conftest import ci_args, metric_rows, one_line, run_tinytrain, series, tinytrain_in_process

from tinytrain.store.checkpoint import _load_state_entries
from tinytrain.train.local_sgd import Islands, LocalSGD, OuterState, outer_step


def test_one_island_outer_step_is_torch_sgd_on_the_pseudo_gradient():
    """global <- SGD(global, grad = global - local), Nesterov momentum; local <- global."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    outer = OuterState(model)
    start = [p.detach().clone() for p in model.parameters()]
    reference = [p.clone().requires_grad_() for p in start]
    sgd = torch.optim.SGD(reference, lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(3):  # three rounds: the momentum matters from the second
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # the round's inner steps
        for r, p in zip(reference, model.parameters()):
            r.grad = r.detach() - p.detach()
        sgd.step()
        outer_step(model, outer, Islands(1, 1, 0), lr=0.7, momentum=0.9, nesterov=True)
        for r, p, w in zip(reference, model.parameters(), outer.local_weights()):
            assert torch.equal(p, r) and torch.equal(w, r)


def _average_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)  # the same start on both
    outer = OuterState(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(float(rank + 1))  # island 0 moved by +1, island 1 by +2
    outer_step(model, outer, Islands(2, 1, rank, dist.group.WORLD), lr=1.0, momentum=0.0, nesterov=False)
    queue.put((rank, [p.detach().clone() for p in model.parameters()]))
    dist.destroy_process_group()


def test_two_islands_average_their_weights_with_outer_lr_1_and_no_momentum():
    """With outer lr 1 and no momentum, DiLoCo's outer step is the average of the islands' weights
    (two real processes over gloo)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_average_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    torch.manual_seed(0)
    start = list(torch.nn.Linear(5, 2).parameters())
    for a, b, s in zip(results[0], results[1], start):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, s.detach() + 1.5)


@pytest.mark.parametrize("kwargs", [dict(inner_steps=0), dict(outer_lr=0.0), dict(outer_momentum=1.0),
                                    dict(island_size=0)])
def test_bad_settings_are_refused_by_name(kwargs):
    with pytest.raises(Exception, match=f"local_sgd.{next(iter(kwargs))}"):
        LocalSGD(mode="sync", **kwargs)


def _islands_args(corpus, devices: int, island_size: int, *extra):
    return ci_args(corpus, "--trainer.strategy", "fsdp2", "--trainer.devices", devices, "--local_sgd.mode", "sync",
                   "--local_sgd.island_size", island_size, "--local_sgd.inner_steps", "4", "--trainer.max_steps", "10",
                   "--checkpoint.every_n_steps", "6", "--data.micro_batch_size", "2", "--trainer.log_every_n_steps", "1",
                   "--model.optim.decay_steps", "10", *extra)


@pytest.fixture(scope="module")
def island_runs(tmp_path_factory, code_corpus):
    """For islands of 1 and of 2 processes (2 islands each): a straight 10-step run (rounds end after
    steps 4, 8 and 10; checkpoints at 6, mid-round, and 10) and the same run resumed from step 6."""
    made = {}

    def make(island_size: int):
        if island_size in made:
            return made[island_size]
        root = tmp_path_factory.mktemp(f"islands-of-{island_size}")
        straight, resumed = root / "straight", root / "resumed"
        straight.mkdir()
        args = _islands_args(code_corpus, 2 * island_size, island_size)
        run_tinytrain(*args, cwd=straight)
        shutil.copytree(straight, resumed, symlinks=True)
        checkpoints = resumed / "runs" / "ci" / "checkpoints"
        shutil.rmtree(checkpoints / "step-00000010")
        (checkpoints / "last").unlink()
        (checkpoints / "last").symlink_to("step-00000006")
        shutil.rmtree(resumed / "runs" / "ci" / "logs")
        proc = run_tinytrain(*args, cwd=resumed)
        assert "resuming from" in proc.stderr and "step-00000006" in proc.stderr
        made[island_size] = straight, resumed
        return made[island_size]

    return make


def _state(cwd, step: int, prefix: str) -> dict:
    return _load_state_entries(cwd / "runs" / "ci" / "checkpoints" / f"step-{step:08d}" / "state.ckpt", prefix)


@pytest.mark.slow
@pytest.mark.parametrize("island_size", [1, 2])
def test_islands_part_mid_round_meet_at_its_end_and_resume_exactly(island_runs, island_size):
    straight, resumed = island_runs(island_size)
    # Mid-round (step 6) each island holds its own weights; the global ones are the same for both.
    mid0, mid1 = _state(straight, 6, "model."), _state(straight, 6, "island1.model.")
    assert sorted(mid0) == sorted(mid1) and len(mid0) > 0
    assert any(not torch.equal(mid0[k], mid1[k]) for k in mid0)
    # The last step ends a round: both islands and the global weights agree.
    end0, end1 = _state(straight, 10, "model."), _state(straight, 10, "island1.model.")
    glob = _state(straight, 10, "outer.weights.")
    for k in end0:
        assert torch.equal(end0[k], end1[k]) and torch.equal(end0[k], glob[k.replace(".", "/")]), k
    assert not any(torch.equal(end0[k], mid0[k]) for k in end0 if k.endswith("weight"))
    # Resumed from the middle of the second round: every tensor of the final checkpoint is the same.
    for prefix in ("model.", "island1.model.", "outer.weights.", "outer.momentum."):
        a, b = _state(straight, 10, prefix), _state(resumed, 10, prefix)
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), prefix + k
    rows_a, rows_b = metric_rows(straight / "runs" / "ci"), metric_rows(resumed / "runs" / "ci")
    losses_a, losses_b = dict(series(rows_a, "train/loss")), dict(series(rows_b, "train/loss"))
    assert [losses_b[s] for s in range(6, 10)] == [losses_a[s] for s in range(6, 10)]
    outer_steps = dict(series(rows_a, "local_sgd/outer_steps"))
    assert [outer_steps[s] for s in range(10)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 3]
    sent = dict(series(rows_a, "local_sgd/exchanged_bytes"))
    params = sum(v.numel() for v in end0.values())
    assert sent[9] == 3 * 4 * params


@pytest.mark.slow
def test_resuming_with_another_number_of_islands_is_refused(island_runs, tmp_path, code_corpus):
    straight, _ = island_runs(1)
    shutil.copytree(straight, tmp_path / "run", symlinks=True)
    proc = run_tinytrain(*_islands_args(code_corpus, 2, 2, "--trainer.max_steps", "12"), cwd=tmp_path / "run",
                         check=False)
    assert "saved by 2 local_sgd islands and this run has 1" in one_line(proc, "fit")


@pytest.mark.slow
def test_local_sgd_without_fsdp2_is_one_line(tmp_path, code_corpus):
    proc = tinytrain_in_process(*ci_args(code_corpus, "--local_sgd.mode", "sync", "--trainer.max_steps", "2"), cwd=tmp_path)
    assert "local_sgd needs --trainer.strategy fsdp2" in one_line(proc, "fit")
