"""Packed variable-length sequences (fla's ``cu_seqlens``) in gla, retention and rwkv7: every sequence scanned
on its own by the plain loop is the definition the packed forms are tested against."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vmamba.ops import gla, gla_ref, retention, retention_ref, rwkv7, rwkv7_ref
from vmamba.ops.fused import FusedKernel, forced_scan_backend
from vmamba.ops.varlen import PackedSequences

from tests.conftest import needs_fused_kernel

BACKENDS = ["torch", pytest.param("fused", marks=needs_fused_kernel(FusedKernel.RECURRENCE))]

# five sequences: 7 tokens, 1 token, an empty one, 22 tokens (several chunks), 11 tokens
CU_SEQLENS = torch.tensor([0, 7, 8, 8, 30, 41])
HEADS, DK, DV = 2, 4, 3


def _inputs(dtype=torch.float64):
    """Per-token inputs of every op, packed in one batch row, and one initial state per sequence."""
    length, count = int(CU_SEQLENS[-1]), CU_SEQLENS.numel() - 1
    q, k, kk = torch.randn(3, 1, length, HEADS, DK, dtype=dtype).unbind(0)
    v = torch.randn(1, length, HEADS, DV, dtype=dtype)
    g = F.logsigmoid(torch.randn(1, length, HEADS, DK, dtype=dtype)) / 4
    w = -F.softplus(torch.randn(1, length, HEADS, DK, dtype=dtype))
    kk = F.normalize(kk, dim=-1)
    states = torch.randn(count, HEADS, DK, DV, dtype=dtype)
    return dict(q=q, k=k, v=v, g=g, w=w, a=-kk, b=kk * 0.5), states


# op, its loop reference, the names of its per-token inputs in order
OPS = {
    "gla": (gla, gla_ref, ("q", "k", "v", "g")),
    "retention": (retention, retention_ref, ("q", "k", "v")),
    "rwkv7": (rwkv7, rwkv7_ref, ("q", "w", "k", "v", "a", "b")),
}


def _each_alone(reference, tokens: list[torch.Tensor], states: torch.Tensor):
    """The loop on every sequence by itself: ``(o (1, T, H, V), final states (N, H, K, V))``."""
    outputs, finals = [], []
    for n, (start, end) in enumerate(zip(CU_SEQLENS.tolist(), CU_SEQLENS[1:].tolist())):
        o, s = reference(*(t[:, start:end] for t in tokens), initial_state=states[n:n + 1], output_final_state=True)
        outputs.append(o)
        finals.append(s[0])
    return torch.cat(outputs, dim=1), torch.stack(finals)


def _call(op, tokens, states, **kw):
    """fla's positional order: per-token inputs, scale, initial_state, output_final_state, cu_seqlens."""
    scale = 1.0 if op is rwkv7 else None
    return op(*tokens, scale, states, True, CU_SEQLENS, **kw)


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_each_sequence_alone(name, backend):
    """Outputs and per-sequence final states (an empty sequence keeps its initial state) equal the loop run on
    each sequence alone: float64 on the chunked path, float32 on the fused recurrence where it is active."""
    op, reference, names = OPS[name]
    inputs, states = _inputs()
    tokens = [inputs[n] for n in names]
    o_want, s_want = _each_alone(reference, tokens, states)
    torch.testing.assert_close(s_want[2], states[2])  # the empty sequence
    forms = [{"mode": m} for m in ("chunk", "parallel", "recurrent")] if op is retention else [{}]
    for form in forms:
        o, s = _call(op, tokens, states, chunk_size=4, **form)
        torch.testing.assert_close(o, o_want, msg=f"{form}")
        torch.testing.assert_close(s, s_want, msg=f"{form}")
    with torch.no_grad(), forced_scan_backend(backend):
        o, s = _call(op, [t.float() for t in tokens], states.float())
    torch.testing.assert_close(o.double(), o_want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), s_want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(OPS))
def test_packed_gradients_equal_each_sequence_alone(name):
    """Gradients of every input and initial state through the packed chunked form equal the loop's."""
    op, reference, names = OPS[name]
    inputs, states = _inputs()
    leaves = [inputs[n].clone().requires_grad_() for n in names] + [states.clone().requires_grad_()]
    weights = torch.randn_like(inputs["v"]), torch.randn_like(states)

    def loss(o, s):
        return (o * weights[0]).sum() + (s * weights[1]).sum()

    grads = torch.autograd.grad(loss(*_call(op, leaves[:-1], leaves[-1], chunk_size=4)), leaves)
    grads_want = torch.autograd.grad(loss(*_each_alone(reference, leaves[:-1], leaves[-1])), leaves)
    for leaf, got, want in zip([*names, "initial_state"], grads, grads_want):
        torch.testing.assert_close(got, want, msg=leaf)


def test_packed_sequences_pad_and_unpad():
    """The padded batch holds each sequence from column 0, the fill after it; unpad gives the packed tokens
    back; the validity mask marks the real tokens."""
    packed = PackedSequences.of(CU_SEQLENS, 1, int(CU_SEQLENS[-1]))
    assert packed.count == 5 and packed.longest == 22
    tokens = torch.arange(41.0)[None, :, None]
    padded = packed.pad(tokens, fill=-1.0)
    assert padded.shape == (5, 22, 1)
    assert padded[1, 0, 0] == 7 and torch.all(padded[1, 1:] == -1) and torch.all(padded[2] == -1)
    assert torch.equal(padded[3, :, 0], torch.arange(8.0, 30.0))
    assert torch.equal(packed.unpad(padded), tokens)
    assert packed.valid().sum(1).tolist() == [7, 1, 0, 22, 11]


@pytest.mark.parametrize("name", list(OPS))
def test_packed_errors_are_named(name):
    op, _, names = OPS[name]
    inputs, states = _inputs()
    tokens = [inputs[n] for n in names]
    with pytest.raises(ValueError, match="one batch row"):
        op(*(torch.cat([t, t]) for t in tokens), None, None, True, CU_SEQLENS)
    with pytest.raises(ValueError, match="rise from 0"):
        op(*tokens, None, None, True, torch.tensor([0, 7, 40]))
    with pytest.raises(ValueError, match="rise from 0"):
        op(*tokens, None, None, True, torch.tensor([0, 9, 7, 41]))
    with pytest.raises(ValueError, match="integer"):
        op(*tokens, None, None, True, CU_SEQLENS.double())
    with pytest.raises(ValueError, match="one state per sequence"):
        op(*tokens, None, states[:4], True, CU_SEQLENS)


@pytest.mark.parametrize("name", list(OPS))
def test_packed_gradcheck(name):
    """float64 gradcheck of the packed chunked form on tiny sequences (lengths 2, 1, 3; chunks of 2)."""
    op, _, names = OPS[name]
    cu_seqlens = torch.tensor([0, 2, 3, 6])
    inputs, _ = _inputs()
    leaves = [inputs[n][:, :6, :1, :2].clone().requires_grad_() for n in names]
    states = torch.randn(3, 1, 2, leaves[names.index("v")].shape[-1], dtype=torch.float64, requires_grad=True)

    def f(*args):
        return op(*args[:-1], 1.0 if op is rwkv7 else None, args[-1], True, cu_seqlens, chunk_size=2)

    assert torch.autograd.gradcheck(f, [*leaves, states])
