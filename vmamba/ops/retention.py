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

:func:`retention_step` is the single-step form for streaming inference.
"""
from __future__ import annotations

import math
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

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


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64 (for gradcheck), else float32: never accumulate below float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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
    with torch.autocast(q.device.type, enabled=False):
        batch, length, heads, dk = q.shape
        s = _scale(scale, dk)
        cdt = compute_dtype(q, k, v)
        gamma = retention_log_decays(heads, q.device, cdt).exp()[None, :, None, None]
        q32, k32, v32 = q.to(cdt), k.to(cdt), v.to(cdt)
        state = q32.new_zeros(batch, heads, dk, v.shape[-1]) if initial_state is None else initial_state.to(cdt)
        outs = []
        for t in range(length):
            state = gamma * state + k32[:, t, :, :, None] * v32[:, t, :, None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q32[:, t], state) * s)
        o = torch.stack(outs, dim=1) if outs else v32.new_zeros(v.shape)
    return o.to(v.dtype), _final(state, output_final_state)


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


def _decay_matrix(log_decay: Tensor, length: int) -> Tensor:
    """``D[h, t, s] = gamma_h^(t-s)`` for ``s <= t``, else 0: ``(H, T, T)`` in ``log_decay``'s dtype."""
    pos = torch.arange(length, device=log_decay.device, dtype=log_decay.dtype)
    diff = pos[:, None] - pos[None, :]
    causal = diff >= 0
    # clamp before exp so the masked (future) half never produces inf
    return torch.where(causal, torch.exp(log_decay[:, None, None] * diff.clamp(min=0)), 0.0)


def retention_mixing_matrix(q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """The quadratic form's ``T x T`` matrix: ``M[b, h, t, s] = scale * gamma_h^(t-s) * q_t . k_s`` (``s <= t``).

    ``q, k: (B, T, H, K) -> (B, H, T, T)`` (float32, or float64 for float64 input); from a zero state
    ``o = M v``.
    """
    _check(q, k, k, None)
    with torch.autocast(q.device.type, enabled=False):
        s = _scale(scale, q.shape[-1])
        cdt = compute_dtype(q, k)
        scores = torch.einsum("bthk,bshk->bhts", q.to(cdt), k.to(cdt))
        return scores * (_decay_matrix(retention_log_decays(q.shape[2], q.device, cdt), q.shape[1]) * s)


def _retention_parallel(
    q: Tensor, k: Tensor, v: Tensor, scale: float, initial_state: Tensor | None
) -> tuple[Tensor, Tensor]:
    batch, length, heads, dk = q.shape
    cdt = compute_dtype(q, k, v)
    log_decay = retention_log_decays(heads, q.device, cdt)
    q32, k32, v32 = q.to(cdt), k.to(cdt), v.to(cdt)
    mix = retention_mixing_matrix(q32, k32, scale)
    o = torch.einsum("bhts,bshv->bthv", mix, v32)
    pos = torch.arange(length, device=q.device, dtype=cdt)
    # contribution of each key to the final state: gamma^(T-1-s)
    tail = torch.exp(log_decay[None, :] * (length - 1 - pos)[:, None])  # (T, H)
    state = torch.einsum("bthk,th,bthv->bhkv", k32, tail, v32)
    if initial_state is not None:
        s0 = initial_state.to(cdt)
        head_decay = torch.exp(log_decay[None, :] * (pos + 1)[:, None])  # (T, H): gamma^(t+1)
        o = o + torch.einsum("bthk,th,bhkv->bthv", q32, head_decay * scale, s0)
        state = state + torch.exp(log_decay * length)[None, :, None, None] * s0
    return o, state


def _retention_chunk(
    q: Tensor, k: Tensor, v: Tensor, scale: float, initial_state: Tensor | None, chunk_size: int
) -> tuple[Tensor, Tensor]:
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    n = max(1, math.ceil(length / chunk_size))
    pad = n * chunk_size - length
    # per-token log decay; zero on the padding so that padded steps leave the state untouched
    cdt = compute_dtype(q, k, v)
    g = F.pad(retention_log_decays(heads, q.device, cdt).expand(length, heads), (0, 0, 0, pad))
    q32, k32, v32 = (F.pad(t.to(cdt), (0, 0, 0, 0, 0, pad)) for t in (q, k, v))

    def chunked(t: Tensor) -> Tensor:  # (B, nQ, H, D) -> (B, H, n, Q, D)
        return t.reshape(batch, n, chunk_size, heads, t.shape[-1]).permute(0, 3, 1, 2, 4)

    qc, kc, vc = chunked(q32), chunked(k32), chunked(v32)
    cum = g.reshape(n, chunk_size, heads).permute(2, 0, 1).cumsum(-1)  # (H, n, Q), inclusive, <= 0
    diff = cum[..., :, None] - cum[..., None, :]  # (H, n, Q, Q) = log gamma^(t-s)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    decay = torch.where(causal, torch.exp(diff.clamp(max=0)), 0.0)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * decay  # (B, H, n, Q, Q)
    o = torch.matmul(scores, vc)
    # what each chunk adds to the state, decayed to the chunk's end
    to_end = torch.exp(cum[..., -1:] - cum)  # (H, n, Q)
    added = torch.matmul((kc * to_end[..., None]).transpose(-1, -2), vc)  # (B, H, n, K, V)
    chunk_decay = torch.exp(cum[..., -1])[..., None, None]  # (H, n, 1, 1)
    state = q32.new_zeros(batch, heads, dk, dv) if initial_state is None else initial_state.to(cdt)
    before = []
    for c in range(n):
        before.append(state)
        state = chunk_decay[:, c] * state + added[:, :, c]
    states = torch.stack(before, dim=2)  # (B, H, n, K, V): the state entering each chunk
    o = o + torch.matmul(qc * torch.exp(cum)[..., None], states)
    o = (o * scale).permute(0, 2, 3, 1, 4).reshape(batch, n * chunk_size, heads, dv)[:, :length]
    return o, state


def retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mode: RetentionMode | str = RetentionMode.CHUNK,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Multi-scale retention with ``gamma_h = 1 - 2^(-5-h)``.

    Args:
        q, k: ``(B, T, H, K)``.
        v: ``(B, T, H, V)``.
        mode: ``chunk`` (default), ``parallel`` or ``recurrent`` (:class:`RetentionMode`).
        scale: query scale; ``None`` means ``K ** -0.5``.
        initial_state: ``(B, H, K, V)``; zeros when ``None``.
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk in ``chunk`` mode.

    Returns:
        ``(o (B, T, H, V) in v's dtype, final_state (B, H, K, V) float32 or None)``.

    Raises:
        ValueError: mismatched shapes, a wrong state shape, an unknown mode or a bad chunk size.

    Example:
        >>> q = k = torch.randn(1, 100, 4, 32); v = torch.randn(1, 100, 4, 32)
        >>> o, s = retention(q, k, v, output_final_state=True)  # o: (1, 100, 4, 32), s: (1, 4, 32, 32)
    """
    mode = RetentionMode.parse(mode)
    _check(q, k, v, initial_state)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if mode is RetentionMode.RECURRENT:
        return retention_ref(q, k, v, scale, initial_state, output_final_state)
    s = _scale(scale, q.shape[-1])
    with torch.autocast(q.device.type, enabled=False):
        if mode is RetentionMode.PARALLEL:
            o, state = _retention_parallel(q, k, v, s, initial_state)
        else:
            o, state = _retention_chunk(q, k, v, s, initial_state, chunk_size)
    return o.to(v.dtype), _final(state, output_final_state)
