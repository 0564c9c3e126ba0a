"""Build / load the fused C++ extension once per machine and pick the scan backend."""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

__all__ = [
    "ScanBackend", "FusedUnavailable", "scan_backend", "set_scan_backend", "forced_scan_backend", "use_fused",
    "fused_status", "load",
]

_LOG = logging.getLogger("vmamba.ops.fused")
_SOURCE = Path(__file__).with_name("multi_scan.cpp")
_ENV = "VMAMBA_SCAN_BACKEND"


class ScanBackend(str, Enum):
    AUTO = "auto"  # fused when it can be built, else pure PyTorch
    TORCH = "torch"  # always the pure-PyTorch path
    FUSED = "fused"  # the fused C++ kernels, or an error


class FusedUnavailable(RuntimeError):
    """The fused kernels were required but cannot be built or loaded here."""


_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None
_override: ScanBackend | None = None
_announced = False


def _cache_dir() -> Path:
    # Keyed by CPU and compiler flags as well as the source, since -march=native code is machine specific.
    root = Path(os.environ.get("VMAMBA_CACHE", Path.home() / ".cache" / "vmamba"))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    key = hashlib.sha1((_SOURCE.read_text() + cpu + torch.__version__).encode()).hexdigest()[:16]
    path = root / f"multi_scan_{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load() -> ModuleType:
    """Compile (first time) and import the extension; raises :class:`FusedUnavailable` with the reason."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise FusedUnavailable(_error)
        try:
            from torch.utils import cpp_extension

            flags = ["-O3", "-march=native", "-fno-math-errno"] if platform.machine() in ("x86_64", "AMD64") else ["-O3"]
            _module = cpp_extension.load(
                name="vmamba_multi_scan",
                sources=[str(_SOURCE)],
                extra_cflags=flags,
                build_directory=str(_cache_dir()),
                verbose=False,
            )
        except Exception as err:  # noqa: BLE001 - any build failure means "fall back"
            _error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else err}"
            raise FusedUnavailable(_error) from err
        return _module


def set_scan_backend(backend: ScanBackend | str | None) -> None:
    """Force a backend for this process (``None`` returns to the environment variable)."""
    global _override
    _override = None if backend is None else ScanBackend(backend)


@contextmanager
def forced_scan_backend(backend: ScanBackend | str) -> Iterator[None]:
    """Run a block under ``backend``, then restore whatever was in force before (override or environment)."""
    global _override
    previous = _override
    _override = ScanBackend(backend)
    try:
        yield
    finally:
        _override = previous


def scan_backend() -> ScanBackend:
    if _override is not None:
        return _override
    value = os.environ.get(_ENV, ScanBackend.AUTO.value).lower()
    try:
        return ScanBackend(value)
    except ValueError:
        raise ValueError(f"{_ENV}={value!r}; expected one of {[b.value for b in ScanBackend]}") from None


def use_fused(*tensors: torch.Tensor) -> bool:
    """Whether the fused path should run for these tensors (CPU, float32-capable) under the current backend."""
    global _announced
    backend = scan_backend()
    if backend is ScanBackend.TORCH:
        return False
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    if not on_cpu:
        if backend is ScanBackend.FUSED:
            raise FusedUnavailable("the fused kernels run on CPU tensors only")
        return False
    try:
        load()
        ok = True
    except FusedUnavailable:
        if backend is ScanBackend.FUSED:
            raise
        ok = False
    if not _announced:
        _announced = True
        _LOG.info("vmamba scan backend: %s", "fused C++ kernels" if ok else f"pure PyTorch ({_error})")
    return ok


def fused_status() -> str:
    """One line saying which path is active and why."""
    backend = scan_backend()
    if backend is ScanBackend.TORCH:
        return f"pure PyTorch ({_ENV}=torch)"
    try:
        load()
        return "fused C++ kernels"
    except FusedUnavailable as err:
        return f"pure PyTorch (fused kernels unavailable: {err})"
