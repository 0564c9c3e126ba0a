"""The files every training run keeps in its output folder.

``<output_dir>/``
    ``last_state.pt``     everything needed to resume (atomically written)
    ``last.safetensors``  the model's weights after the last epoch
    ``best.safetensors``  the best-scoring weights so far
    ``log.csv``, ``curves.png``, ``config.yaml``

Jobs that write more (the classification EMA weights, the segmentation overlay) extend :class:`RunFiles`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunFiles"]


@dataclass(frozen=True)
class RunFiles:
    """Paths of one run's outputs below ``root``."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / "last_state.pt"

    @property
    def last(self) -> Path:
        return self.root / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.root / "best.safetensors"

    @property
    def log(self) -> Path:
        return self.root / "log.csv"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"
