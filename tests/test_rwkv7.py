"""RWKV-7 generalized delta rule: chunked (WY) form and mixing matrix against the plain loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vmamba.ops import rwkv7, rwkv7_mixing_matrix, rwkv7_ref, rwkv7_step
from vmamba.ops.rwkv7 import LOG_RANGE_LIMIT

F64 = torch.float64


def raw_inputs(batch, length, heads, dk, dv, dtype=F64, state=False):
    """Unconstrained tensors; :func:`layer_inputs` maps them to an RWKV-7 layer's (r, w, k, v, a, b)."""
    shapes = [(batch, length, heads, dk)] * 3 + [(batch, length, heads, dv)] + [(batch, length, heads, dk)] * 2
    raw = [torch.randn(s, dtype=dtype) for s in shapes]
    s0 = torch.randn(batch, heads, dk, dv, dtype=dtype) if state else None
    return raw, s0


def layer_inputs(r, w_raw, k, v, kk_raw, iclr_raw):
    """As an RWKV-7 layer builds them: log-decay <= 0, a = -kk, b = kk * iclr with kk unit-norm."""
    kk = F.normalize(kk_raw, dim=-1)
    return r, -F.softplus(w_raw), k, v, -kk, kk * torch.sigmoid(iclr_raw)


def transition_product_matrix(r, w, k, a, b, scale):
    """``M[t, s] = scale r_t^T A_t ... A_{s+1} k_s`` with explicit K x K transitions (tiny sizes only)."""
    batch, length, heads, dk = r.shape
    eye = torch.eye(dk, dtype=r.dtype)
    trans = torch.diag_embed(torch.exp(w)) + b[..., :, None] * a[..., None, :]  # (B, T, H, K, K)
    m = torch.zeros(batch, heads, length, length, dtype=r.dtype)
    for s in range(length):
        prod = eye.expand(batch, heads, dk, dk)
        for t in range(s, length):
            if t > s:
                prod = trans[:, t] @ prod
            m[:, :, t, s] = scale * torch.einsum("bhk,bhkj,bhj->bh", r[:, t], prod, k[:, s])
    return m


@pytest.mark.parametrize("length,chunk", [(1, 8), (7, 4), (16, 16), (37, 8), (50, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_loop(length: int, chunk: int, with_state: bool) -> None:
    raw, s0 = raw_inputs(2, length, 3, 5, 4, state=with_state)
    args = layer_inputs(*raw)
    ref, ref_state = rwkv7_ref(*args, scale=0.8, initial_state=s0, output_final_state=True)
    o, state = rwkv7(*args, scale=0.8, initial_state=s0, output_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(o, ref)
    torch.testing.assert_close(state, ref_state)
    torch.testing.assert_close(rwkv7(*args, scale=0.8, initial_state=s0, chunk_size=chunk)[1], ref_state)
    assert rwkv7(*args, output_final_state=False)[1] is None  # the state by default, as fla's chunk_rwkv7
    assert rwkv7_ref(*args, output_final_state=False)[1] is None


def test_generic_a_b_and_default_scale() -> None:
    """Not only the delta-rule structure: any (a, b) with a contractive-enough transition."""
    raw, s0 = raw_inputs(1, 23, 2, 6, 3, state=True)
    r, w, k, v, _, _ = layer_inputs(*raw)
    a, b = 0.3 * torch.randn_like(r), 0.3 * torch.randn_like(r)
    ref, ref_state = rwkv7_ref(r, w, k, v, a, b, scale=None, initial_state=s0, output_final_state=True)
    o, state = rwkv7(r, w, k, v, a, b, scale=None, initial_state=s0, output_final_state=True, chunk_size=8)
    torch.testing.assert_close(o, ref)
    torch.testing.assert_close(state, ref_state)
    torch.testing.assert_close(rwkv7_ref(r, w, k, v, a, b, scale=6**-0.5)[0], rwkv7_ref(r, w, k, v, a, b, None)[0])


def test_gradients_match_loop() -> None:
    raw, s0 = raw_inputs(2, 21, 2, 4, 3, state=True)

    def grads(fn, **kw):
        leaves = [t.clone().requires_grad_(True) for t in (*raw, s0)]
        o, s = fn(*layer_inputs(*leaves[:6]), scale=0.9, initial_state=leaves[6], output_final_state=True, **kw)
        (torch.cos(o).sum() + (s * s).sum()).backward()
        return [t.grad for t in leaves]

    for got, want in zip(grads(rwkv7, chunk_size=8), grads(rwkv7_ref)):
        torch.testing.assert_close(got, want)


def test_gradcheck_float64() -> None:
    raw, s0 = raw_inputs(1, 6, 1, 3, 2, state=True)
    leaves = [t.requires_grad_(True) for t in (*raw, s0)]

    def fn(*xs):
        return rwkv7(*layer_inputs(*xs[:6]), initial_state=xs[6], output_final_state=True, chunk_size=4)

    assert torch.autograd.gradcheck(fn, leaves)


def test_step_form_and_state_carry() -> None:
    raw, s0 = raw_inputs(2, 11, 2, 4, 5, state=True)
    args = layer_inputs(*raw)
    full, full_state = rwkv7(*args, initial_state=s0, output_final_state=True, chunk_size=4)
    state, outs = s0, []
    for t in range(11):
        o, state = rwkv7_step(state, *(x[:, t] for x in args))
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, 1), full)
    torch.testing.assert_close(state, full_state)
    first, mid = rwkv7(*(x[:, :5] for x in args), initial_state=s0, output_final_state=True, chunk_size=4)
    second, end = rwkv7(*(x[:, 5:] for x in args), initial_state=mid, output_final_state=True, chunk_size=4)
    torch.testing.assert_close(torch.cat([first, second], 1), full)
    torch.testing.assert_close(end, full_state)


def test_mixing_matrix_is_the_quadratic_form() -> None:
    raw, _ = raw_inputs(2, 9, 2, 3, 4)
    r, w, k, v, a, b = layer_inputs(*raw)
    m = rwkv7_mixing_matrix(r, w, k, a, b, scale=0.7, chunk_size=4, block=4)
    assert m.shape == (2, 2, 9, 9)
    assert torch.all(m.triu(1) == 0)
    torch.testing.assert_close(m, transition_product_matrix(r, w, k, a, b, 0.7))
    torch.testing.assert_close(torch.einsum("bhts,bshv->bthv", m, v), rwkv7_ref(r, w, k, v, a, b, 0.7)[0])


@pytest.mark.parametrize("decay", [1e-3, 5.0, 1e3])
def test_strong_decays_long_sequence_finite(decay: float) -> None:
    """T = 16384; mean |w| from weak to far past what exp(+cumsum) could hold in float32."""
    raw, _ = raw_inputs(1, 16384, 1, 4, 4, dtype=torch.float32)
    r, w, k, v, a, b = layer_inputs(*raw)
    args = (r, w * decay, k, v, a, b)
    o, state = rwkv7(*args, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    # the last tokens agree with the loop started from the chunked state just before them
    _, before = rwkv7(*(x[:, :-6] for x in args), output_final_state=True)
    tail, tail_state = rwkv7_ref(*(x[:, -6:] for x in args), initial_state=before, output_final_state=True)
    torch.testing.assert_close(o[:, -6:], tail, rtol=1e-4, atol=1e-4 * (1 + tail.abs().max().item()))
    torch.testing.assert_close(state, tail_state, rtol=1e-4, atol=1e-4 * (1 + tail_state.abs().max().item()))


def test_strong_decays_match_loop_exactly() -> None:
    """Mixed channels, some decaying by e^-300 per step, one not at all: the chunk shrinks, stays exact."""
    raw, s0 = raw_inputs(1, 40, 2, 4, 3, state=True)
    r, w, k, v, a, b = layer_inputs(*raw)
    w = w * torch.tensor([300.0, 1.0, 0.0, 20.0], dtype=F64)
    ref, ref_state = rwkv7_ref(r, w, k, v, a, b, initial_state=s0, output_final_state=True)
    o, state = rwkv7(r, w, k, v, a, b, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(o, ref)
    torch.testing.assert_close(state, ref_state)
    assert LOG_RANGE_LIMIT < 88  # each factor exp(+-LIMIT/2) is far from float32 overflow


@pytest.mark.parametrize("strength", [3.75, 4.0, 7.9, 61.0])
def test_chunk_shortening_boundary(strength: float) -> None:
    """Uniform decays right at and past the shortening threshold (Q * |w| = LOG_RANGE_LIMIT)."""
    raw, s0 = raw_inputs(1, 45, 1, 3, 2, state=True)
    r, _, k, v, a, b = layer_inputs(*raw)
    w = torch.full_like(r, -strength)
    ref, ref_state = rwkv7_ref(r, w, k, v, a, b, initial_state=s0, output_final_state=True)
    o, state = rwkv7(r, w, k, v, a, b, initial_state=s0, output_final_state=True, chunk_size=16)
    torch.testing.assert_close(o, ref)
    torch.testing.assert_close(state, ref_state)


# bf16 inputs lose ~3 significant digits on the way in; accumulation stays float32. Documented tolerance:
# |o_bf16 - o_fp32| <= 3e-2 * max|o_fp32|.
BF16_TOLERANCE = 3e-2


def test_bfloat16_and_autocast() -> None:
    raw, _ = raw_inputs(1, 100, 2, 16, 16, dtype=torch.float32)
    args = layer_inputs(*raw)
    ref, _ = rwkv7(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = rwkv7(*args)
    torch.testing.assert_close(auto, ref)  # autocast does not lower the accumulation precision
    low, _ = rwkv7(*(x.bfloat16() for x in args))
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() <= BF16_TOLERANCE * ref.abs().max()


def test_bad_input() -> None:
    raw, s0 = raw_inputs(2, 5, 3, 4, 6, state=True)
    r, w, k, v, a, b = layer_inputs(*raw)
    with pytest.raises(ValueError, match="k must match r"):
        rwkv7(r, w, k[..., :3], v, a, b)
    with pytest.raises(ValueError, match="a must match r"):
        rwkv7(r, w, k, v, a[:, :4], b)
    with pytest.raises(ValueError, match="v must be"):
        rwkv7(r, w, k, v[:, :, :2], a, b)
    with pytest.raises(ValueError, match="initial_state"):
        rwkv7(r, w, k, v, a, b, initial_state=s0.transpose(-1, -2))
    with pytest.raises(ValueError, match="log-decay"):
        rwkv7(r, -w, k, v, a, b)
    with pytest.raises(ValueError, match="log-decay"):
        rwkv7_ref(r, w.abs(), k, v, a, b)
    with pytest.raises(ValueError, match="chunk_size"):
        rwkv7(r, w, k, v, a, b, chunk_size=0)
    with pytest.raises(ValueError, match="one token"):
        rwkv7_step(s0, r, w, k, v, a, b)
