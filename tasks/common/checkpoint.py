"""Crash-safe checkpoint files: weights as safetensors (with string metadata), training state as a torch file.

Every write goes to a temporary file in the destination folder, is flushed to disk, then renamed over the
target with ``os.replace`` (atomic on POSIX and Windows), so a crash leaves either the old file or the new
one, never half of one.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "atomic_write",
    "save_weights",
    "load_weights",
    "read_weights_metadata",
    "save_state",
    "load_state",
]


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
    """Read every tensor of a safetensors file."""
    out = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for key in f.keys():
            out[key] = f.get_tensor(key)
    return out


def read_weights_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty when none)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_state(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write a training-state dict (tensors, numbers, strings, lists, dicts) with ``torch.save``, atomically."""
    atomic_write(path, lambda tmp: torch.save(dict(state), tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`save_state` (``weights_only``: no arbitrary code runs on load)."""
    return torch.load(path, map_location="cpu", weights_only=True)
