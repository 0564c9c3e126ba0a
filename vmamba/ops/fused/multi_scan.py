"""Autograd wrappers around the fused C++ multi-direction selective scan."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..flops import BACKWARD_MAC_FACTOR, register_macs
from .loader import load

__all__ = ["fused_multi_scan", "fused_selective_scan", "fused_selective_scan_backward"]

_EMPTY = torch.empty(0)


def _opt(t: Tensor | None) -> Tensor:
    return _EMPTY if t is None else t


@torch.library.custom_op("vmamba::multi_scan", mutates_args=())
def _multi_scan_op(
    u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, bias: Tensor | None, h0: Tensor | None,
    index: Tensor, softplus: bool,
) -> tuple[Tensor, Tensor]:
    y, last = load().forward(u, delta, A, Bm, Cm, _opt(bias), _opt(h0), index, softplus)
    return y, last


@_multi_scan_op.register_fake
def _(u, delta, A, Bm, Cm, bias, h0, index, softplus):
    batch, length, _, dim = u.shape
    return u.new_empty(batch, length, dim), u.new_empty(batch, delta.shape[2], A.shape[1], dim)


@torch.library.custom_op("vmamba::multi_scan_backward", mutates_args=())
def _multi_scan_backward_op(
    dy: Tensor, dlast: Tensor | None, u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor,
    bias: Tensor | None, h0: Tensor | None, index: Tensor, softplus: bool,
) -> list[Tensor]:
    """Gradients ``[u, delta, A, B, C, bias, h0]`` (empty tensors for absent inputs)."""
    batch, length, groups = u.shape[0], u.shape[1], Bm.shape[3]
    du, ddelta, dA_part, dB_part, dC_part, dh0 = load().backward(
        u, delta, A, Bm, Cm, _opt(bias), _opt(h0), index, softplus, dy.contiguous().float(),
        _EMPTY if dlast is None else dlast.contiguous().float(),
    )

    def per_group(part: Tensor) -> Tensor:  # (B, blocks, L, K, N) -> (B, L, K, G, N)
        k, n = part.shape[3], part.shape[4]
        return part.view(batch, groups, -1, length, k, n).sum(2).permute(0, 2, 3, 1, 4).contiguous()

    return [
        du,
        ddelta,
        dA_part.sum(0),
        per_group(dB_part),
        per_group(dC_part),
        ddelta.sum((0, 1)) if bias is not None else u.new_empty(0),
        dh0 if h0 is not None else u.new_empty(0),
    ]


@_multi_scan_backward_op.register_fake
def _(dy, dlast, u, delta, A, Bm, Cm, bias, h0, index, softplus):
    return [torch.empty_like(t) if t is not None else u.new_empty(0) for t in (u, delta, A, Bm, Cm, bias, h0)]


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, Bm, Cm, bias, h0, index, softplus = inputs
    ctx.save_for_backward(u, delta, A, Bm, Cm, bias, h0, index)
    ctx.softplus = softplus


def _backward(ctx, dy: Tensor | None, dlast: Tensor | None):
    u, delta, A, Bm, Cm, bias, h0, index = ctx.saved_tensors
    if dy is None:
        dy = u.new_zeros(u.shape[0], u.shape[1], u.shape[3])
    grads = torch.ops.vmamba.multi_scan_backward(dy, dlast, u, delta, A, Bm, Cm, bias, h0, index, ctx.softplus)
    present = (u, delta, A, Bm, Cm, bias, h0)
    return (*(g if t is not None else None for g, t in zip(grads, present)), None, None)


_multi_scan_op.register_autograd(_backward, setup_context=_setup_context)


def _multi_scan_macs(u, delta, A, Bm, Cm, *rest, **kwargs) -> int:
    batch, length, directions, dim = delta
    return 9 * batch * length * directions * dim * A[1]  # the official selective-scan count per direction


register_macs(torch.ops.vmamba.multi_scan, _multi_scan_macs)
register_macs(
    torch.ops.vmamba.multi_scan_backward,
    lambda dy, dlast, u, delta, A, *rest, **kw: BACKWARD_MAC_FACTOR * _multi_scan_macs(u, delta, A, None, None),
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

    y, last = torch.ops.vmamba.multi_scan(
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


def fused_selective_scan_backward(
    grad_out: Tensor,
    grad_last: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    delta_softplus: bool,
) -> list[Tensor]:
    """Gradients ``[u, delta, A, B, C, D, z, delta_bias, initial_state]`` of :func:`fused_selective_scan`
    (empty tensors for absent inputs), computed without autograd, for callers that own their backward
    (the ``vmamba::selective_scan`` op runs below the autograd layer)."""
    batch, dim, length = u.shape
    groups = 1 if B.dim() == 3 else B.shape[1]
    per_group = dim // groups
    pad = -per_group % load().lanes

    def to_kernel(t: Tensor) -> Tensor:  # channels last, each group padded to whole SIMD blocks
        t = t.float()
        if pad:
            t = F.pad(t.unflatten(-1, (groups, per_group)), (0, pad)).flatten(-2)
        return t.contiguous()

    def from_kernel(t: Tensor) -> Tensor:
        return t.unflatten(-1, (groups, per_group + pad))[..., :per_group].flatten(-2) if pad else t

    Bg = B.unsqueeze(1) if B.dim() == 3 else B
    Cg = C.unsqueeze(1) if C.dim() == 3 else C
    u_k = to_kernel(u.transpose(1, 2).unsqueeze(2))  # (B, L, 1, D)
    delta_k = to_kernel(delta.transpose(1, 2).unsqueeze(2))
    A_k = to_kernel(A.t().unsqueeze(0))  # (1, N, D)
    B_k = Bg.permute(0, 3, 1, 2).unsqueeze(2).float().contiguous()  # (B, L, 1, G, N)
    C_k = Cg.permute(0, 3, 1, 2).unsqueeze(2).float().contiguous()
    bias_k = None if delta_bias is None else to_kernel(delta_bias.unsqueeze(0))
    h0_k = None if initial_state is None else to_kernel(initial_state.transpose(1, 2).unsqueeze(1))
    index = torch.arange(length, device=u.device).unsqueeze(0)
    u32, g = u.float(), grad_out.float()
    g_z = g_D = None
    if z is not None:  # out = (y_ssm + D u) * silu(z)
        y_ssm, _ = torch.ops.vmamba.multi_scan(u_k, delta_k, A_k, B_k, C_k, bias_k, h0_k, index, delta_softplus)
        y = from_kernel(y_ssm).transpose(1, 2)
        if D is not None:
            y = y + u32 * D.float()[:, None]
        sig = torch.sigmoid(z.float())
        g_z = g * y * sig * (1 + z.float() * (1 - sig))
        g = g * z.float() * sig
    if D is not None:
        g_D = (g * u32).sum((0, 2))
    grads = torch.ops.vmamba.multi_scan_backward(
        to_kernel(g.transpose(1, 2)), None if grad_last is None else to_kernel(grad_last.transpose(1, 2).unsqueeze(1)),
        u_k, delta_k, A_k, B_k, C_k, bias_k, h0_k, index, delta_softplus,
    )
    du, ddelta, dA, dB, dC, dbias, dh0 = grads
    g_u = from_kernel(du)[:, :, 0].transpose(1, 2)
    if D is not None:
        g_u = g_u + g * D.float()[:, None]
    result = [
        g_u,
        from_kernel(ddelta)[:, :, 0].transpose(1, 2),
        from_kernel(dA)[0].t(),
        dB[:, :, 0].permute(0, 2, 3, 1).reshape(B.shape),
        dC[:, :, 0].permute(0, 2, 3, 1).reshape(C.shape),
        g_D,
        g_z,
        None if delta_bias is None else from_kernel(dbias)[0],
        None if initial_state is None else from_kernel(dh0)[:, 0].transpose(1, 2),
    ]
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return [u.new_empty(0) if t is None else r.to(t.dtype).contiguous() for r, t in zip(result, inputs)]
