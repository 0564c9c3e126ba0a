"""Configuration of a comparison run: which models, how speed is measured, how accuracy is trained.

A YAML file in ``configs/compare/`` fills :class:`CompareConfig` through the jobs' shared loader
(:mod:`tasks.common.config`): an unknown key or a value of the wrong kind raises ``ValueError`` naming
the key (with the closest valid one), so a typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.common import config as common_config
from tasks.common.config import config_to_dict, describe_config

__all__ = [
    "Task",
    "ModelSource",
    "PassMode",
    "Device",
    "ModelSpec",
    "SpeedConfig",
    "AccuracyConfig",
    "CompareConfig",
    "CONFIG_DIR",
    "resolve_config_path",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "describe_config",
    "validate_config",
]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "compare"


class Task(str, enum.Enum):
    """What the compared models do; decides input shapes, the model sources allowed and the accuracy job."""

    CLASSIFICATION = "classification"
    SEGMENTATION = "segmentation"


class ModelSource(str, enum.Enum):
    """Where a model name is looked up.

    ``timm``: ``timm.create_model`` (our VMamba / Vim register there on ``import vmamba``).
    ``monai``: a class of ``monai.networks.nets`` (``SwinUNETR``, ``UNETR``, ...).
    ``backbones``: a segmentation network class of ``backbones.segmentation`` (ours).
    """

    TIMM = "timm"
    MONAI = "monai"
    BACKBONES = "backbones"


class PassMode(str, enum.Enum):
    """What one timed step runs: inference only, or a training step's forward and backward."""

    FORWARD = "forward"
    FORWARD_BACKWARD = "forward_backward"


class Device(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def _opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and the ``help`` line ``--help`` prints."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelSpec:
    """One entry of the model list (``models: [{name: vmamba_t, kwargs: {mixer: gla}}, ...]``)."""

    name: str = _opt("", "the model's name in its source: vmamba_t, deit_tiny_patch16_224, SwinUNETR, ...")
    label: str | None = _opt(None, "how tables and plots call it (default: the name plus its kwargs)")
    source: ModelSource | None = _opt(
        None, "where the name is looked up: timm (classification default; ours register on import vmamba), "
        "monai (a class of monai.networks.nets), backbones (a class of backbones.segmentation); the "
        "segmentation default is monai when it has the name, else backbones")
    kwargs: dict[str, Any] = _opt({}, "constructor arguments, e.g. {mixer: gla} or {feature_size: 48}")

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        if not self.kwargs:
            return self.name
        return self.name + "(" + ",".join(f"{k}={v}" for k, v in sorted(self.kwargs.items())) + ")"


@dataclass
class SpeedConfig:
    """Throughput and peak memory, one isolated child process per (model, resolution, trial)."""

    enabled: bool = _opt(True, "measure parameters, FLOPs, throughput and memory")
    resolutions: list[int] = _opt(
        [224, 384, 512, 1024], "square (2-D) or cubic (3-D) input sizes; the first is the reference "
        "resolution of the summary's parameters and GMACs")
    batch_size: int = _opt(1, "images (volumes) per step; throughput = batch_size / median step time")
    in_chans: int = _opt(3, "input channels")
    num_classes: int = _opt(1000, "classifier outputs, or segmentation output channels")
    spatial_dims: int = _opt(2, "2 or 3 (3 only for segmentation)")
    token_stride: int = _opt(
        16, "tokens = (resolution / token_stride) ** spatial_dims, the x-axis of the growth fit (the stride "
        "moves the fit's intercept, never its slope)")
    warmup: int = _opt(1, "untimed steps before the timed ones")
    repeats: int = _opt(3, "timed steps per child; the child reports their median")
    trials: int = _opt(1, "child processes per cell, interleaved across models; the report takes their median")
    mode: PassMode = _opt(PassMode.FORWARD, "forward: inference under torch.inference_mode; "
                          "forward_backward: a training step's forward and backward")
    threads: int = _opt(2, "torch.set_num_threads (and OMP/MKL threads) in each child")
    device: Device = _opt(Device.AUTO, "auto picks CUDA when available")
    timeout_s: float = _opt(900.0, "a child running longer is stopped and its cell reported n/a")
    count_flops: bool = _opt(True, "count FLOPs with FlopCounterMode in each child (one extra untimed pass)")
    pass_img_size: bool = _opt(
        True, "build models with img_size=resolution when their constructor takes it (ViT, DeiT, Swin, "
        "UNETR need it for a new size); others are built as they are")


@dataclass
class AccuracyConfig:
    """Accuracy after training every model with the same recipe, budget and data."""

    enabled: bool = _opt(True, "train and evaluate each model (the slow part)")
    recipe: str | None = _opt(
        None, "the training config all models share (a YAML of configs/classification/ or "
        "configs/segmentation/, relative to the project root); empty: the task's embedded-data default")
    overrides: dict[str, Any] = _opt(
        {}, "recipe settings applied to every model alike (the budget), in the recipe's key.sub names")
    data: str | None = _opt(
        None, "a data folder replacing the recipe's: an ImageFolder root (classification) or a Decathlon "
        "folder (segmentation); empty keeps the recipe's, which is the embedded default data")
    seed: int = _opt(0, "the same seed for every model")


@dataclass
class CompareConfig:
    task: Task = _opt(Task.CLASSIFICATION, "classification or segmentation")
    models: list[ModelSpec] = _opt([], "the models compared, each {name, label, source, kwargs}")
    speed: SpeedConfig = _opt(SpeedConfig, "parameters, FLOPs, throughput and memory per resolution")
    accuracy: AccuracyConfig = _opt(AccuracyConfig, "same-recipe, same-budget training and evaluation")
    output: str = _opt("runs/compare", "the output folder (CSV, Markdown, PNG plots, environment record)")


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the stem of one in ``configs/compare/`` (``segmentation``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise ValueError(f"config {str(name_or_path)!r} is neither a file nor one of configs/compare/: {available}")


def load_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> CompareConfig:
    """Read a compare config, apply ``key.sub=value`` overrides, validate, return it.

    Raises:
        ValueError: unknown key (with the closest valid one), wrong value type, or an inconsistent setting.
    """
    path = resolve_config_path(name_or_path)
    cfg = common_config.load_config(CompareConfig, path, overrides)
    validate_config(cfg, where=str(path))
    return cfg


def config_from_dict(raw: Mapping[str, Any], where: str = "config") -> CompareConfig:
    cfg = common_config.config_from_dict(CompareConfig, raw)
    validate_config(cfg, where)
    return cfg


def validate_config(cfg: CompareConfig, where: str = "config") -> None:
    """Checks across keys that the typed loader cannot make (ranges, duplicates, task/source fit)."""
    speed = cfg.speed
    for i, spec in enumerate(cfg.models):
        if not spec.name:
            raise ValueError(f"{where}: models[{i}] has no name")
    if not cfg.models:
        raise ValueError(f"{where}: models: the list is empty; name at least one model")
    if not speed.resolutions:
        raise ValueError(f"{where}: speed.resolutions: the list is empty")
    for key in ("batch_size", "in_chans", "num_classes", "token_stride", "repeats", "trials", "threads"):
        if getattr(speed, key) < 1:
            raise ValueError(f"{where}: speed.{key} must be >= 1, got {getattr(speed, key)}")
    if speed.warmup < 0:
        raise ValueError(f"{where}: speed.warmup must be >= 0, got {speed.warmup}")
    if any(r < 1 for r in speed.resolutions):
        raise ValueError(f"{where}: speed.resolutions must be positive, got {speed.resolutions}")
    if len(set(speed.resolutions)) != len(speed.resolutions):
        raise ValueError(f"{where}: speed.resolutions has duplicates: {speed.resolutions}")
    if speed.timeout_s <= 0:
        raise ValueError(f"{where}: speed.timeout_s must be > 0, got {speed.timeout_s}")
    if cfg.task is Task.CLASSIFICATION and speed.spatial_dims != 2:
        raise ValueError(f"{where}: speed.spatial_dims must be 2 for classification, got {speed.spatial_dims}")
    if speed.spatial_dims not in (2, 3):
        raise ValueError(f"{where}: speed.spatial_dims must be 2 or 3, got {speed.spatial_dims}")
    labels = [m.display for m in cfg.models]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise ValueError(f"{where}: models: duplicate label(s) {duplicates}; give each entry a distinct label")
    for spec in cfg.models:
        if cfg.task is Task.CLASSIFICATION and spec.source not in (None, ModelSource.TIMM):
            raise ValueError(f"{where}: model {spec.name!r}: classification models come from timm, not {spec.source.value}")
        if cfg.task is Task.SEGMENTATION and spec.source is ModelSource.TIMM:
            raise ValueError(f"{where}: model {spec.name!r}: segmentation models come from monai or backbones, not timm")
