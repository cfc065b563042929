"""What a first GPU run would hit, reproduced on CPU as faithfully as CPU allows."""

import sys

import numpy as np
import pytest
import torch
from conftest import RECIPES, ROOT, ci_args, metric_rows, run_tinytrain, series

# Lightning evaluates under torch.inference_mode unless the process group is gloo (or the
# strategy FSDP1's). This runs `tinytrain` with Lightning's check told the backend is NCCL, which
# is what a GPU run gets.
AS_ON_NCCL = """
import sys
import torch.distributed
import lightning.pytorch.loops.utilities as loop_utilities

class ReportsNCCL:
    def __getattr__(self, name):
        return getattr(torch.distributed, name)

    def get_backend(self, group=None):
        return "nccl"

loop_utilities.dist = ReportsNCCL()
from tinytrain.commands.main import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("ckpt", ["runs/ci/checkpoints/last/state.ckpt", "runs/ci/checkpoints/last", "runs/ci"])
def test_validate_under_fsdp2_as_on_nccl(fsdp2_run, code_corpus, tmp_path, ckpt):
    """FSDP2 makes its unsharded parameters lazily: under inference_mode they became inference
    tensors and the first forward failed. Every form of checkpoint path `generate` takes works."""
    import subprocess

    script = tmp_path / "as_on_nccl.py"
    script.write_text(AS_ON_NCCL)
    args = ci_args(code_corpus, "--trainer.strategy", "fsdp2", "--ckpt_path", ckpt)
    args[0] = "validate"
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=fsdp2_run, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                       "TINYTRAIN_CACHE": str(fsdp2_run / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Inference tensors" not in proc.stderr
    logged = series(metric_rows(fsdp2_run / "runs" / "ci"), "val/loss")[-1][1]  # validation at step 20
    reported = float(proc.stdout.split("val/loss")[1].split()[1])
    assert reported == pytest.approx(logged, rel=1e-5)


def test_bf16_true_with_fsdp2_is_refused(code_corpus, tmp_path):
    proc = run_tinytrain(*ci_args(code_corpus, "--trainer.strategy", "fsdp2", "--trainer.precision", "bf16-true",
                                  "--trainer.max_steps", "2"), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "trainer.precision bf16-true with FSDP2 would keep the master weights and AdamW state in bf16" in proc.stderr
    assert "use bf16-mixed" in proc.stderr
    assert not (tmp_path / "runs" / "ci" / "checkpoints").exists()


@pytest.mark.parametrize("vocab,dtype", [(512, torch.int16), (32000, torch.int16), (40000, torch.int32)])
def test_loader_sends_narrow_token_ids(prepared, vocab, dtype):
    """TinyLlama's step on one GPU is 128 x 2049 ids: 2.1 MB as int16, not 8.4 MB as int64, through
    shared memory, pinned memory and the copy to the device; ids are widened on the device."""
    from tinytrain.data.datamodule import TokenData

    dm = TokenData(path=str(prepared), vocab_size=vocab, seq_len=16, global_batch_size=8, micro_batch_size=2,
                   num_workers=0)
    dm.open()
    train = next(iter(dm.train_dataloader()))
    assert train.dtype == dtype and train.shape == (4, 2, 17)
    val = next(iter(dm.val_dataloader()))
    assert val.dtype == dtype and val.shape == (2, 17)
    wide = dm.order.gather(np.arange(8))
    assert torch.equal(train.reshape(8, 17).long(), torch.from_numpy(wide))


def test_fit_speed_benchmark_runs_the_product_and_fails_with_it(tmp_path, code_corpus):
    """benchmarks.fit_speed reads throughput from `tinytrain fit`'s own metrics; when fit fails,
    so does the benchmark."""
    import json
    import os
    import subprocess

    env = {**os.environ, "TINYTRAIN_CACHE": str(tmp_path / "cache")}
    base = [sys.executable, "-m", "benchmarks.fit_speed", "--recipe", str(RECIPES / "ci.yaml"),
            "--steps", "6", "--skip", "2", "--out", str(tmp_path / "fit.json"), "--", "--data.corpus", str(code_corpus),
            "--data.val_fraction", "0.1", "--trainer.strategy", "fsdp2"]
    ok = subprocess.run(base, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr[-3000:]
    result = json.loads((tmp_path / "fit.json").read_text())
    assert len(result["tokens_per_s_per_device_by_step"]) == 4 and result["tokens_per_s_per_device"] > 0
    assert 0 < result["mfu"] < 1.5 and result["peak_rss_gib"] > 0 and result["final_loss"] < 6.3
    broken = subprocess.run([*base, "--trainer.precision", "bf16-true"], capture_output=True, text=True, timeout=600,
                            env=env, cwd=ROOT)
    assert broken.returncode != 0 and "`tinytrain fit` failed" in broken.stderr


@pytest.mark.gpu
def test_fit_and_validate_on_a_gpu_with_fsdp2(code_corpus, tmp_path):
    args = ci_args(code_corpus, "--trainer.accelerator", "gpu", "--trainer.strategy", "fsdp2",
                   "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "20")
    run_tinytrain(*args, cwd=tmp_path)
    rows = metric_rows(tmp_path / "runs" / "ci")
    assert series(rows, "train/peak_memory_gib") and series(rows, "val/loss")
    args[0] = "validate"
    proc = run_tinytrain(*args, "--ckpt_path", "runs/ci", cwd=tmp_path)
    assert "val/loss" in proc.stdout
