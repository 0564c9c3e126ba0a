"""Mixed precision: which autocast dtype a job uses, checked against the device.

Weights and optimizer states stay float32; only the forward pass runs in the lower precision. bfloat16
needs no loss scaling; float16 does (a ``torch.amp.GradScaler``) and is refused on CPU, where PyTorch's
float16 kernels are slow and incomplete.

Example::

    check_precision(device, Precision.BFLOAT16)
    with autocast(device, Precision.BFLOAT16):
        loss = criterion(model(x), y)
"""
from __future__ import annotations

import contextlib
import enum

import torch

__all__ = ["Precision", "check_precision", "autocast", "grad_scaler"]


class Precision(str, enum.Enum):
    """Autocast dtype of the forward pass."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"  # CUDA only; gradients scaled by a GradScaler

    @property
    def dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.value]


def check_precision(device: torch.device, precision: Precision | str) -> Precision:
    """The precision as an enum; ``ValueError`` for float16 on CPU."""
    precision = Precision(precision)
    if precision is Precision.FLOAT16 and device.type != "cuda":
        raise ValueError("precision float16 needs CUDA; use bfloat16 (or float32) on CPU")
    return precision


def autocast(device: torch.device, precision: Precision | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the precision (a no-op context for float32)."""
    precision = check_precision(device, precision)
    if precision is Precision.FLOAT32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def grad_scaler(device: torch.device, precision: Precision | str) -> torch.amp.GradScaler | None:
    """A GradScaler for float16, else None (bfloat16 has float32's exponent range)."""
    if check_precision(device, precision) is Precision.FLOAT16:
        return torch.amp.GradScaler(device.type)
    return None
