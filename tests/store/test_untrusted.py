"""Checkpoints from elsewhere: opening one never runs code from it, and what tinytrain refuses is
one line naming the file."""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, ci_args, one_line


class Payload:
    """Unpickled, it writes a marker file: proof that code from the checkpoint ran."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _copy_checkpoint(fsdp2_run, tmp_path):
    """The run's newest checkpoint, copied into a run folder of its own."""
    run = tmp_path / "theirs"
    shutil.copytree((fsdp2_run / "runs" / "ci" / "checkpoints" / "last").resolve(), run / "checkpoints" / "step-00000020")
    os.symlink("step-00000020", run / "checkpoints" / "last")
    return run, run / "checkpoints" / "step-00000020"


def _commands(run, step, corpus, tmp_path):
    """Every command that opens a checkpoint, given ``run`` or its step folder."""
    fit = [str(a) for a in ci_args(corpus, "--trainer.max_steps", "25")]
    return {
        "consolidate": ["consolidate", step, tmp_path / "out.pt"],
        "generate": ["generate", step, "--max_new_tokens", "2"],
        "convert": ["convert", "to-hf", step, tmp_path / "hf"],
        "average": ["average", step, step, tmp_path / "avg"],
        "evaluate": ["evaluate", step, "--text", ROOT / "README.md"],
        "validate": ["validate", *fit[1:], "--trainer.strategy", "fsdp2", "--ckpt_path", step],
        "fit": [*fit, "--model.init_from", step, "--trainer.default_root_dir", tmp_path / "init"],
        "fit ": [*fit, "--checkpoint.branch_from", run, "--trainer.default_root_dir", tmp_path / "branch"],
        "fit  ": [*fit, "--trainer.strategy", "fsdp2", "--trainer.default_root_dir", run],  # its own resume
    }


def _run_all(commands: dict, cwd) -> dict:
    """Run every command at once (they fail in seconds); name -> CompletedProcess-like result."""
    env = {**os.environ, "TINYTRAIN_CACHE": str(cwd / "cache"), "WANDB_MODE": "offline"}
    started = {name: subprocess.Popen([sys.executable, "-m", "tinytrain", *map(str, argv)], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, argv in commands.items()}
    done = {}
    for name, proc in started.items():
        out, err = proc.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def _poison_metadata(step, marker):
    """Hide the payload inside an otherwise valid DCP metadata object."""
    path = step / "state.ckpt" / ".metadata"
    metadata = pickle.loads(path.read_bytes())  # our own file, read before it is altered
    metadata.planner_data = {"x": Payload(marker)}
    path.write_bytes(pickle.dumps(metadata))
    _match_sizes(step)
    return path


def _match_sizes(step):
    """meta.json made to list the altered files' sizes, as a careful attacker would."""
    meta = json.loads((step / "meta.json").read_text())
    meta["files"] = {name: (step / name).stat().st_size for name in meta["files"] if (step / name).is_file()}
    (step / "meta.json").write_text(json.dumps(meta))


def test_a_crafted_dcp_metadata_runs_nothing_in_any_command(fsdp2_run, code_corpus, tmp_path):
    run, step = _copy_checkpoint(fsdp2_run, tmp_path)
    marker = tmp_path / "code-ran"
    metadata = _poison_metadata(step, marker)
    results = _run_all(_commands(run, step, code_corpus, tmp_path), tmp_path)
    for name, proc in results.items():
        line = one_line(proc, name.strip())
        assert f"{metadata}: holds objects tinytrain will not load (builtins.exec)" in line, (name, line)
        assert "weights_only" not in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "hf").exists() and not (tmp_path / "avg").exists()


def test_a_checkpoint_file_holding_objects_is_refused_without_unsafe_advice(fsdp2_run, code_corpus, tmp_path):
    run, step = _copy_checkpoint(fsdp2_run, tmp_path)
    marker = tmp_path / "code-ran"
    shutil.rmtree(step / "state.ckpt")
    torch.save({"state_dict": {"model.embed_tokens.weight": torch.zeros(2, 2)}, "extra": Payload(marker)},
               step / "state.ckpt")
    _match_sizes(step)
    commands = _commands(run, step, code_corpus, tmp_path)
    results = _run_all({k: commands[k] for k in ("consolidate", "generate", "validate", "fit ")}, tmp_path)
    for name, proc in results.items():
        line = one_line(proc, name.strip())
        assert f"{step / 'state.ckpt'}: holds objects tinytrain will not load (" in line, (name, line)
        assert "weights_only" not in proc.stderr and "will likely succeed" not in proc.stderr
    assert not marker.exists()


def test_byte_items_of_a_sharded_checkpoint_load_only_plain_values():
    """DCP stores non-tensor values (an optimizer's param groups) as pickled bytes, which its
    default planner loads with weights_only=False: tinytrain's load refuses objects there too."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from tinytrain.errors import CheckpointError
    from tinytrain.store import safeload

    safeload.harden()
    planner = DefaultLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}
    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("optimizer_0.param_groups"), torch.Size([0]),
                    MetadataIndex("optimizer_0.param_groups"), torch.Size([0]), torch.Size([0]))

    def saved(obj) -> io.BytesIO:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        return buffer

    planner.load_bytes(item, saved([{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1]}]))
    assert planner.state_dict["optimizer_0.param_groups"][0]["betas"] == (0.9, 0.95)
    with pytest.raises(CheckpointError, match="holds objects tinytrain will not load"):
        planner.load_bytes(item, saved([Payload("/nonexistent/marker")]))


def test_a_garbled_model_config_is_one_line(fsdp2_run, tmp_path):
    from conftest import run_tinytrain

    run, step = _copy_checkpoint(fsdp2_run, tmp_path)
    (step / "model_config.json").write_text('{"vocab_size": 512, "hidden_')
    _match_sizes(step)  # garbled where it was written, as meta.json was
    proc = run_tinytrain("generate", step, "--max_new_tokens", "2", cwd=tmp_path, check=False)
    assert f"{step / 'model_config.json'}: not valid JSON" in one_line(proc, "generate")
    (step / "model_config.json").write_text('{"vocab_size": 512, "hidden_layers": 3}')
    _match_sizes(step)
    proc = run_tinytrain("generate", step, "--max_new_tokens", "2", cwd=tmp_path, check=False)
    assert f"{step / 'model_config.json'}: not a model config" in one_line(proc, "generate")
