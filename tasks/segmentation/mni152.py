"""The embedded default data set: brain-tissue segmentation built from the MNI152 template nilearn ships.

nilearn installs the ICBM 2009a MNI152 T1 template and its grey- and white-matter probability maps with the
package (``nilearn/datasets/data/mni_icbm152_*_09a_converted.nii.gz``; ``load_mni152_template`` /
``load_mni152_gm_template`` / ``load_mni152_wm_template`` read them without any download).

Labels: 0 background, 1 grey matter, 2 white matter — the argmax of (1 - GM - WM, GM, WM) of the probability
maps. There is no CSF class: nilearn ships no CSF map, and a CSF label carved out of the T1 intensities would
make the task circular.

Subjects: every subject is the template seen through its own random

* smooth deformation (a random affine — rotation, anisotropic scale, translation — composed with a
  Gaussian-smoothed random displacement field), applied to the T1 and to both probability maps before the
  labels are taken, so labels follow the anatomy exactly;
* multiplicative bias field (the exponential of a very smooth random field) and gamma contrast change;
* Rician noise.

Training subjects use seeds ``seed + 0 .. seed + num_train - 1``, validation subjects
``seed + 100000 + 0 .. num_val - 1``: disjoint seeds, so no validation deformation, bias field or noise
was seen in training; they share the one underlying anatomy, which is the honest limit of a
single-template data set. The undeformed template is listed under ``"test"`` (image only) for ``predict``.
Volumes are cropped to the brain's bounding box (plus a margin) with the affine moved accordingly.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from tasks.common.checkpoint import atomic_write
from tasks.segmentation.data import write_nifti

__all__ = ["Mni152TissueSpec", "build_mni152_tissue", "LABELS"]

LABELS = ("background", "grey matter", "white matter")
_FORMAT = 1  # bump when the generated data change


@dataclass
class Mni152TissueSpec:
    """How the subjects are made (all distances in mm)."""

    num_train: int = 8
    num_val: int = 3
    resolution: int = 2  # nilearn's template resolution in mm (1 or 2)
    seed: int = 0
    margin_mm: float = 6.0  # kept around the brain's bounding box
    rotate_deg: float = 8.0  # max rotation about each axis
    scale: float = 0.08  # max relative scale per axis
    translate_mm: float = 4.0
    warp_mm: float = 3.0  # max magnitude of the smooth displacement
    warp_smooth_mm: float = 12.0  # Gaussian width that smooths it
    bias: float = 0.25  # bias field spans about exp(+-bias)
    gamma: float = 0.15  # contrast: intensity ** exp(+-gamma)
    noise: float = 0.03  # Rician noise sigma relative to the brain's 99th percentile


def _load_template(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution=resolution).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=resolution).get_fdata(dtype=np.float32)
    return t1.get_fdata(dtype=np.float32), gm, wm, t1.affine


def _crop_box(gm: np.ndarray, wm: np.ndarray, margin: int) -> tuple[slice, ...]:
    inside = np.argwhere(gm + wm > 0.05)
    lo = np.maximum(inside.min(0) - margin, 0)
    hi = np.minimum(inside.max(0) + 1 + margin, gm.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _rotation(angles: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        rot = np.eye(3)
        rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
        out = rot @ out
    return out


def _sample_grid(shape: tuple[int, ...], spacing: float, spec: Mni152TissueSpec, rng: np.random.Generator) -> np.ndarray:
    """Voxel coordinates ``(3, *shape)`` at which the template is read for one subject (the pull-back map)."""
    centre = (np.array(shape) - 1) / 2
    matrix = _rotation(np.deg2rad(rng.uniform(-spec.rotate_deg, spec.rotate_deg, 3))) @ np.diag(
        1 + rng.uniform(-spec.scale, spec.scale, 3))
    shift = rng.uniform(-spec.translate_mm, spec.translate_mm, 3) / spacing
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    coords = np.einsum("ij,j...->i...", matrix, grid - centre.reshape(3, 1, 1, 1)) + (centre + shift).reshape(3, 1, 1, 1)
    sigma = spec.warp_smooth_mm / spacing
    for axis in range(3):
        field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
        field *= (spec.warp_mm / spacing) / max(np.abs(field).max(), 1e-6)
        coords[axis] += field
    return coords


def _smooth_field(shape: tuple[int, ...], sigma: float, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field * (amplitude / max(np.abs(field).max(), 1e-6))


def _subject(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, spacing: float, spec: Mni152TissueSpec,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    coords = _sample_grid(t1.shape, spacing, spec, rng)
    warp = lambda vol: ndimage.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0)  # noqa: E731
    image, g, w = warp(t1), warp(gm), warp(wm)
    label = np.argmax(np.stack([np.clip(1 - g - w, 0, 1), g, w]), axis=0).astype(np.uint8)
    image = np.clip(image, 0, None)
    scale = np.percentile(image[label > 0], 99) if (label > 0).any() else 1.0
    image = image / scale
    image = image ** np.exp(rng.uniform(-spec.gamma, spec.gamma))
    image = image * np.exp(_smooth_field(t1.shape, 40.0 / spacing, spec.bias, rng))
    sigma = spec.noise
    image = np.sqrt((image + rng.normal(0, sigma, image.shape)) ** 2 + rng.normal(0, sigma, image.shape) ** 2)
    return image.astype(np.float32), label


def build_mni152_tissue(root: str | Path, spec: Mni152TissueSpec | None = None, verbose: bool = True) -> Path:
    """Write the MNI152 brain-tissue data set as a Decathlon folder and return its ``dataset.json``.

    Leaves an existing folder alone when its ``dataset.json`` was written by the same builder version and
    spec. Layout: ``imagesTr/`` and ``labelsTr/`` (training and validation subjects), ``imagesTs/`` (the
    undeformed template), ``dataset.json`` with ``"training"``, ``"validation"`` and ``"test"`` lists.
    """
    spec = spec or Mni152TissueSpec()
    if spec.num_train < 1 or spec.num_val < 1:
        raise ValueError(f"need at least one training and one validation subject, got {spec.num_train}, "
                         f"{spec.num_val}")
    if spec.resolution not in (1, 2):
        raise ValueError(f"nilearn ships the MNI152 template at 1 or 2 mm, got resolution={spec.resolution}")
    root = Path(root)
    manifest = root / "dataset.json"
    if manifest.is_file():
        try:
            existing = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            existing = {}
        if existing.get("builder") == {"format": _FORMAT, **asdict(spec)}:
            return manifest
    t1, gm, wm, affine = _load_template(spec.resolution)
    spacing = float(spec.resolution)
    box = _crop_box(gm, wm, int(round(spec.margin_mm / spacing)))
    t1, gm, wm = t1[box], gm[box], wm[box]
    affine = affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([s.start for s in box], dtype=np.float64)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    (root / "imagesTs").mkdir(parents=True, exist_ok=True)
    lists: dict[str, list] = {"training": [], "validation": []}
    subjects = [("training", f"mni_train_{i:03d}", spec.seed + i) for i in range(spec.num_train)]
    subjects += [("validation", f"mni_val_{i:03d}", spec.seed + 100000 + i) for i in range(spec.num_val)]
    for split, name, seed in subjects:
        if verbose:
            print(f"mni152_tissue: writing {split} subject {name} (seed {seed})", flush=True)
        image, label = _subject(t1, gm, wm, spacing, spec, seed)
        write_nifti(root / "imagesTr" / f"{name}.nii.gz", image, affine)
        write_nifti(root / "labelsTr" / f"{name}.nii.gz", label, affine)
        lists[split].append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    template = np.clip(t1, 0, None) / np.percentile(t1[np.argmax(np.stack([1 - gm - wm, gm, wm]), 0) > 0], 99)
    write_nifti(root / "imagesTs" / "mni_template.nii.gz", template.astype(np.float32), affine)
    dataset = {
        "name": "MNI152Tissue",
        "description": "Brain tissue (grey / white matter) on subjects derived from nilearn's MNI152 2009a T1 "
                       "template by random deformation, bias field, contrast change and Rician noise; "
                       "training and validation subjects use disjoint seeds (see tasks/segmentation/mni152.py).",
        "reference": "ICBM 2009a nonlinear symmetric MNI152 template (Fonov et al. 2009/2011), shipped by nilearn",
        "tensorImageSize": "3D",
        "modality": {"0": "T1"},
        "labels": {str(i): name for i, name in enumerate(LABELS)},
        "numTraining": spec.num_train,
        "numTest": 1,
        "training": lists["training"],
        "validation": lists["validation"],
        "test": ["./imagesTs/mni_template.nii.gz"],
        "builder": {"format": _FORMAT, **asdict(spec)},
    }
    atomic_write(manifest, lambda tmp: tmp.write_text(json.dumps(dataset, indent=2)))
    return manifest
