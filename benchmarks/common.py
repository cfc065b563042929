"""What every benchmark shares: the command it ran, the machine it ran on, and where it writes."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

from tinytrain.store.provenance import environment

# What a Hugging Face Llama does not compute, turned off: the benchmarks that compare with
# transformers build their model with LlamaConfig.from_name(preset, **HF_LLAMA).
HF_LLAMA = {"qk_norm": False, "value_embeddings": 0}


def command(name: str, argv: Optional[list[str]] = None) -> str:
    """The command line that reproduces a run, shell-quoted so it can be pasted back."""
    return f"python -m benchmarks.{name} " + shlex.join(sys.argv[1:] if argv is None else argv)


def split_at_dashes(argv: Optional[list[str]]) -> tuple[list[str], list[str], list[str]]:
    """(all arguments, the benchmark's own ones, the ones after `--` that it passes on)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        return argv, argv, []
    return argv, argv[:argv.index("--")], argv[argv.index("--") + 1:]


def machine() -> dict:
    """Versions, CPU, cores, threads and GPU (tinytrain's own record, as checkpoints keep it)."""
    return environment()


def write_result(result: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
