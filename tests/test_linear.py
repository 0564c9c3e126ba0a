"""The oneDNN linear (``vmamba.ops.linear``, ``vmamba.linear.Linear``) against ``F.linear`` in float64: outputs,
gradients of x, weight and bias, double backward; FLOP counts; the dispatch rule; torch.compile and export;
the layer's nn.Linear contract. oneDNN tests are skipped where PyTorch was built without it."""
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vmamba.linear import Linear
from vmamba.ops import fused, linear
from vmamba.ops.linear import onednn_linear_applies, onednn_linear_available, onednn_linear_status

linear_module = sys.modules["vmamba.ops.linear"]
needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this PyTorch build has no oneDNN linear")


def _inputs(shape, out_features, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(out_features, shape[-1], generator=g, dtype=torch.float64) / shape[-1] ** 0.5
    b = torch.randn(out_features, generator=g, dtype=torch.float64) if bias else None
    return x, w, b


def _flops_by_op(fn) -> dict[str, int]:
    """FLOPs of the counted matmul-type ops ``fn()`` ran (forward and backward), by op name."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}


@pytest.fixture
def any_size(monkeypatch):
    """Let products of any size take oneDNN (the size threshold otherwise sends small ones to F.linear)."""
    monkeypatch.setattr(linear_module, "_MIN_MACS", 0)


# (x shape, out_features, bias): odd sizes, one row / feature, 3-D and 4-D (channels-last map) inputs,
# VMamba-T's first-stage and MLP widths.
CASES = [
    ((5, 7, 37), 53, True), ((1, 1), 1, True), ((3, 16), 16, False), ((2, 3, 4, 96), 384, True),
    ((100, 40), 33, False), ((9, 768), 3072, True),
]


@needs_onednn
@pytest.mark.parametrize("shape, out_features, bias", CASES)
def test_matches_float64_linear(any_size, shape, out_features, bias):
    """float32 oneDNN against float64 F.linear: the output and the gradients of x, weight and bias."""
    x64, w64, b64 = _inputs(shape, out_features, bias, seed=out_features)
    leaves64 = [t.requires_grad_() for t in (x64, w64, b64) if t is not None]
    leaves = [t.detach().float().requires_grad_() for t in leaves64]
    x, w, b = leaves if bias else (*leaves, None)
    assert onednn_linear_applies(x, w, b)
    out = linear(x, w, b)
    ref = F.linear(*(t for t in (x64, w64, b64)))
    assert out.shape == (*shape[:-1], out_features) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for grad, expected in zip(torch.autograd.grad(out, leaves, dy.float()), torch.autograd.grad(ref, leaves64, dy)):
        scale = max(expected.abs().max().item(), 1.0)
        torch.testing.assert_close(grad, expected.float(), rtol=1e-5, atol=1e-5 * scale)


@needs_onednn
def test_runs_onednn_forward_and_input_gradient_only_where_it_applies(any_size):
    """Forward and input gradient on ``vmamba::linear``, the weight gradient on ATen's mm."""
    x, w, b = (t.float().requires_grad_() for t in _inputs((6, 20), 12))
    product = 2 * 6 * 20 * 12
    flops = _flops_by_op(lambda: linear(x, w, b).sum().backward())
    assert flops == {"vmamba.linear": 2 * product, "aten.mm": product}
    with fused.forced_scan_backend("torch"):
        assert "vmamba.linear" not in _flops_by_op(lambda: linear(x, w, b).sum().backward())


@needs_onednn
def test_inference_calls_onednn_directly_unless_watched(any_size):
    """Without gradients and dispatch modes the oneDNN op runs directly (same values as the custom op); under a
    dispatch mode such as FlopCounterMode the custom op runs, so the product is still counted."""
    x, w, b = (t.float() for t in _inputs((6, 20), 12))
    with torch.no_grad():
        direct = linear(x, w, b)
        assert _flops_by_op(lambda: linear(x, w, b)) == {"vmamba.linear": 2 * 6 * 20 * 12}
    torch.testing.assert_close(direct, torch.ops.vmamba.linear(x, w, b), rtol=0, atol=0)
    torch.testing.assert_close(direct, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_strided_input_and_no_input_gradient(any_size):
    """A transposed (non-contiguous) input; an input without gradient (the first layer): weight and bias
    gradients only."""
    x64, w64, b64 = _inputs((30, 17), 8)
    x = x64.float().t().contiguous().t()  # same values, column-major strides
    w, b = w64.float().requires_grad_(), b64.float().requires_grad_()
    out = linear(x, w, b)
    torch.testing.assert_close(out, F.linear(x64, w64, b64).float(), rtol=1e-5, atol=1e-5)
    gw, gb = torch.autograd.grad(out.sum(), (w, b))
    torch.testing.assert_close(gw, x64.sum(0).expand(8, -1).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, torch.full((8,), 30.0))


@needs_onednn
def test_double_backward_matches_float64(any_size):
    """Gradients of gradients (create_graph=True) agree with float64 F.linear's."""
    x64, w64, b64 = (t.requires_grad_() for t in _inputs((7, 11), 5))
    x, w, b = (t.detach().float().requires_grad_() for t in (x64, w64, b64))
    dy = torch.randn(7, 5, dtype=torch.float64)

    def second_order(fn, leaves, dy):
        gx, gw = torch.autograd.grad(fn(*leaves), leaves[:2], dy, create_graph=True)
        return torch.autograd.grad((gx.square().sum() + (gw * gw.flip(0)).sum()), leaves, allow_unused=True)

    ours = second_order(linear, (x, w, b), dy.float())
    expected = second_order(F.linear, (x64, w64, b64), dy)
    for a, e in zip(ours, expected):
        assert (a is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(a, e.float(), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_flop_count_matches_f_linear():
    """FlopCounterMode counts the oneDNN path as it counts F.linear: 2 M K N forward, twice that backward."""
    x, w, b = (t.float().requires_grad_() for t in _inputs((64, 96), 384))
    counts = []
    for backend in ("torch", "auto"):
        with fused.forced_scan_backend(backend), FlopCounterMode(display=False) as counter:
            linear(x, w, b).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 3 * 2 * 64 * 96 * 384


def test_dispatch_rule():
    """oneDNN only for CPU float32, when oneDNN is enabled, outside autocast and compilation, under a backend
    other than ``torch``, for products of at least ``_MIN_MACS`` multiply-adds."""
    x, w, b = (t.float() for t in _inputs((64, 96), 384))
    big = x.numel() * w.shape[0] >= linear_module._MIN_MACS
    assert big
    assert onednn_linear_applies(x, w, b) == onednn_linear_available()
    assert not onednn_linear_applies(x[:1], w[:8], b[:8])  # a small product
    assert not onednn_linear_applies(x.double(), w.double(), b.double())
    assert not onednn_linear_applies(x, w, b.double())
    with fused.forced_scan_backend("torch"):
        assert not onednn_linear_applies(x, w, b)
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_linear_applies(x, w, b)
        assert linear(x, w, b).dtype == torch.bfloat16  # autocast's rule for F.linear


@pytest.mark.parametrize("switch", ["mkldnn_flag", "environment"])
def test_switched_off_takes_f_linear(monkeypatch, switch):
    """``torch.backends.mkldnn.enabled = False`` or ``VMAMBA_ONEDNN_LINEAR=0`` sends every call to F.linear."""
    x, w, b = (t.float() for t in _inputs((64, 96), 384))
    if switch == "mkldnn_flag":
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    else:
        monkeypatch.setenv("VMAMBA_ONEDNN_LINEAR", "0")
    assert not onednn_linear_applies(x, w, b)
    assert onednn_linear_status().startswith("F.linear")
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))


def test_torch_func_transforms_take_f_linear():
    """Under torch.vmap and torch.func.grad the op is F.linear (no batching rule / functorch support needed)."""
    x, w, b = (t.float() for t in _inputs((4, 300, 96), 384))
    batched = torch.vmap(lambda rows: linear(rows, w, b))(x)
    torch.testing.assert_close(batched, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    grad_w = torch.func.grad(lambda weight: linear(x, weight, b).square().sum())(w)
    expected = torch.func.grad(lambda weight: F.linear(x, weight, b).square().sum())(w)
    torch.testing.assert_close(grad_w, expected)


def test_other_inputs_behave_as_f_linear():
    """Shape errors are F.linear's own; empty batches, meta tensors and float64 give F.linear's results."""
    with pytest.raises(RuntimeError):
        linear(torch.randn(2, 5), torch.randn(3, 4))
    assert linear(torch.randn(0, 96), torch.randn(384, 96)).shape == (0, 384)
    meta = linear(torch.empty(8, 512, 96, device="meta"), torch.empty(384, 96, device="meta"))
    assert meta.shape == (8, 512, 384) and meta.device.type == "meta"
    x, w, b = _inputs((3, 4), 5)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    assert torch.autograd.gradcheck(linear, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


@needs_onednn
def test_op_passes_opcheck():
    x, w, b = (t.float().requires_grad_() for t in _inputs((6, 40), 24))
    torch.library.opcheck(torch.ops.vmamba.linear, (x, w, b))
    torch.library.opcheck(torch.ops.vmamba.linear, (x, w, None))


@needs_onednn
def test_compile_and_export():
    """Under torch.compile the layer is F.linear (the compiler picks its own GEMM); torch.export keeps the
    oneDNN op as one node. Both agree with eager."""
    torch.manual_seed(0)
    layer = Linear(96, 384)
    x = torch.randn(4, 16, 96, requires_grad=True)
    eager = layer(x)
    compiled = torch.compile(layer, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    compiled.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    exported = torch.export.export(layer, (x.detach(),))
    torch.testing.assert_close(exported.module()(x.detach()), eager.detach(), rtol=1e-5, atol=1e-5)


def test_layer_is_an_nn_linear():
    """Same parameters, keys, repr and hooks as nn.Linear; loads nn.Linear's state dict; same output."""
    torch.manual_seed(0)
    plain = nn.Linear(96, 384)
    layer = Linear(96, 384)
    assert isinstance(layer, nn.Linear)
    assert layer.state_dict().keys() == plain.state_dict().keys()
    assert repr(layer) == "Linear(in_features=96, out_features=384, bias=True)"
    layer.load_state_dict(plain.state_dict())
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(2, 64, 96)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)
    assert seen == [torch.Size([2, 64, 384])]
    assert Linear(8, 4, bias=False).bias is None
