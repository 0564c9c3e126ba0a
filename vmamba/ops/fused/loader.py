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
    "ScanBackend", "FusedKernel", "FusedUnavailable", "scan_backend", "set_scan_backend", "forced_scan_backend",
    "use_fused", "use_fused_for_dtypes", "use_fused_inference", "fused_status", "load",
]

_LOG = logging.getLogger("vmamba.ops.fused")
_ENV = "VMAMBA_SCAN_BACKEND"


class ScanBackend(str, Enum):
    AUTO = "auto"  # fused when it can be built, else pure PyTorch
    TORCH = "torch"  # always the pure-PyTorch path
    FUSED = "fused"  # the fused C++ kernels, or an error


class FusedKernel(str, Enum):
    """The compiled extensions, one per C++ source in this folder (each built and cached on its own)."""

    # the selective scans, SS2D's depthwise conv + SiLU and the MLP's bias + GELU (multi_scan.cpp,
    # dwconv2d_silu.h, bias_gelu.h)
    MULTI_SCAN = "multi_scan"
    RECURRENCE = "recurrence"  # the decayed linear recurrence of GLA / retention / SSD / RWKV-7 (recurrence.cpp)
    CONV_SILU = "conv_silu"  # Mamba's depthwise conv + SiLU over a channels-last sequence, inference (conv_silu.cpp)

    @property
    def source(self) -> Path:
        return Path(__file__).with_name(f"{self.value}.cpp")


# Included by the kernel sources: a change to any of them must rebuild them all.
_SHARED_HEADERS = sorted(Path(__file__).parent.glob("*.h"))


class FusedUnavailable(RuntimeError):
    """The fused kernels were required but cannot be built or loaded here."""


_lock = threading.Lock()
_modules: dict[FusedKernel, ModuleType] = {}
_errors: dict[FusedKernel, str] = {}
_override: ScanBackend | None = None
_announced: set[FusedKernel] = set()
_single_threaded: set[FusedKernel] = set()  # built without OpenMP


def _compiler_flags(parallel: bool) -> list[str]:
    """``-march=native`` code for this CPU on x86; ``-fopenmp`` so ``at::parallel_for`` in the kernels uses
    PyTorch's thread pool (without it the loop silently runs on one thread)."""
    flags = ["-O3", "-march=native", "-fno-math-errno"] if platform.machine() in ("x86_64", "AMD64") else ["-O3"]
    return flags + ["-fopenmp"] if parallel else flags


def _cache_dir(kernel: FusedKernel, flags: list[str]) -> Path:
    # Keyed by CPU and compiler flags as well as the source, since -march=native code is machine specific.
    root = Path(os.environ.get("VMAMBA_CACHE", Path.home() / ".cache" / "vmamba"))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    sources = kernel.source.read_text() + "".join(h.read_text() for h in _SHARED_HEADERS)
    key = hashlib.sha1((sources + cpu + torch.__version__ + " ".join(flags)).encode()).hexdigest()[:16]
    path = root / f"{kernel.value}_{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build(kernel: FusedKernel, parallel: bool) -> ModuleType:
    from torch.utils import cpp_extension

    flags = _compiler_flags(parallel)
    return cpp_extension.load(
        name=f"vmamba_{kernel.value}",
        sources=[str(kernel.source)],
        extra_cflags=flags,
        # libgomp's soname matches the copy PyTorch already loaded, so the kernels share its thread pool
        # and follow torch.set_num_threads.
        extra_ldflags=["-fopenmp"] if parallel else [],
        build_directory=str(_cache_dir(kernel, flags)),
        verbose=False,
    )


def load(kernel: FusedKernel = FusedKernel.MULTI_SCAN) -> ModuleType:
    """Compile (first time) and import one extension; raises :class:`FusedUnavailable` with the reason."""
    kernel = FusedKernel(kernel)
    with _lock:
        if kernel in _modules:
            return _modules[kernel]
        if kernel in _errors:
            raise FusedUnavailable(_errors[kernel])
        try:
            try:
                _modules[kernel] = _build(kernel, parallel=True)
            except Exception as err:  # noqa: BLE001 - a compiler without OpenMP: build single-threaded kernels
                _LOG.warning("vmamba %s: OpenMP build failed (%s); building single-threaded kernels", kernel.value, err)
                _modules[kernel] = _build(kernel, parallel=False)
                _single_threaded.add(kernel)
        except Exception as err:  # noqa: BLE001 - any build failure means "fall back"
            text = str(err).strip()
            _errors[kernel] = f"{type(err).__name__}: {text.splitlines()[-1] if text else err}"
            raise FusedUnavailable(_errors[kernel]) from err
        return _modules[kernel]


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


def use_fused(*tensors: torch.Tensor, kernel: FusedKernel = FusedKernel.MULTI_SCAN) -> bool:
    """Whether the fused path should run for these tensors (CPU, float32-capable) under the current backend."""
    backend = scan_backend()
    if backend is ScanBackend.TORCH:
        return False
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    if not on_cpu:
        if backend is ScanBackend.FUSED:
            raise FusedUnavailable("the fused kernels run on CPU tensors only")
        return False
    try:
        load(kernel)
        ok = True
    except FusedUnavailable:
        if backend is ScanBackend.FUSED:
            raise
        ok = False
    if kernel not in _announced:
        _announced.add(kernel)
        _LOG.info("vmamba %s backend: %s", kernel.value, "fused C++ kernel" if ok else f"pure PyTorch ({_errors.get(kernel)})")
    return ok


def use_fused_for_dtypes(
    *tensors: torch.Tensor | None, kernel: FusedKernel, dtypes: tuple[torch.dtype, ...]
) -> bool:
    """:func:`use_fused`, and False when an input has a dtype outside ``dtypes`` (those keep their own
    arithmetic on the PyTorch path); ``None`` entries are absent optional inputs."""
    present = [t for t in tensors if t is not None]
    if any(t.dtype not in dtypes for t in present):
        return False
    return use_fused(*present, kernel=kernel)


def use_fused_inference(
    *tensors: torch.Tensor | None, kernel: FusedKernel, dtypes: tuple[torch.dtype, ...]
) -> bool:
    """:func:`use_fused_for_dtypes` for a forward-only kernel: also False when an input needs a gradient (the
    kernel has no backward)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return use_fused_for_dtypes(*tensors, kernel=kernel, dtypes=dtypes)


def fused_status(kernel: FusedKernel = FusedKernel.MULTI_SCAN) -> str:
    """One line saying which path is active for ``kernel`` and why."""
    backend = scan_backend()
    if backend is ScanBackend.TORCH:
        return f"pure PyTorch ({_ENV}=torch)"
    try:
        load(kernel)
        return "fused C++ kernels" + (" (single-threaded: no OpenMP)" if kernel in _single_threaded else "")
    except FusedUnavailable as err:
        return f"pure PyTorch (fused kernels unavailable: {err})"
