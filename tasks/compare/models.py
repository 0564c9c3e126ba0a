"""Build the compared models by name: timm classifiers (ours included) and MONAI / our segmentation nets.

One builder serves the speed children and the checks done up front: :func:`check_models` resolves
every name before anything is measured, so a typo fails in a second with a suggestion instead of after
an hour of measurements.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import ModelSource, ModelSpec, Task

__all__ = ["register_our_models", "resolve_source", "check_models", "size_kwargs", "build_model", "input_shape",
           "count_parameters", "count_parameters_without_weights"]


def register_our_models() -> None:
    """Import our packages so VMamba / Vim register with timm and the scan FLOP formulas register with
    ``torch.utils.flop_counter``; a missing package only means fewer model names (timm's still work)."""
    try:
        importlib.import_module("vmamba")
    except ModuleNotFoundError as err:
        if err.name != "vmamba":
            raise
        return
    try:  # the scan FLOP formulas, where they live in their own module
        importlib.import_module("vmamba.ops.flops")
    except ModuleNotFoundError as err:
        if err.name != "vmamba.ops.flops":
            raise


def _segmentation_module(source: ModelSource):
    if source is ModelSource.MONAI:
        return importlib.import_module("monai.networks.nets")
    return importlib.import_module("backbones.segmentation")


def _segmentation_names(source: ModelSource) -> list[str]:
    try:
        module = _segmentation_module(source)
    except ImportError:
        return []
    return sorted(n for n, obj in vars(module).items() if inspect.isclass(obj) and issubclass(obj, nn.Module))


def resolve_source(spec: ModelSpec, task: Task) -> ModelSource:
    """The source a spec's name is looked up in (its own, or the task's default)."""
    if spec.source is not None:
        return spec.source
    if task is Task.CLASSIFICATION:
        return ModelSource.TIMM
    return ModelSource.MONAI if spec.name in _segmentation_names(ModelSource.MONAI) else ModelSource.BACKBONES


def check_models(specs: list[ModelSpec], task: Task) -> None:
    """Raise ``ValueError`` for any name its source does not know, with the closest known names."""
    import timm

    register_our_models()
    for spec in specs:
        source = resolve_source(spec, task)
        if source is ModelSource.TIMM:
            if timm.is_model(spec.name):
                continue
            known = timm.list_models()
        else:
            known = _segmentation_names(source)
            if spec.name in known:
                continue
        close = difflib.get_close_matches(spec.name, known, n=5, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown model {spec.name!r} (source {source.value}){hint}")


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def size_kwargs(spec: ModelSpec, task: Task, resolution: int | Sequence[int], spatial_dims: int = 2) -> dict[str, Any]:
    """``{"img_size": ...}`` when the model's constructor takes an input size, else ``{}``.

    ``resolution`` is one size for every axis or one per axis (a training ROI such as ``(96, 96, 64)``).

    ViT, DeiT, Swin and Vim size their position tables / windows from ``img_size``, UNETR its patch grid;
    fully convolutional models (ConvNeXt, MambaOut, VMamba, SwinUNETR) take any size as built. For timm
    the question is put to the constructor itself, on the meta device (no memory, no init cost).
    """
    if "img_size" in spec.kwargs:
        return {}
    source = resolve_source(spec, task)
    if source is not ModelSource.TIMM:
        cls = getattr(_segmentation_module(source), spec.name)
        size = tuple(resolution) if isinstance(resolution, Sequence) else (resolution,) * spatial_dims
        return {"img_size": size} if _accepts(cls, "img_size") else {}
    import timm

    register_our_models()
    try:
        with torch.device("meta"):
            timm.create_model(spec.name, img_size=resolution, **spec.kwargs)
    except TypeError as err:
        if "img_size" in str(err):
            return {}
        raise
    return {"img_size": resolution}


def build_model(
    spec: ModelSpec,
    task: Task,
    *,
    resolution: int | Sequence[int] | None,
    in_chans: int,
    num_classes: int,
    spatial_dims: int = 2,
) -> nn.Module:
    """Create one model for inputs of ``resolution`` (one size, or one per axis; None: the model's default).

    Models whose constructor takes an input size get it (:func:`size_kwargs`). Segmentation classes get
    ``in_channels``, ``out_channels`` and ``spatial_dims`` when their signature has them.
    """
    source = resolve_source(spec, task)
    kwargs = dict(spec.kwargs)
    if resolution is not None:
        kwargs.update(size_kwargs(spec, task, resolution, spatial_dims))
    if source is ModelSource.TIMM:
        import timm

        register_our_models()
        kwargs.setdefault("in_chans", in_chans)
        kwargs.setdefault("num_classes", num_classes)
        return timm.create_model(spec.name, **kwargs)
    cls = getattr(_segmentation_module(source), spec.name)
    for key, value in (("in_channels", in_chans), ("out_channels", num_classes), ("spatial_dims", spatial_dims)):
        if _accepts(cls, key):
            kwargs.setdefault(key, value)
    return cls(**kwargs)


def input_shape(batch_size: int, in_chans: int, resolution: int, spatial_dims: int) -> tuple[int, ...]:
    """(B, C, H, W) for 2-D, (B, C, D, H, W) for 3-D."""
    return (batch_size, in_chans) + (resolution,) * spatial_dims


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_parameters_without_weights(spec: ModelSpec, task: Task, *, resolution: int, in_chans: int,
                                     num_classes: int, spatial_dims: int = 2) -> int | None:
    """Parameters of a model built on the meta device (no memory, no init); None if it cannot be built."""
    try:
        with torch.device("meta"):
            model = build_model(spec, task, resolution=resolution, in_chans=in_chans, num_classes=num_classes,
                                spatial_dims=spatial_dims)
    except Exception:  # noqa: BLE001 - the speed cells or the accuracy run report why
        return None
    return count_parameters(model)

