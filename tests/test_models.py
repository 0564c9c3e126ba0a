"""Generic model suite (in the spirit of timm's tests/test_models.py) over every model this package registers.

Models are discovered from timm's registry: every entrypoint whose module lives in ``backbones`` joins,
so new families and mixer variants are covered without editing this file. Each family gets reduced
depths/widths (``SMALL``) so the whole file runs in a few minutes on 2 CPU cores; a family missing from
``SMALL`` fails loudly instead of silently running at full size. Variants whose mixer is not implemented
yet (``vmamba.available_mixers()``) are skipped with the reason.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import timm
import torch

import vmamba
from tests.conftest import ROOT, fixture_path, fused_kernel_error
from vmamba.mixers import MixerType
from vmamba.ops.fused import ScanBackend, forced_scan_backend

# family (entrypoint module) -> (reduced constructor kwargs, input (H, W)); H != W on purpose
SMALL: dict[str, tuple[dict, tuple[int, int]]] = {
    "backbones.vmamba": (dict(depths=(1, 1, 1, 1), dims=32), (16, 24)),
    "backbones.vim": (dict(depth=3, embed_dim=32, img_size=(32, 48)), (32, 48)),
}
NUM_CLASSES = 7


def _package_models() -> list[str]:
    return sorted(
        name for name in timm.list_models()
        if timm.models.model_entrypoint(name).__module__.startswith("backbones.")
    )


MODELS = _package_models()
DEFAULT_MIXER_MODELS = [n for n in MODELS if not any(n.endswith(f"_{kind.value}") for kind in MixerType)]


def _family(name: str) -> str:
    return timm.models.model_entrypoint(name).__module__


def _skip_if_mixer_missing(name: str) -> None:
    for kind in MixerType:
        if name.endswith(f"_{kind.value}") and kind.value not in vmamba.available_mixers():
            pytest.skip(f"mixer {kind.value!r} is not implemented yet (available: {vmamba.available_mixers()})")


def _small(name: str, **kwargs) -> tuple[torch.nn.Module, torch.Tensor]:
    _skip_if_mixer_missing(name)
    family = _family(name)
    if family not in SMALL:
        pytest.fail(f"{name} comes from {family}, which has no reduced test size: add it to SMALL in {__file__}")
    model_kwargs, (height, width) = SMALL[family]
    model = timm.create_model(name, **{**model_kwargs, **kwargs})
    in_chans = kwargs.get("in_chans", 3)
    return model, torch.randn(2, in_chans, height, width)


def test_discovery_finds_the_vmamba_family():
    expected = {"vmamba_t", "vmamba_s", "vmamba_b", "vmamba_tiny_s1l8", "vmamba_small_s1l20", "vmamba_base_s1l20",
                "vmamba_tiny_s2l5", "vmamba_small_s2l15", "vmamba_base_s2l15", "vmamba_tiny_v0", "vmamba_small_v0",
                "vmamba_base_v0", "vmamba_t_mamba2", "vmamba_t_retnet", "vmamba_t_gla", "vmamba_t_rwkv7"}
    assert expected <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_model_forward(name):
    model, x = _small(name, num_classes=NUM_CLASSES)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_model_backward_reaches_every_parameter(name):
    model, x = _small(name, num_classes=NUM_CLASSES)
    model.train()
    out = model(x)
    out.square().mean().backward()
    params = dict(model.named_parameters())
    no_grad = [n for n, p in params.items() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    bad = [n for n, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


@pytest.mark.parametrize("backend", ["fused", "torch"])
@pytest.mark.parametrize("name", MODELS)
def test_model_empty_batch(name, backend):
    """A batch of 0 images gives a (0, classes) output and a backward, on either scan path, with every mixer
    (as timm's ViT does; the scan paths and the mixers' ops once failed on reshapes that inferred a size from
    a 0-element tensor)."""
    if backend == "fused" and (error := fused_kernel_error()) is not None:
        pytest.skip(f"fused kernel cannot be built here: {error}")
    model, x = _small(name, num_classes=NUM_CLASSES)
    with forced_scan_backend(ScanBackend(backend)):
        with torch.no_grad():
            assert model.eval()(x[:0]).shape == (0, NUM_CLASSES)
        out = model.train()(x[:0])
        assert out.shape == (0, NUM_CLASSES)
        out.sum().backward()


@pytest.mark.parametrize("name", DEFAULT_MIXER_MODELS)
def test_model_shapes_on_the_meta_device(name):
    """The default-mixer models run on meta tensors (shape inference without memory): nothing in their forward
    or backward needs data on the CPU. (The gla / rwkv7 ops pick their chunk length from the data.)"""
    model, x = _small(name, num_classes=NUM_CLASSES)
    model = model.to("meta").train()
    out = model(x.to("meta"))
    assert out.shape == (2, NUM_CLASSES) and out.device.type == "meta"
    out.sum().backward()


@pytest.mark.parametrize("name", MODELS)
def test_model_default_cfg(name):
    model, x = _small(name)
    cfg = model.pretrained_cfg
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "first_conv", "classifier", "num_classes"):
        assert key in cfg, f"pretrained cfg lacks {key!r}"
    assert len(cfg["input_size"]) == 3 and len(cfg["mean"]) == 3 and len(cfg["std"]) == 3
    assert 0 < cfg["crop_pct"] <= 1
    assert cfg["num_classes"] == model.num_classes
    first = model.get_submodule(cfg["first_conv"])
    assert first.weight.shape[1] == cfg["input_size"][0]
    classifier = model.get_submodule(cfg["classifier"])
    assert classifier.weight.shape[0] == model.num_classes
    assert classifier is model.get_classifier()

    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        torch.testing.assert_close(model.forward_head(features), classifier(pooled))
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)


@pytest.mark.parametrize("name", MODELS)
def test_model_in_chans(name):
    model, x = _small(name, in_chans=1, num_classes=NUM_CLASSES)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", MODELS)
def test_model_features_only(name):
    model, x = _small(name, features_only=True)
    model.eval()
    with torch.no_grad():
        feats = model(x)
    info = model.feature_info
    assert len(feats) == len(info.channels()) > 0
    for f, chans, reduction in zip(feats, info.channels(), info.reduction()):
        assert f.dim() == 4 and f.shape[0] == 2 and f.shape[1] == chans  # NCHW
        for size, full in zip(f.shape[-2:], x.shape[-2:]):
            assert abs(size - math.ceil(full / reduction)) <= 1
        assert torch.isfinite(f).all()
    # an explicit subset (first and last) gives the same maps as the full set
    subset = timm.create_model(name, features_only=True, out_indices=(0, len(info) - 1),
                               **SMALL[_family(name)][0])
    subset.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        first, last = subset.eval()(x)
    torch.testing.assert_close(first, feats[0])
    torch.testing.assert_close(last, feats[-1])


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_intermediates(name):
    model, x = _small(name)
    model.eval()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        only = model.forward_intermediates(x, intermediates_only=True)
    assert len(intermediates) == len(only) == len(model.feature_info)
    for a, b in zip(intermediates, only):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", MODELS)
def test_model_grad_checkpointing_same_outputs_and_grads(name):
    model, x = _small(name, num_classes=NUM_CLASSES)
    model.eval()  # no drop path, so both passes are deterministic

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_plain, grads_plain = run()
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = run()
    torch.testing.assert_close(out_ckpt, out_plain)
    assert grads_ckpt.keys() == grads_plain.keys()
    for n in grads_plain:
        torch.testing.assert_close(grads_ckpt[n], grads_plain[n], msg=n)


@pytest.mark.parametrize("name", MODELS)
def test_model_weight_decay_and_groups(name):
    model, _ = _small(name)
    names = dict(model.named_parameters())
    assert set(model.no_weight_decay()) <= set(names) | {"pos_embed", "cls_token"}
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=False))
    assert sum(len(v) for v in groups.values()) == len(names)


@pytest.mark.parametrize("name", MODELS)
def test_model_builds_at_full_size(name):
    """Default (full-size) construction works; on the meta device, so it costs no memory or init time."""
    _skip_if_mixer_missing(name)
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) > 0


OFFICIAL_VMAMBA = {
    "vmamba_tiny_s1l8": "vmamba_tiny_s1l8", "vmamba_small_s1l20": "vmamba_small_s1l20",
    "vmamba_base_s1l20": "vmamba_base_s1l20", "vmamba_tiny_s2l5": "vmamba_tiny_s2l5",
    "vmamba_small_s2l15": "vmamba_small_s2l15", "vmamba_base_s2l15": "vmamba_base_s2l15",
    "vmamba_tiny_v0": "vanilla_vmamba_tiny", "vmamba_small_v0": "vanilla_vmamba_small",
    "vmamba_base_v0": "vanilla_vmamba_base",
    "vmamba_t": "vmamba_tiny_s1l8", "vmamba_s": "vmamba_small_s2l15", "vmamba_b": "vmamba_base_s2l15",
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_VMAMBA))
def test_vmamba_parameter_counts_equal_official(name):
    index = json.loads(fixture_path("vmamba_official", "index.json").read_text())["variants"]
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == index[OFFICIAL_VMAMBA[name]]["n_params_measured"]


_INFERENCE_THEN_TRAIN = """
import torch, timm
import vmamba
from backbones.segmentation import VMambaUNet
small_vmamba = dict(depths=(1, 1, 1, 1), dims=32, num_classes=5)
small_vim = dict(depth=2, embed_dim=32, img_size=(32, 48), num_classes=5)
cases = {
    "vmamba_t": (timm.create_model("vmamba_t", **small_vmamba), (1, 3, 40, 24)),
    "vmamba_tiny_v0": (timm.create_model("vmamba_tiny_v0", **small_vmamba), (1, 3, 40, 24)),
    "vim_t": (timm.create_model("vim_t", **small_vim), (1, 3, 32, 48)),
    "vim_t_cross": (timm.create_model("vim_t_cross", **small_vim), (1, 3, 32, 48)),
    "unet_3d": (VMambaUNet(in_channels=1, out_channels=2, spatial_dims=3, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16),
                           feature_size=4), (1, 1, 16, 24, 16)),
}
for name, (model, shape) in cases.items():
    x = torch.randn(shape)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad), name
print("ok")
"""


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_training_after_inference_mode_in_a_fresh_process(backend):
    """Caches built on a model's first call (direction indices, scratch buffers) must not keep inference
    tensors: evaluating under ``torch.inference_mode`` first and training afterwards is a common pattern, and
    an inference tensor can be neither saved for backward nor written outside inference mode. A fresh
    process, so the first call really builds every cache."""
    _run_in_a_fresh_process(_INFERENCE_THEN_TRAIN, backend)


_EXPORT_THEN_EAGER = """
import torch, timm
import vmamba
for name, kwargs in (("vmamba_t", dict(depths=(1, 1, 1, 1), dims=32)),
                     ("vim_t_cross", dict(depth=2, embed_dim=32, img_size=(32, 48)))):
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    x = torch.randn(2, 3, 32, 48)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_torch_export_then_eager_in_a_fresh_process(backend):
    """``torch.export`` traces the models (their cached scan orders must not keep the trace's fake tensors for
    later eager calls, which once failed with a DataDependentOutputException), and the exported program
    gives the eager outputs."""
    _run_in_a_fresh_process(_EXPORT_THEN_EAGER, backend)


def _run_in_a_fresh_process(code: str, backend: str) -> None:
    if backend == "fused" and (error := fused_kernel_error()) is not None:
        pytest.skip(f"fused kernel cannot be built here: {error}")
    env = {**os.environ, "VMAMBA_SCAN_BACKEND": backend}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                            cwd=str(ROOT))
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("name", ["vmamba_t", "vim_t"])
def test_torch_compile_aot_eager_gives_the_eager_outputs_and_gradients(name):
    """torch.compile traces the models (custom ops with fake kernels, cached scan orders bypassed while
    tracing) and the compiled forward / backward give the eager numbers."""
    model, x = _small(name, num_classes=NUM_CLASSES)
    model.train()
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    torch.manual_seed(1)
    eager_out = model(x)
    torch.manual_seed(1)
    compiled_out = compiled(x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    eager_out.square().sum().backward()
    compiled_out.square().sum().backward()
    for (pname, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{pname}: {m}")
