"""Mamba (S6) mixer: per-direction x_proj / dt_proj / A / D around the selective scan."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops import selective_scan
from .base import MixerType, SequenceMixer, register_mixer

__all__ = ["MambaMixer"]


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

    def mixing_matrix(self, x: Tensor) -> Tensor:
        """``x: (B, K, L, C) -> (B, K, L, L)``: mean over the C channels of ``|M|``, where ``M`` is each channel's
        semi-separable mixing matrix (:func:`vmamba.ops.selective_scan_mixing_matrix`, the D skip on its diagonal):
        ``forward(x)[b, k, t, c] == sum_s M_c[b, k, t, s] x[b, k, s, c]``. Costs ``O(B K C L^2)`` time."""
        from ..ops import selective_scan_mixing_matrix  # local: this method is the only user in this module

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
