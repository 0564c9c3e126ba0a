"""Seeded random configurations, beyond the hand-picked cases of the other test files.

Each case draws its shapes and options from a fixed seed, runs them in float32 on one scan backend and
compares with the float64 pure-PyTorch result: the selective scan against its plain loop reference
(outputs, last state, every input gradient) and a whole :class:`MultiDirectionSSM` layer (output, input and
every parameter gradient; for the other mixers also the no-grad output, which takes their inference
kernels) over 1-D, 2-D and 3-D maps, odd, non-square and length-1 sizes, channel counts that are not a
multiple of the SIMD width, d_state 1 to 17, grouped B / C, heads, chunk sizes that do and do not divide
the length, with and without gate, D skip, bias, initial state, softplus, out_norm, conv placement and
layout.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from tests.conftest import needs_fused_kernel
from vmamba.ops import selective_scan, selective_scan_ref
from vmamba.ops.fused import FusedKernel, ScanBackend, forced_scan_backend
from vmamba.ssm_layer import MultiDirectionSSM

BACKENDS = [
    pytest.param(ScanBackend.TORCH, id="torch"),
    pytest.param(ScanBackend.FUSED, id="fused", marks=needs_fused_kernel(FusedKernel.MULTI_SCAN)),
]
RTOL = 1e-4  # max |error| / max |reference|, per tensor (float32 against float64)
# Denominator floor: some gradients are zero in exact arithmetic (a decay's, with a length-1 sequence and
# no initial state) and come out as float32 rounding noise (~1e-9) against float64's ~1e-18.
SCALE_FLOOR = 1e-4


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(SCALE_FLOOR)).item()


def _assert_close_all(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], case: object) -> None:
    assert out.keys() == ref.keys(), f"{case}: gradients for {sorted(out)} vs {sorted(ref)}"
    errors = {name: _relative_error(out[name], ref[name]) for name in ref}
    bad = {name: err for name, err in errors.items() if not err <= RTOL}
    assert not bad, f"{case}: relative errors above {RTOL}: {bad}"


@dataclass(frozen=True)
class ScanCase:
    batch: int
    groups: int
    channels: int
    d_state: int
    length: int
    grouped: bool
    skip: bool
    gate: bool
    bias: bool
    initial_state: bool
    softplus: bool

    @staticmethod
    def draw(seed: int) -> ScanCase:
        rng = random.Random(seed)
        groups = rng.choice([1, 1, 2, 3])
        return ScanCase(
            batch=rng.randint(1, 3), groups=groups, channels=groups * rng.randint(1, 24),
            d_state=rng.choice([1, 2, 4, 7, 16, 17]), length=rng.choice([1, 2, 3, 15, 63, 64, 65, 127, 130]),
            grouped=groups > 1 or rng.random() < 0.5, skip=rng.random() < 0.6, gate=rng.random() < 0.6,
            bias=rng.random() < 0.6, initial_state=rng.random() < 0.6, softplus=rng.random() < 0.6,
        )

    def inputs(self, seed: int) -> dict[str, torch.Tensor]:
        """float64 leaves; without softplus the step sizes (delta + bias) are kept positive, as a decaying
        scan needs."""
        g = torch.Generator().manual_seed(seed)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        b, d, n, length = self.batch, self.channels, self.d_state, self.length
        bc_shape = (b, self.groups, n, length) if self.grouped else (b, n, length)
        out = {
            "u": randn(b, d, length),
            "delta": 0.5 * randn(b, d, length) if self.softplus else 0.3 * randn(b, d, length).abs(),
            "A": -randn(d, n).abs() - 0.1,
            "B": randn(*bc_shape),
            "C": randn(*bc_shape),
        }
        if self.skip:
            out["D"] = randn(d)
        if self.gate:
            out["z"] = randn(b, d, length)
        if self.bias:
            out["delta_bias"] = 0.3 * (randn(d) if self.softplus else randn(d).abs())
        if self.initial_state:
            out["initial_state"] = randn(b, d, n)
        return out


def _scan_and_grads(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], leaves: dict[str, torch.Tensor], softplus: bool,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """``fn`` (a selective scan) on ``leaves`` cast to ``dtype``: output, last state and every leaf's gradient
    of a fixed random projection of both, in float64."""
    xs = {name: t.detach().to(dtype).requires_grad_() for name, t in leaves.items()}
    y, last = fn(
        xs["u"], xs["delta"], xs["A"], xs["B"], xs["C"], D=xs.get("D"), z=xs.get("z"),
        delta_bias=xs.get("delta_bias"), delta_softplus=softplus, return_last_state=True,
        initial_state=xs.get("initial_state"),
    )
    g = torch.Generator().manual_seed(1)
    weight_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    weight_last = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)
    ((y * weight_y).sum() + (last * weight_last).sum()).backward()
    return {"y": y.double(), "last_state": last.double(), **{f"d_{k}": v.grad.double() for k, v in xs.items()}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(24))
def test_selective_scan_random_case_matches_float64_loop(seed: int, backend: ScanBackend) -> None:
    case = ScanCase.draw(seed)
    leaves = case.inputs(seed)
    ref = _scan_and_grads(selective_scan_ref, leaves, case.softplus, torch.float64)
    with forced_scan_backend(backend):
        out = _scan_and_grads(selective_scan, leaves, case.softplus, torch.float32)
    _assert_close_all(out, ref, case)


@dataclass(frozen=True)
class LayerCase:
    pattern: str
    spatial: tuple[int, ...]
    batch: int
    options: dict

    @staticmethod
    def draw(seed: int, mixer: str) -> LayerCase:
        """A Mamba case (``mixer="mamba"``) or one of the other four mixers (``mixer="other"``: cycled by
        ``seed``, so that every four seeds cover each of them once)."""
        rng = random.Random(f"{mixer}-{seed}")
        pattern = rng.choice(["bi1d", "cross2d", "cross2d", "cross3d"])
        if mixer != "mamba":
            mixer = ("mamba2", "retnet", "gla", "rwkv7")[seed % 4]
        if pattern == "bi1d":
            spatial = (rng.choice([1, 2, 17, 64, 65, 130]),)
        elif pattern == "cross2d":
            spatial = (rng.choice([1, 2, 5, 7, 12]), rng.choice([1, 3, 6, 9]))
        else:
            spatial = tuple(rng.choice([1, 2, 3, 5]) for _ in range(3))
        if mixer == "mamba":
            dim = rng.choice([3, 8, 16, 20, 33])
            # d_inner >= 4: a LayerNorm over 2 channels is too ill-conditioned to compare float32 with float64
            expand = rng.choice([0.5, 1.0, 2.0]) if dim > 3 else 2.0
            mixer_kwargs = dict(d_state=rng.choice([1, 1, 4, 16]), dt_rank=rng.choice([None, 1, 5]))
        else:
            dim, expand = rng.choice([8, 16, 24, 48]), 1.0
            heads = rng.choice([h for h in (1, 2, 4, 8) if dim % h == 0])
            chunk = rng.choice([4, 8, 16, 64])
            mixer_kwargs = {
                "mamba2": dict(d_state=rng.choice([1, 4, 16]), head_dim=dim // heads, chunk_size=chunk),
                "retnet": dict(num_heads=heads, head_k_dim=rng.choice([4, 8]), chunk_size=chunk),
                "gla": dict(num_heads=heads, head_k_dim=rng.choice([4, 8]), chunk_size=chunk),
                "rwkv7": dict(num_heads=heads, head_k_dim=rng.choice([4, 8])),
            }[mixer]
        conv = rng.choice(["spatial", "spatial", "none"] + (["causal"] if pattern == "bi1d" else []))
        options = dict(
            dim=dim,
            pattern=pattern,
            mixer=mixer,
            expand=expand,
            mixer_kwargs=mixer_kwargs,
            conv=conv,
            conv_kernel=rng.choice([2, 4]) if conv == "causal" else rng.choice([1, 3, 5]),
            conv_bias=rng.random() < 0.5,
            gate=rng.random() < 0.4,
            out_norm=rng.random() < 0.7,
            channels_last=rng.random() < 0.5,
        )
        return LayerCase(pattern=pattern, spatial=spatial, batch=rng.randint(1, 2), options=options)


def _layer_outputs(
    case: LayerCase, seed: int, backend: ScanBackend, dtype: torch.dtype, grad: bool
) -> dict[str, torch.Tensor]:
    """Output (and with ``grad`` the input and parameter gradients) of the case's layer, its parameters
    drawn from ``seed`` and moved off their initial values (zero biases, unit norms, ...)."""
    torch.manual_seed(seed)
    layer = MultiDirectionSSM(**case.options)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    layer = layer.double().to(dtype)  # rounded from the same float32 draw for both dtypes
    dim = case.options["dim"]
    shape = (case.batch, *case.spatial, dim) if case.options["channels_last"] else (case.batch, dim, *case.spatial)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
    weight = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    with forced_scan_backend(backend), torch.set_grad_enabled(grad):
        y = layer(x)
        if not grad:
            return {"y": y.double()}
        (y * weight).sum().backward()
    grads = {f"d_{name}": p.grad.double() for name, p in layer.named_parameters() if p.grad is not None}
    return {"y": y.double(), "d_x": x.grad.double(), **grads}


# (mixer family, seed, with gradients): 16 Mamba cases (training), 12 cases of the other mixers, each for
# training and for inference (the no-grad output takes their inference kernels).
LAYER_CASES = [pytest.param("mamba", seed, True, id=f"mamba-{seed}") for seed in range(16)] + [
    pytest.param("other", seed, grad, id=f"other-{seed}-{'train' if grad else 'inference'}")
    for seed in range(12)
    for grad in (True, False)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("family", "seed", "grad"), LAYER_CASES)
def test_multi_direction_ssm_random_case_matches_float64(
    family: str, seed: int, grad: bool, backend: ScanBackend
) -> None:
    case = LayerCase.draw(seed, family)
    ref = _layer_outputs(case, seed, ScanBackend.TORCH, torch.float64, grad=grad)
    _assert_close_all(_layer_outputs(case, seed, backend, torch.float32, grad=grad), ref, case)
