"""Training curves as a PNG: one panel per group of logged columns, against a shared x column.

Example::

    plot_curves(CsvLog("log.csv").rows(), "epoch",
                {"loss": ["train_loss", "val_loss"], "top-1 (%)": ["val_top1"]}, "curves.png")
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from tasks.common.checkpoint import atomic_write  # noqa: E402

__all__ = ["plot_curves"]


def plot_curves(rows: Sequence[Mapping[str, float | str]], x: str, panels: Mapping[str, Sequence[str]],
                path: str | Path) -> None:
    """Draw ``panels`` (title -> column names) side by side and write the figure to ``path`` atomically.

    Columns absent from every row are skipped; a panel with none present is left empty.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, columns) in zip(axes[0], panels.items()):
        for col in columns:
            pts = [(float(r[x]), float(r[col])) for r in rows if x in r and col in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=col)
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
