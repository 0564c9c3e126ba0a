"""Chunked decayed linear attention: the shared engine behind SSD (Mamba-2), GLA and RetNet.

All three are the recurrence ``S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ``, ``o_t = q_tᵀ S_t`` with a log-decay
``g_t <= 0`` that is either one scalar per head (SSD, RetNet: ``g (..., T, 1)``) or one value per key
channel (GLA: ``g (..., T, K)``). Unrolled, ``o = M v`` with the lower-triangular semi-separable matrix

    M[t, s] = sum_k q[t, k] k[s, k] exp(sum_{u=s+1..t} g[u, k])     (s <= t)

The chunked form cuts T into chunks of Q tokens: inside a chunk it builds M's diagonal block densely
(matmuls), across chunks it carries the (K, V) state with a short loop over chunks.

Numerical stability: every exponent this module evaluates is a sum of log-decays over a forward range, so
it is ``<= 0`` and ``exp`` cannot overflow, however strong the decay and however long the sequence.
The textbook factorisation ``(q exp G) (k exp -G)ᵀ`` is never used (``exp(-G)`` overflows once the
cumulative decay inside a chunk passes ~88). For scalar decays the block is ``(q kᵀ) * exp(G_t - G_s)``
with the difference masked; for per-channel decays the block is assembled by recursive halving
(:func:`_per_channel_block`): the coupling of the second half of a block to its first half factors exactly
through the last position ``r`` of the first half, ``exp(G_t - G_r) exp(G_r - G_s)``, both factors <= 1.
Cumulative sums are taken in float64 and only their (short-range) differences are rounded, so long
sequences lose no precision near the diagonal.

Tensors here are head-major (``(..., T, K)``) and already in the compute dtype; the public ops
(:mod:`vmamba.ops.ssd`, :mod:`vmamba.ops.gla`) convert layouts and dtypes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "compute_dtype",
    "chunked_decay_attention",
    "quadratic_decay_attention",
    "decay_attention_matrix",
]


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (gradcheck), else float32: never accumulate below float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _scalar_terms(qc: Tensor, kc: Tensor, gc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chunk terms for one decay per head: ``gc (..., n, Q, 1)``.

    The cumulative sums are float64 (they are short: one value per token and head) and only their
    differences, which are local, get rounded to the compute dtype.
    """
    dtype, size = qc.dtype, qc.shape[-2]
    cum = gc[..., 0].double().cumsum(-1)  # (..., n, Q), restarted in every chunk
    upper = torch.ones(size, size, dtype=torch.bool, device=qc.device).triu(1)
    diff = (cum[..., :, None] - cum[..., None, :]).to(dtype)  # [t, s] = sum_{s<u<=t} g_u for s <= t
    intra = (qc @ kc.transpose(-1, -2)) * torch.exp(diff.masked_fill(upper, float("-inf")))
    to_end = torch.exp((cum[..., -1:] - cum).to(dtype))[..., None]  # sum_{s<u<=Q} g_u
    from_start = torch.exp(cum.to(dtype))[..., None]  # sum_{u<=t} g_u
    return intra, qc * from_start, kc * to_end, from_start[..., -1, :]


def _per_channel_terms(qc: Tensor, kc: Tensor, gc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chunk terms for a decay per key channel: ``gc (..., n, Q, K)``, by recursive halving.

    Blocks of size 1 hold ``q_t . k_t``. Two neighbouring blocks of size m join into one of size 2m whose
    lower-left quadrant couples late queries t to early keys s through r, the early half's last position:
    ``(q_t * P(t)) . (k_s * S(s))`` with ``P(t) = prod_{r<u<=t} exp(g_u)`` and ``S(s) = prod_{s<u<=r} exp(g_u)``.
    P and S are themselves doubled from level to level by multiplication (P of the late half times the
    early half's total), so ``exp`` is evaluated once per element and every factor lies in [0, 1].
    """
    qc, kc, gc = torch.broadcast_tensors(qc, kc, gc)
    size = qc.shape[-2]
    full = 1 << max(size - 1, 0).bit_length()
    if full != size:  # zero queries/keys and zero log-decay: the padding contributes nothing
        pad = (0, 0, 0, full - size)
        qc, kc, gc = F.pad(qc, pad), F.pad(kc, pad), F.pad(gc, pad)
    prefix = torch.exp(gc)  # P within blocks of 1: exp(g_t) (inclusive)
    suffix = torch.ones_like(prefix)  # S within blocks of 1: the empty product
    block = (qc * kc).sum(-1)[..., None, None]  # (..., n, full, 1, 1)
    m = 1
    while m < full:
        pairs = full // (2 * m)
        qp, kp, pp, sp = (t.unflatten(-2, (pairs, 2, m)) for t in (qc, kc, prefix, suffix))  # (..., p, 2, m, K)
        late_q = qp[..., 1, :, :] * pp[..., 1, :, :]
        early_k = kp[..., 0, :, :] * sp[..., 0, :, :]
        lower = late_q @ early_k.transpose(-1, -2)  # (..., n, p, m, m)
        halves = block.unflatten(-3, (pairs, 2))  # (..., n, p, 2, m, m)
        top = torch.cat([halves[..., 0, :, :], lower.new_zeros(()).expand_as(lower)], dim=-1)
        bottom = torch.cat([lower, halves[..., 1, :, :]], dim=-1)
        block = torch.cat([top, bottom], dim=-2)  # (..., n, p, 2m, 2m)
        # Grow P and S to blocks of 2m: late prefixes also span the early half, early suffixes the late half.
        one = torch.ones_like(pp[..., :1, -1:, :])
        prefix = (pp * torch.cat([one, pp[..., :1, -1:, :]], dim=-3)).flatten(-4, -2)
        suffix = (sp * torch.cat([pp[..., 1:, -1:, :], one], dim=-3)).flatten(-4, -2)
        m *= 2
    intra = block.squeeze(-3)[..., :size, :size]
    # prefix = exp(G_t) from the chunk start, suffix = exp(G_Q - G_s) to its end (padding decays by 1).
    return intra, qc[..., :size, :] * prefix[..., :size, :], kc[..., :size, :] * suffix[..., :size, :], prefix[..., -1, :]


def _chunk_terms(qc: Tensor, kc: Tensor, gc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(intra (..., n, Q, Q), q_in (..., n, Q, K), k_out (..., n, Q, K), decay (..., n, K or 1))``.

    intra is the diagonal block of the mixing matrix; ``q_in = q_t exp(G_t)`` reads the state carried into
    the chunk, ``k_out = k_s exp(G_Q - G_s)`` writes the state carried out, ``decay = exp(G_Q)``.
    """
    if gc.shape[-1] == 1:
        return _scalar_terms(qc, kc, gc)
    return _per_channel_terms(qc, kc, gc)


def chunked_decay_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Chunked ``S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ``, ``o_t = q_tᵀ S_t``.

    Args:
        q, k: ``(..., T, K)``; their leading dims broadcast against ``v``'s (a group of heads may share
            them, as SSD's grouped B/C do).
        v: ``(..., T, V)``.
        log_decay: ``(..., T, 1)`` (one decay per head) or ``(..., T, K)`` (per key channel), ``<= 0``.
        initial_state: ``(..., K, V)``; zeros when None.
        chunk_size: tokens per chunk (any positive size; powers of two are fastest for per-channel decays).

    Returns:
        ``o (..., T, V)`` and ``final_state (..., K, V)``, in the inputs' dtype (float32 or float64).
    """
    dtype = v.dtype
    length = v.shape[-2]
    size = max(1, min(chunk_size, length))
    chunks = -(-length // size)
    pad = chunks * size - length
    if pad:  # zero keys and zero log-decay: the tail neither writes nor decays the state
        q, k, v, log_decay = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, log_decay))
    qc, kc, vc, gc = (t.unflatten(-2, (chunks, size)) for t in (q, k, v, log_decay))  # (..., n, Q, *)
    intra, q_in, k_out, decay = _chunk_terms(qc, kc, gc)
    chunk_states = k_out.transpose(-1, -2) @ vc  # (..., n, K, V)
    chunk_decay = decay[..., None]  # (..., n, K or 1, 1)
    batch_shape = chunk_states.shape[:-3]
    state = chunk_states.new_zeros(*batch_shape, *chunk_states.shape[-2:])
    if initial_state is not None:
        state = state + initial_state
    starts = []
    for c in range(chunks):
        starts.append(state)
        state = chunk_decay[..., c, :, :] * state + chunk_states[..., c, :, :]
    starts = torch.stack(starts, dim=-3)  # (..., n, K, V)
    o = q_in @ starts + intra @ vc
    o = o.flatten(-3, -2)[..., :length, :]
    return o.to(dtype), state


def decay_attention_matrix(q: Tensor, k: Tensor, log_decay: Tensor) -> Tensor:
    """The quadratic ("attention") form: the full ``(..., T, T)`` lower-triangular mixing matrix ``M``.

    q, k: ``(..., T, K)``; log_decay: ``(..., T, 1)`` or ``(..., T, K)``. ``o = M v`` from a zero state.
    """
    return _chunk_terms(q.unsqueeze(-3), k.unsqueeze(-3), log_decay.unsqueeze(-3))[0].squeeze(-3)


def quadratic_decay_attention(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``o = M v`` with the full mixing matrix, plus the exact initial-state read and final-state write.

    Shapes as :func:`chunked_decay_attention`; costs O(T²) memory (for inspection and tests).
    """
    return chunked_decay_attention(q, k, v, log_decay, initial_state, chunk_size=max(1, v.shape[-2]))
