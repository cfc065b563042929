"""Asynchronous Local SGD (`local_sgd.mode async`, `tinytrain island-server`): the server's outer step
(delayed Nesterov against one synchronous Nesterov step; plain Nesterov against torch's SGD), round
lengths by speed, and a real server with two island jobs, one killed with SIGKILL and restarted while
the other goes on."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ci_args, metric_rows, series

from tinytrain.train.island_server import IslandRecord, IslandServer, OuterSettings, OuterUpdates, round_length


def settings(**kw) -> OuterSettings:
    base = dict(outer_lr=0.7, outer_momentum=0.9, nesterov=True, delayed_nesterov=0, dynamic_local_updates=False,
                inner_steps=10, islands=2)
    return OuterSettings(**{**base, **kw})


def test_nesterov_at_every_update_is_torch_sgd():
    torch.manual_seed(0)
    start = torch.randn(50)
    outer = OuterUpdates(start.clone(), settings())
    reference = start.clone().requires_grad_()
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(5):
        g = torch.randn(50)
        outer.apply(g)
        reference.grad = g
        sgd.step()
    assert torch.equal(outer.weights, reference.detach())


def test_delayed_nesterov_moves_n_updates_as_one_step_of_their_mean():
    """N updates g_1..g_N under delayed Nesterov end where one synchronous Nesterov step with their mean
    does; between milestones the momentum stays put."""
    torch.manual_seed(0)
    start, n = torch.randn(50), 4
    outer = OuterUpdates(start.clone(), settings(delayed_nesterov=n))
    reference = start.clone().requires_grad_()
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(3):  # three milestones: the momentum carries over
        grads = [torch.randn(50) for _ in range(n)]
        before = outer.momentum.clone()
        for i, g in enumerate(grads):
            outer.apply(g)
            if i < n - 1:
                assert torch.equal(outer.momentum, before)
        reference.grad = torch.stack(grads).mean(0)
        sgd.step()
        torch.testing.assert_close(outer.weights, reference.detach(), rtol=1e-5, atol=1e-6)


def test_dynamic_local_updates_give_rounds_in_proportion_to_speed():
    islands = {0: IslandRecord(steps_per_second=4.0), 1: IslandRecord(steps_per_second=2.0),
               2: IslandRecord(steps_per_second=1.0)}
    s = settings(dynamic_local_updates=True, inner_steps=20)
    assert [round_length(s, islands, i) for i in range(3)] == [20, 10, 5]
    assert round_length(settings(inner_steps=20), islands, 2) == 20  # off: everyone the same
    assert round_length(s, islands, 7) == 20  # not measured yet


def test_the_server_state_survives_a_restart(tmp_path):
    server = IslandServer(tmp_path, save_every=2)
    version, length, weights = server.join(settings(), torch.zeros(6))
    assert (version, length) == (0, 10) and torch.equal(weights, torch.zeros(6))
    for i in range(4):
        server.push(i % 2, i, 10, 1.0, torch.full((6,), 0.1))
    again = IslandServer(tmp_path)
    assert again.outer.updates == 4 and torch.equal(again.outer.weights, server.outer.weights)
    assert torch.equal(again.outer.momentum, server.outer.momentum)
    assert again.islands[1].updates == 2
    with pytest.raises(Exception, match="differ from the run's"):
        again.join(settings(outer_lr=0.5), None)


def _start(args, cwd, log):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TINYTRAIN_CACHE": str(cwd.parent / "cache")}
    cwd.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "tinytrain", *map(str, args)], cwd=cwd, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(path, proc, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited with {proc.returncode} before {path} appeared"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_an_island_killed_and_restarted_rejoins_while_the_other_goes_on(tmp_path, code_corpus):
    address_file = tmp_path / "address"
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "tinytrain", "island-server", tmp_path / "server", "--port",
                                   "0", "--address_file", address_file, "--save_every", "1"],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(address_file, server, 120)
        address = address_file.read_text().strip()

        def island(i):
            return ci_args(code_corpus, "--trainer.strategy", "fsdp2", "--local_sgd.mode", "async",
                           "--local_sgd.server", address, "--local_sgd.islands", "2", "--local_sgd.island_index", i,
                           "--local_sgd.inner_steps", "4", "--local_sgd.delayed_nesterov", "2",
                           "--trainer.max_steps", "48", "--checkpoint.every_n_steps", "4", "--checkpoint.keep_last",
                           "20", "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "48",
                           "--trainer.enable_progress_bar", "false")

        logs = [open(tmp_path / f"island{i}.log", "w") for i in range(2)]
        procs = [_start(island(i), tmp_path / f"island{i}", logs[i]) for i in range(2)]
        step8 = tmp_path / "island1" / "runs" / "ci" / "checkpoints" / "step-00000008"
        _wait_for(step8, procs[1])
        os.killpg(procs[1].pid, signal.SIGKILL)  # island 1 dies mid-run
        procs[1].wait(60)
        assert procs[0].wait(600) == 0, (tmp_path / "island0.log").read_text()[-4000:]  # the other goes on
        restarted = _start(island(1), tmp_path / "island1", logs[1])
        assert restarted.wait(600) == 0, (tmp_path / "island1.log").read_text()[-4000:]
        text = (tmp_path / "island1.log").read_text()
        assert "resuming from" in text
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    state = IslandServer(tmp_path / "server")  # what the server saved as it stopped
    assert state.islands[0].updates == 12  # 48 steps in rounds of 4
    assert state.islands[1].updates in (12, 13)  # a push after its last checkpoint is made again on resume
    assert state.outer.updates == state.islands[0].updates + state.islands[1].updates
    assert state.outer.settings.delayed_nesterov == 2
    for i in range(2):
        rows = metric_rows(tmp_path / f"island{i}" / "runs" / "ci")
        staleness = dict(series(rows, "local_sgd/staleness"))
        versions = dict(series(rows, "local_sgd/outer_steps"))
        assert max(versions.values()) > 12  # it saw the other island's updates too
        assert max(staleness.values()) >= 1  # and some of its pushes were stale
    # Each island trained on half of each global batch (16 sequences of 64 tokens): so its tokens say.
    tokens = dict(series(metric_rows(tmp_path / "island0" / "runs" / "ci"), "train/tokens"))
    assert tokens[47] == 48 * 16 * 64 / 2


@pytest.mark.slow
def test_an_asynchronous_island_of_two_processes_matches_one_synchronous_island(tmp_path, code_corpus):
    """One island of 2 processes (FSDP2 inside) through the server ends where the synchronous mode's one
    island of the same 2 processes does, with the same outer step (lr 0.5, Nesterov momentum 0.5) at
    the same steps: the gather of the pseudo-gradient, the server's step on the flat weights and the
    copy back into each rank's shards are checked against the in-job path."""
    from conftest import run_tinytrain

    from tinytrain.store.checkpoint import load_model_weights

    common = ("--trainer.strategy", "fsdp2", "--trainer.devices", "2", "--trainer.max_steps", "12",
              "--data.micro_batch_size", "4", "--model.optim.decay_steps", "12", "--local_sgd.inner_steps", "5",
              "--local_sgd.outer_lr", "0.5", "--local_sgd.outer_momentum", "0.5")
    sync = tmp_path / "sync"
    sync.mkdir()
    run_tinytrain(*ci_args(code_corpus, *common, "--local_sgd.mode", "sync", "--local_sgd.island_size", "2"),
                  cwd=sync)
    address_file = tmp_path / "address"
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "tinytrain", "island-server", tmp_path / "server", "--port",
                                   "0", "--address_file", address_file], stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        _wait_for(address_file, server, 120)
        island = tmp_path / "island"
        island.mkdir()
        run_tinytrain(*ci_args(code_corpus, *common, "--local_sgd.mode", "async", "--local_sgd.server",
                               address_file.read_text().strip(), "--local_sgd.islands", "1",
                               "--local_sgd.island_index", "0"), cwd=island)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert IslandServer(tmp_path / "server").outer.updates == 3  # after steps 5, 10 and the last, 12
    a = load_model_weights(sync / "runs" / "ci" / "checkpoints" / "step-00000012")
    b = load_model_weights(island / "runs" / "ci" / "checkpoints" / "step-00000012")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_an_island_with_other_settings_is_refused_by_name_and_the_run_goes_on(tmp_path):
    """A real endpoint and clients in one process: the first island starts the run; one with another
    outer lr, or another model, gets the server's reason as a one-line error; the first goes on."""
    from tinytrain.errors import ConfigError
    from tinytrain.train.island_server import IslandClient, serve

    server = IslandServer(tmp_path)
    endpoint = serve(server, 0)
    clients = []
    try:
        first = IslandClient(endpoint.address(), 0, settings(), connect_seconds=30)
        clients.append(first)
        version, length, weights = first.join(torch.ones(8))
        assert (version, length) == (0, 10) and torch.equal(weights, torch.ones(8))
        other = IslandClient(endpoint.address(), 1, settings(outer_lr=0.5), connect_seconds=30)
        clients.append(other)
        with pytest.raises(ConfigError, match=r"outer_lr=0.5 \(the run's: 0.7\)"):
            other.join(torch.ones(8))
        bigger = IslandClient(endpoint.address(), 1, settings(), connect_seconds=30)
        clients.append(bigger)
        with pytest.raises(ConfigError, match="has 9 parameters, the run's 8"):
            bigger.join(torch.ones(9))
        version, staleness, length, weights = first.push(0, 10, 1.0, torch.full((8,), 0.5))
        assert (version, staleness) == (1, 0) and server.outer.updates == 1
        assert torch.allclose(weights, torch.ones(8) - 0.7 * (0.5 + 0.9 * 0.5))
    finally:
        for c in clients:
            c.close()
        endpoint._server.shutdown()
