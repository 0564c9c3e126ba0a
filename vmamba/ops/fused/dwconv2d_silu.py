"""The fused C++ depthwise 2-D convolution + SiLU (``dwconv2d_silu.h``, built into the scan extension) over a
channels-last map, forward and backward: VMamba's SS2D front end (``silu(conv(x))`` between in_proj and the
scan) in one pass each way.

:func:`fused_dwconv2d_silu_applies` is the dispatch rule; :func:`fused_dwconv2d_silu` runs the
``vmamba::dwconv2d_silu`` custom op (autograd through ``vmamba::dwconv2d_silu_backward``; both carry the
convolution's FLOP count for FlopCounterMode). The public op with its pure-PyTorch reference is
:func:`vmamba.ops.depthwise_conv2d_silu`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..flops import BACKWARD_MAC_FACTOR, register_macs
from .loader import FusedKernel, load, use_fused_for_dtypes

__all__ = ["fused_dwconv2d_silu", "fused_dwconv2d_silu_applies"]

_EMPTY = torch.empty(0)


def fused_dwconv2d_silu_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """True when every tensor is a CPU float32 tensor (other dtypes keep their own arithmetic on the PyTorch
    path), the fused backend is active and the kernel has odd sides (its "same" padding) and at most the
    compiled kernel's ``dwconv2d_max_taps`` taps."""
    kh, kw = weight.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        return False
    if not use_fused_for_dtypes(x, weight, bias, kernel=FusedKernel.MULTI_SCAN, dtypes=(torch.float32,)):
        return False
    return kh * kw <= load(FusedKernel.MULTI_SCAN).dwconv2d_max_taps


@torch.library.custom_op("vmamba::dwconv2d_silu", mutates_args=())
def _dwconv2d_silu_op(x: Tensor, taps: Tensor, bias: Tensor | None) -> Tensor:
    """``x (B, H, W, C)``, ``taps (kh, kw, C)``, ``bias (C,)`` -> ``(B, H, W, C)``."""
    return load(FusedKernel.MULTI_SCAN).dwconv2d_silu_forward(x, taps, _EMPTY if bias is None else bias)


@_dwconv2d_silu_op.register_fake
def _(x, taps, bias):
    return torch.empty_like(x)


@torch.library.custom_op("vmamba::dwconv2d_silu_backward", mutates_args=())
def _dwconv2d_silu_backward_op(dy: Tensor, x: Tensor, taps: Tensor, bias: Tensor | None) -> list[Tensor]:
    """Gradients ``[x, taps, bias]`` (an empty tensor for an absent bias)."""
    dx, dtaps, dbias = load(FusedKernel.MULTI_SCAN).dwconv2d_silu_backward(
        dy.contiguous(), x, taps, _EMPTY if bias is None else bias
    )
    return [dx, dtaps.sum(0), dbias.sum(0) if bias is not None else x.new_empty(0)]


@_dwconv2d_silu_backward_op.register_fake
def _(dy, x, taps, bias):
    return [torch.empty_like(x), torch.empty_like(taps), x.new_empty(0) if bias is None else torch.empty_like(bias)]


def _setup_context(ctx, inputs, output) -> None:
    x, taps, bias = inputs
    ctx.save_for_backward(x, taps, bias)


def _backward(ctx, dy: Tensor):
    x, taps, bias = ctx.saved_tensors
    dx, dtaps, dbias = torch.ops.vmamba.dwconv2d_silu_backward(dy, x, taps, bias)
    return dx, dtaps, dbias if bias is not None else None


_dwconv2d_silu_op.register_autograd(_backward, setup_context=_setup_context)


def _conv_macs(x, taps, bias=None) -> int:
    """The depthwise convolution's multiply-adds, as FlopCounterMode counts ``F.conv2d`` (the SiLU is
    elementwise and not counted)."""
    batch, height, width, channels = x
    return batch * height * width * channels * taps[0] * taps[1]


def _backward_macs(dy, x, taps, bias=None) -> int:
    return BACKWARD_MAC_FACTOR * _conv_macs(x, taps)


register_macs(torch.ops.vmamba.dwconv2d_silu, _conv_macs)
register_macs(torch.ops.vmamba.dwconv2d_silu_backward, _backward_macs)


def fused_dwconv2d_silu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x: (B, H, W, C)`` float32 (channels last), ``weight: (C, 1, kh, kw)`` (a depthwise ``nn.Conv2d``'s,
    odd kh and kw), ``bias: (C,)`` -> ``silu(conv2d(x, weight, bias, padding="same", groups=C))`` as
    ``(B, H, W, C)``. Differentiable in all three."""
    taps = weight[:, 0].permute(1, 2, 0).contiguous()  # (kh, kw, C): each tap's channel vector contiguous
    return _dwconv2d_silu_op(x.contiguous(), taps, None if bias is None else bias.contiguous())
