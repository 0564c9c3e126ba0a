"""Linear layer on oneDNN: ``x @ weight.T + bias`` with :func:`torch.nn.functional.linear`'s contract.

Why: in float32 on the CPU, ``F.linear`` and ``matmul`` call MKL's GEMM. oneDNN's matmul, which PyTorch builds
with ``torch.backends.mkldnn`` ship (``torch.compile``'s CPU backend uses it for frozen linears), measured
1.0-1.4x the rate of the best of ATen's ``mm`` / ``addmm`` / ``F.linear`` on ten of this project's layer shapes
in one interleaved run on a 2-core machine (e.g. 1568 x 384 -> 1536, vmamba_t's third stage at batch 8: 99 vs
75-87 GMAC/s; 25088 x 384 -> 96: 87 vs 57-62). :func:`linear` runs the forward product and the input gradient
(``dy @ weight``, the weight read transposed in place) on oneDNN; the weight gradient (``dy.T @ x``) stays on
ATen's ``mm``: oneDNN fed the transposed operands was faster on 2 of 7 shapes (1.2x), equal or slower on the
rest, down to 0.25x on a reduction over 25088 rows.

Dispatch (:func:`onednn_linear_applies`): oneDNN for CPU float32 tensors when PyTorch has oneDNN and it is
enabled (``torch.backends.mkldnn.enabled``), ``VMAMBA_ONEDNN_LINEAR`` is not ``0`` (the switch for a CPU where
ATen's GEMM is the faster one; it leaves the scan kernels as they are), the scan backend
(:func:`vmamba.ops.fused.scan_backend`) is not ``torch``, autocast is off, nothing is being compiled (the
compiler picks its own GEMMs) or transformed (``torch.vmap`` / ``torch.func``: oneDNN has no batching rule,
the custom op no functorch support), and the product is at least ``_MIN_MACS`` multiply-accumulates (below
that oneDNN's call overhead, ~25 us, outweighs the gain). Everything else, and the reference, is
``F.linear``. The two round float32 differently (different blocking of the sums), so results agree to float32
rounding, not bit for bit.

The product runs as the ``vmamba::linear`` custom op: ``FlopCounterMode`` counts it like ``F.linear`` (its
backward as two products), and ``torch.export`` keeps it as one node. Double backward works (the backward is
written with differentiable ops). Inference calls with no dispatch mode active call oneDNN directly.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .flops import register_macs
from .fused.loader import ScanBackend, scan_backend

__all__ = ["linear", "onednn_linear_applies", "onednn_linear_available", "onednn_linear_status"]

_MIN_MACS = 1 << 20
_ENV = "VMAMBA_ONEDNN_LINEAR"  # "0": always F.linear


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise.default  # noqa: B018 - raises when the op is not registered
    except (AttributeError, RuntimeError):
        return False
    return True


def _off_reason() -> str | None:
    """Why the linear layers run ``F.linear`` everywhere in this process state, or None when oneDNN may run."""
    if not onednn_linear_available():
        return "this PyTorch has no oneDNN linear"
    if not torch.backends.mkldnn.enabled or os.environ.get(_ENV, "1") == "0":
        return f"switched off: torch.backends.mkldnn.enabled / {_ENV}=0"
    if scan_backend() is ScanBackend.TORCH:
        return "VMAMBA_SCAN_BACKEND=torch"
    return None


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x (M, K)``, ``weight (N, K)`` (any strides), ``bias (N,)`` or None -> ``(M, N)`` on oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_linear_status() -> str:
    """One line saying what the linear layers run on here (for CPU float32 outside autocast / compilation)."""
    reason = _off_reason()
    return f"F.linear ({reason})" if reason else f"oneDNN matmul (products of >= {_MIN_MACS} MACs)"


def onednn_linear_applies(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """True when :func:`linear` runs oneDNN for these arguments (module docstring); shapes are assumed valid."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if torch.compiler.is_compiling() or _off_reason() is not None or torch.is_autocast_enabled("cpu"):
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:  # inside vmap / torch.func transforms
        return False
    return x.numel() * weight.shape[0] >= _MIN_MACS


@torch.library.custom_op("vmamba::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """:func:`_onednn_linear` as an op with autograd, a FLOP formula and a fake implementation."""
    return _onednn_linear(x, weight, bias)


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad
    grad_x = torch.ops.vmamba.linear(grad, weight.t(), None) if need_x else None  # (M, N) @ (N, K)
    grad_weight = grad.t().mm(x) if need_weight else None
    grad_bias = grad.sum(0) if need_bias and ctx.has_bias else None
    return grad_x, grad_weight, grad_bias


_linear_op.register_autograd(_backward, setup_context=_setup_context)
register_macs(torch.ops.vmamba.linear, lambda x, weight, bias: x[0] * x[1] * weight[0])


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x: (..., in_features)``, ``weight: (out_features, in_features)``, ``bias: (out_features,)`` or None ->
    ``F.linear(x, weight, bias)`` as ``(..., out_features)``, on oneDNN where it applies (module docstring).
    Differentiable in all three (twice)."""
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or not onednn_linear_applies(x, weight, bias):
        return F.linear(x, weight, bias)  # F.linear names any shape mismatch itself
    rows = x.reshape(-1, x.shape[-1])
    if _plain_inference(rows, weight, bias):
        out = _onednn_linear(rows, weight, bias)
    else:
        out = torch.ops.vmamba.linear(rows, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def _plain_inference(*tensors: Tensor | None) -> bool:
    """No gradient to record and no dispatch mode (FlopCounterMode, fake tensors, tracing) watching: the oneDNN
    op can be called directly, skipping the custom op's dispatch (~40 us a call, which at batch 1 made
    vim_t at 224x224 ~10 % slower than F.linear)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return torch._C._len_torch_dispatch_stack() == 0
