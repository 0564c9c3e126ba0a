"""SSD (Mamba-2) and GLA: the default op, the chunked PyTorch path and the loop reference side by side.

Sizes (issue 4): B=1, H=4, T=3136 (a 56x56 map), K=V=32 for GLA; SSD with 6 heads of head dim 32 and
d_state 64 (one B/C group). Forward columns come from one interleaved run: ``loop`` (the reference),
``chunked`` (the pure-PyTorch chunked path, ``VMAMBA_SCAN_BACKEND=torch``) and ``default`` (what the op
dispatches to: for inference, i.e. no input needing a gradient, the fused C++ recurrence of
:mod:`vmamba.ops.fused.recurrence` when it builds). Forward+backward (training) always runs the chunked
path. Target (issue 4): every op at least 20x faster than its loop reference, forward; the verdict is on the
default op.

The fused recurrence spends ``3 K V`` multiply-adds per token and head in SIMD registers with no call
overheads. Measured (provisional, a shared 2-core machine, medians of one interleaved run, T=3136):
one thread GLA 1.9 ms against a 67 ms loop (35x; chunked 10x), SSD 3.3 ms against 95 ms (29x; chunked 8-12x);
the benchmark's two threads GLA 33x, SSD 25x (chunked 14x / 16x). What follows explains why the chunked
PyTorch path alone stays below the target.

Where the floor is (measured on this machine kind, one thread, CPU time, medians; provisional, the machine
was shared while measuring):

* SSD: the chunked form does the same ``2 T N H P`` = 77M multiply-adds for the state write and read as
  the loop (which spends them elementwise, ~100 ms), plus the block products (``T Q (N + H P)``, 26M at
  Q=32). Batched matmuls of these shapes run at 50-85 GFLOP/s on one thread, so the matmuls alone take
  ~3-4 ms: about 25x is the ceiling of any chunked pure-PyTorch form on one thread; measured 6-8x before
  this session's changes, 11-12x after (time-major heads engine: one matmul over all heads per product,
  the in-chunk block factorised instead of an exp per block entry; chunk 32). The strong decays used here
  (A down to -16) leave a few (chunk, head) pairs on the exact masked block.
* GLA: ~51M multiply-adds (four batched matmuls per chunk), plus cumsum/exp/reciprocal passes over
  ``(T, H, K)`` and a 98-step chunk loop: ~5.5-6 ms against a ~70 ms loop, ~10-11x on one thread.
Two threads speed the matmuls and the large elementwise passes, not the loop reference (its per-step
tensors are below PyTorch's parallel grain) nor the chunk loop, so the benchmark's two-thread ratios come
out higher than these one-thread ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.benchmarks.common import OpCase, run_op_cases
from vmamba.ops import gla, gla_ref, ssd, ssd_ref


def _gla_inputs(length: int, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    batch, heads, dk, dv = 1, 4, 32, 32
    q = torch.randn(batch, length, heads, dk)
    k = torch.randn(batch, length, heads, dk)
    v = torch.randn(batch, length, heads, dv)
    g = F.logsigmoid(torch.randn(batch, length, heads, dk)) / 16  # the GLA layer's gate range
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v, g))


def _ssd_inputs(length: int, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    batch, heads, head_dim, d_state = 1, 6, 32, 64
    x = torch.randn(batch, length, heads, head_dim)
    dt = torch.randn(batch, length, heads) - 2.0
    A = -torch.linspace(1.0, 16.0, heads)
    B = torch.randn(batch, length, 1, d_state)
    C = torch.randn(batch, length, 1, d_state)
    return tuple(t.requires_grad_(requires_grad) for t in (x, dt, A, B, C))


def run(quick: bool) -> None:
    length = 512 if quick else 3136
    cases = [OpCase("gla", gla_ref, gla, _gla_inputs), OpCase("ssd", ssd_ref, ssd, _ssd_inputs, {"dt_softplus": True})]
    run_op_cases(f"SSD / GLA vs loop reference (T={length}; GLA H=4 K=V=32; SSD H=6 P=32 N=64)", cases, length,
                 repeats=2 if quick else 5)
