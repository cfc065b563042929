"""Evaluation throughput: tinytrain's lm-eval model class against the harness's own Hugging Face
class (HFLM), on the same weights and the same requests, in one process, alternating rounds.

A Hugging Face Llama folder of the given preset (random weights, a sentencepiece tokenizer trained
on this Python's standard library) is read by both; the requests are multiple-choice style
log-likelihoods (a context of standard-library source and four continuations each) and rolling
log-likelihoods of whole files. Writes requests/s of each, medians over rounds, and the ratio.

    python -m benchmarks.eval_speed --preset tiny --out benchmarks/results/eval_speed-cpu2.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import HF_LLAMA, command, machine, write_result
from tinytrain.data.corpus import list_corpus_files, read_documents, stdlib_dir
from tinytrain.data.tokenizer import train_tokenizer
from tinytrain.model.llama import Llama, LlamaConfig
from tinytrain.store import hf


def make_folder(folder: Path, config: LlamaConfig, docs: list[str]) -> None:
    """A Hugging Face Llama folder with random weights and a tokenizer trained on ``docs``."""
    torch.manual_seed(0)
    model = Llama(config)
    shapes = {hf.to_hf_name(k): v for k, v in config.parameter_shapes().items()}
    folder.mkdir(parents=True)
    state = model.state_dict()
    hf.write_safetensors(folder / hf.WEIGHTS, ((n, state[hf.from_hf_name(n)]) for n in shapes), shapes, torch.float32)
    (folder / "config.json").write_text(json.dumps(hf.config_to_hf(config, torch.float32)))
    lines = (line for text in docs for line in text.split("\n") if line.strip())
    tok = train_tokenizer(lines, folder.parent / "tokenizer.model", config.vocab_size, sample_lines=100_000)
    hf.write_tokenizer_files(folder, tok.path, config.max_position_embeddings)


def requests(docs: list[str], n: int, seed: int = 0):
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    choice, rolling = [], []
    for i in range(n):
        text = rng.choice(docs)
        cut = rng.randint(200, max(201, min(len(text), 1200) - 80))
        context = text[max(0, cut - 400):cut].lstrip()
        for j in range(4):
            start = rng.randint(0, max(0, len(text) - 60))
            choice.append(Instance("loglikelihood", {}, (context, text[start:start + rng.randint(10, 60)]), 4 * i + j))
    for i in range(max(1, n // 8)):
        rolling.append(Instance("loglikelihood_rolling", {}, (rng.choice(docs)[:3000],), i))
    return choice, rolling


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--questions", type=int, default=48, help="multiple-choice questions (4 requests each)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/eval_speed.json")
    args = parser.parse_args(argv)

    from lm_eval.models.huggingface import HFLM

    from tinytrain.eval.harness import TinyTrainLM
    from tinytrain.store.checkpoint import load_checkpoint

    config = LlamaConfig.from_name(args.preset, **HF_LLAMA)
    docs = [text for _, text in read_documents(list_corpus_files(stdlib_dir()))]
    choice, rolling = requests(docs, args.questions)
    times: dict[str, dict[str, list[float]]] = {"tinytrain": {"loglikelihood": [], "rolling": []},
                                                 "hf": {"loglikelihood": [], "rolling": []}}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        make_folder(folder, config, docs)
        model, tok = load_checkpoint(folder)
        contestants = {"tinytrain": TinyTrainLM(model, tok, batch_size=args.batch_size),
                       "hf": HFLM(pretrained=str(folder), backend="causal", device="cpu", batch_size=args.batch_size,
                                  dtype="float32")}
        for r in range(args.rounds):
            for name in (["tinytrain", "hf"] if r % 2 == 0 else ["hf", "tinytrain"]):  # alternate who goes first
                lm = contestants[name]
                start = time.perf_counter()
                scores = lm.loglikelihood(choice, disable_tqdm=True)
                times[name]["loglikelihood"].append(time.perf_counter() - start)
                start = time.perf_counter()
                lm.loglikelihood_rolling(rolling, disable_tqdm=True)
                times[name]["rolling"].append(time.perf_counter() - start)
                results[name] = [s[0] for s in scores]
    per_s = {name: {kind: (len(choice) if kind == "loglikelihood" else len(rolling)) / statistics.median(t)
                    for kind, t in kinds.items()} for name, kinds in times.items()}
    diff = max(abs(a - b) for a, b in zip(results["tinytrain"], results["hf"]))
    result = {
        "benchmark": "eval_speed", "preset": args.preset, "batch_size": args.batch_size, "rounds": args.rounds,
        "requests": {"loglikelihood": len(choice), "rolling": len(rolling)},
        "requests_per_s": per_s,
        "ratio_tinytrain_over_hf": {kind: per_s["tinytrain"][kind] / per_s["hf"][kind] for kind in per_s["hf"]},
        "seconds_by_round": times, "max_abs_loglikelihood_difference": diff,
        "command": command("eval_speed", argv), "machine": machine(),
    }
    write_result(result, args.out)
    print(json.dumps({k: result[k] for k in ("requests_per_s", "ratio_tinytrain_over_hf",
                                             "max_abs_loglikelihood_difference")}, indent=2))
    return result


if __name__ == "__main__":
    main()
