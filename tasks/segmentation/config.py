"""Every option of segmentation training, evaluation and prediction, as nested dataclasses.

``configs/segmentation/*.yaml`` hold the recipes (MSD Spleen, BTCV, MSD BrainTumour, and the embedded MNI152
brain-tissue default); ``--set section.key=value`` overrides anything from the command line. Values left out
of a recipe keep the defaults below.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from tasks.common.config import ConfigError, resolve_recipe_path
from tasks.common.distributed import DevicePreference
from tasks.common.precision import Precision

__all__ = [
    "Modality",
    "BuiltinData",
    "ModelConfig",
    "DataConfig",
    "TransformConfig",
    "SliceConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "SegmentationConfig",
    "CONFIG_DIR",
    "DEFAULT_CONFIG",
    "resolve_config_path",
]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "segmentation"
DEFAULT_CONFIG = "mni152_tissue"


def _h(text: str) -> dict[str, str]:
    return {"help": text}


class Modality(str, enum.Enum):
    """Which intensity handling the transform chain applies."""

    CT = "ct"  # Hounsfield window [a_min, a_max] -> [b_min, b_max], clipped
    MRI = "mri"  # z-score per channel over non-zero voxels


class BuiltinData(str, enum.Enum):
    """Data sets this package can write itself into ``data.root`` when ``dataset.json`` is missing there."""

    NONE = "none"
    MNI152_TISSUE = "mni152_tissue"  # nilearn's MNI152 T1 + grey/white-matter maps, deformed into subjects


@dataclass
class ModelConfig:
    spatial_dims: int = field(default=3, metadata=_h("3: volumes (cross3d scans); 2: slices (cross2d scans)"))
    in_channels: int = field(default=1, metadata=_h("image channels (must match the data)"))
    out_channels: int = field(default=2, metadata=_h("classes incl. background (must match dataset.json labels)"))
    depths: tuple[int, int, int, int] = field(default=(2, 2, 2, 2), metadata=_h("VSS blocks per encoder stage"))
    dims: tuple[int, int, int, int] = field(default=(48, 96, 192, 384), metadata=_h("encoder stage widths"))
    feature_size: int = field(default=24, metadata=_h("decoder width at full resolution"))
    mixer: str = field(default="mamba", metadata=_h("sequence mixer: mamba, mamba2, retnet, gla, rwkv7"))
    mixer_kwargs: dict = field(default_factory=dict, metadata=_h("extra mixer arguments"))
    d_state: int = field(default=1, metadata=_h("Mamba state size"))
    ssm_ratio: float = field(default=1.0, metadata=_h("d_inner / dim of the SSM layers"))
    mlp_ratio: float = field(default=4.0, metadata=_h("MLP width of each VSS block (0 = none)"))
    drop_path_rate: float = field(default=0.0, metadata=_h("stochastic depth of the encoder"))
    norm_name: str = field(default="instance", metadata=_h("decoder normalisation (MONAI name)"))
    grad_checkpointing: bool = field(default=False, metadata=_h("recompute activations in backward (less memory)"))
    encoder_checkpoint: str | None = field(default=None, metadata=_h(
        "2-D only: VMamba ImageNet checkpoint (local .pth/.safetensors) to start the encoder from"))


@dataclass
class DataConfig:
    root: str = field(default="data/mni152_tissue", metadata=_h("Decathlon folder holding dataset.json"))
    dataset_json: str = field(default="dataset.json", metadata=_h("datalist file, relative to root"))
    builtin: BuiltinData = field(default=BuiltinData.NONE, metadata=_h("write this data set into root if missing"))
    train_key: str = field(default="training", metadata=_h("dataset.json list used for training"))
    val_key: str | None = field(default="validation", metadata=_h(
        "dataset.json list used for validation; when absent from the file, the last val_count (or val_fraction) "
        "training cases are held out"))
    val_count: int | None = field(default=None, metadata=_h("cases held out of train_key when val_key is absent"))
    val_fraction: float = field(default=0.2, metadata=_h("fraction held out when val_key is absent and val_count "
                                                         "is null"))
    cache_rate: float = field(default=1.0, metadata=_h("fraction of pre-processed cases kept in memory"))
    num_workers: int = field(default=0, metadata=_h("data-loading worker processes (0 = in the main process)"))
    check_files: bool = field(default=True, metadata=_h("check every file, shape and channel count before training"))
    build_kwargs: dict = field(default_factory=dict, metadata=_h("arguments of the builtin data set builder"))


@dataclass
class TransformConfig:
    modality: Modality = field(default=Modality.CT, metadata=_h("ct: HU windowing; mri: channel-wise z-score"))
    axcodes: str = field(default="RAS", metadata=_h("orientation every volume is turned to"))
    pixdim: tuple[float, float, float] | None = field(default=(1.5, 1.5, 2.0), metadata=_h(
        "voxel spacing (mm) volumes are resampled to; null keeps the native spacing"))
    a_min: float = field(default=-175.0, metadata=_h("CT window low (HU)"))
    a_max: float = field(default=250.0, metadata=_h("CT window high (HU)"))
    b_min: float = field(default=0.0, metadata=_h("CT window mapped to [b_min, b_max]"))
    b_max: float = field(default=1.0, metadata=_h("CT window mapped to [b_min, b_max]"))
    crop_foreground: bool = field(default=True, metadata=_h("crop each volume to its non-zero bounding box"))
    roi_size: tuple[int, ...] = field(default=(96, 96, 96), metadata=_h(
        "training patch and sliding-window size (3 values; 2 for the slice pipeline)"))
    num_samples: int = field(default=4, metadata=_h("patches drawn per volume and step (RandCropByPosNegLabeld)"))
    pos: float = field(default=1.0, metadata=_h("weight of patches centred on foreground"))
    neg: float = field(default=1.0, metadata=_h("weight of patches centred on background"))
    flip_prob: float = field(default=0.1, metadata=_h("probability of a flip along each axis"))
    rot90_prob: float = field(default=0.1, metadata=_h("probability of a random 90-degree rotation"))
    scale_intensity_prob: float = field(default=0.0, metadata=_h("probability of RandScaleIntensityd"))
    scale_intensity: float = field(default=0.1, metadata=_h("RandScaleIntensityd factor range"))
    shift_intensity_prob: float = field(default=0.5, metadata=_h("probability of RandShiftIntensityd"))
    shift_intensity: float = field(default=0.1, metadata=_h("RandShiftIntensityd offset range"))


@dataclass
class SliceConfig:
    axis: int = field(default=2, metadata=_h("volume axis sliced for 2-D networks (2 = axial after RAS)"))
    slices_per_volume: int = field(default=16, metadata=_h("2-D training slices drawn per volume per epoch"))
    affine_prob: float = field(default=0.3, metadata=_h("probability of a small albumentations Affine"))


@dataclass
class OptimConfig:
    lr: float = field(default=1e-4, metadata=_h("peak learning rate (AdamW)"))
    weight_decay: float = field(default=1e-5, metadata=_h("decoupled weight decay (none on norms and biases)"))
    warmup_epochs: float = field(default=1.0, metadata=_h("linear warm-up length in epochs (may be fractional)"))
    min_lr_ratio: float = field(default=0.0, metadata=_h("final learning rate as a fraction of lr"))
    clip_grad: float | None = field(default=None, metadata=_h("gradient-norm clipping threshold (null = off)"))


@dataclass
class TrainConfig:
    output_dir: str = field(default="runs/segmentation", metadata=_h("checkpoints, log, plots"))
    epochs: int = field(default=100, metadata=_h("training epochs"))
    batch_size: int = field(default=1, metadata=_h("volumes per step and process (x num_samples patches)"))
    val_every: int = field(default=1, metadata=_h("validate every N epochs (and after the last)"))
    precision: Precision = field(default=Precision.FLOAT32, metadata=_h("autocast dtype (bfloat16 on CPU)"))
    device: DevicePreference = field(default=DevicePreference.AUTO, metadata=_h("cpu, cuda or auto"))
    seed: int = field(default=0, metadata=_h("random seed"))
    threads: int | None = field(default=None, metadata=_h("torch.set_num_threads; null = torch default"))
    progress: bool = field(default=True, metadata=_h("show progress bars"))


@dataclass
class EvalConfig:
    sw_batch_size: int = field(default=4, metadata=_h("windows per forward in sliding-window inference"))
    overlap: float = field(default=0.5, metadata=_h("sliding-window overlap"))
    blend: str = field(default="gaussian", metadata=_h("window blending: gaussian or constant"))
    hd95: bool = field(default=True, metadata=_h("also compute the 95% Hausdorff distance (mm)"))
    regions: dict = field(default_factory=dict, metadata=_h(
        "extra Dice over unions of labels, e.g. {WT: [1, 2, 3], TC: [2, 3], ET: [3]}"))
    overlay: bool = field(default=True, metadata=_h("write a PNG of one validation slice with the prediction"))


@dataclass
class SegmentationConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_h("network (VMambaUNet)"))
    data: DataConfig = field(default_factory=DataConfig, metadata=_h("Decathlon data"))
    transforms: TransformConfig = field(default_factory=TransformConfig, metadata=_h("pre-processing, augmentation"))
    slices: SliceConfig = field(default_factory=SliceConfig, metadata=_h("2-D slice pipeline (spatial_dims 2)"))
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=_h("AdamW, warm-up cosine"))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=_h("run"))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=_h("validation / evaluation"))

    def check(self) -> None:
        """Cross-field checks a single field's type cannot express.

        Raises:
            ConfigError: naming the offending keys.
        """
        nd = self.model.spatial_dims
        if nd not in (2, 3):
            raise ConfigError(f"model.spatial_dims must be 2 or 3, got {nd}")
        if len(self.transforms.roi_size) != nd:
            raise ConfigError(f"transforms.roi_size needs {nd} values for model.spatial_dims={nd}, "
                              f"got {list(self.transforms.roi_size)}")
        if any(s <= 0 for s in self.transforms.roi_size):
            raise ConfigError(f"transforms.roi_size must be positive, got {list(self.transforms.roi_size)}")
        roi = self.transforms.roi_size
        if self.transforms.rot90_prob > 0 and roi[0] != roi[1]:
            raise ConfigError(f"transforms.rot90_prob > 0 rotates the first two axes, which needs roi_size[0] == "
                              f"roi_size[1], got {list(roi)}")
        if not 0 <= self.slices.axis <= 2:
            raise ConfigError(f"slices.axis must be 0, 1 or 2, got {self.slices.axis}")
        for key, value in (("train.epochs", self.train.epochs), ("train.batch_size", self.train.batch_size),
                           ("train.val_every", self.train.val_every), ("transforms.num_samples",
                                                                       self.transforms.num_samples),
                           ("eval.sw_batch_size", self.eval.sw_batch_size)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if not 0 <= self.eval.overlap < 1:
            raise ConfigError(f"eval.overlap must be in [0, 1), got {self.eval.overlap}")
        if self.eval.blend not in ("gaussian", "constant"):
            raise ConfigError(f"eval.blend must be gaussian or constant, got {self.eval.blend!r}")
        if not 0 < self.data.cache_rate <= 1:
            raise ConfigError(f"data.cache_rate must be in (0, 1], got {self.data.cache_rate}")
        if not 0 < self.data.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.data.val_fraction}")
        if self.transforms.modality is Modality.CT and self.transforms.a_max <= self.transforms.a_min:
            raise ConfigError(f"transforms.a_max ({self.transforms.a_max}) must exceed a_min ({self.transforms.a_min})")
        for name, labels in self.eval.regions.items():
            if not isinstance(labels, (list, tuple)) or not labels or \
                    any(not isinstance(v, int) or not 0 < v < self.model.out_channels for v in labels):
                raise ConfigError(f"eval.regions.{name} must be a list of foreground labels in "
                                  f"1..{self.model.out_channels - 1}, got {labels!r}")
        if self.model.encoder_checkpoint and nd != 2:
            raise ConfigError("model.encoder_checkpoint (a 2-D VMamba ImageNet checkpoint) needs model.spatial_dims=2")


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file path, or the name of a recipe in ``configs/segmentation`` (``spleen``, ``mni152_tissue``).

    Raises:
        FileNotFoundError: neither exists (the message lists the recipes).
    """
    return resolve_recipe_path(name_or_path, CONFIG_DIR)
