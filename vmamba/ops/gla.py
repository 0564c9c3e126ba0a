"""Gated linear attention (GLA): a linear recurrence with a data-dependent decay per key channel.

``S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ``, ``o_t = scale * q_tᵀ S_t`` (S is K x V, ``g_t <= 0``).

Layouts follow flash-linear-attention's ``chunk_gla`` (time-major): ``q, k, g: (B, T, H, K)``,
``v: (B, T, H, V)``, state ``(B, H, K, V)``; ``scale=None`` means ``K ** -0.5``. Every form returns
``(o (B, T, H, V), final_state (B, H, K, V) or None)``, accumulates in float32 whatever the input dtype
(float64 stays float64; autocast is off inside), returns ``o`` in ``q``'s dtype and the state in the
accumulation dtype.

Forms, all giving the same numbers:

* :func:`gla_ref` — the plain loop over T, the reference.
* :func:`gla` (default) — chunked (:mod:`vmamba.ops.chunking`): the in-chunk block of the mixing matrix is
  built by recursive halving so every exponent is a forward sum of log-decays (``<= 0``); no
  ``exp(-cumsum g)`` factor that overflows under strong decay. When no input needs a gradient (inference)
  and the fused backend is active, it runs the fused C++ recurrence instead
  (:mod:`vmamba.ops.fused.recurrence`; float32 / half inputs on CPU).
* :func:`gla_quadratic` / :func:`gla_mixing_matrix` — the quadratic form ``o = M v`` with
  ``M[t, s] = scale * sum_k q[t,k] k[s,k] exp(sum_{s<u<=t} g[u,k])``.
* :func:`gla_step` — one token, for streaming inference.

:func:`gla` also takes fla's ``cu_seqlens``: sequences of different lengths packed in one batch row, each
scanned on its own (:mod:`vmamba.ops.varlen`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .chunking import chunked_decay_attention, compute_dtype, decay_attention_matrix, quadratic_decay_attention
from .fused.recurrence import fused_recurrence, fused_recurrence_applies
from .varlen import scan_packed

__all__ = ["gla", "gla_ref", "gla_step", "gla_quadratic", "gla_mixing_matrix"]


def _check(q: Tensor, k: Tensor, v: Tensor | None, g: Tensor, initial_state: Tensor | None) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, K), got {tuple(q.shape)}")
    for name, t in (("k", k), ("g", g)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must match q {tuple(q.shape)} (B, T, H, K), got {tuple(t.shape)}")
    if v is not None and (v.dim() != 4 or v.shape[:3] != q.shape[:3]):
        raise ValueError(f"v must be (B, T, H, V) with (B, T, H) = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if g.numel() and (top := float(g.detach().amax())) > 0:
        raise ValueError(f"g is a log-space decay and must be <= 0; got a maximum of {top:.4g}")
    if initial_state is not None and v is not None:
        expected = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be (B, H, K, V) = {expected}, got {tuple(initial_state.shape)}")


def _scale(scale: float | None, head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else float(scale)


def _head_major(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, T, H, D) -> (B, H, T, D)`` contiguous in the compute dtype."""
    return t.transpose(1, 2).to(dtype).contiguous()


def _run(
    form, q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None, initial_state: Tensor | None,
    output_final_state: bool, **kwargs,
) -> tuple[Tensor, Tensor | None]:
    _check(q, k, v, g, initial_state)
    with torch.autocast(q.device.type, enabled=False):
        dtype = compute_dtype(q, k, v, g)
        s = _scale(scale, q.shape[-1])
        # q, k and g stay strided views: the engine's first elementwise products lay them out head-major
        o, state = form(
            q.transpose(1, 2).to(dtype),
            k.transpose(1, 2).to(dtype),
            _head_major(v, dtype),
            g.transpose(1, 2).to(dtype),
            None if initial_state is None else initial_state.to(dtype),
            scale=s,
            **kwargs,
        )
    return o.transpose(1, 2).to(q.dtype), state if output_final_state else None


def gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    *,
    chunk_size: int = 32,
) -> tuple[Tensor, Tensor | None]:
    """Chunked gated linear attention (the default form); positional arguments as fla's ``chunk_gla``.

    Args:
        q, k: ``(B, T, H, K)``.
        v: ``(B, T, H, V)``.
        g: ``(B, T, H, K)`` log-space decay, ``<= 0`` (e.g. ``logsigmoid(x) / 16``).
        scale: query scale; ``None`` means ``K ** -0.5``.
        initial_state: ``(B, H, K, V)``, or ``(N, H, K, V)`` with ``cu_seqlens``; zeros when None.
        output_final_state: also return the state after the last token (of each sequence with ``cu_seqlens``).
        cu_seqlens: ``(N + 1,)`` start offsets of N sequences packed in one batch row, then T (fla's
            variable-length convention, :mod:`vmamba.ops.varlen`): each is scanned on its own.
        chunk_size: tokens per chunk (a power of two is fastest; 32 measured about 10% faster than 64 on CPU
            at T=3136, H=4, K=V=32).

    Returns:
        ``(o (B, T, H, V) in q's dtype, final_state (B or N, H, K, V) float32 or None)``.

    Raises:
        ValueError: mismatched shapes, a wrong state shape, a positive log-decay, a bad chunk size or
        ``cu_seqlens``.

    Example:
        >>> q = k = torch.randn(1, 100, 4, 32); v = torch.randn(1, 100, 4, 32)
        >>> g = torch.nn.functional.logsigmoid(torch.randn(1, 100, 4, 32)) / 16
        >>> o, s = gla(q, k, v, g, output_final_state=True)  # o: (1, 100, 4, 32), s: (1, 4, 32, 32)
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if cu_seqlens is not None:  # padding tokens (zero q, k, v and log-decay) leave the state as it is
        _check(q, k, v, g, None)
        return scan_packed(
            lambda padded, _: gla(*padded, scale, initial_state, output_final_state, chunk_size=chunk_size),
            (q, k, v, g), cu_seqlens, initial_state,
        )
    if fused_recurrence_applies(q, k, v, g, initial_state):  # inference: the fused C++ recurrence
        _check(q, k, v, g, initial_state)
        with torch.autocast(q.device.type, enabled=False):
            o, state = fused_recurrence(
                q, k, v, g, q.shape[2], _scale(scale, q.shape[-1]), initial_state
            )
        return o.to(q.dtype), state if output_final_state else None
    return _run(chunked_decay_attention, q, k, v, g, scale, initial_state, output_final_state, chunk_size=chunk_size)


def gla_quadratic(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The quadratic form: ``o = M v`` with the full ``T x T`` mixing matrix (O(T²) memory), plus the
    initial state's read-out. Arguments and returns as :func:`gla`."""
    return _run(quadratic_decay_attention, q, k, v, g, scale, initial_state, output_final_state)


def gla_mixing_matrix(q: Tensor, k: Tensor, g: Tensor, scale: float | None = None) -> Tensor:
    """``M[b, h, t, s] = scale * sum_k q[t,k] k[s,k] exp(sum_{s<u<=t} g[u,k])`` for ``s <= t``, else 0.

    ``q, k, g: (B, T, H, K) -> (B, H, T, T)`` (float32, or float64 for float64 input); from a zero state
    ``o = M v``.
    """
    _check(q, k, None, g, None)
    with torch.autocast(q.device.type, enabled=False):
        dtype = compute_dtype(q, k, g)
        s = _scale(scale, q.shape[-1])
        return decay_attention_matrix(_head_major(q, dtype), _head_major(k, dtype), _head_major(g, dtype), s)


def _update(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """One step on head-major slices: state ``(B, H, K, V)``, q/k/g ``(B, H, K)`` (q scaled), v ``(B, H, V)``."""
    state = torch.exp(g)[..., None] * state + k[..., None] * v[..., None, :]
    return (q[..., None] * state).sum(-2), state


def gla_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Plain recurrent loop over T: the reference every other form is tested against.

    Arguments and returns as :func:`gla`.
    """
    _check(q, k, v, g, initial_state)
    with torch.autocast(q.device.type, enabled=False):
        batch, length, heads, dk = q.shape
        dtype = compute_dtype(q, k, v, g)
        s = _scale(scale, dk)
        qs, ks, vs, gs = (t.to(dtype) for t in (q, k, v, g))
        qs = qs * s
        state = qs.new_zeros(batch, heads, dk, v.shape[-1]) if initial_state is None else initial_state.to(dtype)
        outs = []
        # unbind, not qs[:, t]: each indexing op's backward would write a full-size gradient per step (O(T^2))
        for q_t, k_t, v_t, g_t in zip(*(t.unbind(1) for t in (qs, ks, vs, gs))):
            o_t, state = _update(state, q_t, k_t, v_t, g_t)
            outs.append(o_t)
        o = torch.stack(outs, dim=1) if outs else vs.new_zeros(v.shape)
    return o.to(q.dtype), state if output_final_state else None


def gla_step(
    state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """One recurrent step for streaming inference.

    Args:
        state: ``(B, H, K, V)``.
        q, k, g: ``(B, H, K)``; v: ``(B, H, V)``.

    Returns:
        ``(o (B, H, V) in q's dtype, new_state (B, H, K, V) float32)``.
    """
    if q.dim() != 3:
        raise ValueError(f"gla_step takes one token: q must be (B, H, K), got {tuple(q.shape)}")
    o, new_state = gla_ref(q[:, None], k[:, None], v[:, None], g[:, None], scale, state, output_final_state=True)
    return o[:, 0], new_state
