"""Shared test helpers: the official fixtures beside the project root, the compiled kernels' availability,
deterministic threads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vmamba.ops.fused import FusedKernel, FusedUnavailable
from vmamba.ops.fused.loader import load

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"

torch.set_num_threads(2)


def fixture_path(*parts: str) -> Path:
    """Path under ``../shared/fixtures``; skips the test when the reference material is absent."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference fixture {path} not available")
    return path


def fused_kernel_error(kernel: FusedKernel = FusedKernel.MULTI_SCAN) -> str | None:
    """Why the compiled extension ``kernel`` cannot be built or loaded here, or ``None`` when it loads."""
    try:
        load(kernel)
    except FusedUnavailable as err:  # pragma: no cover - depends on the machine
        return str(err)
    return None


def needs_fused_kernel(kernel: FusedKernel = FusedKernel.MULTI_SCAN) -> pytest.MarkDecorator:
    """Skip mark for tests of the compiled ``kernel``, giving the reason where it cannot be built."""
    error = fused_kernel_error(kernel)
    return pytest.mark.skipif(error is not None, reason=f"{kernel.value} kernel cannot be built here: {error}")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
