"""`generate` and `evaluate` with --proxy_tuned / --proxy_base: the real commands on the shared ci run's
checkpoints (steps 20 and 40), and their refusals."""

import json
import shutil

from conftest import one_line, tinytrain_in_process

from tinytrain.data.tokenizer import train_tokenizer
from tinytrain.store.layout import step_folder

GREEDY = ["--prompt", "def ", "--max_new_tokens", "40", "--temperature", "0"]


def test_generation_obeys_the_two_identities(ci_run):
    """--proxy_alpha 0 writes what the large model writes alone; steering step 20 by (step 40 - step 20)
    writes what step 40 writes."""
    cwd, run, _ = ci_run
    early, late = run / "checkpoints" / step_folder(20), run / "checkpoints" / step_folder(40)

    def text(*args):
        return tinytrain_in_process("generate", *args, *GREEDY, cwd=cwd, check=True).stdout

    alone_early, alone_late = text(early), text(late)
    assert alone_early != alone_late
    assert text(early, "--proxy_tuned", late, "--proxy_base", early, "--proxy_alpha", "0") == alone_early
    assert text(early, "--proxy_tuned", late, "--proxy_base", early) == alone_late


def test_scoring_obeys_the_identity_and_records_the_proxies(ci_run, tmp_path):
    cwd, run, _ = ci_run
    early, late = run / "checkpoints" / step_folder(20), run / "checkpoints" / step_folder(40)
    held_out = tmp_path / "held_out.py"
    held_out.write_text("".join(f"def sum_alpha_beta_{i}(alpha, beta):\n    return alpha + beta\n\n"
                                for i in range(30)))

    def score(*args):
        out = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
        tinytrain_in_process("evaluate", *args, "--text", held_out, "--out", out, cwd=cwd, check=True)
        return json.loads(out.read_text())

    alone, steered = score(late), score(early, "--proxy_tuned", late, "--proxy_base", early)
    assert abs(steered["text"]["bits_per_byte"] - alone["text"]["bits_per_byte"]) < 1e-5
    assert steered["proxy"] == {"tuned": str(late), "base": str(early), "alpha": 1.0} and "proxy" not in alone
    assert steered["checkpoint"] == str(early)


def test_refusals_are_one_line_and_come_before_any_weights_are_read(ci_run, tmp_path):
    cwd, run, _ = ci_run
    early, late = run / "checkpoints" / step_folder(20), run / "checkpoints" / step_folder(40)
    other = tmp_path / "other-tokenizer"
    shutil.copytree(late, other)
    state = other / "state.ckpt"  # zeros of the saved size: a refusal that read the weights would fail otherwise
    state.write_bytes(bytes(state.stat().st_size))
    train_tokenizer((f"words {i} and more words {i * 3}, none of them code" for i in range(3000)),
                    other / "tokenizer.model", 512)
    meta = json.loads((other / "meta.json").read_text())  # a consistent checkpoint, only with another vocabulary
    meta["files"]["tokenizer.model"] = (other / "tokenizer.model").stat().st_size
    (other / "meta.json").write_text(json.dumps(meta))
    proc = tinytrain_in_process("generate", early, "--proxy_tuned", other, "--proxy_base", early, cwd=cwd, check=False)
    assert "--proxy_tuned does not share the large model's tokenizer" in one_line(proc, "generate")
    assert str(other / "tokenizer.model") in proc.stderr

    short = tmp_path / "short-window"
    shutil.copytree(late, short)
    config = json.loads((short / "model_config.json").read_text())
    (short / "model_config.json").write_text(json.dumps({**config, "max_position_embeddings": 8}))
    meta = json.loads((short / "meta.json").read_text())
    meta["files"]["model_config.json"] = (short / "model_config.json").stat().st_size
    (short / "meta.json").write_text(json.dumps(meta))
    proc = tinytrain_in_process("generate", early, "--proxy_tuned", late, "--proxy_base", short, "--prompt",
                                "def sum_alpha_beta(alpha, beta):", cwd=cwd, check=False)
    assert "--proxy_base" in one_line(proc, "generate") and "reads at most 8 tokens" in proc.stderr

    for args, message in (((early, "--proxy_tuned", late), "--proxy_tuned and --proxy_base go together"),
                          ((early, "--proxy_alpha", "0.5"), "--proxy_alpha needs --proxy_tuned"),
                          ((early, "--proxy_tuned", late, "--proxy_base", early, "--proxy_alpha", "nan"),
                           "--proxy_alpha must be a finite number")):
        for command, extra in (("generate", ()), ("evaluate", ("--text", tmp_path / "none.txt"))):
            proc = tinytrain_in_process(command, *args, *extra, cwd=cwd, check=False)
            assert message in one_line(proc, command), (command, args)
