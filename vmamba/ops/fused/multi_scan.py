"""Autograd wrappers around the fused C++ selective scans (``multi_scan.cpp``).

Two entry points share one kernel core (tile staging, the recurrence, the tiled reverse sweep):

* :func:`fused_multi_scan` -- K directions of one channels-last map ``(B, L, D)``, scanned in place along
  index orders and merged by summation (the VMamba SS2D path). Channels are zero-padded per group to whole
  SIMD blocks here. When a backward will run, the forward keeps the state before every tile of every
  direction (:func:`multi_checkpoints_shape`), as below. With ``dt_weight`` the step sizes come in low-rank
  form (VMamba's / Vim's dt projection, ``delta = dt_weight[k] @ rows``) and the kernel projects them tile by
  tile, forward and backward, so the ``(B, L, K, D)`` delta and its gradient never exist in memory.
* :func:`fused_selective_scan` -- mamba-ssm's ``selective_scan_fn`` layout ``(B, D, L)``, read and written in
  place by the kernel (no transposed, padded or gated copies: each task transposes a W-channel x 64-step tile
  through cache-resident buffers), with the D skip and the ``silu(z)`` gate fused, forward and backward.
  When a backward will run, the forward keeps the state before every 64-step tile
  (:func:`selective_checkpoints_shape`, about N/64 of the input size), so the backward recomputes states
  tile by tile instead of re-running the whole forward. :func:`fused_selective_scan_forward` and
  :func:`fused_selective_scan_backward` are the same kernels without autograd, for the
  ``vmamba::selective_scan`` dispatcher op.

Both are ``torch.library`` custom ops with FLOP formulas, so ``torch.compile`` and FlopCounterMode see one op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..flops import BACKWARD_MAC_FACTOR, register_macs, selective_scan_macs
from .loader import load

__all__ = [
    "fused_multi_scan",
    "multi_checkpoints_shape",
    "fused_selective_scan",
    "fused_selective_scan_forward",
    "fused_selective_scan_backward",
    "selective_checkpoints_shape",
]

_EMPTY = torch.empty(0)

# Index tensors already checked to be row-wise permutations, with the version counter they had then: a model
# passes the same cached index on every call, and the check (a sort) cost ~0.8 ms per vmamba_t forward at
# batch 1. An in-place change bumps the version, and the tensor is checked again. Inference tensors have no
# version counter and are checked on every call (the kernel checks every index again in any case).
_CHECKED_INDICES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _check_index(index: Tensor, length: int) -> None:
    """Raise unless ``index`` is ``(K, length)`` with each row a permutation of ``0 .. length-1``."""
    if index.dim() != 2 or index.shape[1] != length:
        raise ValueError(f"index must be (K, {length}), got {tuple(index.shape)}")
    if torch.compiler.is_compiling() or type(index) is not Tensor:
        return  # traced (fake / symbolic values): the kernel checks the real index when the graph runs
    versioned = not index.is_inference()
    if versioned and _CHECKED_INDICES.get(index) == index._version:
        return
    if not torch.equal(index.sort(dim=1).values.cpu(), torch.arange(length).expand_as(index)):
        raise ValueError("each row of index must be a permutation of the map rows 0 .. L-1")
    if versioned:
        _CHECKED_INDICES[index] = index._version


def _opt(t: Tensor | None) -> Tensor:
    return _EMPTY if t is None else t


def _dense(t: Tensor) -> bool:
    """Whether ``t`` is a permutation of a contiguous layout (no gaps, no overlaps)."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def multi_checkpoints_shape(u: Tensor, delta: Tensor, A: Tensor) -> tuple[int, int, int, int, int]:
    """Shape of the states the map-layout forward keeps for the backward: (tasks, K, tiles, N, lanes), a
    task being one batch item's block of SIMD-width channels and a tile :data:`TILE` steps; ``u`` and
    ``delta`` are the kernel's (channel-padded) ``(B, L, Ku, D)`` and ``(B, L, K, D or R)`` inputs. About
    N/64 of the full delta's size."""
    ext = load()
    batch, length, directions = delta.shape[:3]
    dim = u.shape[-1]
    return batch * (dim // ext.lanes), directions, -(-length // ext.tile), A.shape[1], ext.lanes


@torch.library.custom_op("vmamba::multi_scan", mutates_args=())
def _multi_scan_op(
    u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, bias: Tensor | None, h0: Tensor | None,
    index: Tensor, softplus: bool, keep_checkpoints: bool, D: Tensor | None = None, dt_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``y (B, L, D)``, ``last (B, K, N, D)`` and the backward's checkpoints (empty without
    ``keep_checkpoints``). With ``dt_weight (K, R, D)``, ``delta`` holds the low-rank rows ``(B, L, K, R)``."""
    y, last, marks = load().forward(
        u, delta, A, Bm, Cm, _opt(bias), _opt(h0), index, softplus, keep_checkpoints, _opt(D), _opt(dt_weight)
    )
    return y, last, marks


@_multi_scan_op.register_fake
def _(u, delta, A, Bm, Cm, bias, h0, index, softplus, keep_checkpoints, D=None, dt_weight=None):
    batch, length, _, dim = u.shape
    marks = multi_checkpoints_shape(u, delta, A) if keep_checkpoints else (0,)
    return (
        u.new_empty(batch, length, dim),
        u.new_empty(batch, delta.shape[2], A.shape[1], dim),
        u.new_empty(marks),
    )


@torch.library.custom_op("vmamba::multi_scan_backward", mutates_args=())
def _multi_scan_backward_op(
    dy: Tensor, dlast: Tensor | None, u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor,
    bias: Tensor | None, h0: Tensor | None, index: Tensor, softplus: bool, checkpoints: Tensor | None = None,
    D: Tensor | None = None, dt_weight: Tensor | None = None,
) -> list[Tensor]:
    """Gradients ``[u, delta, A, B, C, bias, h0, D, dt_weight]`` (empty tensors for absent inputs; ``delta``:
    the low-rank rows with ``dt_weight``). ``checkpoints`` from the forward save the kernel a forward sweep;
    without them it recomputes the states."""
    du, ddelta, dA_part, dB, dC, dbias_part, dh0, dD_part, dW_part = load().backward(
        u, delta, A, Bm, Cm, _opt(bias), _opt(h0), index, softplus, dy.contiguous().float(),
        _EMPTY if dlast is None else dlast.contiguous().float(), _opt(checkpoints), _opt(D), _opt(dt_weight),
    )
    # Shared parameters come back per batch item: sum them here.
    return [
        du,
        ddelta,
        dA_part.sum(0),
        dB,
        dC,
        dbias_part.sum(0) if bias is not None else u.new_empty(0),
        dh0 if h0 is not None else u.new_empty(0),
        dD_part.sum(0) if D is not None else u.new_empty(0),
        dW_part.sum(0) if dt_weight is not None else u.new_empty(0),
    ]


@_multi_scan_backward_op.register_fake
def _(dy, dlast, u, delta, A, Bm, Cm, bias, h0, index, softplus, checkpoints=None, D=None, dt_weight=None):
    return [
        torch.empty_like(t) if t is not None else u.new_empty(0)
        for t in (u, delta, A, Bm, Cm, bias, h0, D, dt_weight)
    ]


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, Bm, Cm, bias, h0, index, softplus, _, D, dt_weight = inputs
    marks = output[2]
    ctx.save_for_backward(u, delta, A, Bm, Cm, bias, h0, index, marks if marks.numel() else None, D, dt_weight)
    ctx.softplus = softplus


def _backward(ctx, dy: Tensor | None, dlast: Tensor | None, _dmarks: Tensor | None):
    u, delta, A, Bm, Cm, bias, h0, index, marks, D, dt_weight = ctx.saved_tensors
    if dy is None:
        dy = u.new_zeros(u.shape[0], u.shape[1], u.shape[3])
    grads = torch.ops.vmamba.multi_scan_backward(
        dy, dlast, u, delta, A, Bm, Cm, bias, h0, index, ctx.softplus, marks, D, dt_weight
    )
    inputs = (u, delta, A, Bm, Cm, bias, h0, D, dt_weight)  # the differentiable ones, in the op's order
    g = [grad if t is not None else None for grad, t in zip(grads, inputs)]
    return (*g[:7], None, None, None, *g[7:])  # no gradient for index, softplus, keep_checkpoints


_multi_scan_op.register_autograd(_backward, setup_context=_setup_context)


def _multi_scan_macs(u, delta, A, *rest, dt_weight=None, **kwargs) -> int:
    batch, length, directions = delta[:3]
    dim = u[-1]
    macs = 9 * batch * length * directions * dim * A[1]  # the official selective-scan count per direction
    if dt_weight is not None:  # the low-rank delta's product (the dt projection, counted as its einsum would be)
        macs += batch * length * directions * dim * dt_weight[1]
    return macs


def _multi_scan_op_macs(u, delta, A, Bm, Cm, bias, h0, index, softplus, keep, D=None, dt_weight=None) -> int:
    return _multi_scan_macs(u, delta, A, dt_weight=dt_weight)


def _multi_scan_backward_macs(dy, dlast, u, delta, A, Bm, Cm, bias, h0, index, softplus, checkpoints=None, D=None,
                              dt_weight=None) -> int:
    return BACKWARD_MAC_FACTOR * _multi_scan_macs(u, delta, A, dt_weight=dt_weight)


register_macs(torch.ops.vmamba.multi_scan, _multi_scan_op_macs)
register_macs(torch.ops.vmamba.multi_scan_backward, _multi_scan_backward_macs)


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
    D: Tensor | None = None,
    dt_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Selective scans of one map along K directions, merged by summation, in one fused pass.

    Direction ``k`` visits map row ``index[k, t]`` at step ``t``; every direction reads the same ``u``.

    Args:
        u: ``(B, L, D)`` map rows (channels last), shared by every direction, or ``(B, L, K, D)``, one
            input per direction (still in map-row order).
        delta: ``(B, L, K, D)`` raw step sizes per direction, in map-row order; or, with ``dt_weight``, their
            low-rank rows ``(B, L, K, R)`` (any strides, e.g. a slice of the x_proj output).
        A: ``(K, N, D)`` (negative) decay rates.
        B, C: ``(B, L, K, G, N)``; group ``g`` serves channels ``g*D/G .. (g+1)*D/G - 1``.
        index: ``(K, L)`` row order of each direction: each row a permutation of ``0 .. L-1``.
        delta_bias: ``(K, D)`` added to ``delta`` before the softplus.
        initial_state: ``(B, K, N, D)``.
        D: ``(K, D)`` D skip per direction: adds ``D[k] * u`` (``u[:, :, k]`` with one input per direction).
        dt_weight: ``(K, D, R)``: the raw step sizes are ``delta[b, l, k] = dt_weight[k] @ rows[b, l, k]`` (VMamba's
            dt projection), computed inside the kernel tile by tile: neither they nor their gradient is ever
            materialised. Differentiable in the rows and in ``dt_weight``.

    Returns:
        ``y (B, L, D)``: ``sum_k <C, h> (+ D[k] u)`` per row (no gate), and ``last_state (B, K, N, D)``.
    """
    if u.dim() == 3:
        u = u.unsqueeze(2)
    _check_index(index, u.shape[1])
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

    def prep_delta(t: Tensor) -> Tensor:
        """Like ``prep``, but a dense delta with unit channel stride is passed as it is: the kernel reads any
        such strides (the dt projection's einsum gives (K, B, L, D) memory order; its contiguous copy took
        ~16 ms per call at vmamba_t's first stage, batch 8, more than the scan's forward)."""
        t = t.float()
        if pad or t.stride(-1) != 1 or not _dense(t):
            return prep(t)
        return t

    if dt_weight is not None:
        if dt_weight.dim() != 3 or dt_weight.shape[:2] != (delta.shape[2], dim) or dt_weight.shape[2] != delta.shape[3]:
            raise ValueError(
                f"dt_weight must be (K, D, R) = ({delta.shape[2]}, {dim}, {delta.shape[3]}) for rows of shape "
                f"{tuple(delta.shape)}, got {tuple(dt_weight.shape)}"
            )
        if dt_weight.shape[2] > load().max_rank:  # beyond the kernel's rank: project here, scan the full delta
            delta, dt_weight = torch.einsum("blkr,kdr->blkd", delta, dt_weight), None
    if dt_weight is None:
        delta = prep_delta(delta)
    else:
        rows = delta.float()
        delta = rows if rows.stride(-1) == 1 else rows.contiguous()
        dt_weight = prep(dt_weight.transpose(1, 2))  # (K, R, D): each rank's channel vector contiguous
    tensors = (u, delta, A, B, C, delta_bias, initial_state, D, dt_weight)
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, last, _ = torch.ops.vmamba.multi_scan(
        prep(u), delta, prep(A), B.float().contiguous(), C.float().contiguous(), prep(delta_bias),
        prep(initial_state), index.to(torch.int64).contiguous(), bool(delta_softplus), keep, prep(D), dt_weight,
    )
    if pad:
        unpad = lambda t: t.unflatten(-1, (groups, per_group + pad))[..., :per_group].flatten(-2)  # noqa: E731
        y, last = unpad(y), unpad(last)
    return y, last


# ----------------------------------------------------------------------------------------------------------
# mamba-ssm (B, D, L) layout: the kernel reads and writes this layout in place (no transposed copies) and
# fuses the D skip and the silu(z) gate, forward and backward.
# ----------------------------------------------------------------------------------------------------------


def _f32(t: Tensor | None) -> Tensor:
    """float32 and contiguous (no copy when it already is); ``_EMPTY`` for an absent input."""
    return _EMPTY if t is None else t.float().contiguous()


def _grouped(t: Tensor) -> Tensor:
    """``(B, N, L)`` -> ``(B, 1, N, L)``; grouped ``(B, G, N, L)`` unchanged."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def selective_checkpoints_shape(u: Tensor, A: Tensor, B: Tensor) -> tuple[int, int, int, int]:
    """Shape of the states the forward keeps for the backward: (tasks, tiles, N, lanes), a task being one
    batch item's block of SIMD-width channels of one group and a tile :data:`TILE` steps."""
    ext = load()
    batch, dim, length = u.shape
    groups = 1 if B.dim() == 3 else B.shape[1]
    blocks = -(-(dim // groups) // ext.lanes)
    return batch * groups * blocks, -(-length // ext.tile), A.shape[1], ext.lanes


def fused_selective_scan_forward(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, initial_state: Tensor | None, delta_softplus: bool, keep_checkpoints: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's forward without autograd: ``out (B, D, L)`` and ``last_state (B, D, N)`` in float32,
    and with ``keep_checkpoints`` the states the backward restarts from (see
    :func:`selective_checkpoints_shape`; an empty tensor otherwise), for callers that own their backward."""
    out, last, marks = load().selective_forward(
        _f32(u), _f32(delta), _f32(A), _f32(_grouped(B)), _f32(_grouped(C)), _f32(D), _f32(z), _f32(delta_bias),
        _f32(initial_state), bool(delta_softplus), bool(keep_checkpoints),
    )
    return out, last, marks


@torch.library.custom_op("vmamba::fused_selective_scan", mutates_args=())
def _selective_op(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, initial_state: Tensor | None, delta_softplus: bool, keep_checkpoints: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``out (B, D, L)``, ``last_state (B, D, N)`` (float32) and the backward's checkpoints."""
    return fused_selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, keep_checkpoints)


@_selective_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, keep_checkpoints):
    marks = selective_checkpoints_shape(u, A, B) if keep_checkpoints else (0,)
    return (
        u.new_empty(u.shape, dtype=torch.float32),
        u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32),
        u.new_empty(marks, dtype=torch.float32),
    )


def _selective_backward(
    grad_out: Tensor, grad_last: Tensor | None, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, initial_state: Tensor | None,
    delta_softplus: bool, checkpoints: Tensor | None,
) -> list[Tensor]:
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = load().selective_backward(
        _f32(u), _f32(delta), _f32(A), _f32(_grouped(B)), _f32(_grouped(C)), _f32(D), _f32(z), _f32(delta_bias),
        _f32(initial_state), delta_softplus, _f32(grad_out), _f32(grad_last), _f32(checkpoints),
    )
    # Shared parameters come back per batch item (B, ...): sum them here.
    result = [du, ddelta, dA.sum(0), dB.reshape(B.shape), dC.reshape(C.shape), dD.sum(0), dz, dbias.sum(0), dh0]
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return [u.new_empty(0) if t is None else r.to(t.dtype) for r, t in zip(result, inputs)]


@torch.library.custom_op("vmamba::fused_selective_scan_backward", mutates_args=())
def _selective_backward_op(
    grad_out: Tensor, grad_last: Tensor | None, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, initial_state: Tensor | None,
    delta_softplus: bool, checkpoints: Tensor | None,
) -> list[Tensor]:
    """Gradients ``[u, delta, A, B, C, D, z, delta_bias, initial_state]`` (empty tensors for absent inputs)."""
    return _selective_backward(
        grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, checkpoints
    )


@_selective_backward_op.register_fake
def _(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, checkpoints):
    return [torch.empty_like(t) if t is not None else u.new_empty(0) for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]


def _selective_setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, _ = inputs
    marks = output[2]
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, marks if marks.numel() else None)
    ctx.delta_softplus = delta_softplus


def _selective_autograd(ctx, grad_out: Tensor | None, grad_last: Tensor | None, _grad_marks: Tensor | None):
    *saved, marks = ctx.saved_tensors
    u = saved[0]
    if grad_out is None:
        grad_out = torch.zeros_like(u, dtype=torch.float32)
    grads = torch.ops.vmamba.fused_selective_scan_backward(grad_out, grad_last, *saved, ctx.delta_softplus, marks)
    return (*(g if t is not None else None for g, t in zip(grads, saved)), None, None)


_selective_op.register_autograd(_selective_autograd, setup_context=_selective_setup_context)


def _selective_macs(u, delta, A, B, C, D, z, *rest, **kwargs) -> int:
    return selective_scan_macs(u, A[1], with_d=D is not None, with_z=z is not None)


register_macs(torch.ops.vmamba.fused_selective_scan, _selective_macs)
register_macs(
    torch.ops.vmamba.fused_selective_scan_backward,
    lambda grad_out, grad_last, u, delta, A, B, C, D, z, *rest, **kw: BACKWARD_MAC_FACTOR
    * _selective_macs(u, delta, A, B, C, D, z),
)


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
    """mamba-ssm ``selective_scan_fn`` layout on the fused kernel (see :func:`vmamba.ops.selective_scan`).

    Args:
        u, delta, z: ``(B, D, L)``; A: ``(D, N)``; B, C: ``(B, N, L)`` or grouped ``(B, G, N, L)``;
        D, delta_bias: ``(D,)``; initial_state: ``(B, D, N)``. Any channel count, ``N <= 64``.

    Returns:
        ``out (B, D, L)`` in ``u``'s dtype and, with ``return_last_state``, ``last_state (B, D, N)`` (float32).
        Differentiable in every tensor input.
    """
    groups = 1 if B.dim() == 3 else B.shape[1]
    if u.shape[1] % groups != 0:
        raise ValueError(f"{groups} groups do not divide {u.shape[1]} channels")
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, last, _ = torch.ops.vmamba.fused_selective_scan(*tensors, bool(delta_softplus), keep)
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out


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
    checkpoints: Tensor | None = None,
) -> list[Tensor]:
    """Gradients ``[u, delta, A, B, C, D, z, delta_bias, initial_state]`` of :func:`fused_selective_scan`
    (empty tensors for absent inputs), computed without autograd, for callers that own their backward
    (the ``vmamba::selective_scan`` op runs below the autograd layer). ``checkpoints`` from
    :func:`fused_selective_scan_forward` saves the backward a forward sweep; without them it recomputes."""
    if checkpoints is not None and checkpoints.numel() == 0:
        checkpoints = None
    return _selective_backward(
        grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, checkpoints
    )
