"""Retention: the chunked and parallel forms against the plain loop (outputs, states, gradients)."""
from __future__ import annotations

import pytest
import torch

from vmamba.ops import RetentionMode, retention, retention_mixing_matrix, retention_ref, retention_step
from vmamba.ops.retention import retention_log_decays

F64 = torch.float64


def make(batch: int, length: int, heads: int, dk: int, dv: int, dtype: torch.dtype = F64, state: bool = False):
    q = torch.randn(batch, length, heads, dk, dtype=dtype)
    k = torch.randn(batch, length, heads, dk, dtype=dtype)
    v = torch.randn(batch, length, heads, dv, dtype=dtype)
    s0 = torch.randn(batch, heads, dk, dv, dtype=dtype) if state else None
    return q, k, v, s0


def test_decays_are_retnets() -> None:
    # flash-linear-attention: g_gamma = log(1 - 2^(-5 - arange(H)))
    expected = torch.log(1 - torch.pow(2.0, -5.0 - torch.arange(6, dtype=F64)))
    torch.testing.assert_close(retention_log_decays(6, dtype=F64), expected)
    # many heads: the decay is indistinguishable from 1 in float32, its log is not
    assert retention_log_decays(30)[-1] < 0


@pytest.mark.parametrize("length", [1, 7, 16, 45])
@pytest.mark.parametrize("with_state", [False, True])
def test_three_modes_agree(length: int, with_state: bool) -> None:
    q, k, v, s0 = make(2, length, 3, 5, 4, state=with_state)
    ref, ref_state = retention_ref(q, k, v, initial_state=s0, output_final_state=True)
    for mode in ("parallel", "chunk", RetentionMode.CHUNK):
        o, state = retention(q, k, v, mode=mode, initial_state=s0, output_final_state=True, chunk_size=8)
        torch.testing.assert_close(o, ref)
        torch.testing.assert_close(state, ref_state)
    o, state = retention(q, k, v, mode="recurrent")
    assert state is None
    torch.testing.assert_close(o, retention_ref(q, k, v, initial_state=None)[0])


def test_positional_arguments_bind_as_fla_chunk_retention() -> None:
    """``(q, k, v, scale, initial_state, output_final_state, cu_seqlens)`` positionally; mode and chunk size
    keyword-only (a mode in cu_seqlens' slot is refused)."""
    q, k, v, s0 = make(1, 9, 2, 4, 3, state=True)
    o, state = retention(q, k, v, 0.5, s0, True)
    ref, ref_state = retention_ref(q, k, v, scale=0.5, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(o, ref)
    torch.testing.assert_close(state, ref_state)
    with pytest.raises(TypeError, match="cu_seqlens"):
        retention(q, k, v, 0.5, s0, True, "parallel")


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_head_major_engine_with_scalar_decays(chunk: int) -> None:
    """chunking.chunked_decay_attention still takes one decay per head (``(..., T, 1)``); the ops now run on
    the heads engine, so its scalar path is checked here against the loop, with gradients."""
    from vmamba.ops.chunking import chunked_decay_attention

    q, k, v, s0 = make(2, 45, 3, 5, 4, state=True)
    leaves = [t.requires_grad_() for t in (q, k, v, s0)]
    scale = 5**-0.5
    log_decay = retention_log_decays(3, dtype=F64)[None, :, None, None].expand(2, 3, 45, 1)
    o, state = chunked_decay_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), log_decay, s0, chunk_size=chunk, scale=scale
    )
    ref, ref_state = retention_ref(q, k, v, scale=scale, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(o.transpose(1, 2), ref)
    torch.testing.assert_close(state, ref_state)
    got = torch.autograd.grad(o.sum() + state.sum(), leaves)
    want = torch.autograd.grad(ref.sum() + ref_state.sum(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("mode", ["chunk", "parallel"])
def test_gradients_match_loop(mode: str) -> None:
    q, k, v, s0 = make(2, 19, 2, 4, 3, state=True)

    def grads(fn, **kw):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, s0)]
        o, s = fn(*leaves[:3], scale=0.7, initial_state=leaves[3], output_final_state=True, **kw)
        (o.sin().sum() + (s * s).sum()).backward()
        return [t.grad for t in leaves]

    for got, want in zip(grads(retention, mode=mode, chunk_size=4), grads(retention_ref)):
        torch.testing.assert_close(got, want)


def test_gradcheck_float64() -> None:
    q, k, v, s0 = make(1, 6, 2, 3, 2, state=True)
    leaves = [t.requires_grad_(True) for t in (q, k, v, s0)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: retention(q, k, v, initial_state=s, output_final_state=True, chunk_size=4), leaves
    )


def test_step_form_and_state_carry() -> None:
    q, k, v, s0 = make(2, 13, 3, 4, 5, state=True)
    full, full_state = retention(q, k, v, initial_state=s0, output_final_state=True, chunk_size=4)
    state, outs = s0, []
    for t in range(q.shape[1]):
        o, state = retention_step(state, q[:, t], k[:, t], v[:, t])
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, 1), full)
    torch.testing.assert_close(state, full_state)
    first, mid = retention(q[:, :6], k[:, :6], v[:, :6], initial_state=s0, output_final_state=True, chunk_size=4)
    second, end = retention(q[:, 6:], k[:, 6:], v[:, 6:], initial_state=mid, output_final_state=True, chunk_size=4)
    torch.testing.assert_close(torch.cat([first, second], 1), full)
    torch.testing.assert_close(end, full_state)


def test_mixing_matrix() -> None:
    q, k, v, _ = make(2, 11, 3, 4, 5)
    m = retention_mixing_matrix(q, k, scale=0.5)
    assert m.shape == (2, 3, 11, 11)
    assert torch.all(m.triu(1) == 0)
    torch.testing.assert_close(torch.einsum("bhts,bshv->bthv", m, v), retention_ref(q, k, v, scale=0.5)[0])
    gamma = 1 - 2.0 ** (-5 - torch.arange(3, dtype=F64))
    entry = 0.5 * gamma[2] ** 4 * (q[1, 9, 2] @ k[1, 5, 2])
    torch.testing.assert_close(m[1, 2, 9, 5], entry)


def test_long_sequence_finite() -> None:
    q, k, v, _ = make(1, 16384, 8, 8, 8, dtype=torch.float32)
    o, state = retention(q, k, v, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    # the chunked form still matches the loop at the end of the long sequence (state carried 256 chunks)
    tail_ref, _ = retention_ref(q[:, -5:], k[:, -5:], v[:, -5:], initial_state=retention(
        q[:, :-5], k[:, :-5], v[:, :-5], output_final_state=True)[1])
    torch.testing.assert_close(o[:, -5:], tail_ref, rtol=1e-4, atol=1e-3)


# bf16 inputs lose ~3 significant digits on the way in; accumulation stays float32. Documented tolerance:
# |o_bf16 - o_fp32| <= 2e-2 * max|o_fp32|.
BF16_TOLERANCE = 2e-2


def test_bfloat16_and_autocast() -> None:
    q, k, v, _ = make(1, 100, 4, 16, 16, dtype=torch.float32)
    ref, _ = retention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = retention(q, k, v)
    torch.testing.assert_close(auto, ref)  # autocast does not lower the accumulation precision
    low, _ = retention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() <= BF16_TOLERANCE * ref.abs().max()


def test_bad_input() -> None:
    q, k, v, s0 = make(2, 5, 3, 4, 6, state=True)
    with pytest.raises(ValueError, match="k must match q"):
        retention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="v must be"):
        retention(q, k, v[:, :4])
    with pytest.raises(ValueError, match="initial_state"):
        retention(q, k, v, initial_state=s0[..., :5])
    with pytest.raises(ValueError, match="q must be"):
        retention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="unknown retention mode"):
        retention(q, k, v, mode="fused")
    with pytest.raises(ValueError, match="chunk_size"):
        retention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="one token"):
        retention_step(s0, q, k, v)
