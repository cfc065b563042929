"""Two SLURM nodes on one machine (slurm/local-cluster.sh start --nodes 2): each node is a network
namespace with its own address (10.77.77.11, .12), hostname (tt-node1, tt-node2), loopback and
slurmd, joined by a bridge. slurm/train-multinode.sbatch runs the ci recipe with FSDP2 over gloo,
one process per node. A process in one namespace cannot reach the other's loopback, so the
rendezvous (MASTER_ADDR: the first node's name, resolved from its hosts file) and every collective
cross the two addresses, as between two machines. Needs root; skips without it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RECIPES, ROOT, train_losses
from test_slurm import CLUSTER, job_log, local_cluster, one_cluster_at_a_time, wait_for_job, wait_until

from tinytrain.store.checkpoint import load_model_weights

pytestmark = pytest.mark.slow


def no_test_network() -> bool:
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return "tt-node" not in namespaces and "tt-br0" not in links and not list(Path("/etc/netns").glob("tt-node*"))


def test_a_start_that_fails_undoes_itself(tmp_path_factory):
    """A bad address prefix fails the bridge's address after the bridge exists: start exits non-zero
    and leaves no bridge, namespace or daemon behind. Runs before the cluster below starts."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root on Linux")
    env = {**os.environ, "TINYTRAIN_SLURM_DIR": str(tmp_path_factory.mktemp("bad-start")),
           "TINYTRAIN_SLURM_NET": "10.300.1"}
    with one_cluster_at_a_time():
        if subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0:
            pytest.skip("a SLURM controller not started by these tests is running")
        start = subprocess.run(["bash", str(CLUSTER), "start", "--nodes", "2"], env=env, capture_output=True,
                               text=True, timeout=300)
        if start.returncode == 3:
            pytest.skip(start.stderr.strip())
        assert start.returncode != 0 and "start failed: undoing it" in start.stderr, start.stderr
        assert no_test_network()
        assert subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode != 0


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    for env, started in local_cluster(tmp_path_factory, "--nodes", "2"):
        assert "tt-node1 (10.77.77.11) idle" in started and "tt-node2 (10.77.77.12) idle" in started
        yield env
    assert no_test_network()


def submit(cwd: Path, env: dict, corpus: Path) -> str:
    """The ci recipe on 2 nodes x 1 process, FSDP2, 90 steps, checkpoints every 30."""
    job_env = {**env, "TINYTRAIN_HOME": str(ROOT), "TINYTRAIN": f"{sys.executable} -m tinytrain",
               "TINYTRAIN_CACHE": str(cwd / "cache"), "PYTHONUNBUFFERED": "1"}
    job_env.pop("MASTER_ADDR", None)  # the launcher's default: the first node of the job
    cmd = ["sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node", "0",
           "--cpus-per-task", "1", "--time", "15", str(ROOT / "slurm" / "train-multinode.sbatch"),
           "--config", RECIPES / "ci.yaml", "--data.corpus", corpus, "--data.val_fraction", "0.1",
           "--trainer.strategy", "fsdp2", "--trainer.accelerator", "cpu", "--trainer.max_steps", "90",
           "--checkpoint.every_n_steps", "30", "--trainer.log_every_n_steps", "1", "--model.optim.decay_steps", "90"]
    out = subprocess.run(list(map(str, cmd)), cwd=cwd, env=job_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def test_two_nodes_train_across_their_addresses_and_a_requeued_job_ends_at_the_same_weights(two_nodes, code_corpus,
                                                                                          tmp_path):
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    straight.mkdir(), preempted.mkdir()
    job = submit(straight, two_nodes, code_corpus)
    wait_for_job(job)
    log = job_log(straight, job)
    assert "2 node(s) x 1 process(es)" in log and "rendezvous at tt-node1" in log, log[-3000:]
    assert "rank 0 of 2 on tt-node1" in log and "rank 1 of 2 on tt-node2" in log, log[-3000:]
    ref_losses = train_losses(straight)
    assert max(ref_losses) == 89
    ckpt = Path("runs/ci/checkpoints/last")
    ref = load_model_weights(straight / ckpt)

    # Preemption without warning: the job is killed on both nodes and put back in the queue.
    job = submit(preempted, two_nodes, code_corpus)
    wait_until((preempted / "runs/ci/checkpoints/step-00000030").exists, 300, "the first checkpoint")
    requeue = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    wait_for_job(job)
    log = job_log(preempted, job)
    assert "restart 1:" in log and "resuming from" in log, log[-3000:]
    losses = train_losses(preempted)
    assert max(losses) == 89
    for step in (s for s in losses if s > 30):
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-6), step
    weights = load_model_weights(preempted / ckpt)
    for name, tensor in ref.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-6, atol=1e-8)


def link_bytes() -> int:
    """Bytes through tt-node1's link so far, both ways (the bridge side of its veth)."""
    stats = Path("/sys/class/net/tt-veth1/statistics")
    return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())


def test_islands_over_a_slow_link_send_the_weights_once_a_round(two_nodes, code_corpus, tmp_path):
    """slurm/train-islands.sbatch on the two nodes with each node's outgoing link held to 20 Mbit/s
    (tc tbf): each node is an island, and over 40 steps in rounds of 10 the link carries about the
    weights twice (there and back) per round, where FSDP2 would carry them at least once a step."""
    for node in ("tt-node1", "tt-node2"):
        tc = subprocess.run(["ip", "netns", "exec", node, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
                             "rate", "20mbit", "burst", "32kbit", "latency", "400ms"], capture_output=True, text=True)
        if tc.returncode != 0:
            pytest.skip(f"cannot limit the link here: {tc.stderr.strip()}")
    try:
        job_env = {**two_nodes, "TINYTRAIN_HOME": str(ROOT), "TINYTRAIN": f"{sys.executable} -m tinytrain",
                   "TINYTRAIN_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
        job_env.pop("MASTER_ADDR", None)
        before = link_bytes()
        cmd = ["sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node", "0",
               "--cpus-per-task", "1", "--time", "15", str(ROOT / "slurm" / "train-islands.sbatch"),
               "--config", RECIPES / "ci.yaml", "--data.corpus", code_corpus, "--data.val_fraction", "0.1",
               "--trainer.accelerator", "cpu", "--trainer.max_steps", "40", "--local_sgd.inner_steps", "10",
               "--trainer.val_check_interval", "40", "--checkpoint.every_n_steps", "40",
               "--trainer.log_every_n_steps", "10"]
        out = subprocess.run(list(map(str, cmd)), cwd=tmp_path, env=job_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip().split(";")[0]
        wait_for_job(job)
        moved = link_bytes() - before
    finally:
        for node in ("tt-node1", "tt-node2"):
            subprocess.run(["ip", "netns", "exec", node, "tc", "qdisc", "del", "dev", "eth0", "root"],
                           capture_output=True)
    log = job_log(tmp_path, job)
    assert "local_sgd: 2 island(s) of 1 process(es)" in log and "rank 1 of 2 on tt-node2" in log, log[-3000:]
    weights = load_model_weights(tmp_path / "runs" / "ci" / "checkpoints" / "last")
    model_bytes = 4 * sum(t.numel() for t in weights.values())
    # 4 rounds, each the weights' change there and back; plus start-up, a broadcast, loss logging, data
    # preparation's barriers: well under what 40 steps of FSDP2 move (at least the weights every step).
    assert 4 * 2 * model_bytes <= moved < 40 * model_bytes, (moved, model_bytes)
