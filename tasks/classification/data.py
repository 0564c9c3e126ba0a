"""ImageFolder data on timm's pipeline: checked folders, datasets, loaders and Mixup/CutMix.

Layout (the ImageNet convention)::

    root/train/<class>/*.jpg|png|...
    root/val/<class>/*.jpg|png|...

Class indices follow the training folder's class names in plain sorted order, as torchvision's
``ImageFolder`` (used by the official VMamba and Vim training code) numbers them, so official checkpoints
score the right classes; the validation split reuses that map.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data import ImageDataset, Mixup, create_dataset, create_loader
from timm.data.readers.img_extensions import get_img_extensions

from tasks.classification.config import AugConfig, DataConfig

__all__ = [
    "ImageFolderError",
    "StrictImageDataset",
    "PreprocessConfig",
    "find_classes",
    "build_dataset",
    "build_loader",
    "build_mixup",
]


class ImageFolderError(ValueError):
    """The image folders do not have the expected layout or hold an unreadable image."""


def find_classes(split_dir: str | Path) -> list[str]:
    """Class folder names under ``split_dir``, each checked to hold at least one image file.

    Raises:
        ImageFolderError: the folder is missing, has no class sub-folders, or a class folder has no image.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise ImageFolderError(f"image folder {split_dir} does not exist (expected {split_dir}/<class>/<images>)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ImageFolderError(f"image folder {split_dir} has no class sub-folders "
                               f"(expected {split_dir}/<class>/<images>)")
    extensions = set(get_img_extensions(as_set=True))
    for name in classes:
        if not _has_image(split_dir / name, extensions):
            raise ImageFolderError(f"class folder {split_dir / name} holds no image file "
                                   f"(extensions: {', '.join(sorted(extensions))})")
    return classes


def _has_image(folder: Path, extensions: set[str]) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):
        if any(os.path.splitext(f)[1].lower() in extensions for f in files):
            return True
    return False


class StrictImageDataset(ImageDataset):
    """timm's :class:`ImageDataset` that stops on an unreadable image and names the file.

    timm's class logs a warning and quietly substitutes the next image, which hides a corrupt data set
    and skews the class balance; a training job should rather fail and say which file to fix.
    """

    def __init__(self, root: str, reader: Any, class_names: list[str]) -> None:
        super().__init__(root, reader=reader)
        self.class_names = list(class_names)  # index -> folder name
        self._max_retries = 1  # timm's retry loop then raises at the first failure instead of skipping

    def __getitem__(self, index: int) -> Any:
        try:
            return super().__getitem__(index)
        except RuntimeError:
            path = self.filename(index, absolute=True)
            reason = _decode_error(path, self.input_img_mode)
            raise ImageFolderError(f"cannot read image file {path}: {reason}") from None


def _decode_error(path: str, mode: str | None) -> str:
    """Re-open the image to recover the decoder's message (timm only logs it)."""
    try:
        with Image.open(path) as img:
            img.convert(mode or img.mode)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the message we want
        return f"{type(e).__name__}: {e}"
    return "unreadable"


def build_dataset(cfg: DataConfig, split: str, class_names: list[str] | None = None,
                  is_training: bool = False) -> StrictImageDataset:
    """The dataset of ``cfg.root/split`` through ``timm.data.create_dataset``, made strict.

    Args:
        class_names: class order to use (index = position); default: this split's folders, sorted.

    Raises:
        ImageFolderError: bad layout, or a class folder the given class list does not know.
    """
    split_dir = Path(cfg.root) / split
    found = find_classes(split_dir)
    if class_names is None:
        class_names = found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise ImageFolderError(f"{split_dir} has class folders the model does not know: {unknown[:10]}"
                               f"{' ...' if len(unknown) > 10 else ''}")
    class_map = {name: i for i, name in enumerate(class_names)}
    timm_ds = create_dataset("", root=str(split_dir), split=split, search_split=False, class_map=class_map,
                             is_training=is_training)
    return StrictImageDataset(str(split_dir), reader=timm_ds.reader, class_names=class_names)


@dataclass(frozen=True)
class PreprocessConfig:
    """Resolved pre-processing (config values, model defaults where the config says null)."""

    img_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str

    @classmethod
    def resolve(cls, cfg: DataConfig, model: torch.nn.Module) -> "PreprocessConfig":
        from timm.data import resolve_model_data_config

        model_cfg = resolve_model_data_config(model)
        return cls(
            img_size=cfg.img_size,
            interpolation=cfg.interpolation,
            mean=tuple(cfg.mean) if cfg.mean is not None else tuple(model_cfg["mean"]),
            std=tuple(cfg.std) if cfg.std is not None else tuple(model_cfg["std"]),
            crop_pct=cfg.crop_pct if cfg.crop_pct is not None else float(model_cfg.get("crop_pct", 0.875)),
            crop_mode=cfg.crop_mode if cfg.crop_mode is not None else model_cfg.get("crop_mode", "center"),
        )


def build_loader(dataset: ImageDataset, pre: PreprocessConfig, batch_size: int, device: torch.device,
                 is_training: bool, aug: AugConfig | None = None, num_workers: int = 0,
                 distributed: bool = False, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """``timm.data.create_loader`` with our options.

    On CUDA timm's prefetcher normalises (and randomly erases) on the GPU from uint8 batches; on CPU
    there is nothing to overlap, so the plain loader with CPU transforms is used. Workers are not
    persistent: each epoch's workers are seeded afresh from the main process's RNG, so a resumed run
    draws exactly the augmentations an uninterrupted one would.
    Batches are ``(images (B, 3, H, W) float, labels (B,) int64)``.
    """
    aug = aug or AugConfig()
    prefetch = device.type == "cuda"
    num_workers = min(num_workers, os.cpu_count() or 1)  # more loader processes than cores only add contention
    train_kwargs: dict[str, Any] = {}
    if is_training:
        train_kwargs = dict(
            scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip, color_jitter=aug.color_jitter,
            auto_augment=aug.auto_augment, re_prob=aug.reprob, re_mode=aug.remode, re_count=aug.recount,
            num_aug_repeats=aug.repeated_aug if distributed else 0,
        )
    loader = create_loader(
        dataset,
        input_size=(3, pre.img_size, pre.img_size),
        batch_size=batch_size,
        is_training=is_training,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
        crop_pct=pre.crop_pct,
        crop_mode=pre.crop_mode,
        num_workers=num_workers,
        distributed=distributed,
        pin_memory=pin_memory and prefetch,
        device=device,
        use_prefetcher=prefetch,
        persistent_workers=False,
        **train_kwargs,
    )
    if is_training and len(loader) == 0:  # every batch is dropped as incomplete: the run would never step
        raise ImageFolderError(f"training set has {len(dataset)} images, fewer than one batch of {batch_size} "
                               f"per process{' (after sharding)' if distributed else ''}")
    return loader


def build_mixup(aug: AugConfig, num_classes: int) -> Mixup | None:
    """timm's batch Mixup/CutMix (which also applies label smoothing), or None when both alphas are 0."""
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                 switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode, label_smoothing=aug.label_smoothing,
                 num_classes=num_classes)
