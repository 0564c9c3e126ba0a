"""Mamba-2 (SSD) mixer: scalar decay per head, grouped B/C, D skip and a gated RMSNorm, per direction.

How it maps onto the Mamba-2 block (Dao & Gu, 2024) inside the multi-direction SSM layer:

* Mamba-2's ``in_proj`` produces ``[z, x, B, C, dt]`` from the block input and convolves ``[x, B, C]``.
  Here the surrounding layer already owns the wide input projection and the depthwise convolution (a
  spatial conv before scanning in VMamba, a causal conv per direction in Vim), and hands the mixer the
  convolved ``x``. The mixer owns the rest, per direction: ``x_proj`` for ``[dt, B, C]`` (computed from the
  convolved ``x``, so B and C see the same local context as in Mamba-2), ``dt_bias``, ``A_log``, ``D``, the
  gate ``z`` and the gated RMSNorm weight. No second depthwise conv: it would convolve the same tokens twice.
* ``z``: Mamba-2 projects it with a full ``C x C`` matrix; with one parameter set per direction that would be
  ``K * C²`` parameters per layer (a third of VMamba-T again), so ``z`` is a low-rank projection
  (``gate_rank``, default ``ceil(dim_model / 32)``); ``gate_rank=0`` drops the gate (plain RMSNorm).
* Sizes: head dim 32 and d_state 64 (one B/C group) as in the SSD benchmark; with the rank-C/32 gate,
  ``vmamba_t_mamba2`` has about 7.6% more parameters than ``vmamba_t`` (the B/C projections dominate).
* Gated RMSNorm as in Mamba-2 (``norm_before_gate=False``): ``rmsnorm(y * silu(z)) * weight`` over groups of
  ``C / ngroups`` channels.
* Initialisation as in Mamba-2: ``A = -U(1, 16)`` per head, ``dt`` log-uniform in ``[dt_min, dt_max]`` through an
  inverse-softplus bias, ``D = 1``, norm weight 1; projections like ``nn.Linear``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import ssd, ssd_mixing_matrix
from .base import MixerType, SequenceMixer, register_mixer

__all__ = ["Mamba2Mixer"]


@register_mixer(MixerType.MAMBA2)
class Mamba2Mixer(SequenceMixer):
    """Mamba-2 (SSD) mixer, one parameter set per direction.

    Parameters: ``x_proj_weight (K, H + 2GN, C)`` (split ``[dt, B, C]``), ``dt_bias (K, H)``, ``A_log (K, H)``,
    ``D (K, H)``, ``z_proj_down (K, R, C)``, ``z_proj_up (K, C, R)``, ``norm_weight (K, C)``.

    Args:
        dim: channels ``C`` (the layer's ``d_inner``); ``H = C / head_dim`` heads.
        num_directions: ``K``.
        d_state: ``N``.
        head_dim: ``P``, must divide ``C``.
        ngroups: ``G`` groups sharing B and C, must divide ``H``.
        gate_rank: rank ``R`` of the z projection; ``None`` means ``ceil(dim_model / 32)``, ``0`` no gate.
        dim_model: the block width (for the default gate rank); defaults to ``dim``.
        chunk_size: SSD chunk length.
        A_init_range: ``A = -U(A_init_range)``.
        dt_min, dt_max, dt_init_floor: dt initialisation.
        norm_eps: RMSNorm epsilon.

    Shapes:
        ``(B, K, L, C) -> (B, K, L, C)``, causal along L.
    """

    def __init__(
        self,
        dim: int,
        num_directions: int,
        d_state: int = 64,
        head_dim: int = 32,
        ngroups: int = 1,
        gate_rank: int | None = None,
        dim_model: int | None = None,
        chunk_size: int = 64,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__(dim, num_directions)
        if d_state <= 0 or head_dim <= 0 or ngroups <= 0:
            raise ValueError(f"d_state, head_dim and ngroups must be positive, got {d_state}, {head_dim}, {ngroups}")
        if dim % head_dim != 0:
            raise ValueError(f"head_dim={head_dim} must divide dim={dim}")
        self.num_heads = dim // head_dim
        if self.num_heads % ngroups != 0:
            raise ValueError(f"ngroups={ngroups} must divide the number of heads {self.num_heads}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must be 0 < low <= high, got {A_init_range}")
        self.d_state, self.head_dim, self.ngroups = d_state, head_dim, ngroups
        self.gate_rank = math.ceil((dim_model or dim) / 32) if gate_rank is None else gate_rank
        if self.gate_rank < 0:
            raise ValueError(f"gate_rank must be >= 0, got {gate_rank}")
        self.chunk_size = chunk_size
        self.norm_eps = norm_eps
        k, c, h = num_directions, dim, self.num_heads
        self.x_proj_weight = nn.Parameter(torch.empty(k, h + 2 * ngroups * d_state, c))
        self.dt_bias = nn.Parameter(torch.empty(k, h))
        self.A_log = nn.Parameter(torch.empty(k, h))
        self.D = nn.Parameter(torch.empty(k, h))
        if self.gate_rank:
            self.z_proj_down = nn.Parameter(torch.empty(k, self.gate_rank, c))
            self.z_proj_up = nn.Parameter(torch.empty(k, c, self.gate_rank))
        else:
            self.register_parameter("z_proj_down", None)
            self.register_parameter("z_proj_up", None)
        self.norm_weight = nn.Parameter(torch.empty(k, c))
        self._init = (A_init_range, dt_min, dt_max, dt_init_floor)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        (a_low, a_high), dt_min, dt_max, dt_init_floor = self._init
        bound = self.dim**-0.5  # nn.Linear's default for a C-input projection
        self.x_proj_weight.uniform_(-bound, bound)
        dt = torch.exp(
            torch.rand_like(self.dt_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(a_low, a_high)))
        self.D.fill_(1.0)
        if self.z_proj_down is not None:
            self.z_proj_down.uniform_(-bound, bound)
            self.z_proj_up.uniform_(-(self.gate_rank**-0.5), self.gate_rank**-0.5)
        self.norm_weight.fill_(1.0)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x (B, K, L, C) -> dt (B, L, K*H), B and C (B, L, K*G, N)``: directions become extra heads/groups."""
        batch, k, length, _ = x.shape
        proj = torch.einsum("bklc,kdc->blkd", x, self.x_proj_weight)
        dt, b, c = proj.split([self.num_heads, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        groups = (batch, length, k * self.ngroups, self.d_state)
        return dt.reshape(batch, length, k * self.num_heads), b.reshape(groups), c.reshape(groups)

    def _gated_norm(self, y: Tensor, x: Tensor) -> Tensor:
        """``rmsnorm(y * silu(z)) * weight`` over groups of ``C / G`` channels; ``y, x: (B, K, L, C)``."""
        if self.z_proj_down is not None:
            z = torch.einsum("bklr,kcr->bklc", torch.einsum("bklc,krc->bklr", x, self.z_proj_down), self.z_proj_up)
            y = y * F.silu(z)
        grouped = y.unflatten(-1, (self.ngroups, -1)).float()
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        return grouped.flatten(-2).to(y.dtype) * self.norm_weight[:, None, :].to(y.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x: ``(B, K, L, C)`` -> ``(B, K, L, C)``."""
        self.check_input(x)
        batch, k, length, c = x.shape
        dt, b, cc = self._project(x)
        heads = x.transpose(1, 2).reshape(batch, length, k * self.num_heads, self.head_dim)
        y = ssd(
            heads, dt, -torch.exp(self.A_log.float()).flatten(), b, cc,
            chunk_size=self.chunk_size, D=self.D.flatten(), dt_bias=self.dt_bias.flatten(), dt_softplus=True,
        )
        y = y.reshape(batch, length, k, c).transpose(1, 2)
        return self._gated_norm(y, x)

    def mixing_matrix(self, x: Tensor) -> Tensor:
        """``(B, K, L, C) -> (B, K, L, L)``: ``|M|`` of the SSD quadratic form averaged over heads (D skip on
        the diagonal; the gate and norm act per token and are left out). One direction at a time, so memory
        stays at ``B * H * L²``."""
        self.check_input(x)
        batch, k, length, _ = x.shape
        dt, b, c = self._project(x)
        A = -torch.exp(self.A_log.float())
        h, g = self.num_heads, self.ngroups
        maps = []
        for d in range(k):
            heads, groups = slice(d * h, (d + 1) * h), slice(d * g, (d + 1) * g)
            mix = ssd_mixing_matrix(dt[..., heads], A[d], b[:, :, groups], c[:, :, groups], self.dt_bias[d], True)
            mix = mix + torch.diag_embed(self.D[d].to(mix.dtype)[None, :, None].expand(batch, -1, length))
            maps.append(mix.abs().mean(1))
        return torch.stack(maps, dim=1)
