"""The fused C++ depthwise 1-D convolution + SiLU (``conv_silu.cpp``) over a channels-last sequence, for
inference (no autograd): the front end of a Mamba block (Vim's per-direction causal conv) in one pass.

:func:`fused_conv_silu_applies` is the dispatch rule; :func:`fused_conv_silu` runs the ``vmamba::conv_silu``
custom op. The public op with its pure-PyTorch reference is :func:`vmamba.ops.depthwise_conv1d_silu`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .loader import FusedKernel, load, use_fused_inference

__all__ = ["fused_conv_silu", "fused_conv_silu_applies"]

_EMPTY = torch.empty(0)


def fused_conv_silu_applies(x: Tensor, taps: Tensor, bias: Tensor | None) -> bool:
    """True when no input needs a gradient (the kernel has no backward), every tensor is a CPU float32 tensor
    (other dtypes keep their own arithmetic on the PyTorch path) and the fused backend is active."""
    return use_fused_inference(x, taps, bias, kernel=FusedKernel.CONV_SILU, dtypes=(torch.float32,))


@torch.library.custom_op("vmamba::conv_silu", mutates_args=())
def _conv_silu_op(x: Tensor, taps: Tensor, bias: Tensor | None, start: int, stop: int, offsets: list[int]) -> Tensor:
    return load(FusedKernel.CONV_SILU).forward(
        x.contiguous(), taps.contiguous(), _EMPTY if bias is None else bias.contiguous(), start, stop,
        torch.tensor(offsets, dtype=torch.int64),
    )


@_conv_silu_op.register_fake
def _(x, taps, bias, start, stop, offsets):
    return x.new_empty(x.shape[0], stop - start, taps.shape[0], x.shape[2])


def fused_conv_silu(
    x: Tensor, taps: Tensor, bias: Tensor | None, start: int, stop: int, offsets: Sequence[int]
) -> Tensor:
    """``x: (B, N, E)``, ``taps: (K, w, E)``, ``bias: (K, E)`` float32, ``offsets``: K ints ->
    ``(B, stop - start, K, E)`` (see :func:`vmamba.ops.depthwise_conv1d_silu` for the formula)."""
    return _conv_silu_op(x, taps, bias, int(start), int(stop), [int(o) for o in offsets])
