"""The fused C++ recurrence (``vmamba/ops/fused/recurrence.cpp``) against each op's loop reference, and the
rule that sends inference (no input needs a gradient) to it while training keeps the chunked path."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from vmamba.ops import gla, gla_ref, retention, retention_ref, rwkv7, rwkv7_ref, ssd, ssd_ref
from vmamba.ops.flops import FLOPS_PER_MAC, count_flops
from vmamba.ops.fused import FusedKernel, FusedUnavailable, forced_scan_backend, fused_recurrence
from vmamba.ops.fused.loader import load

try:
    load(FusedKernel.RECURRENCE)
except FusedUnavailable as err:  # no compiler here: nothing to test against
    pytest.skip(f"the fused recurrence cannot be built here: {err}", allow_module_level=True)

RTOL = 1e-5


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within RTOL of the reference's magnitude (elementwise relative error is meaningless near zero)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual - expected).abs().max().item()
    assert err <= RTOL * max(1.0, expected.abs().max().item()), err


def _gla_inputs(batch: int, length: int, heads: int, dk: int, dv: int) -> tuple[torch.Tensor, ...]:
    q, k = torch.randn(2, batch, length, heads, dk).unbind(0)
    v = torch.randn(batch, length, heads, dv)
    g = F.logsigmoid(torch.randn(batch, length, heads, dk)) / 4
    return q, k, v, g


def _rwkv7_inputs(batch: int, length: int, heads: int, dk: int, dv: int) -> tuple[torch.Tensor, ...]:
    r, k = torch.randn(2, batch, length, heads, dk).unbind(0)
    v = torch.randn(batch, length, heads, dv)
    w = -math.exp(-0.5) * torch.sigmoid(torch.randn(batch, length, heads, dk))
    kk = F.normalize(torch.randn(batch, length, heads, dk), dim=-1)
    iclr = torch.sigmoid(torch.randn(batch, length, heads, dk))
    return r, w, k, v, -kk, kk * iclr


SHAPES = [(1, 1, 1, 4, 4), (2, 37, 3, 8, 5), (1, 65, 2, 16, 33), (2, 19, 4, 32, 32)]  # (B, T, H, K, V)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("op", ["gla", "retention", "rwkv7"])
def test_matches_loop_reference(op: str, shape: tuple[int, ...], with_state: bool) -> None:
    torch.manual_seed(sum(shape) + with_state)
    batch, length, heads, dk, dv = shape
    h0 = torch.randn(batch, heads, dk, dv) if with_state else None
    if op == "gla":
        inputs, fast, ref = _gla_inputs(*shape), gla, gla_ref
    elif op == "retention":
        inputs, fast, ref = _gla_inputs(*shape)[:3], retention, retention_ref
    else:
        inputs, fast, ref = _rwkv7_inputs(*shape), rwkv7, rwkv7_ref
    with torch.no_grad(), forced_scan_backend("fused"):
        o, state = fast(*inputs, initial_state=h0, output_final_state=True)
    o_ref, state_ref = ref(*inputs, initial_state=h0, output_final_state=True)
    _close(o, o_ref)
    _close(state, state_ref)


@pytest.mark.parametrize("length", [1, 30, 77])
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "D_z_bias_state"])
def test_ssd_matches_loop_reference(length: int, groups: int, extras: bool) -> None:
    torch.manual_seed(length + groups + extras)
    batch, heads, head_dim, d_state = 2, 6, 5, 16  # K = d_state != V = head_dim
    x = torch.randn(batch, length, heads, head_dim)
    dt = torch.randn(batch, length, heads)
    A = -torch.linspace(0.5, 8.0, heads)
    B, C = torch.randn(2, batch, length, groups, d_state).unbind(0)
    kw = {"dt_softplus": True, "return_final_states": True}
    if extras:
        kw |= {
            "D": torch.randn(heads, head_dim),
            "z": torch.randn(batch, length, heads, head_dim),
            "dt_bias": torch.randn(heads),
            "initial_states": torch.randn(batch, heads, head_dim, d_state),
        }
    with torch.no_grad(), forced_scan_backend("fused"):
        y, state = ssd(x, dt, A, B, C, **kw)
    y_ref, state_ref = ssd_ref(x, dt, A, B, C, **kw)
    _close(y, y_ref)
    _close(state, state_ref)


def test_strided_and_half_inputs() -> None:
    """Transposed (non-contiguous) views are read through their strides; bfloat16 is cast in and out."""
    torch.manual_seed(3)
    q, k, g = (t.transpose(1, 2) for t in _gla_inputs(2, 3, 23, 8, 8)[:2] + (F.logsigmoid(torch.randn(2, 3, 23, 8)),))
    v = torch.randn(2, 3, 23, 6).transpose(1, 2)  # head-major storage, (B, T, H, D) views
    assert not q.is_contiguous()
    with torch.no_grad(), forced_scan_backend("fused"):
        o, state = gla(q, k, v, g, output_final_state=True)
        o_half, _ = gla(*(t.bfloat16() for t in (q, k, v, g)))
    o_ref, state_ref = gla_ref(q, k, v, g, output_final_state=True)
    _close(o, o_ref)
    _close(state, state_ref)
    half_ref, _ = gla_ref(*(t.bfloat16() for t in (q, k, v, g)))
    assert o_half.dtype == torch.bfloat16
    torch.testing.assert_close(o_half.float(), half_ref.float(), rtol=2e-2, atol=2e-2)


class _Spy:
    """Counts calls of the fused entry point an op module imported."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module_name: str) -> None:
        module = importlib.import_module(module_name)
        self.calls = 0
        real = module.fused_recurrence

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "fused_recurrence", spy)


@pytest.mark.parametrize("op", ["gla", "retention", "rwkv7", "ssd"])
def test_dispatch_rule(monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    """No gradient needed -> fused; a gradient needed, forced torch or float64 -> the chunked path."""
    torch.manual_seed(0)
    spy = _Spy(monkeypatch, f"vmamba.ops.{op}")
    if op == "ssd":
        inputs = (torch.randn(1, 9, 2, 4), torch.randn(1, 9, 2), -torch.rand(2) - 0.1, *torch.randn(2, 1, 9, 1, 8))
        fn = lambda *t: ssd(*t, dt_softplus=True, return_final_states=True)  # noqa: E731  (y, state) like the rest
    elif op == "rwkv7":
        inputs, fn = _rwkv7_inputs(1, 9, 2, 8, 4), rwkv7
    else:
        inputs = _gla_inputs(1, 9, 2, 8, 4)
        inputs, fn = (inputs, gla) if op == "gla" else (inputs[:3], retention)
    with forced_scan_backend("auto"):
        with torch.no_grad():
            fn(*inputs)
        assert spy.calls == 1
        fn(*inputs)  # grad mode on, but nothing requires a gradient: still inference
        assert spy.calls == 2
        leaf = inputs[0].clone().requires_grad_(True)
        out, _ = fn(leaf, *inputs[1:])
        out.sum().backward()
        assert spy.calls == 2 and leaf.grad is not None
        fn(*(t.double() for t in inputs))
        assert spy.calls == 2
    with forced_scan_backend("torch"), torch.no_grad():
        fn(*inputs)
    assert spy.calls == 2


def test_flop_formula() -> None:
    q, k, v, g = _gla_inputs(2, 11, 3, 8, 5)
    with torch.no_grad(), forced_scan_backend("fused"):
        flops = count_flops(lambda: fused_recurrence(q, k, v, g, 3, 1.0))
        delta = count_flops(lambda: fused_recurrence(q, k, v, g, 3, 1.0, a=q, b=k))
    assert flops == FLOPS_PER_MAC * 2 * 11 * 3 * 3 * 8 * 5
    assert delta == FLOPS_PER_MAC * 2 * 11 * 3 * 5 * 8 * 5


def test_delta_term_needs_both() -> None:
    q, k, v, g = _gla_inputs(1, 3, 1, 4, 4)
    with pytest.raises(ValueError, match="both a and b"):
        fused_recurrence(q, k, v, g, 1, 1.0, a=q)


def test_strong_decays() -> None:
    """Log-decays far below the float32 exp range (the kernel clamps them at -87) still match the loop."""
    torch.manual_seed(5)
    q, k, v, _ = _gla_inputs(1, 21, 2, 16, 8)
    g = -torch.rand(1, 21, 2, 16) * 200
    with torch.no_grad(), forced_scan_backend("fused"):
        o, state = gla(q, k, v, g, output_final_state=True)
    o_ref, state_ref = gla_ref(q, k, v, g, output_final_state=True)
    _close(o, o_ref)
    _close(state, state_ref)


def test_threads_splitting_heads_of_a_batch_item() -> None:
    """With 2 threads over B=3, H=2 a thread's range holds heads of two batch items (each runs its own group)."""
    torch.manual_seed(6)
    inputs = _rwkv7_inputs(3, 17, 2, 8, 8)
    h0 = torch.randn(3, 2, 8, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad(), forced_scan_backend("fused"):
            o, state = rwkv7(*inputs, initial_state=h0, output_final_state=True)
    finally:
        torch.set_num_threads(threads)
    o_ref, state_ref = rwkv7_ref(*inputs, initial_state=h0, output_final_state=True)
    _close(o, o_ref)
    _close(state, state_ref)


def test_falls_back_when_the_kernel_cannot_be_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` runs the chunked path when the build failed; ``fused`` raises with the reason."""
    from vmamba.ops.fused import loader

    monkeypatch.delitem(loader._modules, FusedKernel.RECURRENCE)
    monkeypatch.setitem(loader._errors, FusedKernel.RECURRENCE, "RuntimeError: no C++ compiler")
    spy = _Spy(monkeypatch, "vmamba.ops.gla")
    inputs = _gla_inputs(1, 9, 2, 8, 4)
    with torch.no_grad():
        with forced_scan_backend("auto"):
            o, _ = gla(*inputs)
        assert spy.calls == 0
        _close(o, gla_ref(*inputs)[0])
        with forced_scan_backend("fused"), pytest.raises(FusedUnavailable, match="no C\\+\\+ compiler"):
            gla(*inputs)
