"""Depthwise conv + SiLU over a channels-last sequence: the reference against torch's conv1d, and the fused
kernel against the reference (skipped where it cannot be built)."""
import pytest
import torch
import torch.nn.functional as F

from vmamba.ops import depthwise_conv1d_silu, depthwise_conv1d_silu_ref
from vmamba.ops import fused
from vmamba.ops.fused.conv_silu import fused_conv_silu, fused_conv_silu_applies
from tests.conftest import needs_fused_kernel

needs_fused = needs_fused_kernel(fused.FusedKernel.CONV_SILU)


def _conv1d_silu(x, taps, bias, start, stop, offset):
    """The same numbers from torch's grouped conv1d on a zero-padded (B, E, N) copy (independent of the op)."""
    batch, n, e = x.shape
    width = taps.shape[0]
    pad = width + abs(offset) + n
    xt = F.pad(x.transpose(1, 2), (pad, pad))  # row r of x sits at column r + pad
    full = F.conv1d(xt, taps.t().unsqueeze(1), bias, groups=e)  # column c: sum_j taps[j] * x[c - pad + j]
    cols = torch.arange(start, stop) + offset + pad
    return F.silu(full[:, :, cols]).transpose(1, 2)


CASES = [  # (B, N, E, width, start, stop, offset)
    (2, 13, 40, 4, 0, 13, -3), (2, 13, 40, 4, 0, 13, 0), (1, 37, 16, 4, 5, 21, -3), (3, 9, 7, 3, 2, 9, 0),
    (1, 1, 33, 4, 0, 1, -3), (2, 5, 48, 4, 4, 5, 0), (1, 6, 16, 2, 0, 6, -1), (2, 4, 20, 4, 0, 4, -20),
    (1, 8, 32, 4, 3, 3, -3), (2, 70, 384, 4, 10, 64, -3),
]


@pytest.mark.parametrize("batch, n, e, width, start, stop, offset", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_reference_matches_conv1d(batch, n, e, width, start, stop, offset, with_bias):
    g = torch.Generator().manual_seed(n * 100 + e)
    x, taps = torch.randn(batch, n, e, generator=g), torch.randn(width, e, generator=g)
    bias = torch.randn(e, generator=g) if with_bias else None
    torch.testing.assert_close(
        depthwise_conv1d_silu_ref(x, taps, bias, start, stop, offset), _conv1d_silu(x, taps, bias, start, stop, offset)
    )


@needs_fused
@pytest.mark.parametrize("batch, n, e, width, start, stop, offset", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_matches_reference(batch, n, e, width, start, stop, offset, with_bias):
    g = torch.Generator().manual_seed(n * 100 + e + 1)
    x, taps = torch.randn(batch, n, e, generator=g), torch.randn(width, e, generator=g)
    bias = torch.randn(e, generator=g) if with_bias else None
    out = fused_conv_silu(x, taps[None], None if bias is None else bias[None], start, stop, [offset])[:, :, 0]
    assert out.shape == (batch, stop - start, e)
    torch.testing.assert_close(out, depthwise_conv1d_silu_ref(x, taps, bias, start, stop, offset), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True])
def test_several_directions_at_once(grad):
    """taps (K, w, E) with one offset each: the interleaved (B, rows, K, E) output equals K separate convs
    (fused kernel without grad, the reference with it)."""
    x, taps, bias = torch.randn(2, 23, 40), torch.randn(3, 4, 40), torch.randn(3, 40)
    offsets = [-3, 0, 2]
    with torch.set_grad_enabled(grad):
        x.requires_grad_(grad)
        out = depthwise_conv1d_silu(x, taps, bias, 4, 19, offsets)
    assert out.shape == (2, 15, 3, 40)
    for k in range(3):
        torch.testing.assert_close(out[:, :, k], _conv1d_silu(x.detach(), taps[k], bias[k], 4, 19, offsets[k]),
                                   rtol=1e-5, atol=1e-6)


def test_gradients_flow_through_the_reference_path():
    x = torch.randn(2, 11, 24, dtype=torch.float64, requires_grad=True)
    taps = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: depthwise_conv1d_silu(*a, 2, 9, -3), (x, taps, bias))


@needs_fused
def test_dispatch_rule():
    x, taps, bias = torch.randn(1, 8, 16), torch.randn(4, 16), torch.randn(16)
    assert fused_conv_silu_applies(x, taps, bias)
    assert not fused_conv_silu_applies(x.double(), taps.double(), bias.double())  # float64 keeps its arithmetic
    assert not fused_conv_silu_applies(x.requires_grad_(), taps, bias)  # no backward in the kernel
    with torch.no_grad():
        assert fused_conv_silu_applies(x, taps, bias)
    with fused.forced_scan_backend("torch"):
        assert not fused_conv_silu_applies(x.detach(), taps, bias)


def test_default_rows_and_offset_are_the_causal_conv():
    x, taps = torch.randn(2, 10, 8), torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(depthwise_conv1d_silu(x, taps), _conv1d_silu(x, taps, None, 0, 10, -3))


@pytest.mark.parametrize(
    "shapes, rows, message",
    [
        (((2, 10), (4, 8), None), (0, 10), "expected x"),
        (((2, 10, 8), (4, 6), None), (0, 10), "do not match"),
        (((2, 10, 8), (4, 8), (5,)), (0, 10), "do not match"),
        (((2, 10, 8), (4, 8), None), (3, 11), "not inside"),
        (((2, 10, 8), (4, 8), None), (5, 4), "not inside"),
        (((2, 10, 8), (2, 4, 8), (8,)), (0, 10), "do not match"),
    ],
)
def test_bad_input(shapes, rows, message):
    x, taps, bias = (None if s is None else torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        depthwise_conv1d_silu(x, taps, bias, *rows)


def test_one_offset_per_direction():
    with pytest.raises(ValueError, match="one per direction"):
        depthwise_conv1d_silu(torch.randn(1, 6, 8), torch.randn(2, 4, 8), None, 0, 6, [0, 1, 2])
