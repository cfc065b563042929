"""A real single-node SLURM cluster on localhost (slurm/local-cluster.sh), the project's sbatch
script, 2 CPU tasks with FSDP2 over gloo, and preemption mid-run."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import RECIPES, ROOT, train_losses
from tinytrain.checkpoint import load_model_weights

CLUSTER = ROOT / "slurm" / "local-cluster.sh"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if sys.platform != "linux":
        pytest.skip("the local SLURM cluster runs on Linux")
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**os.environ, "TINYTRAIN_SLURM_DIR": str(state)}
    start = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=600)
    if start.returncode == 3:  # not installed and not root: cannot install
        pytest.skip(start.stderr.strip())
    assert start.returncode == 0, start.stderr
    yield env
    stop = subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr


def submit(cwd: Path, env: dict, corpus: Path, *extra) -> str:
    job_env = {**env, "TINYTRAIN_HOME": str(ROOT), "TINYTRAIN": f"{sys.executable} -m tinytrain.cli",
               "MASTER_ADDR": "127.0.0.1", "TINYTRAIN_CACHE": str(cwd / "cache"), "PYTHONUNBUFFERED": "1"}
    cmd = ["sbatch", "--parsable", "--ntasks-per-node", "2", "--gpus-per-node", "0", "--cpus-per-task", "1",
           "--time", "15", str(ROOT / "slurm" / "train.sbatch"),
           "--config", str(RECIPES / "ci.yaml"), "--data.corpus", str(corpus), "--data.val_fraction", "0.1",
           "--trainer.strategy", "fsdp2", "--trainer.accelerator", "cpu", "--trainer.max_steps", "90",
           "--checkpoint.every_n_steps", "30", "--trainer.log_every_n_steps", "1", "--model.optim.decay_steps", "90",
           *extra]
    out = subprocess.run(cmd, cwd=cwd, env=job_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_for_job(job: str, timeout: float = 420) -> None:
    def done():
        state = job_state(job)
        if state == "PENDING":  # a requeued job waits out its begin time; start it now
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)
        return state == ""
    wait_until(done, timeout, f"job {job} to finish")


def final_state(run: Path) -> tuple[dict, dict]:
    return train_losses(run), load_model_weights(run / "runs" / "ci" / "checkpoints" / "last")


@pytest.fixture(scope="module")
def reference(slurm_cluster, code_corpus, tmp_path_factory):
    """The same job, uninterrupted."""
    straight = tmp_path_factory.mktemp("straight")
    job = submit(straight, slurm_cluster, code_corpus)
    wait_for_job(job)
    losses, weights = final_state(straight)
    assert max(losses) == 89
    return losses, weights


@pytest.mark.parametrize("how", ["usr1", "scontrol-requeue"])
def test_preempted_job_resumes_to_the_same_result(slurm_cluster, reference, code_corpus, tmp_path_factory, how):
    ref_losses, ref_weights = reference

    run = tmp_path_factory.mktemp(how)
    job = submit(run, slurm_cluster, code_corpus)
    first = run / "runs" / "ci" / "checkpoints" / "step-00000030"
    wait_until(first.exists, 300, "the first checkpoint")
    if how == "usr1":  # the warning SLURM sends before a time limit or a preemption
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
    else:  # preemption without warning: the job is killed and put back in the queue
        subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for_job(job)

    log = (run / f"slurm-tinytrain-{job}.out").read_text()
    assert "restart 1:" in log and "resuming from" in log, log[-3000:]
    if how == "usr1":
        assert "SIGUSR1: saved step" in log and f"requeued SLURM job {job}" in log
    losses, weights = final_state(run)
    assert max(losses) == 89
    resumed = [s for s in losses if s > 30]
    for step in resumed:
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-6), step
    for name, tensor in ref_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-6, atol=1e-8)
