import pytest
import torch

from tests.conftest import fixture_path
from vmamba import ScanPattern, cross_merge, cross_scan


def test_cross2d_matches_official_scan_order():
    x = torch.load(fixture_path("vmamba_official", "parity_small", "cross_scan_in.pt"))
    expected = torch.load(fixture_path("vmamba_official", "parity_small", "cross_scan_out.pt"))  # (B, K, C, L)
    assert torch.equal(cross_scan(x, "cross2d").transpose(-1, -2), expected)


def test_cross2d_matches_official_merge():
    ys = torch.load(fixture_path("vmamba_official", "parity_small", "cross_merge_in.pt"))  # (B, K, C, H, W)
    expected = torch.load(fixture_path("vmamba_official", "parity_small", "cross_merge_out.pt"))  # (B, C, L)
    merged = cross_merge(ys.flatten(3).transpose(-1, -2), (3, 4), ScanPattern.CROSS2D)
    torch.testing.assert_close(merged.flatten(2), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "pattern, spatial",
    [("bi1d", (1,)), ("bi1d", (7,)), ("cross2d", (1, 1)), ("cross2d", (3, 5)), ("cross2d", (6, 2)),
     ("cross3d", (2, 3, 4)), ("cross3d", (1, 5, 1))],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_merge_of_scan_is_k_times_identity(pattern, spatial, channels_last):
    k = ScanPattern(pattern).num_directions
    shape = (2, *spatial, 3) if channels_last else (2, 3, *spatial)
    x = torch.randn(shape)
    seqs = cross_scan(x, pattern, channels_last=channels_last)
    assert seqs.shape == (2, k, x.numel() // 6, 3)
    torch.testing.assert_close(cross_merge(seqs, spatial, pattern, channels_last=channels_last), k * x)


def test_directions_are_orders_and_reversals():
    h, w = 2, 3
    x = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    seqs = cross_scan(x, "cross2d")[0, :, :, 0]
    assert seqs[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert seqs[1].tolist() == [0, 3, 1, 4, 2, 5]
    assert seqs[2].tolist() == seqs[0].flip(0).tolist()
    assert seqs[3].tolist() == seqs[1].flip(0).tolist()
    d3 = torch.arange(8, dtype=torch.float32).view(1, 1, 2, 2, 2)
    s3 = cross_scan(d3, "cross3d")[0, :, :, 0]
    assert s3[0].tolist() == list(range(8))  # (D, H, W): W fastest
    assert s3[1].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # (H, W, D): D fastest
    assert s3[2].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]  # (W, D, H): H fastest


def test_merge_is_adjoint_of_scan():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 20, 3, dtype=torch.float64)
    lhs = (cross_scan(x, "cross2d") * y).sum()
    rhs = (x * cross_merge(y, (4, 5), "cross2d")).sum()
    torch.testing.assert_close(lhs, rhs)
    torch.autograd.gradcheck(lambda t: cross_scan(t, "cross2d"), (x,))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="spatial dims"):
        cross_scan(torch.randn(2, 3, 4), "cross2d")
    with pytest.raises(ValueError, match="unknown scan pattern"):
        cross_scan(torch.randn(2, 3, 4, 4), "diagonal")
    with pytest.raises(ValueError, match="does not match"):
        cross_merge(torch.randn(1, 4, 10, 3), (3, 4), "cross2d")
