"""RWKV-7 ("Goose") mixer: token shift, LoRA decay / in-context rate / value / gate paths, normalised keys,
the generalized delta rule, per-head group norm and the bonus term.

How it maps onto RWKV-7 time mixing (Peng et al., 2025, "RWKV-7 'Goose' with Expressive Dynamic State
Evolution"; flash-linear-attention's ``RWKV7Attention``) inside the multi-direction SSM layer, per direction:

* Token shift along the scan: ``x_* = x + (x_{t-1} - x) * mu_*`` for ``* in r, w, k, v, a, g`` (zero before
  the first token), ``mu`` per channel.
* ``r = x_r W_r``, ``k = x_k W_k``: ``H`` heads of ``head_k_dim`` key channels.
* Decay (LoRA, tanh): ``w = -e^{-1/2} * sigmoid(w_0 + tanh(x_w W_w1) W_w2)``, a log-decay in ``(-0.607, 0)``.
* In-context learning rate (LoRA): ``iclr = sigmoid(a_0 + x_a W_a1 W_a2)``.
* Normalised key ``kk = L2norm(k * k_k)`` per head; the key itself becomes ``k * (1 + (iclr - 1) * k_a)``;
  the state update uses ``a = -kk``, ``b = kk * iclr`` (the generalized delta rule of :func:`vmamba.ops.rwkv7`).
* Values: the layer's ``in_proj`` + depthwise conv play ``W_v`` (as they feed Mamba's ``u``), so the value is the
  token-shifted ``x_v`` (``H`` heads of ``C / H`` channels). Value residual (LoRA):
  ``v = lerp(x_v, v_first, sigmoid(v_0 + x_v W_v1 W_v2))``. RWKV-7's ``v_first`` is the first layer's value; a
  mixer sees only its own block, so here it is the block's own un-shifted input ``x`` — the learned,
  data-dependent blend between the shifted and the current value.
* Output: ``GroupNorm`` per head (eps ``head_v_dim * 1e-5`` as RWKV-7), plus the bonus term
  ``((r * k * r_k).sum() per head) * v``, times the gate ``g = sigmoid(x_g W_g1) W_g2``. The layer's
  ``out_proj`` is RWKV-7's ``W_o``.
* Sizes: the LoRA ranks default to ``ceil(dim_model / 32)`` (RWKV-7 scales them with ``sqrt(C)``, which
  with one parameter set per direction would outgrow the Mamba mixer it replaces); 4 heads of 8 key channels.
* Initialisation: RWKV-7's, taken at mid depth (a mixer does not know its layer index): the token-shift
  ``mu`` ramps, ``w_0`` / ``a_0`` / ``v_0`` ramps and zigzags, ``k_k = 0.71 - 0.1 * linear``, ``k_a = 1.02``,
  ``r_k = -0.04``, LoRA down-projections zero and up-projections orthogonal * 0.1, orthogonal ``W_r`` and
  ``W_k`` (gain 0.1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import rwkv7, rwkv7_mixing_matrix
from .base import MixerType, SequenceMixer, register_mixer

__all__ = ["RWKV7Mixer"]

# -exp(-1/2): the most negative log-decay RWKV-7 allows (decay >= 0.545 per step).
_MAX_LOG_DECAY = -math.exp(-0.5)
# Which token-shift mix serves which path, in the order of ``shift_mix``.
_PATHS = ("r", "w", "k", "v", "a", "g")
# Depth fraction the RWKV-7 initialisation is evaluated at (it depends on the layer index).
_INIT_DEPTH = 0.5


def _orthogonal_(weight: Tensor, gain: float) -> None:
    """Orthogonal init of each direction's ``(out, in)`` slice of a ``(K, out, in)`` weight."""
    for w in weight:
        nn.init.orthogonal_(w, gain=gain)


@register_mixer(MixerType.RWKV7)
class RWKV7Mixer(SequenceMixer):
    """RWKV-7 time mixing, one parameter set per direction.

    Parameters (``D = H * dk``): ``shift_mix (K, 6, C)``; ``r_proj_weight, k_proj_weight (K, D, C)``;
    ``w_down (K, Rw, C)``, ``w_up (K, D, Rw)``, ``w_bias (K, D)``; ``a_down (K, Ra, C)``, ``a_up (K, D, Ra)``,
    ``a_bias (K, D)``; ``v_down (K, Rv, C)``, ``v_up (K, C, Rv)``, ``v_bias (K, C)``; ``g_down (K, Rg, C)``,
    ``g_up (K, C, Rg)``; ``k_k, k_a (K, D)``; ``r_k (K, H, dk)``; ``norm_weight, norm_bias (K, C)``.

    Args:
        dim: channels ``C`` (the layer's ``d_inner``), split into ``num_heads`` value heads.
        num_directions: ``K``.
        num_heads: ``H``, must divide ``C``.
        head_k_dim: key channels per head ``dk``.
        decay_rank, iclr_rank, value_rank, gate_rank: LoRA ranks; ``None`` means ``ceil(dim_model / 32)``.
        dim_model: the block width (for the default ranks); defaults to ``dim``.
        chunk_size: chunk length of the generalized delta rule.
        norm_eps: group-norm epsilon per value channel (RWKV-7 uses ``head_v_dim * 1e-5``).

    Shapes:
        ``(B, K, L, C) -> (B, K, L, C)``, causal along L.

    Example:
        >>> mixer = RWKV7Mixer(64, 4)
        >>> mixer(torch.randn(2, 4, 49, 64)).shape
        torch.Size([2, 4, 49, 64])
    """

    def __init__(
        self,
        dim: int,
        num_directions: int,
        num_heads: int = 4,
        head_k_dim: int = 8,
        decay_rank: int | None = None,
        iclr_rank: int | None = None,
        value_rank: int | None = None,
        gate_rank: int | None = None,
        dim_model: int | None = None,
        chunk_size: int = 16,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__(dim, num_directions)
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be positive and divide dim={dim}")
        if head_k_dim <= 0:
            raise ValueError(f"head_k_dim must be positive, got {head_k_dim}")
        auto = math.ceil((dim_model or dim) / 32)
        ranks = {"decay_rank": decay_rank, "iclr_rank": iclr_rank, "value_rank": value_rank, "gate_rank": gate_rank}
        ranks = {name: auto if value is None else value for name, value in ranks.items()}
        for name, value in ranks.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.num_heads, self.head_k_dim = num_heads, head_k_dim
        self.decay_rank, self.iclr_rank = ranks["decay_rank"], ranks["iclr_rank"]
        self.value_rank, self.gate_rank = ranks["value_rank"], ranks["gate_rank"]
        self.chunk_size = chunk_size
        self.norm_eps = norm_eps
        k, c, d = num_directions, dim, num_heads * head_k_dim
        p = lambda *shape: nn.Parameter(torch.empty(*shape))  # noqa: E731
        self.shift_mix = p(k, len(_PATHS), c)
        self.r_proj_weight, self.k_proj_weight = p(k, d, c), p(k, d, c)
        self.w_down, self.w_up, self.w_bias = p(k, self.decay_rank, c), p(k, d, self.decay_rank), p(k, d)
        self.a_down, self.a_up, self.a_bias = p(k, self.iclr_rank, c), p(k, d, self.iclr_rank), p(k, d)
        self.v_down, self.v_up, self.v_bias = p(k, self.value_rank, c), p(k, c, self.value_rank), p(k, c)
        self.g_down, self.g_up = p(k, self.gate_rank, c), p(k, c, self.gate_rank)
        self.k_k, self.k_a = p(k, d), p(k, d)
        self.r_k = p(k, num_heads, head_k_dim)
        self.norm_weight, self.norm_bias = p(k, c), p(k, c)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        c, d, dk = self.dim, self.num_heads * self.head_k_dim, self.head_k_dim
        depth, keep = _INIT_DEPTH, 1.0 - _INIT_DEPTH  # RWKV-7's ratio_0_to_1 and ratio_1_to_almost0
        ddd = torch.arange(c, dtype=torch.float32) / c
        powers = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}
        for i, path in enumerate(_PATHS):
            self.shift_mix[:, i] = 1.0 - ddd.pow(powers[path] * keep)
        n = torch.arange(d, dtype=torch.float32)
        linear_d = n / max(d - 1, 1) - 0.5
        zigzag = ((n % dk) - (dk - 1) / 2) / max((dk - 1) / 2, 1)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / max(d - 1, 1)) ** (1 + depth**0.3)
        self.w_bias.copy_(www + 0.5 + zigzag * 2.5)
        self.a_bias.copy_(-0.19 + zigzag * 0.3 + linear_d * 0.4)
        self.v_bias.copy_(0.73 - (torch.arange(c, dtype=torch.float32) / max(c - 1, 1) - 0.5) * 0.4)
        self.k_k.copy_(0.71 - linear_d * 0.1)
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        for down, up in ((self.w_down, self.w_up), (self.a_down, self.a_up), (self.v_down, self.v_up),
                         (self.g_down, self.g_up)):
            down.zero_()
            out_dim, rank = up.shape[-2:]
            _orthogonal_(up, 0.1 * (math.sqrt(rank / out_dim) if rank > out_dim else 1.0))
        _orthogonal_(self.r_proj_weight, 1.0)
        _orthogonal_(self.k_proj_weight, 0.1)
        self.norm_weight.fill_(depth**0.7)
        self.norm_bias.zero_()

    def _inputs(self, x: Tensor) -> tuple[Tensor, ...]:
        """``x (B, K, L, C)`` -> the op's ``r, w, k, v, a, b`` as ``(B, L, K*H, d)`` (directions become extra
        heads) plus ``k`` and ``v`` for the bonus term and the gate ``g (B, K, L, C)``."""
        batch, k, length, c = x.shape
        shifted = F.pad(x, (0, 0, 1, -1))  # x_{t-1} along each direction's scan, zero before the first token
        mixed = x.unsqueeze(2) + (shifted - x).unsqueeze(2) * self.shift_mix[:, :, None, :].to(x.dtype)
        xr, xw, xk, xv, xa, xg = mixed.unbind(2)  # each (B, K, L, C)

        def proj(inp: Tensor, weight: Tensor) -> Tensor:
            return torch.einsum("bklc,kdc->bkld", inp, weight)

        def lora(inp: Tensor, down: Tensor, up: Tensor, act=None) -> Tensor:
            low = proj(inp, down)
            return proj(low if act is None else act(low), up)

        r = proj(xr, self.r_proj_weight)
        key = proj(xk, self.k_proj_weight)
        w = _MAX_LOG_DECAY * torch.sigmoid(lora(xw, self.w_down, self.w_up, torch.tanh) + self.w_bias[:, None])
        iclr = torch.sigmoid(lora(xa, self.a_down, self.a_up) + self.a_bias[:, None])
        blend = torch.sigmoid(lora(xv, self.v_down, self.v_up) + self.v_bias[:, None])
        v = torch.lerp(xv, x, blend)
        g = lora(xg, self.g_down, self.g_up, torch.sigmoid)
        heads = (batch, k, length, self.num_heads, self.head_k_dim)
        kk = F.normalize((key * self.k_k[:, None]).view(heads), dim=-1)
        key = key * (1 + (iclr - 1) * self.k_a[:, None])

        def to_op(t: Tensor, per_head: int) -> Tensor:  # (B, K, L, H*d) -> (B, L, K*H, d)
            return t.reshape(batch, k, length, self.num_heads, per_head).transpose(1, 2).flatten(2, 3)

        iclr_h = iclr.view(heads)
        r_op, w_op, k_op = (to_op(t, self.head_k_dim) for t in (r, w, key))
        a_op = to_op(-kk.flatten(-2), self.head_k_dim)
        b_op = to_op((kk * iclr_h).flatten(-2), self.head_k_dim)
        v_op = to_op(v, c // self.num_heads)
        return r_op, w_op, k_op, v_op, a_op, b_op, g

    def _bonus(self, r: Tensor, key: Tensor) -> Tensor:
        """``(r_t * k_t * r_k).sum()`` per head: ``(B, L, K*H)``, the weight of the current token's own value."""
        r_k = self.r_k.reshape(-1, self.head_k_dim).to(r.dtype)  # (K*H, dk)
        return (r * key * r_k).sum(-1)

    def forward(self, x: Tensor) -> Tensor:
        """x: ``(B, K, L, C)`` -> ``(B, K, L, C)``."""
        self.check_input(x)
        batch, k, length, c = x.shape
        r, w, key, v, a, b, g = self._inputs(x)
        # (B, L, K*H, C/H)
        o, _ = rwkv7(r, w, key, v, a, b, scale=1.0, output_final_state=False, chunk_size=self.chunk_size)
        o = o.to(torch.promote_types(o.dtype, torch.float32))  # group norm in at least float32
        o = F.layer_norm(o, o.shape[-1:], eps=self.norm_eps * (c // self.num_heads))
        o = o.unflatten(2, (k, self.num_heads)).transpose(1, 2).reshape(batch, k, length, c).to(x.dtype)
        o = o * self.norm_weight[:, None, :].to(x.dtype) + self.norm_bias[:, None, :].to(x.dtype)
        bonus = self._bonus(r, key)[..., None] * v  # (B, L, K*H, C/H)
        o = o + bonus.unflatten(2, (k, self.num_heads)).transpose(1, 2).reshape(batch, k, length, c)
        return o * g

    def mixing_matrix(self, x: Tensor) -> Tensor:
        """``(B, K, L, C) -> (B, K, L, L)``: ``|M|`` of the generalized-delta-rule quadratic form plus the bonus
        term on the diagonal, averaged over heads (the norm and gate act per token and are left out)."""
        self.check_input(x)
        r, w, key, _, a, b, _ = self._inputs(x)
        mix = rwkv7_mixing_matrix(r, w, key, a, b, scale=1.0, chunk_size=self.chunk_size)  # (B, K*H, L, L)
        mix = mix + torch.diag_embed(self._bonus(r, key).transpose(1, 2).to(mix.dtype))
        return mix.unflatten(1, (self.num_directions, self.num_heads)).abs().mean(2)
