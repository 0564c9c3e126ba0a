"""Selective scan (S6): chunked default, quadratic form and step form against the loop reference."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import fixture_path, fused_kernel_error
from vmamba.ops import (
    selective_scan,
    selective_scan_mixing_matrix,
    selective_scan_quadratic,
    selective_scan_ref,
    selective_scan_step,
)
from vmamba.ops import fused
from vmamba.ops.flops import count_flops, selective_scan_macs

# ``vmamba.ops.selective_scan`` is the function; the module holds the tunables.
scan_module = importlib.import_module("vmamba.ops.selective_scan")


@pytest.fixture(autouse=True)
def _pure_pytorch_path():
    """These tests pin the pure-PyTorch chunked path; tests/test_fused_scan.py covers the compiled one."""
    fused.set_scan_backend(fused.ScanBackend.TORCH)
    yield
    fused.set_scan_backend(None)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(
    batch=2, dim=6, length=11, d_state=3, groups=None, dtype=torch.float64, softplus=True, extras=True, seed=0
) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    bc_shape = (batch, d_state, length) if groups is None else (batch, groups, d_state, length)
    delta = randn(batch, dim, length, scale=0.5)
    if not softplus:
        delta = delta.abs() + 0.05  # a positive step size without softplus
    return dict(
        u=randn(batch, dim, length),
        delta=delta,
        A=-torch.rand(dim, d_state, generator=g).to(dtype) * 2 - 0.1,
        B=randn(*bc_shape),
        C=randn(*bc_shape),
        D=randn(dim) if extras else None,
        z=randn(batch, dim, length) if extras else None,
        delta_bias=randn(dim, scale=0.3) if extras else None,
        initial_state=randn(batch, dim, d_state) if extras else None,
    )


def outputs_and_grads(fn, inputs, softplus=True, **kwargs):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    out, last = fn(**args, delta_softplus=softplus, return_last_state=True, **kwargs)
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    w_last = torch.randn(last.shape, generator=g, dtype=last.dtype)
    loss = (out * w_out).sum() + (last * w_last).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out.detach(), last.detach(), dict(zip(leaves, grads))


def assert_same(a, b, rtol=1e-9, atol=1e-10):
    out_a, last_a, grads_a = a
    out_b, last_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, rtol=rtol, atol=atol)
    torch.testing.assert_close(last_a, last_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize(
    "length, d_state, groups, chunk_size",
    [
        (11, 3, None, 4),  # odd length, not a multiple of the chunk
        (12, 3, None, 4),  # a multiple of the chunk
        (1, 3, None, None),  # a single token
        (23, 1, None, None),  # d_state 1 (VMamba v2), default chunk
        (9, 16, None, 2),  # d_state 16
        (10, 2, 3, 3),  # grouped B/C (3 groups of 2 channels)
        (7, 1, 6, 100),  # one chunk longer than the sequence, one channel per group
    ],
)
@pytest.mark.parametrize("softplus", [True, False])
def test_chunked_matches_loop_reference(length, d_state, groups, chunk_size, softplus):
    inputs = make_inputs(length=length, d_state=d_state, groups=groups, softplus=softplus)
    ref = outputs_and_grads(selective_scan_ref, inputs, softplus)
    assert_same(outputs_and_grads(selective_scan, inputs, softplus, chunk_size=chunk_size), ref)


def test_chunked_matches_loop_without_optional_inputs():
    inputs = make_inputs(length=13, d_state=4, extras=False)
    assert_same(outputs_and_grads(selective_scan, inputs, chunk_size=5), outputs_and_grads(selective_scan_ref, inputs))


def test_float32_matches_loop_reference():
    inputs = make_inputs(batch=2, dim=8, length=40, d_state=16, dtype=torch.float32)
    assert_same(outputs_and_grads(selective_scan, inputs), outputs_and_grads(selective_scan_ref, inputs), 1e-4, 1e-5)


@pytest.mark.parametrize(
    "scratch, groups",  # a channel needs (3 N + 16) L = 220 scratch elements here
    [(1, None), (500, None), (500, 2), (900, 3), (1400, 2), (10**6, 3)],
)
def test_slabs_give_the_same_numbers(monkeypatch, scratch, groups):
    """Work split over batch items / groups / channel blocks (bounded scratch memory) changes nothing."""
    inputs = make_inputs(batch=3, dim=6, length=10, d_state=2, groups=groups)
    ref = outputs_and_grads(selective_scan_ref, inputs)
    monkeypatch.setattr(scan_module, "SCRATCH_ELEMENTS", scratch)
    assert_same(outputs_and_grads(selective_scan, inputs, chunk_size=3), ref)


def test_non_contiguous_inputs_and_no_aliasing_of_scratch_buffers():
    inputs = make_inputs(batch=2, dim=6, length=12, d_state=3, dtype=torch.float32)
    strided = {k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if v is not None and v.dim() >= 3 else v
               for k, v in inputs.items()}
    assert not strided["u"].is_contiguous()
    first = selective_scan(**strided, delta_softplus=True, return_last_state=True)
    expected = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    kept = [t.clone() for t in first]
    selective_scan(**make_inputs(batch=2, dim=6, length=12, d_state=3, dtype=torch.float32, seed=5))
    assert all(torch.equal(a, b) for a, b in zip(first, kept))  # outputs never live in reused scratch memory


def test_chunk_size_does_not_change_results():
    inputs = make_inputs(length=30, d_state=2)
    base = outputs_and_grads(selective_scan, inputs, chunk_size=1)
    for size in (2, 7, 30, 64):
        assert_same(outputs_and_grads(selective_scan, inputs, chunk_size=size), base)


def test_gradcheck_float64():
    inputs = make_inputs(batch=1, dim=2, length=5, d_state=2, groups=2)
    names = [k for k, v in inputs.items() if v is not None]

    def fn(*tensors):
        kwargs = dict(zip(names, tensors))
        return selective_scan(**kwargs, delta_softplus=True, return_last_state=True, chunk_size=2)

    tensors = tuple(inputs[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, tensors)


def test_step_form_over_a_sequence_equals_the_full_call():
    inputs = make_inputs(length=9, d_state=3, groups=2)
    out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    state = inputs["initial_state"]
    steps = []
    for t in range(9):
        per_token = {k: inputs[k][..., t] for k in ("u", "delta", "B", "C", "z")}
        y, state = selective_scan_step(
            state, per_token["u"], per_token["delta"], inputs["A"], per_token["B"], per_token["C"],
            inputs["D"], per_token["z"], inputs["delta_bias"], delta_softplus=True,
        )
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, -1), out)
    torch.testing.assert_close(state, last)


def test_two_calls_carrying_the_state_equal_one_call():
    inputs = make_inputs(length=17, d_state=4)
    out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, chunk_size=4)

    def part(sl, state):
        seq = {k: inputs[k][..., sl] for k in ("u", "delta", "B", "C", "z")}
        static = {k: inputs[k] for k in ("A", "D", "delta_bias")}
        return selective_scan(**seq, **static, initial_state=state, delta_softplus=True, return_last_state=True)

    out1, mid = part(slice(0, 6), inputs["initial_state"])
    out2, end = part(slice(6, 17), mid)
    torch.testing.assert_close(torch.cat([out1, out2], -1), out)
    torch.testing.assert_close(end, last)


@pytest.mark.parametrize("groups", [None, 3])
def test_quadratic_form_equals_the_others(groups):
    inputs = make_inputs(length=8, d_state=3, groups=groups)
    assert_same(outputs_and_grads(selective_scan_quadratic, inputs), outputs_and_grads(selective_scan_ref, inputs))
    # The mixing matrix (with D on the diagonal) reproduces the output before the gate, and is causal.
    m = selective_scan_mixing_matrix(
        inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["delta_bias"], True
    )
    assert m.shape == (2, 6, 8, 8)
    assert torch.all(m.triu(1) == 0)
    expected = selective_scan_ref(**{**inputs, "z": None, "initial_state": None}, delta_softplus=True)
    torch.testing.assert_close((m @ inputs["u"][..., None])[..., 0], expected)


def test_bf16_autocast_stays_close_to_float32():
    """Under autocast the op runs in float32 (autocast is off inside it): float32 inputs give float32 results
    equal to the plain call; bf16 inputs give a bf16 output equal to the float32 result on the same (bf16-rounded)
    inputs up to bf16 rounding of the output (rtol 2^-7 ~ 7.8e-3, so we allow 1e-2)."""
    inputs = make_inputs(batch=2, dim=8, length=33, d_state=4, dtype=torch.float32)
    plain = selective_scan(**inputs, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = selective_scan(**inputs, delta_softplus=True)
        low = {k: v.bfloat16() if v is not None and v.dim() == 3 else v for k, v in inputs.items()}
        low_out, low_last = selective_scan(**low, delta_softplus=True, return_last_state=True)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain)
    assert low_out.dtype == torch.bfloat16 and low_last.dtype == torch.float32
    exact = selective_scan(**{k: v.float() if v is not None else v for k, v in low.items()}, delta_softplus=True)
    torch.testing.assert_close(low_out.float(), exact, rtol=1e-2, atol=1e-2)
    # Gradients flow back in the inputs' dtypes.
    u = low["u"].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        selective_scan(**{**low, "u": u}, delta_softplus=True).float().sum().backward()
    assert u.grad.dtype == torch.bfloat16 and torch.isfinite(u.grad.float()).all()


def test_long_sequence_with_strong_decay_stays_finite():
    length = 16384
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 4, length, generator=g)
    delta = torch.randn(1, 4, length, generator=g) * 4 + 4  # dt up to ~20 after softplus
    A = -torch.tensor([[1e-3, 1.0, 10.0, 100.0]]).expand(4, 4).contiguous()  # from nearly no decay to exp(-2000)
    B, C = torch.randn(1, 4, length, generator=g), torch.randn(1, 4, length, generator=g)
    leaves = [t.requires_grad_() for t in (u, delta, A, B, C)]
    out, last = selective_scan(*leaves, delta_softplus=True, return_last_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    (out.sum() + last.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    # The tail of the sequence agrees with the loop reference run over the same tail from the carried state.
    _, mid = selective_scan(
        *(t.detach()[..., : length - 50] if t.dim() == 3 else t.detach() for t in leaves),
        delta_softplus=True, return_last_state=True,
    )
    tail = selective_scan_ref(
        *(t.detach()[..., length - 50 :] if t.dim() == 3 else t.detach() for t in leaves),
        delta_softplus=True, initial_state=mid,
    )
    torch.testing.assert_close(out.detach()[..., length - 50 :], tail, rtol=1e-4, atol=1e-4)


def test_official_case_is_reproduced():
    case = torch.load(fixture_path("vmamba_official", "parity_small", "selective_scan_case.pt"))
    args = (case["u"], case["delta"], case["A"], case["B"], case["C"], case["D"])
    for fn in (selective_scan, selective_scan_ref, selective_scan_quadratic):
        out = fn(*args, delta_bias=case["delta_bias"], delta_softplus=True)
        torch.testing.assert_close(out, case["out"], rtol=1e-5, atol=1e-5)


def test_flop_counter_sees_the_op_forward_and_backward():
    inputs = make_inputs(batch=2, dim=6, length=10, d_state=3, dtype=torch.float32)
    macs = selective_scan_macs((2, 6, 10), 3, with_d=True, with_z=True)
    assert macs == 9 * 2 * 10 * 6 * 3 + 2 * 2 * 6 * 10
    assert count_flops(lambda: selective_scan(**inputs, delta_softplus=True)) == 2 * macs
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    with FlopCounterMode(display=False) as counter:
        selective_scan(**leaves, delta_softplus=True).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.vmamba.selective_scan] == 2 * macs
    assert counts[torch.ops.vmamba.selective_scan_backward] == 4 * macs
    assert counter.get_total_flops() == 6 * macs  # nothing inside the ops is counted twice


def test_custom_op_registrations_and_compile():
    inputs = make_inputs(batch=1, dim=4, length=6, d_state=2, dtype=torch.float32)
    for keep_checkpoints in (True, False):  # the fused path's states for its backward, or none
        args = [inputs[k] for k in NAMES] + [True, 3, keep_checkpoints]
        torch.library.opcheck(torch.ops.vmamba.selective_scan.default, args)
    compiled = torch.compile(
        lambda u, delta: selective_scan(u, delta, inputs["A"], inputs["B"], inputs["C"], inputs["D"]),
        backend="aot_eager", fullgraph=True,
    )
    u = inputs["u"].clone().requires_grad_()
    out = compiled(u, inputs["delta"].abs())
    expected = selective_scan_ref(inputs["u"], inputs["delta"].abs(), *[inputs[k] for k in "ABC"], inputs["D"])
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(u=torch.zeros(2, 6)), "u must be"),
        (dict(delta=torch.zeros(2, 6, 5)), "delta must match"),
        (dict(A=torch.zeros(5, 3)), "A must be"),
        (dict(B=torch.zeros(2, 4, 11)), "B must be"),
        (dict(C=torch.zeros(2, 4, 3, 11)), "groups, which does not divide"),
        (dict(D=torch.zeros(5)), "D must be"),
        (dict(z=torch.zeros(2, 6, 10)), "z must match"),
        (dict(delta_bias=torch.zeros(6, 1)), "delta_bias must be"),
        (dict(initial_state=torch.zeros(2, 6, 4)), "initial_state must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    inputs = {**make_inputs(dtype=torch.float32), **change}
    for fn in (selective_scan, selective_scan_ref):
        with pytest.raises(ValueError, match=message):
            fn(**inputs)


def test_empty_sequence_and_bad_chunk_size_raise():
    inputs = make_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        selective_scan(**inputs, chunk_size=0)
    empty = {k: v[..., :0] if k in ("u", "delta", "z", "B", "C") else v for k, v in inputs.items()}
    with pytest.raises(ValueError, match="length >= 1"):
        selective_scan(**empty)


def test_mamba_mixer_mixing_matrix_is_the_mean_magnitude_of_its_scan():
    from vmamba.mixers import create_mixer

    mixer = create_mixer("mamba", 4, 2, d_state=3)
    x = torch.randn(2, 2, 7, 4)
    with torch.no_grad():
        mean_abs = mixer.mixing_matrix(x)
        y = mixer(x)
    assert mean_abs.shape == (2, 2, 7, 7) and torch.all(mean_abs.triu(1) == 0)
    # Rebuild every channel's matrix: it reproduces the mixer's output, and its mean magnitude is what was returned.
    with torch.no_grad():
        x_dbl = torch.einsum("bklc,kdc->bkdl", x, mixer.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [mixer.dt_rank, 3, 3], dim=2)
        dts = torch.einsum("bkrl,kcr->bkcl", dts, mixer.dt_projs_weight)
        A, Ds, bias = -torch.exp(mixer.A_logs).view(2, 4, 3), mixer.Ds.view(2, 4), mixer.dt_projs_bias
        for k in range(2):
            m = selective_scan_mixing_matrix(dts[:, k], A[k], Bs[:, k], Cs[:, k], Ds[k], bias[k], True)  # (B, C, L, L)
            torch.testing.assert_close(torch.einsum("bcts,bsc->btc", m, x[:, k]), y[:, k], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(m.abs().mean(1), mean_abs[:, k])


def _time_invariant_reference(u, delta, A, B, C, D, z, delta_bias, softplus):
    """The loop written directly for time-invariant ``B, C: (D, N)`` (and per-token ``(B, N, L)``), contracting
    over the state with einsums the way mamba-ssm's reference does; independent of ``_per_token``."""
    delta = delta + delta_bias[:, None]
    delta = torch.nn.functional.softplus(delta) if softplus else delta
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if B.dim() == 2:
        inputs = torch.einsum("bdl,dn,bdl->bdln", delta, B, u)
    else:
        inputs = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        state = decay[:, :, t] * state + inputs[:, :, t]
        read = torch.einsum("bdn,dn->bd", state, C) if C.dim() == 2 else torch.einsum("bdn,bn->bd", state, C[..., t])
        ys.append(read)
    y = torch.stack(ys, dim=-1) + u * D[:, None]
    return y * torch.nn.functional.silu(z), state


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("which", ["both", "B", "C"])
def test_time_invariant_B_C_follow_mamba_ssm(which, backend):
    """``B`` / ``C`` of shape ``(D, N)`` (mamba-ssm's non-variable B / C): every form, values, last state and
    gradients, against a loop written for that case; with one of them time-invariant the other is per token."""
    if backend == "fused":
        if (error := fused_kernel_error()) is not None:
            pytest.skip(f"fused kernel cannot be built here: {error}")
        fused.set_scan_backend(fused.ScanBackend.FUSED)
    inputs = make_inputs(dim=5, length=13, d_state=4)
    inputs.pop("initial_state")
    g = torch.Generator().manual_seed(3)
    if which in ("both", "B"):
        inputs["B"] = torch.randn(5, 4, generator=g, dtype=torch.float64)
    if which in ("both", "C"):
        inputs["C"] = torch.randn(5, 4, generator=g, dtype=torch.float64)
    expected_out, expected_last = _time_invariant_reference(
        *(inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")), softplus=True
    )
    for fn in (selective_scan, selective_scan_ref, selective_scan_quadratic):
        # the fused kernel computes in float32: its inputs (and the reference's, for the gradients) in float32
        in_float32 = backend == "fused" and fn is selective_scan
        cast = {k: v.float() for k, v in inputs.items()} if in_float32 else inputs
        tolerance = dict(rtol=1e-5, atol=1e-5) if in_float32 else dict(rtol=1e-9, atol=1e-10)
        out, last, grads = outputs_and_grads(fn, cast)
        torch.testing.assert_close(out.double(), expected_out, **tolerance)
        torch.testing.assert_close(last.double(), expected_last, **tolerance)
        ref_grads = outputs_and_grads(_time_invariant_autograd, cast)[2]
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], **tolerance, msg=lambda m: f"d{name}: {m}")


def _time_invariant_autograd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    return _time_invariant_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def test_time_invariant_B_of_the_wrong_size_is_refused():
    inputs = {**make_inputs(dtype=torch.float32), "B": torch.zeros(5, 3)}
    for fn in (selective_scan, selective_scan_ref):
        with pytest.raises(ValueError, match=r"time-invariant B must be \(D=6, N\)"):
            fn(**inputs)


def test_time_invariant_B_C_take_the_chunked_path():
    """The fused kernel would need time-invariant B / C as dense per-channel copies (slower than the chunked
    form): with the fused backend forced, they still run chunked (no kernel states come back), while
    per-token B / C of the same sizes take the kernel."""
    if (error := fused_kernel_error()) is not None:
        pytest.skip(f"fused kernel cannot be built here: {error}")
    fused.set_scan_backend(fused.ScanBackend.FUSED)
    inputs = make_inputs(dim=16, length=70, d_state=4, dtype=torch.float32, extras=False)
    per_token_B, per_token_C = inputs["B"], inputs["C"]
    invariant_B, invariant_C = scan_module._per_token(inputs["u"], torch.randn(16, 4), torch.randn(16, 4))
    for (B, C), kernel in (((per_token_B, per_token_C), True), ((invariant_B, invariant_C), False)):
        args = (inputs["u"], inputs["delta"], inputs["A"], B, C, None, None, None, None)
        _, _, states = torch.ops.vmamba.selective_scan(*args, True, 0, True)  # keep_checkpoints=True
        assert (states.numel() > 0) == kernel
