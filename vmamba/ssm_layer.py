"""The multi-direction SSM layer (SS2D and its 1-D / 3-D siblings).

in_proj -> [z gate split] -> conv -> act -> cross-scan -> mixer -> cross-merge -> out_norm -> [* act(z)]
-> out_proj. The mixer is a constructor argument; nothing else changes when it changes.
"""
from __future__ import annotations

from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cross_scan import ScanPattern, cross_merge, cross_scan
from .linear import Linear
from .mixers import MixerType, create_mixer
from .ops import depthwise_conv2d_silu

__all__ = ["ConvPlacement", "MultiDirectionSSM"]


class ConvPlacement(str, Enum):
    """Where the depthwise convolution sits.

    ``spatial``: one depthwise conv over the N-d map before scanning ("same" padding; VMamba).
    ``causal``: a causal depthwise 1-D conv per direction after scanning, with weights per direction (Vim).
    ``none``: no convolution.
    """

    SPATIAL = "spatial"
    CAUSAL = "causal"
    NONE = "none"


class MultiDirectionSSM(nn.Module):
    """Scan a feature map in K directions with a swappable sequence mixer.

    Args:
        dim: input/output channels.
        pattern: ``bi1d``, ``cross2d`` or ``cross3d`` (sets the number of spatial dims).
        mixer: which :class:`~vmamba.mixers.MixerType` runs along each direction.
        mixer_kwargs: extra arguments for the mixer (e.g. ``d_state``).
        expand: ``d_inner = round(expand * dim)``.
        gate: multiply by ``act(z)`` from a second in_proj half (Mamba's z branch).
        conv: where the depthwise conv goes (:class:`ConvPlacement`).
        conv_kernel: its kernel size.
        conv_bias: whether it has a bias.
        out_norm: LayerNorm over ``d_inner`` after merging.
        merge_mean: divide the merged sum by ``K`` (Vim's ``(y_fwd + y_bwd) / 2``).
        bias: bias of in_proj / out_proj.
        channels_last: layout of input and output, ``(B, *spatial, C)`` instead of ``(B, C, *spatial)``.
        norm_eps: out_norm epsilon.

    Shapes:
        ``(B, C, *spatial) -> (B, C, *spatial)`` (or channels-last).
        With ``tokens (B, T, C)`` (extra tokens such as Vim's class token, see :meth:`forward`) it returns
        ``(map, tokens_out (B, T, C))``.
    """

    def __init__(
        self,
        dim: int,
        pattern: ScanPattern | str = ScanPattern.CROSS2D,
        mixer: MixerType | str = MixerType.MAMBA,
        mixer_kwargs: dict[str, Any] | None = None,
        expand: float = 2.0,
        gate: bool = False,
        conv: ConvPlacement | str = ConvPlacement.SPATIAL,
        conv_kernel: int = 3,
        conv_bias: bool = False,
        out_norm: bool = True,
        merge_mean: bool = False,
        bias: bool = False,
        channels_last: bool = False,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.pattern = ScanPattern.parse(pattern)
        self.conv_placement = ConvPlacement(conv)
        self.dim = dim
        self.d_inner = d_inner = int(round(expand * dim))
        self.gate = gate
        self.merge_mean = merge_mean
        self.channels_last = channels_last
        k = self.pattern.num_directions
        self.in_proj = Linear(dim, d_inner * (2 if gate else 1), bias=bias)
        if self.conv_placement is ConvPlacement.SPATIAL:
            conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self.pattern.spatial_dims - 1]
            self.conv = conv_cls(
                d_inner, d_inner, conv_kernel, padding=(conv_kernel - 1) // 2, groups=d_inner, bias=conv_bias
            )
        elif self.conv_placement is ConvPlacement.CAUSAL:
            self.conv = nn.Conv1d(k * d_inner, k * d_inner, conv_kernel, groups=k * d_inner, bias=conv_bias)
        else:
            self.conv = None
        self.act = nn.SiLU()
        self.mixer = create_mixer(mixer, d_inner, k, dim_model=dim, **(mixer_kwargs or {}))
        self.out_norm = nn.LayerNorm(d_inner, eps=norm_eps) if out_norm else nn.Identity()
        self.out_proj = Linear(d_inner, dim, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _check(self, x: Tensor) -> None:
        nd = self.pattern.spatial_dims
        channel_axis = -1 if self.channels_last else 1
        if x.dim() != nd + 2 or x.shape[channel_axis] != self.dim:
            layout = "(B, *spatial, C)" if self.channels_last else "(B, C, *spatial)"
            raise ValueError(
                f"MultiDirectionSSM({self.pattern.value}) expects {layout} with {nd} spatial dims and "
                f"C={self.dim}, got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor, tokens: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Scan ``x`` in every direction; optional ``tokens`` join each direction-sequence in its middle.

        Args:
            x: ``(B, C, *spatial)``, or ``(B, *spatial, C)`` when ``channels_last``.
            tokens: ``(B, T, C)`` or ``None``. They are inserted at index ``L // 2`` of every forward
                direction (each reversed direction is its forward twin flipped, tokens included), so each
                direction sees them after half of its scan, as Vim's middle class token. They share every
                projection, the conv and the mixer with the map; their outputs are merged over directions
                like the map's. Needs ``conv`` ``causal`` or ``none`` (a spatial conv has no place for them).

        Returns:
            The map in ``x``'s layout, or ``(map, tokens_out (B, T, C))`` when ``tokens`` is given.
        """
        self._check(x)
        if not self.channels_last:
            x = x.movedim(1, -1)
        spatial = x.shape[1:-1]
        if tokens is not None:
            self._check_tokens(x, tokens)
            tokens = self.in_proj(tokens)  # (B, T, E[*2])
        x = self.in_proj(x)  # (B, *S, E[*2])
        z = z_tokens = None
        if self.gate:
            x, z = x.chunk(2, dim=-1)
            if tokens is not None:
                tokens, z_tokens = tokens.chunk(2, dim=-1)
        if self.conv_placement is ConvPlacement.SPATIAL:
            x = self._spatial_conv(x)
            if tokens is None:
                y = self.mixer.forward_map(x, self.pattern)  # a mixer's fused scan-mix-merge, if it has one
                if y is not None:
                    out = self._output(y, z)
                    return out if self.channels_last else out.movedim(-1, 1)
        seqs = cross_scan(x, self.pattern, channels_last=True)  # (B, K, L, E)
        if tokens is not None:
            seqs = _insert_middle_tokens(seqs, tokens)  # (B, K, L + T, E)
        if self.conv_placement is ConvPlacement.CAUSAL:
            seqs = self._causal_conv(seqs)
        elif self.conv_placement is ConvPlacement.NONE:
            seqs = self.act(seqs)
        y = self.mixer(seqs)
        y_tokens = None
        if tokens is not None:
            y, y_tokens = _take_middle_tokens(y, tokens.shape[1])
        y = cross_merge(y, spatial, self.pattern, channels_last=True)  # (B, *S, E)
        out = self._output(y, z)
        out = out if self.channels_last else out.movedim(-1, 1)
        return out if y_tokens is None else (out, self._output(y_tokens, z_tokens))

    def _spatial_conv(self, x: Tensor) -> Tensor:
        """``silu(conv(x))`` on the channels-last map ``x (B, *S, E)``; a 2-D odd-sized kernel ("same" padding)
        takes the fused channels-last op (:func:`vmamba.ops.depthwise_conv2d_silu`)."""
        if isinstance(self.conv, nn.Conv2d) and self.conv.kernel_size[0] % 2 == 1 and self.conv.kernel_size[1] % 2 == 1:
            return depthwise_conv2d_silu(x, self.conv.weight, self.conv.bias)
        return self.act(self.conv(x.movedim(-1, 1))).movedim(1, -1)

    def _output(self, y: Tensor, z: Tensor | None) -> Tensor:
        """Merged ``y (..., E)`` -> ``(..., C)``: mean over directions, out_norm, gate, out_proj."""
        if self.merge_mean:
            y = y / self.pattern.num_directions
        y = self.out_norm(y)
        if z is not None:
            y = y * self.act(z)
        return self.dropout(self.out_proj(y))

    def _check_tokens(self, x: Tensor, tokens: Tensor) -> None:
        if tokens.dim() != 3 or tokens.shape[0] != x.shape[0] or tokens.shape[-1] != self.dim:
            raise ValueError(f"tokens must be (B={x.shape[0]}, T, C={self.dim}), got {tuple(tokens.shape)}")
        if self.conv_placement is ConvPlacement.SPATIAL:
            raise ValueError("extra tokens need conv='causal' or 'none': a spatial conv has no place for them")

    def _causal_conv(self, seqs: Tensor) -> Tensor:
        batch, k, length, e = seqs.shape
        h = seqs.permute(0, 1, 3, 2).reshape(batch, k * e, length)
        h = F.pad(h, (self.conv.kernel_size[0] - 1, 0))
        h = self.act(self.conv(h))
        return h.view(batch, k, e, length).permute(0, 1, 3, 2)


def _insert_middle_tokens(seqs: Tensor, tokens: Tensor) -> Tensor:
    """``seqs (B, K, L, E)``, ``tokens (B, T, E)`` -> ``(B, K, L + T, E)``.

    The first ``K/2`` directions get the tokens at index ``L // 2``; the reversed half is rebuilt as their
    flip (cross-scan's convention), so a reversed direction meets the tokens at index ``L - L // 2``.
    """
    batch, k, length, e = seqs.shape
    half, mid = k // 2, length // 2
    forward = seqs[:, :half]
    tok = tokens.unsqueeze(1).expand(batch, half, tokens.shape[1], e)
    forward = torch.cat([forward[:, :, :mid], tok, forward[:, :, mid:]], dim=2)
    return torch.cat([forward, forward.flip(2)], dim=1)


def _take_middle_tokens(y: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`_insert_middle_tokens`: ``(B, K, L + T, E)`` -> ``(B, K, L, E)`` and the tokens'
    outputs summed over the K directions ``(B, T, E)``."""
    half = y.shape[1] // 2
    mid = (y.shape[2] - num_tokens) // 2
    forward, backward = y[:, :half], y[:, half:].flip(2)  # both in forward order
    tokens = (forward[:, :, mid : mid + num_tokens] + backward[:, :, mid : mid + num_tokens]).sum(1)
    keep = lambda t: torch.cat([t[:, :, :mid], t[:, :, mid + num_tokens :]], dim=2)  # noqa: E731
    return torch.cat([keep(forward), keep(backward).flip(2)], dim=1), tokens
