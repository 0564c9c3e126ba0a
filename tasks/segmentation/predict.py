"""Segment NIfTI volumes with trained weights; write label maps in each input's own geometry.

    vmamba-seg-predict --checkpoint runs/mni152_tissue/best.safetensors --input scan.nii.gz --output preds/
    vmamba-seg-predict --checkpoint runs/spleen/best.safetensors --input /data/Task09_Spleen/imagesTs --output preds/
    vmamba-seg-predict --checkpoint runs/mni152_tissue/best.safetensors --list test --output preds/

Each input goes through the training pre-processing (orientation, spacing, intensity, foreground crop),
``sliding_window_inference`` (``SliceInferer`` for 2-D networks) and a softmax; MONAI's ``Invertd`` undoes
the pre-processing on the class probabilities (crop -> pad, spacing -> resample back, orientation -> back),
and the argmax is written as ``<name>_seg.nii.gz`` (uint8) with the input's affine and header: the same shape
and geometry as the input, ready to overlay on it. ``--overlay`` also writes ``<name>_seg.png``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd
from tqdm import tqdm

from tasks.segmentation.config import SegmentationConfig
from tasks.segmentation.data import DatasetError, image_channels, load_test_images, write_nifti
from tasks.segmentation.engine import build_model, config_from_checkpoint, infer, load_model_weights, plain
from tasks.segmentation.plots import plot_overlay
from tasks.segmentation.train import USER_ERRORS, ensure_builtin_data
from tasks.segmentation.transforms import predict_transforms
from tasks.common.cli import run_command
from tasks.common.distributed import resolve_device

__all__ = ["find_inputs", "predict", "run", "main"]

_SUFFIXES = (".nii.gz", ".nii")


def find_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """NIfTI files named directly or found in the named folders (sorted), checked to exist.

    Raises:
        FileNotFoundError: a path that does not exist; DatasetError: a folder without NIfTI files.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.name.endswith(_SUFFIXES) and not f.name.startswith("."))
            if not found:
                raise DatasetError(f"input folder {p} holds no .nii / .nii.gz files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    return out


def _stem(path: Path) -> str:
    for suffix in _SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def predict(cfg: SegmentationConfig, checkpoint: str | Path, inputs: Sequence[str | Path], output: str | Path,
            class_names: Sequence[str], overlay: bool = False) -> list[Path]:
    """Write one ``<name>_seg.nii.gz`` per input into ``output``; returns their paths.

    Raises:
        FileNotFoundError / DatasetError: a missing or unreadable input, or one with the wrong channel count.
    """
    device = resolve_device(cfg.train.device)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    files = find_inputs(inputs)
    originals = {}
    for f in files:  # check every input before the first (slow) prediction
        try:
            originals[f] = nib.load(str(f))
        except Exception as e:  # nibabel raises several types for unreadable files
            raise DatasetError(f"cannot read input {f} as NIfTI ({e})") from None
        channels = image_channels(originals[f].shape)
        if channels != cfg.model.in_channels:
            raise DatasetError(f"input {f} has {channels} channel(s) (shape {originals[f].shape}); the network "
                               f"expects model.in_channels={cfg.model.in_channels}")
    model = build_model(cfg.model, load_encoder_checkpoint=False)
    load_model_weights(model, checkpoint)
    model.to(device).eval()
    pre = predict_transforms(cfg)
    invert = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True)
    output = Path(output)
    written = []
    for f in tqdm(files, desc="predict", disable=not cfg.train.progress):
        data = pre({"image": str(f)})
        probs = torch.softmax(infer(model, plain(data["image"])[None].to(device), cfg)[0], dim=0)
        data["pred"] = MetaTensor(probs)  # Invertd takes the operations to undo from data["image"]
        restored = plain(invert(data)["pred"])
        labels = restored.argmax(0).numpy().astype(np.uint8)
        original = originals[f]
        if labels.shape != tuple(original.shape[:3]):
            raise RuntimeError(f"inverting the pre-processing of {f} gave shape {labels.shape}, not the input's "
                               f"{tuple(original.shape[:3])}")
        header = original.header.copy()
        if len(original.shape) > 3:  # a multi-channel input: the label map is 3-D
            header.set_data_shape(original.shape[:3])
        target = output / f"{_stem(f)}_seg.nii.gz"
        write_nifti(target, labels, original.affine, header)
        written.append(target)
        if overlay:
            volume = np.asanyarray(original.dataobj, dtype=np.float32)
            plot_overlay(volume if volume.ndim == 3 else volume[..., 0], None, labels, class_names,
                         target.with_name(f"{_stem(f)}_seg.png"), axis=cfg.slices.axis, title=_stem(f))
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmamba-seg-predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="weights written by training (.safetensors)")
    parser.add_argument("--input", nargs="+", default=[], help="NIfTI files and/or folders of them")
    parser.add_argument("--list", metavar="KEY", help="predict the images of this dataset.json list (e.g. test) "
                                                      "of the config's data.root")
    parser.add_argument("--output", required=True, help="folder for the <name>_seg.nii.gz label maps")
    parser.add_argument("--config", help="config file or recipe (default: the one stored in the checkpoint)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--data-dir", help="Decathlon folder for --list (sets data.root)")
    parser.add_argument("--device", help="cpu, cuda or auto (sets train.device)")
    parser.add_argument("--overlay", action="store_true", help="also write a PNG of a slice with the prediction")
    return parser


def run(argv: list[str] | None = None) -> list[Path]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.input and not args.list:
        parser.error("give --input FILES/FOLDERS or --list KEY")
    overrides = ([f"data.root={args.data_dir}"] if args.data_dir else []) + \
                ([f"train.device={args.device}"] if args.device else []) + list(args.set)
    cfg, names = config_from_checkpoint(args.checkpoint, args.config, overrides)
    inputs = list(args.input)
    if args.list:
        ensure_builtin_data(cfg)
        inputs += [c["image"] for c in load_test_images(Path(cfg.data.root) / cfg.data.dataset_json, args.list)]
    written = predict(cfg, args.checkpoint, inputs, args.output, names, overlay=args.overlay)
    for path in written:
        print(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """Console entry point: :func:`run`, with user mistakes reported as ``error: ...`` (exit status 1)."""
    run_command(run, argv, USER_ERRORS)


if __name__ == "__main__":
    main()
