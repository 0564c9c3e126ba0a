"""Depthwise 2-D conv + SiLU over a channels-last map (VMamba's SS2D front end): the reference against a plain
loop over the taps, the fused kernel against the reference (outputs and gradients; skipped where it cannot be
built), FLOP counts, dispatch and errors."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vmamba import MultiDirectionSSM
from vmamba.ops import depthwise_conv2d_silu, depthwise_conv2d_silu_ref, fused
from vmamba.ops.fused.dwconv2d_silu import fused_dwconv2d_silu, fused_dwconv2d_silu_applies
from tests.conftest import fused_kernel_error, needs_fused_kernel

FUSED_ERROR = fused_kernel_error(fused.FusedKernel.MULTI_SCAN)
needs_fused = needs_fused_kernel(fused.FusedKernel.MULTI_SCAN)


def _loop_conv2d_silu(x, weight, bias):
    """silu(bias + sum over taps (i, j) of weight[:, 0, i, j] * x shifted by (i - kh // 2, j - kw // 2)), x zero
    outside the map: one multiply-add per tap over a zero-padded copy."""
    kh, kw = weight.shape[2:]
    height, width = x.shape[1:3]
    padded = F.pad(x, (0, 0, kw // 2, kw // 2, kh // 2, kh // 2))  # (B, H + kh - 1, W + kw - 1, C)
    acc = torch.zeros_like(x) if bias is None else bias.expand_as(x).clone()
    for i in range(kh):
        for j in range(kw):
            acc = acc + weight[:, 0, i, j] * padded[:, i : i + height, j : j + width]
    return F.silu(acc)


def _inputs(batch, height, width, channels, kh, kw, with_bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, height, width, channels, generator=g, dtype=torch.float64)
    weight = torch.randn(channels, 1, kh, kw, generator=g, dtype=torch.float64) / (kh * kw) ** 0.5
    bias = torch.randn(channels, generator=g, dtype=torch.float64) if with_bias else None
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return cast(x), cast(weight), cast(bias)


# (B, H, W, C, kh, kw): odd and non-square maps, a 1 x 1 map, maps spanning several row bands of the kernel (8
# rows at most per band), channel counts that are and are not a multiple of the SIMD width, and other kernels.
CASES = [
    (2, 5, 7, 20, 3, 3), (1, 1, 1, 16, 3, 3), (2, 9, 4, 33, 5, 5), (3, 17, 11, 48, 3, 3), (1, 3, 3, 16, 1, 1),
    (2, 10, 3, 16, 3, 5), (1, 2, 19, 7, 7, 3), (2, 19, 9, 32, 3, 3), (1, 56, 13, 96, 3, 3), (1, 7, 7, 768, 3, 3),
]


@pytest.mark.parametrize("batch, height, width, channels, kh, kw", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_reference_matches_loop(batch, height, width, channels, kh, kw, with_bias):
    x, weight, bias = _inputs(batch, height, width, channels, kh, kw, with_bias, torch.float64)
    torch.testing.assert_close(depthwise_conv2d_silu_ref(x, weight, bias), _loop_conv2d_silu(x, weight, bias))


def test_reference_gradcheck():
    x, weight, bias = _inputs(1, 3, 4, 3, 3, 3, True, torch.float64)
    assert torch.autograd.gradcheck(depthwise_conv2d_silu_ref, (x, weight, bias))
    assert torch.autograd.gradcheck(depthwise_conv2d_silu, (x, weight, bias))  # float64: the reference path


@needs_fused
@pytest.mark.parametrize("batch, height, width, channels, kh, kw", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_matches_reference(batch, height, width, channels, kh, kw, with_bias):
    """float32 kernel against the float64 loop: outputs and the gradients of x, weight and bias."""
    x, weight, bias = _inputs(batch, height, width, channels, kh, kw, with_bias, seed=batch * 100 + channels)
    x64, weight64, bias64 = _inputs(batch, height, width, channels, kh, kw, with_bias, torch.float64,
                                    seed=batch * 100 + channels)
    out = fused_dwconv2d_silu(x, weight, bias)
    ref = _loop_conv2d_silu(x64, weight64, bias64)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = [t for t in (x, weight, bias) if t is not None]
    inputs64 = [t for t in (x64, weight64, bias64) if t is not None]
    grads = torch.autograd.grad(out, inputs, dy.float())
    refs = torch.autograd.grad(ref, inputs64, dy)
    for name, grad, expected in zip(("x", "weight", "bias"), grads, refs):
        scale = expected.abs().max().item()
        torch.testing.assert_close(grad, expected.float(), rtol=1e-5, atol=1e-5 * max(scale, 1.0), msg=name)


@needs_fused
def test_fused_op_passes_opcheck():
    x, weight, bias = _inputs(2, 5, 6, 20, 3, 3, True)
    taps = weight.detach()[:, 0].permute(1, 2, 0).contiguous().requires_grad_()
    torch.library.opcheck(torch.ops.vmamba.dwconv2d_silu, (x, taps, bias))
    torch.library.opcheck(torch.ops.vmamba.dwconv2d_silu, (x, taps, None))


@needs_fused
def test_flop_count():
    """Forward: as FlopCounterMode counts the reference's F.conv2d. Backward: twice the forward (dx and the weight
    gradient; FlopCounterMode's own rule for a grouped conv's input gradient ignores the groups)."""
    x, weight, bias = _inputs(2, 6, 5, 16, 3, 3, True)
    with torch.no_grad():
        counts = []
        for op in (depthwise_conv2d_silu_ref, fused_dwconv2d_silu):
            with FlopCounterMode(display=False) as counter:
                op(x, weight, bias)
            counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 2 * 6 * 5 * 16 * 9
    with FlopCounterMode(display=False) as counter:
        fused_dwconv2d_silu(x, weight, bias).sum().backward()
    assert counter.get_total_flops() == 3 * counts[0]


def test_dispatch_rule():
    x, weight, bias = _inputs(1, 4, 4, 16, 3, 3, True)
    with fused.forced_scan_backend("torch"):
        assert not fused_dwconv2d_silu_applies(x, weight, bias)
    assert not fused_dwconv2d_silu_applies(x.double(), weight.double(), bias.double())  # float64: reference path
    if FUSED_ERROR is None:
        with fused.forced_scan_backend("auto"):
            assert fused_dwconv2d_silu_applies(x, weight, bias)
            assert fused_dwconv2d_silu_applies(x, weight, None)


@needs_fused
@pytest.mark.parametrize("shape", [(2, 9, 6), (1, 1, 1)])
def test_ssm_layer_same_on_both_paths(shape):
    """A VMamba SS2D layer (spatial conv, channels last) gives the same output and gradients with the fused conv
    and scan kernels as on the pure-PyTorch path."""
    torch.manual_seed(0)
    layer = MultiDirectionSSM(
        32, pattern="cross2d", mixer_kwargs={"d_state": 1}, expand=1.0, conv="spatial", conv_bias=True,
        channels_last=True,
    )
    x = torch.randn(*shape, 32, requires_grad=True)
    outs, grads = [], []
    for backend in ("torch", "fused"):
        with fused.forced_scan_backend(backend):
            y = layer(x)
            params = [x, layer.conv.weight, layer.conv.bias]
            grads.append(torch.autograd.grad(y.square().sum(), params))
        outs.append(y.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for fused_grad, torch_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(fused_grad, torch_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "x_shape, w_shape, bias_shape, message",
    [
        ((2, 4, 4, 8), (6, 1, 3, 3), None, "channels"),
        ((2, 4, 4, 8), (8, 1, 3, 3), (6,), "channels"),
        ((4, 4, 8), (8, 1, 3, 3), None, "expected x"),
        ((2, 4, 4, 8), (8, 2, 3, 3), None, "depthwise"),
        ((2, 4, 4, 8), (8, 1, 2, 3), None, "odd"),
    ],
)
def test_bad_input(x_shape, w_shape, bias_shape, message):
    bias = None if bias_shape is None else torch.zeros(bias_shape)
    with pytest.raises(ValueError, match=message):
        depthwise_conv2d_silu(torch.zeros(x_shape), torch.zeros(w_shape), bias)
