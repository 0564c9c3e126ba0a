"""Mamba (S6) selective scan: loop reference, chunked default, quadratic form and single step.

``h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t``, ``y_t = <C_t, h_t> + D * u_t``,
optionally ``y_t *= silu(z_t)``; ``delta = softplus(delta + delta_bias)`` when ``delta_softplus``.

Layouts follow mamba-ssm's ``selective_scan_fn``:
``u, delta, z: (B, D, L)``; ``A: (D, N)``; ``B, C: (B, N, L)`` or grouped ``(B, G, N, L)`` where group
``g`` serves channels ``g * D/G ... (g+1) * D/G - 1``, or time-invariant ``(D, N)`` (one vector per channel,
the same at every token, as mamba-ssm allows); ``D: (D,)``; ``delta_bias: (D,)``.
The state is ``(B, D, N)``. Everything is accumulated in float32 (float64 inputs stay float64); the output
has ``u``'s dtype, the last state the accumulation dtype.

Forms (all give the same numbers, see ``tests/test_selective_scan.py``):

* :func:`selective_scan` -- the default: a dispatcher op (``torch.ops.vmamba.selective_scan``, so
  FlopCounterMode and ``torch.compile`` see one op) that runs the fused C++ kernel of :mod:`vmamba.ops.fused`
  on CPU float32 / half inputs when it builds (the backend selection there can force either path), and
  otherwise the chunked form below with its explicit chunked backward. float64 always takes the chunked
  form. On the fused path the forward also returns the kernel's per-tile states (only when a backward will
  run), which the op's backward hands back to the kernel.
* :func:`selective_scan_ref` -- a plain loop over ``L``, the reference.
* :func:`selective_scan_quadratic` / :func:`selective_scan_mixing_matrix` -- the ``L x L`` semi-separable
  ("attention") form, for inspection.
* :func:`selective_scan_step` -- one step, for streaming inference.

How the chunked form works. ``L`` is cut into ``T`` chunks of ``Q`` tokens, stored position-major as
``(Q, b, G, N, Dg, T)`` so that "position q of every chunk" is one contiguous slice. Pass 1 runs the step
recurrence over the Q positions, vectorised over all chunks, keeping only a running state, to get each
chunk's end state from a zero start. A loop over the T chunks then carries the true state across chunk
boundaries with the chunk's total decay ``exp(A * sum(delta))`` (a value in (0, 1]). Pass 2 reruns the
recurrence in place from the carried states. Nothing divides by a decay or takes ``exp`` of a positive
cumulative sum, so nothing overflows however strong the decay or long the sequence. About ``2Q + T``
small ops instead of ``L``; ``Q ~ sqrt(L)`` balances them. The backward is the same scheme run in
reverse on the adjoint recurrence ``lambda_t = C_t * gy_t + exp(delta_{t+1} A) * lambda_{t+1}``, from
inputs recomputed on the fly (only the inputs are saved, so memory does not grow with ``N`` under autograd).
The work is done slab by slab (blocks of batch items and channels), in per-thread scratch buffers reused
across calls and bounded by :data:`SCRATCH_ELEMENTS`.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fused
from .flops import BACKWARD_MAC_FACTOR, register_macs, selective_scan_macs

__all__ = [
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_step",
    "selective_scan_quadratic",
    "selective_scan_mixing_matrix",
    "default_chunk_size",
]

# Scratch elements the chunked form may hold per thread (float32: 64 MB). It works on slabs of (batch items,
# channels) sized so that their scratch buffers fit this budget: about (3 N + 16) values per (channel, token).
# Larger slabs mean fewer, larger ops (measured on CPU: N-expanded buffers of 4M elements beat 1M).
SCRATCH_ELEMENTS = 1 << 24
_SCRATCH_PER_STATE, _SCRATCH_PER_CHANNEL = 3, 16
_LOG2E = 1.4426950408889634
# softplus(x) == x beyond this (the threshold of F.softplus and of mamba-ssm's kernels).
_SOFTPLUS_THRESHOLD = 20.0


# ----------------------------------------------------------------------------------------------------------
# Input checks and small helpers shared by every form
# ----------------------------------------------------------------------------------------------------------


def _check_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (B, D, L), got {tuple(u.shape)}")
    if delta.shape != u.shape:
        raise ValueError(f"delta must match u {tuple(u.shape)}, got {tuple(delta.shape)}")
    batch, dim, _ = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D={dim}, N), got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() not in (3, 4) or t.shape[0] != batch or t.shape[-2] != A.shape[1] or t.shape[-1] != u.shape[-1]:
            raise ValueError(
                f"{name} must be (B, N, L) or (B, G, N, L) with B={batch}, N={A.shape[1]}, L={u.shape[-1]}; "
                f"got {tuple(t.shape)}"
            )
        if t.dim() == 4 and dim % t.shape[1] != 0:
            raise ValueError(f"{name} has {t.shape[1]} groups, which does not divide D={dim}")
    if B.shape[:-2] != C.shape[:-2]:
        raise ValueError(f"B and C must have the same groups, got {tuple(B.shape)} and {tuple(C.shape)}")


def _per_token(ref: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """Time-invariant ``B`` / ``C`` ``(D, N)`` as per-token tensors ``(B, D, N, L)`` (a stride-0 view, one group
    per channel; the other one then also per channel); others unchanged. ``ref: (B, D, L)`` gives the sizes."""
    if (B.dim() != 2 and C.dim() != 2) or ref.dim() != 3:  # a bad u: _check_inputs names it
        return B, C
    batch, dim, length = ref.shape

    def per_channel(t: Tensor, name: str) -> Tensor:
        if t.dim() != 2:  # per token: to one group per channel as well (bad shapes left to _check_inputs)
            fits = t.dim() == 3 or (t.dim() == 4 and t.shape[1] > 0 and dim % t.shape[1] == 0)
            return expand_groups(t, dim) if fits else t
        if t.shape[0] != dim:
            raise ValueError(f"time-invariant {name} must be (D={dim}, N), got {tuple(t.shape)}")
        return t[None, :, :, None].expand(batch, dim, t.shape[1], length)

    return per_channel(B, "B"), per_channel(C, "C")


def _check_optional(
    u: Tensor,
    A: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
) -> None:
    batch, dim, _ = u.shape
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"{name} must be (D={dim},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must match u {tuple(u.shape)}, got {tuple(z.shape)}")
    if initial_state is not None and initial_state.shape != (batch, dim, A.shape[1]):
        expected = (batch, dim, A.shape[1])
        raise ValueError(f"initial_state must be (B, D, N)={expected}, got {tuple(initial_state.shape)}")


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for float32 and lower precisions; float64 kept (so float64 gradcheck is meaningful)."""
    return torch.promote_types(t.dtype, torch.float32)


def _as_groups(t: Tensor) -> Tensor:
    """``(B, N, L)`` -> ``(B, 1, N, L)``; grouped ``(B, G, N, L)`` unchanged."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def expand_groups(t: Tensor, dim: int) -> Tensor:
    """``(B, N, L)`` or ``(B, G, N, L)`` -> ``(B, D, N, L)`` (a view where possible)."""
    if t.dim() == 3:
        return t.unsqueeze(1).expand(t.shape[0], dim, *t.shape[1:])
    groups = t.shape[1]
    return t.repeat_interleave(dim // groups, dim=1)


def prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """``delta (+ bias)``, through softplus when asked, in the compute dtype. ``delta: (B, D, L)``."""
    delta = delta.to(_compute_dtype(delta))
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype).view(-1, *([1] * (delta.dim() - 2)))
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """``(y + D * u) * silu(z)`` in ``y``'s dtype (in place on ``y``). All ``(B, D, L)``."""
    if D is not None:
        y.addcmul_(u.to(y.dtype), D.to(y.dtype)[:, None])
    if z is not None:
        y.mul_(F.silu(z.to(y.dtype)))
    return y


# ----------------------------------------------------------------------------------------------------------
# Loop reference and single step
# ----------------------------------------------------------------------------------------------------------


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Plain recurrent loop over L: the reference every fast path is tested against.

    Returns ``out (B, D, L)``, and ``last_state (B, D, N)`` (float32) when ``return_last_state``.
    ``initial_state (B, D, N)`` starts the recurrence (zeros by default).
    """
    B, C = _per_token(u, B, C)
    _check_inputs(u, delta, A, B, C)
    _check_optional(u, A, D, z, delta_bias, initial_state)
    batch, dim, length = u.shape
    acc = _compute_dtype(u)
    delta = prepare_delta(delta, delta_bias, delta_softplus).to(acc)
    u32, A32 = u.to(acc), A.to(acc)
    Bf, Cf = expand_groups(B.to(acc), dim), expand_groups(C.to(acc), dim)  # (B, D, N, L)
    state = u32.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(acc)
    ys = []
    # Per-token views taken once (unbind): indexing inside the loop would make autograd build a full-size
    # zero gradient for every token (quadratic backward).
    steps = zip(delta.unbind(-1), u32.unbind(-1), Bf.unbind(-1), Cf.unbind(-1))
    for dt, u_t, B_t, C_t in steps:
        dt = dt[..., None]
        state = torch.exp(dt * A32) * state + dt * B_t * u_t[..., None]
        ys.append((state * C_t).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u32.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + u32 * D.to(acc)[:, None]
    if z is not None:
        y = y * F.silu(z.to(acc))
    out = y.to(u.dtype)
    return (out, state) if return_last_state else out


def selective_scan_step(
    state: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """One recurrent step for streaming inference.

    Args:
        state: ``(B, D, N)``.
        u, delta, z: ``(B, D)``.
        B, C: ``(B, N)`` or ``(B, G, N)``.

    Returns:
        ``(y (B, D), new_state (B, D, N) float32)``.
    """
    out, new_state = selective_scan_ref(
        u[..., None], delta[..., None], A, B[..., None], C[..., None], D,
        None if z is None else z[..., None], delta_bias, delta_softplus,
        return_last_state=True, initial_state=state,
    )
    return out[..., 0], new_state


# ----------------------------------------------------------------------------------------------------------
# Quadratic ("attention") form
# ----------------------------------------------------------------------------------------------------------


def _segment_sums(x: Tensor) -> Tensor:
    """``x: (..., L)`` -> ``(..., L, L)`` with ``[t, s] = sum_{s < r <= t} x_r`` and ``-inf`` above the diagonal.

    Built by a masked cumulative sum (no difference of prefix sums, so no cancellation on long sequences).
    """
    length = x.shape[-1]
    strict_lower = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(-1)
    seg = x[..., :, None].expand(*x.shape, length).masked_fill(~strict_lower, 0).cumsum(-2)
    upper = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
    return seg.masked_fill(upper, float("-inf"))


def selective_scan_mixing_matrix(
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """The semi-separable mixing matrix of the scan: ``y[b, d, t] = sum_s M[b, d, t, s] u[b, d, s]``.

    ``M[t, s] = sum_n C_t[n] exp(A[n] * sum_{s<r<=t} delta_r) B_s[n] delta_s`` for ``s <= t`` (zero above the
    diagonal), plus ``D`` on the diagonal when given. The ``z`` gate is not part of it (it scales rows).

    Args:
        delta: ``(B, D, L)``; A: ``(D, N)``; B, C: ``(B, N, L)``, ``(B, G, N, L)`` or ``(D, N)``;
        D, delta_bias: ``(D,)``.

    Returns:
        ``M: (B, D, L, L)`` in the compute dtype. Memory is ``O(B D L^2)``: for inspection and tests.
    """
    B, C = _per_token(delta, B, C)
    _check_inputs(delta, delta, A, B, C)
    _check_optional(delta, A, D, None, delta_bias, None)
    dim = delta.shape[1]
    dt = prepare_delta(delta, delta_bias, delta_softplus)
    acc = dt.dtype
    Bf, Cf = expand_groups(B.to(acc), dim), expand_groups(C.to(acc), dim)  # (B, D, N, L)
    A = A.to(acc)
    matrix = None
    for n in range(A.shape[1]):  # one state at a time keeps the temporaries at (B, D, L, L)
        decay = torch.exp(_segment_sums(dt * A[:, n, None]))
        term = Cf[:, :, n, :, None] * decay * (Bf[:, :, n, None, :] * dt[:, :, None, :])
        matrix = term if matrix is None else matrix + term
    if D is not None:
        matrix = matrix + torch.diag_embed(D.to(acc)[:, None].expand_as(dt))
    return matrix


def selective_scan_quadratic(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The scan evaluated as ``y = M u`` with the full mixing matrix (:func:`selective_scan_mixing_matrix`).

    Same arguments and results as :func:`selective_scan_ref`; differentiable by autograd. The initial state
    enters as ``C_t exp(A * sum_{r<=t} delta_r) h_0``; the last state is read off the matrix's last row.
    Costs ``O(B D N L^2)``: for inspection and tests.
    """
    B, C = _per_token(u, B, C)
    _check_inputs(u, delta, A, B, C)
    _check_optional(u, A, D, z, delta_bias, initial_state)
    dim = u.shape[1]
    acc = _compute_dtype(u)
    dt = prepare_delta(delta, delta_bias, delta_softplus).to(acc)
    uf, A = u.to(acc), A.to(acc)
    Bf, Cf = expand_groups(B.to(acc), dim), expand_groups(C.to(acc), dim)  # (B, D, N, L)
    y = uf.new_zeros(uf.shape)
    last = []
    for n in range(A.shape[1]):
        log_decay = dt * A[:, n, None]  # (B, D, L)
        decay = torch.exp(_segment_sums(log_decay))  # (B, D, L, L)
        inputs = Bf[:, :, n] * dt * uf  # (B, D, L)
        states = (decay @ inputs[..., None])[..., 0]  # h_t[n] from a zero start
        if initial_state is not None:
            states = states + torch.exp(log_decay.cumsum(-1)) * initial_state[:, :, n, None].to(acc)
        y = y + Cf[:, :, n] * states
        last.append(states[:, :, -1])
    if D is not None:
        y = y + uf * D.to(acc)[:, None]
    if z is not None:
        y = y * F.silu(z.to(acc))
    out = y.to(u.dtype)
    return (out, torch.stack(last, dim=-1)) if return_last_state else out


# ----------------------------------------------------------------------------------------------------------
# Chunked form
# ----------------------------------------------------------------------------------------------------------


def default_chunk_size(length: int) -> int:
    """Tokens per chunk for a sequence of ``length``: about ``sqrt(L)``, trimmed so padding is minimal.

    Passes 1 and 2 cost one small op per position in a chunk each, the carry one per chunk, so
    ``Q ~ sqrt(L)`` minimises the number of ops.
    """
    size = max(1, round(math.sqrt(length)))
    chunks = -(-length // size)
    return -(-length // chunks)


class _Workspace:
    """Named scratch buffers for a slab's temporaries, kept per thread and reused across slabs and calls.

    On CPU a fresh multi-megabyte tensor costs more in page faults than the arithmetic done on it (the
    allocator hands such blocks back to the OS when they are freed), so the chunked form writes its
    temporaries into these (``out=``) instead. Memory held: about :data:`SCRATCH_ELEMENTS` per thread and
    dtype (more only when a single channel needs more). Other devices allocate normally
    (their caching allocators already reuse memory). Buffers never leave the op.
    """

    _local = threading.local()

    def __init__(self, device: torch.device, dtype: torch.dtype, rows: bool = False) -> None:
        # rows: see :meth:`pm`. Measured on CPU: faster for d_state 1, where the layout changes are a large
        # share of the work; slower for d_state 16, where the strided per-position slices dominate.
        self.device, self.dtype, self.rows = device, dtype, rows
        self.reuse = device.type == "cpu"

    def get(self, name: str, *shape: int) -> Tensor:
        if not self.reuse:
            return torch.empty(shape, dtype=self.dtype, device=self.device)
        pool = self._local.__dict__.setdefault("pool", {})
        numel = math.prod(shape)
        buf = pool.get((name, self.dtype))
        if buf is None or buf.numel() < numel:
            # A normal tensor even under torch.inference_mode: an inference tensor kept here could not be
            # written outside inference mode by later calls (normal tensors can be written inside it).
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=self.dtype, device=self.device)
            pool[(name, self.dtype)] = buf
        return buf[:numel].view(shape)

    def pm(self, name: str, *shape: int) -> Tensor:
        """A position-major ``(Q, ..., T)`` buffer. With ``rows`` it is stored ``(..., Q, T)`` (each row's chunks
        side by side) and returned as a permuted view: then changing to and from the natural ``(..., T, Q)``
        layout transposes within rows (cache-local), at the price of strided per-position slices."""
        if not self.rows:
            return self.get(name, *shape)
        return self.get(name, *shape[1:-1], shape[0], shape[-1]).movedim(-2, 0)


@dataclass(frozen=True)
class _ChunkGrid:
    """``L`` tokens as ``T`` chunks of ``Q``, and the two layouts of a ``(b, X, L)`` tensor.

    *Natural*: ``(b, X, T * Q)``, zero-padded past ``L``. *Position-major*: ``(Q, b, X, T)``, so that position
    ``q`` of every chunk is one contiguous slice. :meth:`pm` gives the position-major *view* of a natural
    tensor; elementwise ops that read or write through it do the transposition on the fly (cheaper than a
    separate copy).
    """

    length: int
    size: int

    @property
    def count(self) -> int:
        return -(-self.length // self.size)

    @property
    def padded(self) -> int:
        return self.count * self.size

    def natural(self, x: Tensor) -> Tensor:
        """``(b, X, L)`` -> ``(b, X, T * Q)``, zero-padded (``x`` itself when ``L`` fills the chunks)."""
        pad = self.padded - self.length
        return F.pad(x, (0, pad)) if pad else x

    def pm(self, x: Tensor) -> Tensor:
        """Position-major view ``(Q, b, X, T)`` of a natural ``(b, X, T * Q)`` tensor."""
        return x.unflatten(-1, (self.count, self.size)).permute(3, 0, 1, 2)

    def to_pm(self, x: Tensor, out: Tensor) -> Tensor:
        """``x: (b, X, L)`` -> ``out``: position-major ``(Q, b, X, T)``, zeros past the end."""
        return out.copy_(self.pm(self.natural(x)))

    def to_natural(self, y: Tensor, out: Tensor) -> Tensor:
        """Position-major ``y: (Q, b, X, T)`` -> ``(b, X, L)`` (a view of ``out: (b, X, T * Q)``)."""
        self.pm(out).copy_(y)
        return out[..., : self.length]

    def zero_padding_(self, x: Tensor) -> Tensor:
        """Zero the padded positions of a position-major ``(Q, ..., T)`` tensor in place."""
        rest = self.length - (self.count - 1) * self.size
        if rest < self.size:
            x[rest:, ..., -1].zero_()
        return x


def _scan_chunks_(a: Tensor, x: Tensor, h0: Tensor | None, totals: Tensor) -> Tensor:
    """In place ``x <- h`` with ``h_i = a_i * h_{i-1} + x_i`` along the sequence, ``h_{-1} = h0``.

    Args:
        a, x: position-major ``(Q, ..., T)``: ``[q, ..., t]`` is token ``t * Q + q``.
        h0: ``(...)`` or None (zeros).
        totals: ``(T, ...)``, the product of ``a`` over each chunk.

    Returns:
        ``(T, ...)``: the state entering each chunk (``h0`` for the first).
    """
    size, count = a.shape[0], a.shape[-1]
    entering = x.new_empty(count, *x.shape[1:-1])
    if h0 is None:
        entering[0].zero_()
    else:
        entering[0].copy_(h0)
    if count > 1:
        # Pass 1: end state of chunks 0..T-2 from a zero start (a running state only, no full-size writes).
        xs, as_ = x[..., :-1].unbind(0), a[..., :-1].unbind(0)
        state, spare = xs[0].clone(), torch.empty_like(xs[0])
        for q in range(1, size):
            torch.addcmul(xs[q], as_[q], state, out=spare)
            state, spare = spare, state
        ends = state.movedim(-1, 0)
        for t in range(1, count):  # carry across chunk boundaries
            torch.addcmul(ends[t - 1], totals[t - 1], entering[t - 1], out=entering[t])
    # Pass 2: the recurrence again, in place, from the true entering states.
    xs, as_ = x.unbind(0), a.unbind(0)
    xs[0].addcmul_(as_[0], entering.movedim(0, -1))
    for q in range(1, size):
        xs[q].addcmul_(as_[q], xs[q - 1])
    return entering


def _scan_chunks_reverse_(a: Tensor, c: Tensor, grad_end: Tensor | None, totals: Tensor) -> None:
    """The adjoint of :func:`_scan_chunks_`, in place: ``c <- lambda`` and ``a <- a * lambda`` where
    ``lambda_i = c_i + a_{i+1} * lambda_{i+1}`` runs backwards from ``lambda_L = grad_end`` (zeros if None).

    ``lambda_i`` is the gradient of the loss w.r.t. ``h_i``; ``a_i * lambda_i`` the gradient w.r.t. ``h_{i-1}``
    through step ``i``. Shapes as :func:`_scan_chunks_`.
    """
    size, count = a.shape[0], a.shape[-1]
    incoming = c.new_empty(count, *c.shape[1:-1])  # a_{i+1} lambda_{i+1} arriving at the end of each chunk
    if grad_end is None:
        incoming[-1].zero_()
    else:
        incoming[-1].copy_(grad_end)
    if count > 1:
        # Pass 1: a_0 * lambda_0 of chunks 1..T-1 with nothing arriving from the right.
        cs, as_ = c[..., 1:].unbind(0), a[..., 1:].unbind(0)
        state, spare = as_[-1] * cs[-1], torch.empty_like(cs[-1])
        for q in range(size - 2, -1, -1):
            torch.add(cs[q], state, out=spare).mul_(as_[q])
            state, spare = spare, state
        starts = state.movedim(-1, 0)  # starts[t - 1] belongs to chunk t
        for t in range(count - 1, 0, -1):
            torch.addcmul(starts[t - 1], totals[t], incoming[t], out=incoming[t - 1])
    cs, as_ = c.unbind(0), a.unbind(0)
    arriving = incoming.movedim(0, -1)
    for q in range(size - 1, -1, -1):
        cs[q].add_(arriving)
        as_[q].mul_(cs[q])
        arriving = as_[q]


# Work tensors of a slab are position-major with the state axis outside the channel axis: (Q, b, G, N, Dg, T).
# Then "state n" is a contiguous (Dg, T) block per position, and the contractions over N below are loops of
# elementwise ops on large contiguous blocks, which beat batched (Dg, N) x (N, 1) matmuls and make no
# full-size temporaries.


def _sum_over_state(x: Tensor, v: Tensor, out: Tensor) -> Tensor:
    """``out <- sum_n x[..., n, d, t] * v[..., n, d, t]`` over the state axis (-3), kept as a singleton.

    ``x: (..., N, Dg, T)``; ``v`` broadcasts against it (for example ``(..., N, 1, T)`` or ``(G, N, Dg, 1)``).
    """
    torch.mul(x[..., 0:1, :, :], v[..., 0:1, :, :], out=out)
    for i in range(1, x.shape[-3]):
        out.addcmul_(x[..., i : i + 1, :, :], v[..., i : i + 1, :, :])
    return out


def _sum_over_channels(w: Tensor, x: Tensor, scratch: Tensor) -> Tensor:
    """``sum_d w[..., 0, d, t] * x[..., n, d, t]`` -> ``(..., N, T)``; ``w: (..., 1, Dg, T)``.

    ``scratch`` holds one ``(..., Dg, T)`` product at a time.
    """
    return torch.stack(
        [torch.mul(w[..., 0, :, :], x[..., i, :, :], out=scratch).sum(-2) for i in range(x.shape[-3])], dim=-2
    )


@dataclass(frozen=True)
class _Slab:
    """A block of the problem the chunked form processes at once: batch items, groups and channels."""

    batch: slice
    groups: slice
    channels: slice


def _slabs(batch: int, dim: int, groups: int, length: int, d_state: int) -> list[_Slab]:
    """Cut ``(batch, D)`` into slabs whose scratch buffers fit :data:`SCRATCH_ELEMENTS`.

    A slab is either part of one group's channels (one batch item) or whole groups (and batch items), so
    its slices of ``u, delta: (B, D, L)`` are contiguous.
    """
    per_group = dim // groups
    per_channel = (_SCRATCH_PER_STATE * d_state + _SCRATCH_PER_CHANNEL) * length
    budget = max(1, SCRATCH_ELEMENTS // per_channel)  # channels (of all batch items) per slab
    out = []
    if budget < per_group:
        step = -(-per_group // -(-per_group // budget))  # equal blocks rather than full ones and a small tail
        for b in range(batch):
            for g in range(groups):
                for c in range(g * per_group, (g + 1) * per_group, step):
                    end = min(c + step, (g + 1) * per_group)
                    out.append(_Slab(slice(b, b + 1), slice(g, g + 1), slice(c, end)))
        return out
    group_step = min(groups, budget // per_group)
    batch_step = max(1, budget // dim) if group_step == groups else 1
    for b in range(0, batch, batch_step):
        for g in range(0, groups, group_step):
            g_end = min(g + group_step, groups)
            batches = slice(b, min(b + batch_step, batch))
            out.append(_Slab(batches, slice(g, g_end), slice(g * per_group, g_end * per_group)))
    return out


def _state_to_bdn(s: Tensor) -> Tensor:
    """``(b, G, N, Dg)`` -> ``(b, D, N)``."""
    return s.transpose(2, 3).flatten(1, 2)


def _bdn_to_state(s: Tensor, groups: int) -> Tensor:
    """``(b, D, N)`` -> ``(b, G, N, Dg)`` (a view)."""
    return s.unflatten(1, (groups, -1)).transpose(2, 3)


@dataclass
class _Chunked:
    """One slab, chunked and scanned: what both the forward and the backward need.

    Position-major shapes: ``a, h: (Q, b, G, N, Dg, T)``; ``dt, dtu: (Q, b, G, 1, Dg, T)``;
    ``Bc, Cc: (Q, b, G, N, 1, T)``; ``A: (G, N, Dg, 1)``; ``entering, totals: (T, b, G, N, Dg)``;
    ``dt_grad``: d dt / d (delta + bias) like ``dt`` (zero on padding), or None.
    """

    grid: _ChunkGrid
    ws: _Workspace
    dt: Tensor
    dt_grad: Tensor | None
    dtu: Tensor
    A: Tensor
    Bc: Tensor
    Cc: Tensor
    a: Tensor
    h: Tensor
    entering: Tensor
    totals: Tensor

    def state_last(self) -> Tensor:
        """The state after the last token, ``(b, D, N)``; padded tokens carry it unchanged."""
        return _state_to_bdn(self.h[-1, ..., -1])

    def pm(self, x: Tensor) -> Tensor:
        """A ``(b, D, L)`` slab tensor as a position-major ``(Q, b, G, 1, Dg, T)`` view (no copy)."""
        return self.grid.pm(self.grid.natural(x)).view(self.dt.shape)

    def natural(self, y: Tensor, name: str) -> Tensor:
        """Position-major ``y: (Q, b, ..., T)`` -> natural ``(b, X, L)`` in the workspace buffer ``name``."""
        y = y.flatten(2, -2)
        return self.grid.to_natural(y, self.ws.get(name, y.shape[1], y.shape[2], self.grid.padded))

    def ssm_output(self, target: Tensor | None = None, accumulate: bool = False) -> Tensor:
        """``y_t = <C_t, h_t>`` in the natural layout ``(b, D, L)``, before the D skip and the gate.

        Written into (or with ``accumulate``, added to) ``target: (b, D, T * Q)`` when given (it must have
        the compute dtype), else into a workspace buffer. Returns the ``(b, D, L)`` view.
        """
        q, batch, groups, n, per_group, t = self.h.shape
        out = self.ws.get("y", batch, groups * per_group, self.grid.padded) if target is None else target
        out_pm = self.grid.pm(out).view(self.dt.shape)  # the transposition rides on the last op
        if n == 1 and accumulate:
            out_pm.addcmul_(self.h, self.Cc)
        elif n == 1:
            torch.mul(self.h, self.Cc, out=out_pm)
        else:
            y = _sum_over_state(self.h, self.Cc, self.ws.pm("y_pm", *self.dt.shape))
            out_pm.add_(y) if accumulate else out_pm.copy_(y)
        return out[..., : self.grid.length]


def _scan_slab(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
    chunk_size: int,
    ws: _Workspace,
    need_dt_grad: bool,
) -> _Chunked:
    """Chunk one slab and run the forward recurrence (``h`` for every token), in ``ws``'s dtype.

    ``u, delta: (b, D, L)``; ``A: (D, N)``; ``B, C: (b, G, N, L)`` with ``G`` dividing ``D``.
    """
    batch, dim, length = u.shape
    groups, n = B.shape[1], A.shape[1]
    per_group, acc = dim // groups, ws.dtype
    grid = _ChunkGrid(length, chunk_size)
    q, t = grid.size, grid.count

    def pm(x: Tensor) -> Tensor:
        return grid.pm(grid.natural(x))

    dt = ws.pm("dt", q, batch, dim, t)
    if delta_bias is not None:  # the transposition rides on an op that is needed anyway
        torch.add(pm(delta), delta_bias.to(acc)[:, None], out=dt)
    else:
        dt.copy_(pm(delta))
    dt_grad = None
    if delta_softplus:
        if need_dt_grad:
            dt_grad = torch.sigmoid(dt, out=ws.pm("dt_grad", *dt.shape))
        torch.ops.aten.softplus.out(dt, 1, _SOFTPLUS_THRESHOLD, out=dt)
    elif need_dt_grad:
        dt_grad = ws.pm("dt_grad", *dt.shape).fill_(1)
    grid.zero_padding_(dt)  # padded tokens: no decay, no input, so the last state passes through them
    if dt_grad is not None:
        grid.zero_padding_(dt_grad)
    dtu = torch.mul(dt, pm(u), out=ws.pm("dtu", *dt.shape))
    channel_dims = (q, batch, groups, 1, per_group, t)
    dt, dtu = dt.view(channel_dims), dtu.view(channel_dims)
    dt_grad = None if dt_grad is None else dt_grad.view(channel_dims)
    Bc = grid.to_pm(B.flatten(1, 2), ws.pm("B", q, batch, groups * n, t)).view(q, batch, groups, n, 1, t)
    Cc = grid.to_pm(C.flatten(1, 2), ws.pm("C", q, batch, groups * n, t)).view(q, batch, groups, n, 1, t)
    # (G, N, Dg, 1), contiguous: a transposed view here would make the broadcasts below pick its odd layout
    A = A.to(acc).view(groups, per_group, n).transpose(1, 2).contiguous()[..., None]
    A2 = A * _LOG2E  # exp(x A) = exp2(x A log2 e), and exp2 is several times faster than exp on CPU
    state_dims = (q, batch, groups, n, per_group, t)
    a = torch.mul(dt, A2, out=ws.pm("a", *state_dims)).exp2_()
    h = torch.mul(dtu, Bc, out=ws.pm("h", *state_dims))
    totals = torch.mul(dt.sum(0), A2).exp2_().movedim(-1, 0).contiguous()  # (T, b, G, N, Dg)
    h0 = None if initial_state is None else _bdn_to_state(initial_state.to(acc), groups)
    entering = _scan_chunks_(a, h, h0, totals)
    return _Chunked(grid, ws, dt, dt_grad, dtu, A, Bc, Cc, a, h, entering, totals)


def _slab_inputs(slab: _Slab, u, delta, A, B, C, delta_bias, initial_state):
    """The slab's views of the inputs (``B, C`` as ``(b, G, N, L)``)."""
    bs, gs, cs = slab.batch, slab.groups, slab.channels
    B, C = _as_groups(B), _as_groups(C)
    if B.shape[1] == 1:
        gs = slice(0, 1)
    return (
        u[bs, cs], delta[bs, cs], A[cs], B[bs, gs], C[bs, gs],
        None if delta_bias is None else delta_bias[cs],
        None if initial_state is None else initial_state[bs, cs],
    )


def _chunk_size(length: int, chunk_size: int) -> int:
    return min(chunk_size, length) if chunk_size > 0 else default_chunk_size(length)


def _forward_impl(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    delta_softplus: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    batch, dim, length = u.shape
    n = A.shape[1]
    ws = _Workspace(u.device, _compute_dtype(u), rows=A.shape[1] == 1)
    size = _chunk_size(length, chunk_size)
    out = u.new_empty(u.shape)
    last = u.new_empty(batch, dim, n, dtype=ws.dtype)
    groups = 1 if B.dim() == 3 else B.shape[1]
    with torch.autocast(u.device.type, enabled=False):  # the op owns its precision
        for slab in _slabs(batch, dim, groups, length, n):
            bs, cs = slab.batch, slab.channels
            su, sdelta, sA, sB, sC, sbias, sh0 = _slab_inputs(slab, u, delta, A, B, C, delta_bias, initial_state)
            ch = _scan_slab(su, sdelta, sA, sB, sC, sbias, delta_softplus, sh0, size, ws, False)
            sD, sz = None if D is None else D[cs], None if z is None else z[bs, cs]
            target = out[bs, cs]
            if ch.grid.padded == length and out.dtype == ws.dtype:  # straight into the output: fewer passes
                if sD is not None:
                    torch.mul(su, sD.to(ws.dtype)[:, None], out=target)
                ch.ssm_output(target, accumulate=sD is not None)
                _finish(target, su, None, sz)
            else:
                target.copy_(_finish(ch.ssm_output(), su, sD, sz))
            last[bs, cs] = ch.state_last()
    return out, last


def _backward_impl(
    grad_out: Tensor,
    grad_last: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    delta_softplus: bool,
    chunk_size: int,
) -> list[Tensor]:
    """Gradients ``[u, delta, A, B, C, D, z, delta_bias, initial_state]`` (empty tensors for absent inputs)."""
    batch, dim, length = u.shape
    n = A.shape[1]
    ws = _Workspace(u.device, _compute_dtype(u), rows=A.shape[1] == 1)
    acc = ws.dtype
    size = _chunk_size(length, chunk_size)
    groups = 1 if B.dim() == 3 else B.shape[1]

    def new(*shape: int, zero: bool = False) -> Tensor:
        return (torch.zeros if zero else torch.empty)(*shape, dtype=acc, device=u.device)

    g_u, g_delta, g_A = new(*u.shape), new(*u.shape), new(*A.shape, zero=True)
    g_B, g_C = new(batch, groups, n, length, zero=True), new(batch, groups, n, length, zero=True)
    g_D, g_bias = new(dim, zero=True), new(dim, zero=True)
    g_z = new(*u.shape) if z is not None else None
    g_h0 = new(batch, dim, n)
    with torch.autocast(u.device.type, enabled=False):
        for slab in _slabs(batch, dim, groups, length, n):
            bs, cs = slab.batch, slab.channels
            gs = slab.groups if groups > 1 else slice(0, 1)
            su, sdelta, sA, sB, sC, sbias, sh0 = _slab_inputs(slab, u, delta, A, B, C, delta_bias, initial_state)
            ch = _scan_slab(su, sdelta, sA, sB, sC, sbias, delta_softplus, sh0, size, ws, True)
            shape = su.shape
            g = grad_out[bs, cs]
            g = g if g.dtype == acc else ws.get("g", *shape).copy_(g)
            if z is not None:  # out = (y_ssm + D u) * silu(z); dsilu(z) = sig (1 + z (1 - sig))
                zs = z[bs, cs]
                zs = zs if zs.dtype == acc else ws.get("z", *shape).copy_(zs)
                sig = torch.sigmoid(zs, out=ws.get("sig", *shape))
                dsilu = torch.mul(sig, -1, out=ws.get("dsilu", *shape)).add_(1).mul_(zs).add_(1).mul_(sig)
                y = _finish(ch.ssm_output(), su, None if D is None else D[cs], None)
                g_z[bs, cs] = y.mul_(g).mul_(dsilu)
                g = torch.mul(g, zs, out=ws.get("g_y", *shape)).mul_(sig)  # dL/dy = g * silu(z)
            if D is not None:
                g_D[cs] += torch.mul(g, su, out=ws.get("tmp", *shape)).sum((0, 2))
                torch.mul(g, D[cs].to(acc)[:, None], out=g_u[bs, cs])
            else:
                g_u[bs, cs] = 0
            gy = ch.grid.to_pm(g, ws.pm("gy", *ch.grid.pm(ch.grid.natural(g)).shape)).view(ch.dt.shape)
            scratch = ws.pm("tmp", *ch.dt.shape)[..., 0, :, :]  # one (Q, b, G, Dg, T) product at a time
            g_C[bs, gs] += ch.natural(_sum_over_channels(gy, ch.h, scratch), "nat").unflatten(1, (-1, n))
            lam = torch.mul(gy, ch.Cc, out=ws.pm("lam", *ch.h.shape))  # dL/dh_i through y_i
            g_end = None if grad_last is None else _bdn_to_state(grad_last[bs, cs].to(acc), ch.a.shape[2])
            _scan_chunks_reverse_(ch.a, lam, g_end, ch.totals)  # lam <- dL/dh_i, a <- dL/dh_{i-1} via step i
            a_lam = ch.a
            g_h0[bs, cs] = _state_to_bdn(a_lam[0, ..., 0])
            # dL/d(dt_i A) = a_i lambda_i h_{i-1}; h_{i-1} is h one token back: the entering state at q = 0
            a_lam[1:].mul_(ch.h[:-1])
            a_lam[0].mul_(ch.entering.movedim(0, -1))
            dA = [torch.mul(a_lam[..., i, :, :], ch.dt[..., 0, :, :], out=scratch).sum((0, 1, 4)) for i in range(n)]
            g_A[cs] += torch.stack(dA, -1).flatten(0, 1)  # (G, Dg, N) -> (D, N)
            # h_i = a_i h_{i-1} + (dt_i u_i) B_i
            g_dtu = _sum_over_state(lam, ch.Bc, ws.pm("g_dtu", *ch.dt.shape))  # (Q, b, G, 1, Dg, T)
            g_B[bs, gs] += ch.natural(_sum_over_channels(ch.dtu, lam, scratch), "nat").unflatten(1, (-1, n))
            g_dt = _sum_over_state(a_lam, ch.A, ws.pm("g_dt", *ch.dt.shape)).addcmul_(g_dtu, ch.pm(su))
            g_u[bs, cs] += ch.natural(g_dtu.mul_(ch.dt), "nat")
            g_pre = g_dt.mul_(ch.dt_grad)  # zero on padding through dt_grad
            g_bias[cs] += g_pre.sum((0, 1, 5)).flatten()
            g_delta[bs, cs] = ch.natural(g_pre, "nat")

    def empty() -> Tensor:  # a fresh one per slot: a custom op's outputs must not alias each other
        return u.new_empty(0)

    return [
        g_u.to(u.dtype),
        g_delta.to(delta.dtype),
        g_A.to(A.dtype),
        g_B.view(B.shape).to(B.dtype),
        g_C.view(C.shape).to(C.dtype),
        empty() if D is None else g_D.to(D.dtype),
        empty() if z is None else g_z.to(z.dtype),
        empty() if delta_bias is None else g_bias.to(delta_bias.dtype),
        empty() if initial_state is None else g_h0.to(initial_state.dtype),
    ]


# ----------------------------------------------------------------------------------------------------------
# Dispatcher ops: one opaque op for FlopCounterMode and torch.compile, autograd through the chunked backward
# ----------------------------------------------------------------------------------------------------------


def _use_fused_kernel(u: Tensor, A: Tensor, B: Tensor, C: Tensor) -> bool:
    """The compiled kernel serves float32 / half inputs on CPU when it builds (see :mod:`vmamba.ops.fused`);
    float64 stays on the PyTorch path, whose float64 arithmetic gradcheck relies on. So do time-invariant
    ``B`` / ``C`` (a stride-0 view along L, see :func:`_per_token`): the kernel would need them as dense
    ``(B, D, N, L)`` copies, one group per channel (D=384, N=16, L=4096: 138 ms against 80 ms chunked)."""
    time_invariant = u.shape[-1] > 1 and (B.stride(-1) == 0 or C.stride(-1) == 0)
    return (
        u.dtype != torch.float64 and A.shape[1] <= fused.MAX_D_STATE and not time_invariant and fused.use_fused(u)
    )


@torch.library.custom_op("vmamba::selective_scan", mutates_args=())
def _selective_scan_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    delta_softplus: bool,
    chunk_size: int,
    keep_checkpoints: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``out``, ``last_state`` and, on the fused path with ``keep_checkpoints``, the states its backward
    restarts from (an empty tensor otherwise)."""
    if _use_fused_kernel(u, A, B, C):
        with torch.autocast(u.device.type, enabled=False):
            out, last, marks = fused.fused_selective_scan_forward(
                u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, keep_checkpoints
            )
        return out.to(u.dtype), last.to(_compute_dtype(u)), marks
    out, last = _forward_impl(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size)
    return out, last, u.new_empty(0)


@_selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size, keep_checkpoints):
    last = u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=_compute_dtype(u))
    fused_marks = keep_checkpoints and _use_fused_kernel(u, A, B, C)
    marks = u.new_empty(fused.selective_checkpoints_shape(u, A, B) if fused_marks else (0,), dtype=torch.float32)
    return torch.empty_like(u), last, marks


@torch.library.custom_op("vmamba::selective_scan_backward", mutates_args=())
def _selective_scan_backward_op(
    grad_out: Tensor,
    grad_last_state: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    delta_softplus: bool,
    chunk_size: int,
    checkpoints: Tensor | None,
) -> list[Tensor]:
    if _use_fused_kernel(u, A, B, C):
        return fused.fused_selective_scan_backward(
            grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, checkpoints
        )
    return _backward_impl(
        grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size
    )


@_selective_scan_backward_op.register_fake
def _(grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size,
      checkpoints):
    return [
        torch.empty_like(x) if x is not None else u.new_empty(0)
        for x in (u, delta, A, B, C, D, z, delta_bias, initial_state)
    ]


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size, _ = inputs
    marks = output[2]
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, marks if marks.numel() else None)
    ctx.delta_softplus, ctx.chunk_size = delta_softplus, chunk_size


def _backward(ctx, grad_out: Tensor | None, grad_last: Tensor | None, _grad_marks: Tensor | None):
    u, delta, A, B, C, D, z, delta_bias, initial_state, marks = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(u)
    grads = torch.ops.vmamba.selective_scan_backward(
        grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, initial_state, ctx.delta_softplus, ctx.chunk_size,
        marks,
    )
    present = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return (*(g if x is not None else None for g, x in zip(grads, present)), None, None, None)


_selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


def _scan_macs(u, delta, A, B, C, D, z, *rest, **kwargs) -> int:
    return selective_scan_macs(u, A[1], with_d=D is not None, with_z=z is not None)


def _scan_backward_macs(grad_out, grad_last, u, delta, A, B, C, D, z, *rest, **kwargs) -> int:
    return BACKWARD_MAC_FACTOR * _scan_macs(u, delta, A, B, C, D, z)


register_macs(torch.ops.vmamba.selective_scan, _scan_macs)
register_macs(torch.ops.vmamba.selective_scan_backward, _scan_backward_macs)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan (mamba-ssm ``selective_scan_fn`` API): the fused C++ kernel when it is available,
    else the chunked PyTorch form with its explicit chunked backward (see the module docstring).

    Args:
        u, delta: ``(B, D, L)``, ``L >= 1``.
        A: ``(D, N)`` (negative for a decaying state).
        B, C: ``(B, N, L)``, grouped ``(B, G, N, L)``, or time-invariant ``(D, N)``.
        D, delta_bias: ``(D,)`` or None.
        z: ``(B, D, L)`` gate or None.
        delta_softplus: apply ``softplus`` to ``delta + delta_bias``.
        return_last_state: also return the state after the last token.
        initial_state: ``(B, D, N)`` state before the first token (zeros when None); differentiable.
        chunk_size: tokens per chunk; None picks :func:`default_chunk_size`. Results do not depend on it
            beyond float rounding.

    Returns:
        ``out (B, D, L)`` in ``u``'s dtype, and ``last_state (B, D, N)`` (float32; float64 for float64
        inputs) when ``return_last_state``.

    Raises:
        ValueError: on shapes that do not fit together, ``L == 0`` or a non-positive ``chunk_size``.

    Runs in float32 whatever the input dtype (autocast is switched off inside). FlopCounterMode counts
    it through the ``vmamba::selective_scan`` op, see :mod:`vmamba.ops.flops`. Second-order gradients are
    not supported.

    Example:
        >>> u = torch.randn(2, 8, 100); dt = torch.rand(2, 8, 100); A = -torch.rand(8, 4)
        >>> B = C = torch.randn(2, 4, 100)
        >>> selective_scan(u, dt, A, B, C).shape
        torch.Size([2, 8, 100])
    """
    B, C = _per_token(u, B, C)
    _check_inputs(u, delta, A, B, C)
    _check_optional(u, A, D, z, delta_bias, initial_state)
    if u.shape[-1] == 0:
        raise ValueError("selective_scan needs a sequence of length >= 1")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    # The fused kernel's forward keeps a few states for its backward, only worth it when one will run.
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, last, _ = torch.ops.vmamba.selective_scan(*tensors, delta_softplus, chunk_size or 0, keep)
    return (out, last) if return_last_state else out
