"""Downstream evaluation with lm-evaluation-harness on tasks written here (no hub), parity with the
harness's own Hugging Face model class, in-loop evaluation, and bits per byte."""

import json
import math
import random
import shutil

import pytest
import torch
from conftest import RECIPES, ROOT, metric_rows, run_tinytrain, series, tinytrain_in_process

pytest.importorskip("lm_eval")

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "pig", "ant", "elk", "yak", "rat", "bat", "emu", "gnu", "hen",
           "eel"]
COLORS = ["red", "blue", "green", "gold"]
COLOR_OF = {a: COLORS[(i * 7) % 4] for i, a in enumerate(ANIMALS)}


def write_pattern_corpus(folder, files: int = 60, seed: int = 0):
    """Lines 'the <animal> is <its color> .': a mapping a tiny model learns in a few hundred steps."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for i in range(files):
        lines = [f"the {a} is {COLOR_OF[a]} ." for a in rng.choices(ANIMALS, k=60)]
        (folder / f"facts_{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def write_tasks(folder):
    """Three local tasks, as a user would add them with --include_path: multiple choice, generation
    with exact match, and rolling log-likelihood."""
    folder.mkdir(parents=True)
    data = folder / "data"
    data.mkdir()
    with open(data / "choice.jsonl", "w") as f:
        for a in ANIMALS:
            f.write(json.dumps({"question": f"the {a} is", "choices": COLORS,  # the harness puts " " between
                                "answer": COLORS.index(COLOR_OF[a])}) + "\n")
    with open(data / "gen.jsonl", "w") as f:
        for a in ANIMALS:
            f.write(json.dumps({"prompt": f"the {a} is", "target": COLOR_OF[a]}) + "\n")
    with open(data / "text.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"text": "\n".join(f"the {a} is {COLOR_OF[a]} ." for a in ANIMALS[i:i + 6])}) + "\n")
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (folder / "tt_choice.yaml").write_text(
        f"task: tt_choice\ndataset_kwargs:\n  data_files:\n    test: {data / 'choice.jsonl'}\n{common}"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "tt_gen.yaml").write_text(
        f"task: tt_gen\ndataset_kwargs:\n  data_files:\n    test: {data / 'gen.jsonl'}\n{common}"
        "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
        "generation_kwargs:\n  until: [\" .\"]\n  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n")
    (folder / "tt_text.yaml").write_text(
        f"task: tt_text\ndataset_kwargs:\n  data_files:\n    test: {data / 'text.jsonl'}\n{common}"
        "output_type: loglikelihood_rolling\ndoc_to_text: \"{{text}}\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return folder


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A ci model trained 200 steps on the pattern, a random one (step 1 at learning rate 0), the tasks."""
    root = tmp_path_factory.mktemp("evaluate")
    corpus = write_pattern_corpus(root / "facts")
    tasks = write_tasks(root / "tasks")
    common = ["fit", "--config", RECIPES / "ci.yaml", "--data.corpus", corpus, "--data.val_fraction", "0.1"]
    tinytrain_in_process(*common, "--trainer.max_steps", "200", "--model.optim.decay_steps", "200",
                         "--checkpoint.every_n_steps", "200", "--trainer.default_root_dir", "runs/trained",
                         "--trainer.logger.init_args.save_dir", "runs/trained", cwd=root, check=True)
    tinytrain_in_process(*common, "--trainer.max_steps", "1", "--model.optim.lr", "0", "--trainer.default_root_dir",
                         "runs/random", "--trainer.logger.init_args.save_dir", "runs/random", cwd=root, check=True)
    return root, tasks


def evaluate(root, checkpoint, tasks, *extra):
    out = root / f"{checkpoint.replace('/', '_')}-{abs(hash(extra))}.json"
    tinytrain_in_process("evaluate", root / checkpoint, "--tasks", "tt_choice,tt_gen,tt_text", "--include_path", tasks,
                         "--out", out, *extra, cwd=root, check=True)
    report = json.loads(out.read_text())
    return report, {(r["task"], r["metric"]): r["value"] for r in report["rows"]}


def test_a_trained_model_beats_chance_where_a_random_one_does_not(setting):
    root, tasks = setting
    report, trained = evaluate(root, "runs/trained", tasks)
    _, untrained = evaluate(root, "runs/random", tasks)
    print({k: (trained[k], untrained[k]) for k in trained})
    assert trained[("tt_choice", "acc")] >= 0.8 and untrained[("tt_choice", "acc")] <= 0.5  # chance: 0.25
    assert trained[("tt_gen", "exact_match")] >= 0.5 and untrained[("tt_gen", "exact_match")] == 0
    assert trained[("tt_text", "bits_per_byte")] < 0.5 * untrained[("tt_text", "bits_per_byte")]
    assert report["step"] == 200 and report["tokens"] == 200 * 16 * 64 and report["num_fewshot"] is None
    assert report["versions"]["tt_choice"] == 1.0 and set(report["n-shot"]) >= {"tt_choice", "tt_gen", "tt_text"}
    # lm-eval's own layout beside the rows: results -> task -> "metric,filter"
    assert report["results"]["tt_choice"]["acc,none"] == trained[("tt_choice", "acc")]
    assert report["higher_is_better"]["tt_choice"]["acc"] is True


def test_proxy_tuning_through_the_harness_gives_the_tuned_model_when_steering_its_own_base(setting):
    """random + (trained - random) is the trained model: the same metrics on every kind of task (choices,
    generation with each model's own KV cache, perplexity)."""
    root, tasks = setting
    _, trained = evaluate(root, "runs/trained", tasks)
    report, steered = evaluate(root, "runs/random", tasks, "--proxy_tuned", root / "runs/trained", "--proxy_base",
                               root / "runs/random")
    assert report["proxy"]["alpha"] == 1.0 and steered.keys() == trained.keys()
    for key, value in trained.items():
        assert abs(steered[key] - value) < 1e-4, (key, steered[key], value)


def test_same_loglikelihoods_and_metrics_as_the_harness_hf_class_on_the_export(setting):
    """The checkpoint, and its `convert to-hf` export read by lm-eval's own HFLM: every request's
    log-likelihood within 1e-4, and the same metrics on all three kinds of task."""
    pytest.importorskip("accelerate")
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from tinytrain.eval.harness import TinyTrainLM
    from tinytrain.eval.tasks import rows, task_manager
    from tinytrain.store.checkpoint import load_checkpoint

    root, tasks = setting
    run_tinytrain("convert", "to-hf", root / "runs" / "trained", root / "hf", cwd=root)
    model, tok = load_checkpoint(root / "runs" / "trained")
    ours = TinyTrainLM(model, tok, batch_size=4)
    theirs = HFLM(pretrained=str(root / "hf"), backend="causal", device="cpu", batch_size=4, dtype="float32")
    requests = [(f"the {a} is", f" {c}") for a in ANIMALS[:6] for c in COLORS] + [("", "the cat is red .")]
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(requests)]
    a, b = ours.loglikelihood(instances), theirs.loglikelihood(instances)
    assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) < 1e-4 and [x[1] for x in a] == [y[1] for y in b]
    text = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=("the cat is red .\nthe dog is blue .",),
                     idx=0)]
    assert ours.loglikelihood_rolling(text)[0] == pytest.approx(theirs.loglikelihood_rolling(text)[0], abs=1e-4)
    manager = task_manager([str(tasks)])
    names = ["tt_choice", "tt_gen", "tt_text"]
    mine = {(r["task"], r["metric"]): r["value"] for r in rows(simple_evaluate(model=ours, tasks=names,
                                                                               task_manager=manager, bootstrap_iters=0))}
    hf = {(r["task"], r["metric"]): r["value"] for r in rows(simple_evaluate(model=theirs, tasks=names,
                                                                             task_manager=manager, bootstrap_iters=0))}
    assert mine.keys() == hf.keys() and len(mine) == 6
    for key in mine:
        assert mine[key] == pytest.approx(hf[key], rel=1e-4), key


def test_the_tinyllama_group_is_the_harness_suite():
    from tinytrain.eval.tasks import TINYLLAMA_SUITE, task_manager

    manager = task_manager()
    assert "tinyllama" in manager.all_groups
    import yaml

    group = yaml.safe_load((ROOT / "tinytrain" / "eval" / "groups" / "tinyllama.yaml").read_text())
    assert group["task"] == list(TINYLLAMA_SUITE)
    for task in group["task"]:  # the harness's own definitions, resolved without downloading their data
        entry = manager.task_index[task]
        assert entry.kind.name in ("TASK", "PY_TASK") and "lm_eval/tasks" in str(entry.yaml_path), task


def test_bad_requests_are_one_line(setting, tmp_path):
    root, tasks = setting
    checks = [
        (["--tasks", "tt_choise", "--include_path", tasks], "unknown task 'tt_choise' (did you mean tt_choice"),
        (["--tasks", "tt_choice", "--include_path", tasks, "--num_fewshot", "40"], "--num_fewshot 40 is more than"),
        (["--tasks", "tt_nodata", "--include_path", tmp_path / "tasks"], "is not available here"),
    ]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tt_nodata.yaml").write_text(
        "task: tt_nodata\ndataset_path: someone/not-downloaded\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\nmetadata:\n  version: 1.0\n")
    for i, (args, expected) in enumerate(checks):
        # the last reads the datasets library's offline switch, which it takes at import: a process of its own
        run = run_tinytrain if i == len(checks) - 1 else tinytrain_in_process
        proc = run("evaluate", root / "runs" / "trained", *args, cwd=root, check=False,
                   env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("tinytrain evaluate: error: ") and expected in line, line
    copy = tmp_path / "no-tokenizer"
    shutil.copytree(root / "runs" / "trained" / "checkpoints" / "last", copy)
    (copy / "tokenizer.model").unlink()
    proc = tinytrain_in_process("evaluate", copy, "--tasks", "tt_choice", "--include_path", tasks, cwd=root)
    assert "tokenizer.model is missing" in proc.stderr.strip().splitlines()[-1]
    proc = tinytrain_in_process("evaluate", copy, "--tasks", "tt_choice", "--adapt", "0.1", cwd=root)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "tinytrain evaluate: error: --adapt takes a learning rate > 0 and needs --text; got 0.1 without --text")
    for args, expected in ((["--adapt", "0.5", "--proxy_tuned", copy, "--proxy_base", copy], "does not combine with "
                            "--proxy_tuned"),
                           (["--adapt", "0.5", "--adapt_clip", "0"], "--adapt_clip must be > 0, got 0")):
        proc = tinytrain_in_process("evaluate", copy, "--text", __file__, *args, cwd=root)
        assert proc.returncode == 2 and expected in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


def test_bits_per_byte_of_text_files(setting, tmp_path):
    root, _ = setting
    held = tmp_path / "held.txt"
    held.write_text("\n".join(f"the {a} is {COLOR_OF[a]} ." for a in ANIMALS) + "\n")
    out = tmp_path / "bpb.json"
    tinytrain_in_process("evaluate", root / "runs" / "trained", "--text", held, "--out", out, cwd=root, check=True)
    trained = json.loads(out.read_text())["text"]
    tinytrain_in_process("evaluate", root / "runs" / "random", "--text", held, "--out", out, cwd=root, check=True)
    untrained = json.loads(out.read_text())["text"]
    assert trained["bytes"] == len(held.read_bytes())
    assert trained["bits_per_byte"] == pytest.approx(
        trained["nats_per_token"] * trained["tokens"] / trained["bytes"] / math.log(2))
    assert trained["bits_per_byte"] < 0.5 * untrained["bits_per_byte"]
    # --adapt: the static score, then the score adapting as it reads: the untrained model learns the
    # held-out lines as they repeat
    held.write_text(held.read_text() * 4)
    proc = tinytrain_in_process("evaluate", root / "runs" / "random", "--text", held, "--adapt", "0.5", "--out", out,
                                cwd=root, check=True)
    adapted = json.loads(out.read_text())["text"]
    assert adapted["adaptive"]["tokens"] == adapted["tokens"] and adapted["adaptive"]["adapt_lr"] == 0.5
    assert adapted["adaptive"]["bits_per_byte"] < 0.8 * adapted["bits_per_byte"]
    assert "adapting as it reads (SGD, lr 0.5, clip 1.0)" in proc.stdout + proc.stderr


def test_validation_logs_bits_per_byte_of_exactly_the_bytes_it_scored(setting):
    """val/bpb = the validation loss over the UTF-8 bytes its target tokens stand for; the prepared
    folder records the bytes of each split's text."""
    from tinytrain.data.corpus import cached_prepare_path
    from tinytrain.data.datamodule import TokenData
    from tinytrain.data.prep import is_validation
    from tinytrain.data.tokenizer import Tokenizer, byte_lengths

    root, _ = setting
    rows = metric_rows(root / "runs" / "trained")
    val, bpb = dict(series(rows, "val/loss")), dict(series(rows, "val/bpb"))
    assert set(val) == set(bpb) and bpb
    folder = cached_prepare_path(root / "facts", root / "cache", 512, 0.1)
    dm = TokenData(path=str(folder), vocab_size=512, seq_len=64, global_batch_size=16, micro_batch_size=8,
                   val_batches=4)
    dm.open()
    table = byte_lengths(Tokenizer(folder / "tokenizer.model"))
    targets = torch.cat([b[:, 1:].long().flatten() for b in dm.val_dataloader()])
    step = max(val)
    assert bpb[step] == pytest.approx(val[step] * targets.numel() / int(table[targets].sum()) / math.log(2), rel=1e-4)
    manifest = json.loads((folder / "manifest.json").read_text())
    held = [p for p in sorted((root / "facts").iterdir()) if is_validation(p.name, 0.1)]
    assert manifest["bytes"]["val"] == sum(len(p.read_bytes()) for p in held) and manifest["bytes"]["train"] > 0


@pytest.mark.slow
def test_in_loop_evaluation_under_fsdp2_logs_and_leaves_training_alone(setting, tmp_path):
    """2 processes with FSDP2: every rank runs its share of the requests; the metrics are logged at
    steps 10 and 20; the weights at the end equal those of the same run without evaluation."""
    from tinytrain.store.checkpoint import load_model_weights

    root, tasks = setting
    args = ["fit", "--config", RECIPES / "ci.yaml", "--data.corpus", root / "facts", "--data.val_fraction", "0.1",
            "--trainer.strategy", "fsdp2", "--trainer.devices", "2", "--trainer.max_steps", "20",
            "--model.init_from", root / "runs" / "random"]
    (tmp_path / "with").mkdir()
    (tmp_path / "without").mkdir()
    env = {"TINYTRAIN_CACHE": str(root / "cache")}
    run_tinytrain(*args, "--eval.tasks", "[tt_choice, tt_gen, tt_text]", "--eval.include_path", f"[{tasks}]",
                  "--eval.every_n_steps", "10", "--eval.limit", "6", cwd=tmp_path / "with", env=env)
    run_tinytrain(*args, cwd=tmp_path / "without", env=env)
    rows = metric_rows(tmp_path / "with" / "runs" / "ci")
    for key in ("eval/tt_choice/acc", "eval/tt_gen/exact_match", "eval/tt_text/bits_per_byte", "eval/seconds"):
        assert [s for s, _ in series(rows, key)] == [10, 20], key
    a = load_model_weights(tmp_path / "with" / "runs" / "ci" / "checkpoints" / "last")
    b = load_model_weights(tmp_path / "without" / "runs" / "ci" / "checkpoints" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_compiled_blocks_survive_validation_and_in_loop_evaluation_under_fsdp2(setting, tmp_path):
    """Compiled blocks (fullgraph) with every switch that adds graphs: validation, the harness's
    scoring and generation (KV caches, size-1 batches) run eager, so nothing hits torch's
    recompile limit, and training after them reuses its graph (no recompilation at all)."""
    root, tasks = setting
    proc = run_tinytrain(
        "fit", "--config", RECIPES / "ci.yaml", "--data.corpus", root / "facts", "--data.val_fraction", "0.1",
        "--trainer.strategy", "fsdp2", "--trainer.devices", "2", "--trainer.precision", "bf16-mixed",
        "--trainer.max_steps", "12", "--trainer.val_check_interval", "4",
        "--model.compile", "true", "--model.compile_loss", "true", "--model.document_masking", "true",
        "--model.activation_checkpointing", "true", "--model.config.logit_scaling_window", "32",
        "--eval.tasks", "[tt_choice, tt_gen]", "--eval.include_path", f"[{tasks}]", "--eval.every_n_steps", "4",
        "--eval.limit", "3", cwd=tmp_path, env={"TINYTRAIN_CACHE": str(root / "cache"), "TORCH_LOGS": "recompiles"})
    rows = metric_rows(tmp_path / "runs" / "ci")
    assert [s for s, _ in series(rows, "eval/tt_choice/acc")] == [4, 8, 12]
    assert len(series(rows, "val/loss")) == 3
    recompiles = [line for line in proc.stderr.splitlines() if "recompiles" in line.lower()]
    assert not recompiles, "\n".join(recompiles[:12])
