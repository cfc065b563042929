"""The `tinytrain` command.

    tinytrain fit --config recipes/tiny.yaml [--trainer.max_steps 50 ...]   train (LightningCLI)
    tinytrain validate --config recipes/tiny.yaml                          validation loss only
    tinytrain prepare --corpus DIR --out DIR                               text files to shards
    tinytrain generate CHECKPOINT --prompt TEXT                            sample text
    tinytrain convert from-hf HF_DIR OUT | to-hf CHECKPOINT OUT           Hugging Face Llama folders
    tinytrain consolidate CHECKPOINT OUT.pt                                one plain weights file
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

from lightning.pytorch.cli import LightningCLI

from tinytrain.checkpoint import Checkpointing, ConfigSaver, latest_checkpoint

log = logging.getLogger("tinytrain")

USAGE = """usage: tinytrain {fit,validate,prepare,generate,convert,consolidate} ...

  fit        train a recipe:      tinytrain fit --config recipes/tiny.yaml [--section.key value ...]
  validate   validation loss:     tinytrain validate --config recipes/tiny.yaml --ckpt_path CKPT
  prepare    text files to shards: tinytrain prepare --corpus DIR --out DIR [--tokenizer T.model]
  generate   sample from a model: tinytrain generate CHECKPOINT --prompt TEXT
  convert    Hugging Face Llama:  tinytrain convert from-hf HF_DIR OUT | to-hf CHECKPOINT OUT
  consolidate  sharded or not, to one weights file: tinytrain consolidate CHECKPOINT OUT.pt

`tinytrain fit --help` lists every recipe key; `--print_config` shows the resolved recipe.
"""


class TinyTrainCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Checkpointing, "checkpoint")
        # The data must know the model's vocabulary (to train a tokenizer, to check token ids).
        parser.link_arguments("model.config.vocab_size", "data.vocab_size")
        # Checkpoints are ours (atomic folders + `last`); Lightning's ModelCheckpoint would write a second set.
        parser.set_defaults({"trainer.enable_checkpointing": False})

    def before_fit(self) -> None:
        fit_config = self.config_init[self.subcommand]
        if fit_config.get("ckpt_path") is None:
            ckpt_cb = next(cb for cb in self.trainer.callbacks if isinstance(cb, Checkpointing))
            found = latest_checkpoint(ckpt_cb.folder(self.trainer)) if ckpt_cb.resume else None
            if found is not None:
                if self.trainer.is_global_zero:
                    log.info("resuming from %s", found)
                fit_config["ckpt_path"] = str(found / "state.ckpt")
        if fit_config.get("ckpt_path") is not None and getattr(self.model, "init_from", None):
            # The restored checkpoint replaces the weights: loading init_from too would only cost time.
            log.info("resuming, so model.init_from %s is not loaded", self.model.init_from)
            self.model.init_from = None


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    logging.getLogger("tinytrain").setLevel(logging.INFO)


def prepare_main(argv: list[str]) -> None:
    import argparse
    from pathlib import Path

    from tinytrain.corpus import prepare_text_folder

    parser = argparse.ArgumentParser(
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


def convert_main(argv: list[str]) -> None:
    import argparse

    from tinytrain import hf

    parser = argparse.ArgumentParser(prog="tinytrain convert",
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
    try:
        if args.direction == "from-hf":
            print(hf.from_hf(args.hf_dir, args.out))
        else:
            print(hf.to_hf(args.checkpoint, args.out, args.dtype))
    except (hf.HFFormatError, FileExistsError, FileNotFoundError) as e:
        print(f"tinytrain convert: error: {e}", file=sys.stderr)
        raise SystemExit(2)


def consolidate_main(argv: list[str]) -> None:
    import argparse

    from tinytrain.checkpoint import consolidate

    parser = argparse.ArgumentParser(prog="tinytrain consolidate",
                                     description="Write a checkpoint's model weights (sharded or not) as one file.")
    parser.add_argument("checkpoint", help="a checkpoint folder, its 'last' link, or a run folder")
    parser.add_argument("out", help="the output file (a torch.save'd state dict with HF Llama names)")
    args = parser.parse_args(argv)
    print(consolidate(args.checkpoint, args.out))


def main(argv: Optional[list[str]] = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] == "generate":
        from tinytrain.generate import main as generate_main

        return generate_main(argv[1:])
    if argv[0] == "consolidate":
        return consolidate_main(argv[1:])
    if argv[0] == "prepare":
        return prepare_main(argv[1:])
    if argv[0] == "convert":
        return convert_main(argv[1:])
    if argv[0] not in TinyTrainCLI.subcommands():
        print(f"tinytrain: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)

    from tinytrain.data import TokenData
    from tinytrain.lit import LitLlama
    from tinytrain.parallel import register_strategy

    register_strategy()

    TinyTrainCLI(
        LitLlama,
        TokenData,
        args=None if from_command_line else argv,
        save_config_callback=ConfigSaver,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
