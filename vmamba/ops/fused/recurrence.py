"""The fused C++ forward (``recurrence.cpp``) of the decayed linear recurrence behind GLA, retention, SSD and
RWKV-7, for inference: no autograd (training keeps each op's chunked PyTorch path).

Per (batch, head) a ``K x V`` float32 state::

    u_t = a_t^T S_{t-1}                                    (RWKV-7's delta term, when a and b are given)
    S_t = diag(exp(log_alpha_t)) S_{t-1} + b_t u_t^T + k_t (c_t v_t)^T
    o_t = scale * q_t^T S_t

Inputs are time-major ``(B, T, Hx, D)`` views read through their strides (no copies for transposes or
expanded tensors). ``log_alpha`` is the log-decay (the kernel takes its ``exp`` per step) with channel size
``K`` (per key channel: GLA, RWKV-7) or ``1`` (one scalar per head: SSD, retention); ``c_t`` an optional scalar
per token and head multiplying ``v_t`` (SSD's ``dt``, so ``x`` is passed as it is); a stride may be 0 (an
expanded tensor); ``Hx`` may be any divisor of ``H``, head ``h`` reading head ``h // (H // Hx)`` (SSD's grouped
B and C).

:func:`fused_recurrence_applies` is the dispatch rule the ops share; :func:`fused_recurrence` runs the
``vmamba::linear_recurrence`` custom op (one opaque op with a FLOP formula for FlopCounterMode).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..flops import register_macs
from .loader import FusedKernel, load, use_fused_inference

__all__ = ["fused_recurrence", "fused_recurrence_applies", "recurrence_macs"]

_EMPTY = torch.empty(0)


def fused_recurrence_applies(*tensors: Tensor | None) -> bool:
    """Whether an op should run its forward on the fused recurrence.

    True when no input needs a gradient (the kernel has no backward), every tensor is a CPU float32 / half
    tensor (float64 stays on the PyTorch path, whose float64 arithmetic gradcheck relies on) and the fused
    backend is active (``VMAMBA_SCAN_BACKEND`` / :func:`~vmamba.ops.fused.forced_scan_backend`: ``auto`` and the
    kernel builds, or ``fused``, which raises when it cannot be built).
    """
    return use_fused_inference(
        *tensors, kernel=FusedKernel.RECURRENCE, dtypes=(torch.float32, torch.float16, torch.bfloat16)
    )


@torch.library.custom_op("vmamba::linear_recurrence", mutates_args=())
def _recurrence_op(
    q: Tensor, k: Tensor, v: Tensor, log_alpha: Tensor, v_scale: Tensor | None, a: Tensor | None, b: Tensor | None,
    h0: Tensor | None, heads: int, scale: float,
) -> tuple[Tensor, Tensor]:
    def f32(t: Tensor | None) -> Tensor:
        return _EMPTY if t is None else t.float()

    o, state = load(FusedKernel.RECURRENCE).forward(
        f32(q), f32(k), f32(v), f32(log_alpha), f32(v_scale), f32(a), f32(b), f32(h0), heads, scale
    )
    return o, state


@_recurrence_op.register_fake
def _(q, k, v, log_alpha, v_scale, a, b, h0, heads, scale):
    batch, length, _, dk = q.shape
    dv = v.shape[3]
    return q.new_empty(batch, length, heads, dv, dtype=torch.float32), q.new_empty(
        batch, heads, dk, dv, dtype=torch.float32
    )


def recurrence_macs(q, k, v, log_alpha, v_scale, a, b, h0, heads, scale) -> int:
    """Per token and head: the update (``K V`` for the decay, ``K V`` for ``k v^T``), the read ``K V``, and with
    the delta term ``a^T S`` plus ``b u^T`` (another ``2 K V``)."""
    batch, length, _, dk = q
    dv = v[3]
    per_step = (3 + (2 if a is not None else 0)) * dk * dv
    return batch * length * heads * per_step


register_macs(torch.ops.vmamba.linear_recurrence, recurrence_macs)


def fused_recurrence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_alpha: Tensor,
    heads: int,
    scale: float,
    initial_state: Tensor | None = None,
    a: Tensor | None = None,
    b: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the recurrence (forward only).

    Args:
        q, k: ``(B, T, Hq, K)`` / ``(B, T, Hk, K)``; ``Hq``, ``Hk`` divide ``heads``.
        v: ``(B, T, Hv, V)``.
        log_alpha: ``(B, T, Ha, K)`` or ``(B, T, Ha, 1)`` log-decays ``<= 0`` (strides may be 0).
        heads: ``H``.
        scale: output scale.
        initial_state: ``(B, H, K, V)``; zeros when None.
        a, b: ``(B, T, H, K)`` RWKV-7's delta term, both or neither.
        v_scale: ``(B, T, Hc, 1)`` a scalar per token and head multiplying ``v`` (SSD's ``dt``); none when None.

    Returns:
        ``(o (B, T, H, V) float32, final_state (B, H, K, V) float32)``.

    Raises:
        ValueError: only one of ``a`` / ``b`` given.
    """
    if (a is None) != (b is None):
        raise ValueError("the delta term needs both a and b (or neither)")
    return _recurrence_op(q, k, v, log_alpha, v_scale, a, b, initial_state, int(heads), float(scale))
