"""A CSV metrics log that survives restarts: one row per epoch, rewritten atomically.

The whole file is rewritten on every append (logs are small: one row per epoch), so the header can grow
when a later row brings a new column, and a resumed run can drop rows past the epoch it restarts from.

Example::

    log = CsvLog("runs/x/log.csv")
    log.append({"epoch": 1, "train_loss": 2.3})
    log.truncate_after("epoch", 1)      # on resume from epoch 1
    log.rows()                          # [{"epoch": 1.0, "train_loss": 2.3}]
"""
from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any
from pathlib import Path

from tasks.common.checkpoint import atomic_write

__all__ = ["CsvLog", "csv_text"]


class CsvLog:
    """Rows of named numbers (or strings) kept in ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def rows(self) -> list[dict[str, float | str]]:
        """All rows; numeric cells as floats, empty cells omitted."""
        if not self.path.exists():
            return []
        with open(self.path, newline="") as fh:
            return [{k: _number(v) for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(fh)]

    def append(self, row: Mapping[str, float | int | str]) -> None:
        """Add one row (new columns extend the header)."""
        self._write(self.rows() + [dict(row)])

    def truncate_after(self, key: str, value: float) -> None:
        """Drop rows whose ``key`` is greater than ``value`` (e.g. epochs a resumed run will redo)."""
        if self.path.exists():
            self._write([r for r in self.rows() if not (key in r and float(r[key]) > value)])

    def _write(self, rows: list[dict[str, float | int | str]]) -> None:
        text = csv_text(rows)
        atomic_write(self.path, lambda tmp: tmp.write_text(text))


def csv_text(rows: list[dict[str, Any]]) -> str:
    """CSV text of ``rows``: columns in order of first appearance, ``None`` and missing values left empty."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text
