"""Random generators of a training step: seeding them, and capturing/restoring them for exact resumption.

A step draws from Python's ``random`` (timm's RandAugment, random erasing), NumPy (Mixup/CutMix), torch's CPU
generator (data order, worker seeds, drop-path) and CUDA's. Restoring all of them at an epoch boundary
makes a resumed run draw exactly what an uninterrupted one would.
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "capture_rng_state", "restore_rng_state"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator a training step draws from: Python, NumPy, torch CPU and CUDA.

    NumPy's state is stored as plain ints so the result loads with ``weights_only=True``.
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    """Python's random state is nested tuples; a round trip through some loaders turns them into lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
