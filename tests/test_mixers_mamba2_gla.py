"""Mamba-2 and GLA mixer modules: shapes, gradients, causality, mixing matrices, autocast, bad input."""
from __future__ import annotations

import pytest
import torch

from vmamba import MultiDirectionSSM
from vmamba.mixers import GLAMixer, Mamba2Mixer, MixerType, create_mixer

KINDS = [MixerType.MAMBA2, MixerType.GLA]
DIM, K = 64, 4


def _mixer(kind: MixerType, **kw):
    return create_mixer(kind, DIM, K, dim_model=DIM // 2, chunk_size=8, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_registered_class(kind):
    assert type(_mixer(kind)) is {MixerType.MAMBA2: Mamba2Mixer, MixerType.GLA: GLAMixer}[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_shapes_and_all_parameters_trained(kind):
    mixer = _mixer(kind)
    x = torch.randn(2, K, 21, DIM, requires_grad=True)
    y = mixer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_causal_along_each_direction(kind):
    mixer = _mixer(kind).double()
    x = torch.randn(1, K, 30, DIM, dtype=torch.float64)
    changed = x.clone()
    changed[:, :, 17] += torch.randn(K, DIM, dtype=torch.float64)
    y, y2 = mixer(x), mixer(changed)
    torch.testing.assert_close(y[:, :, :17], y2[:, :, :17], rtol=0, atol=0)
    assert (y[:, :, 17:] - y2[:, :, 17:]).abs().amax() > 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_directions_have_their_own_parameters(kind):
    mixer = _mixer(kind)
    x = torch.randn(1, 1, 12, DIM).expand(1, K, 12, DIM)  # the same sequence in every direction
    y = mixer(x)
    assert (y[:, 0] - y[:, 1]).abs().amax() > 1e-6
    for p in mixer.parameters():
        assert p.shape[0] == K


@pytest.mark.parametrize("kind", KINDS)
def test_mixing_matrix_shape_causal_and_consistent(kind):
    mixer = _mixer(kind).double()
    x = torch.randn(2, K, 13, DIM, dtype=torch.float64)
    mix = mixer.mixing_matrix(x)
    assert mix.shape == (2, K, 13, 13)
    assert torch.all(mix.triu(1) == 0) and torch.all(mix >= 0)
    # row t of the matrix is what token t reads: perturbing token s > t moves nothing, s <= t moves entry (t, s)
    assert torch.all(mix.diagonal(dim1=-2, dim2=-1) > 0)


def test_mixing_matrix_matches_the_functional_op_over_all_heads():
    from vmamba.ops import gla_mixing_matrix, ssd_mixing_matrix

    x = torch.randn(2, K, 11, DIM, dtype=torch.float64)
    m2 = _mixer(MixerType.MAMBA2).double()
    dt, b, c = m2._project(x)
    full = ssd_mixing_matrix(dt, -torch.exp(m2.A_log).flatten(), b, c, m2.dt_bias.flatten(), True)
    full = full + torch.diag_embed(m2.D.flatten()[None, :, None].expand(2, -1, 11))
    torch.testing.assert_close(m2.mixing_matrix(x), full.unflatten(1, (K, m2.num_heads)).abs().mean(2))
    gl = _mixer(MixerType.GLA).double()
    full = gla_mixing_matrix(*gl._qkg(x))
    torch.testing.assert_close(gl.mixing_matrix(x), full.unflatten(1, (K, gl.num_heads)).abs().mean(2))


def test_mamba2_mixing_matrix_reproduces_the_scan():
    """Without gate and norm the mixer's scan is y = (M + D) x per head: check against ssd directly."""
    from vmamba.ops import ssd, ssd_mixing_matrix

    mixer = _mixer(MixerType.MAMBA2).double()
    x = torch.randn(1, K, 9, DIM, dtype=torch.float64)
    dt, b, c = mixer._project(x)
    A = -torch.exp(mixer.A_log).flatten()
    heads = x.transpose(1, 2).reshape(1, 9, K * mixer.num_heads, mixer.head_dim)
    y = ssd(heads, dt, A, b, c, D=mixer.D.flatten(), dt_bias=mixer.dt_bias.flatten(), dt_softplus=True)
    mix = ssd_mixing_matrix(dt, A, b, c, mixer.dt_bias.flatten(), True)
    y_mix = torch.einsum("bhts,bshp->bthp", mix, heads) + heads * mixer.D.flatten()[:, None]
    torch.testing.assert_close(y, y_mix)


@pytest.mark.parametrize("kind", KINDS)
def test_inside_the_multi_direction_layer(kind):
    layer = MultiDirectionSSM(32, mixer=kind, expand=2.0)
    x = torch.randn(2, 32, 5, 7)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_autocast(kind):
    """Under bf16 autocast the projections run in bf16 and the scan accumulates in float32; the output stays
    within 5% of the float32 mixer in relative L2 norm (single entries can move more: the per-token norms
    rescale tokens whose pre-norm activations are small)."""
    mixer = _mixer(kind)
    x = torch.randn(1, K, 40, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixer(x)
    assert torch.isfinite(y).all()
    y32 = mixer(x)
    assert (y.float() - y32).norm() <= 5e-2 * y32.norm()


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_raises(kind):
    mixer = _mixer(kind)
    with pytest.raises(ValueError, match="expects"):
        mixer(torch.randn(1, K - 1, 5, DIM))
    with pytest.raises(ValueError, match="expects"):
        mixer(torch.randn(1, K, 5, DIM + 1))


def test_bad_options_raise():
    with pytest.raises(ValueError, match="head_dim"):
        Mamba2Mixer(DIM, K, head_dim=48)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2Mixer(DIM, K, head_dim=16, ngroups=3)
    with pytest.raises(ValueError, match="num_heads"):
        GLAMixer(DIM, K, num_heads=5)
    with pytest.raises(ValueError, match="unknown mixer"):
        create_mixer("mamba3", DIM, K)


def test_optional_gates_can_be_dropped():
    x = torch.randn(1, K, 6, DIM)
    m2 = Mamba2Mixer(DIM, K, gate_rank=0)
    gla = GLAMixer(DIM, K, output_gate_rank=0)
    assert m2.z_proj_down is None and gla.g_proj_down is None
    assert m2(x).shape == x.shape and gla(x).shape == x.shape


@pytest.mark.parametrize("name", ["vmamba_t_mamba2", "vmamba_t_gla"])
def test_vmamba_t_parameter_count_within_ten_percent(name):
    timm = pytest.importorskip("timm")
    import vmamba  # noqa: F401  (registers the models)

    if name not in timm.list_models("vmamba_t*"):
        pytest.skip(f"{name} is not registered")
    model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 30_249_064 - 1) < 0.10, count
