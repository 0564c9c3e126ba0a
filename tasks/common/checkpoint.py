"""Crash-safe checkpoint files: weights as safetensors (with string metadata), training state as a torch file.

Every write goes to a temporary file in the destination folder, is flushed to disk, then renamed over the
target with ``os.replace`` (atomic on POSIX and Windows), so a crash leaves either the old file or the new
one, never half of one. Reading a file that is not a whole checkpoint (another format, a truncated download,
corruption) raises :class:`CheckpointError` naming the file, never a loader's internal error.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    "CheckpointError",
    "check_checkpoint_file",
    "atomic_write",
    "save_weights",
    "load_weights",
    "read_weights_metadata",
    "save_state",
    "load_state",
]


# What torch.load raises on a file that is not a whole torch.save archive / pickle (a truncated zip: RuntimeError).
_TORCH_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: not a safetensors or PyTorch file, truncated or corrupt."""


def _unreadable(path: str | Path, reason: object) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path}: {reason}")


@contextmanager
def _reading_safetensors(path: str | Path) -> Iterator[None]:
    """Turn the safetensors reader's error on a file that is not a whole one into :class:`CheckpointError`."""
    try:
        yield
    except SafetensorError as e:
        raise _unreadable(path, f"not a whole safetensors file ({e})") from None


def check_checkpoint_file(path: str | Path) -> None:
    """Check, without reading it in full, that ``path`` looks like a whole checkpoint of the kind its name says
    (as timm decides): a ``.safetensors`` file whose header parses and covers the file, else a PyTorch file -
    a complete zip archive as ``torch.save`` writes, or a legacy pickle.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: anything else, with the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        with _reading_safetensors(path), safe_open(str(path), framework="pt"):
            return
    with open(path, "rb") as f:
        legacy_pickle = f.read(1) == b"\x80"  # pickle protocol 2+ opcode: torch's pre-1.6 format
    if not (legacy_pickle or zipfile.is_zipfile(path)):
        raise _unreadable(path, "neither a safetensors file nor a PyTorch checkpoint (torch.save's zip archive or "
                                "a pickle); a truncated download or another format?")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then atomically move ``tmp_path`` to ``path``.

    The temporary file sits beside ``path`` (same filesystem, so the rename is atomic) and is removed if
    ``write`` raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(path: str | Path, state_dict: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write a state dict as a safetensors file (tensors copied to contiguous CPU memory), atomically.

    ``metadata`` must map strings to strings (safetensors' header format).
    """
    # Cloning breaks storage sharing (tied or viewed parameters), which safetensors refuses to write.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file (:class:`CheckpointError` if it is not a whole one)."""
    out = {}
    with _reading_safetensors(path), safe_open(str(path), framework="pt", device=str(device)) as f:
        for key in f.keys():
            out[key] = f.get_tensor(key)
    return out


def read_weights_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty when none; :class:`CheckpointError` if the
    file is not a whole safetensors file)."""
    with _reading_safetensors(path), safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_state(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write a training-state dict (tensors, numbers, strings, lists, dicts) with ``torch.save``, atomically."""
    atomic_write(path, lambda tmp: torch.save(dict(state), tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`save_state` (``weights_only``: no arbitrary code runs on load);
    :class:`CheckpointError` if it is not a whole torch file of plain data."""
    check_checkpoint_file(path)  # garbage and truncated files get a plain reason, not torch.load's advice
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _TORCH_LOAD_ERRORS as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _unreadable(path, first_line) from None
