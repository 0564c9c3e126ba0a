"""Retention (RetNet): a linear recurrence with a fixed scalar decay per head.

``S_t = gamma_h * S_{t-1} + k_t v_t^T``, ``o_t = scale * q_t^T S_t`` with ``gamma_h = 1 - 2^(-5-h)``.

Layouts follow flash-linear-attention's ``chunk_retention`` / ``parallel_retention`` (time-major):
``q, k: (B, T, H, K)``, ``v: (B, T, H, V)``, state ``(B, H, K, V)``. Every form returns
``(o (B, T, H, V), final_state (B, H, K, V) or None)`` and accumulates in float32 whatever the input dtype
(float64 stays float64; autocast is switched off inside). ``o`` comes back in ``v``'s dtype, the state in
the accumulation dtype.

Forms (:class:`RetentionMode`), all giving the same numbers:

* ``recurrent`` — the plain loop over T, the reference.
* ``parallel`` — the quadratic form ``o = (scale * (q k^T) * D) v`` with ``D[t, s] = gamma^(t-s)``,
  ``s <= t``; :func:`retention_mixing_matrix` returns that ``T x T`` matrix.
* ``chunk`` (default) — dense matmuls inside chunks of ``chunk_size`` tokens and a short loop over
  chunks carrying the state.

Retention is the scalar-decay case of the shared engine in :mod:`vmamba.ops.chunking` (also behind SSD
and GLA): the parallel and chunked forms run on :func:`~vmamba.ops.chunking.chunked_heads_decay_attention`
with one head per batch row (the parallel form as a single chunk), whose in-chunk block factorises exactly
around each chunk's midpoint for RetNet's gentle decays (no ``exp`` over the ``Q x Q`` block).

When no input needs a gradient (inference) and the fused backend is active, the ``chunk`` and ``parallel``
modes run the fused C++ recurrence instead (:mod:`vmamba.ops.fused.recurrence`; float32 / half on CPU).

:func:`retention_step` is the single-step form for streaming inference. :func:`retention` also takes fla's
``cu_seqlens``: sequences of different lengths packed in one batch row, each scanned on its own
(:mod:`vmamba.ops.varlen`; the padding's decay is switched off).
"""
from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from .chunking import chunked_heads_decay_attention, compute_dtype, decay_attention_matrix
from .fused.recurrence import fused_recurrence, fused_recurrence_applies
from .varlen import scan_packed

__all__ = [
    "RetentionMode",
    "retention",
    "retention_ref",
    "retention_step",
    "retention_mixing_matrix",
    "retention_log_decays",
]


class RetentionMode(str, Enum):
    """Which form :func:`retention` evaluates; all three give the same numbers."""

    PARALLEL = "parallel"
    RECURRENT = "recurrent"
    CHUNK = "chunk"

    @classmethod
    def parse(cls, value: "RetentionMode | str") -> "RetentionMode":
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown retention mode {value!r}; expected one of {names}") from None


def retention_log_decays(
    num_heads: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``log gamma_h = log(1 - 2^(-5-h))`` for ``h = 0 .. H-1``: ``(H,)`` in ``dtype``.

    Computed in float64 with ``log1p``: for many heads ``1 - 2^(-5-h)`` rounds to 1 in float32 while its
    log does not.
    """
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.log1p(-torch.pow(2.0, -5.0 - h)).to(device=device, dtype=dtype)


def _check(q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, K), got {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, T, H, V) with (B, T, H) = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if initial_state is not None:
        batch, _, heads, dk = q.shape
        expected = (batch, heads, dk, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be (B, H, K, V) = {expected}, got {tuple(initial_state.shape)}")


def _scale(scale: float | None, head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else float(scale)


def _final(state: Tensor, output_final_state: bool) -> Tensor | None:
    return state if output_final_state else None


def retention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Plain recurrent loop over T: the reference every other form is tested against."""
    _check(q, k, v, initial_state)
    o, state = _recurrent(q, k, v, scale, initial_state)
    return o, _final(state, output_final_state)


def _recurrent(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None, initial_state: Tensor | None, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The loop: ``(o, final_state)``; where ``valid (B, T)`` is False (padding) the state stays as it is."""
    with torch.autocast(q.device.type, enabled=False):
        batch, length, heads, dk = q.shape
        s = _scale(scale, dk)
        cdt = compute_dtype(q, k, v)
        gamma = retention_log_decays(heads, q.device, cdt).exp()[None, :, None, None]
        if valid is None:
            keeps = [gamma] * length
        else:  # padding keeps the state: factor 1
            keeps = [torch.where(m[:, None, None, None], gamma, 1.0) for m in valid.T]
        q32, k32, v32 = q.to(cdt), k.to(cdt), v.to(cdt)
        state = q32.new_zeros(batch, heads, dk, v.shape[-1]) if initial_state is None else initial_state.to(cdt)
        outs = []
        # unbind, not k32[:, t]: each indexing op's backward would write a full-size gradient per step (O(T^2))
        for keep, q_t, k_t, v_t in zip(keeps, *(t.unbind(1) for t in (q32, k32, v32))):
            state = keep * state + k_t[..., None] * v_t[..., None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q_t, state) * s)
        o = torch.stack(outs, dim=1) if outs else v32.new_zeros(v.shape)
    return o.to(v.dtype), state


def retention_step(
    state: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """One recurrent step for streaming inference.

    Args:
        state: ``(B, H, K, V)``.
        q, k: ``(B, H, K)``; v: ``(B, H, V)``.

    Returns:
        ``(o (B, H, V), new_state (B, H, K, V) float32)``.
    """
    if q.dim() != 3:
        raise ValueError(f"retention_step takes one token: q must be (B, H, K), got {tuple(q.shape)}")
    o, new_state = retention_ref(
        q[:, None], k[:, None], v[:, None], scale=scale, initial_state=state, output_final_state=True
    )
    return o[:, 0], new_state


def _head_major(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(B, T, H, D)`` inputs -> head-major ``(B, H, T, D)`` in the compute dtype with the scale folded into
    q, plus the per-token log-decay ``(1, H, T, 1)`` that the shared chunking engine takes."""
    cdt = compute_dtype(q, k, v)
    qh, kh, vh = (t.to(cdt).transpose(1, 2) for t in (q, k, v))
    heads, length = q.shape[2], q.shape[1]
    log_decay = retention_log_decays(heads, q.device, cdt)[None, :, None, None].expand(1, heads, length, 1)
    return qh * scale, kh, vh, log_decay


def retention_mixing_matrix(q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """The quadratic form's ``T x T`` matrix: ``M[b, h, t, s] = scale * gamma_h^(t-s) * q_t . k_s`` (``s <= t``).

    ``q, k: (B, T, H, K) -> (B, H, T, T)`` (float32, or float64 for float64 input); from a zero state
    ``o = M v``.
    """
    _check(q, k, k, None)
    with torch.autocast(q.device.type, enabled=False):
        qh, kh, _, log_decay = _head_major(q, k, k, _scale(scale, q.shape[-1]))
        return decay_attention_matrix(qh, kh, log_decay)


def retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    *,
    mode: RetentionMode | str = RetentionMode.CHUNK,
    chunk_size: int = 32,
) -> tuple[Tensor, Tensor | None]:
    """Multi-scale retention with ``gamma_h = 1 - 2^(-5-h)``; positional arguments as fla's ``chunk_retention``.

    Args:
        q, k: ``(B, T, H, K)``.
        v: ``(B, T, H, V)``.
        scale: query scale; ``None`` means ``K ** -0.5``.
        initial_state: ``(B, H, K, V)``, or ``(N, H, K, V)`` with ``cu_seqlens``; zeros when ``None``.
        output_final_state: also return the state after the last token (of each sequence with ``cu_seqlens``).
        cu_seqlens: ``(N + 1,)`` start offsets of N sequences packed in one batch row, then T (fla's
            variable-length convention, :mod:`vmamba.ops.varlen`): each is scanned on its own.
        mode: ``chunk`` (default), ``parallel`` or ``recurrent`` (:class:`RetentionMode`), keyword-only.
        chunk_size: tokens per chunk in ``chunk`` mode, keyword-only.

    Returns:
        ``(o (B, T, H, V) in v's dtype, final_state (B or N, H, K, V) float32 or None)``.

    Raises:
        ValueError: mismatched shapes, a wrong state shape, an unknown mode, a bad chunk size or
        ``cu_seqlens``.

    Example:
        >>> q = k = torch.randn(1, 100, 4, 32); v = torch.randn(1, 100, 4, 32)
        >>> o, s = retention(q, k, v, output_final_state=True)  # o: (1, 100, 4, 32), s: (1, 4, 32, 32)
    """
    mode = RetentionMode.parse(mode)
    _check(q, k, v, initial_state if cu_seqlens is None else None)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if cu_seqlens is None:
        o, state = _retention(q, k, v, scale, initial_state, mode, chunk_size)
        return o, _final(state, output_final_state)

    def scan(padded: list[Tensor], valid: Tensor) -> tuple[Tensor, Tensor]:
        _check(*padded, initial_state)
        # retention decays every step, padding included: the padding's decay is switched off instead
        return _retention(*padded, scale, initial_state, mode, chunk_size, valid=valid)

    o, state = scan_packed(scan, (q, k, v), cu_seqlens, initial_state)
    return o, _final(state, output_final_state)


def _retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None,
    initial_state: Tensor | None,
    mode: RetentionMode,
    chunk_size: int,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(o, final_state)`` of :func:`retention`'s form ``mode`` on checked inputs; where ``valid (B, T)`` is
    False (padding) the state stays as it is (no decay; the padding's q, k, v are zeros)."""
    if mode is RetentionMode.RECURRENT:
        return _recurrent(q, k, v, scale, initial_state, valid)
    if fused_recurrence_applies(q, k, v, initial_state):  # inference: the fused C++ recurrence
        with torch.autocast(q.device.type, enabled=False):
            batch, length, heads, dk = q.shape
            log_gamma = retention_log_decays(heads, q.device, torch.float32)  # one scalar decay per head
            log_alpha = log_gamma[None, None, :, None].expand(batch, length, heads, 1)  # stride 0: no copy
            if valid is not None:
                log_alpha = log_alpha.masked_fill(~valid[:, :, None, None], 0.0)
            o, state = fused_recurrence(q, k, v, log_alpha, heads, _scale(scale, dk), initial_state)
        return o.to(v.dtype), state
    with torch.autocast(q.device.type, enabled=False):
        batch, length, heads, dk = q.shape
        cdt = compute_dtype(q, k, v)
        # every head its own batch row of the heads engine (R = 1): (B H, T, D), decays (B H, T, 1)
        qh, kh, vh = (t.to(cdt).transpose(1, 2).reshape(batch * heads, length, t.shape[-1]) for t in (q, k, v))
        log_decay = retention_log_decays(heads, q.device, cdt)[None, :, None].expand(batch, heads, length)
        if valid is not None:
            log_decay = log_decay * valid[:, None, :]
        s0 = None if initial_state is None else initial_state.to(cdt).reshape(batch * heads, dk, 1, v.shape[-1])
        size = max(1, length) if mode is RetentionMode.PARALLEL else chunk_size  # parallel: one chunk
        o, state = chunked_heads_decay_attention(
            qh, kh, vh[:, :, None], log_decay.reshape(batch * heads, length, 1), s0, size, _scale(scale, dk)
        )
        o = o.view(batch, heads, length, v.shape[-1]).transpose(1, 2)
        state = state.view(batch, heads, dk, v.shape[-1])
    return o.to(v.dtype), state
