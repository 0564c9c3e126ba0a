"""MONAI transform chains for CT and MRI volumes, and the albumentations slice pipeline for 2-D networks.

Deterministic pre-processing (shared by training, validation and prediction, so predictions can be inverted
back to each input's geometry with ``Invertd``):

    LoadImaged (channel first) -> Orientationd (RAS) -> Spacingd (bilinear image, nearest label)
    CT:  ScaleIntensityRanged (HU window -> [b_min, b_max], clipped) -> CropForegroundd (window > b_min)
    MRI: CropForegroundd (non-zero) -> NormalizeIntensityd (z-score per channel over non-zero voxels)

3-D training adds SpatialPadd (to the ROI) -> RandCropByPosNegLabeld -> RandFlipd (each axis) ->
RandRotate90d -> RandScaleIntensityd -> RandShiftIntensityd, as the UNETR / SwinUNETR recipes.

2-D training (:class:`SliceDataset`) draws slices of the pre-processed volumes (foreground slices with
weight ``pos``, any slice with weight ``neg``) and augments them with albumentations: pad / crop to the ROI
(a crop holding foreground when the slice has any), flips, 90-degree rotations, a small affine, brightness
and contrast (the 2-D counterparts of the intensity scale and shift).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import albumentations as A
import numpy as np
import torch
from monai.transforms import (Compose, CropForegroundd, LoadImaged, NormalizeIntensityd, Orientationd, RandFlipd,
                              RandCropByPosNegLabeld, RandRotate90d, RandScaleIntensityd, RandShiftIntensityd,
                              ScaleIntensityRanged, Spacingd, SpatialPadd)
from torch.utils.data import Dataset

from tasks.segmentation.config import Modality, SegmentationConfig, SliceConfig, TransformConfig

__all__ = ["preprocess_transforms", "train_transforms", "val_transforms", "predict_transforms", "SliceDataset",
           "slice_augmentation"]


def _above(x: Any, threshold: float) -> Any:
    return x > threshold


def preprocess_transforms(cfg: TransformConfig, keys: Sequence[str] = ("image", "label")) -> list:
    """The deterministic, invertible part of every chain (see the module docstring)."""
    keys = list(keys)
    has_label = "label" in keys
    chain: list = [LoadImaged(keys=keys, ensure_channel_first=True, image_only=True),
                   # labels given explicitly: the RAS convention (silences MONAI's notice of a changing default)
                   Orientationd(keys=keys, axcodes=cfg.axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    if cfg.pixdim is not None:
        modes = ("bilinear", "nearest") if has_label else ("bilinear",)
        chain.append(Spacingd(keys=keys, pixdim=cfg.pixdim, mode=modes))
    # module-level function + partial: picklable for data-loading worker processes
    crop = CropForegroundd(keys=keys, source_key="image", allow_smaller=True,
                           select_fn=functools.partial(_above, threshold=cfg.b_min if cfg.modality is Modality.CT
                                                       else 0.0))
    if cfg.modality is Modality.CT:
        chain.append(ScaleIntensityRanged(keys=["image"], a_min=cfg.a_min, a_max=cfg.a_max, b_min=cfg.b_min,
                                          b_max=cfg.b_max, clip=True))
        if cfg.crop_foreground:
            chain.append(crop)
    else:
        if cfg.crop_foreground:
            chain.append(crop)
        chain.append(NormalizeIntensityd(keys=["image"], nonzero=True, channel_wise=True))
    return chain


def _random_3d(cfg: TransformConfig) -> list:
    keys = ["image", "label"]
    roi = list(cfg.roi_size)
    chain: list = [
        SpatialPadd(keys=keys, spatial_size=roi),
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=roi, pos=cfg.pos, neg=cfg.neg,
                               num_samples=cfg.num_samples,
                               # CT: background patches inside the body; z-scored MRI has no such threshold
                               image_key="image" if cfg.modality is Modality.CT else None,
                               image_threshold=cfg.b_min),
    ]
    if cfg.flip_prob > 0:
        chain += [RandFlipd(keys=keys, prob=cfg.flip_prob, spatial_axis=axis) for axis in range(3)]
    if cfg.rot90_prob > 0:
        chain.append(RandRotate90d(keys=keys, prob=cfg.rot90_prob, max_k=3))
    if cfg.scale_intensity_prob > 0:
        chain.append(RandScaleIntensityd(keys=["image"], factors=cfg.scale_intensity, prob=cfg.scale_intensity_prob))
    if cfg.shift_intensity_prob > 0:
        chain.append(RandShiftIntensityd(keys=["image"], offsets=cfg.shift_intensity, prob=cfg.shift_intensity_prob))
    return chain


def train_transforms(cfg: SegmentationConfig) -> Compose:
    """Training chain: pre-processing, then (3-D networks) the random patch and intensity transforms.

    For 2-D networks only the pre-processing runs here; :class:`SliceDataset` draws and augments slices.
    """
    chain = preprocess_transforms(cfg.transforms)
    if cfg.model.spatial_dims == 3:
        chain += _random_3d(cfg.transforms)
    return Compose(chain)


def val_transforms(cfg: SegmentationConfig) -> Compose:
    """Validation / evaluation chain: the deterministic pre-processing of image and label."""
    return Compose(preprocess_transforms(cfg.transforms))


def predict_transforms(cfg: SegmentationConfig) -> Compose:
    """Prediction chain (image only); invert it with ``Invertd`` to return to the input's geometry."""
    return Compose(preprocess_transforms(cfg.transforms, keys=("image",)))


# ----------------------------------------------------------------------------------------- 2-D slices


def slice_augmentation(cfg: TransformConfig, slices: SliceConfig) -> A.Compose:
    """albumentations chain for ``(H, W, C)`` float slices with an integer mask, ending at ``roi_size``."""
    height, width = cfg.roi_size
    ops: list = [
        A.PadIfNeeded(min_height=height, min_width=width, border_mode=0, fill=0, fill_mask=0),
        A.CropNonEmptyMaskIfExists(height=height, width=width),
    ]
    if cfg.flip_prob > 0:
        ops += [A.HorizontalFlip(p=cfg.flip_prob), A.VerticalFlip(p=cfg.flip_prob)]
    if cfg.rot90_prob > 0 and height == width:
        ops.append(A.RandomRotate90(p=cfg.rot90_prob))
    if slices.affine_prob > 0:
        ops.append(A.Affine(scale=(0.9, 1.1), rotate=(-15, 15), border_mode=0, fill=0, fill_mask=0,
                            p=slices.affine_prob))
    intensity_prob = max(cfg.shift_intensity_prob, cfg.scale_intensity_prob)
    if intensity_prob > 0:
        # on float images albumentations adds brightness * 1.0 and scales by (1 + contrast): the shift / scale
        ops.append(A.RandomBrightnessContrast(brightness_limit=cfg.shift_intensity,
                                              contrast_limit=cfg.scale_intensity, p=intensity_prob))
    return A.Compose(ops)


class SliceDataset(Dataset):
    """2-D training samples drawn from pre-processed volumes.

    Item ``i`` is slice number ``i % slices_per_volume`` of volume ``i // slices_per_volume``: a foreground
    slice with probability ``pos / (pos + neg)`` (when the volume has foreground), else any slice, augmented
    by :func:`slice_augmentation`. The draw and the augmentation are seeded from ``(seed, epoch, i)``, so an
    epoch is reproducible whatever the number of workers (call :meth:`set_epoch` before each epoch).

    Args:
        volumes: dataset of pre-processed ``{"image": (C, X, Y, Z), "label": (1, X, Y, Z)}`` volumes.
        cfg: the job config (``transforms`` and ``slices`` sections).
        seed: base seed.

    Items: ``{"image": (C, H, W) float32, "label": (1, H, W) float32}`` with ``(H, W) = roi_size``.
    """

    def __init__(self, volumes: Dataset, cfg: SegmentationConfig, seed: int = 0) -> None:
        self.volumes = volumes
        self.axis = cfg.slices.axis
        self.per_volume = cfg.slices.slices_per_volume
        self.pos_prob = cfg.transforms.pos / max(cfg.transforms.pos + cfg.transforms.neg, 1e-12)
        self.aug = slice_augmentation(cfg.transforms, cfg.slices)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> "SliceDataset":
        """No-op for MONAI's ``set_rnd`` (its data loaders re-seed datasets): every draw here already follows
        from ``(seed, epoch, index)``. Defining it also stops ``set_rnd`` from descending into the
        albumentations pipeline, whose ``set_random_state`` has another signature."""
        return self

    def __len__(self) -> int:
        return len(self.volumes) * self.per_volume

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        item = self.volumes[index // self.per_volume]
        image, label = torch.as_tensor(item["image"]), torch.as_tensor(item["label"])
        axis = self.axis + 1  # past the channel axis
        fg = label.sum(dim=[d for d in range(label.dim()) if d != axis]).nonzero().flatten().tolist()
        if fg and rng.random() < self.pos_prob:
            z = int(rng.choice(fg))
        else:
            z = int(rng.integers(image.shape[axis]))
        img = image.select(axis, z).movedim(0, -1).numpy().astype(np.float32)  # (H, W, C)
        mask = label.select(axis, z)[0].numpy().astype(np.uint8)
        self.aug.set_random_seed(int(rng.integers(2**31)))
        out = self.aug(image=img, mask=mask)
        return {"image": torch.from_numpy(np.ascontiguousarray(out["image"])).movedim(-1, 0).float(),
                "label": torch.from_numpy(np.ascontiguousarray(out["mask"]))[None].float()}
