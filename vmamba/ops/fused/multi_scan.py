"""Autograd wrappers around the fused C++ multi-direction selective scan."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .loader import load

__all__ = ["fused_multi_scan", "fused_selective_scan"]

_EMPTY = torch.empty(0)


class _MultiScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, Bm, Cm, bias, h0, index, softplus):  # type: ignore[override]
        ext = load()
        bias_t = bias if bias is not None else _EMPTY
        h0_t = h0 if h0 is not None else _EMPTY
        y, last = ext.forward(u, delta, A, Bm, Cm, bias_t, h0_t, index, softplus)
        ctx.save_for_backward(u, delta, A, Bm, Cm, bias_t, h0_t, index)
        ctx.softplus = softplus
        ctx.has_bias, ctx.has_h0 = bias is not None, h0 is not None
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):  # type: ignore[override]
        u, delta, A, Bm, Cm, bias, h0, index = ctx.saved_tensors
        batch, length, groups = u.shape[0], u.shape[1], Bm.shape[3]
        dy = torch.zeros_like(u) if dy is None else dy.contiguous().float()
        dlast = _EMPTY if dlast is None else dlast.contiguous().float()
        du, ddelta, dA_part, dB_part, dC_part, dh0 = load().backward(
            u, delta, A, Bm, Cm, bias, h0, index, ctx.softplus, dy, dlast
        )

        def per_group(part: Tensor) -> Tensor:  # (B, blocks, L, K, N) -> (B, L, K, G, N)
            k, n = part.shape[3], part.shape[4]
            return part.view(batch, groups, -1, length, k, n).sum(2).permute(0, 2, 3, 1, 4)

        dbias = ddelta.sum((0, 1)) if ctx.has_bias else None
        return (
            du,
            ddelta,
            dA_part.sum(0),
            per_group(dB_part),
            per_group(dC_part),
            dbias,
            dh0 if ctx.has_h0 else None,
            None,
            None,
        )


def fused_multi_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    index: Tensor,
    delta_bias: Tensor | None = None,
    initial_state: Tensor | None = None,
    delta_softplus: bool = True,
) -> tuple[Tensor, Tensor]:
    """Selective scans of one map along K directions, merged by summation, in one fused pass.

    Direction ``k`` visits map row ``index[k, t]`` at step ``t``; every direction reads the same ``u``.

    Args:
        u: ``(B, L, D)`` map rows (channels last), shared by every direction, or ``(B, L, K, D)``, one
            input per direction (still in map-row order).
        delta: ``(B, L, K, D)`` raw step sizes per direction, in map-row order.
        A: ``(K, N, D)`` (negative) decay rates.
        B, C: ``(B, L, K, G, N)``; group ``g`` serves channels ``g*D/G .. (g+1)*D/G - 1``.
        index: ``(K, L)`` int64 row order of each direction.
        delta_bias: ``(K, D)`` added to ``delta`` before the softplus.
        initial_state: ``(B, K, N, D)``.

    Returns:
        ``y (B, L, D)``: ``sum_k <C, h>`` per row (no D skip, no gate), and ``last_state (B, K, N, D)``.
    """
    if u.dim() == 3:
        u = u.unsqueeze(2)
    groups, dim = B.shape[3], u.shape[-1]
    if dim % groups != 0:
        raise ValueError(f"{groups} groups do not divide {dim} channels")
    per_group = dim // groups
    pad = -per_group % load().lanes  # the kernel works on blocks of SIMD-width channels

    def prep(t: Tensor | None) -> Tensor | None:
        """float32, contiguous, each group's channels (last axis) zero-padded to a multiple of LANES."""
        if t is None:
            return None
        t = t.float()
        if pad:
            t = F.pad(t.unflatten(-1, (groups, per_group)), (0, pad)).flatten(-2)
        return t.contiguous()

    y, last = _MultiScan.apply(
        prep(u), prep(delta), prep(A), B.float().contiguous(), C.float().contiguous(), prep(delta_bias),
        prep(initial_state), index.to(torch.int64).contiguous(), bool(delta_softplus),
    )
    if pad:
        unpad = lambda t: t.unflatten(-1, (groups, per_group + pad))[..., :per_group].flatten(-2)  # noqa: E731
        y, last = unpad(y), unpad(last)
    return y, last


def fused_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm ``selective_scan_fn`` layout on the fused kernel (see :func:`vmamba.ops.selective_scan`)."""
    batch, dim, length = u.shape
    Bg = B.unsqueeze(1) if B.dim() == 3 else B  # (B, G, N, L)
    Cg = C.unsqueeze(1) if C.dim() == 3 else C
    index = torch.arange(length, device=u.device).unsqueeze(0)
    y, last = fused_multi_scan(
        u.transpose(1, 2),
        delta.transpose(1, 2).unsqueeze(2),
        A.t().unsqueeze(0),
        Bg.permute(0, 3, 1, 2).unsqueeze(2),
        Cg.permute(0, 3, 1, 2).unsqueeze(2),
        index,
        delta_bias=None if delta_bias is None else delta_bias.unsqueeze(0),
        initial_state=None if initial_state is None else initial_state.transpose(1, 2).unsqueeze(1),
        delta_softplus=delta_softplus,
    )
    y = y.transpose(1, 2)  # (B, D, L)
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(u.dtype)
    return (out, last[:, 0].transpose(1, 2)) if return_last_state else out
