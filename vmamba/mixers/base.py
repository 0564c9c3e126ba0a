"""The sequence-mixer contract and registry.

A mixer owns its projections and parameters and maps K direction-sequences ``(B, K, L, C)`` to
``(B, K, L, C)``, causal along ``L``, with separate parameters for each of the ``K`` directions.
The multi-direction SSM layer (:mod:`vmamba.ssm_layer`) does not change when the mixer changes.
"""
from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from ..cross_scan import ScanPattern

__all__ = ["MixerType", "SequenceMixer", "register_mixer", "create_mixer", "available_mixers"]


class MixerType(str, Enum):
    MAMBA = "mamba"  # S6 selective scan
    MAMBA2 = "mamba2"  # SSD
    RETNET = "retnet"  # retention
    GLA = "gla"  # gated linear attention
    RWKV7 = "rwkv7"  # generalized delta rule

    @classmethod
    def parse(cls, value: "MixerType | str") -> "MixerType":
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown mixer {value!r}; expected one of {names}") from None


class SequenceMixer(nn.Module):
    """Base class: ``forward(x: (B, K, L, C)) -> (B, K, L, C)``, causal along L, parameters per direction.

    Args:
        dim: channels ``C`` of each direction-sequence.
        num_directions: ``K``.
    """

    def __init__(self, dim: int, num_directions: int) -> None:
        super().__init__()
        if dim <= 0 or num_directions <= 0:
            raise ValueError(f"dim and num_directions must be positive, got {dim}, {num_directions}")
        self.dim = dim
        self.num_directions = num_directions

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.num_directions or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects (B, K={self.num_directions}, L, C={self.dim}), got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_map(self, x: Tensor, pattern: "ScanPattern") -> Tensor | None:
        """Optional fused path over a whole map, for mixers that can skip the direction copies.

        ``x: (B, *spatial, C)`` channel-last -> ``(B, *spatial, C)``, equal to
        ``cross_merge(self(cross_scan(x, pattern)), ...)``. The default returns ``None``: no fused path
        applies, and the layer scans, mixes and merges itself.
        """
        return None

    def mixing_matrix(self, x: Tensor) -> Tensor:
        """Effective token-mixing weights of the quadratic ("attention") form, for inspection.

        ``x: (B, K, L, C) -> (B, K, L, L)``: entry ``[b, k, t, s]`` is the magnitude of the weight with
        which input token ``s`` enters output token ``t`` along direction ``k`` (zero for ``s > t``),
        averaged over channels / heads. Subclasses implement it from their op's quadratic form.
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose a mixing matrix")


_REGISTRY: dict[MixerType, type[SequenceMixer]] = {}
M = TypeVar("M", bound=type)


def register_mixer(kind: MixerType) -> Callable[[M], M]:
    """Class decorator: make ``create_mixer(kind, ...)`` build this class."""

    def wrap(cls: M) -> M:
        _REGISTRY[kind] = cls
        return cls

    return wrap


def available_mixers() -> list[str]:
    return [m.value for m in MixerType if m in _REGISTRY]


def create_mixer(kind: MixerType | str, dim: int, num_directions: int, **kwargs: Any) -> SequenceMixer:
    """Build a registered mixer; unknown names raise ``ValueError`` listing the choices."""
    kind = MixerType.parse(kind)
    if kind not in _REGISTRY:
        raise ValueError(f"mixer {kind.value!r} is not implemented; available: {available_mixers()}")
    return _REGISTRY[kind](dim, num_directions, **kwargs)
