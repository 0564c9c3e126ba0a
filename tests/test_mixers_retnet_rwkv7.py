"""RetNet and RWKV-7 mixers: shapes, backward, causality, per-direction independence, mixing matrices,
inside the SSM layer, parameter budget and bad input."""
from __future__ import annotations

import pytest
import torch

from vmamba import MultiDirectionSSM
from vmamba.mixers import RetNetMixer, RWKV7Mixer, create_mixer
from vmamba.ops import retention, retention_mixing_matrix, rwkv7, rwkv7_mixing_matrix

KINDS = ["retnet", "rwkv7"]


def perturb_params(mixer: torch.nn.Module) -> None:
    """Move every parameter off its initialisation (RWKV-7 starts its LoRA down-projections at zero)."""
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", [1, 23])
def test_shapes_and_backward(kind: str, length: int) -> None:
    mixer = create_mixer(kind, 32, 4, dim_model=32)
    perturb_params(mixer)
    x = torch.randn(2, 4, length, 32, requires_grad=True)
    y = mixer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("kind", KINDS)
def test_causal_and_directions_independent(kind: str) -> None:
    mixer = create_mixer(kind, 16, 4).double()
    perturb_params(mixer)
    x = torch.randn(1, 4, 20, 16, dtype=torch.float64)
    base = mixer(x)
    bumped = x.clone()
    bumped[:, 2, 11] += 1.0
    diff = (mixer(bumped) - base).abs().amax(-1)  # (1, K, L)
    assert diff[:, [0, 1, 3]].max() == 0  # other directions untouched
    assert diff[0, 2, :11].max() == 0  # earlier tokens untouched
    assert diff[0, 2, 11:].min() > 0  # the bumped token and later ones react


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_are_per_direction(kind: str) -> None:
    mixer = create_mixer(kind, 16, 4)
    perturb_params(mixer)
    x = torch.randn(1, 4, 9, 16)
    base = mixer(x)
    with torch.no_grad():
        for p in mixer.parameters():
            p[1].add_(0.5)  # leading axis is the direction
    moved = (mixer(x) - base).abs().amax((0, 2, 3))
    assert moved[1] > 0 and moved[[0, 2, 3]].max() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind: str) -> None:
    mixer = create_mixer(kind, 4, 2, num_heads=2, head_k_dim=2).double()
    perturb_params(mixer)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mixer, (x,))


def test_retnet_mixing_matrix_reproduces_retention() -> None:
    mixer = RetNetMixer(12, 2, num_heads=1, head_k_dim=4, gate_rank=0).double()
    perturb_params(mixer)
    x = torch.randn(3, 2, 10, 12, dtype=torch.float64)
    q, k = mixer._qk(x)
    v = x.reshape(6, 10, 1, 12)
    signed = retention_mixing_matrix(q, k)  # (B*K, 1, L, L)
    torch.testing.assert_close(torch.einsum("nhts,nshv->nthv", signed, v), retention(q, k, v)[0])
    torch.testing.assert_close(mixer.mixing_matrix(x), signed.abs()[:, 0].unflatten(0, (3, 2)))
    assert torch.all(mixer.mixing_matrix(x).triu(1) == 0)


def test_rwkv7_mixing_matrix_reproduces_pre_norm_output() -> None:
    mixer = RWKV7Mixer(8, 2, num_heads=1, head_k_dim=4).double()
    perturb_params(mixer)
    x = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    r, w, k, v, a, b, _ = mixer._inputs(x)  # directions as heads: (B, L, K, d)
    pre_norm = rwkv7(r, w, k, v, a, b)[0] + mixer._bonus(r, k)[..., None] * v
    signed = rwkv7_mixing_matrix(r, w, k, a, b) + torch.diag_embed(mixer._bonus(r, k).transpose(1, 2))
    torch.testing.assert_close(torch.einsum("bhts,bshv->bthv", signed, v), pre_norm)
    mix = mixer.mixing_matrix(x)
    assert mix.shape == (2, 2, 9, 9)
    torch.testing.assert_close(mix, signed.abs())
    assert torch.all(mix.triu(1) == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_inside_ssm_layer_2d_and_vim(kind: str) -> None:
    layer = MultiDirectionSSM(16, pattern="cross2d", mixer=kind, expand=1.0)
    x = torch.randn(2, 16, 5, 7, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    vim_like = MultiDirectionSSM(16, pattern="bi1d", mixer=kind, expand=2.0, conv="causal", merge_mean=True)
    assert vim_like(torch.randn(2, 16, 11)).shape == (2, 16, 11)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_autocast(kind: str) -> None:
    mixer = create_mixer(kind, 32, 2)
    perturb_params(mixer)
    x = torch.randn(1, 2, 30, 32)
    ref = mixer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = mixer(x)
    assert torch.isfinite(low).all()
    # bf16 projections around a float32 scan: documented tolerance 5e-2 of the output scale
    assert (low.float() - ref).abs().max() <= 5e-2 * (1 + ref.abs().max())


@pytest.mark.parametrize("name", ["vmamba_t_retnet", "vmamba_t_rwkv7"])
def test_vmamba_t_parameter_budget(name: str) -> None:
    timm = pytest.importorskip("timm")
    import vmamba  # noqa: F401  (registers the models)

    if name not in timm.list_models("vmamba_t*"):
        pytest.skip(f"{name} is not registered")
    model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 30_249_064 - 1) <= 0.10, count


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_vmamba_fits_a_batch(kind: str) -> None:
    """The mixer trains inside a model: a tiny VMamba memorises 8 random images within 6 AdamW steps."""
    timm = pytest.importorskip("timm")
    import vmamba  # noqa: F401

    model = timm.create_model("vmamba_t", depths=(1, 1, 1, 1), dims=16, num_classes=4, mixer=kind)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_flop_counter_sees_the_chunked_ops() -> None:
    """FlopCounterMode counts the chunked forms' matmuls (plain PyTorch ops, no custom op): linear in T."""
    from vmamba.ops.flops import count_flops

    def flops(length: int) -> tuple[int, int]:
        q, k, v = torch.randn(3, 1, length, 2, 8).unbind(0)
        w = -torch.rand(1, length, 2, 8)
        kk = torch.nn.functional.normalize(torch.randn(1, length, 2, 8), dim=-1)
        return count_flops(lambda: retention(q, k, v)), count_flops(lambda: rwkv7(q, w, k, v, -kk, kk * 0.5))

    short, long = flops(256), flops(512)
    for a, b in zip(short, long):
        assert a > 0 and b == 2 * a


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        RetNetMixer(30, 4, num_heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        RWKV7Mixer(30, 4, num_heads=4)
    with pytest.raises(ValueError, match="gate_rank"):
        RetNetMixer(32, 4, gate_rank=-1)
    with pytest.raises(ValueError, match="decay_rank"):
        RWKV7Mixer(32, 4, decay_rank=0)
    with pytest.raises(ValueError, match="head_k_dim"):
        RWKV7Mixer(32, 4, head_k_dim=0)
    for kind in KINDS:
        mixer = create_mixer(kind, 32, 4)
        with pytest.raises(ValueError, match="expects"):
            mixer(torch.randn(1, 2, 5, 32))
        with pytest.raises(ValueError, match="expects"):
            mixer.mixing_matrix(torch.randn(1, 4, 5, 31))
    with pytest.raises(ValueError, match="unknown mixer"):
        create_mixer("rwkv8", 32, 4)
