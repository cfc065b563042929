"""Opening a checkpoint never runs code from it.

What tinytrain reads from a checkpoint is tensors and plain values (numbers, strings, lists, dicts,
tuples). Three places in the stack would unpickle anything:

- torch.distributed.checkpoint's file-system reader loads a sharded checkpoint's ``.metadata`` with
  a plain ``pickle.load``;
- its default load planner loads every non-tensor item (an optimizer's param groups, ...) with
  ``torch.load(weights_only=False)``;
- ``torch.load`` with ``weights_only=True`` refuses other objects, but with an error that advises
  turning the check off.

``harden()`` replaces the first two, for every reader in the process (Lightning's resume path makes
its own reader, so a reader of our own would not reach it): ``.metadata`` goes through an
unpickler that admits only the classes DCP metadata is made of, and byte items through
``torch.load(weights_only=True)``. ``check_state`` opens a checkpoint's state the same way before
anything else reads it, so a refusal is one line naming the file.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Optional

import torch

from tinytrain.errors import CheckpointError
from tinytrain.lightning_private import SHARDED_META

# What a DCP .metadata file is made of (torch 2.6 to 2.13): its dataclasses, torch.Size, dtypes
# and layouts, and the checkpoint's path.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


def _refusal(path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: holds objects tinytrain will not load ({what}); a checkpoint holds only "
                           "tensors and plain values, so this file was not written by tinytrain or was altered")


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                     torch.dtype)):
            return super().find_class(module, name)
        raise _refusal(self.path, f"{module}.{name}")


def read_metadata(path: Path):
    """A sharded checkpoint's DCP metadata (``path`` is its ``.metadata`` file), refusing any class
    that metadata does not hold."""
    with open(path, "rb") as f:
        try:
            return _MetadataUnpickler(f, path).load()
        except CheckpointError:
            raise
        except Exception as e:  # truncated, garbled
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from e


def _safe_read_metadata(self, *args: Any, **kwargs: Any):
    from torch.distributed.checkpoint.metadata import StorageMeta

    rank = kwargs.get("rank")
    metadata = read_metadata(Path(self._get_metadata_path(rank)))
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _safe_load_bytes(self, read_item, value: io.BytesIO) -> None:
    try:
        obj = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(f"item {read_item.dest_index.fqn}", _unsupported(e)) from None
    if self.flatten_state_dict:
        from torch.distributed.checkpoint._traverse import set_element

        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


_hardened = False


def harden() -> None:
    """Make torch.distributed.checkpoint's file-system reader and default load planner unpickle
    nothing but metadata classes, tensors and plain values, in this process (idempotent)."""
    global _hardened
    if _hardened:
        return
    from torch.distributed.checkpoint import filesystem
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    filesystem.FileSystemReader.read_metadata = _safe_read_metadata
    DefaultLoadPlanner.load_bytes = _safe_load_bytes
    _hardened = True


def _unsupported(e: BaseException) -> str:
    """The object torch's weights-only unpickler refused, from its message (without its advice)."""
    for line in str(e).splitlines():
        line = line.strip()
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line.rstrip(".")
    return type(e).__name__


def torch_load(path: Path, **kwargs) -> Any:
    """``torch.load(weights_only=True)`` whose refusal is a CheckpointError naming the file."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise _refusal(path, _unsupported(e)) from None


def check_state(state: Path) -> None:
    """Open a checkpoint's training state (Lightning's ``state.ckpt``: a file, or a folder of
    shards) the way tinytrain loads it, before Lightning does: a file that would need code to load,
    or a garbled one, is a CheckpointError naming it."""
    state = Path(state)
    if state.is_file():
        try:
            torch_load(state, map_location="cpu", mmap=True)
        except (RuntimeError, EOFError, OSError) as e:
            raise CheckpointError(f"{state}: unreadable, damaged or truncated ({e})") from e
        return
    if not state.is_dir():
        return  # Lightning names a missing path itself
    read_metadata(state / ".metadata")
    if (state / SHARDED_META).is_file():  # the rest of the state
        try:
            torch_load(state / SHARDED_META, map_location="cpu")
        except (RuntimeError, EOFError, OSError) as e:
            raise CheckpointError(f"{state / SHARDED_META}: unreadable, damaged or truncated ({e})") from e


def unwrap(e: BaseException) -> Optional[BaseException]:
    """The CheckpointError inside torch.distributed.checkpoint's CheckpointException (which gathers
    each rank's error), if there is one."""
    failures = getattr(e, "failures", None) or {}
    for failure in failures.values():
        inner = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback summary)
        if isinstance(inner, CheckpointError):
            return inner
    return None
