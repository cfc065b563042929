"""Expected errors are one line, `tinytrain <command>: error: ...`, naming the file, key or value;
nothing already saved is touched. Refusals are called in this process (`tinytrain_in_process`): each
spares a second interpreter's seconds of Lightning imports; the tests that train keep a process of their own."""

import json
import re
import shutil
import subprocess

import pytest
from conftest import ci_args, one_line, run_tinytrain, tinytrain_in_process, tree_digest

from tinytrain.data import shards


def _altered_copy(prepared, tmp_path, split: str):
    copy = tmp_path / "data"
    shutil.copytree(prepared, copy)
    victim = copy / shards.read_manifest(copy)["splits"][split][0]["file"]
    data = bytearray(victim.read_bytes())
    data[shards.HEADER.size + 40:shards.HEADER.size + 42] = b"\xff\x7f"  # one id 32767, same size
    victim.write_bytes(bytes(data))
    return copy, victim


def test_a_bad_id_in_a_validation_shard_stops_the_run_before_training(prepared, tmp_path):
    copy, victim = _altered_copy(prepared, tmp_path, "val")
    proc = tinytrain_in_process("fit", "--config", ci_args(prepared)[2], "--data.path", copy, cwd=tmp_path)
    line = one_line(proc, "fit")
    assert f"{victim}: holds token id 32767 >= the model's vocab_size 512" in line
    assert not (tmp_path / "runs" / "ci" / "checkpoints").exists()
    # the failed fit gave the run folder back: a second one in the same process is not refused as a rival
    again = tinytrain_in_process("fit", "--config", ci_args(prepared)[2], "--data.path", copy, cwd=tmp_path)
    assert one_line(again, "fit") == line


def test_a_truncated_shard_is_one_line(prepared, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(prepared, copy)
    victim = copy / shards.read_manifest(copy)["splits"]["train"][0]["file"]
    victim.write_bytes(victim.read_bytes()[:-10])
    proc = tinytrain_in_process("fit", "--config", ci_args(prepared)[2], "--data.path", copy, cwd=tmp_path)
    assert f"{victim}: truncated or padded shard" in one_line(proc, "fit")


@pytest.mark.parametrize("args,expected", [
    (["--model.optim.lr", "-0.001"], "model.optim.lr must be >= 0, got -0.001"),
    (["--model.optim.warmup_steps", "50", "--model.optim.decay_steps", "40"],
     "model.optim.warmup_steps (50) must not exceed decay_steps (40)"),
    (["--model.optim.betas", "[0.9, 1.5]"], "model.optim.betas must be two numbers in [0, 1)"),
    (["--data.global_batch_size", "lots"], "data.global_batch_size"),
    (["--checkpoint.keep_last", "-1"], "checkpoint.keep_last must be >= 0, got -1"),
])
def test_values_that_make_no_sense_are_refused(code_corpus, tmp_path, args, expected):
    proc = tinytrain_in_process(*ci_args(code_corpus, *args), cwd=tmp_path)
    assert expected in one_line(proc, "fit")


@pytest.mark.parametrize("args,expected", [
    (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    (["--temperature", "-1"], "--temperature must be >= 0 (0 is greedy), got -1.0"),
    (["--top_k", "-5"], "--top_k must be >= 0 (0 disables it), got -5"),
    (["--max_new_tokens", "-3"], "--max_new_tokens must be >= 1, got -3"),
])
def test_generate_refuses_sampling_settings_out_of_range(tmp_path, args, expected):
    proc = tinytrain_in_process("generate", tmp_path, *args, cwd=tmp_path)
    assert proc.returncode == 2 and expected in one_line(proc, "generate")


def test_missing_paths_are_one_line(tmp_path):
    assert f"{tmp_path / 'nowhere'}: no tinytrain checkpoint there" in one_line(
        tinytrain_in_process("generate", tmp_path / "nowhere", cwd=tmp_path), "generate")
    assert f"corpus folder {tmp_path / 'nowhere'} does not exist" in one_line(
        tinytrain_in_process("prepare", "--corpus", tmp_path / "nowhere", "--out", tmp_path / "out", cwd=tmp_path),
        "prepare")
    assert "nowhere.yaml" in one_line(tinytrain_in_process("fit", "--config", tmp_path / "nowhere.yaml",
                                                           cwd=tmp_path), "fit")


def test_a_truncated_safetensors_file_is_named(tmp_path, prepared):
    transformers = pytest.importorskip("transformers")
    import torch

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf", safe_serialization=True)
    shutil.copyfile(prepared / "tokenizer.model", tmp_path / "hf" / "tokenizer.model")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    before = tree_digest(tmp_path / "hf")
    proc = tinytrain_in_process("convert", "from-hf", tmp_path / "hf", tmp_path / "out", cwd=tmp_path)
    assert f"{weights}: truncated: its header lists" in one_line(proc, "convert")
    assert not (tmp_path / "out").exists() and tree_digest(tmp_path / "hf") == before


def test_fit_on_a_read_only_run_folder_is_one_line(code_corpus, tmp_path):
    disk = tmp_path / "ro"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        proc = tinytrain_in_process(*ci_args(code_corpus, "--trainer.default_root_dir", disk / "run"), cwd=tmp_path)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    line = one_line(proc, "fit")
    assert f"{disk / 'run' / 'checkpoints'}: cannot write to the run folder (Read-only file system)" in line


def _spec(tmp_path, prepared, root, extra=""):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"out: {tmp_path / 'out'}\ntokenizer: {prepared / 'tokenizer.model'}\nval_fraction: 0.1\n"
                    f"sources:\n  - name: web\n    path: {root}\n{extra}")
    return spec


def test_a_source_that_yields_no_document_is_refused(prepared, tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    (records / "a.jsonl").write_text("".join(json.dumps({"content": f"doc {i}", "id": i}) + "\n" for i in range(6)))
    proc = tinytrain_in_process("prepare", "--config", _spec(tmp_path, prepared, records), cwd=tmp_path)
    line = one_line(proc, "prepare")
    assert "source 'web' yielded no document from 1 file(s) (missing_field 6)" in line
    assert "its records have no string field 'text'; fields found: content, id (set text_field)" in line
    assert not (tmp_path / "out" / "web" / "manifest.json").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(3):
        (empty / f"{i}.txt").write_text("  \n")
    (tmp_path / "out").rename(tmp_path / "out-before")
    proc = tinytrain_in_process("prepare", "--config", _spec(tmp_path, prepared, empty), cwd=tmp_path)
    assert "source 'web' yielded no document from 3 file(s) (empty 3)" in one_line(proc, "prepare")


def test_a_training_split_smaller_than_a_step_is_refused_unless_asked_for(prepared, tmp_path):
    args = ci_args(prepared, "--data.path", prepared, "--data.global_batch_size", "4096",
                   "--data.micro_batch_size", "8")
    line = one_line(tinytrain_in_process(*args, cwd=tmp_path), "fit")
    assert re.search(rf"{prepared}: training split holds \d+ blocks of 65 tokens, fewer than the 4096 sequences one "
                     r"step reads from it \(data.global_batch_size 4096\): each block would be read about [\d.]+ "
                     r"times within a step; .* --data.allow_repeats_in_step true", line), line
    assert not (tmp_path / "runs" / "ci" / "checkpoints").exists()
    proc = tinytrain_in_process(*args, "--data.allow_repeats_in_step", "true", "--trainer.max_steps", "1", cwd=tmp_path,
                                check=True)
    assert "(data.allow_repeats_in_step)" in proc.stderr
    # warmup beyond the run's last step: said, once
    assert proc.stderr.count("model.optim.warmup_steps (5) is beyond trainer.max_steps (1): the learning rate "
                             "reaches only 0 of its peak") == 1


def test_evaluate_refuses_an_empty_text_file(fsdp2_run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = tinytrain_in_process("evaluate", fsdp2_run / "runs" / "ci", "--text", empty, cwd=tmp_path)
    assert f"--text {empty}: the file is empty; bits per byte needs at least one byte of text" in \
        one_line(proc, "evaluate")


def test_prepare_corpus_takes_any_out_path(code_corpus, prepared, tmp_path):
    out = tmp_path / "dir" / "out put"
    run_tinytrain("prepare", "--corpus", code_corpus, "--out", out, "--tokenizer", prepared / "tokenizer.model",
                  "--vocab_size", "512", "--val_fraction", "0.1", cwd=tmp_path)
    assert shards.read_manifest(out)["documents"]["train"] > 0
    assert [p.name for p in out.parent.iterdir()] == ["out put"]
