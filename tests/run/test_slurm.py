"""A real single-node SLURM cluster on localhost (slurm/local-cluster.sh), the project's sbatch
script, 2 CPU tasks with FSDP2 over gloo, and preemption mid-run."""

import contextlib
import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import RECIPES, ROOT, train_losses

from tinytrain.store.checkpoint import load_model_weights

CLUSTER = ROOT / "slurm" / "local-cluster.sh"
pytestmark = pytest.mark.slow


@contextlib.contextmanager
def one_cluster_at_a_time():
    """A machine holds one local cluster (it writes /etc/slurm and runs the one slurmctld): tests that
    start one take turns on this lock, whichever pytest worker (or pytest run) they are in."""
    with open(Path(tempfile.gettempdir()) / "tinytrain-local-cluster.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def local_cluster(tmp_path_factory, *start_args: str):
    """slurm/local-cluster.sh start START_ARGS with its own state folder; yields (the environment
    for SLURM commands, start's log); stops the cluster afterwards. Skips where the script cannot
    run (not installed and not root, or no namespaces for --nodes). A generator for fixtures."""
    if sys.platform != "linux":
        pytest.skip("the local SLURM cluster runs on Linux")
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**os.environ, "TINYTRAIN_SLURM_DIR": str(state)}
    with one_cluster_at_a_time():
        start = subprocess.run(["bash", str(CLUSTER), "start", *start_args], env=env, capture_output=True, text=True,
                               timeout=600)
        if start.returncode == 3:
            pytest.skip(start.stderr.strip())
        assert start.returncode == 0, start.stderr
        yield env, start.stderr
        stop = subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    for env, _ in local_cluster(tmp_path_factory):
        yield env


def sbatch(cwd: Path, env: dict, *args, tasks: int = 2, cpus: int = 1, command: str | None = None) -> str:
    """Submit slurm/train.sbatch with ``args`` for `tinytrain fit`; return the job id."""
    job_env = {**env, "TINYTRAIN_HOME": str(ROOT), "TINYTRAIN": command or f"{sys.executable} -m tinytrain",
               "MASTER_ADDR": "127.0.0.1", "TINYTRAIN_CACHE": str(cwd / "cache"), "PYTHONUNBUFFERED": "1"}
    cmd = ["sbatch", "--parsable", "--ntasks-per-node", str(tasks), "--gpus-per-node", "0", "--cpus-per-task",
           str(cpus), "--time", "15", str(ROOT / "slurm" / "train.sbatch"), *map(str, args)]
    out = subprocess.run(cmd, cwd=cwd, env=job_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def submit(cwd: Path, env: dict, corpus: Path, *extra) -> str:
    """The ci recipe on 2 tasks with FSDP2, 90 steps, checkpoints every 30."""
    return sbatch(cwd, env, "--config", RECIPES / "ci.yaml", "--data.corpus", corpus, "--data.val_fraction", "0.1",
                  "--trainer.strategy", "fsdp2", "--trainer.accelerator", "cpu", "--trainer.max_steps", "90",
                  "--checkpoint.every_n_steps", "30", "--trainer.log_every_n_steps", "1",
                  "--model.optim.decay_steps", "90", *extra)


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def job_state(job: str) -> str:
    """The job's state from the controller's record ("" once the record is gone). Not squeue's
    list: a job being requeued can drop out of it for a moment."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    found = re.search(r"\bJobState=(\S+)", out.stdout)
    return found.group(1) if found else ""


def wait_until(predicate, timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def begin_time(job: str) -> float:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    found = re.search(r"\bStartTime=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", out)
    return time.mktime(time.strptime(found.group(1), "%Y-%m-%dT%H:%M:%S")) if found else 0.0


def wait_for_job(job: str, timeout: float = 420) -> None:
    def done():
        state = job_state(job)
        # A requeued job waits until its begin time (the old credentials' expiry: starting it
        # sooner fails it with "Job credential revoked"), then until the scheduler's next pass,
        # up to a minute: once the begin time is past, ask for a start now.
        if state == "PENDING" and time.time() > begin_time(job):
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)
        return state == "" or state in FINISHED
    wait_until(done, timeout, f"job {job} to finish")


def controller_log(env: dict, tail: int = 4000) -> str:
    """The end of the local cluster's controller and node logs, for a failure's message."""
    logs = sorted(Path(env["TINYTRAIN_SLURM_DIR"], "log").glob("*.log"))
    return "".join(f"\n--- {p.name} ---\n" + p.read_text(errors="replace")[-tail:] for p in logs)


def job_log(cwd: Path, job: str) -> str:
    return (cwd / f"slurm-tinytrain-{job}.out").read_text()


def test_each_task_gets_the_cpus_and_environment_the_launcher_promises(slurm_cluster, tmp_path):
    """The node binds each task to its cores (CpuBind=cores, as many sites do), and Slurm 22.05 to
    23.02 do not pass sbatch's --cpus-per-task on to srun: the launcher must, or a task of 2 CPUs
    runs on 1."""
    job = sbatch(tmp_path, slurm_cluster, "--config", "x.yaml", tasks=1, cpus=2,
                 command=f"{sys.executable} {ROOT / 'tests' / 'slurm_task_probe.py'}")
    wait_for_job(job, timeout=120)
    line = next(line for line in job_log(tmp_path, job).splitlines() if line.startswith("task 0:"))
    assert "cpus 2;" in line, line
    for setting in ("PYTHONFAULTHANDLER=1", "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
                    "TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "MASTER_ADDR=127.0.0.1"):
        assert setting in line, line
    assert line.endswith("args fit --config x.yaml --trainer.num_nodes 1 --trainer.devices 1"), line


def test_a_signal_while_the_job_starts_requeues_without_a_lightning_checkpoint(slurm_cluster, code_corpus,
                                                                            tmp_path):
    """SIGUSR1 during start-up (here: while the corpus is prepared, sent once the seed line shows
    the command has started) raises tinytrain's flag: Lightning's own handler, which would save an
    hpc checkpoint from inside the signal handler, is never installed, and the job stops before its
    first step, requeues and trains to the end. (Building and sanity-checking this model take well
    under a second, too short a window to aim a signal at.)"""
    job = sbatch(tmp_path, slurm_cluster, "--config", RECIPES / "ci.yaml", "--data.corpus", code_corpus,
                 "--data.val_fraction", "0.1", "--trainer.accelerator", "cpu", "--trainer.max_steps", "20",
                 "--trainer.num_sanity_val_steps", "2", "--model.compile", "true", tasks=1, cpus=2)
    wait_until(lambda: (tmp_path / f"slurm-tinytrain-{job}.out").exists()
               and "Seed set to" in job_log(tmp_path, job), 300, "the command to start",
               every=0.05)  # the start-up window is a few seconds; on a loaded machine half a second of it counts
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    wait_for_job(job)
    log = job_log(tmp_path, job)
    assert "SIGUSR1 before the first step: stopping at step 0" in log, log[-3000:]
    assert "restart 1:" in log and f"requeueing SLURM job {job}" in log
    assert "Handling auto-requeue signal" not in log and not list(tmp_path.rglob("hpc_ckpt*"))
    assert max(train_losses(tmp_path)) == 19


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
        # Logged before `scontrol requeue` runs: the requeue ends the tasks, often before it returns.
        assert "SIGUSR1: saved step" in log, log + controller_log(slurm_cluster)
        assert f"requeueing SLURM job {job}" in log, log + controller_log(slurm_cluster)
    losses, weights = final_state(run)
    assert max(losses) == 89
    resumed = [s for s in losses if s > 30]
    for step in resumed:
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-6), step
    for name, tensor in ref_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-6, atol=1e-8)


def test_prepare_as_an_array_with_a_task_requeued(slurm_cluster, tmp_path):
    """slurm/prepare.sbatch as a 3-task array: one task is requeued while it works, the finalize job
    runs after all of them, and the prepared folders are byte-identical to a one-process run."""
    import random

    from conftest import run_tinytrain, tree_digest
    from test_prep import _text, write_mixed_corpus, write_spec

    from tinytrain.data.tokenizer import train_tokenizer

    rng = random.Random(1)
    tok = train_tokenizer((_text(rng) for _ in range(4000)), tmp_path / "tok.model", 512)
    corpus = (tmp_path, None, tok)
    write_mixed_corpus(tmp_path / "corpus", seed=3, files=240, per_file=120)  # tasks of seconds, not less
    reference = tmp_path / "reference"
    run_tinytrain("prepare", "--config", write_spec(corpus, reference, "ref.yaml"), cwd=tmp_path)
    out = tmp_path / "out"
    spec = write_spec(corpus, out)

    job_env = {**slurm_cluster, "TINYTRAIN": f"{sys.executable} -m tinytrain", "PYTHONUNBUFFERED": "1",
               "TINYTRAIN_CACHE": str(tmp_path / "cache")}

    def submit(*args) -> str:
        cmd = ["sbatch", "--parsable", "--cpus-per-task", "1", "--time", "15", *args]
        proc = subprocess.run(cmd, cwd=tmp_path, env=job_env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    script = str(ROOT / "slurm" / "prepare.sbatch")
    array = submit("--array=0-2", script, "--config", spec)
    final = submit(f"--dependency=afterany:{array}", script, "--finalize", "--num_tasks", "3", "--config", spec)
    # requeue task 1 once it has finished a unit of its own (1, 4, 7, ...)
    wait_until(lambda: any((out / "web" / ".prep" / f"unit-{u:06d}.json").exists() for u in (1, 4, 7)), 300,
               "task 1's first unit")
    requeue = subprocess.run(["scontrol", "requeue", f"{array}_1"], capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    for job in (f"{array}_0", f"{array}_1", f"{array}_2", final):
        wait_for_job(job)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-tinytrain-prepare-*.out"))
    kept = re.search(r"web: (\d+) of \d+ units already done and verified; (\d+) to go in task 1 of 3", logs)
    assert kept and int(kept.group(2)) > 0, logs  # requeued while it worked: it kept what it had done
    assert tree_digest(out) == tree_digest(reference)


def test_a_second_cluster_is_refused_while_one_runs(slurm_cluster, tmp_path):
    """Starting over a running controller would leave nodes registering with the wrong one: refused,
    naming it, and the running cluster keeps working."""
    other = {**slurm_cluster, "TINYTRAIN_SLURM_DIR": str(tmp_path / "other")}
    start = subprocess.run(["bash", str(CLUSTER), "start"], env=other, capture_output=True, text=True, timeout=120)
    assert start.returncode == 1 and "a slurmctld is already running" in start.stderr, start.stderr
    ping = subprocess.run(["scontrol", "ping"], env=slurm_cluster, capture_output=True, text=True)
    assert "UP" in ping.stdout
