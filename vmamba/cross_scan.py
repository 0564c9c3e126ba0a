"""Multi-direction cross-scan: N-d feature maps <-> K direction-sequences.

A *scan pattern* turns a channel-first feature map ``(B, C, *spatial)`` into ``K`` token sequences
``(B, K, L, C)`` (``L = prod(spatial)``) and merges per-direction outputs of the same layout back
into a map, summing the directions. ``cross_merge(cross_scan(x)) == K * x``.

Direction order (``k`` indexes the K axis):

* ``bi1d`` (K=2, Vim): k0 = the sequence, k1 = k0 reversed.
* ``cross2d`` (K=4, official VMamba order): k0 = row-major flatten (W fastest), k1 = column-major
  flatten (the H/W-transposed map, H fastest), k2 = k0 reversed, k3 = k1 reversed.
* ``cross3d`` (K=6): the three cyclic axis orders of ``(D, H, W)`` so that each axis is the fastest
  one once: k0 = ``(D, H, W)`` order (W fastest), k1 = ``(H, W, D)`` order (D fastest),
  k2 = ``(W, D, H)`` order (H fastest); k3, k4, k5 = k0, k1, k2 reversed.

Only permutations and flips are used: no Python loop over tokens, differentiable, any spatial size.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["ScanPattern", "cross_scan", "cross_merge", "scan_indices"]


class ScanPattern(str, Enum):
    """Which directions a feature map is scanned in; see the module docstring for the order."""

    BI1D = "bi1d"
    CROSS2D = "cross2d"
    CROSS3D = "cross3d"

    @property
    def spatial_dims(self) -> int:
        return {ScanPattern.BI1D: 1, ScanPattern.CROSS2D: 2, ScanPattern.CROSS3D: 3}[self]

    @property
    def axis_orders(self) -> tuple[tuple[int, ...], ...]:
        """Spatial axis orders of the forward directions (the reversed ones follow them)."""
        return {
            ScanPattern.BI1D: ((0,),),
            ScanPattern.CROSS2D: ((0, 1), (1, 0)),
            ScanPattern.CROSS3D: ((0, 1, 2), (1, 2, 0), (2, 0, 1)),
        }[self]

    @property
    def num_directions(self) -> int:
        return 2 * len(self.axis_orders)

    @classmethod
    def parse(cls, value: "ScanPattern | str") -> "ScanPattern":
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(p.value) for p in cls)
            raise ValueError(f"unknown scan pattern {value!r}; expected one of {names}") from None


def _check_map(x: Tensor, pattern: ScanPattern, channels_last: bool) -> None:
    expected = pattern.spatial_dims + 2
    if x.dim() != expected:
        layout = "(B, *spatial, C)" if channels_last else "(B, C, *spatial)"
        raise ValueError(
            f"{pattern.value} scan expects a {expected}-d tensor {layout} with {pattern.spatial_dims} "
            f"spatial dims, got shape {tuple(x.shape)}"
        )


def cross_scan(x: Tensor, pattern: ScanPattern | str, *, channels_last: bool = False) -> Tensor:
    """Scan a feature map in every direction of ``pattern``.

    Args:
        x: ``(B, C, *spatial)``, or ``(B, *spatial, C)`` when ``channels_last``.
        pattern: ``bi1d`` (1 spatial dim), ``cross2d`` (2) or ``cross3d`` (3).
        channels_last: layout of ``x``.

    Returns:
        ``(B, K, L, C)`` with ``L = prod(spatial)``, directions ordered as in the module docstring.
    """
    pattern = ScanPattern.parse(pattern)
    _check_map(x, pattern, channels_last)
    if not channels_last:
        x = x.movedim(1, -1)  # (B, *spatial, C)
    batch, channels, length = x.shape[0], x.shape[-1], math.prod(x.shape[1:-1])  # explicit L: batch may be 0
    forward = [
        x.permute(0, *(a + 1 for a in order), x.dim() - 1).reshape(batch, length, channels)
        for order in pattern.axis_orders
    ]
    seqs = torch.stack(forward, dim=1)  # (B, K/2, L, C)
    return torch.cat([seqs, seqs.flip(2)], dim=1)


def cross_merge(
    y: Tensor, spatial_shape: Sequence[int], pattern: ScanPattern | str, *, channels_last: bool = False
) -> Tensor:
    """Sum per-direction sequences back onto the feature map (the adjoint of :func:`cross_scan`).

    Args:
        y: ``(B, K, L, C)``, each direction in its own scan order.
        spatial_shape: the map's spatial size, e.g. ``(H, W)``; ``prod == L``.
        pattern: the pattern ``y`` was scanned with.
        channels_last: layout of the result.

    Returns:
        ``(B, C, *spatial)``, or ``(B, *spatial, C)`` when ``channels_last``.
    """
    pattern = ScanPattern.parse(pattern)
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if len(spatial_shape) != pattern.spatial_dims:
        raise ValueError(f"{pattern.value} merge needs {pattern.spatial_dims} spatial sizes, got {spatial_shape}")
    num_orders = len(pattern.axis_orders)
    if y.dim() != 4 or y.shape[1] != pattern.num_directions:
        raise ValueError(f"{pattern.value} merge expects (B, {pattern.num_directions}, L, C), got {tuple(y.shape)}")
    length = 1
    for s in spatial_shape:
        length *= s
    if y.shape[2] != length:
        raise ValueError(f"sequence length {y.shape[2]} does not match spatial shape {spatial_shape}")
    batch, channels = y.shape[0], y.shape[-1]
    per_order = y[:, :num_orders] + y[:, num_orders:].flip(2)  # (B, K/2, L, C)
    out = None
    for k, order in enumerate(pattern.axis_orders):
        scanned_shape = tuple(spatial_shape[a] for a in order)
        inverse = [order.index(a) + 1 for a in range(len(order))]
        part = per_order[:, k].reshape(batch, *scanned_shape, channels).permute(0, *inverse, len(order) + 1)
        out = part if out is None else out + part
    return out if channels_last else out.movedim(-1, 1).contiguous()


def scan_indices(spatial_shape: Sequence[int], pattern: ScanPattern | str, device: torch.device | None = None) -> Tensor:
    """Row-major map position visited at each step of each direction: ``(K, L)`` int64.

    ``cross_scan(x)[:, k, t] == x.flatten(spatial)[..., scan_indices(...)[k, t]]`` for channel-first ``x``;
    kernels that scan a map in place (without materialising the K copies) walk these tables.
    """
    pattern = ScanPattern.parse(pattern)
    positions = torch.arange(math.prod(spatial_shape), device=device, dtype=torch.int64)
    return cross_scan(positions.view(1, 1, *spatial_shape), pattern)[0, :, :, 0]
