"""Selective scan: the chunked default against the loop reference, forward and forward+backward.

Shapes are VMamba-T's first stage at 224x224 (L = 56 * 56): d_state 16 (v0 / Vim-style) and d_state 1
(v2). Inputs are float32, ``delta_softplus=True`` with a bias and a D skip, as the mixers call it.
Printed: medians of interleaved repeats and the speed-up ratio of the chunked form (target >= 20x forward),
and, for reference, of the optional fused C++ kernel (:mod:`vmamba.ops.fused`) when it builds here.
"""
from __future__ import annotations

from typing import Callable

import torch

from vmamba.ops import selective_scan, selective_scan_ref
from vmamba.ops.fused import ScanBackend, forced_scan_backend, fused_status, use_fused

from .common import format_ratio, print_table, time_interleaved

SHAPES = [(1, 192, 16, 3136), (1, 384, 1, 3136), (1, 384, 16, 4096)]  # (B, D, N, L); the last is the fused-kernel target shape
QUICK_LENGTH = 400


def _inputs(batch: int, dim: int, d_state: int, length: int, grad: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = dict(
        u=torch.randn(batch, dim, length, generator=g),
        delta=torch.randn(batch, dim, length, generator=g) * 0.5 - 1.0,
        A=-torch.exp(torch.randn(dim, d_state, generator=g) * 0.5),
        B=torch.randn(batch, d_state, length, generator=g),
        C=torch.randn(batch, d_state, length, generator=g),
        D=torch.randn(dim, generator=g),
        delta_bias=torch.randn(dim, generator=g) * 0.1,
    )
    return {k: v.requires_grad_(grad) for k, v in tensors.items()}


def _forward(fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]) -> Callable[[], object]:
    def call() -> object:
        with torch.no_grad():
            return fn(**inputs, delta_softplus=True)

    return call


def _forward_backward(fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]) -> Callable[[], object]:
    def call() -> object:
        for t in inputs.values():
            t.grad = None
        fn(**inputs, delta_softplus=True).sum().backward()

    return call


def _under(backend: ScanBackend, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with :func:`selective_scan` pinned to one backend (the default would pick the fused kernel)."""

    def call() -> object:
        with forced_scan_backend(backend):
            return fn()

    return call


def run(quick: bool) -> None:
    repeats = 2 if quick else 5
    fused = use_fused(torch.zeros(1))
    rows = []
    for batch, dim, d_state, length in SHAPES:
        length = QUICK_LENGTH if quick else length
        shape = f"B={batch} D={dim} N={d_state} L={length}"
        fwd_in, bwd_in = _inputs(batch, dim, d_state, length, False), _inputs(batch, dim, d_state, length, True)
        fns = {
            "loop fwd": _forward(selective_scan_ref, fwd_in),
            "chunked fwd": _under(ScanBackend.TORCH, _forward(selective_scan, fwd_in)),
            "loop fwd+bwd": _forward_backward(selective_scan_ref, bwd_in),
            "chunked fwd+bwd": _under(ScanBackend.TORCH, _forward_backward(selective_scan, bwd_in)),
        }
        if fused:
            fns["fused fwd"] = _under(ScanBackend.FUSED, _forward(selective_scan, fwd_in))
            fns["fused fwd+bwd"] = _under(ScanBackend.FUSED, _forward_backward(selective_scan, bwd_in))
        timings = time_interleaved(fns, repeats=repeats)
        for kind in ("fwd", "fwd+bwd"):
            loop, chunked = timings[f"loop {kind}"].median, timings[f"chunked {kind}"].median
            row = [shape, kind, f"{loop * 1e3:.1f}", f"{chunked * 1e3:.2f}", format_ratio(loop, chunked)]
            if fused:
                fused_time = timings[f"fused {kind}"].median
                row += [format_ratio(loop, fused_time), format_ratio(chunked, fused_time)]
            rows.append(row)
    header = ["shape", "pass", "loop ms", "chunked ms", "chunked speed-up"] + (["fused speed-up", "fused / chunked"] if fused else [])
    title = "Selective scan: chunked (pure PyTorch) vs loop reference, float32"
    print_table(title + (", quick sizes" if quick else ""), header, rows)
    print(f"\nfused kernels: {fused_status()}")
