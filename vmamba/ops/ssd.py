"""Mamba-2 state-space duality (SSD): a selective scan with one scalar decay per head.

``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_tᵀ``, ``y_t = h_t C_t + D x_t``, optionally ``y_t *= silu(z_t)``;
``dt = softplus(dt + dt_bias)`` when asked.

Layouts follow mamba-ssm's ``mamba_chunk_scan_combined`` (time-major): ``x, z: (B, T, H, P)``,
``dt: (B, T, H)``, ``A: (H,)`` (negative), ``B, C: (B, T, G, N)`` where group ``g`` serves heads
``g * H/G ... (g+1) * H/G - 1``, ``D: (H,)`` or ``(H, P)``, ``dt_bias: (H,)``, state ``(B, H, P, N)``.
Like ``mamba_chunk_scan_combined``, every form returns ``y (B, T, H, P)``, or ``(y, final_states (B, H, P, N))``
with ``return_final_states=True``; it accumulates in float32 whatever the input dtype (float64 stays float64;
autocast is off inside), returns ``y`` in ``x``'s dtype and the state in the accumulation dtype. ``dt_limit``
clamps the step sizes after the bias and softplus, as mamba-ssm does when it is not ``(0, inf)``.

Packed sequences, as in mamba-ssm: ``seq_idx (B, T)`` numbers the sequence each token belongs to
(non-decreasing along T); the scan restarts where it changes, and ``initial_states`` is the state before
sequence 0 (dropped when the first token's index is not 0). With ``return_varlen_states=True`` and
``cu_seqlens (S + 1,)`` (the sequences' start offsets and the total length; batch 1) the forms also return
the state after each sequence's last token, ``(S, H, P, N)``: ``(y, varlen_states)``, or
``(y, final_states, varlen_states)`` with ``return_final_states``.

SSD is decayed linear attention with ``q = C``, ``k = B``, ``v = dt * x`` and the log-decay ``dt * A``, so
the chunked and quadratic forms run on :func:`vmamba.ops.chunking.chunked_heads_decay_attention`: time-major,
a group's heads side by side, B and C shared (the ``C Bᵀ`` products, the state write ``Bᵀ v`` and read
``C S`` are one matmul per group and chunk for all its heads).

Forms, all giving the same numbers:

* :func:`ssd_ref` — the plain loop over T, the reference.
* :func:`ssd` (default) — chunked: dense matmuls inside chunks, a short loop over chunks carrying the state.
  When no input needs a gradient (inference) and the fused backend is active, it runs the fused C++
  recurrence instead (:mod:`vmamba.ops.fused.recurrence`; float32 / half on CPU).
* :func:`ssd_quadratic` / :func:`ssd_mixing_matrix` — the quadratic form ``y = M (x) + D x`` with the
  semi-separable ``M[t, s] = C_t . B_s exp(sum_{s<u<=t} dt_u A) dt_s``.
* :func:`ssd_step` — one token, for streaming inference (mamba-ssm's ``selective_state_update`` order).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunking import chunked_heads_decay_attention, compute_dtype, decay_attention_matrix
from .fused.recurrence import fused_recurrence, fused_recurrence_applies
from .varlen import PackedSequences

__all__ = ["ssd", "ssd_ref", "ssd_step", "ssd_quadratic", "ssd_mixing_matrix"]

NO_DT_LIMIT = (0.0, math.inf)  # mamba-ssm's default ``dt_limit``: no clamp


def _check(
    x: Tensor | None,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
) -> None:
    if dt.dim() != 3:
        raise ValueError(f"dt must be (B, T, H), got {tuple(dt.shape)}")
    batch, length, heads = dt.shape
    if x is not None and (x.dim() != 4 or x.shape[:3] != dt.shape):
        raise ValueError(f"x must be (B, T, H, P) with (B, T, H) = {tuple(dt.shape)}, got {tuple(x.shape)}")
    if A.shape != (heads,):
        raise ValueError(f"A must be (H,) = ({heads},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (batch, length):
        raise ValueError(f"B must be (B, T, G, N) with (B, T) = {(batch, length)}, got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C must match B {tuple(B.shape)} (B, T, G, N), got {tuple(C.shape)}")
    if heads % B.shape[2] != 0:
        raise ValueError(f"the number of groups G={B.shape[2]} must divide the number of heads H={heads}")
    if dt_bias is not None and dt_bias.shape != (heads,):
        raise ValueError(f"dt_bias must be (H,) = ({heads},), got {tuple(dt_bias.shape)}")
    if x is None:
        return
    head_dim = x.shape[3]
    if D is not None and D.shape not in ((heads,), (heads, head_dim)):
        raise ValueError(f"D must be (H,) = ({heads},) or (H, P) = {(heads, head_dim)}, got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must match x {tuple(x.shape)}, got {tuple(z.shape)}")
    if initial_states is not None:
        expected = (batch, heads, head_dim, B.shape[3])
        if tuple(initial_states.shape) != expected:
            raise ValueError(
                f"initial_states must be (B, H, P, N) = {expected}, got {tuple(initial_states.shape)}"
            )


def _check_dt_limit(dt_limit: tuple[float, float]) -> None:
    if len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"dt_limit must be a pair (low, high) with low <= high, got {dt_limit!r}")


def _prepare_dt(
    dt: Tensor,
    A: Tensor,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dtype: torch.dtype,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
) -> tuple[Tensor, Tensor]:
    """``(dt, log_decay = dt * A)``, both ``(B, T, H)`` in ``dtype``: ``dt`` plus the bias, through softplus
    when asked, clamped to ``dt_limit`` unless that is ``(0, inf)``; raises if the decay would grow."""
    _check_dt_limit(dt_limit)
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != NO_DT_LIMIT:
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    log_decay = dt * A.to(dtype)
    if log_decay.numel() and (top := float(log_decay.detach().amax())) > 0:
        raise ValueError(
            "dt * A must be <= 0 (a decay): A must be negative and dt non-negative (use dt_softplus=True); "
            f"got a maximum of {top:.4g}"
        )
    return dt, log_decay


def _grouped(t: Tensor, groups: int) -> Tensor:
    """``(B, T, H, D) -> (B, G, H/G, T, D)``: heads sorted into their B/C groups."""
    return t.transpose(1, 2).unflatten(1, (groups, -1))


def _finish(
    y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """``y + D x``, then ``* silu(z)``; back to ``x``'s dtype."""
    if D is not None:
        D = D.to(dtype)
        y = y + x.to(dtype) * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype)


def _returned(
    y: Tensor, final: Tensor | None, varlen: Tensor | None, return_final_states: bool
) -> Tensor | tuple[Tensor, ...]:
    """mamba-ssm's return convention: ``y``, then ``final_states`` and ``varlen_states`` when asked for."""
    extra = ((final,) if return_final_states else ()) + ((varlen,) if varlen is not None else ())
    return (y, *extra) if extra else y


def _resets(seq_idx: Tensor | None, batch: int, length: int) -> Tensor | None:
    """``(B, T)`` bool, True where a packed sequence starts (``seq_idx`` changes; at ``t = 0`` when the first
    index is not 0, whose sequence the initial state belongs to, as in mamba-ssm); None without ``seq_idx``."""
    if seq_idx is None:
        return None
    if seq_idx.shape != (batch, length):
        raise ValueError(f"seq_idx must be (B, T) = {(batch, length)}, got {tuple(seq_idx.shape)}")
    if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
        raise ValueError(f"seq_idx must hold integer sequence indices, got {seq_idx.dtype}")
    previous = torch.cat([seq_idx.new_zeros(batch, min(length, 1)), seq_idx[:, :-1]], dim=1)
    if bool((seq_idx < previous).any()):
        raise ValueError("seq_idx must be non-negative and non-decreasing along T (the packed sequences in order)")
    return seq_idx != previous


def _sequence_bounds(
    cu_seqlens: Tensor | None, resets: Tensor | None, batch: int, length: int
) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the packed sequences named by ``cu_seqlens``, checked against the restarts
    ``seq_idx`` marks (``return_varlen_states`` needs both, and batch 1)."""
    if cu_seqlens is None:
        raise ValueError("return_varlen_states needs cu_seqlens, the (S + 1,) start offsets of the packed sequences")
    if resets is None:
        raise ValueError("return_varlen_states needs seq_idx, so that the scan restarts at every packed sequence")
    lengths = PackedSequences.of(cu_seqlens, batch, length).lengths  # batch 1, integer offsets rising 0..T
    offsets = [0, *lengths.cumsum(0).tolist()]
    starts = torch.zeros(length, dtype=torch.bool, device=resets.device)
    starts[[c for c in offsets[1:-1] if 0 < c < length]] = True
    if not torch.equal(starts[1:], resets[0, 1:]):
        raise ValueError("seq_idx and cu_seqlens disagree about where the packed sequences start")
    return list(zip(offsets, offsets[1:]))


def _packing(
    seq_idx: Tensor | None, cu_seqlens: Tensor | None, return_varlen_states: bool, batch: int, length: int
) -> tuple[Tensor | None, list[tuple[int, int]] | None]:
    """``(resets, bounds)``: where the scan restarts (:func:`_resets`) and, for ``return_varlen_states``, the
    packed sequences' ``(start, end)`` (:func:`_sequence_bounds`); Nones where not asked for."""
    resets = _resets(seq_idx, batch, length)
    return resets, _sequence_bounds(cu_seqlens, resets, batch, length) if return_varlen_states else None


def _varlen_states(
    x: Tensor,
    dt: Tensor,
    B: Tensor,
    log_decay: Tensor,
    initial_states: Tensor | None,
    resets: Tensor,
    bounds: list[tuple[int, int]],
) -> Tensor:
    """``(S, H, P, N)``: the state after each packed sequence's last token, ``sum_s exp(G_e - G_s) v_s B_sᵀ``
    over the sequence's tokens (``v = dt x``; ``x (1, T, H, P)``, prepared ``dt (1, T, H)`` in the compute
    dtype, ``B (1, T, G, N)``, ``log_decay (1, T, H)``), plus the decayed initial state for the sequence holding
    token 0 unless the scan restarts there; zeros for an empty sequence. Cumulative log-decays in float64."""
    dtype = dt.dtype
    v = x.to(dtype) * dt[..., None]
    heads, head_dim = v.shape[2:]
    groups, d_state = B.shape[2:]
    cum = log_decay[0].to(torch.float64).cumsum(0)  # (T, H), G_t inclusive
    states = []
    for start, end in bounds:
        if end == start:
            states.append(v.new_zeros(heads, head_dim, d_state))
            continue
        weight = torch.exp((cum[end - 1] - cum[start:end]).to(dtype))  # (t, H): exp(G_e - G_s)
        vs = (v[0, start:end] * weight[..., None]).unflatten(1, (groups, -1))  # (t, G, R, P)
        state = torch.einsum("tgrp,tgn->grpn", vs, B[0, start:end].to(dtype)).reshape(heads, head_dim, d_state)
        if start == 0 and initial_states is not None and not bool(resets[0, 0]):
            state = state + torch.exp(cum[end - 1].to(dtype))[:, None, None] * initial_states[0].to(dtype)
        states.append(state)
    return torch.stack(states)


def _run(
    form,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    initial_states: Tensor | None,
    seq_idx: Tensor | None,
    cu_seqlens: Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    return_final_states: bool,
    return_varlen_states: bool,
    **kwargs,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(y, final_states or None, varlen_states or None)`` of ``form`` (a :mod:`vmamba.ops.chunking` engine)
    on SSD's inputs."""
    _check(x, dt, A, B, C, D, z, dt_bias, initial_states)
    batch, length, heads, head_dim = x.shape
    resets, bounds = _packing(seq_idx, cu_seqlens, return_varlen_states, batch, length)
    with torch.autocast(x.device.type, enabled=False):
        dtype = compute_dtype(x, dt, A, B, C)
        groups = B.shape[2]
        dt, log_decay = _prepare_dt(dt, A, dt_bias, dt_softplus, dtype, dt_limit)
        # time-major, groups folded into the batch: (B G, T, ...) with a group's R heads side by side
        per_group = heads // groups
        v = (x.to(dtype) * dt[..., None]).view(batch, length, groups, per_group, head_dim)
        v = v.transpose(1, 2).reshape(batch * groups, length, per_group, head_dim)
        q, k = (t.to(dtype).transpose(1, 2).reshape(batch * groups, length, t.shape[-1]) for t in (C, B))
        g = log_decay.view(batch, length, groups, per_group).transpose(1, 2)
        g = g.reshape(batch * groups, length, per_group)
        state = None
        if initial_states is not None:  # (B, H, P, N) -> (B G, N, R, P): the engine's state is K x (R V)
            state = initial_states.to(dtype).view(batch, groups, per_group, head_dim, B.shape[3])
            state = state.permute(0, 1, 4, 2, 3)
            state = state.reshape(batch * groups, B.shape[3], per_group, head_dim)
        group_resets = None if resets is None else resets.repeat_interleave(groups, dim=0)
        y, state = form(q, k, v, g, state, resets=group_resets, **kwargs)  # (B G, T, R, P), (B G, N, R, P)
        y = y.view(batch, groups, length, per_group, head_dim).transpose(1, 2).reshape(batch, length, heads, head_dim)
        final = None
        if return_final_states:
            final = state.view(batch, groups, B.shape[3], per_group, head_dim).permute(0, 1, 3, 4, 2)
            final = final.reshape(batch, heads, head_dim, B.shape[3])
        varlen = None
        if bounds is not None:
            varlen = _varlen_states(x, dt, B, log_decay, initial_states, resets, bounds)
        return _finish(y, x, D, z, dtype), final, varlen


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 32,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
    return_final_states: bool = False,
    return_varlen_states: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Chunked SSD (the default form), argument for argument like ``mamba_chunk_scan_combined``.

    Args:
        x: ``(B, T, H, P)``.
        dt: ``(B, T, H)`` step sizes (before ``dt_bias`` / softplus when those are given).
        A: ``(H,)`` negative decay rates (``-exp(A_log)``).
        B, C: ``(B, T, G, N)``, ``G`` dividing ``H``.
        chunk_size: tokens per chunk. 32 (mamba-ssm uses 256 on GPUs): measured on CPU at T=3136, 6 heads
            of 32, d_state 64, it is as fast as 64 for mild decays and about 1.7x faster for strong ones, whose
            (chunk, head) pairs past the factorisation's range need the exact masked block (see
            :func:`vmamba.ops.chunking.chunked_heads_decay_attention`).
        D: ``(H,)`` or ``(H, P)`` skip connection.
        z: ``(B, T, H, P)`` gate: ``y * silu(z)``.
        dt_bias: ``(H,)`` added to dt.
        initial_states: ``(B, H, P, N)``; zeros when None. With ``seq_idx``, the state before sequence 0.
        seq_idx: ``(B, T)`` integers, non-decreasing along T: the packed sequence of each token; the scan
            restarts wherever it changes (and at ``t = 0`` when it is not 0 there, dropping the initial state).
        cu_seqlens: ``(S + 1,)`` the packed sequences' start offsets and T; read only for
            ``return_varlen_states`` (then batch 1, and ``seq_idx`` must mark the same sequences).
        dt_softplus: apply softplus to ``dt (+ dt_bias)``.
        dt_limit: ``(low, high)``: the step sizes (after bias and softplus) are clamped to it unless it is
            ``(0, inf)`` (the default, no clamp); outside it their gradient is zero.
        return_final_states: also return the state after the last token.
        return_varlen_states: also return the state after each packed sequence's last token (differentiable,
            unlike mamba-ssm's).

    Returns:
        ``y (B, T, H, P)`` in x's dtype; ``(y, final_states (B, H, P, N))`` with ``return_final_states``;
        ``(y, varlen_states (S, H, P, N))`` with ``return_varlen_states``; ``(y, final_states, varlen_states)``
        with both. States in float32 (float64 for float64 inputs).

    Raises:
        ValueError: mismatched shapes, a wrong state shape, ``G`` not dividing ``H``, a growing decay
        (``dt * A > 0``), a bad chunk size or ``dt_limit``, a decreasing ``seq_idx``, ``cu_seqlens`` missing
        or disagreeing with ``seq_idx``.

    Example:
        >>> x = torch.randn(1, 100, 6, 32); dt = torch.randn(1, 100, 6); A = -torch.rand(6)
        >>> B = C = torch.randn(1, 100, 1, 64)
        >>> y, h = ssd(x, dt, A, B, C, dt_softplus=True, return_final_states=True)  # h: (1, 6, 32, 64)
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    arguments = (
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus, dt_limit,
        return_final_states, return_varlen_states,
    )
    if fused_recurrence_applies(x, dt, A, B, C, D, z, dt_bias, initial_states):
        outputs = _fused(*arguments)
    else:
        outputs = _run(chunked_heads_decay_attention, *arguments, chunk_size=chunk_size)
    return _returned(*outputs, return_final_states)


def _fused(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    initial_states: Tensor | None,
    seq_idx: Tensor | None,
    cu_seqlens: Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    return_final_states: bool,
    return_varlen_states: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Inference on the fused C++ recurrence: ``q = C``, ``k = B`` (grouped: the kernel maps head h to group
    ``h // (H / G)``), ``v = dt x`` (``dt`` as the kernel's ``v_scale``), a scalar log-decay ``dt A`` per
    head, ``-inf`` where a packed sequence restarts (``exp`` gives exactly 0); its ``N x P`` state is the
    transpose of SSD's ``(P, N)`` one. Arguments as :func:`_run` without the chunked form;
    returns ``(y, final_states or None, varlen_states or None)``."""
    _check(x, dt, A, B, C, D, z, dt_bias, initial_states)
    resets, bounds = _packing(seq_idx, cu_seqlens, return_varlen_states, x.shape[0], x.shape[1])
    with torch.autocast(x.device.type, enabled=False):
        dtype = torch.float32
        dt, log_decay = _prepare_dt(dt, A, dt_bias, dt_softplus, dtype, dt_limit)
        kernel_decay = log_decay if resets is None else log_decay.masked_fill(resets[..., None], float("-inf"))
        s0 = None if initial_states is None else initial_states.transpose(-1, -2)  # (B, H, N, P)
        # v = dt x is formed inside the kernel (v_scale), x read in place
        y, state = fused_recurrence(C, B, x, kernel_decay[..., None], x.shape[2], 1.0, s0, v_scale=dt[..., None])
        final = state.transpose(-1, -2).contiguous() if return_final_states else None
        varlen = None
        if bounds is not None:
            varlen = _varlen_states(x, dt, B, log_decay, initial_states, resets, bounds)
        return _finish(y, x, D, z, dtype), final, varlen


def ssd_quadratic(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
    return_final_states: bool = False,
    return_varlen_states: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """The quadratic form with the full ``T x T`` semi-separable matrix (O(T²) memory).

    Arguments and returns as :func:`ssd` (without ``chunk_size``).
    """
    outputs = _run(
        chunked_heads_decay_attention, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
        dt_softplus, dt_limit, return_final_states, return_varlen_states,
        chunk_size=max(1, x.shape[1]),  # one chunk: the whole mixing matrix
    )
    return _returned(*outputs, return_final_states)


def ssd_mixing_matrix(
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
    seq_idx: Tensor | None = None,
) -> Tensor:
    """``M[b, h, t, s] = C_t . B_s exp(sum_{s<u<=t} dt_u A_h) dt_s`` for ``s <= t``, else 0 (``dt`` prepared
    as in :func:`ssd`); with ``seq_idx`` (packed sequences, as in :func:`ssd`) also 0 where ``s`` and ``t``
    lie in different sequences.

    ``dt: (B, T, H)``, ``B, C: (B, T, G, N) -> (B, H, T, T)`` (float32, or float64 for float64 input).
    From a zero state, ``y = M x + D x`` per head.
    """
    _check(None, dt, A, B, C, dt_bias=dt_bias)
    resets = _resets(seq_idx, *dt.shape[:2])
    with torch.autocast(dt.device.type, enabled=False):
        dtype = compute_dtype(dt, A, B, C)
        groups = B.shape[2]
        dt, log_decay = _prepare_dt(dt, A, dt_bias, dt_softplus, dtype, dt_limit)
        if resets is not None:  # the decay into a sequence's first token only acts across sequences
            log_decay = log_decay.masked_fill(resets[..., None], 0.0)
        mix = decay_attention_matrix(
            _grouped(C.to(dtype), groups), _grouped(B.to(dtype), groups), _grouped(log_decay[..., None], groups)
        )  # (B, G, R, T, T)
        mix = mix.flatten(1, 2) * dt.transpose(1, 2)[:, :, None, :]
        if seq_idx is not None:
            mix = mix * (seq_idx[:, :, None] == seq_idx[:, None, :])[:, None]
        return mix


def ssd_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
    return_final_states: bool = False,
    return_varlen_states: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Plain recurrent loop over T: the reference every other form is tested against.

    Arguments and returns as :func:`ssd` (without ``chunk_size``).
    """
    _check(x, dt, A, B, C, D, z, dt_bias, initial_states)
    batch, length, heads, head_dim = x.shape
    resets, bounds = _packing(seq_idx, cu_seqlens, return_varlen_states, batch, length)
    with torch.autocast(x.device.type, enabled=False):
        dtype = compute_dtype(x, dt, A, B, C)
        dt, log_decay = _prepare_dt(dt, A, dt_bias, dt_softplus, dtype, dt_limit)
        repeat = heads // B.shape[2]
        Bh = B.to(dtype).repeat_interleave(repeat, dim=2)  # (B, T, H, N)
        Ch = C.to(dtype).repeat_interleave(repeat, dim=2)
        x32 = x.to(dtype)
        if initial_states is None:
            h = x32.new_zeros(batch, heads, head_dim, B.shape[3])
        else:
            h = initial_states.to(dtype)
        keep = torch.exp(log_decay)  # (B, T, H): how much of h_{t-1} h_t keeps
        if resets is not None:  # a new packed sequence starts from nothing
            keep = keep.masked_fill(resets[..., None], 0.0)
        ys, after = [], []  # outputs; states after each token (for the packed sequences' states)
        # unbind, not x[:, t]: each indexing op's backward would write a full-size gradient per step (O(T^2))
        for keep_t, dt_t, x_t, B_t, C_t in zip(*(t.unbind(1) for t in (keep, dt, x32, Bh, Ch))):
            h = keep_t[:, :, None, None] * h + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, :]
            ys.append((h * C_t[:, :, None, :]).sum(-1))
            if bounds is not None:
                after.append(h[0])
        y = torch.stack(ys, dim=1) if ys else x32.new_zeros(x.shape)
        varlen = None
        if bounds is not None:  # the state after each sequence's last token; zeros for an empty one
            varlen = torch.stack([after[end - 1] if end > start else h.new_zeros(h.shape[1:]) for start, end in bounds])
        return _returned(_finish(y, x, D, z, dtype), h, varlen, return_final_states)


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
) -> tuple[Tensor, Tensor]:
    """One recurrent step for streaming inference (argument order of mamba-ssm's ``selective_state_update``).

    Args:
        state: ``(B, H, P, N)``.
        x, z: ``(B, H, P)``; dt: ``(B, H)``; B, C: ``(B, G, N)``.

    Returns:
        ``(y (B, H, P) in x's dtype, new_state (B, H, P, N) float32)``.
    """
    if x.dim() != 3:
        raise ValueError(f"ssd_step takes one token: x must be (B, H, P), got {tuple(x.shape)}")
    y, new_state = ssd_ref(
        x[:, None], dt[:, None], A, B[:, None], C[:, None], D, None if z is None else z[:, None], dt_bias,
        initial_states=state, dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=True,
    )
    return y[:, 0], new_state
