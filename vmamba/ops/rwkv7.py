"""RWKV-7 time mixing: the generalized delta rule with a data-dependent per-key-channel decay.

``S_t = diag(exp w_t) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T``, ``o_t = scale * r_t^T S_t`` (S is K x V).

Conventions follow flash-linear-attention's ``chunk_rwkv7(r, w, k, v, a, b, scale=1.0, ...)`` (time-major):
``r, w, k, a, b: (B, T, H, K)``, ``v: (B, T, H, V)``, state ``(B, H, K, V)``; ``w`` is the log-decay
(``<= 0``). An RWKV-7 layer passes ``a = -kk`` and ``b = kk * iclr`` with ``kk`` the L2-normalised key and
``iclr`` the in-context learning rate. Every form returns ``(o (B, T, H, V), final_state or None)`` (the
state unless ``output_final_state=False``: the default of fla's ``chunk_rwkv7`` until its current releases,
which default to False - returning the state either way serves code written for both) and
accumulates in float32 whatever the input dtype (float64 stays float64; autocast is off inside).

Forms, all giving the same numbers:

* :func:`rwkv7_ref` — the plain loop over T, the reference.
* :func:`rwkv7` (default) — chunked: inside a chunk of Q tokens the delta-rule corrections
  ``u_t = a_t^T S_{t-1}`` satisfy a unit lower-triangular system (the WY form) whose inverse is a short
  product of matmuls (the strictly lower part is nilpotent); everything else is dense matmuls; a short
  loop over chunks carries the state with one ``K x K`` transition per chunk. When no input needs a gradient
  (inference) and the fused backend is active, it runs the fused C++ recurrence instead
  (:mod:`vmamba.ops.fused.recurrence`; float32 / half on CPU).
* :func:`rwkv7_mixing_matrix` — the quadratic form: given ``(r, w, k, a, b)`` the op is linear in ``v``,
  ``o = M v`` with ``M[t, s] = scale * r_t^T A_t ... A_{s+1} k_s`` and ``A_t = diag(exp w_t) + b_t a_t^T``.
* :func:`rwkv7_step` — one token, for streaming inference.

:func:`rwkv7` also takes fla's ``cu_seqlens``: sequences of different lengths packed in one batch row, each
scanned on its own (:mod:`vmamba.ops.varlen`).

Numerical stability: in-chunk pairwise decays ``exp(G_t - G_s)`` (``G`` the in-chunk cumulative log
decay, per key channel) are factorised around a per-channel reference point in the middle of the chunk,
so neither factor exceeds ``exp(LOG_RANGE_LIMIT / 2)`` (:data:`vmamba.ops.chunking.LOG_RANGE_LIMIT`, the
shared engine's bound). When ``chunk_size * max|w|`` would exceed it, the chunk is shortened
accordingly: strong decays get shorter chunks, down to one token, never inf/NaN. (An RWKV-7 layer's
``w >= -e^-0.5`` never triggers this.) Cross-chunk decays only ever use ``exp`` of non-positive numbers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunking import LOG_RANGE_LIMIT, compute_dtype
from .fused.recurrence import fused_recurrence, fused_recurrence_applies
from .varlen import scan_packed

__all__ = ["rwkv7", "rwkv7_ref", "rwkv7_step", "rwkv7_mixing_matrix"]



def _check(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, initial_state: Tensor | None
) -> None:
    if r.dim() != 4:
        raise ValueError(f"r must be (B, T, H, K), got {tuple(r.shape)}")
    for name, t in (("w", w), ("k", k), ("a", a), ("b", b)):
        if t.shape != r.shape:
            raise ValueError(f"{name} must match r {tuple(r.shape)} (B, T, H, K), got {tuple(t.shape)}")
    if v.dim() != 4 or v.shape[:3] != r.shape[:3]:
        raise ValueError(f"v must be (B, T, H, V) with (B, T, H) = {tuple(r.shape[:3])}, got {tuple(v.shape)}")
    for name, t in (("r", r), ("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if initial_state is not None:
        batch, _, heads, dk = r.shape
        expected = (batch, heads, dk, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be (B, H, K, V) = {expected}, got {tuple(initial_state.shape)}")
    if w.numel() and bool((w.detach() > 0).any()):
        raise ValueError(f"w is a log-decay and must be <= 0 everywhere; got max {w.max().item():.4g}")


def _scale(scale: float | None, head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else float(scale)


def rwkv7_ref(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float | None = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Plain recurrent loop over T: the reference every other form is tested against."""
    _check(r, w, k, v, a, b, initial_state)
    with torch.autocast(r.device.type, enabled=False):
        batch, _, heads, dk = r.shape
        s = _scale(scale, dk)
        cdt, out_dtype = compute_dtype(r, w, k, v, a, b), v.dtype
        r, w, k, v, a, b = (t.to(cdt) for t in (r, w, k, v, a, b))
        decay = torch.exp(w)
        state = r.new_zeros(batch, heads, dk, v.shape[-1]) if initial_state is None else initial_state.to(cdt)
        outs = []
        # unbind, not a[:, t]: each indexing op's backward would write a full-size gradient per step (O(T^2))
        for r_t, d_t, k_t, v_t, a_t, b_t in zip(*(t.unbind(1) for t in (r, decay, k, v, a, b))):
            sa = torch.einsum("bhk,bhkv->bhv", a_t, state)
            state = d_t[..., None] * state + b_t[..., None] * sa[:, :, None, :] + k_t[..., None] * v_t[:, :, None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", r_t, state) * s)
        o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o.to(out_dtype), (state if output_final_state else None)


def rwkv7_step(
    state: Tensor, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, scale: float | None = 1.0
) -> tuple[Tensor, Tensor]:
    """One recurrent step for streaming inference.

    Args:
        state: ``(B, H, K, V)``.
        r, w, k, a, b: ``(B, H, K)``; v: ``(B, H, V)``.

    Returns:
        ``(o (B, H, V), new_state (B, H, K, V))``.
    """
    if r.dim() != 3:
        raise ValueError(f"rwkv7_step takes one token: r must be (B, H, K), got {tuple(r.shape)}")
    o, new_state = rwkv7_ref(
        *(t[:, None] for t in (r, w, k, v, a, b)), scale=scale, initial_state=state, output_final_state=True
    )
    return o[:, 0].to(v.dtype), new_state


def _effective_chunk(chunk_size: int, w: Tensor) -> int:
    """Shorten the chunk when strong decays would push the in-chunk log range past the limit.

    With the reference point at position ``(Q - 1) // 2`` each factor of a pairwise decay spans at most
    ``ceil((Q - 1) / 2) <= Q / 2`` decay steps, so ``Q * max|w| <= LOG_RANGE_LIMIT`` keeps both within
    ``exp(LOG_RANGE_LIMIT / 2)``; Q = 1 is always safe (its only pair is a token with itself).
    """
    strongest = float(-w.detach().min()) if w.numel() else 0.0
    if strongest * chunk_size <= LOG_RANGE_LIMIT:
        return chunk_size
    return max(1, min(chunk_size, int(LOG_RANGE_LIMIT // strongest)))


def _unit_lower_inverse(strict: Tensor) -> Tensor:
    """``(I - N)^-1`` for strictly lower-triangular ``N (..., Q, Q)``.

    N is nilpotent (``N^Q = 0``), so ``(I - N)^-1 = sum_j N^j = (I + N)(I + N^2)(I + N^4)...``: ``2 log2 Q``
    batched matmuls, no subtraction. Faster on small blocks than ``torch.linalg.solve_triangular(...,
    unitriangular=True)`` batched over all chunks: measured on one thread at T=3136, H=4, K=32, applied to a
    ``(Q, Q + K)`` right-hand side, 1.5 ms against 2.8 ms at Q=16 and 1.1 against 1.7 at Q=8 (about even at 32).
    """
    size = strict.shape[-1]
    inverse = torch.eye(size, dtype=strict.dtype, device=strict.device) + strict
    power, span = strict, 2
    while span < size:
        power = torch.matmul(power, power)
        inverse = inverse + torch.matmul(inverse, power)
        span *= 2
    return inverse


def _rwkv7_chunk(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float,
    initial_state: Tensor | None,
    chunk_size: int,
    differentiable: bool,
) -> tuple[Tensor, Tensor]:
    """``differentiable=False`` (nothing needs a gradient) fills preallocated buffers in place."""
    batch, length, heads, dk = r.shape
    dv = v.shape[-1]
    cdt = compute_dtype(r, w, k, v, a, b)
    q_len = chunk_size
    n = max(1, math.ceil(length / q_len))
    pad = n * q_len - length
    rows = batch * heads

    def chunked(t: Tensor) -> Tensor:  # (B, T, H, D) -> (B, H, n, Q, D) view, zero-padded (w = 0: no decay)
        t = t.to(cdt)
        if pad:
            t = F.pad(t, (0, 0, 0, 0, 0, pad))
        return t.view(batch, n, q_len, heads, t.shape[-1]).permute(0, 3, 1, 2, 4)

    def flat(t: Tensor) -> Tensor:  # (B, H, n, Q, D) contiguous -> (B H n, Q, D) (any Q)
        return t.reshape(rows * n, t.shape[-2], t.shape[-1])

    g_in = chunked(w).cumsum(-2)  # G_t: log decay from the chunk start through t (contiguous, head-major)
    # Pairwise decays exp(G_x - G_s) (x = t, or t-1 for a_t^T S_{t-1}) factorised around a per-channel reference
    # G_ref mid-chunk: exp(G_x - G_ref) * exp(G_ref - G_s). _effective_chunk keeps Q * max|w| within
    # LOG_RANGE_LIMIT, so every factor on an unmasked pair lies within exp(+-LOG_RANGE_LIMIT / 2); the clamp
    # only touches a_0's factor exp(-G_ref), which meets masked pairs alone (a_0 has no earlier key).
    ref = g_in[..., (q_len - 1) // 2 : (q_len - 1) // 2 + 1, :]
    near = torch.exp(g_in - ref)  # exp(G_t - G_ref), the one exp over every token; the rest derive from it
    far = torch.reciprocal(near)  # exp(G_ref - G_t), within e^30: as exact as a second exp
    first = torch.exp((-ref).clamp(max=LOG_RANGE_LIMIT / 2))
    near_ex = torch.cat([first, near[..., :-1, :]], dim=-2)  # exp(G_{t-1} - G_ref), G_{-1} = 0
    # factors first: the products take their head-major layout, the time-major inputs are read in place
    left = flat(torch.cat([near * chunked(r), near_ex * chunked(a)], dim=-2))  # (N, 2Q, K): rows r_t, a_t
    right = flat(torch.cat([far * chunked(k), far * chunked(b)], dim=-2))  # rows k_s, b_s
    vc = flat(chunked(v).contiguous())
    pair = torch.bmm(left, right.transpose(1, 2))  # (N, 2Q, 2Q)
    # masked entries are replaced, not multiplied by zero: they can be large
    pair = pair.masked_fill(_pair_mask(q_len, r.device), 0.0)
    a_rk, a_rb = pair[:, :q_len, :q_len], pair[:, :q_len, q_len:]  # s <= t
    a_ak, a_ab = pair[:, q_len:, :q_len], pair[:, q_len:, q_len:]  # s < t
    # u_t = a_t^T S_{t-1} = (a_t e^{G_{t-1}})^T S_0 + sum_{s<t} A_ak[t,s] v_s + A_ab[t,s] u_s, i.e.
    # (I - A_ab) u = A_ak v + W S_0: u = (T A_ak) v + (T W) S_0 with T = (I - A_ab)^-1 (the WY form).
    ref_exp = flat(torch.exp(ref))  # (N, 1, K): exp(G_ref) <= 1
    inverse = _unit_lower_inverse(a_ab)
    t_ak = torch.bmm(inverse, a_ak)
    state_rows = left[:, q_len:] * ref_exp  # W: a_t e^{G_{t-1}}
    state_rows[:, :1] = flat(chunked(a)[..., :1, :])  # row 0 is a_0 itself, exactly, whatever the clamp did
    u_state = torch.bmm(inverse, state_rows)
    # o = A_rk v + A_rb u + (r e^G) S_0 = intra v + read S_0
    intra = torch.baddbmm(a_rk, a_rb, t_ak)
    read = torch.baddbmm(left[:, :q_len] * ref_exp, a_rb, u_state)
    # S_end = diag(e^{G_Q}) S_0 + sum_s e^{G_Q - G_s} (k_s v_s^T + b_s u_s^T) = trans S_0 + write^T v
    end_exp = flat(torch.exp(g_in[..., -1:, :] - ref))  # (N, 1, K): exp(G_Q - G_ref) <= 1
    to_end = right * end_exp  # rows k_s e^{G_Q - G_s}, b_s e^{G_Q - G_s}
    kd, bd = to_end[:, :q_len], to_end[:, q_len:]
    write = torch.baddbmm(kd, t_ak.transpose(1, 2), bd)
    trans = torch.bmm(bd.transpose(1, 2), u_state)
    decay = (end_exp * ref_exp)[:, 0]  # exp(G_Q) on the diagonal
    trans = trans + torch.diag_embed(decay) if differentiable else trans
    if not differentiable:
        trans.diagonal(dim1=-2, dim2=-1).add_(decay)
    inject = torch.bmm(write.transpose(1, 2), vc)
    # carry the state across chunks; unbind once so the backward does not rebuild a full gradient per step
    state = vc.new_zeros(rows, dk, dv) if initial_state is None else initial_state.to(cdt).reshape(rows, dk, dv)
    steps = list(zip(trans.view(rows, n, dk, dk).unbind(1), inject.view(rows, n, dk, dv).unbind(1)))
    if differentiable:
        entering = []
        for step_trans, step_inject in steps:
            entering.append(state)
            state = torch.baddbmm(step_inject, step_trans, state)
        entering = torch.stack(entering, dim=1)
    else:  # the states entering the chunks, filled in place (contiguous per chunk)
        entering = state.new_empty(n, rows, dk, dv)
        entering[0].copy_(state)
        for c in range(n - 1):
            torch.baddbmm(steps[c][1], steps[c][0], entering[c], out=entering[c + 1])
        state = torch.baddbmm(steps[-1][1], steps[-1][0], entering[-1])
        entering = entering.transpose(0, 1)
    o = torch.baddbmm(torch.bmm(intra, vc), read, entering.reshape(rows * n, dk, dv))
    if scale != 1.0:  # RWKV-7 layers use 1
        o = o * scale
    o = o.view(batch, heads, n * q_len, dv).transpose(1, 2)[:, :length]
    return o, state.view(batch, heads, dk, dv)


def _pair_mask(q_len: int, device: torch.device) -> Tensor:
    """``(2Q, 2Q)`` True where a pair is masked: rows ``r_t`` keep keys ``s <= t``, rows ``a_t`` keep ``s < t``."""
    free = torch.ones(q_len, q_len, dtype=torch.bool, device=device)
    above, on_or_above = free.triu(1), free.triu()
    return torch.cat([torch.cat([above, above], 1), torch.cat([on_or_above, on_or_above], 1)], 0)


def rwkv7(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float | None = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    cu_seqlens: Tensor | None = None,
    *,
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor | None]:
    """RWKV-7 generalized delta rule, chunked (the default path); positional arguments as fla's ``chunk_rwkv7``.

    Args:
        r: receptance (query) ``(B, T, H, K)``.
        w: log-decay ``(B, T, H, K)``, ``<= 0`` (the decay is ``exp(w)``).
        k: key ``(B, T, H, K)``.
        v: value ``(B, T, H, V)``.
        a, b: ``(B, T, H, K)``; the state update adds ``b_t (a_t^T S_{t-1})``.
        scale: output scale; ``None`` means ``K ** -0.5``.
        initial_state: ``(B, H, K, V)``, or ``(N, H, K, V)`` with ``cu_seqlens``; zeros when ``None``.
        output_final_state: return the state after the last token (the default, as in older fla ``chunk_rwkv7``;
            of each sequence with ``cu_seqlens``); ``False`` returns ``None`` in its place.
        cu_seqlens: ``(N + 1,)`` start offsets of N sequences packed in one batch row, then T (fla's
            variable-length convention, :mod:`vmamba.ops.varlen`): each is scanned on its own.
        chunk_size: tokens per chunk (shortened automatically for very strong decays, see module doc). The
            in-chunk work grows with Q^2 and the carry loop with T / Q; 16 is fastest on CPU at T ~ 3000.

    Returns:
        ``(o (B, T, H, V) in v's dtype, final_state (B or N, H, K, V) or None)``.

    Raises:
        ValueError: mismatched shapes, a wrong state shape, a positive log-decay, a bad chunk size or
        ``cu_seqlens``.

    Example:
        >>> r, k, kk = torch.randn(3, 1, 100, 4, 32).unbind(0)
        >>> kk = F.normalize(kk, dim=-1); w = -F.softplus(torch.randn(1, 100, 4, 32))
        >>> o, _ = rwkv7(r, w, k, torch.randn(1, 100, 4, 32), -kk, kk * 0.5)  # o: (1, 100, 4, 32)
    """
    if cu_seqlens is not None:  # padding tokens (zero r, k, v, a, b and log-decay) leave the state as it is
        _check(r, w, k, v, a, b, None)
        return scan_packed(
            lambda padded, _: rwkv7(*padded, scale, initial_state, output_final_state, chunk_size=chunk_size),
            (r, w, k, v, a, b), cu_seqlens, initial_state,
        )
    _check(r, w, k, v, a, b, initial_state)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if fused_recurrence_applies(r, w, k, v, a, b, initial_state):  # inference: the fused C++ recurrence
        with torch.autocast(r.device.type, enabled=False):
            o, state = fused_recurrence(
                r, k, v, w, r.shape[2], _scale(scale, r.shape[-1]), initial_state, a=a, b=b
            )
        return o.to(v.dtype), (state if output_final_state else None)
    with torch.autocast(r.device.type, enabled=False):
        inputs = (r, w, k, v, a, b, initial_state)
        differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
        o, state = _rwkv7_chunk(
            r, w, k, v, a, b, _scale(scale, r.shape[-1]), initial_state, _effective_chunk(chunk_size, w),
            differentiable,
        )
    return o.to(v.dtype), (state if output_final_state else None)


def rwkv7_mixing_matrix(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float | None = 1.0,
    chunk_size: int = 16,
    block: int = 512,
) -> Tensor:
    """The effective ``T x T`` token-mixing matrix (the quadratic form): from a zero state ``o = M v``.

    ``M[b, h, t, s] = scale * r_t^T A_t A_{t-1} ... A_{s+1} k_s`` for ``s <= t`` (zero above the diagonal),
    ``A_t = diag(exp w_t) + b_t a_t^T``. Since the op is linear in ``v`` once ``(r, w, k, a, b)`` are fixed,
    column ``s`` is the chunked op's response to the one-hot value ``e_s``; columns are evaluated
    ``block`` at a time to bound memory (``O(B H T block)``).

    Args:
        r, w, k, a, b: ``(B, T, H, K)`` as in :func:`rwkv7`.

    Returns:
        ``(B, H, T, T)`` (float32, or float64 for float64 input).
    """
    _check(r, w, k, k, a, b, None)
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    batch, length, heads, _ = r.shape
    cdt = compute_dtype(r, w, k, a, b)
    cols = []
    for start in range(0, length, block):
        stop = min(length, start + block)
        # tokens before `start` see zero values, so only the suffix needs evaluating
        onehot = torch.eye(length - start, stop - start, device=r.device, dtype=cdt)
        onehot = onehot[None, :, None, :].expand(batch, -1, heads, -1)
        sl = slice(start, None)
        o, _ = rwkv7(r[:, sl], w[:, sl], k[:, sl], onehot, a[:, sl], b[:, sl], scale, output_final_state=False,
                     chunk_size=chunk_size)
        cols.append(F.pad(o.permute(0, 2, 1, 3), (0, 0, start, 0)))  # (B, H, T, stop - start)
    if not cols:
        return r.new_zeros(batch, heads, 0, 0, dtype=cdt)
    return torch.cat(cols, dim=-1)
