"""`tinytrain evaluate`: downstream tasks, bits per byte and passkey retrieval of a checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tinytrain.eval.tasks import (
    adaptive_bits_per_byte,
    bits_per_byte,
    format_table,
    read_texts,
    resolve_tasks,
    rows,
    run_tasks,
    task_manager,
    tinyllama_average,
)

HARNESS_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def main(argv: list[str]) -> None:
    from tinytrain.commands.generate import add_proxy_arguments, check_proxy_arguments
    from tinytrain.errors import argument_parser

    parser = argument_parser(prog="tinytrain evaluate", description="Downstream tasks (lm-evaluation-harness) and "
                             "bits per byte of a checkpoint or a Hugging Face Llama folder.")
    parser.add_argument("checkpoint", help="a run folder, its 'last', a step folder, or a HF Llama folder")
    parser.add_argument("--tasks", default=None, help="comma-separated task or group names, e.g. tinyllama,arc_easy")
    parser.add_argument("--num_fewshot", type=int, default=None, help="examples in each prompt (default: the task's)")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction of them)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--include_path", action="append", default=[], help="a folder of your own task YAMLs")
    parser.add_argument("--text", nargs="+", default=None, help="text files: bits per byte of each, one document each")
    parser.add_argument("--stride", type=int, default=None,
                        help="--text is scored in a sliding window of the model's context moving on by this many "
                             "tokens (default: a quarter of the window; the window itself: disjoint windows)")
    parser.add_argument("--adapt", type=float, default=None, metavar="LR",
                        help="also score --text with dynamic evaluation: after each window is scored, one SGD step "
                             "of this learning rate on what it scored (the texts read in order; e.g. 0.5 with "
                             "--stride 32 for the tiny recipe's model)")
    parser.add_argument("--adapt_clip", type=float, default=1.0, metavar="NORM",
                        help="--adapt's gradient-norm clip (default 1.0)")
    parser.add_argument("--passkey", default=None, help="prompt lengths for passkey retrieval, e.g. 2048,4096,8192")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="where the passkey sits in the filler (0 to 1)")
    parser.add_argument("--trials", type=int, default=5, help="passkeys per length and depth")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here (lm-eval's own 'results', "
                        "'versions' and 'n-shot' beside tinytrain's 'rows')")
    add_proxy_arguments(parser)
    args = parser.parse_args(argv)
    check_proxy_arguments(parser, args)
    if not args.tasks and not args.text and not args.passkey:
        parser.error("give --tasks, --text or --passkey (or several)")
    try:
        lengths = [int(n) for n in args.passkey.split(",")] if args.passkey else []
        depths = [float(d) for d in args.depths.split(",")]
    except ValueError:
        parser.error(f"--passkey takes integers and --depths numbers, comma-separated; got {args.passkey!r}, "
                     f"{args.depths!r}")
    if any(n < 1 for n in lengths) or any(not 0 <= d <= 1 for d in depths) or args.trials < 1:
        parser.error("--passkey lengths must be >= 1, --depths in [0, 1], --trials >= 1")
    for name, value, low in (("--num_fewshot", args.num_fewshot, 0), ("--batch_size", args.batch_size, 1),
                             ("--stride", args.stride, 1)):
        if value is not None and value < low:
            parser.error(f"{name} must be >= {low}, got {value}")
    if args.adapt is not None and (not args.text or not args.adapt > 0):
        parser.error(f"--adapt takes a learning rate > 0 and needs --text; got {args.adapt} "
                     f"{'with' if args.text else 'without'} --text")
    if args.adapt is not None and args.proxy_tuned:
        parser.error("--adapt trains one model as it reads; it does not combine with --proxy_tuned")
    if not args.adapt_clip > 0:
        parser.error(f"--adapt_clip must be > 0, got {args.adapt_clip}")
    if args.limit is not None and not args.limit > 0:
        parser.error(f"--limit must be > 0, got {args.limit}")

    from tinytrain.store.checkpoint import load_checkpoint, load_pretrained, load_proxy_tuned

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    texts = read_texts(args.text or [])  # before any model is loaded: a bad file fails at once
    # The checkpoint's files before the harness's task index (seconds to build): a wrong folder fails at once.
    source = load_pretrained(args.checkpoint, need_tokenizer=True)
    if args.stride is not None and args.stride > source.config.max_position_embeddings:
        parser.error(f"--stride {args.stride} is longer than the model's context window "
                     f"({source.config.max_position_embeddings} tokens)")
    manager = task_manager(args.include_path) if tasks else None
    if tasks:
        resolve_tasks(tasks, manager)
    if args.proxy_tuned:
        model, tok = load_proxy_tuned(args.checkpoint, args.proxy_tuned, args.proxy_base, args.proxy_alpha, args.device)
    else:
        model, tok = load_checkpoint(args.checkpoint, device=args.device)
    meta = source.meta()
    report = {"checkpoint": str(source.folder), "kind": source.kind, "step": meta.get("step"), "tokens": meta.get("tokens"),
              "parameters": source.config.num_params()}
    if args.proxy_tuned:
        report["proxy"] = {"tuned": args.proxy_tuned, "base": args.proxy_base, "alpha": args.proxy_alpha}
    if args.text:
        report["text"] = {"files": args.text, **bits_per_byte(model, tok, texts, args.batch_size, args.stride)}
        t = report["text"]
        print(f"{t['documents']} documents, {t['bytes']:,} bytes, {t['tokens']:,} tokens: "
              f"{t['bits_per_byte']:.4f} bits per byte, {t['nats_per_token']:.4f} nats per token "
              f"(sliding window, stride {t['stride']})")
        if args.adapt is not None:
            started = time.perf_counter()
            t["adaptive"] = adaptive_bits_per_byte(model, tok, texts, args.adapt, args.stride,
                                                   args.adapt_clip)
            t["adaptive"]["seconds"] = round(time.perf_counter() - started, 1)
            print(f"adapting as it reads (SGD, lr {args.adapt}, clip {args.adapt_clip}): "
                  f"{t['adaptive']['bits_per_byte']:.4f} bits per byte, {t['adaptive']['nats_per_token']:.4f} nats "
                  "per token")
    if lengths:
        from tinytrain.eval.passkey import passkey_accuracy

        report["passkey"] = passkey_accuracy(model, tok, lengths, depths, args.trials)
        print("passkey retrieval: " + ", ".join(f"{n} tokens {a:.0%}" for n, a in report["passkey"]["accuracy"].items()))
    if tasks:
        from tinytrain.eval.harness import TinyTrainLM

        started = time.perf_counter()
        results = run_tasks(TinyTrainLM(model, tok, args.batch_size), tasks, manager, args.num_fewshot, args.limit)
        table = rows(results)
        # lm-eval's core outputs under its own keys (tools that read the harness's JSON read ours); "rows"
        # flattens "results" to one row per task and metric.
        report.update(tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit, seconds=round(time.perf_counter() -
                      started, 1), rows=table, tinyllama_average=tinyllama_average(table))
        report.update({key: results[key] for key in HARNESS_KEYS if key in results})
        print(format_table(table))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(out)
