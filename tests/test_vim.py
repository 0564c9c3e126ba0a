"""Vim: official parity, checkpoints, class-token placement, the cross2d variant, other sizes, timm surface."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import timm
from safetensors.torch import save_file

import backbones.vim as vim_module
import vmamba  # noqa: F401  registers the models
from backbones.vim import Vim, VimBlock, checkpoint_filter_fn, resample_pos_embed
from tests.conftest import fixture_path
from vmamba.mixers import MambaMixer, MixerType, available_mixers
from vmamba.ops.fused import FusedUnavailable, fused_status, set_scan_backend
from vmamba.ops.fused.loader import load as load_fused


def _fused_available() -> bool:
    try:
        load_fused()
        return True
    except FusedUnavailable:
        return False


needs_fused = pytest.mark.skipif(not _fused_available(), reason=f"fused kernels unavailable: {fused_status()}")
BACKENDS = ["torch", pytest.param("fused", marks=needs_fused)]


@pytest.fixture
def backend(request):
    set_scan_backend(request.param)
    yield request.param
    set_scan_backend(None)

SHORT_NAMES = {
    "tiny": "vim_t",
    "tiny_stride8": "vim_t_s8",
    "small": "vim_s",
    "small_stride8": "vim_s_s8",
    "base": "vim_b",
}


def _official_models() -> dict:
    return json.loads(fixture_path("vim_official", "models.json").read_text())["models"]


# ---- an independent re-implementation of the official forward (from parity_small/config.json) ----------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _scan_loop(u, delta, A, Bm, Cm):
    """u, delta: (B, E, L); A: (E, N); Bm, Cm: (B, N, L) -> (B, E, L), h_t = exp(dA) h + dB u, y = <C, h>."""
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        d = delta[:, :, t, None]
        h = torch.exp(d * A) * h + d * Bm[:, None, :, t] * u[:, :, t, None]
        ys.append((h * Cm[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1)


def _official_branch(xz, sd, prefix, suffix, d_state):
    x, z = xz.chunk(2, dim=1)  # (B, E, L)
    e, length = x.shape[1], x.shape[2]
    w = sd[f"{prefix}conv1d{suffix}.weight"]
    x = F.silu(F.conv1d(x, w, sd[f"{prefix}conv1d{suffix}.bias"], padding=w.shape[-1] - 1, groups=e)[..., :length])
    x_dbl = x.transpose(1, 2) @ sd[f"{prefix}x_proj{suffix}.weight"].T  # (B, L, R + 2N)
    rank = x_dbl.shape[-1] - 2 * d_state
    dt, Bm, Cm = x_dbl.split([rank, d_state, d_state], dim=-1)
    delta = F.softplus(dt @ sd[f"{prefix}dt_proj{suffix}.weight"].T + sd[f"{prefix}dt_proj{suffix}.bias"])
    a_log = sd[f"{prefix}A_log"] if suffix == "" else sd[f"{prefix}A_b_log"]
    d_skip = sd[f"{prefix}D{suffix}"]
    y = _scan_loop(x, delta.transpose(1, 2), -torch.exp(a_log), Bm.transpose(1, 2), Cm.transpose(1, 2))
    return (y + d_skip[:, None] * x) * F.silu(z)


def official_forward(sd: dict, images: torch.Tensor, stride: int, d_state: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official VisionMamba (bimamba v2, middle class token, divide-out) on an official state dict."""
    tokens = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
    tokens = tokens.flatten(2).transpose(1, 2)
    m = tokens.shape[1]
    mid = m // 2
    cls = sd["cls_token"].expand(tokens.shape[0], -1, -1)
    hidden = torch.cat([tokens[:, :mid], cls, tokens[:, mid:]], 1) + sd["pos_embed"]
    residual = None
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(depth):
        residual = hidden if residual is None else residual + hidden
        h = _rms(residual, sd[f"layers.{i}.norm.weight"])
        xz = (h @ sd[f"layers.{i}.mixer.in_proj.weight"].T).transpose(1, 2)
        y_f = _official_branch(xz, sd, f"layers.{i}.mixer.", "", d_state)
        y_b = _official_branch(xz.flip(-1), sd, f"layers.{i}.mixer.", "_b", d_state)
        hidden = ((y_f + y_b.flip(-1)) / 2).transpose(1, 2) @ sd[f"layers.{i}.mixer.out_proj.weight"].T
    feats = _rms(residual + hidden, sd["norm_f.weight"])[:, mid]
    return feats @ sd["head.weight"].T + sd["head.bias"], feats


def random_official_state_dict(
    embed_dim: int, depth: int, d_state: int, num_patches: int, num_classes: int, patch: int = 16, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Official key names and shapes, random (non-trivial) values."""
    g = torch.Generator().manual_seed(seed)
    e, rank = 2 * embed_dim, math.ceil(embed_dim / 16)

    def r(*shape, scale=0.1, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    sd = {
        "cls_token": r(1, 1, embed_dim, scale=0.5),
        "pos_embed": r(1, num_patches + 1, embed_dim, scale=0.5),
        "patch_embed.proj.weight": r(embed_dim, 3, patch, patch, scale=0.05),
        "patch_embed.proj.bias": r(embed_dim),
        "head.weight": r(num_classes, embed_dim),
        "head.bias": r(num_classes),
        "norm_f.weight": r(embed_dim, shift=1.0),
    }
    for i in range(depth):
        p = f"layers.{i}.mixer."
        for s in ("", "_b"):
            sd[f"{p}conv1d{s}.weight"] = r(e, 1, 4, scale=0.3)
            sd[f"{p}conv1d{s}.bias"] = r(e)
            sd[f"{p}x_proj{s}.weight"] = r(rank + 2 * d_state, e, scale=0.5)
            sd[f"{p}dt_proj{s}.weight"] = r(e, rank, scale=0.5)
            sd[f"{p}dt_proj{s}.bias"] = r(e, shift=-1.0)
            sd[f"{p}D{s}"] = r(e, shift=1.0)
        sd[f"{p}A_log"] = r(e, d_state, scale=0.5)
        sd[f"{p}A_b_log"] = r(e, d_state, scale=0.5)
        sd[f"{p}in_proj.weight"] = r(2 * e, embed_dim, scale=0.2)
        sd[f"{p}out_proj.weight"] = r(embed_dim, e, scale=0.2)
        sd[f"layers.{i}.norm.weight"] = r(embed_dim, shift=1.0)
    return sd


def small_vim(**kwargs) -> Vim:
    args = dict(img_size=64, patch_size=16, embed_dim=16, depth=2, d_state=4, num_classes=5)
    args.update(kwargs)
    return Vim(**args).eval()


# ---- counts and keys --------------------------------------------------------------------------------
@pytest.mark.parametrize("short", list(SHORT_NAMES))
def test_parameter_counts_and_official_keys(short: str) -> None:
    official = _official_models()
    long_name, info = next((k, v) for k, v in official.items() if v["short_name"] == short)
    keys = json.loads(fixture_path("vim_official", info["keys_file"]).read_text())
    for name in (SHORT_NAMES[short], long_name):
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=1000)
        assert sum(p.numel() for p in model.parameters()) == info["num_params_measured"]
        state = checkpoint_filter_fn({"model": {k: torch.empty(s, device="meta") for k, s in keys.items()}}, model)
        ours = model.state_dict()
        assert set(state) == set(ours)
        assert all(state[k].shape == ours[k].shape for k in ours)
        assert model.patch_embed.grid_size == tuple(info["effective"]["grid_size"])


def test_cross_parameter_count_adds_two_directions() -> None:
    with torch.device("meta"):
        base, cross = timm.create_model("vim_t"), timm.create_model("vim_t_cross")
    e, n, r = 384, 16, 12
    per_direction = e * 4 + e + (r + 2 * n) * e + e * r + e + e * n + e  # conv, x_proj, dt_proj, A, D
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(cross) == count(base) + 24 * 2 * per_direction


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_checkpoint_file_loads_through_timm(tmp_path, suffix: str) -> None:
    keys = json.loads(fixture_path("vim_official", "keys_tiny.json").read_text())
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(s, generator=g) for k, s in keys.items()}
    path = tmp_path / f"vim_t{suffix}"
    if suffix == ".pth":
        torch.save({"model": sd}, path)
    else:
        save_file(sd, str(path))
    model = timm.create_model("vim_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours = model.state_dict()
    a_logs = torch.cat([sd["layers.3.mixer.A_log"], sd["layers.3.mixer.A_b_log"]])
    torch.testing.assert_close(ours["blocks.3.op.mixer.A_logs"], a_logs)
    torch.testing.assert_close(ours["blocks.3.op.mixer.x_proj_weight"][1], sd["layers.3.mixer.x_proj_b.weight"])
    torch.testing.assert_close(ours["blocks.3.op.mixer.dt_projs_bias"][1], sd["layers.3.mixer.dt_proj_b.bias"])
    torch.testing.assert_close(ours["blocks.3.op.conv.weight"][384:], sd["layers.3.mixer.conv1d_b.weight"])
    torch.testing.assert_close(ours["blocks.3.op.mixer.Ds"][:384], sd["layers.3.mixer.D"])
    torch.testing.assert_close(ours["blocks.23.op.in_proj.weight"], sd["layers.23.mixer.in_proj.weight"])
    torch.testing.assert_close(ours["norm.weight"], sd["norm_f.weight"])
    torch.testing.assert_close(ours["pos_embed"], sd["pos_embed"])


# ---- parity -------------------------------------------------------------------------------------------
def _parity_model() -> tuple[Vim, dict]:
    cfg = json.loads(fixture_path("vim_official", "parity_small", "config.json").read_text())
    kw = cfg["constructor_kwargs"]
    model = Vim(
        img_size=kw["img_size"], patch_size=kw["patch_size"], stride=kw["stride"], embed_dim=kw["embed_dim"],
        depth=kw["depth"], d_state=kw["d_state"], num_classes=kw["num_classes"], norm_eps=kw["norm_epsilon"],
    ).eval()
    sd = torch.load(fixture_path("vim_official", "parity_small", "state_dict.pt"))
    model.load_state_dict(checkpoint_filter_fn(sd, model))
    return model, cfg


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_parity_small_reproduces_official_logits_and_features(backend: str) -> None:
    model, cfg = _parity_model()
    images = torch.load(fixture_path("vim_official", "parity_small", "input.pt"))
    logits_ref = torch.load(fixture_path("vim_official", "parity_small", "logits.pt"))
    feats_ref = torch.load(fixture_path("vim_official", "parity_small", "features.pt"))
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(images), pre_logits=True)
        logits = model(images)
    # The config's sensitivities (a dropped backward branch, no /2, the class token at or read from 0, an
    # unflipped backward z, no SSM term) move the logits by 0.14 or more: far outside this tolerance.
    assert (logits - logits_ref).abs().max().item() <= 1e-5
    assert (feats - feats_ref).abs().max().item() <= 1e-5
    assert min(cfg["sensitivity_max_abs_logit_change"].values()) > 1e3 * 1e-5


@pytest.mark.parametrize("img_size", [(48, 48), (48, 64), (16, 80)])
def test_matches_independent_official_reference_on_odd_and_non_square_grids(img_size) -> None:
    # Odd M (9, 5) tells M // 2 from (M + 1) // 2, which the even-M parity fixture cannot.
    gh, gw = img_size[0] // 16, img_size[1] // 16
    sd = random_official_state_dict(embed_dim=16, depth=2, d_state=4, num_patches=gh * gw, num_classes=5)
    model = small_vim(img_size=img_size).double()
    model.load_state_dict(checkpoint_filter_fn(sd, model))
    images = torch.randn(2, 3, *img_size, dtype=torch.float64)
    logits_ref, feats_ref = official_forward({k: v.double() for k, v in sd.items()}, images, 16, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(images), logits_ref, rtol=0, atol=1e-7)
        feats = model.forward_head(model.forward_features(images), pre_logits=True)
        torch.testing.assert_close(feats, feats_ref, rtol=0, atol=1e-7)


def test_class_token_sits_in_the_middle() -> None:
    model = small_vim(img_size=(48, 48))  # M = 9 -> index 4
    tokens, grid = model._embed(torch.zeros(1, 3, 48, 48))
    assert grid == (3, 3) and tokens.shape[1] == 10
    expected = model.cls_token[0, 0] + model.pos_embed[0, 4]
    torch.testing.assert_close(tokens[0, 4], expected)
    assert model.cls_index(10) == 4


# ---- initialisation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("scan", ["bi1d", "cross2d"])
def test_official_initialisation(scan: str) -> None:
    model = Vim(img_size=64, embed_dim=32, depth=4, d_state=8, num_classes=10, scan=scan)
    k = 2 if scan == "bi1d" else 4
    for block in model.blocks:
        mixer = block.op.mixer
        assert isinstance(mixer, MambaMixer)
        bias = mixer.dt_projs_bias.detach()
        assert torch.all(bias[k // 2 :] == 0)  # reversed directions start at zero
        dt = F.softplus(bias[: k // 2])
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
        torch.testing.assert_close(mixer.A_logs.detach(), torch.log(torch.arange(1.0, 9.0)).expand(k * 64, 8))
        assert torch.all(mixer.Ds == 1)
        bound = 1 / math.sqrt(64) / math.sqrt(4)
        assert block.op.out_proj.weight.abs().max() <= bound
        assert block.op.out_proj.weight.abs().max() > 0.5 * bound
        assert torch.all(block.norm.weight == 1)
    assert 0.01 < model.pos_embed.std().item() < 0.03
    assert torch.all(model.head.bias == 0) and 0.01 < model.head.weight.std().item() < 0.03


# ---- the cross2d variant -------------------------------------------------------------------------------
def _cross2d_orders(h: int, w: int) -> list[list[int]]:
    """Token orders of the four directions with the class token (index h*w) in the middle of each."""
    m = h * w
    row = list(range(m))
    col = [r * w + c for c in range(w) for r in range(h)]
    fwd = [seq[: m // 2] + [m] + seq[m // 2 :] for seq in (row, col)]
    return fwd + [list(reversed(seq)) for seq in fwd]


@pytest.mark.parametrize("grid", [(3, 5), (4, 4), (1, 3)])
def test_cross2d_block_matches_explicit_direction_orders(grid) -> None:
    torch.manual_seed(0)
    block = VimBlock(8, scan="cross2d", mixer_kwargs=dict(d_state=4)).double()
    op = block.op
    for p in op.parameters():
        p.data.normal_(0, 0.3)
    h, w = grid
    m = h * w
    mid = m // 2
    tokens = torch.randn(2, m + 1, 8, dtype=torch.float64)  # class token at mid
    out = block.mix(tokens, grid, mid)

    # reference: grid tokens then class token as one array, gathered by explicit per-direction orders
    stacked = torch.cat([tokens[:, :mid], tokens[:, mid + 1 :], tokens[:, mid : mid + 1]], 1)  # (B, M+1, C)
    x, z = op.in_proj(stacked).chunk(2, -1)
    orders = torch.tensor(_cross2d_orders(h, w))
    seqs = torch.stack([x[:, o] for o in orders], 1)  # (B, 4, M+1, E)
    b, k, length, e = seqs.shape
    conv = op.conv.weight.view(k, e, 1, -1)
    conv_b = op.conv.bias.view(k, e)
    seqs = torch.stack(
        [F.silu(F.conv1d(F.pad(seqs[:, i].transpose(1, 2), (3, 0)), conv[i], conv_b[i], groups=e)) for i in range(k)], 1
    ).transpose(2, 3)
    y = op.mixer(seqs)
    merged = torch.zeros_like(x)
    for i, o in enumerate(orders):
        merged[:, o] += y[:, i]
    ref = op.out_proj(merged / 4 * F.silu(z))
    ref = torch.cat([ref[:, :mid], ref[:, m:], ref[:, mid:m]], 1)  # back to the stream layout
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_cross2d_model_trains_and_class_token_sees_the_image() -> None:
    model = timm.create_model("vim_t_cross", img_size=64, embed_dim=16, depth=2, num_classes=3)
    images = torch.randn(2, 3, 64, 64, requires_grad=True)
    model(images).sum().backward()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


@needs_fused
@pytest.mark.parametrize(
    "scan,grid,cls,chunk_rows",
    [
        ("bi1d", (3, 5), True, 1000),
        ("bi1d", (7, 2), True, 2),
        ("bi1d", (1, 1), True, 2),
        ("bi1d", (2, 3), False, 4),
        ("cross2d", (3, 5), True, 1000),
        ("cross2d", (4, 3), True, 2),
        ("cross2d", (1, 1), True, 1000),
        ("cross2d", (2, 3), False, 4),
    ],
)
def test_fused_path_matches_reference(monkeypatch, scan, grid, cls, chunk_rows) -> None:
    # chunk_rows=2 splits every direction into many calls carrying the state (and conv halos across chunks).
    monkeypatch.setattr(vim_module, "_MIN_CHUNK_ROWS", chunk_rows)
    monkeypatch.setattr(vim_module, "_CHUNK_ELEMENTS", 1)
    block = VimBlock(16, scan=scan, mixer_kwargs=dict(d_state=8))
    for p in block.op.parameters():
        p.data.add_(0.2 * torch.randn_like(p))
    m = grid[0] * grid[1]
    cls_index = m // 2 if cls else None
    h = torch.randn(2, m + cls, 16, requires_grad=True)
    params = [h, *block.op.parameters()]
    ref = block.mix_reference(h, grid, cls_index)
    grads_ref = torch.autograd.grad(ref.square().sum(), params)
    out = block.mix_fused(h, grid, cls_index)
    grads = torch.autograd.grad(out.square().sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the in-place inference epilogue
        torch.testing.assert_close(block.mix_fused(h, grid, cls_index), ref, rtol=1e-5, atol=1e-5)


def test_bi1d_tokens_path_equals_direct_sequence() -> None:
    block = VimBlock(8, scan="bi1d", mixer_kwargs=dict(d_state=4)).double()
    for m in (9, 16, 1):
        x = torch.randn(2, m + 1, 8, dtype=torch.float64)
        mid = m // 2
        grid_out, cls_out = block.op(torch.cat([x[:, :mid], x[:, mid + 1 :]], 1), tokens=x[:, mid : mid + 1])
        torch.testing.assert_close(block.op(x), torch.cat([grid_out[:, :mid], cls_out, grid_out[:, mid:]], 1))


# ---- other sizes -------------------------------------------------------------------------------------
def test_resample_pos_embed_keeps_class_token_in_the_middle() -> None:
    old = (4, 4)
    grid = torch.arange(16.0).view(1, 16, 1).expand(1, 16, 3)
    pos = torch.cat([grid[:, :8], torch.full((1, 1, 3), -100.0), grid[:, 8:]], 1)
    new = resample_pos_embed(pos, (3, 5), old)
    assert new.shape == (1, 16, 3)
    assert torch.all(new[0, 7] == -100.0)  # M' = 15 -> index 7
    rest = torch.cat([new[:, :7], new[:, 8:]], 1)
    assert rest.min() > -1 and rest.max() < 16  # no class value leaked into the grid
    expected = F.interpolate(torch.arange(16.0).view(1, 1, 4, 4), size=(3, 5), mode="bicubic", antialias=True)
    torch.testing.assert_close(rest[0, :, 0], expected.flatten())
    assert resample_pos_embed(pos, old, old) is pos
    no_cls = resample_pos_embed(grid, (2, 2), old, num_prefix_tokens=0)
    assert no_cls.shape == (1, 4, 3)


def test_dynamic_img_size_non_square_and_checkpoint_resampling() -> None:
    fixed, _ = _parity_model()
    images = torch.load(fixture_path("vim_official", "parity_small", "input.pt"))
    dynamic = Vim(img_size=64, embed_dim=48, depth=4, num_classes=10, dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    other = torch.randn(2, 3, 48, 96)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(images), fixed(images))
        out = dynamic(other)
    assert out.shape == (2, 10)
    # a model built for 48x96 that loads the 64x64 checkpoint resamples the same way
    resized = Vim(img_size=(48, 96), embed_dim=48, depth=4, num_classes=10).eval()
    resized.load_state_dict(checkpoint_filter_fn(fixed.state_dict(), resized))
    assert resized.pos_embed.shape == (1, 3 * 6 + 1, 48)
    torch.testing.assert_close(resized.pos_embed[0, 9], fixed.pos_embed[0, 8])  # class entry moved 8 -> 9
    with torch.no_grad():
        torch.testing.assert_close(resized(other), out)


def test_pretrained_file_at_other_img_size(tmp_path) -> None:
    sd = random_official_state_dict(embed_dim=16, depth=2, d_state=16, num_patches=16, num_classes=1000)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, path)
    model = timm.create_model(
        "vim_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), embed_dim=16, depth=2, img_size=96
    )
    assert model.pos_embed.shape == (1, 37, 16)
    torch.testing.assert_close(model.pos_embed[0, 18], sd["pos_embed"][0, 8])


# ---- timm surface --------------------------------------------------------------------------------------
def test_forward_features_head_and_intermediates() -> None:
    model = small_vim(img_size=(48, 80), depth=3)
    images = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        feats = model.forward_features(images)
        assert feats.shape == (2, 16, 16)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 16)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 7])
        final, maps = model.forward_intermediates(images, indices=[0, 2], norm=True)
        torch.testing.assert_close(final, feats)
        assert [tuple(m.shape) for m in maps] == [(2, 16, 3, 5)] * 2
        expected = torch.cat([feats[:, :7], feats[:, 8:]], 1).transpose(1, 2).reshape(2, 16, 3, 5)
        torch.testing.assert_close(maps[-1], expected)
        nlc = model.forward_intermediates(images, indices=1, output_fmt="NLC", intermediates_only=True, stop_early=True)
        assert len(nlc) == 1 and nlc[0].shape == (2, 15, 16)
        with_cls = model.forward_intermediates(images, indices=1, return_prefix_tokens=True, intermediates_only=True)
        assert with_cls[0][1].shape == (2, 1, 16)


def test_features_only_getter() -> None:
    model = timm.create_model("vim_t", features_only=True, out_indices=(1, 3), img_size=64, embed_dim=16, depth=4)
    assert model.feature_info.channels() == [16, 16] and model.feature_info.reduction() == [16, 16]
    maps = model(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 16, 4, 4)] * 2
    stride8 = timm.create_model("vim_t_s8", features_only=True, img_size=64, embed_dim=16, depth=2, out_indices=(1,))
    assert stride8.feature_info.reduction() == [8]
    assert stride8(torch.randn(1, 3, 64, 64))[0].shape == (1, 16, 7, 7)


def test_reset_classifier_and_pools() -> None:
    model = small_vim()
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    model.reset_classifier(0, "avg")
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    torch.testing.assert_close(model.forward_head(feats), torch.cat([feats[:, :8], feats[:, 9:]], 1).mean(1))
    no_cls = small_vim(class_token=False, global_pool="avg")
    assert no_cls.pos_embed.shape[1] == 16 and no_cls(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    assert no_cls.forward_intermediates(torch.randn(1, 3, 64, 64), indices=1)[1][0].shape == (1, 16, 4, 4)


@pytest.mark.parametrize("scan", ["bi1d", "cross2d"])
def test_grad_checkpointing_gives_same_outputs_and_grads(scan: str) -> None:
    model = small_vim(scan=scan).train()
    images = torch.randn(2, 3, 64, 64)
    out = model(images)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out2 = model(images)
    out2.square().sum().backward()
    torch.testing.assert_close(out2, out)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


@pytest.mark.parametrize("scan", ["bi1d", "cross2d"])
def test_bfloat16_autocast_runs_close_to_float32(scan: str) -> None:
    model = small_vim(scan=scan)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-3


def test_gradcheck_float64_tiny() -> None:
    model = Vim(img_size=8, patch_size=4, in_chans=1, embed_dim=4, depth=1, d_state=2, num_classes=2).double()
    images = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (images,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_no_weight_decay_and_cfgs() -> None:
    model = small_vim(depth=2)
    names = model.no_weight_decay()
    assert {"pos_embed", "cls_token"} <= names
    for i in range(2):
        assert {f"blocks.{i}.op.mixer.A_logs", f"blocks.{i}.op.mixer.Ds"} <= names
    assert not any("in_proj" in n or "x_proj" in n for n in names)
    for name in ("vim_t", "vim_s", "vim_b", "vim_t_s8", "vim_s_s8"):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url.startswith("https://huggingface.co/hustvl/") and cfg.url.endswith(".pth")
        assert cfg.input_size == (3, 224, 224) and cfg.first_conv == "patch_embed.proj" and cfg.classifier == "head"
    assert "s8" not in timm.models.get_pretrained_cfg("vim_t").url
    assert "_ft_" in timm.models.get_pretrained_cfg("vim_t_s8").url


@pytest.mark.parametrize("kind", list(MixerType))
def test_every_mixer_or_a_clear_error(kind: MixerType) -> None:
    if kind.value not in available_mixers():
        with pytest.raises(ValueError, match="not implemented"):
            timm.create_model("vim_t", mixer=kind.value, img_size=32, embed_dim=16, depth=1)
        return
    model = timm.create_model("vim_t", mixer=kind.value, img_size=32, embed_dim=16, depth=1, num_classes=3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("stride", [16, 8])
@pytest.mark.parametrize("size", [(70, 50), (8, 97), (64, 80)])
def test_dynamic_img_pad_equals_the_explicitly_zero_padded_image(stride: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    padded_model = small_vim(stride=stride, dynamic_img_size=True, dynamic_img_pad=True)
    plain = small_vim(stride=stride, dynamic_img_size=True)
    plain.load_state_dict(padded_model.state_dict())
    x = torch.randn(2, 3, *size)
    # the next size the grid takes, per axis: 16 + k * stride >= size
    target = [16 + max(0, math.ceil((s - 16) / stride)) * stride for s in size]
    x_padded = F.pad(x, (0, target[1] - size[1], 0, target[0] - size[0]))
    with torch.no_grad():
        torch.testing.assert_close(padded_model(x), plain(x_padded))
        feats = padded_model.forward_intermediates(x, indices=1, intermediates_only=True)
    grid = [(t - 16) // stride + 1 for t in target]
    assert tuple(feats[0].shape) == (2, 16, *grid)


# ---- bad input -------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors() -> None:
    model = small_vim()
    with pytest.raises(ValueError, match="3, H, W"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="dynamic_img_size"):
        model(torch.randn(1, 3, 80, 80))
    dynamic = small_vim(dynamic_img_size=True)
    with pytest.raises(ValueError, match="does not fit the patch grid"):
        dynamic(torch.randn(1, 3, 64, 70))
    with pytest.raises(ValueError, match="does not fit the patch grid"):
        dynamic(torch.randn(1, 3, 8, 64))
    with pytest.raises(ValueError, match="does not fit the patch grid"):
        Vim(img_size=100)
    with pytest.raises(ValueError, match="class token"):
        Vim(class_token=False)
    with pytest.raises(ValueError, match="global_pool"):
        Vim(global_pool="max")
    with pytest.raises(ValueError, match="bi1d"):
        Vim(scan="cross3d")
    with pytest.raises(ValueError, match="unknown mixer"):
        Vim(mixer="lstm")


def test_bad_checkpoints_raise_clear_errors(tmp_path) -> None:
    sd = random_official_state_dict(embed_dim=16, depth=2, d_state=4, num_patches=16, num_classes=5)
    with pytest.raises(ValueError, match="embedding size 16"):
        checkpoint_filter_fn(sd, small_vim(embed_dim=32))
    with pytest.raises(ValueError, match="depth 2"):
        checkpoint_filter_fn(sd, small_vim(depth=3))
    with pytest.raises(ValueError, match="bi1d"):
        checkpoint_filter_fn(sd, small_vim(scan="cross2d"))
    ours = small_vim().state_dict()
    with pytest.raises(ValueError, match="depth 2"):
        checkpoint_filter_fn(ours, small_vim(depth=1))
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match="embedding size"):
        timm.create_model("vim_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), depth=2)
