"""The fused C++ bias + exact GELU (``bias_gelu.h``, built into the scan extension), forward and backward: the
hidden activation of an MLP, ``gelu(pre + bias)`` over the rows of a bias-free GEMM's output, with the bias
gradient summed in the same pass as the GELU gradient.

:func:`fused_bias_gelu_applies` is the dispatch rule; :func:`fused_bias_gelu` runs the ``vmamba::bias_gelu``
custom op (autograd through ``vmamba::bias_gelu_backward``). The public op with its pure-PyTorch reference is
:func:`vmamba.ops.linear_gelu`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .loader import FusedKernel, load, use_fused_for_dtypes

__all__ = ["fused_bias_gelu", "fused_bias_gelu_applies"]


def fused_bias_gelu_applies(*tensors: Tensor) -> bool:
    """True when every tensor (the GEMM's operands and the bias) is a CPU float32 tensor (other dtypes keep
    their own arithmetic on the PyTorch path) and the fused backend is active."""
    return use_fused_for_dtypes(*tensors, kernel=FusedKernel.MULTI_SCAN, dtypes=(torch.float32,))


@torch.library.custom_op("vmamba::bias_gelu", mutates_args=())
def _bias_gelu_op(pre: Tensor, bias: Tensor) -> Tensor:
    """``pre (..., H)``, ``bias (H,)`` -> ``gelu(pre + bias)`` (exact GELU), same shape as ``pre``."""
    return load(FusedKernel.MULTI_SCAN).bias_gelu_forward(pre, bias)


@_bias_gelu_op.register_fake
def _(pre, bias):
    return torch.empty_like(pre)


@torch.library.custom_op("vmamba::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(dh: Tensor, pre: Tensor, bias: Tensor) -> list[Tensor]:
    """Gradients ``[pre, bias]``."""
    return load(FusedKernel.MULTI_SCAN).bias_gelu_backward(dh.contiguous(), pre, bias)


@_bias_gelu_backward_op.register_fake
def _(dh, pre, bias):
    return [torch.empty_like(pre), torch.empty_like(bias)]


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dh: Tensor):
    pre, bias = ctx.saved_tensors
    dpre, dbias = torch.ops.vmamba.bias_gelu_backward(dh, pre, bias)
    return dpre, dbias


_bias_gelu_op.register_autograd(_backward, setup_context=_setup_context)


def fused_bias_gelu(pre: Tensor, bias: Tensor) -> Tensor:
    """``pre: (..., H)`` float32, ``bias: (H,)`` -> ``F.gelu(pre + bias)`` (``approximate="none"``), same shape
    as ``pre``. Differentiable in both."""
    if bias.dim() != 1 or pre.dim() < 1 or pre.shape[-1] != bias.shape[0]:
        raise ValueError(f"bias {tuple(bias.shape)} does not match the last axis of pre {tuple(pre.shape)}")
    return _bias_gelu_op(pre.contiguous(), bias.contiguous())
