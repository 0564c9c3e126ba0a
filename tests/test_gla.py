"""GLA: chunked, quadratic and step forms against the plain loop reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vmamba.ops import gla, gla_mixing_matrix, gla_quadratic, gla_ref, gla_step


def _inputs(batch=2, length=37, heads=3, dk=4, dv=5, dtype=torch.float64, strength=1.0):
    q = torch.randn(batch, length, heads, dk, dtype=dtype)
    k = torch.randn(batch, length, heads, dk, dtype=dtype)
    v = torch.randn(batch, length, heads, dv, dtype=dtype)
    g = F.logsigmoid(torch.randn(batch, length, heads, dk, dtype=dtype) * 2) * strength
    return q, k, v, g


def _state(q, v):
    return torch.randn(q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype=q.dtype)


@pytest.mark.parametrize("length", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("chunk_size", [1, 6, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_loop(length, chunk_size, with_state):
    q, k, v, g = _inputs(length=length)
    s0 = _state(q, v) if with_state else None
    o_ref, s_ref = gla_ref(q, k, v, g, initial_state=s0, output_final_state=True)
    o, s = gla(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=chunk_size)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_float32_matches_float64_loop():
    q, k, v, g = _inputs(length=150, dk=16, dv=16)
    o_ref, s_ref = gla_ref(q, k, v, g, output_final_state=True)
    o, s = gla(*(t.float() for t in (q, k, v, g)), output_final_state=True)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-4, atol=1e-4)


def test_gradients_match_loop():
    q, k, v, g = _inputs(length=29)
    s0 = _state(q, v)
    leaves = [t.requires_grad_() for t in (q, k, v, g, s0)]
    weights = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=q.dtype)
    state_w = torch.randn_like(s0)

    def grads(fn, **kw):
        o, s = fn(q, k, v, g, initial_state=s0, output_final_state=True, **kw)
        return torch.autograd.grad((o * weights).sum() + (s * state_w).sum(), leaves)

    for got, want in zip(grads(gla, chunk_size=8), grads(gla_ref)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("regime", ["fast", "halving"])
def test_both_chunk_paths_match_loop_with_gradients(regime, monkeypatch):
    """Per-channel decays take the factorised fast path while every chunk's total decay is within
    LOG_RANGE_LIMIT and recursive halving otherwise; both must be exact. The fast case sits just under the
    limit (the factor exp(-G) reaches ~e^59), where a careless backward overflows."""
    import vmamba.ops.chunking as chunking

    calls = []
    halving = chunking._halving_terms
    monkeypatch.setattr(chunking, "_halving_terms", lambda *a: calls.append(1) or halving(*a))
    torch.manual_seed(3)
    q, k, v, _ = _inputs(batch=1, length=100, heads=2, dk=6, dv=3, dtype=torch.float32)
    per_step = 0.92 if regime == "fast" else 3.0  # 64 steps: ~59 (< 60) or ~192
    g = -(per_step + 0.01 * torch.rand(1, 100, 2, 6))
    leaves = [t.requires_grad_() for t in (q, k, v, g)]
    o, s = gla(q, k, v, g, output_final_state=True, chunk_size=64)
    grads = torch.autograd.grad(o.sum() + s.sum(), leaves)
    assert bool(calls) == (regime == "halving")
    o_ref, s_ref = gla_ref(*(t.double() for t in leaves), output_final_state=True)
    grads_ref = torch.autograd.grad(o_ref.sum() + s_ref.sum(), leaves)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, grads_ref):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-4)


def test_gradient_of_a_single_input():
    """Only q differentiable: the final state does not depend on it (and must not break the backward)."""
    q, k, v, g = _inputs(length=20)
    q.requires_grad_()
    o, s = gla(q, k, v, g, output_final_state=True, chunk_size=8)
    (grad,) = torch.autograd.grad(o.sum() + s.sum(), q)
    o_ref, _ = gla_ref(q, k, v, g)
    (grad_ref,) = torch.autograd.grad(o_ref.sum(), q)
    torch.testing.assert_close(grad, grad_ref)


def test_flop_count_is_registered():
    from vmamba.ops.flops import count_flops
    from vmamba.ops.fused import forced_scan_backend

    q, k, v, g = _inputs(batch=1, length=100, heads=4, dk=32, dv=16, dtype=torch.float32)
    chunk = 64  # MACs per token: scores Q*K and mixing Q*V per head, state write and read 2*K*V per head
    macs = 100 * 4 * (chunk * 32 + chunk * 16 + 2 * 32 * 16)
    with forced_scan_backend("torch"):  # the chunked path (inference may run the fused recurrence)
        assert count_flops(lambda: gla(q, k, v, g, chunk_size=chunk)) == 2 * macs


def test_gradcheck_chunked_and_quadratic():
    q, k, v, g = _inputs(batch=1, length=6, heads=2, dk=3, dv=2)
    s0 = _state(q, v)
    leaves = tuple(t.requires_grad_() for t in (q, k, v, g, s0))

    def chunked(q, k, v, g, s0):
        return gla(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=4)

    def quadratic(q, k, v, g, s0):
        return gla_quadratic(q, k, v, g, initial_state=s0, output_final_state=True)

    assert torch.autograd.gradcheck(chunked, leaves)
    assert torch.autograd.gradcheck(quadratic, leaves)


def test_quadratic_and_mixing_matrix_match_loop():
    q, k, v, g = _inputs(length=23)
    s0 = _state(q, v)
    o_ref, s_ref = gla_ref(q, k, v, g, initial_state=s0, output_final_state=True)
    o, s = gla_quadratic(q, k, v, g, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)
    mix = gla_mixing_matrix(q, k, g)  # (B, H, T, T)
    assert mix.shape == (2, 3, 23, 23)
    assert torch.all(mix.triu(1) == 0)
    o_zero, _ = gla_ref(q, k, v, g)
    torch.testing.assert_close(torch.einsum("bhts,bshv->bthv", mix, v), o_zero)


def test_step_over_sequence_equals_full():
    q, k, v, g = _inputs(length=11)
    s0 = _state(q, v)
    o_full, s_full = gla(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=4)
    state, outs = s0, []
    for t in range(q.shape[1]):
        o_t, state = gla_step(state, q[:, t], k[:, t], v[:, t], g[:, t])
        outs.append(o_t)
    torch.testing.assert_close(torch.stack(outs, 1), o_full)
    torch.testing.assert_close(state, s_full)


def test_two_calls_carrying_state_equal_one():
    q, k, v, g = _inputs(length=50)
    o_full, s_full = gla(q, k, v, g, output_final_state=True, chunk_size=16)
    cut = 21
    o1, s1 = gla(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], output_final_state=True, chunk_size=16)
    o2, s2 = gla(q[:, cut:], k[:, cut:], v[:, cut:], g[:, cut:], initial_state=s1, output_final_state=True,
                 chunk_size=16)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_full)
    torch.testing.assert_close(s2, s_full)


def test_scale_and_final_state_flag():
    q, k, v, g = _inputs(length=9)
    o, s = gla(q, k, v, g)
    assert s is None
    o2, _ = gla(q, k, v, g, scale=q.shape[-1] ** -0.5)
    torch.testing.assert_close(o, o2)
    o3, _ = gla_ref(q, k, v, g, scale=0.5)
    o4, _ = gla(q, k, v, g, scale=0.5)
    torch.testing.assert_close(o3, o4)


def test_long_sequence_strong_decay_is_finite_and_exact():
    """T=16384 with decays up to e^-300 per step: no inf/NaN, and (as memory fades within a few steps)
    the last tokens equal a loop over a short window."""
    torch.manual_seed(1)
    length, window = 16384, 48
    q, k, v, _ = _inputs(batch=1, length=length, heads=2, dk=8, dv=8, dtype=torch.float32)
    g = -torch.empty(1, length, 2, 8).uniform_(5.0, 30.0)
    g[..., 0] = -300.0  # exp underflows to exactly 0
    leaves = [t.requires_grad_() for t in (q, k, v, g)]
    o, s = gla(q, k, v, g, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    o.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    with torch.no_grad():
        o_win, s_win = gla_ref(*(t[:, -window:] for t in (q, k, v, g)), output_final_state=True)
    torch.testing.assert_close(o[:, -window // 2:].detach(), o_win[:, -window // 2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.detach(), s_win, rtol=1e-5, atol=1e-5)


def test_bfloat16_autocast_within_tolerance():
    """bf16 inputs under autocast: float32 accumulation inside, bf16 out. Documented tolerance: the result
    equals the float32 computation on the same (bf16-rounded) inputs up to bf16 rounding of the output,
    |diff| <= 1e-2 * max|o|."""
    q, k, v, g = (t.to(torch.bfloat16) for t in _inputs(batch=1, length=200, heads=2, dk=16, dv=16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = gla(q, k, v, g, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o32, s32 = gla(*(t.float() for t in (q, k, v, g)), output_final_state=True)
    assert (o.float() - o32).abs().max() <= 1e-2 * o32.abs().max()
    torch.testing.assert_close(s, s32)


def test_bad_input_raises():
    q, k, v, g = _inputs(length=8)
    with pytest.raises(ValueError, match="k must match q"):
        gla(q, k[:, :-1], v, g)
    with pytest.raises(ValueError, match="g must match q"):
        gla(q, k, v, g[..., :-1])
    with pytest.raises(ValueError, match="v must be"):
        gla(q, k, v[:, :-1], g)
    with pytest.raises(ValueError, match="q must be"):
        gla(q[0], k[0], v[0], g[0])
    with pytest.raises(ValueError, match="initial_state must be"):
        gla(q, k, v, g, initial_state=torch.zeros(2, 3, 5, 4, dtype=q.dtype))
    with pytest.raises(ValueError, match="log-space decay and must be <= 0"):
        gla(q, k, v, g.abs() + 0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        gla(q, k, v, g, chunk_size=0)
    with pytest.raises(ValueError, match="one token"):
        gla_step(torch.zeros(2, 3, 4, 5), q, k, v, g)
