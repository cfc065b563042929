import re

import pytest
from conftest import ROOT, run_tinytrain


def fenced_commands(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_command = next(c for c in fenced_commands(readme) if "pytest" in c)
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == test_command


def test_readme_main_command_uses_the_tiny_recipe_and_generates():
    readme = (ROOT / "README.md").read_text()
    main = fenced_commands(readme)[0]
    assert "tinytrain fit --config recipes/tiny.yaml" in main and "tinytrain generate runs/tiny" in main
    assert (ROOT / "recipes" / "tiny.yaml").is_file()


@pytest.mark.slow
def test_prepare_command_writes_a_folder_fit_can_read(code_corpus, tmp_path):
    out = tmp_path / "prepared"
    run_tinytrain("prepare", "--corpus", code_corpus, "--out", out, "--vocab_size", "400", "--val_fraction", "0.1",
                  cwd=tmp_path)
    assert (out / "manifest.json").is_file() and (out / "tokenizer.model").is_file()
    again = run_tinytrain("prepare", "--corpus", code_corpus, "--out", out, cwd=tmp_path, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    # an existing tokenizer is reused as it is
    out2 = tmp_path / "prepared2"
    run_tinytrain("prepare", "--corpus", code_corpus, "--out", out2, "--tokenizer", out / "tokenizer.model",
                  "--vocab_size", "400", "--val_fraction", "0.1", cwd=tmp_path)
    assert (out2 / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
    run_tinytrain("fit", "--config", ROOT / "recipes" / "ci.yaml", "--data.path", out2, "--model.config.vocab_size",
                  "400", "--trainer.max_steps", "3", cwd=tmp_path)
