"""RetNet mixer: multi-scale retention with rotary positions, per-head group norm and a swish gate.

How it maps onto multi-scale retention (Sun et al., 2023, "Retentive Network: A Successor to Transformer
for Large Language Models") inside the multi-direction SSM layer, per direction:

* ``q, k = x W_Q, x W_K`` with ``H`` heads of ``head_k_dim`` key channels, rotated by position along the scan
  (the paper's ``Theta_n = e^{i n theta}``, applied as rotary pairs with ``theta = 10000^-linspace(0, 1)``);
  scale ``head_k_dim ** -0.5``.
* Decay: fixed, one per head, ``gamma_h = 1 - 2^(-5-h)`` (multi-scale), the same in every direction.
* Values: the convolved ``x`` the layer hands over (its ``in_proj`` + depthwise conv play ``W_V``, as they
  feed Mamba's ``u``); ``H`` heads of ``C / H`` channels. The layer's ``out_proj`` is the paper's ``W_O``.
* Output: ``GroupNorm`` over each head's channels (affine per direction), times ``swish(x W_G)``. A full
  ``C x C`` ``W_G`` per direction would cost ``K * C²`` per layer, so ``W_G`` is low rank
  (``gate_rank``, default ``ceil(dim_model / 32)``); ``0`` drops the gate.
* Initialisation as flash-linear-attention's retention layer: Xavier-uniform projections with gain
  ``2 ** -2.5``; norm at (1, 0).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import retention, retention_mixing_matrix
from .base import MixerType, SequenceMixer, register_mixer

__all__ = ["RetNetMixer", "rotary"]


def _xavier_(weight: Tensor, gain: float) -> None:
    """Xavier-uniform for a per-direction weight ``(K, out, in)``."""
    fan_out, fan_in = weight.shape[-2:]
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    weight.uniform_(-bound, bound)


def rotary(x: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate channel pairs ``(2i, 2i+1)`` of ``x (..., L, H, D)`` by ``t * theta_i`` (``t`` the position).

    ``theta_i = base ** -linspace(0, 1, D/2)`` as in RetNet's xPos rotation; an odd last channel is kept.
    """
    length, dim = x.shape[-3], x.shape[-1]
    pairs = dim // 2
    if pairs == 0:
        return x
    theta = base ** -torch.linspace(0, 1, pairs, device=x.device, dtype=torch.float64)
    angle = torch.arange(length, device=x.device, dtype=torch.float64)[:, None] * theta  # (L, D/2)
    cos, sin = (f(angle).to(x.dtype)[:, None, :] for f in (torch.cos, torch.sin))  # (L, 1, D/2)
    even, odd = x[..., 0 : 2 * pairs : 2], x[..., 1 : 2 * pairs : 2]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., 2 * pairs :]], dim=-1)


@register_mixer(MixerType.RETNET)
class RetNetMixer(SequenceMixer):
    """Multi-scale retention mixer, one parameter set per direction.

    Parameters: ``qk_proj_weight (K, 2*H*dk, C)``, ``g_proj_down (K, R, C)``, ``g_proj_up (K, C, R)``,
    ``norm_weight (K, C)``, ``norm_bias (K, C)``.

    Args:
        dim: channels ``C`` (the layer's ``d_inner``), split into ``num_heads`` value heads.
        num_directions: ``K``.
        num_heads: ``H``, must divide ``C``; head ``h`` decays by ``1 - 2^(-5-h)``.
        head_k_dim: key channels per head ``dk``.
        gate_rank: rank ``R`` of the swish gate; ``None`` means ``ceil(dim_model / 32)``, ``0`` no gate.
        use_rotary: rotate q and k by position along the scan (RetNet's xPos rotation).
        dim_model: the block width (for the default gate rank); defaults to ``dim``.
        chunk_size: retention chunk length.
        norm_eps: group-norm epsilon.

    Shapes:
        ``(B, K, L, C) -> (B, K, L, C)``, causal along L.

    Example:
        >>> mixer = RetNetMixer(64, 4)
        >>> mixer(torch.randn(2, 4, 49, 64)).shape
        torch.Size([2, 4, 49, 64])
    """

    def __init__(
        self,
        dim: int,
        num_directions: int,
        num_heads: int = 4,
        head_k_dim: int = 16,
        gate_rank: int | None = None,
        use_rotary: bool = True,
        dim_model: int | None = None,
        chunk_size: int = 32,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__(dim, num_directions)
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be positive and divide dim={dim}")
        if head_k_dim <= 0:
            raise ValueError(f"head_k_dim must be positive, got {head_k_dim}")
        self.num_heads, self.head_k_dim = num_heads, head_k_dim
        self.gate_rank = math.ceil((dim_model or dim) / 32) if gate_rank is None else gate_rank
        if self.gate_rank < 0:
            raise ValueError(f"gate_rank must be >= 0, got {gate_rank}")
        self.use_rotary = use_rotary
        self.chunk_size = chunk_size
        self.norm_eps = norm_eps
        k, c = num_directions, dim
        self.qk_proj_weight = nn.Parameter(torch.empty(k, 2 * num_heads * head_k_dim, c))
        if self.gate_rank:
            self.g_proj_down = nn.Parameter(torch.empty(k, self.gate_rank, c))
            self.g_proj_up = nn.Parameter(torch.empty(k, c, self.gate_rank))
        else:
            self.register_parameter("g_proj_down", None)
            self.register_parameter("g_proj_up", None)
        self.norm_weight = nn.Parameter(torch.empty(k, c))
        self.norm_bias = nn.Parameter(torch.empty(k, c))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for weight in (self.qk_proj_weight, self.g_proj_down, self.g_proj_up):
            if weight is not None:
                _xavier_(weight, 2**-2.5)
        self.norm_weight.fill_(1.0)
        self.norm_bias.zero_()

    def _qk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, K, L, C) -> q, k (B*K, L, H, dk)``: directions fold into the batch (the decays depend on
        the head index, so directions cannot become extra heads)."""
        batch, k, length, _ = x.shape
        qk = torch.einsum("bklc,kdc->bkld", x, self.qk_proj_weight)
        qk = qk.reshape(batch * k, length, 2, self.num_heads, self.head_k_dim)
        q, kk = qk.unbind(2)
        if self.use_rotary:
            q, kk = rotary(q), rotary(kk)
        return q, kk

    def forward(self, x: Tensor) -> Tensor:
        """x: ``(B, K, L, C)`` -> ``(B, K, L, C)``."""
        self.check_input(x)
        batch, k, length, c = x.shape
        q, kk = self._qk(x)
        v = x.reshape(batch * k, length, self.num_heads, c // self.num_heads)
        o, _ = retention(q, kk, v, chunk_size=self.chunk_size)
        # group norm (one group per head) in at least float32, also under bf16 autocast
        o = F.layer_norm(o.to(torch.promote_types(o.dtype, torch.float32)), o.shape[-1:], eps=self.norm_eps)
        o = o.reshape(batch, k, length, c).to(x.dtype)
        o = o * self.norm_weight[:, None, :].to(x.dtype) + self.norm_bias[:, None, :].to(x.dtype)
        if self.g_proj_down is not None:
            gate = torch.einsum("bklr,kcr->bklc", torch.einsum("bklc,krc->bklr", x, self.g_proj_down), self.g_proj_up)
            o = o * F.silu(gate)
        return o

    def mixing_matrix(self, x: Tensor) -> Tensor:
        """``(B, K, L, C) -> (B, K, L, L)``: ``|M|`` of the retention quadratic form averaged over heads (the
        norm and gate act per token and are left out)."""
        self.check_input(x)
        q, kk = self._qk(x)
        mix = retention_mixing_matrix(q, kk)  # (B*K, H, L, L)
        return mix.abs().mean(1).unflatten(0, (x.shape[0], self.num_directions))
