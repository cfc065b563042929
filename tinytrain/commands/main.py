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
from typing import Optional

log = logging.getLogger("tinytrain")

USAGE = """usage: tinytrain {fit,validate,prepare,generate,convert,consolidate,average,plan,evaluate,plot,island-server} ...

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
  island-server  asynchronous Local SGD's global weights: tinytrain island-server FOLDER [--port 29610]

`tinytrain fit --help` lists every recipe key; `--print_config` shows the resolved recipe.
"""


def _setup_logging() -> None:
    from tinytrain.logs import setup_logging

    setup_logging()


def main(argv: Optional[list[str]] = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fit" and from_command_line:
        from tinytrain.run import preemption

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


# Each command's module has main(argv), imported only when asked for: `prepare`, `convert` and `--help`
# need no Lightning (seconds of imports).
MODULE_COMMANDS = {name: f"tinytrain.commands.{name}" for name in
                   ("prepare", "generate", "convert", "consolidate", "average", "plan", "evaluate", "plot")}
MODULE_COMMANDS["island-server"] = "tinytrain.commands.island_server"


def _run(command: str, argv: list[str], from_command_line: bool) -> None:
    if command in MODULE_COMMANDS:
        import importlib

        return importlib.import_module(MODULE_COMMANDS[command]).main(argv[1:])
    from tinytrain.commands.fit import TinyTrainCLI

    if command not in TinyTrainCLI.subcommands():
        print(f"tinytrain: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)

    from tinytrain.data.datamodule import TokenData
    from tinytrain.run.checkpointing import ConfigSaver
    from tinytrain.train.lit import LitLlama
    from tinytrain.train.strategy import register_strategy

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
        from tinytrain.commands.fit import TinyTrainCLI

        return TinyTrainCLI
    raise AttributeError(name)


if __name__ == "__main__":
    main()
