"""PNG figures of a segmentation run: training curves (via :mod:`tasks.common.plots`) and a slice overlay."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from torch import Tensor  # noqa: E402

from tasks.common.checkpoint import atomic_write  # noqa: E402
from tasks.common.plots import plot_curves  # noqa: E402

__all__ = ["plot_overlay", "plot_training_curves", "best_slice"]


def best_slice(label: np.ndarray, axis: int = 2) -> int:
    """The slice index along ``axis`` with the most foreground (the middle one when there is none)."""
    counts = (label > 0).sum(axis=tuple(a for a in range(label.ndim) if a != axis))
    return int(counts.argmax()) if counts.any() else label.shape[axis] // 2


def plot_overlay(image: Tensor | np.ndarray, label: Tensor | np.ndarray | None, pred: Tensor | np.ndarray,
                 class_names: Sequence[str], path: str | Path, axis: int = 2, title: str = "") -> None:
    """Image | truth over image | prediction over image, for the slice with the most foreground.

    Args:
        image: ``(X, Y, Z)`` (one channel) or ``(H, W)``.
        label: same shape as ``image`` or None (prediction only).
        pred: same shape.
        class_names: names by label index (background first) for the legend.
    """
    image, pred = np.asarray(image, dtype=np.float32), np.asarray(pred)
    label = None if label is None else np.asarray(label)
    if image.ndim == 3:
        index = best_slice(label if label is not None else pred, axis)
        take = lambda a: np.take(a, index, axis=axis)  # noqa: E731
        image, pred = take(image), take(pred)
        label = None if label is None else take(label)
        where = f"slice {index} along axis {axis}"
    else:
        where = "slice"
    colours = plt.get_cmap("tab10")(np.arange(max(len(class_names), 2)) % 10)
    colours[0, 3] = 0.0  # background transparent
    cmap = ListedColormap(colours)
    panels = [("image", None)] + ([("truth", label)] if label is not None else []) + [("prediction", pred)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4), squeeze=False)
    lo, hi = np.percentile(image, [1, 99])
    for ax, (name, overlay) in zip(axes[0], panels):
        ax.imshow(image.T, cmap="gray", origin="lower", vmin=lo, vmax=hi)  # RAS: x right, y up
        if overlay is not None:
            ax.imshow(overlay.T, cmap=cmap, origin="lower", alpha=0.45, vmin=0, vmax=len(colours) - 1,
                      interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    handles = [matplotlib.patches.Patch(color=colours[i], label=n) for i, n in enumerate(class_names) if i > 0]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    fig.suptitle(f"{title} ({where})".strip(), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def plot_training_curves(rows: Sequence[Mapping[str, float | str]], class_names: Sequence[str],
                         path: str | Path) -> None:
    """Loss, Dice per class and mean, HD95 per class against the epoch."""
    plot_curves(rows, "epoch", {
        "loss": ["train_loss"],
        "validation Dice": ["val_mean_dice"] + [f"val_dice_{c}" for c in class_names],
        "validation HD95 (mm)": ["val_mean_hd95"] + [f"val_hd95_{c}" for c in class_names],
    }, path)
