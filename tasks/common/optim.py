"""Optimizer implementation choice shared by the training jobs and the training benchmarks."""
from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["FUSED_OPTIMIZERS", "fused_kwargs"]

# timm / torch optimizer names whose torch class has a fused implementation (one kernel over every tensor)
FUSED_OPTIMIZERS = frozenset({"adam", "adamw"})
_FUSED_DEVICES = frozenset({"cpu", "cuda"})


def fused_kwargs(name: str, params: Iterable[torch.Tensor]) -> dict[str, bool]:
    """``{"fused": True}`` when torch's fused implementation of optimizer ``name`` applies to ``params``
    (Adam / AdamW, floating-point parameters on the CPU or CUDA), else ``{}`` (torch's default).

    The default on the CPU is a Python loop over the tensors: measured side by side on a 2-core CPU, the fused
    step took 0.29x the default's time for vmamba_t's 276 parameter tensors (0.37x for Swin-T's 173), with
    the same updates up to float rounding.
    """
    if name.lower() not in FUSED_OPTIMIZERS:
        return {}
    params = list(params)
    ok = all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params)
    return {"fused": True} if params and ok else {}
