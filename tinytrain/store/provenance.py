"""What a run or a benchmark ran on (versions, git SHA, CPU, cores, GPU): recorded in every
checkpoint's meta.json and every benchmark's JSON."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch


def git_sha() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """What a run or a benchmark ran on: versions, git SHA, CPU, cores, GPU."""
    from tinytrain import __version__

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {
        "tinytrain": __version__, "git_sha": git_sha(), "python": platform.python_version(),
        "torch": torch.__version__, "lightning": _version("lightning"), "numpy": _version("numpy"),
        "platform": platform.platform(), "cuda": torch.version.cuda, "cpu": cpu, "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env
