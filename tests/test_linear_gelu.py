"""Linear + GELU (the MLP's first half): the fused bias + GELU kernel against a float64 formula of the exact GELU
(outputs and the gradients of x, weight and bias; skipped where the kernel cannot be built), against ATen's
float32 GELU, FLOP counts, dispatch, errors, and the VMamba MLP on both paths."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vmamba.blocks import ChannelMlp
from vmamba.ops import fused, linear_gelu, linear_gelu_ref
from vmamba.ops.fused.bias_gelu import fused_bias_gelu, fused_bias_gelu_applies
from tests.conftest import fused_kernel_error, needs_fused_kernel

FUSED_ERROR = fused_kernel_error(fused.FusedKernel.MULTI_SCAN)
needs_fused = needs_fused_kernel(fused.FusedKernel.MULTI_SCAN)


def _normal_cdf(v: torch.Tensor) -> torch.Tensor:
    """Phi(v) = erfc(-v / sqrt 2) / 2, elementwise in float64 through math.erfc (no vectorised approximation)."""
    cdf = [0.5 * math.erfc(-float(e) / math.sqrt(2.0)) for e in v.detach().flatten()]
    return torch.tensor(cdf, dtype=torch.float64).view_as(v)


def _exact_gelu(v: torch.Tensor) -> torch.Tensor:
    return v * _normal_cdf(v)


class _ExactLinearGelu(torch.autograd.Function):
    """gelu(x @ w.T + b) in float64 with the hand-written derivative Phi(v) + v * phi(v)."""

    @staticmethod
    def forward(ctx, x, w, b):
        v = x @ w.t() + b
        ctx.save_for_backward(x, w, v)
        return _exact_gelu(v)

    @staticmethod
    def backward(ctx, dh):
        x, w, v = ctx.saved_tensors
        pdf = torch.exp(-0.5 * v * v) / math.sqrt(2.0 * math.pi)
        dv = dh * (_normal_cdf(v) + v * pdf)
        rows = dv.reshape(-1, v.shape[-1])
        return dv @ w, rows.t() @ x.reshape(-1, x.shape[-1]), rows.sum(0)


def _inputs(shape, out_features, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    w = torch.randn(out_features, shape[-1], generator=g, dtype=torch.float64) / shape[-1] ** 0.5
    b = torch.randn(out_features, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (x, w, b)]


# (x shape, out_features): widths that are and are not a multiple of the SIMD width (the last lane block is
# partial), a single row / feature, 3-D and 4-D (channels-last map) inputs, VMamba-T's MLP widths.
CASES = [((5, 7, 37), 53), ((1, 1), 1), ((3, 16), 16), ((2, 3, 4, 96), 384), ((100, 40), 33), ((9, 768), 3072)]


@needs_fused
@pytest.mark.parametrize("shape, out_features", CASES)
def test_fused_matches_exact_gelu(shape, out_features):
    """float32 kernel against the float64 exact GELU: outputs and the gradients of x, weight and bias."""
    x, w, b = _inputs(shape, out_features, seed=out_features)
    x64, w64, b64 = _inputs(shape, out_features, torch.float64, seed=out_features)
    with fused.forced_scan_backend("fused"):
        out = linear_gelu(x, w, b)
    ref = _ExactLinearGelu.apply(x64, w64, b64)
    assert out.shape == (*shape[:-1], out_features)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    dh = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (x, w, b), dh.float())
    refs = torch.autograd.grad(ref, (x64, w64, b64), dh)
    for name, grad, expected in zip(("x", "weight", "bias"), grads, refs):
        scale = expected.abs().max().item()
        torch.testing.assert_close(grad, expected.float(), rtol=1e-5, atol=1e-5 * max(scale, 1.0), msg=name)


@needs_fused
def test_fused_kernel_tails():
    """The kernel alone over a wide range (|v| up to 12, where Phi's tail is ~1e-33 and gelu' ~ 0 or 1): within
    1e-6 of the float64 exact GELU and its derivative, and of ATen's float32 GELU."""
    v = torch.linspace(-12.0, 12.0, 4801, dtype=torch.float64).view(1, -1)
    bias = torch.zeros(v.shape[1], dtype=torch.float64)
    pre = v.float().requires_grad_()
    out = fused_bias_gelu(pre, bias.float())
    torch.testing.assert_close(out.double(), _exact_gelu(v), rtol=0, atol=1e-6)
    torch.testing.assert_close(out, F.gelu(v.float()), rtol=0, atol=1e-6)
    (grad,) = torch.autograd.grad(out.sum(), pre)
    v64 = v.clone().requires_grad_()
    (expected,) = torch.autograd.grad(F.gelu(v64).sum(), v64)
    torch.testing.assert_close(grad.double(), expected, rtol=0, atol=1e-6)


@needs_fused
def test_fused_gradients_do_not_depend_on_thread_count():
    """The bias gradient is summed over fixed row chunks: the same bits on 1 and 2 threads (and dpre too)."""
    pre = torch.randn(3000, 40)
    bias, dh = torch.randn(40), torch.randn(3000, 40)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(torch.ops.vmamba.bias_gelu_backward(dh, pre, bias))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@needs_fused
def test_fused_op_passes_opcheck():
    pre = torch.randn(6, 40, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    torch.library.opcheck(torch.ops.vmamba.bias_gelu, (pre, bias))


def test_reference_is_linear_then_gelu():
    x, w, b = _inputs((4, 10), 7, torch.float64)
    for approximate in ("none", "tanh"):
        torch.testing.assert_close(
            linear_gelu_ref(x, w, b, approximate), F.gelu(F.linear(x, w, b), approximate=approximate)
        )
    assert torch.autograd.gradcheck(linear_gelu, (x[:2], w, b))  # float64: the reference path


@needs_fused
def test_flop_count_matches_linear():
    """The fused path's GEMMs are ATen's: FlopCounterMode counts the same FLOPs forward and backward as for
    F.linear + F.gelu."""
    x, w, b = _inputs((8, 24), 40)
    counts = []
    for backend in ("torch", "fused"):
        with fused.forced_scan_backend(backend), FlopCounterMode(display=False) as counter:
            linear_gelu(x, w, b).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 3 * 2 * 8 * 24 * 40


def test_dispatch_rule():
    x, w, b = _inputs((2, 8), 16)
    with fused.forced_scan_backend("torch"):
        assert not fused_bias_gelu_applies(x, w, b)
        assert linear_gelu(x, w, b).grad_fn.name() == "GeluBackward0"
    assert not fused_bias_gelu_applies(x.double(), w.double(), b.double())  # float64: reference path
    if FUSED_ERROR is None:
        with fused.forced_scan_backend("auto"):
            assert fused_bias_gelu_applies(x, w, b)
            assert linear_gelu(x, w, b).grad_fn.name() != "GeluBackward0"
            # no bias, or the tanh approximation: the reference path
            assert linear_gelu(x, w, None).grad_fn.name() == "GeluBackward0"
            assert linear_gelu(x, w, b, approximate="tanh").grad_fn.name() == "GeluBackward0"


@needs_fused
@pytest.mark.parametrize("channels_last, shape", [(True, (2, 9, 7, 24)), (False, (1, 24, 5, 3))])
def test_channel_mlp_same_on_both_paths(channels_last, shape):
    """VMamba's MLP gives the same output and gradients with the fused kernel as on the pure-PyTorch path."""
    torch.manual_seed(0)
    mlp = ChannelMlp(24, 96, channels_last=channels_last)
    x = torch.randn(*shape, requires_grad=True)
    outs, grads = [], []
    for backend in ("torch", "fused"):
        with fused.forced_scan_backend(backend):
            y = mlp(x)
            grads.append(torch.autograd.grad(y.square().sum(), [x, *mlp.parameters()]))
        outs.append(y.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for fused_grad, torch_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(fused_grad, torch_grad, rtol=1e-4, atol=1e-4)


def test_autocast_takes_the_reference_path():
    """Under CPU autocast the GEMM runs in bfloat16 (autocast's rule for F.linear): the result is the reference's,
    for the op and for the VMamba MLP in training."""
    x, w, b = _inputs((6, 16), 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_gelu(x, w, b)
        expected = linear_gelu_ref(x, w, b)
        mlp_out = ChannelMlp(16, 32, channels_last=True).train()(x.detach().view(2, 3, 16))
    assert out.dtype == expected.dtype == mlp_out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    mlp_out.float().sum().backward()


def test_meta_tensors_take_the_reference_path():
    """Device types without an autocast state (here "meta", used for shape inference) take the reference path
    instead of failing on the autocast query."""
    x, w, b = (t.to("meta") for t in _inputs((2, 5, 8), 16))
    out = linear_gelu(x, w, b)
    assert out.shape == (2, 5, 16) and out.device.type == "meta"


def test_channel_mlp_calls_hooked_or_replaced_modules():
    """A forward hook on ``fc1`` or ``act`` fires (the modules are then called, with the same values), and a
    replaced activation is used."""
    torch.manual_seed(0)
    mlp = ChannelMlp(8, 32, channels_last=True)
    x = torch.randn(2, 3, 5, 8)
    expected = mlp.fc2(F.gelu(mlp.fc1(x)))
    seen = []
    for module in (mlp.fc1, mlp.act):
        handle = module.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)
        handle.remove()
    assert seen == [(2, 3, 5, 32), (2, 3, 5, 32)]
    mlp.act = torch.nn.SiLU()
    torch.testing.assert_close(mlp(x), mlp.fc2(F.silu(mlp.fc1(x))))


@pytest.mark.parametrize(
    "x_shape, w_shape, bias_shape, approximate, message",
    [
        ((4, 8), (6, 7), (6,), "none", "in_features"),
        ((4, 8), (6, 8), (5,), "none", "output features"),
        ((4, 8), (6, 8, 1), None, "none", "in_features"),
        ((4, 8), (6, 8), (6,), "erf", "approximate"),
    ],
)
def test_bad_input(x_shape, w_shape, bias_shape, approximate, message):
    bias = None if bias_shape is None else torch.zeros(bias_shape)
    with pytest.raises(ValueError, match=message):
        linear_gelu(torch.zeros(x_shape), torch.zeros(w_shape), bias, approximate)
