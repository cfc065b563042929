"""`tinytrain prepare`: corpora to token shards, verification, tokenizers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


def main(argv: list[str]) -> None:
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

    from tinytrain.data.prep import PrepSpec

    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML spec (see data_prep/)")
    parser.add_class_arguments(PrepSpec, None, as_group=False)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    done = instantiate(parser.parse_args(argv))
    return PrepSpec(**{f.name: done[f.name] for f in dataclasses.fields(PrepSpec)})


def prepare_spec_main(argv: list[str]) -> None:
    from tinytrain.data.prep import Share, prepare
    from tinytrain.errors import argument_parser

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
    from tinytrain.data.prep import prepared_folders, verify_folder
    from tinytrain.errors import argument_parser

    parser = argument_parser(prog="tinytrain prepare --verify")
    parser.add_argument("--verify", required=True, help="a prepared folder, or a folder of them")
    args = parser.parse_args(argv)
    for folder in prepared_folders(Path(args.verify)):
        print(verify_folder(folder))


def prepare_tokenizer_main(argv: list[str]) -> None:
    from tinytrain.data.prep import train_spec_tokenizer
    from tinytrain.errors import argument_parser

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
    from tinytrain.data.corpus import prepare_text_folder
    from tinytrain.errors import argument_parser

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
