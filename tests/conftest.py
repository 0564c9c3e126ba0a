"""Shared test helpers: the official fixtures beside the project root, deterministic threads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"

torch.set_num_threads(2)


def fixture_path(*parts: str) -> Path:
    """Path under ``../shared/fixtures``; skips the test when the reference material is absent."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference fixture {path} not available")
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
