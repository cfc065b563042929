"""``<checkpoints>/rollbacks.json``: the rollbacks after loss spikes a run has made (see
tinytrain.train.spikes), one writer (`fit`, on rank 0) and one reader (the resume)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tinytrain.errors import CheckpointError
from tinytrain.store.fsutil import atomic_write_bytes

ROLLBACKS = "rollbacks.json"


@dataclass(frozen=True)
class Rollback:
    """One rollback: the run went back to the checkpoint of ``to_checkpoint_step`` and goes on from
    sample ``resume_at_sample``, past the data of the steps that spiked."""

    spike_steps: list[int]            # the steps (1-based, as logged) whose updates were skipped
    to_checkpoint_step: int
    resume_at_sample: int
    skipped_samples: int
    skipped_data_of_steps: list[int]  # [first, last] step whose data is skipped
    recorded_at: str = dataclasses.field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, entry: dict, source: Path) -> "Rollback":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(entry, dict) or not {n for n in names if n != "recorded_at"} <= set(entry):
            raise CheckpointError(f"{source}: not a rollback record: {entry!r}")
        return cls(**{k: v for k, v in entry.items() if k in names})


def read_rollbacks(folder: Path) -> list[Rollback]:
    path = Path(folder) / ROLLBACKS
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(entries, list):
        raise CheckpointError(f"{path}: expected a list of rollbacks")
    return [Rollback.from_json(e, path) for e in entries]


def record_rollback(folder: Path, rollback: Rollback) -> None:
    """Append a rollback to ``folder``/rollbacks.json (atomically)."""
    folder = Path(folder)
    entries = [r.to_json() for r in read_rollbacks(folder)] + [rollback.to_json()]
    atomic_write_bytes(folder / ROLLBACKS, (json.dumps(entries, indent=2) + "\n").encode())
