"""Gated linear attention (GLA) mixer: data-dependent per-key-channel decay, output gate, per-head norm.

How it maps onto the GLA layer (Yang et al., 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training") inside the multi-direction SSM layer, per direction:

* ``q, k = x W_q, x W_k`` with ``H`` heads of ``head_k_dim`` key channels; scale ``head_k_dim ** -0.5``.
* Values: the convolved ``x`` the layer hands over (its wide ``in_proj`` + depthwise conv play the role of
  ``W_v``, exactly as they feed Mamba's ``u``); ``H`` heads of ``C / H`` value channels. The layer's
  ``out_proj`` is the paper's ``W_O``.
* Decay: the paper's low-rank data-dependent gate ``alpha = sigmoid(x W_1 W_2 + b) ** (1 / tau)``, in log space
  ``g = logsigmoid(x W_1 W_2 + b) / tau`` with ``tau = gate_logit_normalizer`` (16) and rank
  ``gate_low_rank_dim`` (16).
* Output: ``LayerNorm`` per head (the paper's group norm) times the output gate ``swish(x W_r + b_r)``.
  With one parameter set per direction a full ``C x C`` ``W_r`` would cost ``K * C²`` per layer, so ``W_r`` is
  low rank (``output_gate_rank``, default ``ceil(dim_model / 32)``); ``0`` drops it.
* Sizes: 4 heads (the paper's and flash-linear-attention's default) of 16 key channels; ``vmamba_t_gla`` has
  about 8% more parameters than ``vmamba_t`` (the q/k projections dominate).
* Initialisation as flash-linear-attention's GLA layer: Xavier-uniform projections with gain ``2 ** -2.5``,
  zero biases, norm at (1, 0).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import gla, gla_mixing_matrix
from .base import MixerType, SequenceMixer, register_mixer

__all__ = ["GLAMixer"]


def _xavier_(weight: Tensor, gain: float) -> None:
    """Xavier-uniform for a per-direction weight ``(K, out, in)``."""
    fan_out, fan_in = weight.shape[-2:]
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    weight.uniform_(-bound, bound)


@register_mixer(MixerType.GLA)
class GLAMixer(SequenceMixer):
    """Gated linear attention mixer, one parameter set per direction.

    Parameters: ``qk_proj_weight (K, 2*H*dk, C)``, ``gk_proj_down (K, r, C)``, ``gk_proj_up (K, H*dk, r)``,
    ``gk_proj_bias (K, H*dk)``, ``g_proj_down (K, R, C)``, ``g_proj_up (K, C, R)``, ``g_proj_bias (K, C)``,
    ``norm_weight (K, C)``, ``norm_bias (K, C)``.

    Args:
        dim: channels ``C`` (the layer's ``d_inner``), split into ``num_heads`` value heads.
        num_directions: ``K``.
        num_heads: ``H``, must divide ``C``.
        head_k_dim: key channels per head ``dk``.
        gate_low_rank_dim: rank ``r`` of the decay gate.
        gate_logit_normalizer: ``tau``: ``g = logsigmoid(.) / tau``.
        output_gate_rank: rank ``R`` of the output gate; ``None`` means ``ceil(dim_model / 32)``, ``0`` none.
        dim_model: the block width (for the default output-gate rank); defaults to ``dim``.
        chunk_size: GLA chunk length.
        norm_eps: per-head LayerNorm epsilon.

    Shapes:
        ``(B, K, L, C) -> (B, K, L, C)``, causal along L.
    """

    def __init__(
        self,
        dim: int,
        num_directions: int,
        num_heads: int = 4,
        head_k_dim: int = 16,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        output_gate_rank: int | None = None,
        dim_model: int | None = None,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__(dim, num_directions)
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be positive and divide dim={dim}")
        if head_k_dim <= 0 or gate_low_rank_dim <= 0 or gate_logit_normalizer <= 0:
            raise ValueError(
                "head_k_dim, gate_low_rank_dim and gate_logit_normalizer must be positive, got "
                f"{head_k_dim}, {gate_low_rank_dim}, {gate_logit_normalizer}"
            )
        self.num_heads, self.head_k_dim = num_heads, head_k_dim
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        auto_rank = math.ceil((dim_model or dim) / 32)
        self.output_gate_rank = auto_rank if output_gate_rank is None else output_gate_rank
        if self.output_gate_rank < 0:
            raise ValueError(f"output_gate_rank must be >= 0, got {output_gate_rank}")
        self.chunk_size = chunk_size
        self.norm_eps = norm_eps
        k, c, key_dim, r = num_directions, dim, num_heads * head_k_dim, gate_low_rank_dim
        self.qk_proj_weight = nn.Parameter(torch.empty(k, 2 * key_dim, c))
        self.gk_proj_down = nn.Parameter(torch.empty(k, r, c))
        self.gk_proj_up = nn.Parameter(torch.empty(k, key_dim, r))
        self.gk_proj_bias = nn.Parameter(torch.empty(k, key_dim))
        if self.output_gate_rank:
            self.g_proj_down = nn.Parameter(torch.empty(k, self.output_gate_rank, c))
            self.g_proj_up = nn.Parameter(torch.empty(k, c, self.output_gate_rank))
            self.g_proj_bias = nn.Parameter(torch.empty(k, c))
        else:
            for name in ("g_proj_down", "g_proj_up", "g_proj_bias"):
                self.register_parameter(name, None)
        self.norm_weight = nn.Parameter(torch.empty(k, c))
        self.norm_bias = nn.Parameter(torch.empty(k, c))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        gain = 2**-2.5
        for weight in (self.qk_proj_weight, self.gk_proj_down, self.gk_proj_up, self.g_proj_down, self.g_proj_up):
            if weight is not None:
                _xavier_(weight, gain)
        for bias in (self.gk_proj_bias, self.g_proj_bias, self.norm_bias):
            if bias is not None:
                bias.zero_()
        self.norm_weight.fill_(1.0)

    def _qkg(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x (B, K, L, C) -> q, k, g (B, L, K*H, dk)``: directions become extra heads."""
        batch, k, length, _ = x.shape
        heads = (batch, length, k * self.num_heads, self.head_k_dim)
        q, kk = torch.einsum("bklc,kdc->blkd", x, self.qk_proj_weight).chunk(2, dim=-1)
        low = torch.einsum("bklc,krc->blkr", x, self.gk_proj_down)
        logits = torch.einsum("blkr,kdr->blkd", low, self.gk_proj_up) + self.gk_proj_bias
        g = F.logsigmoid(logits.float()) / self.gate_logit_normalizer
        return q.reshape(heads), kk.reshape(heads), g.reshape(heads)

    def forward(self, x: Tensor) -> Tensor:
        """x: ``(B, K, L, C)`` -> ``(B, K, L, C)``."""
        self.check_input(x)
        batch, k, length, c = x.shape
        q, kk, g = self._qkg(x)
        v = x.transpose(1, 2).reshape(batch, length, k * self.num_heads, c // self.num_heads)
        o, _ = gla(q, kk, v, g, chunk_size=self.chunk_size)
        o = o.view(batch, length, k, self.num_heads, o.shape[-1]).transpose(1, 2).float()  # (B, K, L, H, C/H)
        o = F.layer_norm(o, o.shape[-1:], eps=self.norm_eps).flatten(-2).to(x.dtype)
        o = o * self.norm_weight[:, None, :].to(x.dtype) + self.norm_bias[:, None, :].to(x.dtype)
        if self.g_proj_down is not None:
            gate = torch.einsum("bklr,kcr->bklc", torch.einsum("bklc,krc->bklr", x, self.g_proj_down), self.g_proj_up)
            o = o * F.silu(gate + self.g_proj_bias[:, None, :])
        return o

    def mixing_matrix(self, x: Tensor) -> Tensor:
        """``(B, K, L, C) -> (B, K, L, L)``: ``|M|`` of the GLA quadratic form averaged over heads (the norm and
        output gate act per token and are left out). One direction at a time, so memory stays at
        ``B * H * L²``."""
        self.check_input(x)
        q, kk, g = self._qkg(x)  # (B, L, K*H, dk)
        h = self.num_heads
        maps = []
        for d in range(self.num_directions):
            heads = slice(d * h, (d + 1) * h)
            maps.append(gla_mixing_matrix(q[:, :, heads], kk[:, :, heads], g[:, :, heads]).abs().mean(1))
        return torch.stack(maps, dim=1)
