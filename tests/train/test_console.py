"""What a user sees: each console line once, no third-party noise, a line per validation, the
summary at the end, and the plot of the run."""

import collections

import pytest
from conftest import tinytrain_in_process

NOISE = ("litlogger", "LeafSpec", "Total FLOPs", "Epoch 0/", "transfer_batch_to_device", "Failed to load")


@pytest.fixture
def console(ci_run):
    """The shared ci run's folder and what it printed."""
    cwd, _, proc = ci_run
    return cwd, proc.stderr


def test_each_line_once_and_no_noise(console):
    _, err = console
    lines = [line for line in err.splitlines() if line.strip()]
    repeated = [line for line, n in collections.Counter(lines).items() if n > 1]
    assert not repeated, repeated
    for noise in NOISE:
        assert noise not in err, noise
    assert sum("Seed set to 3407" in line for line in lines) == 1


def test_one_line_per_validation_and_a_summary(console):
    cwd, err = console
    validations = [line for line in err.splitlines() if ": val/loss " in line]
    assert [line.split(":")[0] for line in validations] == ["step 20", "step 40"]
    assert "bits per byte" in validations[-1] and "perplexity" in validations[-1]
    summary = err[err.index("done: "):]
    assert "done: 40 steps, 40,960 tokens in " in summary
    assert "validation: " in summary and "bits per byte" in summary
    assert f"checkpoint: {(cwd / 'runs' / 'ci' / 'checkpoints' / 'step-00000040').resolve()}" in summary
    assert f"plot: {'runs/ci/plot.png'}" in summary
    for command in ("tinytrain generate runs/ci", "tinytrain evaluate runs/ci", "tinytrain convert to-hf runs/ci",
                    "tinytrain plot runs/ci"):
        assert command in summary, command


def test_the_run_plots_itself_and_runs_overlay(console, tmp_path):
    pytest.importorskip("matplotlib")
    import shutil

    from tinytrain.train.plot import read_run

    cwd, _ = console
    png = cwd / "runs" / "ci" / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    # a second run beside the first, in one picture
    other = tmp_path / "other"
    shutil.copytree(cwd / "runs" / "ci", other)
    out = tmp_path / "both.png"
    proc = tinytrain_in_process("plot", cwd / "runs" / "ci", other, "--out", out, cwd=tmp_path, check=True)
    assert proc.stdout.strip() == str(out) and out.read_bytes()[:4] == b"\x89PNG"
    series = read_run(cwd / "runs" / "ci")
    assert sorted(series["val/loss"]) == [19, 39] and len(series["train/loss"]) == 8
    bad = tinytrain_in_process("plot", tmp_path, cwd=tmp_path, check=False)
    assert bad.returncode == 1 and "no logs/version_*/metrics.csv" in bad.stderr.strip().splitlines()[-1]
