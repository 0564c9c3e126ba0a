"""Retention (RetNet) and RWKV-7: the default op, the chunked PyTorch path and the loop reference side by side.

Sizes (issue 4): B=1, H=4, T=3136 (a 56x56 map), K=V=32. RWKV-7 inputs are built as its layer builds them
(log-decay in (-e^-0.5, 0), ``a = -kk``, ``b = kk * iclr`` with unit-norm ``kk``). Forward columns come from
one interleaved run: ``loop`` (the reference), ``chunked`` (the pure-PyTorch chunked path,
``VMAMBA_SCAN_BACKEND=torch``) and ``default`` (what the op dispatches to: for inference, i.e. no input
needing a gradient, the fused C++ recurrence of :mod:`vmamba.ops.fused.recurrence` when it builds).
Forward+backward (training) always runs the chunked path. Target (issue 4): each op at least 20x faster
than its loop reference, forward; the verdict is on the default op.

The fused recurrence spends ``3 K V`` (RWKV-7: ``5 K V``) multiply-adds per token and head in SIMD registers
with no call overheads. Measured (provisional, a shared 2-core machine, medians of one interleaved run,
T=3136): one thread retention 1.8 ms against a 92 ms loop (50x; chunked 15x), RWKV-7 5.4 ms against 164 ms
(30x; chunked 4-13x); the benchmark's two threads retention 57x, RWKV-7 66x (chunked 22x / 15x). What
follows explains why the chunked PyTorch path alone stays below the target.

Where the floor is (one thread, CPU time, medians; provisional, measured on a shared machine):

* Retention runs on the heads engine with one head per batch row: the in-chunk block factorises exactly
  around each chunk's midpoint, so no exp over ``Q x Q`` blocks; 13-15x before this session, 16-17x after.
* RWKV-7: the delta rule's in-chunk system needs about a dozen batched products per chunk over 784
  matrices of 16x16 to 32x32 (Q=16); at these sizes each batched call costs ~1 ms whatever its shape
  (per-matrix overhead, 10-20 GFLOP/s), and the 196-step chunk loop carries a 32x32 transition per chunk
  (~2 ms). Q=8 and Q=32 measured slower, and ``torch.linalg.solve_triangular`` slower than the nilpotent
  product (1.5 against 2.8 ms at Q=16). ~20 ms against a ~180-215 ms loop: 8-9x before the loop reference's
  O(T^2)-backward fix and this session's changes, ~9-10x after; 20x needs a fused kernel, not more
  PyTorch ops.
The loop references iterate over unbound time steps; indexing ``x[:, t]`` made their backward write a
full-size gradient per step (the loop's forward+backward took over a minute at this size).
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from tasks.benchmarks.common import OpCase, run_op_cases
from vmamba.ops import retention, retention_ref, rwkv7, rwkv7_ref
BATCH, HEADS, DK, DV = 1, 4, 32, 32


def _retention_inputs(length: int, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    q = torch.randn(BATCH, length, HEADS, DK)
    k = torch.randn(BATCH, length, HEADS, DK)
    v = torch.randn(BATCH, length, HEADS, DV)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def _rwkv7_inputs(length: int, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    shape = (BATCH, length, HEADS, DK)
    r, k = torch.randn(shape), torch.randn(shape)
    v = torch.randn(BATCH, length, HEADS, DV)
    w = -math.exp(-0.5) * torch.sigmoid(torch.randn(shape))
    kk = F.normalize(torch.randn(shape), dim=-1)
    iclr = torch.sigmoid(torch.randn(shape))
    return tuple(t.requires_grad_(requires_grad) for t in (r, w, k, v, -kk, kk * iclr))


def run(quick: bool) -> None:
    length = 512 if quick else 3136
    cases = [OpCase("retention", retention_ref, retention, _retention_inputs),
             OpCase("rwkv7", rwkv7_ref, rwkv7, _rwkv7_inputs)]
    run_op_cases(f"Retention / RWKV-7 vs loop reference (B={BATCH}, H={HEADS}, T={length}, K=V={DK})", cases, length,
                 repeats=2 if quick else 5)
