"""Depthwise convolutions + SiLU in front of a scan, channels last.

:func:`depthwise_conv2d_silu`: VMamba's ``silu(conv2d(x))`` over a ``(B, H, W, C)`` map ("same" padding,
stride 1). In float32 on the CPU it runs the fused C++ kernel (:mod:`vmamba.ops.fused.dwconv2d_silu`, forward
and backward: the map is read once per pass, and neither the conv's output nor a SiLU gradient is
materialised); elsewhere, and as the reference, ``F.conv2d`` then ``F.silu``
(:func:`depthwise_conv2d_silu_ref`).

:func:`depthwise_conv1d_silu`: the per-direction depthwise 1-D conv + SiLU in front of a Mamba scan,
computed for a range of output rows (a chunk of a long sequence) without padded copies.

``out[:, i] = silu(bias + sum_j taps[j] * x[:, start + i + offset + j])`` for ``i < stop - start``, with
``x`` zero outside its rows. ``offset = -(w - 1)`` is Mamba's causal conv; ``offset = 0`` with flipped taps
is the causal conv of the reversed sequence, written in forward order. Several directions at once (taps
``(K, w, E)``, one offset each) read the input once and give the interleaved ``(B, rows, K, E)`` layout that
the multi-direction scan takes as one input per direction.

Inference in float32 runs the fused C++ kernel (:mod:`vmamba.ops.fused.conv_silu`) when it is available; the
pure-PyTorch form (:func:`depthwise_conv1d_silu_ref`, ``w`` multiply-adds over the chunk) is the reference,
the training path (autograd) and the fallback.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused.conv_silu import fused_conv_silu, fused_conv_silu_applies
from .fused.dwconv2d_silu import fused_dwconv2d_silu, fused_dwconv2d_silu_applies

__all__ = ["depthwise_conv1d_silu", "depthwise_conv1d_silu_ref", "depthwise_conv2d_silu", "depthwise_conv2d_silu_ref"]


def _check_2d(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(
            f"expected x (B, H, W, C) and a depthwise weight (C, 1, kh, kw), "
            f"got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if weight.shape[0] != x.shape[3] or (bias is not None and bias.shape != (x.shape[3],)):
        raise ValueError(f"weight {tuple(weight.shape)} / bias do not match the {x.shape[3]} channels of x")
    if weight.shape[2] % 2 == 0 or weight.shape[3] % 2 == 0:
        raise ValueError(f"'same' padding needs odd kernel sides, got {tuple(weight.shape[2:])}")


def depthwise_conv2d_silu_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Pure-PyTorch form of :func:`depthwise_conv2d_silu` (differentiable, any dtype)."""
    _check_2d(x, weight, bias)
    padding = (weight.shape[2] // 2, weight.shape[3] // 2)
    return F.silu(F.conv2d(x.movedim(-1, 1), weight, bias, padding=padding, groups=x.shape[3])).movedim(1, -1)


def depthwise_conv2d_silu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x: (B, H, W, C)`` (channels last), ``weight: (C, 1, kh, kw)`` (a depthwise ``nn.Conv2d``'s; odd kh,
    kw), ``bias: (C,)`` -> ``silu(conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=C))`` as
    ``(B, H, W, C)`` (module docstring).

    Raises:
        ValueError: shapes that do not match, or an even kernel side.
    """
    _check_2d(x, weight, bias)
    if fused_dwconv2d_silu_applies(x, weight, bias):
        return fused_dwconv2d_silu(x, weight, bias)
    return depthwise_conv2d_silu_ref(x, weight, bias)


def _check(x: Tensor, taps: Tensor, bias: Tensor | None, start: int, stop: int, offsets: Sequence[int]) -> None:
    if x.dim() != 3 or taps.dim() not in (2, 3):
        raise ValueError(f"expected x (B, N, E) and taps (w, E) or (K, w, E), got {tuple(x.shape)} and {tuple(taps.shape)}")
    if taps.shape[-1] != x.shape[2] or (bias is not None and bias.shape != (*taps.shape[:-2], x.shape[2])):
        raise ValueError(f"taps {tuple(taps.shape)} / bias do not match the {x.shape[2]} channels of x")
    if len(offsets) != (taps.shape[0] if taps.dim() == 3 else 1):
        raise ValueError(f"{len(offsets)} offsets for taps of shape {tuple(taps.shape)}: give one per direction")
    if not 0 <= start <= stop <= x.shape[1]:
        raise ValueError(f"output rows [{start}, {stop}) are not inside the {x.shape[1]} rows of x")


def _one_direction(x: Tensor, taps: Tensor, bias: Tensor | None, start: int, stop: int, offset: int) -> Tensor:
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


def _offsets(taps: Tensor, offset: int | Sequence[int] | None) -> list[int]:
    if offset is None:
        offset = -(taps.shape[-2] - 1)
    if isinstance(offset, int):
        return [offset] * (taps.shape[0] if taps.dim() == 3 else 1)
    return [int(o) for o in offset]


def depthwise_conv1d_silu_ref(
    x: Tensor, taps: Tensor, bias: Tensor | None, start: int, stop: int, offset: int | Sequence[int]
) -> Tensor:
    """Pure-PyTorch form of :func:`depthwise_conv1d_silu` (differentiable, any dtype)."""
    offsets = _offsets(taps, offset)
    _check(x, taps, bias, start, stop, offsets)
    if taps.dim() == 2:
        return _one_direction(x, taps, bias, start, stop, offsets[0])
    outs = [
        _one_direction(x, taps[k], None if bias is None else bias[k], start, stop, offsets[k])
        for k in range(taps.shape[0])
    ]
    return torch.stack(outs, dim=2)


def depthwise_conv1d_silu(
    x: Tensor,
    taps: Tensor,
    bias: Tensor | None = None,
    start: int = 0,
    stop: int | None = None,
    offset: int | Sequence[int] | None = None,
) -> Tensor:
    """``x: (B, N, E)``, ``taps: (w, E)``, ``bias: (E,)`` -> ``(B, stop - start, E)``; or K directions:
    ``taps: (K, w, E)``, ``bias: (K, E)``, ``offset``: one int each (or one for all) -> ``(B, stop - start,
    K, E)`` (module docstring). ``stop`` defaults to ``N`` and ``offset`` to ``-(w - 1)`` (causal).

    Raises:
        ValueError: x / taps / bias shapes that do not match, an offset count that is not K, output rows
            outside ``[0, N]``.
    """
    stop = x.shape[1] if stop is None else stop
    offsets = _offsets(taps, offset)
    _check(x, taps, bias, start, stop, offsets)
    if fused_conv_silu_applies(x, taps, bias):
        stacked = taps.dim() == 3
        out = fused_conv_silu(
            x, taps if stacked else taps.unsqueeze(0), bias if stacked or bias is None else bias.unsqueeze(0),
            start, stop, offsets,
        )
        return out if stacked else out.squeeze(2)
    return depthwise_conv1d_silu_ref(x, taps, bias, start, stop, offsets)
