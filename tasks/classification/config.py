"""Every option of classification training and validation, with the official ImageNet-1k defaults.

The defaults follow the VMamba recipe (``MzeroMiko/VMamba`` ``classification/config.py``), which shares its
augmentation with DeiT/Vim: RandAugment ``rand-m9-mstd0.5-inc1``, Mixup 0.8 / CutMix 1.0, label smoothing
0.1, random erasing 0.25, AdamW with weight decay 0.05, cosine schedule with warm-up, model EMA. Recipes in
``configs/classification/*.yaml`` override what differs per model; ``--set section.key=value`` overrides
anything from the command line.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from tasks.common.config import ConfigError, resolve_recipe_path
from tasks.common.distributed import DevicePreference
from tasks.common.precision import Precision

__all__ = [
    "Precision",
    "BuiltinData",
    "ModelConfig",
    "DataConfig",
    "AugConfig",
    "OptimConfig",
    "ScheduleConfig",
    "EmaConfig",
    "TrainConfig",
    "ClassificationConfig",
    "CONFIG_DIR",
    "resolve_config_path",
]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "classification"


def _h(text: str) -> dict[str, str]:
    return {"help": text}


class BuiltinData(str, enum.Enum):
    """Data sets this package can write itself into ``data.root`` when the folder is missing."""

    NONE = "none"
    DIGITS = "digits"  # scikit-learn's 8x8 handwritten digits, upscaled to RGB PNGs


@dataclass
class ModelConfig:
    name: str = field(default="vmamba_t", metadata=_h("timm model name (VMamba/Vim registered by `import vmamba`)"))
    kwargs: dict = field(default_factory=dict, metadata=_h("extra keyword arguments for timm.create_model "
                                                           "(e.g. depths, dims, img_size)"))
    num_classes: int | None = field(default=None, metadata=_h("classifier size; null = number of class folders"))
    drop_rate: float = field(default=0.0, metadata=_h("dropout before the classifier"))
    drop_path_rate: float = field(default=0.2, metadata=_h("stochastic depth rate (per model in the recipes)"))
    init_checkpoint: str | None = field(default=None, metadata=_h(
        "initial weights (ours .safetensors or an official .pth) loaded through timm's pretrained path; "
        "a classifier of another size is dropped"))
    grad_checkpointing: bool = field(default=False, metadata=_h("recompute activations in backward (less memory)"))


@dataclass
class DataConfig:
    root: str = field(default="data/imagenet", metadata=_h("ImageFolder root holding the split folders"))
    train_split: str = field(default="train", metadata=_h("training folder under root (one sub-folder per class)"))
    val_split: str = field(default="val", metadata=_h("validation folder under root"))
    builtin: BuiltinData = field(default=BuiltinData.NONE, metadata=_h("write this data set into root if missing"))
    img_size: int = field(default=224, metadata=_h("square input resolution"))
    crop_pct: float | None = field(default=None, metadata=_h("validation centre-crop fraction; null = model default"))
    crop_mode: str | None = field(default=None, metadata=_h("validation crop mode (center, squash, border); "
                                                            "null = model default"))
    interpolation: str = field(default="bicubic", metadata=_h("resize interpolation"))
    mean: tuple[float, float, float] | None = field(default=None, metadata=_h("normalisation mean; null = model's"))
    std: tuple[float, float, float] | None = field(default=None, metadata=_h("normalisation std; null = model's"))
    num_workers: int = field(default=8, metadata=_h("data-loading worker processes per training process"))
    pin_memory: bool = field(default=True, metadata=_h("pin host memory (CUDA only)"))


@dataclass
class AugConfig:
    auto_augment: str | None = field(default="rand-m9-mstd0.5-inc1", metadata=_h("timm auto-augment policy"))
    color_jitter: float = field(default=0.4, metadata=_h("colour jitter strength (unused when auto_augment is set)"))
    scale: tuple[float, float] = field(default=(0.08, 1.0), metadata=_h("random-resized-crop area range"))
    ratio: tuple[float, float] = field(default=(3 / 4, 4 / 3), metadata=_h("random-resized-crop aspect range"))
    hflip: float = field(default=0.5, metadata=_h("horizontal flip probability"))
    reprob: float = field(default=0.25, metadata=_h("random erasing probability"))
    remode: str = field(default="pixel", metadata=_h("random erasing fill mode"))
    recount: int = field(default=1, metadata=_h("random erasing count"))
    mixup: float = field(default=0.8, metadata=_h("Mixup alpha (0 = off)"))
    cutmix: float = field(default=1.0, metadata=_h("CutMix alpha (0 = off)"))
    mixup_prob: float = field(default=1.0, metadata=_h("probability of applying Mixup/CutMix to a batch"))
    mixup_switch_prob: float = field(default=0.5, metadata=_h("probability of CutMix instead of Mixup"))
    mixup_mode: str = field(default="batch", metadata=_h("Mixup parameters per batch, pair or elem"))
    label_smoothing: float = field(default=0.1, metadata=_h("label smoothing"))
    repeated_aug: int = field(default=0, metadata=_h("repeated-augmentation count (DeiT/Vim use 3; 0 = off)"))


@dataclass
class OptimConfig:
    opt: str = field(default="adamw", metadata=_h("timm optimizer name"))
    base_lr: float = field(default=5e-4, metadata=_h("learning rate per lr_base_size images of global batch"))
    lr_base_size: int = field(default=512, metadata=_h("lr = base_lr * global_batch / lr_base_size"))
    lr: float | None = field(default=None, metadata=_h("absolute peak learning rate (overrides base_lr scaling)"))
    weight_decay: float = field(default=0.05, metadata=_h("decoupled weight decay (none on norms, biases and "
                                                          "the model's no_weight_decay())"))
    eps: float = field(default=1e-8, metadata=_h("optimizer epsilon"))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=_h("Adam betas"))
    clip_grad: float | None = field(default=5.0, metadata=_h("gradient clipping threshold (null = off)"))
    clip_mode: str = field(default="norm", metadata=_h("clip by norm, value or agc"))


@dataclass
class ScheduleConfig:
    sched: str = field(default="cosine", metadata=_h("timm scheduler name"))
    epochs: int = field(default=300, metadata=_h("training epochs, warm-up included, cool-down not"))
    warmup_epochs: int = field(default=20, metadata=_h("linear warm-up epochs"))
    warmup_lr: float = field(default=5e-7, metadata=_h("learning rate at the start of warm-up"))
    min_lr: float = field(default=5e-6, metadata=_h("floor of the cosine decay"))
    scale_warmup_min_lr: bool = field(default=True, metadata=_h(
        "warmup_lr and min_lr are per optim.lr_base_size images and scale with the global batch like the peak "
        "lr (VMamba/Swin); false: absolute (DeiT/Vim)"))
    cooldown_epochs: int = field(default=0, metadata=_h("epochs at min_lr after the decay"))
    warmup_prefix: bool = field(default=True, metadata=_h("the decay starts after warm-up (VMamba/Swin) instead of "
                                                          "at step 0 with warm-up overriding it (DeiT/Vim)"))
    step_on_epochs: bool = field(default=False, metadata=_h("update lr once per epoch instead of every step"))

    def decay_epochs(self) -> int:
        """Length of the decay curve as timm's ``create_scheduler_v2`` counts it (it adds a prefixed warm-up)."""
        return self.epochs - self.warmup_epochs if self.warmup_prefix else self.epochs


@dataclass
class EmaConfig:
    enabled: bool = field(default=True, metadata=_h("keep an exponential moving average of the weights"))
    decay: float = field(default=0.9999, metadata=_h("EMA decay per optimizer step"))
    warmup: bool = field(default=False, metadata=_h("ramp the decay up over the first steps"))


@dataclass
class TrainConfig:
    output_dir: str = field(default="runs/classification", metadata=_h("where checkpoints, log and plots go"))
    batch_size: int = field(default=128, metadata=_h("images per process per step"))
    precision: Precision = field(default=Precision.FLOAT32, metadata=_h("autocast dtype (bfloat16 on CPU; "
                                                                        "float16 or bfloat16 on CUDA)"))
    device: DevicePreference = field(default=DevicePreference.AUTO, metadata=_h("cpu, cuda or auto"))
    seed: int = field(default=0, metadata=_h("random seed (each process adds its rank)"))
    threads: int | None = field(default=None, metadata=_h("torch.set_num_threads per process; null = torch default"))
    progress: bool = field(default=True, metadata=_h("show a progress bar"))


@dataclass
class ClassificationConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_h("network"))
    data: DataConfig = field(default_factory=DataConfig, metadata=_h("image folders and pre-processing"))
    aug: AugConfig = field(default_factory=AugConfig, metadata=_h("training augmentation"))
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=_h("optimizer"))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata=_h("learning-rate schedule"))
    ema: EmaConfig = field(default_factory=EmaConfig, metadata=_h("model EMA"))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=_h("run"))

    def learning_rates(self, world_size: int) -> tuple[float, float, float]:
        """(peak, warm-up start, floor) learning rates for ``world_size`` processes of ``train.batch_size``."""
        scale = self.train.batch_size * world_size / self.optim.lr_base_size
        peak = self.optim.lr if self.optim.lr is not None else self.optim.base_lr * scale
        floor_scale = scale if self.schedule.scale_warmup_min_lr else 1.0
        return peak, self.schedule.warmup_lr * floor_scale, self.schedule.min_lr * floor_scale

    def mixup_active(self) -> bool:
        return self.aug.mixup > 0 or self.aug.cutmix > 0

    def check(self) -> None:
        """Cross-field checks a single field's type cannot express.

        Raises:
            ConfigError: naming the offending keys.
        """
        if self.train.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.train.batch_size}")
        if self.mixup_active() and self.aug.mixup_prob > 0 and self.train.batch_size % 2:
            raise ConfigError("Mixup/CutMix pairs images, so train.batch_size must be even, "
                              f"got {self.train.batch_size}")
        if self.schedule.epochs < 1:
            raise ConfigError(f"schedule.epochs must be >= 1, got {self.schedule.epochs}")
        if not 0 <= self.schedule.warmup_epochs < self.schedule.epochs:
            raise ConfigError(f"schedule.warmup_epochs must be in [0, schedule.epochs), got "
                              f"{self.schedule.warmup_epochs} of {self.schedule.epochs}")
        if self.data.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.data.num_workers}")
        if self.data.crop_pct is not None and not 0 < self.data.crop_pct <= 1:
            raise ConfigError(f"data.crop_pct must be in (0, 1], got {self.data.crop_pct}")


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file path, or the name of a recipe in ``configs/classification`` (``digits``, ``vmamba_t``).

    Raises:
        FileNotFoundError: neither exists (the message lists the recipes).
    """
    return resolve_recipe_path(name_or_path, CONFIG_DIR)
