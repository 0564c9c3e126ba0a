"""Mamba (S6) selective scan.

``h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t``, ``y_t = <C_t, h_t> + D * u_t``,
optionally ``y_t *= silu(z_t)``; ``delta = softplus(delta + delta_bias)`` when ``delta_softplus``.

Layouts follow mamba-ssm's ``selective_scan_fn``:
``u, delta, z: (B, D, L)``; ``A: (D, N)``; ``B, C: (B, N, L)`` or grouped ``(B, G, N, L)`` where group
``g`` serves channels ``g * D/G ... (g+1) * D/G - 1``; ``D: (D,)``; ``delta_bias: (D,)``.
The state is ``(B, D, N)``. Everything is accumulated in float32; the output has ``u``'s dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["selective_scan_ref", "selective_scan_step"]


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


def expand_groups(t: Tensor, dim: int) -> Tensor:
    """``(B, N, L)`` or ``(B, G, N, L)`` -> ``(B, D, N, L)`` (a view where possible)."""
    if t.dim() == 3:
        return t.unsqueeze(1).expand(t.shape[0], dim, *t.shape[1:])
    groups = t.shape[1]
    return t.repeat_interleave(dim // groups, dim=1)


def prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float().view(-1, *([1] * (delta.dim() - 2)))
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


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
    _check_inputs(u, delta, A, B, C)
    batch, dim, length = u.shape
    dtype_in = u.dtype
    delta = prepare_delta(delta, delta_bias, delta_softplus)
    u32, A32 = u.float(), A.float()
    Bf, Cf = expand_groups(B.float(), dim), expand_groups(C.float(), dim)  # (B, D, N, L)
    state = (
        u32.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.float()
    )
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]
        state = torch.exp(dt * A32) * state + dt * Bf[..., t] * u32[:, :, t, None]
        ys.append((state * Cf[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u32.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + u32 * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(dtype_in)
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
