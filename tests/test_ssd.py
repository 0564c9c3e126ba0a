"""SSD (Mamba-2): chunked, quadratic and step forms against the plain loop reference."""
from __future__ import annotations

import pytest
import torch

from vmamba.ops import ssd, ssd_mixing_matrix, ssd_quadratic, ssd_ref, ssd_step
from vmamba.ops.fused import FusedKernel, forced_scan_backend

from tests.conftest import needs_fused_kernel

# "fused": inference on the compiled recurrence (skipped, with the reason, where it cannot be built)
BACKENDS = ["torch", pytest.param("fused", marks=needs_fused_kernel(FusedKernel.RECURRENCE))]


def _inputs(batch=2, length=37, heads=4, head_dim=3, groups=2, d_state=5, dtype=torch.float64):
    x = torch.randn(batch, length, heads, head_dim, dtype=dtype)
    dt = torch.randn(batch, length, heads, dtype=dtype)
    A = -torch.rand(heads, dtype=dtype) * 3 - 0.1
    B = torch.randn(batch, length, groups, d_state, dtype=dtype)
    C = torch.randn(batch, length, groups, d_state, dtype=dtype)
    return x, dt, A, B, C


def _extras(x, dt, B, per_channel_d=False):
    heads, head_dim = x.shape[2], x.shape[3]
    return dict(
        D=torch.randn(heads, head_dim, dtype=x.dtype) if per_channel_d else torch.randn(heads, dtype=x.dtype),
        z=torch.randn_like(x),
        dt_bias=torch.randn(heads, dtype=x.dtype),
        dt_softplus=True,
    )


def _state(x, B):
    return torch.randn(x.shape[0], x.shape[2], x.shape[3], B.shape[3], dtype=x.dtype)


@pytest.mark.parametrize("length", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("chunk_size", [1, 6, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_loop(length, chunk_size, with_state):
    x, dt, A, B, C = _inputs(length=length)
    kw = _extras(x, dt, B, per_channel_d=chunk_size == 6)
    h0 = _state(x, B) if with_state else None
    y_ref, h_ref = ssd_ref(x, dt, A, B, C, initial_states=h0, return_final_states=True, **kw)
    y, h = ssd(x, dt, A, B, C, chunk_size=chunk_size, initial_states=h0, return_final_states=True, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groups", [1, 4])
def test_groups_and_plain_dt(groups):
    x, dt, A, B, C = _inputs(length=20, groups=groups)
    dt = dt.abs()  # no softplus: dt must already be a non-negative step
    y_ref, h_ref = ssd_ref(x, dt, A, B, C, return_final_states=True)
    y, h = ssd(x, dt, A, B, C, chunk_size=8, return_final_states=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)


def test_float32_matches_float64_loop():
    x, dt, A, B, C = _inputs(length=150, heads=6, head_dim=8, groups=1, d_state=16)
    kw = _extras(x, dt, B)
    y_ref, h_ref = ssd_ref(x, dt, A, B, C, return_final_states=True, **kw)
    f32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}
    y, h = ssd(*(t.float() for t in (x, dt, A, B, C)), return_final_states=True, **f32)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)


def test_gradients_match_loop():
    x, dt, A, B, C = _inputs(length=29)
    kw = _extras(x, dt, B, per_channel_d=True)
    h0 = _state(x, B)
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C, kw["D"], kw["z"], kw["dt_bias"], h0)]
    weights = torch.randn_like(x)
    state_w = torch.randn_like(h0)

    def grads(fn, **extra):
        y, h = fn(x, dt, A, B, C, initial_states=h0, return_final_states=True, **kw, **extra)
        return torch.autograd.grad((y * weights).sum() + (h * state_w).sum(), leaves)

    for got, want in zip(grads(ssd, chunk_size=8), grads(ssd_ref)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_flop_count_is_registered():
    """B/C products are counted once per group, the rest per head."""
    from vmamba.ops.flops import count_flops
    from vmamba.ops.fused import forced_scan_backend

    x, dt, A, B, C = _inputs(batch=1, length=100, heads=6, head_dim=8, groups=1, d_state=16, dtype=torch.float32)
    macs = 100 * (1 * 32 * 16 + 6 * (32 * 8 + 2 * 16 * 8))  # the default chunk of 32 tokens
    with forced_scan_backend("torch"):  # the chunked path (inference may run the fused recurrence)
        assert count_flops(lambda: ssd(x, dt, A.abs().neg(), B, C, dt_softplus=True)) == 2 * macs


def test_gradcheck_chunked_and_quadratic():
    x, dt, A, B, C = _inputs(batch=1, length=6, heads=2, head_dim=2, groups=1, d_state=3)
    h0 = _state(x, B)
    D, z, bias = torch.randn(2, dtype=x.dtype), torch.randn_like(x), torch.randn(2, dtype=x.dtype)
    leaves = tuple(t.requires_grad_() for t in (x, dt, A, B, C, D, z, bias, h0))

    def chunked(x, dt, A, B, C, D, z, bias, h0):
        return ssd(x, dt, A, B, C, chunk_size=4, D=D, z=z, dt_bias=bias, dt_softplus=True, initial_states=h0,
                   return_final_states=True)

    def quadratic(x, dt, A, B, C, D, z, bias, h0):
        return ssd_quadratic(x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True, initial_states=h0,
                             return_final_states=True)

    assert torch.autograd.gradcheck(chunked, leaves)
    assert torch.autograd.gradcheck(quadratic, leaves)


def test_quadratic_and_mixing_matrix_match_loop():
    x, dt, A, B, C = _inputs(length=23)
    kw = _extras(x, dt, B)
    h0 = _state(x, B)
    y_ref, h_ref = ssd_ref(x, dt, A, B, C, initial_states=h0, return_final_states=True, **kw)
    y, h = ssd_quadratic(x, dt, A, B, C, initial_states=h0, return_final_states=True, **kw)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    mix = ssd_mixing_matrix(dt, A, B, C, dt_bias=kw["dt_bias"], dt_softplus=True)  # (B, H, T, T)
    assert mix.shape == (2, 4, 23, 23)
    assert torch.all(mix.triu(1) == 0)
    y_zero = ssd_ref(x, dt, A, B, C, dt_bias=kw["dt_bias"], dt_softplus=True)
    torch.testing.assert_close(torch.einsum("bhts,bshp->bthp", mix, x), y_zero)


def test_step_over_sequence_equals_full():
    x, dt, A, B, C = _inputs(length=11)
    kw = _extras(x, dt, B)
    h0 = _state(x, B)
    y_full, h_full = ssd(x, dt, A, B, C, chunk_size=4, initial_states=h0, return_final_states=True, **kw)
    state, outs = h0, []
    for t in range(x.shape[1]):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D=kw["D"], z=kw["z"][:, t],
                              dt_bias=kw["dt_bias"], dt_softplus=True)
        outs.append(y_t)
    torch.testing.assert_close(torch.stack(outs, 1), y_full)
    torch.testing.assert_close(state, h_full)


def test_two_calls_carrying_state_equal_one():
    x, dt, A, B, C = _inputs(length=50)
    kw = _extras(x, dt, B)
    y_full, h_full = ssd(x, dt, A, B, C, chunk_size=16, return_final_states=True, **kw)
    cut = 21
    first = {k: (v[:, :cut] if k == "z" else v) for k, v in kw.items()}
    second = {k: (v[:, cut:] if k == "z" else v) for k, v in kw.items()}
    y1, h1 = ssd(*(t[:, :cut] if t.dim() > 1 else t for t in (x, dt, A, B, C)), chunk_size=16,
                 return_final_states=True, **first)
    y2, h2 = ssd(*(t[:, cut:] if t.dim() > 1 else t for t in (x, dt, A, B, C)), chunk_size=16,
                 initial_states=h1, return_final_states=True, **second)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full)
    torch.testing.assert_close(h2, h_full)


def test_long_sequence_strong_decay_is_finite_and_exact():
    """T=16384 with per-step decays down to e^-2000: no inf/NaN, and (as memory fades within a few steps)
    the last tokens equal a loop over a short window."""
    torch.manual_seed(1)
    length, window = 16384, 48
    x, dt, A, B, C = _inputs(batch=1, length=length, heads=2, head_dim=4, groups=1, d_state=8, dtype=torch.float32)
    dt = torch.empty(1, length, 2).uniform_(1.0, 20.0)
    A = torch.tensor([-5.0, -100.0])
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C)]
    y, h = ssd(x, dt, A, B, C, return_final_states=True)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    with torch.no_grad():
        y_win, h_win = ssd_ref(*(t[:, -window:] for t in (x, dt)), A, *(t[:, -window:] for t in (B, C)),
                               return_final_states=True)
    torch.testing.assert_close(y[:, -window // 2:].detach(), y_win[:, -window // 2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.detach(), h_win, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("regime", ["factorised", "steep", "mixed"])
def test_chunk_regimes_match_loop_with_gradients(regime, monkeypatch):
    """A (chunk, head) whose total log-decay is within 2 * LOG_RANGE_LIMIT takes the factorised block
    (exp(G_t - m) exp(m - G_s), each factor <= e^60), a steeper one the exact masked block; both exact, in
    float32 near the boundary (factors ~e^59) and with gradients."""
    from vmamba.ops import chunking
    from vmamba.ops.chunking import LOG_RANGE_LIMIT

    steep_pairs = []
    exact = chunking._steep_blocks
    monkeypatch.setattr(
        chunking, "_steep_blocks", lambda s, c, v, r, h, d: steep_pairs.append(len(r)) or exact(s, c, v, r, h, d)
    )
    torch.manual_seed(5)
    length, chunk = 70, 32
    x, _, _, B, C = _inputs(batch=1, length=length, heads=3, head_dim=4, groups=1, d_state=6, dtype=torch.float32)
    per_step = {"factorised": 2 * LOG_RANGE_LIMIT * 0.98 / chunk, "steep": 6.0, "mixed": 2 * LOG_RANGE_LIMIT / chunk}
    dt = per_step[regime] * (1.0 + 0.02 * torch.rand(1, length, 3))  # "mixed": some chunks just over the limit
    if regime == "mixed":
        dt[..., 0] = 0.05  # one head far from the limit
    A = -torch.ones(3)
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C)]
    y, h = ssd(*leaves, chunk_size=chunk, return_final_states=True)
    grads = torch.autograd.grad(y.sum() + h.sum(), leaves)
    if regime == "factorised":
        assert steep_pairs == []
    elif regime == "steep":  # the two full chunks of every head; the 6-token tail stays within the limit
        assert steep_pairs[0] == 2 * 3
    else:
        assert 0 < steep_pairs[0] < 3 * 3
    y_ref, h_ref = ssd_ref(*(t.double() for t in leaves), return_final_states=True)
    grads_ref = torch.autograd.grad(y_ref.sum() + h_ref.sum(), leaves)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)
    for name, got, want in zip(["x", "dt", "A", "B", "C"], grads, grads_ref):
        assert torch.isfinite(got).all()
        # A's gradient sums every token's contribution in float32 (the previous engine erred alike, ~1e-3)
        tol = 3e-3 if name == "A" else 1e-4
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


def test_bfloat16_autocast_within_tolerance():
    """bf16 inputs under autocast: float32 accumulation inside, bf16 out. Documented tolerance: equal to the
    float32 computation on the same (bf16-rounded) inputs up to bf16 output rounding, |diff| <= 1e-2 max|y|."""
    x, dt, A, B, C = (t.to(torch.bfloat16) for t in _inputs(batch=1, length=200, heads=4, head_dim=8, groups=1,
                                                                d_state=16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = ssd(x, dt, A, B, C, dt_softplus=True, return_final_states=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    y32, h32 = ssd(*(t.float() for t in (x, dt, A, B, C)), dt_softplus=True, return_final_states=True)
    assert (y.float() - y32).abs().max() <= 1e-2 * y32.abs().max()
    torch.testing.assert_close(h, h32)


def test_bad_input_raises():
    x, dt, A, B, C = _inputs(length=8)
    with pytest.raises(ValueError, match="x must be"):
        ssd(x[:, :-1], dt, A, B, C)
    with pytest.raises(ValueError, match="A must be"):
        ssd(x, dt, A[:-1], B, C)
    with pytest.raises(ValueError, match="C must match B"):
        ssd(x, dt, A, B, C[..., :-1])
    with pytest.raises(ValueError, match="B must be"):
        ssd(x, dt, A, B[:, :-1], C[:, :-1])
    with pytest.raises(ValueError, match="must divide the number of heads"):
        ssd(x, dt, A, B[:, :, :1].expand(-1, -1, 3, -1), C[:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="D must be"):
        ssd(x, dt, A, B, C, D=torch.ones(3))
    with pytest.raises(ValueError, match="z must match x"):
        ssd(x, dt, A, B, C, z=x[..., :-1])
    with pytest.raises(ValueError, match="dt_bias must be"):
        ssd(x, dt, A, B, C, dt_bias=torch.ones(5))
    with pytest.raises(ValueError, match="initial_states must be"):
        ssd(x, dt, A, B, C, initial_states=torch.zeros(2, 4, 5, 3, dtype=x.dtype))
    with pytest.raises(ValueError, match="must be <= 0"):
        ssd(x, dt.abs(), -A, B, C)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(x, dt, A, B, C, chunk_size=0)
    with pytest.raises(ValueError, match="one token"):
        ssd_step(torch.zeros(2, 4, 3, 5), x, dt, A, B, C)


@pytest.mark.parametrize("backend", BACKENDS)
def test_returns_like_mamba_chunk_scan_combined(backend):
    """``y`` alone unless ``return_final_states`` (then ``(y, final_states)``); positional arguments bind as in
    mamba-ssm."""
    x, dt, A, B, C = (t.float() for t in _inputs(length=13))
    kw = {k: (v.float() if torch.is_tensor(v) else v) for k, v in _extras(x, dt, B).items()}
    h0 = _state(x, B).float()
    with torch.no_grad(), forced_scan_backend(backend):
        for form, extra in ((ssd, {"chunk_size": 4}), (ssd_quadratic, {}), (ssd_ref, {})):
            y = form(x, dt, A, B, C, **extra, **kw)
            assert isinstance(y, torch.Tensor) and y.shape == x.shape, form.__name__
            y2, h = form(x, dt, A, B, C, initial_states=h0, return_final_states=True, **extra, **kw)
            assert h.shape == h0.shape, form.__name__
        positional = ssd(x, dt, A, B, C, 4, kw["D"], kw["z"], kw["dt_bias"], h0, dt_softplus=True,
                         return_final_states=True)
        torch.testing.assert_close(positional[0], y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(positional[1], h, rtol=1e-5, atol=1e-5)
        # mamba-ssm's positional order goes on: seq_idx, cu_seqlens, dt_softplus, dt_limit, return_final_states
        all_positional = ssd(x, dt, A, B, C, 4, kw["D"], kw["z"], kw["dt_bias"], h0, None, None, True,
                             (0.0, float("inf")), True)
        torch.testing.assert_close(all_positional[0], y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(all_positional[1], h, rtol=1e-5, atol=1e-5)


def _limited_dt(dt, bias, dt_limit):
    """mamba-ssm's step sizes: softplus(dt + bias), clamped to dt_limit."""
    return torch.nn.functional.softplus(dt + bias).clamp(*dt_limit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dt_limit_clamps_the_step_sizes(backend):
    """dt_limit = (low, high) gives the scan of the clamped step sizes (values, state, gradients - zero for the
    clamped ones); (0, inf) is no clamp; a reversed pair is refused."""
    torch.manual_seed(5)
    x, dt, A, B, C = _inputs(length=23)
    bias = torch.randn(x.shape[2], dtype=x.dtype)
    limit = (0.3, 0.9)
    assert (_limited_dt(dt, bias, (0, float("inf"))) < limit[0]).any()  # the clamp acts at both ends
    assert (_limited_dt(dt, bias, (0, float("inf"))) > limit[1]).any()
    dt_ref = _limited_dt(dt, bias, limit)
    y_ref, h_ref = ssd_ref(x, dt_ref, A, B, C, return_final_states=True)
    with torch.no_grad(), forced_scan_backend(backend):
        for form, extra in ((ssd, {"chunk_size": 8}), (ssd_quadratic, {}), (ssd_ref, {})):
            xf, dtf, Af, Bf, Cf, bf = (t.float() for t in (x, dt, A, B, C, bias))
            y, h = form(xf, dtf, Af, Bf, Cf, dt_bias=bf, dt_softplus=True, dt_limit=limit, return_final_states=True,
                        **extra)
            torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)
        y0 = ssd(x.float(), dt.float(), A.float(), B.float(), C.float(), dt_bias=bias.float(), dt_softplus=True)
        y_inf = ssd(x.float(), dt.float(), A.float(), B.float(), C.float(), dt_bias=bias.float(), dt_softplus=True,
                    dt_limit=(0.0, float("inf")))
        torch.testing.assert_close(y0, y_inf, rtol=0, atol=0)
    state = h_ref.new_zeros(h_ref.shape)
    for t in range(x.shape[1]):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], dt_bias=bias, dt_softplus=True,
                              dt_limit=limit)
        torch.testing.assert_close(y_t, y_ref[:, t])
    mix = ssd_mixing_matrix(dt, A, B, C, dt_bias=bias, dt_softplus=True, dt_limit=limit)
    torch.testing.assert_close(torch.einsum("bhts,bshp->bthp", mix, x), y_ref)

    dt_leaf = dt.clone().requires_grad_()
    weights = torch.randn_like(x)
    (g,) = torch.autograd.grad((ssd(x, dt_leaf, A, B, C, chunk_size=8, dt_bias=bias, dt_softplus=True,
                                    dt_limit=limit) * weights).sum(), dt_leaf)
    dt_leaf2 = dt.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad((ssd_ref(x, _limited_dt(dt_leaf2, bias, limit), A, B, C) * weights).sum(), dt_leaf2)
    torch.testing.assert_close(g, g_ref)
    clamped = (dt_ref == limit[0]) | (dt_ref == limit[1])
    assert clamped.any() and torch.all(g[clamped] == 0)
    with pytest.raises(ValueError, match="dt_limit"):
        ssd(x, dt, A, B, C, dt_softplus=True, dt_limit=(1.0, 0.5))


# --- packed sequences (seq_idx / cu_seqlens) ---------------------------------------------------------------

# two rows: the first starts with sequence 0 (the initial state is its state) and has a one-token sequence and
# a skipped index; the second starts with sequence 1 (the initial state is dropped)
SEQ_IDX = torch.tensor([[0] * 5 + [1] + [2] * 20 + [4] * 11, [1] * 10 + [2] * 27])
CU_SEQLENS = torch.tensor([0, 5, 6, 26, 37])  # the first row's sequences


def _each_sequence_alone(x, dt, A, B, C, h0, seq_idx, **kw):
    """The definition of packed sequences: every sequence scanned on its own by the loop, from the initial
    state for sequence 0 and from zeros for the others. Returns ``(y, final states, [row 0's states])``."""
    y = torch.zeros_like(x)
    finals, row0_states = [], []
    z = kw.pop("z")
    for row in range(x.shape[0]):
        for index in seq_idx[row].unique_consecutive():
            where = (seq_idx[row] == index).nonzero()[:, 0]
            a, e = int(where[0]), int(where[-1]) + 1
            xs, dts, Bs, Cs, zs = (t[row:row + 1, a:e] for t in (x, dt, B, C, z))
            start = h0[row:row + 1] if int(index) == 0 else None
            y_seq, h = ssd_ref(xs, dts, A, Bs, Cs, z=zs, initial_states=start, return_final_states=True, **kw)
            y[row, a:e] = y_seq[0]
            if row == 0:
                row0_states.append(h[0])
        finals.append(h[0])
    return y, torch.stack(finals), torch.stack(row0_states)


def _packed_inputs(dtype=torch.float64):
    torch.manual_seed(11)
    x, dt, A, B, C = _inputs(length=SEQ_IDX.shape[1], dtype=dtype)
    return x, dt, A, B, C, _extras(x, dt, B), _state(x, B)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_restart_the_scan(backend):
    """seq_idx: every form equals scanning each sequence alone (outputs and final states; the initial state
    belongs to sequence 0), for chunks that cut sequences anywhere, including a one-token sequence."""
    x, dt, A, B, C, kw, h0 = _packed_inputs()
    y_want, h_want, _ = _each_sequence_alone(x, dt, A, B, C, h0, SEQ_IDX, **kw)
    y, h = ssd_ref(x, dt, A, B, C, initial_states=h0, seq_idx=SEQ_IDX, return_final_states=True, **kw)
    torch.testing.assert_close(y, y_want)
    torch.testing.assert_close(h, h_want)
    for chunk_size in (1, 4, 5, 16, 64):
        y, h = ssd(x, dt, A, B, C, chunk_size, initial_states=h0, seq_idx=SEQ_IDX, return_final_states=True, **kw)
        torch.testing.assert_close(y, y_want, msg=f"chunk {chunk_size}")
        torch.testing.assert_close(h, h_want, msg=f"chunk {chunk_size}")
    y, h = ssd_quadratic(x, dt, A, B, C, initial_states=h0, seq_idx=SEQ_IDX, return_final_states=True, **kw)
    torch.testing.assert_close(y, y_want)
    torch.testing.assert_close(h, h_want)
    f32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}
    with torch.no_grad(), forced_scan_backend(backend):  # float32: the fused recurrence where it applies
        y, h = ssd(*(t.float() for t in (x, dt, A, B, C)), initial_states=h0.float(), seq_idx=SEQ_IDX,
                   return_final_states=True, **f32)
    torch.testing.assert_close(y.double(), y_want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), h_want, rtol=1e-4, atol=1e-4)
    # one sequence numbered 0 throughout is no restart at all
    zeros = torch.zeros_like(SEQ_IDX)
    torch.testing.assert_close(ssd(x, dt, A, B, C, 4, initial_states=h0, seq_idx=zeros, **kw),
                               ssd(x, dt, A, B, C, 4, initial_states=h0, **kw))


@pytest.mark.parametrize("regime", ["mild", "steep"])
def test_packed_sequences_gradients_match_the_loop(regime):
    """Gradients through the chunked form with restarts equal the loop's, for mild decays (factorised blocks)
    and steep ones (exact masked blocks); none reach the initial state of a row that starts past sequence 0."""
    x, dt, A, B, C, kw, h0 = _packed_inputs()
    if regime == "steep":
        A = A * 40
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, kw["dt_bias"], h0)]
    weights = torch.randn_like(x), torch.randn_like(h0)

    def loss(form, *args, **extra):
        xs, dts, As, Bs, Cs, bias, start = args
        y, h = form(xs, dts, As, Bs, Cs, D=kw["D"], z=kw["z"], dt_bias=bias, dt_softplus=True, initial_states=start,
                    seq_idx=SEQ_IDX, return_final_states=True, **extra)
        return (y * weights[0]).sum() + (h * weights[1]).sum()

    grads = torch.autograd.grad(loss(ssd, *leaves, chunk_size=8), leaves)
    grads_ref = torch.autograd.grad(loss(ssd_ref, *leaves), leaves)
    for name, got, want in zip(["x", "dt", "A", "B", "C", "dt_bias", "h0"], grads, grads_ref):
        torch.testing.assert_close(got, want, msg=name)
    assert torch.all(grads[-1][1] == 0)  # row 1 starts with sequence 1


def test_packed_sequences_gradcheck():
    """float64 gradcheck of the chunked form with restarts inside and at the edges of chunks."""
    torch.manual_seed(3)
    x, dt, A, B, C = _inputs(batch=1, length=9, heads=2, head_dim=2, groups=1, d_state=2)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 3]])
    h0 = _state(x, B)
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C, h0)]

    def f(*args):
        xs, dts, As, Bs, Cs, start = args
        return ssd(xs, dts, As, Bs, Cs, 3, initial_states=start, seq_idx=seq_idx, dt_softplus=True,
                   return_final_states=True)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_states_are_each_sequences_last_state(backend):
    """return_varlen_states with cu_seqlens (batch 1): the state after each sequence's last token - the loop's
    record, each sequence scanned alone, and the same from the chunked and fused forms; the last one is the
    final state; mamba-ssm's return order (y, final_states, varlen_states); gradients flow through them."""
    x, dt, A, B, C, kw, h0 = _packed_inputs()
    x, dt, B, C, kw["z"], h0 = (t[:1] for t in (x, dt, B, C, kw["z"], h0))
    seq_idx = SEQ_IDX[:1]
    _, _, alone = _each_sequence_alone(x, dt, A, B, C, h0, seq_idx, **kw)
    packed = dict(seq_idx=seq_idx, cu_seqlens=CU_SEQLENS, return_varlen_states=True)
    y_ref, h_ref, states_ref = ssd_ref(x, dt, A, B, C, initial_states=h0, return_final_states=True, **packed, **kw)
    assert states_ref.shape == (4, *h0.shape[1:])
    torch.testing.assert_close(states_ref, alone)
    torch.testing.assert_close(states_ref[-1], h_ref[0])
    for form, extra in ((ssd, {"chunk_size": 8}), (ssd_quadratic, {})):
        y, states = form(x, dt, A, B, C, initial_states=h0, **packed, **extra, **kw)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(states, states_ref)
    f32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}
    with torch.no_grad(), forced_scan_backend(backend):
        y, h, states = ssd(*(t.float() for t in (x, dt, A, B, C)), initial_states=h0.float(),
                           return_final_states=True, **packed, **f32)
    torch.testing.assert_close(states.double(), states_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)
    # differentiable (mamba-ssm's is not): the gradient of a sequence's state equals the loop's
    x_leaf = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(ssd(x_leaf, dt, A, B, C, 8, **packed, **kw)[1][1].sum(), x_leaf)
    x_leaf2 = x.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(ssd_ref(x_leaf2, dt, A, B, C, **packed, **kw)[1][1].sum(), x_leaf2)
    torch.testing.assert_close(g, g_ref)
    assert torch.all(g[:, :5] == 0) and torch.all(g[:, 6:] == 0)  # only sequence 1's token reaches its state


def test_packed_mixing_matrix_is_block_diagonal():
    """ssd_mixing_matrix(seq_idx=): zero across sequences; y = M x from a zero state equals the loop."""
    x, dt, A, B, C, kw, _ = _packed_inputs()
    mix = ssd_mixing_matrix(dt, A, B, C, kw["dt_bias"], True, seq_idx=SEQ_IDX)
    across = SEQ_IDX[:, :, None] != SEQ_IDX[:, None, :]
    assert torch.all(mix.permute(0, 2, 3, 1)[across] == 0)
    y0 = ssd_ref(x, dt, A, B, C, dt_bias=kw["dt_bias"], dt_softplus=True, seq_idx=SEQ_IDX)
    torch.testing.assert_close(torch.einsum("bhts,bshp->bthp", mix, x), y0)


def test_packed_sequence_errors():
    """Bad seq_idx / cu_seqlens are named."""
    x, dt, A, B, C, kw, _ = _packed_inputs()
    with pytest.raises(ValueError, match="seq_idx must be"):
        ssd(x, dt, A, B, C, seq_idx=SEQ_IDX[:, :-1])
    with pytest.raises(ValueError, match="integer"):
        ssd(x, dt, A, B, C, seq_idx=SEQ_IDX.double())
    with pytest.raises(ValueError, match="non-decreasing"):
        ssd(x, dt, A, B, C, seq_idx=SEQ_IDX.flip(1))
    with pytest.raises(ValueError, match="non-negative"):
        ssd(x, dt, A, B, C, seq_idx=SEQ_IDX - 1)
    one = dict(x=x[:1], dt=dt[:1], A=A, B=B[:1], C=C[:1], dt_softplus=True)
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        ssd(**one, seq_idx=SEQ_IDX[:1], return_varlen_states=True)
    with pytest.raises(ValueError, match="needs seq_idx"):
        ssd(**one, cu_seqlens=CU_SEQLENS, return_varlen_states=True)
    with pytest.raises(ValueError, match="one batch row"):
        ssd(x, dt, A, B, C, seq_idx=SEQ_IDX, cu_seqlens=CU_SEQLENS, return_varlen_states=True)
    with pytest.raises(ValueError, match="rise from 0"):
        ssd(**one, seq_idx=SEQ_IDX[:1], cu_seqlens=torch.tensor([0, 5, 6, 26, 36]), return_varlen_states=True)
    with pytest.raises(ValueError, match="disagree"):
        ssd(**one, seq_idx=SEQ_IDX[:1], cu_seqlens=torch.tensor([0, 5, 7, 26, 37]), return_varlen_states=True)
    # cu_seqlens is read only for the varlen states, as in mamba-ssm
    torch.testing.assert_close(ssd(**one, seq_idx=SEQ_IDX[:1], cu_seqlens=torch.tensor([0, 1])),
                               ssd(**one, seq_idx=SEQ_IDX[:1]))
