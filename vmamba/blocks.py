"""Residual blocks built on the multi-direction SSM layer, for 1-D, 2-D and 3-D maps.

Every block works on channel-first maps ``(B, C, *spatial)`` by default, or on channel-last maps
``(B, *spatial, C)`` with ``channels_last=True`` (the faster layout on CPU: LayerNorm, the projections
and the MLP then act on the contiguous last axis without any permute).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from .cross_scan import ScanPattern
from .linear import Linear
from .mixers import MixerType
from .ops.linear_gelu import linear_gelu
from .ssm_layer import ConvPlacement, MultiDirectionSSM

__all__ = ["LayerNormNd", "ChannelMlp", "VSSBlock", "add_drop_path", "default_pattern"]

# ChannelMlp on maps whose hidden activation exceeds _MLP_CHUNK_ABOVE elements (32 MiB in float32, glibc's
# largest mmap threshold): without autograd, blocks of rows holding about _MLP_CHUNK_ELEMENTS hidden elements
# each (ChannelMlp._forward_chunked); with autograd, blocks of at most _MLP_GRAD_BLOCK_ELEMENTS
# (ChannelMlp._forward_row_blocks).
_MLP_CHUNK_ABOVE = 1 << 23
_MLP_CHUNK_ELEMENTS = 1 << 20
_MLP_GRAD_BLOCK_ELEMENTS = 1 << 22


def default_pattern(spatial_dims: int) -> ScanPattern:
    """The cross-scan used for a map with ``spatial_dims`` spatial axes."""
    try:
        return {1: ScanPattern.BI1D, 2: ScanPattern.CROSS2D, 3: ScanPattern.CROSS3D}[spatial_dims]
    except KeyError:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}") from None


def add_drop_path(x: Tensor, branch: Tensor, drop_path: nn.Module) -> Tensor:
    """``x + drop_path(branch)`` (a residual connection with stochastic depth), same shapes in and out.

    With an active timm ``DropPath`` the per-sample scale (1 / (1 - p) with probability 1 - p, else 0) is drawn
    exactly as ``DropPath`` draws it and applied by the add itself (``torch.addcmul``): one pass over the
    tensors instead of a multiply pass and an add pass. Any other module (``nn.Identity``, an inactive or
    custom drop path) is called as it is.
    """
    if type(drop_path) is not DropPath or not drop_path.training or drop_path.drop_prob == 0.0:
        return x + drop_path(branch)
    keep = 1.0 - drop_path.drop_prob
    scale = branch.new_empty((branch.shape[0],) + (1,) * (branch.dim() - 1)).bernoulli_(keep)
    if keep > 0.0 and drop_path.scale_by_keep:
        scale.div_(keep)
    return torch.addcmul(x, branch, scale)


class LayerNormNd(nn.LayerNorm):
    """LayerNorm over the channel axis of a map.

    ``(B, C, *spatial)`` by default; ``(B, *spatial, C)`` (a plain ``nn.LayerNorm``) when ``channels_last``.
    The parameters (``weight``, ``bias``: ``(C,)``) are the same in both layouts.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, channels_last: bool = False) -> None:
        super().__init__(num_channels, eps=eps)
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.movedim(1, -1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


class ChannelMlp(nn.Module):
    """Two-layer pointwise MLP: ``(B, C, *S) -> (B, C, *S)``, or ``(B, *S, C)`` when ``channels_last``.

    Weights are stored as ``nn.Linear`` (out, in), matching the official VMamba Linear2d keys. ``fc1`` and the
    GELU run as one op (:func:`vmamba.ops.linear_gelu`: a bias-free GEMM, then the fused bias + GELU kernel in
    float32 on the CPU), with the GELU's ``approximate`` setting read from ``act``; when ``act`` is replaced by
    another activation, or ``fc1`` / ``act`` carry forward hooks, they are called as modules instead (so the
    hooks fire).
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.fc1 = Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if not self.channels_last:
            x = x.movedim(1, -1)
        tokens = x.numel() // max(1, x.shape[-1])
        dropout_active = self.training and not isinstance(self.drop, nn.Identity)
        large = tokens * self.fc1.out_features > _MLP_CHUNK_ABOVE
        if large and not torch.is_grad_enabled() and not dropout_active:
            x = self._forward_chunked(x)
        elif large:
            x = self._forward_row_blocks(x)
        else:
            x = self._mlp(x)
        return x if self.channels_last else x.movedim(-1, 1)

    def _mlp(self, x: Tensor) -> Tensor:
        """``(..., C) -> (..., C)``: fc1, GELU, fc2 (with dropout)."""
        return self.drop(self.fc2(self.drop(self._hidden(x))))

    def _hidden(self, x: Tensor) -> Tensor:
        """``(..., C) -> (..., hidden)``: ``act(fc1(x))``, as one fused op unless the modules must be called."""
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (self.fc1, self.act))
        if isinstance(self.act, nn.GELU) and not hooked:
            return linear_gelu(x, self.fc1.weight, self.fc1.bias, approximate=self.act.approximate)
        return self.act(self.fc1(x))

    def _forward_row_blocks(self, x: Tensor) -> Tensor:
        """A large map with autograd, ``(..., C) -> (..., C)``: the MLP on even blocks of rows whose hidden
        activations hold at most ``_MLP_GRAD_BLOCK_ELEMENTS`` elements each, outputs concatenated.

        The same products row by row (and the weight gradients summed over the blocks), but the activations
        saved for the backward and the gradients of the backward come in blocks below 32 MiB, which the
        allocator reuses and the L3 cache holds, instead of fresh 38 MiB ``mmap`` regions (vmamba_t's first
        stage at batch 8): the vmamba_t training step took 0.985x the time of the whole-map MLP, side by side.
        """
        flat = x.reshape(-1, x.shape[-1])
        blocks = -(-flat.shape[0] * self.fc1.out_features // _MLP_GRAD_BLOCK_ELEMENTS)
        outs = [self._mlp(rows) for rows in flat.tensor_split(blocks)]
        return torch.cat(outs).view(*x.shape[:-1], -1)

    def _forward_chunked(self, x: Tensor) -> Tensor:
        """Inference on a large map, ``(..., C) -> (..., C)``, a block of rows at a time.

        A hidden activation over 32 MiB is a fresh ``mmap`` on every call (glibc's threshold), and its page
        faults cost about as much as the GELU itself; blocks of rows with about ``_MLP_CHUNK_ELEMENTS`` hidden
        elements stay in reused, cache-sized memory, and fc2 writes straight into the output. Row by row the
        same products (vmamba_t's first stage, batch 8, one thread: 93 -> 54 ms per MLP). Only taken when
        dropout is inactive.
        """
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_empty(flat.shape[0], self.fc2.out_features)
        rows = max(1, _MLP_CHUNK_ELEMENTS // self.fc1.out_features)
        for start in range(0, flat.shape[0], rows):
            h = self._hidden(flat[start : start + rows])
            torch.addmm(self.fc2.bias, h, self.fc2.weight.t(), out=out[start : start + rows])
        return out.view(*x.shape[:-1], -1)


class VSSBlock(nn.Module):
    """``x + drop_path(op(norm(x)))`` then ``x + drop_path(mlp(norm2(x)))``.

    Args:
        dim: channels.
        spatial_dims: 1, 2 or 3 (picks ``bi1d`` / ``cross2d`` / ``cross3d`` unless ``pattern`` is given).
        mixer, mixer_kwargs: the sequence mixer inside the SSM layer.
        ssm_ratio: ``d_inner / dim``.
        gate: z-gate in the SSM layer (vanilla VMamba v0).
        conv_kernel, conv_bias: the depthwise conv before the scan (``conv_kernel <= 1``: none).
        mlp_ratio: hidden width of the MLP branch; 0 disables it (no ``norm2`` / ``mlp``).
        drop_path: stochastic depth rate.
        norm_eps: epsilon of every LayerNorm (the official VMamba uses 1e-5).
        pattern: explicit scan pattern.
        channels_last: layout of input and output.

    Shapes:
        ``(B, C, *spatial) -> (B, C, *spatial)``, or ``(B, *spatial, C) -> (B, *spatial, C)``.
    """

    def __init__(
        self,
        dim: int,
        spatial_dims: int = 2,
        mixer: MixerType | str = MixerType.MAMBA,
        mixer_kwargs: dict[str, Any] | None = None,
        ssm_ratio: float = 2.0,
        gate: bool = False,
        conv_kernel: int = 3,
        conv_bias: bool = False,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
        pattern: ScanPattern | str | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        pattern = default_pattern(spatial_dims) if pattern is None else ScanPattern.parse(pattern)
        if pattern.spatial_dims != spatial_dims:
            raise ValueError(f"pattern {pattern.value} scans {pattern.spatial_dims}-d maps, not {spatial_dims}-d")
        self.norm = LayerNormNd(dim, eps=norm_eps, channels_last=channels_last)
        self.op = MultiDirectionSSM(
            dim,
            pattern=pattern,
            mixer=mixer,
            mixer_kwargs=mixer_kwargs,
            expand=ssm_ratio,
            gate=gate,
            conv=ConvPlacement.SPATIAL if conv_kernel > 1 else ConvPlacement.NONE,
            conv_kernel=conv_kernel,
            conv_bias=conv_bias,
            norm_eps=norm_eps,
            channels_last=channels_last,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNormNd(dim, eps=norm_eps, channels_last=channels_last) if mlp_ratio > 0 else None
        self.mlp = ChannelMlp(dim, int(dim * mlp_ratio), channels_last=channels_last) if mlp_ratio > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        x = add_drop_path(x, self.op(self.norm(x)), self.drop_path)
        if self.mlp is not None:
            x = add_drop_path(x, self.mlp(self.norm2(x)), self.drop_path)
        return x
