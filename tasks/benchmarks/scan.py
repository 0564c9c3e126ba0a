"""Selective scan: the default path users get, the pure-PyTorch chunked form and the loop reference.

Shapes are VMamba-T's first stage at 224x224 (L = 56 * 56): d_state 16 (v0 / Vim-style) and d_state 1
(v2), and the fused kernel's target shape (D=384, N=16, L=4096). Inputs are float32,
``delta_softplus=True`` with a bias and a D skip, as the mixers call it. Forward and forward+backward.

Columns: medians of interleaved repeats of the loop reference, the chunked PyTorch form (backend pinned to
``torch``) and the default ``vmamba.ops.selective_scan`` (whatever the backend selection picks here: the
fused C++ kernel of :mod:`vmamba.ops.fused` when it builds, else the chunked form), and the ratios between
them. Targets checked (each line says met / missed):

* issue 2: the default selective scan >= 20x the loop reference, forward, at (B=1, D=192, N=16, L=3136) and
  (B=1, D=384, N=1, L=3136);
* issue 8: the fused kernel >= 5x the chunked PyTorch path at (B=1, D=384, N=16, L=4096), forward and
  forward+backward.

Measured 2026-11-29 on the 2-core machine while other jobs loaded it (load average ~7), so provisional; the
lead re-measures on a quiet machine. ``--threads 1`` run (medians): default vs chunked 7.1x forward and 8.2x
forward+backward at (D=384, N=16, L=4096); 8.8x / 7.6x at (D=192, N=16); 2.7x / 3.9x at (D=384, N=1).
Default vs loop, forward: 22x at (D=192, N=16) and 16x at (D=384, N=1), where the fused forward's minimum
over repeats was 2.5 ms against the median 7.3 ms the table printed (noise). For comparison, before the
kernel read the (B, D, L) layout in place (quiet machine, 2 threads): fused vs chunked 2.96x / 2.93x at the
target shape, and 12.7x / 11.4x fused vs loop forward at the two issue-2 shapes.
"""
from __future__ import annotations

from typing import Callable

import torch

from vmamba.ops import selective_scan, selective_scan_ref
from vmamba.ops.fused import ScanBackend, forced_scan_backend, fused_status, use_fused

from .common import format_ratio, print_table, time_interleaved

SHAPES = [(1, 192, 16, 3136), (1, 384, 1, 3136), (1, 384, 16, 4096)]  # (B, D, N, L)
QUICK_LENGTH = 400
# Issue 2: the default path against the loop, forward, at these (B, D, N, L).
LOOP_TARGET, LOOP_TARGET_SHAPES = 20.0, [(1, 192, 16, 3136), (1, 384, 1, 3136)]
# Issue 8: the fused kernel against the chunked PyTorch path, forward and forward+backward.
FUSED_TARGET, FUSED_TARGET_SHAPE = 5.0, (1, 384, 16, 4096)


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
    """``fn`` with :func:`selective_scan` pinned to one backend."""

    def call() -> object:
        with forced_scan_backend(backend):
            return fn()

    return call


def _verdict(ratio: float, target: float) -> str:
    return f"{ratio:.2f}x vs target >= {target:.0f}x: {'met' if ratio >= target else 'MISSED'}"


def run(quick: bool) -> None:
    repeats = 2 if quick else 5
    fused = use_fused(torch.zeros(1))
    rows, targets = [], []
    for batch, dim, d_state, full_length in SHAPES:
        length = QUICK_LENGTH if quick else full_length
        shape = f"B={batch} D={dim} N={d_state} L={length}"
        fwd_in, bwd_in = _inputs(batch, dim, d_state, length, False), _inputs(batch, dim, d_state, length, True)
        timings = time_interleaved(
            {
                "loop fwd": _forward(selective_scan_ref, fwd_in),
                "chunked fwd": _under(ScanBackend.TORCH, _forward(selective_scan, fwd_in)),
                "default fwd": _forward(selective_scan, fwd_in),
                "loop fwd+bwd": _forward_backward(selective_scan_ref, bwd_in),
                "chunked fwd+bwd": _under(ScanBackend.TORCH, _forward_backward(selective_scan, bwd_in)),
                "default fwd+bwd": _forward_backward(selective_scan, bwd_in),
            },
            repeats=repeats,
        )
        key = (batch, dim, d_state, full_length)
        for kind in ("fwd", "fwd+bwd"):
            loop, chunked, default = (timings[f"{path} {kind}"].median for path in ("loop", "chunked", "default"))
            rows.append([
                shape, kind, f"{loop * 1e3:.1f}", f"{chunked * 1e3:.2f}", f"{default * 1e3:.2f}",
                format_ratio(loop, chunked), format_ratio(loop, default), format_ratio(chunked, default),
            ])
            if kind == "fwd" and key in LOOP_TARGET_SHAPES:
                targets.append(f"issue 2, default vs loop, {shape}, fwd: {_verdict(loop / default, LOOP_TARGET)}")
            if key == FUSED_TARGET_SHAPE:
                verdict = _verdict(chunked / default, FUSED_TARGET) if fused else "n/a (the fused kernels are not active)"
                targets.append(f"issue 8, fused vs chunked, {shape}, {kind}: {verdict}")
    header = [
        "shape", "pass", "loop ms", "chunked ms", "default ms", "chunked vs loop", "default vs loop",
        "default / chunked",
    ]
    title = "Selective scan: default path and chunked PyTorch vs the loop reference, float32"
    print_table(title + (", quick sizes" if quick else ""), header, rows)
    print(f"\ndefault path: {fused_status()}; threads: {torch.get_num_threads()}")
    print("\nTargets" + (" (quick sizes: indicative only)" if quick else "") + ":")
    for line in targets:
        print(f"- {line}")
