"""Medical Segmentation Decathlon data: ``dataset.json`` datalists, their checks, the train/validation split.

A Decathlon folder holds ``dataset.json`` with ``"training": [{"image": ..., "label": ...}, ...]`` (paths
relative to the folder), optionally ``"validation"`` (BTCV's ``dataset_0.json``) and ``"test": [path, ...]``,
plus ``"labels": {"0": "background", ...}`` and ``"modality": {"0": "CT"}``. MONAI's
``load_decathlon_datalist`` reads the lists; :func:`check_cases` reads every NIfTI *header* (cheap) so that a
missing file, an image whose shape differs from its label, or a wrong channel count is reported before any
training starts, naming the file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist

__all__ = ["DatasetError", "DecathlonInfo", "read_dataset_json", "load_cases", "split_cases", "check_cases",
           "image_channels", "load_test_images", "write_nifti"]


class DatasetError(ValueError):
    """A dataset folder, ``dataset.json`` field or data file that cannot be used; the message names it."""


@dataclass
class DecathlonInfo:
    """What ``dataset.json`` says about a data set."""

    path: Path
    name: str
    labels: list[str]  # class names by label index (background first)
    modalities: list[str]  # one per image channel
    keys: list[str]  # the lists present ("training", "validation", "test", ...)


def read_dataset_json(path: str | Path) -> tuple[DecathlonInfo, dict[str, Any]]:
    """Parse and check the top level of a ``dataset.json``.

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: not JSON, not an object, or a ``labels`` / ``modality`` field of the wrong form.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path} must hold a JSON object with a 'training' list, got {type(data).__name__}")
    labels_field = data.get("labels", {})
    if not isinstance(labels_field, dict) or not all(str(k).isdigit() for k in labels_field):
        raise DatasetError(f"{path}: field 'labels' must map label indices to names, e.g. "
                           f"{{\"0\": \"background\", \"1\": \"spleen\"}}, got {labels_field!r}")
    indices = sorted(int(k) for k in labels_field)
    if indices and indices != list(range(len(indices))):
        raise DatasetError(f"{path}: field 'labels' must number the classes 0..N-1 without gaps, got {indices}")
    modality_field = data.get("modality", {})
    if not isinstance(modality_field, dict):
        raise DatasetError(f"{path}: field 'modality' must map channel indices to names, got {modality_field!r}")
    info = DecathlonInfo(
        path=path,
        name=str(data.get("name", path.parent.name)),
        labels=[str(labels_field[str(i)]) for i in indices],
        modalities=[str(modality_field[k]) for k in sorted(modality_field, key=int)],
        keys=[k for k, v in data.items() if isinstance(v, list)],
    )
    return info, data


def _check_entries(path: Path, data: dict[str, Any], key: str, with_label: bool) -> None:
    entries = data.get(key)
    if entries is None:
        raise DatasetError(f"{path}: field '{key}' is missing (lists present: "
                           f"{[k for k, v in data.items() if isinstance(v, list)]})")
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path}: field '{key}' must be a non-empty list, got {entries!r}")
    for i, entry in enumerate(entries):
        if not with_label and isinstance(entry, str):
            continue
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: {key}[{i}] must be an object with 'image' and 'label', got {entry!r}")
        for field in ("image", "label") if with_label else ("image",):
            if field not in entry:
                raise DatasetError(f"{path}: {key}[{i}] has no '{field}' field")
            if not isinstance(entry[field], str):
                raise DatasetError(f"{path}: {key}[{i}].{field} must be one file path (a string), "
                                   f"got {entry[field]!r}")


def load_cases(dataset_json: str | Path, key: str, with_label: bool = True) -> list[dict[str, str]]:
    """The cases of list ``key`` with absolute paths (``load_decathlon_datalist``), fields checked.

    Raises:
        FileNotFoundError / DatasetError: as :func:`read_dataset_json`; a missing list, an entry without
            ``image`` / ``label``.
    """
    info, data = read_dataset_json(dataset_json)
    _check_entries(info.path, data, key, with_label)
    cases = load_decathlon_datalist(info.path, is_segmentation=with_label, data_list_key=key,
                                    base_dir=info.path.parent)
    for i, case in enumerate(cases):
        case["name"] = _case_name(case["image"])
        case["source"] = f"{key}[{i}]"
    return cases


def load_test_images(dataset_json: str | Path, key: str = "test") -> list[dict[str, str]]:
    """The images of list ``key`` (plain paths or ``{"image": ...}``), absolute, for prediction."""
    return [{k: v for k, v in c.items() if k != "label"} for c in load_cases(dataset_json, key, with_label=False)]


def _case_name(image_path: str) -> str:
    name = Path(image_path).name
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def split_cases(
    info: DecathlonInfo,
    data: dict[str, Any],
    train_key: str,
    val_key: str | None,
    val_count: int | None,
    val_fraction: float,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Training and validation cases: ``val_key``'s list when the file has it, else the last cases of
    ``train_key`` (``val_count`` of them, or ``val_fraction`` rounded, at least one) — deterministic.

    Raises:
        DatasetError: fewer than two training cases to split, or a ``val_count`` that leaves none.
    """
    train = load_cases(info.path, train_key)
    if val_key is not None and val_key in info.keys:
        return train, load_cases(info.path, val_key)
    count = val_count if val_count is not None else max(1, round(len(train) * val_fraction))
    if not 0 < count < len(train):
        raise DatasetError(f"{info.path}: cannot hold out {count} validation case(s) from the {len(train)} in "
                           f"'{train_key}' (set data.val_count / data.val_fraction, or add a '{val_key}' list)")
    return train[:-count], train[-count:]


def image_channels(header_shape: Sequence[int]) -> int:
    """Channels of a NIfTI image: 1 for 3-D, the last axis for 4-D (Decathlon multi-modal images)."""
    if len(header_shape) == 3:
        return 1
    if len(header_shape) == 4:
        return int(header_shape[3])
    if len(header_shape) == 5 and header_shape[3] == 1:  # the NIfTI "vector" form (X, Y, Z, 1, C)
        return int(header_shape[4])
    raise DatasetError(f"expected a 3-D volume or a 4-D multi-channel volume, got shape {tuple(header_shape)}")


def _header_shape(path: str, role: str, source: str) -> tuple[int, ...]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{source}.{role}: file {file} does not exist")
    try:
        return tuple(int(s) for s in nib.load(str(file)).shape)
    except Exception as e:  # nibabel raises several types for unreadable files
        raise DatasetError(f"{source}.{role}: cannot read {file} as NIfTI ({e})") from None


def check_cases(cases: Sequence[dict[str, str]], in_channels: int, with_label: bool = True) -> None:
    """Read every header and check the files fit the network, before any training.

    Raises:
        FileNotFoundError: a listed file does not exist (names the ``dataset.json`` entry and the file).
        DatasetError: an unreadable file; an image whose spatial shape differs from its label's; a label with
            channels; an image whose channel count is not ``in_channels``.
    """
    for case in cases:
        source = case.get("source", case["image"])
        shape = _header_shape(case["image"], "image", source)
        channels = image_channels(shape)
        if channels != in_channels:
            raise DatasetError(f"{source}.image: {case['image']} has {channels} channel(s) (shape {shape}); the "
                               f"network expects model.in_channels={in_channels}")
        if not with_label:
            continue
        label_shape = _header_shape(case["label"], "label", source)
        if len(label_shape) != 3 and not (len(label_shape) == 4 and label_shape[3] == 1):
            raise DatasetError(f"{source}.label: {case['label']} must be a 3-D label map, got shape {label_shape}")
        if tuple(label_shape[:3]) != tuple(shape[:3]):
            raise DatasetError(f"{source}: image {case['image']} has spatial shape {tuple(shape[:3])} but label "
                               f"{case['label']} has {tuple(label_shape[:3])}")


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None) -> None:
    """Write a NIfTI file atomically (a temporary file beside it, then ``os.replace``).

    With ``header`` (e.g. the input's), its geometry fields are kept and the data type follows ``array``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine, header=header.copy() if header is not None else None)
    img.set_data_dtype(array.dtype)
    if header is None:
        img.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name[: -len(suffix)]}.tmp{os.getpid()}{suffix}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
