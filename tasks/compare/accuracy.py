"""Accuracy at equal budget: every model trained by the task's own training job with one shared recipe.

Nothing here trains: classification runs through :mod:`tasks.classification` (timm's pipeline) and
segmentation through :mod:`tasks.segmentation` (MONAI's). This module only swaps the model into the
shared recipe, applies the same budget overrides and data folder to every model, and reads the final
validation metrics back. A model whose training fails gets n/a with the reason; the others go on.
"""
from __future__ import annotations

import json
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import CompareConfig, ModelSource, ModelSpec, Task
from .models import build_model, resolve_source, size_kwargs

__all__ = ["AccuracyResult", "PRIMARY_METRIC", "metric_title", "check_recipe", "run_accuracy"]

# The headline metric per task: the accuracy axis of the plot and the first accuracy column.
PRIMARY_METRIC: dict[Task, str] = {Task.CLASSIFICATION: "top1", Task.SEGMENTATION: "dice"}


_TITLES = {"top1": "Top-1 (%)", "top5": "Top-5 (%)", "val_loss": "Val. loss", "dice": "Mean Dice",
           "hd95": "Mean HD95 (mm)"}


def metric_title(key: str) -> str:
    """How a table heads a metric column (``dice_grey_matter`` -> ``Dice grey matter``)."""
    if key in _TITLES:
        return _TITLES[key]
    kind, _, rest = key.partition("_")
    return f"{ {'dice': 'Dice', 'hd95': 'HD95'}.get(kind, kind)} {rest.replace('_', ' ')}".strip()


@dataclass
class AccuracyResult:
    """Final validation metrics of one model's training run, or n/a with the reason."""

    label: str
    ok: bool
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float | None = None
    run_dir: str | None = None

    def describe(self) -> str:
        if not self.ok:
            return f"n/a ({self.reason})"
        shown = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items())
        return f"{shown} in {self.train_seconds:.0f} s"


def run_accuracy(cfg: CompareConfig, spec: ModelSpec, run_dir: Path) -> AccuracyResult:
    """Train ``spec`` with the shared recipe and budget into ``run_dir``; return its validation metrics."""
    start = time.perf_counter()
    try:
        if cfg.task is Task.CLASSIFICATION:
            metrics = _classification(cfg, spec, run_dir)
        else:
            metrics = _segmentation(cfg, spec, run_dir)
    except Exception as err:  # noqa: BLE001 - one model's failure must not end the comparison
        (run_dir / "error.txt").parent.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(traceback.format_exc())
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return AccuracyResult(spec.display, ok=False, reason=f"{type(err).__name__}: {first}"[:300],
                              run_dir=str(run_dir))
    return AccuracyResult(spec.display, ok=True, metrics=metrics, train_seconds=time.perf_counter() - start,
                          run_dir=str(run_dir))


def _recipe_overrides(cfg: CompareConfig) -> list[str]:
    """The shared budget as ``key=value`` strings for the recipe's own loader (values as JSON, which YAML reads)."""
    return [f"{key}={json.dumps(value)}" for key, value in cfg.accuracy.overrides.items()]


def _fresh_dir(run_dir: Path) -> Path:
    """A rerun of the comparison replaces its own earlier training run of this model."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_dir


def _classification_recipe(cfg: CompareConfig):
    """The shared classification recipe with the budget and data folder applied (no model swapped in yet)."""
    from tasks.classification.config import ClassificationConfig, resolve_config_path
    from tasks.classification.train import DEFAULT_CONFIG
    from tasks.common.config import load_config

    acc = cfg.accuracy
    overrides = _recipe_overrides(cfg)
    if acc.data:
        overrides += [f"data.root={json.dumps(acc.data)}", "data.builtin=none"]
    return load_config(ClassificationConfig, resolve_config_path(acc.recipe or DEFAULT_CONFIG), overrides)


def _segmentation_recipe(cfg: CompareConfig):
    """The shared segmentation recipe with the budget and data folder applied."""
    from tasks.common.config import load_config
    from tasks.segmentation.config import DEFAULT_CONFIG, SegmentationConfig, resolve_config_path

    acc = cfg.accuracy
    overrides = _recipe_overrides(cfg)
    if acc.data:
        overrides += [f"data.root={json.dumps(acc.data)}", "data.builtin=none"]
    return load_config(SegmentationConfig, resolve_config_path(acc.recipe or DEFAULT_CONFIG), overrides)


def check_recipe(cfg: CompareConfig) -> None:
    """Load the shared recipe with the budget overrides before anything runs, so a misspelt recipe name or
    override key fails at once rather than after the speed measurements.

    Raises:
        ValueError: the recipe, an override key or a value is wrong (named in the message).
    """
    try:
        recipe = (_classification_recipe if cfg.task is Task.CLASSIFICATION else _segmentation_recipe)(cfg)
    except FileNotFoundError as err:
        raise ValueError(f"accuracy.recipe: {err}") from None
    except ValueError as err:
        raise ValueError(f"accuracy (recipe {cfg.accuracy.recipe or 'default'}): {err}") from None
    recipe.check()


def _classification(cfg: CompareConfig, spec: ModelSpec, run_dir: Path) -> dict[str, float]:
    """Train with :func:`tasks.classification.train.train`; the final epoch's validation metrics.

    The final epoch (not the best one) is reported: choosing the best epoch on the validation split would
    give models with noisier curves an edge at equal budget.
    """
    from tasks.classification.train import train

    acc = cfg.accuracy
    recipe = _classification_recipe(cfg)
    recipe.model.name = spec.name
    recipe.model.kwargs = {**spec.kwargs,
                           **size_kwargs(spec, Task.CLASSIFICATION, recipe.data.img_size)}
    recipe.model.init_checkpoint = None
    recipe.train.output_dir = str(_fresh_dir(run_dir))
    recipe.train.seed = acc.seed
    recipe.train.progress = False
    recipe.train.threads = recipe.train.threads or cfg.speed.threads
    summary = train(recipe)
    last = summary.last
    if "val_top1" not in last:
        raise RuntimeError(f"training returned no validation metrics (epochs done: {summary.epochs_done})")
    return {"top1": float(last["val_top1"]), "top5": float(last["val_top5"]), "val_loss": float(last["val_loss"])}


def _segmentation(cfg: CompareConfig, spec: ModelSpec, run_dir: Path) -> dict[str, float]:
    """Train with :func:`tasks.segmentation.train.train`; the final epoch's validation Dice and HD95.

    Our ``VMambaUNet`` is described to the recipe through its ``model`` section (``spec.kwargs`` must be
    keys of that section); any other network (MONAI's SwinUNETR, UNETR) is built here with the recipe's
    channels, dimensions and ROI and handed to the training job as ``network=``.
    """
    import dataclasses
    import inspect

    from tasks.segmentation import train as seg_train

    acc = cfg.accuracy
    recipe = _segmentation_recipe(cfg)
    recipe.train.output_dir = str(_fresh_dir(run_dir))
    recipe.train.seed = acc.seed
    recipe.train.progress = False
    recipe.train.threads = recipe.train.threads if recipe.train.threads is not None else cfg.speed.threads
    recipe.eval.overlay = False
    source = resolve_source(spec, Task.SEGMENTATION)
    extra: dict = {}
    if source is ModelSource.BACKBONES and spec.name == "VMambaUNet":
        known = {f.name for f in dataclasses.fields(recipe.model)}
        unknown = sorted(set(spec.kwargs) - known)
        if unknown:
            raise ValueError(f"VMambaUNet kwargs {unknown} are not keys of the segmentation recipe's model "
                             f"section ({sorted(known)})")
        for key, value in spec.kwargs.items():
            setattr(recipe.model, key, value)
    elif "network" in inspect.signature(seg_train.train).parameters:
        m = recipe.model
        torch.manual_seed(acc.seed)
        extra["network"] = build_model(spec, Task.SEGMENTATION, resolution=tuple(recipe.transforms.roi_size),
                                     in_chans=m.in_channels, num_classes=m.out_channels, spatial_dims=m.spatial_dims)
    else:
        raise NotImplementedError(
            "tasks.segmentation.train.train builds only VMambaUNet; training another network needs its network= "
            "argument")
    summary = seg_train.train(recipe, **extra)
    last = summary.last
    if "val_mean_dice" not in last:
        raise RuntimeError(f"training returned no validation metrics (epochs done: {summary.epochs_done})")
    metrics = {"dice": float(last["val_mean_dice"]), "hd95": float(last["val_mean_hd95"])}
    for name in summary.class_names[1:]:
        key = seg_train.metric_key(name)
        metrics[f"dice_{key}"] = float(last[f"val_dice_{key}"])
    return metrics

