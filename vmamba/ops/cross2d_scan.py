"""Fused four-direction selective scan on a channel-last 2-D map (inference path, ``d_state = 1``).

``cross2d_selective_scan(u, ...)`` equals ``cross_merge(selective_scan(cross_scan(u), ...))`` for the
``cross2d`` pattern (k0 row-major, k1 column-major, k2 / k3 their reverses), with VMamba's per-direction
parameters, but it never builds the ``(B, K, L, E)`` direction copies and never leaves the ``(B, H, W, E)``
layout. It exists because on CPU the generic path spends most of its time moving memory, not computing.

How each direction is scanned without a loop over all ``L = H * W`` tokens. A row-major scan is, row by row,
a scan along ``W``. All rows are scanned at once from a zero state (a loop of ``W`` steps, each step one
column ``(B, H, E)`` of every row), which gives each row's local states ``h_loc`` and the running decay
products ``P[r, w] = prod_{w' <= w} a[r, w']``. The true state is ``h[r, w] = h_loc[r, w] + P[r, w] * c[r-1]``
with ``c[r]`` the true state at the end of row ``r``; ``c`` follows from a short loop over rows
(``c[r] = h_loc[r, W-1] + P[r, W-1] * c[r-1]``). Only products of decays in (0, 1] are formed: nothing
divides by a decay and nothing overflows. The output needs ``C * h``, so each step adds ``C * h_loc`` to the
merged output and keeps ``Q = C * P``; one pass at the end adds ``Q * c[r-1]``. Column-major directions are
the same on the transposed view, reversed directions run the loops backwards. Everything per step touches one
``(B, H, E)`` slice (cache-resident), so memory traffic is a few passes over the map in total.

Recurrence (per direction k, channel e): ``dt = softplus(dt_proj(x_dbl_dt) + bias)``, ``a = exp(dt * A)``,
``h_t = a_t h_{t-1} + dt_t B_t u_t``, ``y_t = C_t h_t + D u_t`` (``N = 1``: ``B_t``, ``C_t`` are scalars per token).

No autograd: the result never requires grad (the layers take a differentiable path whenever gradients
are needed). It is the dispatcher op ``torch.ops.vmamba.cross2d_selective_scan``, so FlopCounterMode counts
it (:func:`cross2d_macs`, the same total as the generic path's projections and scan).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .flops import register_macs

__all__ = ["cross2d_selective_scan"]

_LOG2E = 1.0 / math.log(2.0)  # exp(x) == exp2(x * log2(e)); exp2 is several times faster on CPU


def _check(u: Tensor, x_proj_weight: Tensor, dt_weight: Tensor, dt_bias: Tensor, A: Tensor, D: Tensor) -> None:
    if u.dim() != 4:
        raise ValueError(f"u must be a channel-last map (B, H, W, E), got {tuple(u.shape)}")
    dim = u.shape[-1]
    if dt_weight.dim() != 3 or dt_weight.shape[0] != 4 or dt_weight.shape[1] != dim:
        raise ValueError(f"dt_weight must be (4, E={dim}, R), got {tuple(dt_weight.shape)}")
    rank = dt_weight.shape[2]
    if x_proj_weight.shape != (4, rank + 2, dim):
        raise ValueError(f"x_proj_weight must be (4, R + 2, E) = {(4, rank + 2, dim)} (d_state 1), "
                         f"got {tuple(x_proj_weight.shape)}")
    for name, t in (("dt_bias", dt_bias), ("A", A), ("D", D)):
        if t.shape != (4, dim):
            raise ValueError(f"{name} must be (4, E={dim}), got {tuple(t.shape)}")


def cross2d_selective_scan(
    u: Tensor, x_proj_weight: Tensor, dt_weight: Tensor, dt_bias: Tensor, A: Tensor, D: Tensor
) -> Tensor:
    """Four-direction selective scan with ``d_state = 1`` (VMamba v2's SS2D core), merged, channel-last.

    Args:
        u: ``(B, H, W, E)`` the scanned map (after VMamba's depthwise conv and SiLU).
        x_proj_weight: ``(4, R + 2, E)`` per-direction projections of each token to ``[dt (R), B, C]``.
        dt_weight: ``(4, E, R)`` the per-direction dt up-projections.
        dt_bias: ``(4, E)``.
        A: ``(4, E)`` the (negative) state coefficients, ``-exp(A_logs)``.
        D: ``(4, E)`` the skip weights.

    Returns:
        ``(B, H, W, E)``: the sum over the four directions of each direction's output at its pixel, in
        ``u``'s dtype (accumulated in float32).

    ``dt = softplus(v)`` is computed as ``log1p(exp(v))`` with ``v`` clamped at 87 to stay finite (equal to
    ``F.softplus`` to float rounding for every ``v <= 87``).

    Memory layout: every per-step slice is contiguous. Column-major directions step along ``H``, whose
    slices ``u[:, i]`` are contiguous as they are; the row-major ones step along ``W`` on a ``(B, W, H, E)``
    copy of ``u``, accumulate into a ``(B, W, H, E)`` output and add it back transposed at the end.
    """
    _check(u, x_proj_weight, dt_weight, dt_bias, A, D)
    with torch.no_grad():
        return torch.ops.vmamba.cross2d_selective_scan(u, x_proj_weight, dt_weight, dt_bias, A, D)


def cross2d_macs(u: Sequence[int], x_proj_weight: Sequence[int], dt_weight: Sequence[int], *rest: object) -> int:
    """MACs as the generic path counts them: the x / dt projections, the official ``9 * B * L * D * N``
    scan rule and ``B * D * L`` for the D skip, with ``D = 4 * E`` scanned channels and ``N = 1``."""
    batch, height, width, dim = u
    tokens, channels, rank = batch * height * width, 4 * dim, dt_weight[2]
    return tokens * channels * (rank + 2) + tokens * channels * rank + 9 * tokens * channels + tokens * channels


@torch.library.custom_op("vmamba::cross2d_selective_scan", mutates_args=())
def _cross2d_op(u: Tensor, x_proj_weight: Tensor, dt_weight: Tensor, dt_bias: Tensor, A: Tensor, D: Tensor) -> Tensor:
    return _forward(u, x_proj_weight, dt_weight, dt_bias, A, D)


@_cross2d_op.register_fake
def _(u, x_proj_weight, dt_weight, dt_bias, A, D):
    return torch.empty_like(u)


register_macs(torch.ops.vmamba.cross2d_selective_scan, cross2d_macs)


def _forward(u: Tensor, x_proj_weight: Tensor, dt_weight: Tensor, dt_bias: Tensor, A: Tensor, D: Tensor) -> Tensor:
    dtype = u.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u = u.to(acc)
    rank = dt_weight.shape[2]
    w_x = x_proj_weight.to(acc)
    # the dt projection yields v * log2(e) directly, so exp(v) is one exp2
    dt_weight, dt_bias = dt_weight.to(acc) * _LOG2E, dt_bias.to(acc) * _LOG2E
    a_scale = A.to(acc) * _LOG2E  # exp(dt * A) == exp2(dt * A * log2(e))

    y = u * D.to(acc).sum(0)  # (B, H, W, E): the four D skips, merged; the column directions add here
    u_t = u.transpose(1, 2).contiguous()  # (B, W, H, E) for the row directions
    y_t = torch.empty_like(u_t)  # their output, (B, W, H, E)
    q_buf = torch.empty_like(u_t)
    for k in range(4):
        rows, reverse = k in (0, 2), k >= 2
        src, out = (u_t, y_t) if rows else (u, y)
        x_dbl = F.linear(src, w_x[k])  # (B, S, I, R + 2) with S the step axis
        # step-major layout (B, S, O, ...) -> oriented view (B, O, S, ...) the scan expects
        orient = lambda t: t.transpose(1, 2)  # noqa: E731
        _scan_direction(
            u=orient(src), dt_in=orient(x_dbl[..., :rank]), b=orient(x_dbl[..., rank:rank + 1]),
            c=orient(x_dbl[..., rank + 1:]), y=orient(out), q=orient(q_buf.view_as(src)),
            weight=dt_weight[k], bias=dt_bias[k], a_scale=a_scale[k], reverse=reverse, accumulate=k != 0,
        )
    y += y_t.transpose(1, 2)
    return y.to(dtype)


_V_MAX = 87.0 * _LOG2E  # exp2 stays finite


def _scan_direction(
    u: Tensor, dt_in: Tensor, b: Tensor, c: Tensor, y: Tensor, q: Tensor,
    weight: Tensor, bias: Tensor, a_scale: Tensor, reverse: bool, accumulate: bool,
) -> None:
    """One direction on oriented views; adds its output into ``y`` (or writes it, if not ``accumulate``).

    ``u, y, q: (B, O, I, E)``; ``dt_in: (B, O, I, R)``; ``b, c: (B, O, I, 1)``; ``weight: (E, R)`` and
    ``bias: (E,)`` pre-scaled by log2(e); ``a_scale: (E,)`` = A * log2(e). The scan runs along ``I``
    inside each of the ``O`` lines, the lines follow each other along ``O``.
    """
    outer = u.shape[1]
    # per-step slices made once (unbind is one call for all steps)
    us, dts_in, bs, cs, ys, qs = (t.unbind(2) for t in (u, dt_in, b, c, y, q))
    steps = range(u.shape[2] - 1, -1, -1) if reverse else range(u.shape[2])
    h = p = None
    for i in steps:
        dt = F.linear(dts_in[i], weight, bias).clamp_(max=_V_MAX).exp2_().log1p_()  # softplus, (B, O, E)
        a = torch.mul(dt, a_scale).exp2_()  # exp(dt * A)
        dt.mul_(us[i]).mul_(bs[i])  # dt * B * u
        if h is None:
            h, p = dt, a
        else:
            h = torch.addcmul(dt, a, h, out=dt)
            p.mul_(a)
        if accumulate:
            ys[i].addcmul_(h, cs[i])
        else:
            torch.mul(h, cs[i], out=ys[i])
        torch.mul(p, cs[i], out=qs[i])
    if outer == 1:
        return
    # h, p: each line's local end state and total decay; chain the lines in scan order
    lines = range(outer - 2, -1, -1) if reverse else range(1, outer)
    step = 1 if reverse else -1
    for j in lines:
        h[:, j].addcmul_(p[:, j], h[:, j + step])
    if reverse:
        y[:, :-1].addcmul_(q[:, :-1], h[:, 1:, None])
    else:
        y[:, 1:].addcmul_(q[:, 1:], h[:, :-1, None])
