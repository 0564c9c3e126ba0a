"""``Linear``: ``nn.Linear`` whose forward runs :func:`vmamba.ops.linear` (oneDNN in float32 on the CPU, else
``F.linear``).

Same parameters, state-dict keys, initialisation, ``extra_repr`` and hooks as ``nn.Linear`` (it is one, so
``isinstance(m, nn.Linear)`` initialisers and timm utilities treat it as such).
"""
from __future__ import annotations

from torch import Tensor, nn

from .ops.linear import linear

__all__ = ["Linear"]


class Linear(nn.Linear):
    """``(..., in_features) -> (..., out_features)``: ``x @ weight.T + bias`` (see :mod:`vmamba.ops.linear`)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
