"""Depthwise 1-D convolution + SiLU over a channels-last sequence: the per-direction conv in front of a
Mamba scan, computed for a range of output rows (a chunk of a long sequence) without padded copies.

``out[:, i] = silu(bias + sum_j taps[j] * x[:, start + i + offset + j])`` for ``i < stop - start``, with
``x`` zero outside its rows. ``offset = -(w - 1)`` is Mamba's causal conv; ``offset = 0`` with flipped taps
is the causal conv of the reversed sequence, written in forward order.

Inference in float32 runs the fused C++ kernel (:mod:`vmamba.ops.fused.conv_silu`) when it is available; the
pure-PyTorch form (:func:`depthwise_conv1d_silu_ref`, ``w`` multiply-adds over the chunk) is the reference,
the training path (autograd) and the fallback.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused.conv_silu import fused_conv_silu, fused_conv_silu_applies

__all__ = ["depthwise_conv1d_silu", "depthwise_conv1d_silu_ref"]


def _check(x: Tensor, taps: Tensor, bias: Tensor | None, start: int, stop: int) -> None:
    if x.dim() != 3 or taps.dim() != 2:
        raise ValueError(f"expected x (B, N, E) and taps (w, E), got {tuple(x.shape)} and {tuple(taps.shape)}")
    if taps.shape[1] != x.shape[2] or (bias is not None and bias.shape != (x.shape[2],)):
        raise ValueError(f"taps {tuple(taps.shape)} / bias do not match the {x.shape[2]} channels of x")
    if not 0 <= start <= stop <= x.shape[1]:
        raise ValueError(f"output rows [{start}, {stop}) are not inside the {x.shape[1]} rows of x")


def depthwise_conv1d_silu_ref(
    x: Tensor, taps: Tensor, bias: Tensor | None, start: int, stop: int, offset: int
) -> Tensor:
    """Pure-PyTorch form of :func:`depthwise_conv1d_silu` (differentiable, any dtype)."""
    _check(x, taps, bias, start, stop)
    n, width, rows = x.shape[1], taps.shape[0], stop - start
    lo, hi = start + offset, stop + offset + width - 1  # input rows the windows cover: [lo, hi)
    a, b = min(max(lo, 0), n), min(max(hi, 0), n)  # rows [a, b) of x exist; the rest are zeros
    if a < b:
        window = F.pad(x[:, a:b], (0, 0, a - lo, hi - b))  # (B, hi - lo, E)
    else:
        window = x.new_zeros(x.shape[0], hi - lo, x.shape[2])
    acc = window[:, :rows] * taps[0] if bias is None else torch.addcmul(bias, window[:, :rows], taps[0])
    for j in range(1, width):
        acc = torch.addcmul(acc, window[:, j : j + rows], taps[j])
    return F.silu(acc)


def depthwise_conv1d_silu(
    x: Tensor, taps: Tensor, bias: Tensor | None = None, start: int = 0, stop: int | None = None, offset: int | None = None
) -> Tensor:
    """``x: (B, N, E)``, ``taps: (w, E)``, ``bias: (E,)`` -> ``(B, stop - start, E)`` (module docstring).

    ``stop`` defaults to ``N`` and ``offset`` to ``-(w - 1)`` (causal).
    """
    stop = x.shape[1] if stop is None else stop
    offset = -(taps.shape[0] - 1) if offset is None else offset
    _check(x, taps, bias, start, stop)
    if fused_conv_silu_applies(x, taps, bias):
        return fused_conv_silu(x, taps, bias, start, stop, offset)
    return depthwise_conv1d_silu_ref(x, taps, bias, start, stop, offset)
