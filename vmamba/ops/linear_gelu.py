"""Linear layer + GELU, the first half of a transformer-style MLP: ``gelu(x @ weight.T + bias)``.

:func:`linear_gelu` runs, for float32 CPU tensors with a bias and the exact GELU, a bias-free GEMM followed by
the fused bias + GELU kernel (:mod:`vmamba.ops.fused.bias_gelu`): the GEMM writes its output without a bias
copy first, the forward adds the bias and applies the GELU in one pass, and the backward computes the GELU
gradient with one exponential per element and the bias gradient in the same pass (ATen takes two exponentials
and a separate column sum). The GEMM is :func:`vmamba.ops.linear` (oneDNN where it applies), which
``FlopCounterMode`` counts as it counts ``F.linear``. Elsewhere (other dtypes or devices, no bias, the tanh
GELU, under autocast), and as the reference, ``F.gelu(F.linear(x, weight, bias))`` (:func:`linear_gelu_ref`).

The kernel's GELU evaluates the normal CDF with the Abramowitz & Stegun 7.1.26 form that ATen's vectorised
``erf`` uses (absolute error <= 1.5e-7 in ``erf``), so both paths agree to float32 rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused.bias_gelu import fused_bias_gelu, fused_bias_gelu_applies
from .linear import linear

__all__ = ["linear_gelu", "linear_gelu_ref"]

_GELU_MODES = ("none", "tanh")


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, approximate: str) -> None:
    if approximate not in _GELU_MODES:
        raise ValueError(f"approximate must be one of {_GELU_MODES}, got {approximate!r}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"expected x (..., in_features) and weight (out_features, in_features), "
            f"got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} does not match the {weight.shape[0]} output features")


def _reference(x: Tensor, weight: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def linear_gelu_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None, approximate: str = "none") -> Tensor:
    """Pure-PyTorch form of :func:`linear_gelu` (differentiable, any dtype and device)."""
    _check(x, weight, bias, approximate)
    return _reference(x, weight, bias, approximate)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None, approximate: str = "none") -> Tensor:
    """``x: (..., in_features)``, ``weight: (out_features, in_features)``, ``bias: (out_features,)`` ->
    ``F.gelu(F.linear(x, weight, bias), approximate)`` as ``(..., out_features)`` (module docstring).
    Differentiable in all three.

    Raises:
        ValueError: shapes that do not match, or an unknown ``approximate``.
    """
    _check(x, weight, bias, approximate)
    # Under autocast the GEMM would run in the low-precision dtype: the reference path keeps autocast's rules.
    # (Asked only once the kernel applies, i.e. on the CPU: not every device type has an autocast state.)
    if (
        bias is None
        or approximate != "none"
        or not fused_bias_gelu_applies(x, weight, bias)
        or torch.is_autocast_enabled(x.device.type)
    ):
        return _reference(x, weight, bias, approximate)  # arguments checked above
    pre = linear(x.reshape(-1, x.shape[-1]), weight)  # (rows, out_features), bias-free; oneDNN where it applies
    return fused_bias_gelu(pre, bias).view(*x.shape[:-1], weight.shape[0])
