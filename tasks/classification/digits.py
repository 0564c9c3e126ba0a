"""The embedded default data set: scikit-learn's real handwritten digits written as an ImageFolder.

``sklearn.datasets.load_digits`` ships 1,797 scanned 8x8 grey digits (16 grey levels) with the package, so
nothing is downloaded. They are upscaled (bicubic) to RGB PNGs and split per class, deterministically:
every ``val_every``-th image of each class goes to ``val``, the rest to ``train``.

    python -m tasks.classification.digits data/digits        # writes data/digits/{train,val}/<0..9>/*.png
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["write_digits_imagefolder"]


def write_digits_imagefolder(root: str | Path, size: int = 32, val_every: int = 5) -> Path:
    """Write the digits as ``root/{train,val}/<digit>/<index>.png`` unless ``root`` already exists.

    The folder appears atomically (written beside it, then renamed), so an interrupted write never leaves
    a partial data set behind.

    Args:
        size: output side length in pixels (the source is 8x8).
        val_every: one image in ``val_every`` of each class goes to ``val`` (5 -> 20 %).

    Returns:
        ``root``.
    """
    root = Path(root)
    if root.exists():
        return root
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn ships the images; it is in the dev extra, not a core dependency
        raise ImportError("the digits data set comes with scikit-learn: pip install scikit-learn") from e
    if size < 8 or val_every < 2:
        raise ValueError(f"size must be >= 8 and val_every >= 2, got size={size}, val_every={val_every}")
    digits = load_digits()
    images = np.clip(digits.images / 16.0 * 255.0, 0, 255).astype(np.uint8)  # (N, 8, 8), source range 0..16
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        seen = np.zeros(10, dtype=np.int64)
        for index, (img, label) in enumerate(zip(images, digits.target)):
            split = "val" if seen[label] % val_every == val_every - 1 else "train"
            seen[label] += 1
            folder = tmp / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            big = Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
            big.save(folder / f"{index:04d}.png")
        tmp.replace(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder to create (left alone if it exists)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--val-every", type=int, default=5, help="every n-th image per class to val (default 5)")
    args = parser.parse_args(argv)
    print(write_digits_imagefolder(args.root, args.size, args.val_every))


if __name__ == "__main__":
    main()
