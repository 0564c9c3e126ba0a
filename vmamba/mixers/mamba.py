"""Mamba (S6) mixer: per-direction x_proj / dt_proj / A / D around the selective scan."""
from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor, nn

from ..constant_cache import cached_constant
from ..cross_scan import ScanPattern, cross_scan
from ..ops import linear, selective_scan
from ..ops.cross2d_scan import cross2d_selective_scan
from ..ops.fused import ScanBackend, fused_multi_scan, scan_backend, use_fused
from .base import MixerType, SequenceMixer, register_mixer

__all__ = ["MambaMixer", "MapPath"]


class MapPath(str, Enum):
    """How :meth:`MambaMixer.forward_map` runs on a whole map.

    ``fused``: the compiled multi-direction kernel (:mod:`vmamba.ops.fused`; any pattern and ``d_state``,
    with autograd), when it is available and enabled. ``torch_cross2d``: the pure-PyTorch in-place
    four-direction scan (:func:`vmamba.ops.cross2d_scan.cross2d_selective_scan`; ``cross2d``, ``d_state = 1``,
    inference only). ``generic``: none of these; the layer materialises the direction sequences and calls
    :meth:`MambaMixer.forward` (the differentiable chunked scan).
    """

    FUSED = "fused"
    TORCH_CROSS2D = "torch_cross2d"
    GENERIC = "generic"


def _direction_index(spatial: tuple[int, ...], pattern: ScanPattern) -> Tensor:
    """``(K, L)`` int64: the map row (row-major token index) direction ``k`` visits at step ``t`` (cached per
    map size, see :func:`vmamba.constant_cache.cached_constant`)."""

    def build() -> Tensor:
        order = torch.arange(math.prod(spatial), dtype=torch.float64).view(1, 1, *spatial)
        return cross_scan(order, pattern)[0, :, :, 0].round().long()

    return cached_constant(("direction_index", tuple(spatial), pattern), build)


@register_mixer(MixerType.MAMBA)
class MambaMixer(SequenceMixer):
    """Selective state-space mixer (Mamba S6), one parameter set per direction.

    Parameters (names follow the official VMamba SS2D so checkpoints map one to one):
    ``x_proj_weight (K, R + 2N, C)``, ``dt_projs_weight (K, C, R)``, ``dt_projs_bias (K, C)``,
    ``A_logs (K*C, N)``, ``Ds (K*C,)``.

    Args:
        dim: channels ``C`` (``d_inner`` of the layer).
        num_directions: ``K``.
        d_state: ``N``.
        dt_rank: ``R``; ``None`` means ``ceil(dim_model / 16)`` with ``dim_model`` given, else ``ceil(C / 16)``.
        dim_model: the block width used for the ``auto`` dt rank (VMamba/Vim use ``ceil(d_model / 16)``).
        dt_min, dt_max, dt_init_floor, dt_scale: the official dt initialisation.
    """

    def __init__(
        self,
        dim: int,
        num_directions: int,
        d_state: int = 16,
        dt_rank: int | None = None,
        dim_model: int | None = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
    ) -> None:
        super().__init__(dim, num_directions)
        if d_state <= 0:
            raise ValueError(f"d_state must be positive, got {d_state}")
        self.d_state = d_state
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil((dim_model or dim) / 16)
        k, c, r, n = num_directions, dim, self.dt_rank, d_state
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, c))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, c, r))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, c))
        self.A_logs = nn.Parameter(torch.empty(k * c, n))
        self.Ds = nn.Parameter(torch.empty(k * c))
        # mamba-ssm / VMamba convention: no weight decay on the state matrix and the skip
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        self._dt_init = (dt_min, dt_max, dt_init_floor, dt_scale)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        dt_min, dt_max, dt_init_floor, dt_scale = self._dt_init
        bound = 1.0 / math.sqrt(self.dim)  # nn.Linear's default for x_proj
        self.x_proj_weight.uniform_(-bound, bound)
        dt_std = self.dt_rank**-0.5 * dt_scale
        self.dt_projs_weight.uniform_(-dt_std, dt_std)
        dt = torch.exp(
            torch.rand(self.num_directions, self.dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_logs.copy_(torch.log(a).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        """x: ``(B, K, L, C)`` -> ``(B, K, L, C)``."""
        self.check_input(x)
        batch, k, length, c = x.shape
        r, n = self.dt_rank, self.d_state
        x_dbl = torch.einsum("bklc,kdc->bkdl", x, self.x_proj_weight)  # (B, K, R+2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,kcr->bkcl", dts, self.dt_projs_weight)  # (B, K, C, L)
        u = x.transpose(2, 3).reshape(batch, k * c, length)
        y = selective_scan(
            u,
            dts.reshape(batch, k * c, length),
            -torch.exp(self.A_logs.float()),
            Bs.contiguous(),
            Cs.contiguous(),
            D=self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
        )
        return y.view(batch, k, c, length).transpose(2, 3)

    def map_path(self, x: Tensor, pattern: ScanPattern) -> MapPath:
        """Which path :meth:`forward_map` takes for the channel-last map ``x`` (see :class:`MapPath`).

        The compiled kernel whenever it is available and enabled (:func:`vmamba.ops.fused.use_fused`): with
        the d_state=1 kernel it measured faster than the pure-PyTorch cross2d scan at every VMamba-T stage
        (56² to 7², batch 1 and 8, one thread: 0.4-0.96x its time), and it also runs with gradients. Else,
        for inference with ``cross2d`` and ``d_state = 1``, the pure-PyTorch in-place scan (no compiler
        needed); it also keeps float64 inference in float64 under ``auto``, since the kernel computes in
        float32. Else the generic path.
        """
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        torch_cross2d = pattern is ScanPattern.CROSS2D and self.d_state == 1 and not needs_grad
        keep_float64 = x.dtype == torch.float64 and scan_backend() is not ScanBackend.FUSED
        if not (torch_cross2d and keep_float64) and use_fused(x):
            return MapPath.FUSED
        if torch_cross2d:
            return MapPath.TORCH_CROSS2D
        return MapPath.GENERIC

    def forward_map(self, x: Tensor, pattern: ScanPattern) -> Tensor | None:
        """``cross_merge(self(cross_scan(x)))`` on a channel-last map ``x: (B, *spatial, C)`` without the
        direction copies, or ``None`` when only the generic path applies (see :meth:`map_path`)."""
        path = self.map_path(x, pattern)
        if path is MapPath.GENERIC:
            return None
        k, c, r, n = self.num_directions, self.dim, self.dt_rank, self.d_state
        A = -torch.exp(self.A_logs.float()).view(k, c, n)
        if path is MapPath.TORCH_CROSS2D:
            return cross2d_selective_scan(
                x, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, A[..., 0], self.Ds.view(k, c)
            )
        spatial = x.shape[1:-1]
        u = x.reshape(x.shape[0], math.prod(spatial), c)  # (B, L, C) map rows
        x_dbl = linear(u, self.x_proj_weight.reshape(k * (r + 2 * n), c)).unflatten(-1, (k, r + 2 * n))
        dts, Bs, Cs = torch.split(x_dbl, [r, n, n], dim=-1)  # (B, L, K, *)
        # The kernel computes delta = dt_projs_weight[k] @ dts (the dt projection) tile by tile and adds the
        # D skips (sum over directions of D_k u): neither delta nor its gradient is materialised.
        y, _ = fused_multi_scan(
            u, dts, A.transpose(1, 2), Bs.unsqueeze(3), Cs.unsqueeze(3), _direction_index(spatial, pattern),
            delta_bias=self.dt_projs_bias, delta_softplus=True, D=self.Ds.view(k, c), dt_weight=self.dt_projs_weight,
        )
        return y.to(x.dtype).view(x.shape)

    def mixing_matrix(self, x: Tensor) -> Tensor:
        """``x: (B, K, L, C) -> (B, K, L, L)``: mean over the C channels of ``|M|``, where ``M`` is each channel's
        semi-separable mixing matrix (:func:`vmamba.ops.selective_scan_mixing_matrix`, the D skip on its diagonal):
        ``forward(x)[b, k, t, c] == sum_s M_c[b, k, t, s] x[b, k, s, c]``. Costs ``O(B K C L^2)`` time."""
        from ..ops import (
            selective_scan_mixing_matrix,  # local: this method is the only user in this module
        )

        self.check_input(x)
        batch, k, length, c = x.shape
        r, n = self.dt_rank, self.d_state
        x_dbl = torch.einsum("bklc,kdc->bkdl", x, self.x_proj_weight)  # (B, K, R+2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,kcr->bkcl", dts, self.dt_projs_weight)  # (B, K, C, L)
        A = -torch.exp(self.A_logs.float()).view(k, c, n)
        Ds, bias = self.Ds.float().view(k, c), self.dt_projs_bias.float()
        total = x.new_zeros(batch, k, length, length, dtype=torch.float32)
        step = max(1, (1 << 24) // (batch * length * length * n))  # channels per block: bounded temporaries
        for i in range(k):
            for start in range(0, c, step):
                cs = slice(start, min(start + step, c))
                m = selective_scan_mixing_matrix(
                    dts[:, i, cs], A[i, cs], Bs[:, i], Cs[:, i], Ds[i, cs], bias[i, cs], delta_softplus=True
                )
                total[:, i] += m.abs().sum(1)
        return total / c
