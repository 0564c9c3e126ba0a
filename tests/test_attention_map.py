"""Attention maps: mapping mixing-matrix rows back to the grid, causal structure, PNG output, CLI."""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")
import vmamba  # noqa: E402,F401  (registers the models)
from tasks.attention_map import main, save_overlay, ssm_layers, token_mixing_map  # noqa: E402


def tiny_vmamba(mixer: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vmamba_t", depths=(1, 1, 1, 1), dims=16, num_classes=10, mixer=mixer).eval()


def captured_mixing(model: torch.nn.Module, image: torch.Tensor, layer: int) -> torch.Tensor:
    """The layer's mixing matrix ``(K, L', L')`` from our own hook (independent of the helper's capture)."""
    from vmamba.ops.fused import set_scan_backend

    ssm = ssm_layers(model)[layer]
    seen = {}
    handle = ssm.mixer.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    set_scan_backend("torch")
    ssm.mixer.forward_map = lambda x, pattern: None  # no fused whole-map path: run the mixer module
    try:
        with torch.no_grad():
            model(image)
    finally:
        del ssm.mixer.forward_map
        set_scan_backend(None)
        handle.remove()
    with torch.no_grad():
        return ssm.mixer.mixing_matrix(seen["x"])[0]


@pytest.mark.parametrize("mixer", ["mamba", "retnet", "rwkv7"])
def test_vmamba_map_matches_each_direction_by_hand(mixer: str) -> None:
    model = tiny_vmamba(mixer)
    image = torch.randn(3, 64, 48)
    layer, (row, col) = 1, (3, 2)  # stage 1: an 8 x 6 grid
    result = token_mixing_map(model, image, (row, col), layer=layer)
    gh, gw = 8, 6
    assert result.weights.shape == (gh, gw) and result.per_direction.shape == (4, gh, gw)
    torch.testing.assert_close(result.weights, result.per_direction.sum(0))
    m = captured_mixing(model, image[None], layer)  # (4, 48, 48)
    length = gh * gw
    row_major, col_major = row * gw + col, col * gh + row
    # the official cross2d order: row-major, column-major, then both reversed
    expected = [
        m[0, row_major].view(gh, gw),
        m[1, col_major].view(gw, gh).t(),
        m[2, length - 1 - row_major].flip(0).view(gh, gw),
        m[3, length - 1 - col_major].flip(0).view(gw, gh).t(),
    ]
    for k in range(4):
        torch.testing.assert_close(result.per_direction[k], expected[k])
    # causal in every direction: nothing after the token in that direction's order
    flat = result.per_direction.flatten(1)
    col_order = torch.arange(length).view(gh, gw).t().reshape(-1)  # cells in column-major order
    pos_col = torch.empty(length, dtype=torch.long)
    pos_col[col_order] = torch.arange(length)
    cells = torch.arange(length)
    assert flat[0, cells > row_major].abs().max() == 0
    assert flat[1, pos_col > pos_col[row_major]].abs().max() == 0
    assert flat[2, cells < row_major].abs().max() == 0
    assert flat[3, pos_col < pos_col[row_major]].abs().max() == 0
    for k in range(4):
        assert flat[k].abs().sum() > 0


@pytest.mark.parametrize("scan", ["bi1d", "cross2d"])
def test_vim_map_with_middle_class_token(scan: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(
        "vim_t", img_size=32, patch_size=8, depth=2, embed_dim=32, num_classes=5, scan=scan, mixer="rwkv7"
    ).eval()
    image = torch.randn(1, 3, 32, 32)
    row, col = 1, 2
    result = token_mixing_map(model, image, (row, col))
    assert result.weights.shape == (4, 4)
    assert torch.isfinite(result.weights).all() and result.weights.sum() > 0
    flat = result.per_direction.flatten(1)
    cell = row * 4 + col
    if scan == "bi1d":  # the stream order is the row-major grid with the class token in the middle
        assert result.per_direction.shape == (2, 4, 4)
        m = captured_mixing(model, image, -1)  # (2, 17, 17)
        stream = cell + int(cell >= 8)
        expected = torch.cat([m[0, stream, :8], m[0, stream, 9:]]).view(4, 4)
        torch.testing.assert_close(result.per_direction[0], expected)
        assert flat[0, cell + 1 :].abs().max() == 0 and flat[1, :cell].abs().max() == 0
    else:
        assert result.per_direction.shape == (4, 4, 4)
        assert flat[0, cell + 1 :].abs().max() == 0 and flat[2, :cell].abs().max() == 0


def test_overlay_png(tmp_path) -> None:
    from PIL import Image

    model = tiny_vmamba("retnet")
    result = token_mixing_map(model, torch.randn(3, 64, 64), (1, 1), layer=-1)  # 2 x 2 grid
    path = save_overlay(torch.rand(3, 64, 64), result, tmp_path / "sub" / "map.png")
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 64


def test_cli_writes_png(tmp_path, capsys) -> None:
    from PIL import Image

    image = tmp_path / "gradient.png"
    pixels = (torch.linspace(0, 255, 96)[None, :, None].expand(80, 96, 3)).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(image)
    out = tmp_path / "map.png"
    main([
        "--model", "vmamba_t", "--mixer", "rwkv7", "--model-kwargs", "depths=(1,1,1,1)", "dims=16",
        "--image", str(image), "--token", "3", "4", "--layer", "2", "--out", str(out),
    ])
    assert out.exists()
    assert "14x14 grid" in capsys.readouterr().out  # stage 2 of a 224 x 224 input


def test_cli_rejects_malformed_kwargs(tmp_path) -> None:
    with pytest.raises(SystemExit):
        main(["--model", "vmamba_t", "--image", "x.png", "--token", "0", "0", "--out", "o.png", "--model-kwargs", "dims"])


def test_bad_input() -> None:
    model = tiny_vmamba("mamba")
    with pytest.raises(ValueError, match="outside"):
        token_mixing_map(model, torch.randn(3, 64, 64), (16, 0), layer=0)
    with pytest.raises(ValueError, match="out of range"):
        token_mixing_map(model, torch.randn(3, 64, 64), (0, 0), layer=4)
    with pytest.raises(ValueError, match="image must be"):
        token_mixing_map(model, torch.randn(2, 3, 64, 64), (0, 0))
    with pytest.raises(ValueError, match="no MultiDirectionSSM"):
        token_mixing_map(torch.nn.Linear(3, 3), torch.randn(3, 8, 8), (0, 0))
