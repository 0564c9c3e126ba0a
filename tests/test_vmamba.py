"""VMamba (VSSM): official parity, official checkpoint layouts, the timm surface and bad input.

Official references: ``../shared/fixtures/vmamba_official`` (skipped when absent) and
``tests/data/vmamba_reference.*`` (non-square crops and a vanilla v0 model, recorded from the official
code by ``tests/data/make_vmamba_reference.py``).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import vmamba  # noqa: F401  registers the models
from backbones.vmamba import VSSM, PatchMerging, checkpoint_filter_fn
from tests.conftest import fixture_path
from vmamba.mixers import MambaMixer
from vmamba.ops import selective_scan_ref

DATA = Path(__file__).resolve().parent / "data"
REFERENCE = json.loads((DATA / "vmamba_reference.json").read_text())
# the shared parity_small model: tiny_s2l15 recipe scaled down (config.json there)
PARITY_KWARGS = dict(depths=(1, 1, 2, 1), dims=24, ssm_ratio=2.0, num_classes=10)
# config.json "suggested_tolerance" (the deepest stages reach |x| ~ 6)
LOGIT_TOL = dict(atol=1e-5, rtol=1e-5)
FEATURE_TOL = dict(atol=1e-5, rtol=1e-4)


def _parity_dir() -> Path:
    return fixture_path("vmamba_official", "parity_small")


def _official_state_dict() -> dict[str, torch.Tensor]:
    return torch.load(_parity_dir() / "state_dict.pt")


def _parity_model(path: Path | None = None, custom_load: bool = False) -> VSSM:
    """vmamba_t's recipe at the parity size, loaded through timm's pretrained-file path (``custom_load``:
    through ``VSSM.load_pretrained``, the path of the registry URLs)."""
    path = path or _parity_dir() / "state_dict.pt"
    overlay = dict(file=str(path), num_classes=10, custom_load=custom_load)
    return timm.create_model("vmamba_t", pretrained=True, pretrained_cfg_overlay=overlay, **PARITY_KWARGS).eval()


# ------------------------------------------------------------------------------------------- parity


def test_parity_small_logits_and_every_feature():
    d = _parity_dir()
    x, logits, feats = torch.load(d / "input.pt"), torch.load(d / "logits.pt"), torch.load(d / "features.pt")
    model = _parity_model()
    nchw = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731  our maps are channel-last
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, **LOGIT_TOL)
        ours = {"patch_embed": nchw(model.stem(x))}
        block = model.stages[0].blocks[0]
        op_in = block.norm(model.stem(x))
        ours["layers.0.blocks.0.op.input"] = nchw(op_in)
        ours["layers.0.blocks.0.op.output"] = nchw(block.op(op_in))
        _, stage_outs = model.forward_intermediates(x, output_fmt="NHWC")
        for i, out in enumerate(stage_outs):
            ours[f"layers.{i}.blocks"] = nchw(out)
            nxt = model.stages[i + 1].downsample(out) if i + 1 < len(model.stages) else out
            ours[f"layers.{i}.downsample"] = nchw(nxt)
        ours["classifier.norm"] = nchw(model.forward_features(x))
    assert ours.keys() == feats.keys()
    for name, expected in feats.items():
        torch.testing.assert_close(ours[name], expected, **FEATURE_TOL, msg=name)


@pytest.mark.parametrize("crop", ["w48", "h40"])
def test_parity_non_square_crops(crop):
    """The official code on H != W maps (where a transposed merge would show, unlike on square maps)."""
    x = torch.load(_parity_dir() / "input.pt")
    x = x[..., :48] if crop == "w48" else x[..., :40, :]
    with torch.no_grad():
        out = _parity_model()(x)
    torch.testing.assert_close(out, torch.tensor(REFERENCE["v2_crops"]["logits"][crop]), **LOGIT_TOL)


def test_parity_vanilla_v0_from_safetensors():
    """z-gate, d_state 16, patch stem and patch merging (odd 5x9 and 3x5 maps) against the official v0."""
    model = timm.create_model(
        "vmamba_tiny_v0", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(DATA / "vmamba_reference.safetensors"), num_classes=5),
        depths=(1, 1, 1, 1), dims=4, num_classes=5,
    ).eval()
    spec = REFERENCE["v0"]["input"]
    torch.manual_seed(spec["seed"])
    x = torch.randn(spec["shape"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.tensor(REFERENCE["v0"]["logits"]), **LOGIT_TOL)


def _naive_ss2d(op, x: torch.Tensor) -> torch.Tensor:
    """SS2D written from the paper's description: four explicit token orders, one plain scan each, outputs
    scattered back to their pixels. ``x: (B, H, W, C)`` channel-last, mamba mixer, no gate."""
    batch, height, width, _ = x.shape
    h = op.act(op.conv(op.in_proj(x).permute(0, 3, 1, 2))).permute(0, 2, 3, 1)  # (B, H, W, E)
    row_major = [(i, j) for i in range(height) for j in range(width)]
    col_major = [(i, j) for j in range(width) for i in range(height)]
    orders = [row_major, col_major, row_major[::-1], col_major[::-1]]
    mixer = op.mixer
    r, n, e = mixer.dt_rank, mixer.d_state, op.d_inner
    y = torch.zeros_like(h)
    for k, order in enumerate(orders):
        seq = torch.stack([h[:, i, j] for i, j in order], dim=1)  # (B, L, E)
        proj = seq @ mixer.x_proj_weight[k].T  # (B, L, R + 2N)
        dt, b, c = proj.split([r, n, n], dim=-1)
        delta = dt @ mixer.dt_projs_weight[k].T  # (B, L, E)
        out = selective_scan_ref(
            seq.transpose(1, 2), delta.transpose(1, 2), -torch.exp(mixer.A_logs.view(4, e, n)[k]),
            b.transpose(1, 2), c.transpose(1, 2), D=mixer.Ds.view(4, e)[k],
            delta_bias=mixer.dt_projs_bias[k], delta_softplus=True,
        ).transpose(1, 2)
        for t, (i, j) in enumerate(order):
            y[:, i, j] += out[:, t]
    return op.out_proj(op.out_norm(y))


@pytest.mark.parametrize("size", [(3, 5), (6, 2), (1, 4), (4, 4)])
def test_ss2d_layer_matches_naive_scan_orders(size):
    model = _parity_model()
    op = model.stages[0].blocks[0].op
    x = torch.randn(2, *size, op.dim)
    with torch.no_grad():
        torch.testing.assert_close(op(x), _naive_ss2d(op, x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- checkpoint layouts

KEY_FILES = {
    "keys_tiny.json": "vmamba_tiny_s1l8", "keys_tiny_onefile_layout.json": "vmamba_tiny_s1l8",
    "keys_small.json": "vmamba_small_s1l20", "keys_base.json": "vmamba_base_s1l20",
    "keys_tiny_s2l5.json": "vmamba_tiny_s2l5", "keys_small_s2l15.json": "vmamba_small_s2l15",
    "keys_base_s2l15.json": "vmamba_base_s2l15", "keys_vanilla_tiny.json": "vmamba_tiny_v0",
    "keys_vanilla_small.json": "vmamba_small_v0", "keys_vanilla_base.json": "vmamba_base_v0",
}


@pytest.mark.parametrize("keys_file", sorted(KEY_FILES))
def test_official_key_layouts_load_completely(keys_file):
    """Every official key maps onto exactly one model key of the same shape, none missing (meta tensors)."""
    keys = json.loads(fixture_path("vmamba_official", keys_file).read_text())
    with torch.device("meta"):
        model = timm.create_model(KEY_FILES[keys_file])
    state = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    converted = checkpoint_filter_fn({"model": state}, model)
    assert len(converted) == len(keys)
    result = model.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def _to_onefile_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith("op.x_proj_weight"):
            out[k.replace("x_proj_weight", "x_proj.weight")] = v.reshape(-1, v.shape[-1])
        elif k.endswith("op.dt_projs_weight"):
            out[k.replace("dt_projs_weight", "dt_projs.weight")] = v.reshape(-1, v.shape[-1])
        else:
            out[k] = v
    return out


def _to_legacy_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names older official checkpoints use (renamed by the official VSSM._load_from_state_dict)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("classifier.norm.", "norm.").replace("classifier.head.", "head.")
        k = k.replace(".op.", ".self_attention.")
        if ".blocks." in k and ".norm." in k and ".norm2." not in k and "out_norm" not in k:
            k = k.replace(".norm.", ".ln_1.")
        out[k] = v
    return out


@pytest.mark.parametrize("layout", ["classification", "onefile", "legacy"])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("custom_load", [False, True], ids=["timm_loader", "vssm_loader"])
def test_checkpoint_file_layouts_reproduce_logits(tmp_path, layout, fmt, custom_load):
    sd = _official_state_dict()
    sd = {"classification": sd, "onefile": _to_onefile_layout(sd), "legacy": _to_legacy_names(sd)}[layout]
    if fmt == "pth":
        path = tmp_path / "ckpt.pth"
        torch.save({"model": sd, "epoch": 3}, path)
    else:
        path = tmp_path / "ckpt.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    x, logits = torch.load(_parity_dir() / "input.pt"), torch.load(_parity_dir() / "logits.pt")
    with torch.no_grad():
        torch.testing.assert_close(_parity_model(path, custom_load)(x), logits, **LOGIT_TOL)


class _FileCreator:
    """Unpickling this would create a file: a stand-in for code a checkpoint could try to run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_training_checkpoint_with_foreign_objects_loads_without_running_them(tmp_path, monkeypatch):
    """Released files are training checkpoints: a yacs config object, optimizer state, an EMA copy."""
    import sys
    import types

    fake = types.ModuleType("yacs_like_config")

    class CfgNode(dict):  # pickled by reference to a module that will be gone at load time
        pass

    CfgNode.__module__, CfgNode.__qualname__ = fake.__name__, "CfgNode"
    fake.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    sd = _official_state_dict()
    ema = {k: torch.zeros_like(v) for k, v in sd.items()}
    pwned = tmp_path / "pwned"
    path = tmp_path / "vssm_ckpt_epoch_1.pth"
    torch.save({"model": sd, "model_ema": ema, "optimizer": {"state": {}}, "epoch": 1,
                "config": CfgNode(MODEL=CfgNode(NAME="vssm"), TRAIN=[1, 2]), "payload": _FileCreator(str(pwned))}, path)
    monkeypatch.delitem(sys.modules, fake.__name__)
    x, logits = torch.load(_parity_dir() / "input.pt"), torch.load(_parity_dir() / "logits.pt")
    with torch.no_grad():
        torch.testing.assert_close(_parity_model(path, custom_load=True)(x), logits, **LOGIT_TOL)  # not the EMA
    assert not pwned.exists()
    with pytest.raises(RuntimeError, match="weights_only"):  # timm's own loader (custom_load=False) refuses them
        _parity_model(path)
    # the README's one-liner: a file in the overlay, custom_load unsaid (timm would switch it off)
    plain = timm.create_model("vmamba_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                              **PARITY_KWARGS).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), logits, **LOGIT_TOL)
    assert not pwned.exists()


@pytest.mark.parametrize("custom_load", [False, True], ids=["timm_loader", "vssm_loader"])
def test_pretrained_file_with_other_num_classes_and_in_chans(tmp_path, custom_load):
    """The classifier and the first conv are re-sized after the filter; the backbone still matches."""
    path = tmp_path / "ckpt.pth"
    torch.save({"model": _official_state_dict()}, path)
    model = timm.create_model(
        "vmamba_t", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=10, custom_load=custom_load),
        **{**PARITY_KWARGS, "num_classes": 4, "in_chans": 1},
    )
    assert model.get_classifier().out_features == 4 and model.stem.conv1.in_channels == 1
    ref = _parity_model()
    torch.testing.assert_close(model.stages[2].blocks[1].op.mixer.A_logs, ref.stages[2].blocks[1].op.mixer.A_logs)


def test_features_only_loads_pretrained(tmp_path):
    x, feats = torch.load(_parity_dir() / "input.pt"), torch.load(_parity_dir() / "features.pt")
    model = timm.create_model(
        "vmamba_t", pretrained=True, features_only=True, out_indices=(1, 3),
        pretrained_cfg_overlay=dict(file=str(_parity_dir() / "state_dict.pt"), num_classes=10), **PARITY_KWARGS,
    ).eval()
    with torch.no_grad():
        f1, f3 = model(x)
    torch.testing.assert_close(f1, feats["layers.1.blocks"], **FEATURE_TOL)
    torch.testing.assert_close(f3, feats["layers.3.blocks"], **FEATURE_TOL)


def test_mismatched_checkpoint_names_the_offending_keys():
    model = VSSM(**PARITY_KWARGS)
    sd = dict(_official_state_dict())
    del sd["layers.2.blocks.1.op.Ds"]
    sd["layers.0.blocks.0.op.extra_thing"] = torch.zeros(3)
    sd["layers.1.blocks.0.mlp.fc1.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError) as err:
        checkpoint_filter_fn(sd, model)
    msg = str(err.value)
    assert "layers.0.blocks.0.op.extra_thing" in msg
    assert "stages.2.blocks.1.op.mixer.Ds" in msg
    assert "layers.1.blocks.0.mlp.fc1.weight (5, 5)" in msg


def test_checkpoint_of_another_variant_is_rejected():
    with torch.device("meta"):
        model = timm.create_model("vmamba_tiny_v0")
    keys = json.loads(fixture_path("vmamba_official", "keys_tiny.json").read_text())
    with pytest.raises(ValueError, match="does not match"):
        checkpoint_filter_fn({k: torch.empty(s, device="meta") for k, s in keys.items()}, model)


# ------------------------------------------------------------------------------------------ timm surface


def _small(name: str = "vmamba_t", **kwargs) -> VSSM:
    return timm.create_model(name, **{"depths": (1, 1, 2, 1), "dims": 16, **kwargs}).eval()


@pytest.mark.parametrize("size", [(64, 96), (33, 50), (7, 9)])
def test_features_only_strides_and_feature_info(size):
    model = timm.create_model("vmamba_t", features_only=True, depths=(1, 1, 1, 1), dims=16).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [16, 32, 64, 128]
    with torch.no_grad():
        feats = model(torch.randn(2, 3, *size))
    h, w = size
    for f, stride, chans in zip(feats, [4, 8, 16, 32], [16, 32, 64, 128]):
        # padded stride-2 convs: every step maps n -> ceil(n / 2)
        assert f.shape == (2, chans, -(-h // stride), -(-w // stride))


def test_forward_intermediates_options():
    model = _small()
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1] for t in inter] == [16, 32, 64, 128]
        assert final.shape == (1, 2, 1, 128)  # NHWC like forward_features
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], final.permute(0, 3, 1, 2))
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, output_fmt="NHWC",
                                            intermediates_only=True)
        torch.testing.assert_close(early[1], inter[1].permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_forward_head_pre_logits_is_pooled_features():
    model = _small(num_classes=5)
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 1, 2, 128)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean(dim=(1, 2)))
        torch.testing.assert_close(model(x), model.head.fc(feats.mean(dim=(1, 2))))


def test_reset_classifier_and_global_pool():
    model = _small()
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 128)
    model.reset_classifier(3, global_pool="max")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_no_weight_decay_lists_every_A_and_D():
    model = _small()
    names = model.no_weight_decay()
    n_blocks = 5
    assert len([n for n in names if n.endswith("mixer.A_logs")]) == n_blocks
    assert len([n for n in names if n.endswith("mixer.Ds")]) == n_blocks
    assert names <= dict(model.named_parameters()).keys()


def test_group_matcher_orders_stem_stages_head():
    model = _small()
    groups = timm.models.group_parameters(model, model.group_matcher())
    ordered = list(groups.values())
    assert all(n.startswith("stem.") for n in ordered[0])
    position = {n: i for i, group in enumerate(ordered) for n in group}
    assert position["stages.0.blocks.0.norm.weight"] < position["stages.1.downsample.conv.weight"]
    # a downsample joins the first block of its stage (timm's convention)
    assert position["stages.1.downsample.conv.weight"] == position["stages.1.blocks.0.norm.weight"]
    assert position["stages.2.blocks.0.norm.weight"] < position["stages.2.blocks.1.norm.weight"]
    assert position["stages.3.blocks.0.norm.weight"] <= position["norm.weight"] < position["head.fc.weight"]


def test_cfgs_of_every_official_variant():
    for name in ["vmamba_t", "vmamba_s", "vmamba_b", "vmamba_tiny_s2l5", "vmamba_base_v0"]:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
        assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
        assert cfg["interpolation"] == "bicubic" and cfg["classifier"] == "head.fc"
        assert cfg["first_conv"] == ("stem.conv" if name.endswith("v0") else "stem.conv1")


def test_drop_path_follows_the_official_linear_rule():
    model = timm.create_model("vmamba_t", drop_path_rate=0.2, depths=(2, 2, 8, 2), dims=8)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
             for s in model.stages for b in s.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.2, 14).tolist())


def test_mixer_argument_swaps_the_mixer():
    kinds = vmamba.available_mixers()
    classes = {kind: type(_small(mixer=kind, dims=32).stages[0].blocks[0].op.mixer) for kind in kinds}
    assert classes["mamba"] is MambaMixer
    assert len(set(classes.values())) == len(kinds)
    with pytest.raises(ValueError, match="unknown mixer"):
        _small(mixer="lstm")


# ------------------------------------------------------------------------------------------- bad input


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match="in_chans=3, got 4 channels"):
        _small()(torch.randn(1, 4, 32, 32))


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 3, 32, 32)])
def test_wrong_rank_raises(shape):
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\)"):
        _small()(torch.randn(shape))


def test_v0_size_not_multiple_of_patch_raises_with_valid_sizes():
    model = _small("vmamba_tiny_v0")
    with pytest.raises(ValueError, match=r"multiples of 4, got 50x64; crop/pad to H = 48 or 52, W = 64"):
        model(torch.randn(1, 3, 50, 64))
    with pytest.raises(ValueError, match="H = 4"):
        model(torch.randn(1, 3, 2, 64))
    with torch.no_grad():  # odd maps later on are padded by patch merging, as in the official code
        assert model(torch.randn(1, 3, 52, 36)).shape == (1, 1000)


def test_v2_takes_any_size():
    model = _small()
    with torch.no_grad():
        for size in [(1, 1), (5, 3), (31, 17)]:
            assert torch.isfinite(model(torch.randn(1, 3, *size))).all()


def test_patch_merging_order_is_official():
    """Channel blocks (h0 w0), (h1 w0), (h0 w1), (h1 w1), as the official torch.cat([x0, x1, x2, x3])."""
    merge = PatchMerging(1, 4)
    x = torch.arange(16.0).view(1, 4, 4, 1)
    gathered = []
    merge.norm = torch.nn.Identity()
    merge.reduction = torch.nn.Identity()
    out = merge(x)
    gathered = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    torch.testing.assert_close(out, gathered)


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="same length"):
        VSSM(depths=(1, 1), dims=(8, 16, 32))
    with pytest.raises(ValueError, match=r"unknown StemType 'pixel'; expected one of 'conv', 'patch'"):
        VSSM(stem="pixel")
    with pytest.raises(ValueError, match=r"unknown DownsampleType 'merge'; expected one of 'conv', 'patch_merging'"):
        VSSM(downsample="merge")


# ------------------------------------------------------------------------------------------- scan paths


def _cross2d_reference(u, x_proj_weight, dt_weight, dt_bias, A, D):
    """cross_scan -> the loop reference per direction -> cross_merge, all from the public pieces."""
    batch, height, width, dim = u.shape
    rank = dt_weight.shape[2]
    seqs = vmamba.cross_scan(u, "cross2d", channels_last=True)  # (B, K, L, E)
    x_dbl = torch.einsum("bkle,kce->bklc", seqs, x_proj_weight)
    delta = torch.einsum("bklr,ker->bkel", x_dbl[..., :rank], dt_weight)
    out = selective_scan_ref(
        seqs.permute(0, 1, 3, 2).reshape(batch, 4 * dim, -1), delta.reshape(batch, 4 * dim, -1),
        A.reshape(4 * dim, 1), x_dbl[..., rank].unsqueeze(2), x_dbl[..., rank + 1].unsqueeze(2),
        D=D.reshape(-1), delta_bias=dt_bias.reshape(-1), delta_softplus=True,
    )
    return vmamba.cross_merge(out.view(batch, 4, dim, -1).transpose(2, 3), (height, width), "cross2d",
                              channels_last=True)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 1, 3), (2, 1, 6, 3), (2, 6, 1, 3), (1, 7, 4, 5)])
def test_torch_cross2d_scan_matches_reference(shape):
    from vmamba.ops.cross2d_scan import cross2d_selective_scan

    g = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64)
    dim, rank = shape[-1], 2
    args = (torch.randn(shape, generator=g, **f64), torch.randn(4, rank + 2, dim, generator=g, **f64),
            0.5 * torch.randn(4, dim, rank, generator=g, **f64), torch.randn(4, dim, generator=g, **f64) - 1,
            -2 * torch.rand(4, dim, generator=g, **f64), torch.randn(4, dim, generator=g, **f64))
    torch.testing.assert_close(cross2d_selective_scan(*args), _cross2d_reference(*args), rtol=1e-12, atol=1e-12)
    out32 = cross2d_selective_scan(*(a.float() for a in args))
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), _cross2d_reference(*args), rtol=1e-4, atol=1e-5)


def test_torch_cross2d_scan_bad_input():
    from vmamba.ops.cross2d_scan import cross2d_selective_scan

    e, r = 4, 2
    good = dict(x_proj_weight=torch.zeros(4, r + 2, e), dt_weight=torch.zeros(4, e, r), dt_bias=torch.zeros(4, e),
                A=torch.zeros(4, e), D=torch.zeros(4, e))
    with pytest.raises(ValueError, match=r"\(B, H, W, E\)"):
        cross2d_selective_scan(torch.zeros(2, 3, e), **good)
    with pytest.raises(ValueError, match="x_proj_weight"):
        cross2d_selective_scan(torch.zeros(1, 2, 2, e), **{**good, "x_proj_weight": torch.zeros(4, r + 4, e)})
    with pytest.raises(ValueError, match="dt_bias"):
        cross2d_selective_scan(torch.zeros(1, 2, 2, e), **{**good, "dt_bias": torch.zeros(e)})


def _mixer_paths() -> list[str]:
    from vmamba.ops.fused import fused_status

    return ["torch"] + (["fused"] if fused_status().startswith("fused") else [])


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("d_state", [1, 3])
def test_mixer_map_paths_equal_generic_outputs_and_grads(backend, d_state):
    """forward_map (fused kernel / pure-PyTorch cross2d) == cross_merge(forward(cross_scan(x))), gradients too."""
    from vmamba.mixers.mamba import MapPath
    from vmamba.ops.fused import set_scan_backend

    if backend not in _mixer_paths():
        pytest.skip("the compiled kernel is not available here")
    mixer = MambaMixer(8, 4, d_state=d_state, dim_model=8).double()
    with torch.no_grad():
        mixer.dt_projs_bias.add_(2.0)  # larger steps: the scan term carries weight
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)

    def generic(t):
        seqs = vmamba.cross_scan(t, "cross2d", channels_last=True)
        return vmamba.cross_merge(mixer(seqs), (3, 5), "cross2d", channels_last=True)

    set_scan_backend(backend)
    try:
        with torch.no_grad():
            expected_path = MapPath.TORCH_CROSS2D if d_state == 1 and backend == "torch" else (
                MapPath.FUSED if backend == "fused" else MapPath.GENERIC)
            assert mixer.map_path(x, vmamba.ScanPattern.CROSS2D) is expected_path
            fast = mixer.forward_map(x, vmamba.ScanPattern.CROSS2D)
            if fast is not None:
                torch.testing.assert_close(fast, generic(x), rtol=1e-5, atol=1e-6)
        grad_path = mixer.map_path(x, vmamba.ScanPattern.CROSS2D)
        assert grad_path is (MapPath.FUSED if backend == "fused" else MapPath.GENERIC)
        if grad_path is MapPath.FUSED:  # the compiled kernel computes in float32
            out = mixer.forward_map(x, vmamba.ScanPattern.CROSS2D)
            w = torch.randn_like(out)
            grads = torch.autograd.grad((out * w).sum(), [x, *mixer.parameters()])
            ref_grads = torch.autograd.grad((generic(x) * w).sum(), [x, *mixer.parameters()])
            for a, b in zip(grads, ref_grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    finally:
        set_scan_backend(None)


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_parity_logits_on_every_path(backend):
    """Official logits through the inference path and through the differentiable path of each backend."""
    from vmamba.ops.fused import set_scan_backend

    if backend not in _mixer_paths():
        pytest.skip("the compiled kernel is not available here")
    d = _parity_dir()
    x, logits = torch.load(d / "input.pt"), torch.load(d / "logits.pt")
    model = _parity_model()
    set_scan_backend(backend)
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(x), logits, **LOGIT_TOL)
        out = model(x.requires_grad_())  # the differentiable path (generic chunked scan or compiled kernel)
        torch.testing.assert_close(out.detach(), logits, **LOGIT_TOL)
    finally:
        set_scan_backend(None)


def test_flop_count_is_the_same_on_the_inference_and_generic_paths():
    from vmamba.ops.flops import count_flops
    from vmamba.ops.fused import set_scan_backend

    model = _small(dims=32)  # dt rank >= 2: with rank 1 the generic path's einsum is a plain product, uncounted
    x = torch.randn(1, 3, 64, 48)
    # the pure-PyTorch paths (the FLOP reference; under "auto" the compiled kernel may run instead, and its
    # count leaves out the elementwise D skip, B * L * K * D MACs)
    set_scan_backend("torch")
    try:
        with torch.no_grad():
            inference = count_flops(lambda: model(x))
        generic = count_flops(lambda: model(x.requires_grad_()))
    finally:
        set_scan_backend(None)
    assert inference == generic > 0


@pytest.mark.parametrize("channels_last", [True, False])
def test_channel_mlp_row_blocks_equal_whole_map(monkeypatch, channels_last):
    """Inference on a large map runs the MLP in blocks of rows (no fresh mmap for the hidden activation):
    the same values as the whole-map path, in both layouts, with an uneven last block."""
    import vmamba.blocks as blocks

    mlp = blocks.ChannelMlp(6, 24, channels_last=channels_last).eval()
    x = torch.randn(2, 5, 7, 6) if channels_last else torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        whole = mlp(x)
        monkeypatch.setattr(blocks, "_MLP_CHUNK_ABOVE", 24)  # any map above one token's hidden size
        monkeypatch.setattr(blocks, "_MLP_CHUNK_ELEMENTS", 24 * 4)  # 4 rows per block: 70 = 17 * 4 + 2
        chunked = mlp(x)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    assert chunked.shape == x.shape


@pytest.mark.parametrize("channels_last", [True, False])
def test_channel_mlp_row_blocks_with_autograd(monkeypatch, channels_last):
    """Training on a large map runs the MLP on even blocks of rows: the same outputs and gradients (input and
    weights) as the whole-map MLP, in both layouts, with uneven blocks."""
    import vmamba.blocks as blocks

    mlp = blocks.ChannelMlp(6, 24, channels_last=channels_last).train()
    x = torch.randn(2, 5, 7, 6) if channels_last else torch.randn(2, 6, 5, 7)
    dy = torch.randn_like(x)
    params = [x.requires_grad_(), *mlp.parameters()]
    whole = mlp(x)
    whole_grads = torch.autograd.grad(whole, params, dy)
    monkeypatch.setattr(blocks, "_MLP_CHUNK_ABOVE", 24)  # any map above one token's hidden size
    monkeypatch.setattr(blocks, "_MLP_GRAD_BLOCK_ELEMENTS", 24 * 8)  # 70 rows in 9 blocks of 8 or 7
    spy = []
    monkeypatch.setattr(mlp, "_mlp", lambda rows: spy.append(rows.shape[0]) or blocks.ChannelMlp._mlp(mlp, rows))
    blocked = mlp(x)
    assert sorted(set(spy)) == [7, 8] and sum(spy) == 70
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)
    for grad, expected in zip(torch.autograd.grad(blocked, params, dy), whole_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("drop_prob, scale_by_keep", [(0.3, True), (0.5, False), (1.0, True), (0.0, True)])
@pytest.mark.parametrize("shape", [(4, 5, 3, 8), (3, 7)])
def test_add_drop_path_equals_timm_drop_path(drop_prob, scale_by_keep, shape):
    """add_drop_path(x, y, DropPath) is x + DropPath(y): the same per-sample draws (same seed), values and
    gradients, in training (samples kept and dropped) and in eval; an nn.Identity is a plain add."""
    from timm.layers import DropPath

    from vmamba.blocks import add_drop_path

    drop = DropPath(drop_prob, scale_by_keep=scale_by_keep)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    for training in (True, False):
        drop.train(training)
        torch.manual_seed(3)
        expected = x + drop(y)
        torch.manual_seed(3)
        out = add_drop_path(x, y, drop)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
        dy = torch.randn(shape, dtype=torch.float64)
        for grad, ref in zip(torch.autograd.grad(out, (x, y), dy), torch.autograd.grad(expected, (x, y), dy)):
            torch.testing.assert_close(grad, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(add_drop_path(x, y, torch.nn.Identity()), x + y)
    if shape[0] == 4 and 0.0 < drop_prob < 1.0:  # the cases above cover both kinds of sample
        drop.train()
        torch.manual_seed(3)
        kept = [not torch.equal(row, x[i]) for i, row in enumerate(add_drop_path(x, y, drop))]
        assert any(kept) and not all(kept)
