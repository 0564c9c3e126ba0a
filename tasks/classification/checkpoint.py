"""The files of a classification run, and what each checkpoint holds.

``<output_dir>/``
    ``last_state.pt``        everything needed to resume, in one atomically written file: epoch, step count,
                             model and EMA weights, optimizer, scheduler, grad-scaler, every process's RNG
                             states, best score so far, the config.
    ``last.safetensors``     the model's weights after the last epoch (plain timm state dict + metadata)
    ``last_ema.safetensors`` the EMA weights after the last epoch (when EMA is on)
    ``best.safetensors``     the best-scoring weights so far (model or EMA, whichever scored best)
    ``log.csv``, ``curves.png``, ``config.yaml``

The resumable state keeps its own copy of the weights so that resuming never depends on two files having
been replaced together: each file is replaced atomically on its own, and the state file alone is enough.
The ``.safetensors`` files are for use (``validate``, ``model.init_checkpoint``, any timm model).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tasks.classification.config import ClassificationConfig
from tasks.classification.data import PreprocessConfig
from tasks.classification.model import WEIGHTS_FORMAT
from tasks.common.checkpoint import load_state, save_state, save_weights
from tasks.common.config import config_to_dict
from tasks.common.run_files import RunFiles as CommonRunFiles

__all__ = ["RunFiles", "weights_metadata", "save_run_weights", "save_resume_state", "load_resume_state"]

STATE_VERSION = 1


@dataclass(frozen=True)
class RunFiles(CommonRunFiles):
    """Paths of one classification run's outputs: the common ones plus the EMA weights."""

    @property
    def last_ema(self) -> Path:
        return self.root / "last_ema.safetensors"


def weights_metadata(cfg: ClassificationConfig, class_names: list[str], pre: PreprocessConfig, epoch: int,
                     source: str, metrics: dict[str, float] | None = None) -> dict[str, str]:
    """Header of our weight files: enough for ``validate`` to rebuild the model, its class order and its
    pre-processing."""
    meta = {
        "format": WEIGHTS_FORMAT,
        "model": cfg.model.name,
        "model_kwargs": json.dumps(cfg.model.kwargs),
        "num_classes": str(len(class_names)),
        "class_names": json.dumps(class_names),
        "preprocess": json.dumps(dataclasses.asdict(pre)),
        "epoch": str(epoch),
        "source": source,
    }
    meta.update({k: f"{v:.6g}" for k, v in (metrics or {}).items()})
    return meta


def save_run_weights(path: Path, model: torch.nn.Module, metadata: dict[str, str]) -> None:
    """Write ``model``'s state dict (unwrapped from DDP/EMA by the caller) as safetensors."""
    save_weights(path, model.state_dict(), metadata)


def save_resume_state(files: RunFiles, cfg: ClassificationConfig, *, epoch: int, num_updates: int,
                      model: torch.nn.Module, ema: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
                      scheduler: Any, scaler: Any | None, rng_states: list[dict[str, Any]],
                      best: dict[str, Any] | None, class_names: list[str]) -> None:
    """Write ``last_state.pt`` (see the module docstring); ``rng_states`` holds one entry per process rank."""
    save_state(files.state, {
        "version": STATE_VERSION,
        "epoch": epoch,
        "num_updates": num_updates,
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_states,
        "best": best,
        "class_names": class_names,
        "config": config_to_dict(cfg),
    })


def load_resume_state(path: Path) -> dict[str, Any]:
    """Read a resume state, checking it is one.

    Raises:
        FileNotFoundError: no such file (the message says how to start a fresh run instead).
        ValueError: the file is not a classification resume state of a version this code reads.
    """
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist (run without --resume to start afresh)")
    state = load_state(path)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "optimizer" not in state:
        raise ValueError(f"{path} is not a classification training state (version {STATE_VERSION})")
    return state
