"""Building a classifier through timm, optionally loading weights through timm's pretrained path.

Both our safetensors checkpoints and the official VMamba/Vim ``.pth`` files (``{"model": state_dict}``)
load the same way: ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``,
which runs the model's ``checkpoint_filter_fn`` (official key names -> ours) and drops a classifier whose
size differs from ``num_classes``.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import timm
import torch

import vmamba  # noqa: F401  - registers the VMamba and Vim families with timm
from tasks.common.checkpoint import check_checkpoint_file, read_weights_metadata

__all__ = ["WEIGHTS_FORMAT", "UnknownModelError", "check_model_name", "checkpoint_info", "build_model"]

WEIGHTS_FORMAT = "vmamba-toolkit/classification"  # safetensors metadata "format" of our weight files


class UnknownModelError(ValueError):
    """The model name is not registered with timm."""


def check_model_name(name: str) -> None:
    """Raise :class:`UnknownModelError` (with the closest names) unless timm knows ``name``."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        raise UnknownModelError(f"unknown model name {name!r}" + (f"; did you mean {close}?" if close else ""))


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """What one of our weight files says about itself (model name, kwargs, classes, ...); {} for others.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: it is not a whole safetensors / PyTorch file (checked before timm loads it).
    """
    path = Path(path)
    check_checkpoint_file(path)
    if path.suffix != ".safetensors":
        return {}
    meta = read_weights_metadata(path)
    if meta.get("format") != WEIGHTS_FORMAT:
        return {}
    info: dict[str, Any] = dict(meta)
    for key in ("model_kwargs", "class_names", "preprocess"):
        if key in info:
            info[key] = json.loads(info[key])
    if "num_classes" in info:
        info["num_classes"] = int(info["num_classes"])
    return info


def build_model(name: str, num_classes: int, kwargs: dict[str, Any] | None = None, drop_rate: float = 0.0,
                drop_path_rate: float = 0.0, checkpoint: str | Path | None = None,
                checkpoint_classes: int | None = None) -> torch.nn.Module:
    """``timm.create_model`` with ``num_classes`` outputs, weights from ``checkpoint`` if given.

    Args:
        kwargs: extra constructor arguments (``depths``, ``dims``, ``img_size`` ...).
        checkpoint: our ``.safetensors`` weights or an official ``.pth``.
        checkpoint_classes: the size of the checkpoint's classifier (default: from our file's header, else
            the model's pretrained config, 1000 for the ImageNet models). timm keeps the classifier when this
            equals ``num_classes`` and drops it (leaving a fresh one, for fine-tuning) otherwise.

    Raises:
        UnknownModelError: ``name`` is not registered.
        FileNotFoundError: ``checkpoint`` does not exist.
        CheckpointError: ``checkpoint`` is not a whole safetensors / PyTorch file.
    """
    check_model_name(name)
    extra: dict[str, Any] = dict(kwargs or {})
    if checkpoint is not None:
        info = checkpoint_info(checkpoint)
        overlay: dict[str, Any] = {"file": str(checkpoint)}
        classes = checkpoint_classes if checkpoint_classes is not None else info.get("num_classes")
        if classes is not None:
            overlay["num_classes"] = classes
        extra.update(pretrained=True, pretrained_cfg_overlay=overlay)
    return timm.create_model(name, num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                             **extra)
