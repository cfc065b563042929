import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def run_benchmark(script: str, *args: str, out, timeout: float, env: dict | None = None) -> dict:
    """Run benchmarks/<script> with its own --out, check it succeeded, return the JSON it wrote."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_vs_transformers_benchmark_writes_its_json(tmp_path):
    pytest.importorskip("transformers")
    result = run_benchmark("vs_transformers.py", "--preset", "ci", "--batch", "2", "--seq", "32", "--rounds", "2",
                           "--steps", "1", "--warmup", "1", "--no-compile", out=tmp_path / "bench.json", timeout=300)
    assert set(result["tokens_per_s"]) == {"tinytrain", "transformers"}
    assert all(v > 0 for v in result["tokens_per_s"].values())
    ratio = result["median_step_s"]["transformers"] / result["median_step_s"]["tinytrain"]
    assert result["ratio_tinytrain_over_transformers"] == pytest.approx(ratio)
    # Same weights and batch: both models compute the same loss, so the race is fair.
    assert result["initial_loss"]["tinytrain"] == pytest.approx(result["initial_loss"]["transformers"], abs=1e-5)
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    assert len(result["step_times_s"]["tinytrain"]) == 2


@pytest.mark.slow
def test_convert_memory_benchmark_writes_its_json(tmp_path):
    result = run_benchmark("convert_memory.py", "--preset", "ci", out=tmp_path / "convert.json", timeout=600)
    assert set(result["conversions"]) == {"from_hf", "to_hf", "to_hf_float32"}
    for r in result["conversions"].values():
        assert r["peak_rss_bytes"] >= result["process_baseline_rss_bytes"] * 0.5 and r["seconds"] > 0
    assert result["output_bytes"]["to_hf_float32"] > 1.9 * result["output_bytes"]["to_hf"]  # bf16 -> fp32
    assert result["round_trip_first_tensor_equal"] is True


def test_generate_speed_benchmark_writes_its_json(tmp_path):
    row = run_benchmark("generate_speed.py", "--preset", "ci", "--prompts", "8", "--new_tokens", "8", "--repeats", "1",
                        out=tmp_path / "gen.json", timeout=300)["rows"][0]
    assert row["prompt_tokens"] == 8 and row["tokens_per_s_cache"] > 0 and row["tokens_per_s_no_cache"] > 0


@pytest.mark.slow
def test_resume_cost_benchmark_writes_its_json(tmp_path, code_corpus):
    result = run_benchmark("resume_cost.py", "--corpus", str(code_corpus), "--rounds", "1",
                           out=tmp_path / "resume.json", timeout=600,
                           env={**os.environ, "TINYTRAIN_CACHE": str(tmp_path / "cache")})
    assert result["steps"] == {"near": 10, "far": 1_000_000}
    for name in ("near", "far"):
        run = result["runs"][name][0]
        assert 0 < run["restored_s"] < run["exit_s"]
    assert set(result["data_path_first_batch_s"]) == {"10", "1000000", "1000000000"}
    assert result["checkpoint"]["bytes"] > 0


def test_throughput_benchmark_on_cpu_writes_its_json(tmp_path):
    r = run_benchmark("throughput.py", "--preset", "ci", "--steps", "2", "--warmup", "1", out=tmp_path / "tp.json",
                      timeout=300)
    assert r["device"] == "cpu" and r["precision"] == "32-true" and r["peak_source"].startswith("measured")
    assert r["tokens_per_s"] == pytest.approx(r["micro_batch"] * r["seq_len"] / r["median_step_s"])
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / r["peak_flops"])
    assert 0 < r["mfu"] < 1.5 and r["peak_memory_bytes"] > 0 and len(r["step_times_s"]) == 2
    assert r["machine"]["torch"] and r["attention"].startswith("sdpa")


@pytest.mark.gpu
def test_throughput_benchmark_on_gpu(tmp_path):
    r = run_benchmark("throughput.py", "--preset", "tiny", "--steps", "3", "--warmup", "2", out=tmp_path / "tp.json",
                      timeout=600)
    assert r["device"] != "cpu" and r["precision"] == "bf16-mixed" and r["peak_memory_bytes"] > 0


def test_prep_speed_benchmark_writes_its_json(tmp_path):
    result = run_benchmark("prep_speed.py", "--files", "4", "--max_docs", "60", "--vocab_size", "400", "--rounds", "1",
                           out=tmp_path / "prep.json", timeout=600)
    assert set(result["tokens_per_s"]) == {"raw", "pipeline_1", "pipeline_2"}
    # The pipeline wrote every token the raw encoder made, plus one BOS per document.
    assert result["tokens"]["pipeline_1"] == result["tokens"]["pipeline_2"] == result["tokens"]["raw"] + 60
    assert result["pipeline_over_raw_one_core"] == pytest.approx(
        result["tokens_per_s"]["pipeline_1"] / result["tokens_per_s"]["raw"])
    assert result["machine"]["cores"] >= 1


def test_loader_speed_benchmark_writes_its_json(tmp_path):
    result = run_benchmark("loader_speed.py", "--tokens", "200000", "100000", "--shard_tokens", "30000", "--seq_len",
                           "64", "--global_batch", "32", "--world_size", "2", "--steps", "3", "--rounds", "1",
                           out=tmp_path / "loader.json", timeout=300)
    assert set(result["tokens_per_s_by_start_step"]) == {"0", "1000000", "1000000000"}
    assert result["tokens_per_s"] > 0
    assert result["over_h100_consumption"] == pytest.approx(result["tokens_per_s"] / 70_000)
