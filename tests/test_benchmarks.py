import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def run_benchmark(script: str, *args: str, out, timeout: float, env: dict | None = None) -> dict:
    """Run `python -m benchmarks.<name>` with its own --out, check it succeeded, return the JSON it wrote."""
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{script.removesuffix('.py')}", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
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
    r = run_benchmark("throughput.py", "--preset", "ci", "--steps", "2", "--warmup", "1", "--accum", "2",
                      out=tmp_path / "tp.json", timeout=300)
    assert r["device"] == "cpu" and r["precision"] == "32-true" and r["peak_source"].startswith("measured")
    assert r["tokens_per_s"] == pytest.approx(r["accum"] * r["micro_batch"] * r["seq_len"] / r["median_step_s"])
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / r["peak_flops"])
    assert 0 < r["mfu"] < 1.5 and r["peak_memory_bytes"] > 0 and len(r["step_times_s"]) == 2
    assert r["machine"]["torch"] and r["attention"] == "sdpa" and r["command"].startswith("python -m benchmarks.")
    # The recipe's accumulation (1024 / 8 micro-batches per step), from the measured parts.
    assert r["recipe_accum"] == 128
    assert r["tokens_per_s_at_accum"] == pytest.approx(
        128 * r["micro_batch"] * r["seq_len"] / (128 * r["micro_step_median_s"] + r["optimizer_median_s"]))


def test_levers_benchmark_runs_each_variant_and_reports_failures(tmp_path):
    r = run_benchmark("levers.py", "--only", "compile+loss", "fsdp", "sdpa-cudnn", "--combined=--fused_adamw on "
                      "--loss_chunk_size 64", "--", "--preset", "ci", "--steps", "2", "--warmup", "1",
                      out=tmp_path / "levers.json", timeout=600)
    rows = {row["name"]: row for row in r["rows"]}
    assert list(rows) == ["plain", "compile+loss", "fsdp", "sdpa-cudnn", "combined"]
    for name in ("plain", "compile+loss", "fsdp", "combined"):
        assert rows[name]["tokens_per_s"] > 0 and rows[name]["succeeded"] == 1, rows[name]
        assert rows[name]["ratio_to_plain"] == pytest.approx(rows[name]["tokens_per_s"] / rows["plain"]["tokens_per_s"])
    assert rows["combined"]["switches"] == "--fused_adamw on --loss_chunk_size 64"
    # A CUDA-only kernel on CPU fails with the reason, and the other variants still run.
    assert "sdpa-cudnn" in rows["sdpa-cudnn"]["error"] and "CUDA kernel" in rows["sdpa-cudnn"]["error"]
    assert r["device"] == "cpu" and r["base_arguments"] == ["--preset", "ci", "--steps", "2", "--warmup", "1"]


def test_loss_parity_benchmark_compares_curves_from_the_same_start(prepared, tmp_path):
    r = run_benchmark("loss_parity.py", "--data", str(prepared), "--preset", "ci", "--seq", "64", "--micro_batch", "4",
                      "--accum", "2", "--steps", "12", "--precision", "bf16-mixed",
                      "--fast=--fsdp --compile --compile_loss --loss_chunk_size 64 --fused_adamw on",
                      "--reference", "--reference_micro_batch", "2", out=tmp_path / "parity.json", timeout=600)
    runs = r["runs"]
    assert [runs[k]["precision"] for k in ("plain", "fast", "reference")] == ["bf16-mixed", "bf16-mixed", "32-true"]
    assert runs["reference"]["micro_batch"] == 2 and all(len(x["losses"]) == 12 for x in runs.values())
    # Same weights, same batches: the first losses agree to bf16 rounding; then every curve falls.
    assert max(x["losses"][0] for x in runs.values()) - min(x["losses"][0] for x in runs.values()) < 0.02
    assert all(x["losses"][-1] < x["losses"][0] - 0.5 for x in runs.values())
    assert r["fast_vs_plain"]["max_abs_diff"] < 0.05 and r["plain_vs_reference"]["max_abs_diff"] < 0.05
    assert r["fast_vs_plain"]["max_abs_diff"] == pytest.approx(
        max(abs(a - b) for a, b in zip(runs["plain"]["losses"], runs["fast"]["losses"])))
    assert r["within_bf16_noise"] is True


@pytest.mark.gpu
@pytest.mark.parametrize("switches", [[], ["--fsdp", "--compile", "--compile_loss", "--fused_adamw", "on",
                                           "--attention", "sdpa-cudnn"]])
def test_throughput_benchmark_on_gpu(tmp_path, switches):
    r = run_benchmark("throughput.py", "--preset", "tiny", "--steps", "3", "--warmup", "2", *switches,
                      out=tmp_path / "tp.json", timeout=600)
    assert r["device"] != "cpu" and r["precision"] == "bf16-mixed" and r["peak_memory_bytes"] > 0
    assert r["peak_source"] == "bf16 datasheet table" or r["peak_flops"] is None


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


@pytest.mark.slow
def test_h100_script_parts_run_on_cpu_at_a_small_shape(tmp_path, code_corpus):
    """Every part of benchmarks/h100.sh, at the ci shape on CPU: the wiring a GPU run depends on."""
    env = {**os.environ, "PYTHON": sys.executable, "RESULTS": str(tmp_path), "TAG": "cpu", "PRESET": "ci",
           "SEQ": "64", "MICRO_BATCH": "2", "ACCUM": "2", "STEPS": "2", "WARMUP": "1", "PARITY_STEPS": "6",
           "REFERENCE_MICRO_BATCH": "1", "DATA": str(tmp_path / "parity"), "CORPUS": str(code_corpus),
           "VOCAB": "512", "RECIPE": str(ROOT / "recipes" / "ci.yaml")}
    fast = "--fsdp --compile --compile_loss --fused_adamw on"

    def part(*args: str) -> str:
        proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "h100.sh"), *args], capture_output=True, text=True,
                              timeout=900, env=env, cwd=tmp_path)
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
        return proc.stdout

    part("data")
    assert (tmp_path / "parity" / "manifest.json").exists()
    assert "gpu none" in part("env")
    part("levers-1")
    part("levers-2")
    part("combined", fast)
    part("parity", fast)
    part("fit", "--trainer.accelerator cpu")
    part("plan")
    for lever_part, names in (("levers-1", ["plain", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flash-attn",
                                            "fused-adamw", "fsdp", "micro-4", "micro-16"]),
                              ("levers-2", ["plain", "compile", "compile+loss", "chunked-loss",
                                            "activation-checkpointing", "float8"])):
        rows = {row["name"]: row for row in json.loads((tmp_path / f"{lever_part}-cpu.json").read_text())["rows"]}
        assert list(rows) == names
        for name, row in rows.items():
            if name in ("sdpa-cudnn", "sdpa-efficient", "flash-attn"):  # CUDA-only: a row with the reason
                assert row.get("error"), row
            else:
                assert row["succeeded"] == 1 and row["tokens_per_s"] > 0, row
    combined = json.loads((tmp_path / "throughput-cpu.json").read_text())
    assert combined["compile"] and combined["fsdp"] and combined["preset"] == "ci" and combined["seq_len"] == 64
    parity = json.loads((tmp_path / "loss_parity-cpu.json").read_text())
    assert [len(parity["runs"][k]["losses"]) for k in ("plain", "fast", "reference")] == [6, 6, 6]
    fit = json.loads((tmp_path / "fit_speed-cpu.json").read_text())
    assert fit["tokens_per_s_per_device"] > 0 and "--data.global_batch_size 4" in fit["fit_command"]
    assert "measured on cpu" in (tmp_path / "plan-cpu.txt").read_text()


def test_eval_speed_benchmark_compares_with_the_harness_hf_class(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    r = run_benchmark("eval_speed.py", "--preset", "ci", "--questions", "4", "--rounds", "1",
                      out=tmp_path / "eval.json", timeout=600)
    assert set(r["requests_per_s"]) == {"tinytrain", "hf"} and r["requests"] == {"loglikelihood": 16, "rolling": 1}
    assert r["max_abs_loglikelihood_difference"] < 1e-4
    assert r["ratio_tinytrain_over_hf"]["loglikelihood"] == pytest.approx(
        r["requests_per_s"]["tinytrain"]["loglikelihood"] / r["requests_per_s"]["hf"]["loglikelihood"])


def test_proxy_tuning_closes_much_of_the_gap_on_the_tuned_domain(tmp_path):
    """Issue-sized version of the paper's measure: four small models trained here on prose (A) then code (B).
    On held-out code the proxy-tuned large model beats the large base by far more than seed noise (a few
    hundredths of a bit per byte on these runs) and closes a real part of the gap to the truly tuned one."""
    r = run_benchmark("proxy_tuning.py", "--scale", "test", out=tmp_path / "proxy.json", timeout=900)
    bpb = r["bits_per_byte_on_held_out_b"]
    print(bpb, r["gap_closed"], r["generation_tokens_per_s"])
    assert r["corpora"]["held_out_documents"] >= 2 and r["parameters"]["large"] > 3 * r["parameters"]["small"]
    assert bpb["large-tuned"] < bpb["large-base"] - 0.2 and bpb["small-tuned"] < bpb["small-base"] - 0.1
    assert bpb["large-proxy-tuned"] < bpb["large-base"] - 0.1
    assert 0.2 < r["gap_closed"] < 1.5
    assert all(v > 0 for v in r["generation_tokens_per_s"].values()) and set(r["proxy_alpha_sweep"]) == {"0.5", "2.0"}


@pytest.mark.slow
def test_moe_vs_dense_benchmark_trains_both_on_shared_data(code_corpus, tmp_path):
    """Both fits at a toy size: the JSON holds each model's held-out score and speed, the MoE with
    more parameters than the dense model and (but for the router) the same active ones."""
    small = ["--model.config.vocab_size", "512", "--model.config.hidden_size", "64", "--model.config.num_attention_heads",
             "2", "--model.config.num_hidden_layers", "2", "--model.config.max_position_embeddings", "64",
             "--data.seq_len", "64", "--data.global_batch_size", "4", "--data.micro_batch_size", "4",
             "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_steps", "4",
             "--model.optim.warmup_steps", "1", "--model.config.qk_norm", "false",  # tiny has these, tiny-moe not
             "--model.config.value_embeddings", "0", "--model.compile", "false", "--model.compile_loss", "false"]
    r = run_benchmark("moe_vs_dense.py", "--steps", "4", "--rounds", "1", "--corpus", str(code_corpus), "--val_fraction", "0.1", "--",
                      *small, out=tmp_path / "moe.json", timeout=600)
    dense, moe = r["rows"]["dense"], r["rows"]["moe"]
    assert moe["params"] > dense["params"] and moe["active_params"] - dense["active_params"] == 2 * 8 * 64
    assert (moe["experts"], moe["experts_per_token"], dense["experts"]) == (8, 2, 1)
    for row in (dense, moe):
        assert 0 < row["bits_per_byte"] < 10 and row["logged_tokens_per_s"] > 0 and row["validation_timeline"]
    assert set(r["speed"]["tokens_per_s"]) == {"dense", "moe"} and r["tokens_per_s_moe_over_dense"] > 0


def test_tiny_quality_benchmark_times_scores_and_measures_the_compressors(code_corpus, tmp_path):
    import shutil

    result = run_benchmark("tiny_quality.py", "--recipe", str(ROOT / "recipes" / "ci.yaml"), "--corpus",
                           str(code_corpus), "--val_fraction", "0.1", "--", "--data.corpus", str(code_corpus),
                           "--data.val_fraction", "0.1", "--trainer.max_steps", "4",
                           "--trainer.val_check_interval", "2", "--checkpoint.every_n_steps", "4",
                           out=tmp_path / "quality.json", timeout=600)
    assert isinstance(result["amx"], bool) and result["precision"] == "32-true" and result["steps"] == 4
    assert result["wall_seconds"] > 0 and [r["step"] for r in result["validation_timeline"]] == [2, 4]
    assert result["bits_per_byte"] == result["model"]["bits_per_byte"] > 0
    adapting = result["adapting"]
    assert result["bits_per_byte_adapting"] == adapting["bits_per_byte"] > 0
    assert adapting["adapt_lr"] == 0.5 and adapting["stride"] == 32
    assert adapting["tokens"] == result["model"]["tokens"] and adapting["seconds"] > 0
    assert result["held_out"]["bytes"] > 0 and result["held_out"]["training_split_bytes"] > result["held_out"]["bytes"]
    figures = result["compressors"]
    for name, program in (("xz -9e", "lzma"), ("zstd -19 --long", "zstd"), ("zpaq -m5", "zpaq")):
        alone, after = figures[name], figures[f"{name}, after the training split"]
        if program != "lzma" and shutil.which(program) is None:
            assert alone is None and after is None
            continue
        # the held-out modules repeat the training modules' patterns: reading those first helps
        assert 0 < after < alone < 8, (name, alone, after)
    assert figures["zlib -9"] > 0 and figures["bz2 -9"] > 0


def test_muon_step_benchmark_times_both_optimizers_on_the_same_model(tmp_path):
    result = run_benchmark("muon_step.py", "--preset", "ci", "--layers", "1", "--tokens", "16", "--rounds", "2",
                           out=tmp_path / "muon.json", timeout=300)
    assert result["layers"] == 1 and result["full_depth"] == 2 and result["hidden_matrices"] == 7
    assert set(result["all_s"]) == {"forward_backward", "adamw", "muon_float32", "muon_bfloat16"}
    assert all(len(v) == 2 and min(v) > 0 for v in result["all_s"].values())
    median = result["median_s"]
    for name in ("muon_float32", "muon_bfloat16"):
        assert result["over_adamw_step"][name] == pytest.approx(median[name] / median["adamw"])
        assert result["extra_s_full_depth"][name] == pytest.approx(2 * (median[name] - median["adamw"]))
    assert result["newton_schulz_flops_full_depth"] == 2 * result["newton_schulz_flops"]


def test_newton_schulz_flops_at_tinyllama_shape():
    """The README's figure: five iterations on the 154 hidden matrices of TinyLlama are 4.8e13 FLOPs."""
    from benchmarks.muon_step import newton_schulz_flops
    from tinytrain.model.llama import LlamaConfig
    from tinytrain.train.muon import is_hidden_matrix

    shapes = [s for n, s in LlamaConfig.from_name("tinyllama-1.1b").parameter_shapes().items()
              if is_hidden_matrix(n, len(s))]
    assert len(shapes) == 154
    assert newton_schulz_flops(shapes, 5) == pytest.approx(4.8e13, rel=0.02)
    assert newton_schulz_flops([(3, 5)], 1) == 4 * 9 * 5 + 2 * 27  # m = 3 the shorter side


def test_tiny_levers_benchmark_gives_each_variant_the_seconds_its_probed_speed_buys(code_corpus, tmp_path):
    result = run_benchmark("tiny_levers.py", "--recipe", str(ROOT / "recipes" / "ci.yaml"), "--corpus",
                           str(code_corpus), "--val_fraction", "0.1", "--seconds", "0.001", "--probe_steps", "10",
                           "--only", "recipe", "--", "--data.corpus", str(code_corpus), "--data.val_fraction", "0.1",
                           "--trainer.val_check_interval", "5", "--checkpoint.every_n_steps", "10",
                           out=tmp_path / "levers.json", timeout=600)
    row = result["rows"]["recipe"]
    assert row["probe_tokens_per_s"] > 0 and row["steps"] == 10  # the fewest steps a variant gets
    assert row["tokens"] == 10 * 16 * 64 and row["bits_per_byte"] > 0
    assert [r["step"] for r in row["validation_timeline"]] == [5, 10] and row["val_bpb_last"] > 0
    assert result["bits_per_byte_minus_recipe"] == {"recipe": 0.0} and isinstance(result["amx"], bool)


def test_local_sgd_benchmarks_read_loss_against_wall_time_from_a_run(tmp_path):
    """The two Local SGD benchmarks need root (namespaces, tc, cgroups) and minutes to run; what they
    compute from a run's metrics is checked here on a written metrics file."""
    from benchmarks import local_sgd, local_sgd_async

    logs = tmp_path / "run" / "logs" / "version_0"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text(
        "step,train/loss,train/wall_seconds,local_sgd/outer_steps,val/loss\n"
        "9,5.0,1.5,1,\n9,,,,4.8\n19,4.0,3.0,2,\n19,,,,4.1\n29,3.5,4.5,3,\n29,,,,3.9\n")
    points = local_sgd.curve(tmp_path / "run")
    assert points == [(9, 1.5, 4.8), (19, 3.0, 4.1), (29, 4.5, 3.9)]
    assert local_sgd.seconds_to(points, 4.1) == 3.0 and local_sgd.seconds_to(points, 3.0) is None
    c = local_sgd_async.curve(tmp_path / "run")
    assert [(p["step"], p["seconds"], p["updates"], p["val_loss"]) for p in c] == \
        [(9, 1.5, 1.0, 4.8), (19, 3.0, 2.0, 4.1), (29, 4.5, 3.0, 3.9)]
    assert local_sgd_async.last_step(tmp_path / "run") == 30
