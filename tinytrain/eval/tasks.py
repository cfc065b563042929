"""How good a model is: downstream tasks through EleutherAI's lm-evaluation-harness (`lm-eval`,
the optional extra `eval`) on tinytrain's own model, and bits per byte of any text.

    tinytrain evaluate runs/tiny --tasks tinyllama --limit 200
    tinytrain evaluate runs/tiny --tasks my_task --include_path my_tasks/ --out results.json
    tinytrain evaluate runs/tiny --text held_out/*.py

CHECKPOINT is anything `generate` takes: a run folder, its `last`, a step folder (sharded or not),
a converted folder or a Hugging Face Llama folder. The named group `tinyllama` is TinyLlama's
commonsense suite, each task with the metric the paper reports (TINYLLAMA_SUITE).
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
from pathlib import Path
from typing import Optional

import torch

from tinytrain.data.tokenizer import Tokenizer
from tinytrain.errors import TinyTrainError
from tinytrain.model.llama import Llama

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "groups"  # tinytrain's own task groups
# TinyLlama's commonsense suite and the metric its paper reports for each (acc_norm where the harness has it).
TINYLLAMA_SUITE = {"hellaswag": "acc_norm", "openbookqa": "acc_norm", "winogrande": "acc", "arc_challenge": "acc_norm",
                   "arc_easy": "acc_norm", "boolq": "acc", "piqa": "acc_norm"}


class EvalError(TinyTrainError, ValueError):
    """A task that cannot be run as asked: unknown, its data not available, too few examples."""


def task_manager(include_path: Optional[list[str]] = None):
    """The harness's tasks, tinytrain's groups, and the user's own (``include_path`` folders of YAML)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvalError("evaluation needs EleutherAI's lm-evaluation-harness: pip install 'tinytrain[eval]'") from e
    for folder in include_path or []:
        if not Path(folder).is_dir():
            raise EvalError(f"--include_path {folder}: not a folder of task YAML files")
    return TaskManager(include_path=[str(TASKS_DIR), *(include_path or [])])


def resolve_tasks(names: list[str], manager) -> list[str]:
    """The names, checked: an unknown one is an error that suggests the closest known names."""
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        raise EvalError("unknown task " + "; ".join(
            f"{n!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for n, h in hints.items()))
    return names


def run_tasks(lm, tasks: list[str], manager, num_fewshot: Optional[int] = None, limit: Optional[float] = None) -> Optional[dict]:
    """lm-eval's results for ``tasks`` (on rank 0; None on the other ranks of a sharded model)."""
    from lm_eval import simple_evaluate

    try:
        return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                               log_samples=False, bootstrap_iters=0, verbosity="WARNING")
    except ValueError as e:
        if "larger than population" in str(e) or "Sample larger" in str(e):
            raise EvalError(f"--num_fewshot {num_fewshot} is more than the examples a task of {', '.join(tasks)} "
                            "has to draw from; lower --num_fewshot") from e
        raise
    except Exception as e:
        if _missing_data(e):
            raise EvalError(f"a dataset of {', '.join(tasks)} is not available here ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]}); download it first (e.g. on a machine online: "
                            "`python -c \"import datasets; datasets.load_dataset('NAME')\"`) and set "
                            "HF_DATASETS_OFFLINE=1, or point a task's dataset_path at local files") from e
        raise


def _missing_data(e: BaseException) -> bool:
    names = {type(x).__name__ for x in (e, e.__cause__, e.__context__) if x is not None}
    text = str(e).lower()
    return bool(names & {"ConnectionError", "DatasetNotFoundError", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
                         "HfHubHTTPError", "FileNotFoundError"}) or "offline" in text or "couldn't reach" in text


def rows(results: dict) -> list[dict]:
    """One row per task and metric: value, standard error, shots, version."""
    out = []
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in sorted(metrics.items()):
            if "," not in key or key.startswith("alias") or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            out.append({"task": task, "metric": metric, "filter": filt, "value": value,
                        "stderr": metrics.get(f"{metric}_stderr,{filt}"),
                        "shots": results.get("n-shot", {}).get(task), "version": results.get("versions", {}).get(task)})
    return out


def tinyllama_average(table: list[dict]) -> Optional[float]:
    """The mean over TinyLlama's suite of each task's paper metric, when every task ran."""
    picked = {r["task"]: r["value"] for r in table if TINYLLAMA_SUITE.get(r["task"]) == r["metric"]}
    return sum(picked.values()) / len(picked) if len(picked) == len(TINYLLAMA_SUITE) else None


def format_table(table: list[dict]) -> str:
    lines = [f"{'task':<24} {'metric':<16} {'value':>8} {'stderr':>8} {'shots':>5}"]
    for r in table:
        stderr = f"{r['stderr']:.4f}" if isinstance(r["stderr"], (int, float)) else "-"
        lines.append(f"{r['task']:<24} {r['metric']:<16} {r['value']:>8.4f} {stderr:>8} {str(r['shots']):>5}")
    average = tinyllama_average(table)
    if average is not None:
        lines.append(f"{'tinyllama (average)':<24} {'paper metrics':<16} {average:>8.4f}")
    return "\n".join(lines)


def read_texts(names: list[str]) -> list[str]:
    """The texts of ``--text`` files; one that cannot be read, or holds nothing to score, is an error."""
    texts = []
    for name in names:
        try:
            texts.append(Path(name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise EvalError(f"--text {name}: cannot be read as UTF-8 text ({e})") from e
        if not texts[-1]:
            raise EvalError(f"--text {name}: the file is empty; bits per byte needs at least one byte of text")
    return texts


def scoring_windows(n: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """How a document of ``n`` token ids is scored with a context of ``length`` tokens: windows
    ``(start, end, first)`` whose inputs are ids[start:end] and which score the targets ids[first:end + 1]
    (``first`` > start). Every target 1 .. n - 1 is scored exactly once. The first window scores all of
    its targets; each next one moves on by ``stride`` targets and scores only those, so each is predicted
    from at least ``length - stride`` tokens before it (all of them within the first window).
    ``stride == length`` gives disjoint windows (but the last, which reaches back a whole window),
    where a window's first target sees no context."""
    if not 0 < stride <= length:
        raise EvalError(f"the scoring stride must be in [1, {length}] (the context window), got {stride}")
    windows, scored = [], 0  # targets 1 .. scored are done
    while scored < n - 1:
        last = min(n - 1, length if scored == 0 else scored + stride)  # the last target of this window
        start = max(0, last - length)
        windows.append((start, last, scored + 1))
        scored = last
    return windows


def _scored_windows(tokenizer: Tokenizer, texts: list[str], length: int, stride: int) -> list[tuple[list[int], int]]:
    """Every window of every text in reading order: (ids of the window, its inputs and one more; index of
    its first scored target within the window's targets)."""
    rows = []
    for text in texts:
        ids = tokenizer.encode(text, bos=True)
        rows += [(ids[start:end + 1], first - start - 1) for start, end, first in scoring_windows(len(ids), length,
                                                                                                 stride)]
    return rows


def _score(nll: float, tokens: int, texts: list[str], stride: int) -> dict:
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"documents": len(texts), "tokens": tokens, "bytes": nbytes, "stride": stride,
            "nats_per_token": nll / max(tokens, 1), "bits_per_byte": nll / math.log(2) / max(nbytes, 1)}


@torch.no_grad()
def bits_per_byte(model: Llama, tokenizer: Tokenizer, texts: list[str], batch: int = 8,
                  stride: Optional[int] = None) -> dict:
    """Negative log-likelihood of every token of each text (one document each, BOS in front), each
    token predicted once with as much of what precedes it as a sliding window of the model's context
    holds (see scoring_windows; ``stride`` defaults to a quarter of the window, so every token has at
    least three quarters of a window before it), and the same in bits per UTF-8 byte of the texts."""
    device = next(model.parameters()).device
    length = model.config.max_position_embeddings
    stride = stride or max(1, length // 4)
    rows = _scored_windows(tokenizer, texts, length, stride)
    nll, tokens = 0.0, 0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        width = max(len(w) for w, _ in chunk)
        idx = torch.full((len(chunk), width), tokenizer.eos_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width - 1), dtype=torch.bool)
        for row, m, (w, skip) in zip(idx, mask, chunk):
            row[:len(w)] = torch.tensor(w)
            m[skip:len(w) - 1] = True
        idx, mask = idx.to(device), mask.to(device)
        logits = model(idx[:, :-1]).float()
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten(), reduction="none")
        nll += float(losses[mask.flatten()].sum())
        tokens += int(mask.sum())
    return _score(nll, tokens, texts, stride)


def adaptive_bits_per_byte(model: Llama, tokenizer: Tokenizer, texts: list[str], lr: float,
                           stride: Optional[int] = None, clip: float = 1.0) -> dict:
    """Bits per byte with dynamic evaluation (Krause et al., 2018): the texts are read in order as one
    stream, window by window as in bits_per_byte, and once a window's new targets are scored the model
    takes one SGD step (learning rate ``lr``; the gradient's norm clipped to ``clip``, which keeps a
    large rate from diverging on a surprising window) on their mean loss. Every token is thus predicted
    by a model that has learnt from all the text before it, never from the token itself: the neural
    counterpart of a compressor's adaptive model, which a decoder can replay. A copy of the model
    adapts, in fp32; the model given is left as it was. One window at a time, a forward and a backward
    each."""
    if not lr > 0:
        raise EvalError(f"the adaptation learning rate must be > 0, got {lr}")
    length = model.config.max_position_embeddings
    stride = stride or max(1, length // 4)
    adapting = copy.deepcopy(model).float().eval()  # eval: no dropout; gradients still flow
    params = [p.requires_grad_(True) for p in adapting.parameters()]
    device = params[0].device
    sgd = torch.optim.SGD(params, lr=lr)
    per_document, tokens = [], 0
    for text in texts:
        per_document.append(0.0)
        for window, skip in _scored_windows(tokenizer, [text], length, stride):
            ids = torch.tensor([window], device=device)
            losses = torch.nn.functional.cross_entropy(adapting(ids[:, :-1])[0].float(), ids[0, 1:], reduction="none")
            scored = losses[skip:]
            per_document[-1] += float(scored.detach().sum())
            tokens += scored.numel()
            sgd.zero_grad(set_to_none=True)
            scored.mean().backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            sgd.step()
    return {**_score(sum(per_document), tokens, texts, stride), "adapt_lr": lr, "adapt_clip": clip,
            "nats_per_document": per_document}


