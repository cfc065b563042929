"""The `tinytrain` command.

    tinytrain fit --config recipes/tiny.yaml [--trainer.max_steps 50 ...]   train (LightningCLI)
    tinytrain validate --config recipes/tiny.yaml                          validation loss only
    tinytrain prepare --config data_prep/SPEC.yaml                         corpora to shards (see data_prep/)
    tinytrain generate CHECKPOINT --prompt TEXT                            sample text
    tinytrain convert from-hf HF_DIR OUT | to-hf CHECKPOINT OUT           Hugging Face Llama folders
    tinytrain consolidate CHECKPOINT OUT.pt                                one plain weights file
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

log = logging.getLogger("tinytrain")

USAGE = """usage: tinytrain {fit,validate,prepare,generate,convert,consolidate,average,plan,evaluate,plot} ...

  fit        train a recipe:      tinytrain fit --config recipes/tiny.yaml [--section.key value ...]
  validate   validation loss:     tinytrain validate --config recipes/tiny.yaml --ckpt_path CKPT
  prepare    corpora to shards:   tinytrain prepare --config data_prep/SPEC.yaml | --verify DIR | tokenizer ...
  generate   sample from a model: tinytrain generate CHECKPOINT --prompt TEXT
  convert    Hugging Face Llama:  tinytrain convert from-hf HF_DIR OUT | to-hf CHECKPOINT OUT
  consolidate  sharded or not, to one weights file: tinytrain consolidate CHECKPOINT OUT.pt
  average    weight averaging:    tinytrain average CKPT CKPT ... OUT [--mode exponential --decay 0.5] | --ema CKPT OUT
  plan       memory per GPU:      tinytrain plan --config RECIPE [--world_size N] [--gpu_memory_gib 80]
  evaluate   downstream tasks:    tinytrain evaluate CHECKPOINT --tasks tinyllama,arc_easy [--limit N] | --text FILES
  plot       curves of runs:      tinytrain plot RUN [RUN ...] [--out FILE.png]

`tinytrain fit --help` lists every recipe key; `--print_config` shows the resolved recipe.
"""


def _setup_logging() -> None:
    from tinytrain.logs import setup_logging

    setup_logging()


PREPARE_USAGE = """usage:
  tinytrain prepare --config data_prep/SPEC.yaml [--workers N] [--out DIR] [--key value ...]
  tinytrain prepare --config data_prep/SPEC.yaml --num_tasks N --task_index I   one share (a SLURM array task)
  tinytrain prepare --config data_prep/SPEC.yaml --finalize                    write the manifests of a shared run
  tinytrain prepare --verify DIR
  tinytrain prepare tokenizer --config data_prep/SPEC.yaml --out T.model [--vocab_size 32000]
  tinytrain prepare --corpus DIR --out DIR [--tokenizer T.model] [--vocab_size N] [--val_fraction F]

  --config   a spec of sources (jsonl/jsonl.zst/parquet/txt folders or hub datasets) -> one folder each
  --verify   re-check a prepared folder (or a spec's out folder): checksums, token ids, tokenizer
  tokenizer  train a sentencepiece BPE tokenizer on a sample of a spec's sources
  --corpus   a folder of text files, each one document (trains a tokenizer unless one is given)
"""


def prepare_main(argv: list[str]) -> None:
    if argv and argv[0] == "tokenizer":
        return prepare_tokenizer_main(argv[1:])
    if "--verify" in argv:
        return prepare_verify_main(argv)
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return prepare_spec_main(argv)
    if any(a == "--corpus" or a.startswith("--corpus=") for a in argv):
        return prepare_corpus_main(argv)
    print(PREPARE_USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    if argv and argv[0] not in ("-h", "--help"):
        raise SystemExit(2)


def parse_spec(argv: list[str], prog: str = "tinytrain prepare", description: str = ""):
    """A PrepSpec from --config files and --key value overrides (jsonargparse, as for `fit`)."""
    import dataclasses

    from jsonargparse import ActionConfigFile, ArgumentParser

    from tinytrain.prep import PrepSpec

    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML spec (see data_prep/)")
    parser.add_class_arguments(PrepSpec, None, as_group=False)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    done = instantiate(parser.parse_args(argv))
    return PrepSpec(**{f.name: done[f.name] for f in dataclasses.fields(PrepSpec)})


def prepare_spec_main(argv: list[str]) -> None:
    from tinytrain.errors import argument_parser
    from tinytrain.prep import Share, prepare

    tasks = argument_parser(prog="tinytrain prepare", add_help=False)
    env = os.environ
    tasks.add_argument("--num_tasks", type=int, default=int(env.get("SLURM_ARRAY_TASK_COUNT", 1)))
    tasks.add_argument("--task_index", type=int, default=None)
    tasks.add_argument("--finalize", action="store_true")
    args, rest = tasks.parse_known_args(argv)
    if args.task_index is None:  # a SLURM array task counts from the array's first index
        args.task_index = int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    share = Share(args.task_index, args.num_tasks, args.finalize)
    spec = parse_spec(rest, description="Tokenize a spec's sources into one prepared folder each.")
    for folder in prepare(spec, show_progress=sys.stderr.isatty() or bool(os.environ.get("TINYTRAIN_PROGRESS")),
                          share=share):
        print(folder)


def prepare_verify_main(argv: list[str]) -> None:
    from tinytrain.errors import argument_parser

    from tinytrain.prep import prepared_folders, verify_folder

    parser = argument_parser(prog="tinytrain prepare --verify")
    parser.add_argument("--verify", required=True, help="a prepared folder, or a folder of them")
    args = parser.parse_args(argv)
    for folder in prepared_folders(Path(args.verify)):
        print(verify_folder(folder))


def prepare_tokenizer_main(argv: list[str]) -> None:
    from tinytrain.errors import argument_parser

    from tinytrain.prep import train_spec_tokenizer

    pre = argument_parser(prog="tinytrain prepare tokenizer", description=(
        "Train a sentencepiece BPE tokenizer (byte fallback, unk=0 bos=1 eos=2) on a sample of a spec's sources."))
    pre.add_argument("--config", required=True, help="the spec whose sources to sample")
    pre.add_argument("--out", required=True, help="the .model file to write (must not exist)")
    pre.add_argument("--vocab_size", type=int, default=32000)
    pre.add_argument("--documents", type=int, default=200_000, help="documents to sample, spread over all files")
    pre.add_argument("--max_lines", type=int, default=2_000_000, help="lines sentencepiece trains on at most")
    args, rest = pre.parse_known_args(argv)
    out = Path(args.out)
    if out.exists():
        pre.error(f"--out {out} already exists; choose a new file")
    # out and tokenizer of the spec are those of the preparation, not needed here.
    spec = parse_spec(["--config", args.config, "--out", "-", "--tokenizer", "-", *rest], "tinytrain prepare tokenizer")
    tok = train_spec_tokenizer(spec, out, args.vocab_size, args.documents, args.max_lines)
    print(f"{out}: {tok.vocab_size} pieces, sha256 {tok.sha256}")


def prepare_corpus_main(argv: list[str]) -> None:
    from tinytrain.errors import argument_parser

    from tinytrain.corpus import prepare_text_folder

    parser = argument_parser(
        prog="tinytrain prepare",
        description="Tokenize a folder of text files (.py .txt .md .rst) into shards + manifest for `fit --data.path`.")
    parser.add_argument("--corpus", required=True, help="folder of text files; each file is one document")
    parser.add_argument("--out", required=True, help="the prepared folder to create (must not exist)")
    parser.add_argument("--tokenizer", help="a sentencepiece .model to use (e.g. Llama-2's); default: train one")
    parser.add_argument("--vocab_size", type=int, default=32000,
                        help="pieces of the trained tokenizer, or the model's vocab size with --tokenizer")
    parser.add_argument("--val_fraction", type=float, default=0.02, help="share of documents held out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} already exists; choose a new folder (prepared folders are never overwritten)")
    prepare_text_folder(Path(args.corpus), out, args.vocab_size,
                        tokenizer=Path(args.tokenizer) if args.tokenizer else None, val_fraction=args.val_fraction)
    print(out)


def generate_main(argv: list[str]) -> None:
    from tinytrain.errors import argument_parser

    parser = argument_parser(prog="tinytrain generate", description="Continue a prompt with a trained model.")
    parser.add_argument("checkpoint", help="a checkpoint folder, its 'last' link, a run folder, or a HF Llama folder")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from BOS alone)")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top_k", type=int, default=50, help="0 disables top-k filtering")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for bad, message in ((args.max_new_tokens < 1, f"--max_new_tokens must be >= 1, got {args.max_new_tokens}"),
                         (args.temperature < 0, f"--temperature must be >= 0 (0 is greedy), got {args.temperature}"),
                         (args.top_k < 0, f"--top_k must be >= 0 (0 disables it), got {args.top_k}"),
                         (not 0 < args.top_p <= 1, f"--top_p must be in (0, 1], got {args.top_p}")):
        if bad:
            parser.error(message)

    import torch  # after the arguments: `generate --help` and its errors need no torch

    from tinytrain.generate import generate, load_checkpoint

    model, tok = load_checkpoint(args.checkpoint, device=args.device)
    prompt = torch.tensor([tok.encode(args.prompt, bos=True)], device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.top_p,
                   eos_id=tok.eos_id, generator=gen, vocab=tok.vocab_size)
    print(tok.decode(out[0].tolist()))


def convert_main(argv: list[str]) -> None:
    from tinytrain.errors import argument_parser

    from tinytrain import hf

    parser = argument_parser(prog="tinytrain convert",
                                     description="Convert between Hugging Face Llama folders and tinytrain checkpoints.")
    sub = parser.add_subparsers(dest="direction", required=True)
    p_from = sub.add_parser("from-hf", help="HF LlamaForCausalLM folder -> tinytrain checkpoint folder")
    p_from.add_argument("hf_dir")
    p_from.add_argument("out")
    p_to = sub.add_parser("to-hf", help="tinytrain checkpoint (sharded or not) -> HF LlamaForCausalLM folder")
    p_to.add_argument("checkpoint", help="a checkpoint folder, its 'last' link, or a run folder")
    p_to.add_argument("out")
    p_to.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                      help="weights' dtype in the export (default: as trained)")
    args = parser.parse_args(argv)
    if args.direction == "from-hf":
        print(hf.from_hf(args.hf_dir, args.out))
    else:
        print(hf.to_hf(args.checkpoint, args.out, args.dtype))


def consolidate_main(argv: list[str]) -> None:
    from tinytrain.errors import argument_parser

    from tinytrain.checkpoint import consolidate

    parser = argument_parser(prog="tinytrain consolidate",
                                     description="Write a checkpoint's model weights (sharded or not) as one file.")
    parser.add_argument("checkpoint", help="a checkpoint folder, its 'last' link, or a run folder")
    parser.add_argument("out", help="the output file (a torch.save'd state dict with HF Llama names)")
    args = parser.parse_args(argv)
    print(consolidate(args.checkpoint, args.out))


def main(argv: Optional[list[str]] = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fit" and from_command_line:
        from tinytrain import preemption

        preemption.install()  # first, before the seconds of imports: SIGUSR1 must never kill a job
    _setup_logging()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command = argv[0]
    try:
        return _run(command, argv, from_command_line)
    except Exception as e:
        if os.environ.get("TINYTRAIN_DEBUG") or not isinstance(e, _expected()):
            raise  # a bug: keep the traceback
        # 2 for bad arguments (and, as before, for convert's inputs); 1 for everything else
        code = 2 if type(e).__name__ == "ArgumentError" or command == "convert" else 1
        # One write: the ranks of a multi-process run share one stderr, and their lines must not mix.
        sys.stderr.write(f"tinytrain {command}: error: {one_line(e)}\n")
        sys.stderr.flush()
        raise SystemExit(code) from None


def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def _expected() -> tuple[type, ...]:
    """The errors printed as one line: a user's input, not a bug (imported only once one is raised)."""
    from jsonargparse import ArgumentError

    from tinytrain.errors import TinyTrainError

    return (TinyTrainError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ArgumentError)


MODULE_COMMANDS = {"plan": "tinytrain.plan", "evaluate": "tinytrain.evaluate", "average": "tinytrain.average",
                   "plot": "tinytrain.plot"}


def _run(command: str, argv: list[str], from_command_line: bool) -> None:
    if command == "generate":
        return generate_main(argv[1:])
    if command == "consolidate":
        return consolidate_main(argv[1:])
    if command == "prepare":
        return prepare_main(argv[1:])
    if command == "convert":
        return convert_main(argv[1:])
    if command in MODULE_COMMANDS:  # each module's main(argv), imported only when asked for
        import importlib

        return importlib.import_module(MODULE_COMMANDS[command]).main(argv[1:])
    from tinytrain.fitcli import TinyTrainCLI

    if command not in TinyTrainCLI.subcommands():
        print(f"tinytrain: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)

    from tinytrain.callbacks import ConfigSaver
    from tinytrain.data import TokenData
    from tinytrain.lit import LitLlama
    from tinytrain.strategy import register_strategy

    register_strategy()

    TinyTrainCLI(
        LitLlama,
        TokenData,
        args=None if from_command_line else argv,
        save_config_callback=ConfigSaver,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False},
    )


def __getattr__(name: str):
    # The training CLI imports Lightning (seconds); `prepare`, `convert` and `--help` do not need it.
    if name == "TinyTrainCLI":
        from tinytrain.fitcli import TinyTrainCLI

        return TinyTrainCLI
    raise AttributeError(name)


if __name__ == "__main__":
    main()
