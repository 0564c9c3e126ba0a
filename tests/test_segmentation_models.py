"""VMambaUNet (backbones.segmentation): 2-D / 3-D forward and backward with every mixer, shapes, padding,
options that must not change the numbers, argument checks, and starting the 2-D encoder from an official
VMamba checkpoint."""
from __future__ import annotations

import pytest
import torch

import vmamba
from backbones.segmentation import VMambaEncoder, VMambaUNet, padding_for
from tests.conftest import fixture_path

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), feature_size=4)
# head sizes that divide the tiny widths (every stage's d_inner)
SMALL_HEADS = {"mamba2": dict(head_dim=4, d_state=8), "retnet": dict(num_heads=2, head_k_dim=4),
               "gla": dict(num_heads=2, head_k_dim=4), "rwkv7": dict(num_heads=2, head_k_dim=4)}


def _grads_finite(model: torch.nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("mixer", vmamba.available_mixers())
@pytest.mark.parametrize("spatial_dims, shape", [(2, (2, 3, 32, 64)), (3, (1, 2, 32, 64, 32))])
def test_forward_backward_every_mixer(mixer: str, spatial_dims: int, shape: tuple[int, ...]) -> None:
    net = VMambaUNet(in_channels=shape[1], out_channels=3, spatial_dims=spatial_dims, mixer=mixer,
                     mixer_kwargs=SMALL_HEADS.get(mixer), **TINY)
    x = torch.randn(shape)
    y = net(x)
    assert y.shape == (shape[0], 3, *shape[2:])
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    assert _grads_finite(net), f"missing or non-finite gradients with mixer {mixer}"


@pytest.mark.parametrize("spatial_dims, size", [(2, (20, 45)), (3, (9, 33, 17)), (3, (32, 20, 32))])
def test_any_size_is_padded_and_cropped_back(spatial_dims: int, size: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = VMambaUNet(in_channels=1, out_channels=2, spatial_dims=spatial_dims, **TINY).eval()
    x = torch.randn(1, 1, *size)
    y = net(x)
    assert y.shape == (1, 2, *size)
    # the crop must equal running the explicitly zero-padded input and cropping by hand
    padded = torch.zeros(1, 1, *[s + p for s, p in zip(size, padding_for(size))])
    padded[(slice(None), slice(None), *(slice(0, s) for s in size))] = x
    with torch.no_grad():
        ref = net(padded)[(slice(None), slice(None), *(slice(0, s) for s in size))]
        torch.testing.assert_close(net(x), ref)


def test_padding_rule() -> None:
    assert padding_for((64, 33, 1)) == [0, 31, 31]
    assert padding_for((32, 20, 7)) == [0, 12, 57]  # all would be 32: the last axis goes to 64
    assert padding_for((96, 96)) == [0, 0]


def test_encoder_pyramid_strides_and_widths() -> None:
    enc = VMambaEncoder(3, in_chans=1, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    levels = enc(torch.randn(1, 1, 64, 32, 96))
    assert [tuple(t.shape) for t in levels] == [
        (1, 4, 32, 16, 48), (1, 8, 16, 8, 24), (1, 16, 8, 4, 12), (1, 24, 4, 2, 6), (1, 32, 2, 1, 3)]


def test_grad_checkpointing_and_memory_format_keep_the_numbers() -> None:
    torch.manual_seed(0)
    base = VMambaUNet(in_channels=1, out_channels=2, spatial_dims=3, channels_last=False, **TINY)
    other = VMambaUNet(in_channels=1, out_channels=2, spatial_dims=3, channels_last=True, grad_checkpointing=True,
                       **TINY)
    other.load_state_dict(base.state_dict())
    x = torch.randn(1, 1, 32, 64, 32)
    outs = []
    for net in (base, other):
        net.train()
        y = net(x)
        y.square().mean().backward()
        outs.append((y.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-4)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], atol=1e-5, rtol=1e-3, msg=name)
    assert other.grad_checkpointing and all(s.grad_checkpointing for s in other.encoder.stages)
    # DDP copies gradients into buckets laid out like the weights: gradients must come back in the weights'
    # memory layout (strides of size-1 axes carry no layout and are ignored)
    def layout(t: torch.Tensor) -> tuple[int, ...]:
        return tuple(st for sz, st in zip(t.shape, t.stride()) if sz > 1)

    mismatched = [n for n, p in other.named_parameters() if p.grad is not None and layout(p) != layout(p.grad)]
    assert not mismatched


@pytest.mark.parametrize("kwargs, match", [
    (dict(spatial_dims=1), "spatial_dims must be 2 or 3"),
    (dict(in_channels=0), "in_channels must be a positive integer"),
    (dict(out_channels=-1), "out_channels must be a positive integer"),
    (dict(feature_size=0), "feature_size must be a positive integer"),
    (dict(dims=(8, 16, 32)), "dims must be four positive even integers"),
    (dict(dims=(9, 16, 32, 64)), "dims must be four positive even integers"),
    (dict(depths=(1, 1, -1, 1)), "depths must be four non-negative integers"),
    (dict(mixer="lstm"), "unknown mixer 'lstm'"),
])
def test_constructor_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = dict(in_channels=1, out_channels=2, spatial_dims=3, **TINY)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        VMambaUNet(**args)


def test_forward_rejects_wrong_channels_and_rank() -> None:
    net = VMambaUNet(in_channels=4, out_channels=2, spatial_dims=3, **TINY)
    with pytest.raises(ValueError, match=r"expects \(B, 4, D, H, W\) with 4 input channel"):
        net(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="got a tensor of shape"):
        net(torch.randn(1, 4, 32, 32))


def test_no_weight_decay_names_mamba_parameters() -> None:
    net = VMambaUNet(in_channels=1, out_channels=2, spatial_dims=2, mixer="mamba", **TINY)
    names = net.no_weight_decay()
    assert names and all(n.rsplit(".", 1)[-1] in ("A_logs", "Ds") for n in names)


# ------------------------------------------------------------------------------ VMamba ImageNet checkpoint


def _parity_unet() -> VMambaUNet:
    # the shape of shared/fixtures/vmamba_official/parity_small (VMamba v2, depths 1-1-2-1, dims 24, ssm_ratio 2)
    return VMambaUNet(in_channels=3, out_channels=2, spatial_dims=2, depths=(1, 1, 2, 1), dims=(24, 48, 96, 192),
                      feature_size=8, ssm_ratio=2.0, d_state=1)


def test_official_checkpoint_reproduces_official_stage_features(tmp_path) -> None:
    folder = fixture_path("vmamba_official", "parity_small")
    state = torch.load(folder / "state_dict.pt", map_location="cpu", weights_only=True)
    path = tmp_path / "official.pth"
    torch.save({"model": state}, path)  # the released files wrap the weights like this
    net = _parity_unet().eval()
    report = net.load_encoder_checkpoint(path)
    assert report["skipped"] and all(k.startswith(("head.", "norm.")) for k in report["skipped"])
    features = torch.load(folder / "features.pt", map_location="cpu", weights_only=True)
    x = torch.load(folder / "input.pt", map_location="cpu", weights_only=True)
    enc = net.encoder
    with torch.no_grad():
        _, h = enc.stem(x)
        torch.testing.assert_close(h.movedim(-1, 1), features["patch_embed"], atol=1e-5, rtol=1e-4)
        for i, stage in enumerate(enc.stages):
            h = stage(h)
            torch.testing.assert_close(h.movedim(-1, 1), features[f"layers.{i}.blocks"], atol=1e-5, rtol=1e-4,
                                       msg=f"stage {i}")


def test_checkpoint_for_one_channel_input_and_bad_checkpoints(tmp_path) -> None:
    from backbones.vmamba import VSSM

    source = VSSM(in_chans=3, num_classes=10, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), ssm_ratio=1.0, d_state=1)
    net = VMambaUNet(in_channels=1, out_channels=2, spatial_dims=2, **TINY)
    net.load_encoder_checkpoint(source.state_dict())  # a state dict of our own VSSM passes too
    torch.testing.assert_close(net.encoder.stem.conv1.weight,
                               source.stem.conv1.weight.sum(dim=1, keepdim=True))  # timm's adapt_input_conv
    torch.testing.assert_close(net.encoder.stages[2].blocks[0].op.mixer.A_logs,
                               source.stages[2].blocks[0].op.mixer.A_logs)
    wider = VSSM(in_chans=3, num_classes=10, depths=(1, 1, 1, 1), dims=(8, 16, 32, 32), ssm_ratio=1.0)
    with pytest.raises(ValueError, match="checkpoint does not match"):
        net.load_encoder_checkpoint(wider.state_dict())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        net.load_encoder_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="needs spatial_dims=2"):
        VMambaUNet(in_channels=1, out_channels=2, spatial_dims=3, **TINY).load_encoder_checkpoint(source.state_dict())
