"""Throughput, peak memory, parameters and FLOPs of one model at one resolution, in its own process.

Each cell (model, resolution, trial) runs in a fresh child Python (:mod:`tasks.compare.worker`) so the
allocator state, caches and high-water marks of one model never show up in another's numbers, and a
model that crashes or runs out of memory only loses its own cell. The parent sends the job as JSON on
stdin and reads one JSON result line back.

Memory is the peak *above* the child's baseline taken after imports, model build, input allocation and
the warm-up steps (so one-time library set-up such as thread pools and kernel caches is not counted,
and freed heap pages are handed back with ``malloc_trim`` first), i.e. what the timed forward (and
backward) passes need on top of the weights:

- CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` at the baseline.
- CPU on Linux: the high-water mark of the resident set (``VmHWM``), reset at the baseline through
  ``/proc/self/clear_refs``, minus the resident set at the baseline.
- CPU elsewhere: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the runs minus its value at the
  baseline (a lower bound when building the model peaked higher than the forward does).
"""
from __future__ import annotations

import dataclasses
import enum
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tasks.common.config import config_from_dict, config_to_dict

from .config import Device, ModelSpec, PassMode, SpeedConfig, Task

__all__ = ["MemoryMethod", "CellJob", "CellResult", "measure_cell", "run_cell", "RESULT_PREFIX"]

RESULT_PREFIX = "COMPARE_RESULT "


class MemoryMethod(str, enum.Enum):
    CUDA_ALLOCATED = "cuda max_memory_allocated minus baseline"
    RSS_HIGH_WATER = "VmHWM (reset via /proc/self/clear_refs) minus baseline RSS"
    RUSAGE_MAXRSS = "getrusage ru_maxrss minus baseline ru_maxrss"


@dataclass
class CellJob:
    """Everything a child needs to measure one (model, resolution, trial) cell."""

    spec: ModelSpec
    task: Task
    resolution: int
    speed: SpeedConfig
    trial: int = 0
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(
            {
                "spec": config_to_dict(self.spec),
                "task": self.task.value,
                "resolution": self.resolution,
                "speed": config_to_dict(self.speed),
                "trial": self.trial,
                "seed": self.seed,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "CellJob":
        raw = json.loads(text)
        return cls(
            spec=config_from_dict(ModelSpec, raw["spec"], prefix="job.spec"),
            task=Task(raw["task"]),
            resolution=int(raw["resolution"]),
            speed=config_from_dict(SpeedConfig, raw["speed"], prefix="job.speed"),
            trial=int(raw["trial"]),
            seed=int(raw["seed"]),
        )


@dataclass
class CellResult:
    """One cell's numbers; ``ok`` False means n/a, with ``reason`` saying why."""

    label: str
    resolution: int
    trial: int
    ok: bool
    reason: str = ""
    params: int | None = None
    flops: float | None = None
    step_seconds: list[float] = field(default_factory=list)
    batch_size: int = 1
    peak_memory_bytes: int | None = None
    memory_method: str | None = None
    device: str | None = None
    wall_seconds: float | None = None

    @property
    def median_step_seconds(self) -> float | None:
        return statistics.median(self.step_seconds) if self.step_seconds else None

    @property
    def images_per_second(self) -> float | None:
        median = self.median_step_seconds
        return self.batch_size / median if median else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- child


def _rss_bytes() -> int | None:
    """Current resident set of this process (Linux ``/proc``), or None where unavailable."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_high_water() -> bool:
    """Reset this process's peak-RSS mark (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _high_water_bytes() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``) so the baseline RSS holds no dead buffers
    from the warm-up; a no-op where glibc is absent."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _maxrss_bytes() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # Linux reports KiB, macOS bytes


class _PeakMemory:
    """Baseline now; peak above it later. Picks the most exact method the platform offers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        gc.collect()
        _release_free_heap()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.method = MemoryMethod.CUDA_ALLOCATED
            self.baseline = torch.cuda.memory_allocated(device)
            return
        rss = _rss_bytes()
        if rss is not None and _reset_high_water() and _high_water_bytes() is not None:
            self.method = MemoryMethod.RSS_HIGH_WATER
            self.baseline = rss
        else:
            self.method = MemoryMethod.RUSAGE_MAXRSS
            self.baseline = _maxrss_bytes()

    def peak_above_baseline(self) -> int:
        if self.method is MemoryMethod.CUDA_ALLOCATED:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method is MemoryMethod.RSS_HIGH_WATER:
            peak = _high_water_bytes() or 0
        else:
            peak = _maxrss_bytes()
        return max(0, peak - self.baseline)


def _scalar_loss(output: Any) -> torch.Tensor:
    """A scalar from whatever a model returns (tensor, tuple/list of tensors, dict of tensors)."""
    if isinstance(output, torch.Tensor):
        return output.float().mean()
    if isinstance(output, dict):
        output = list(output.values())
    tensors = [_scalar_loss(o) for o in output if isinstance(o, (torch.Tensor, list, tuple, dict))]
    if not tensors:
        raise ValueError("the model returned no tensor to take a loss from")
    return torch.stack(tensors).sum()


def _make_step(model: torch.nn.Module, x: torch.Tensor, mode: PassMode) -> Callable[[], None]:
    if mode is PassMode.FORWARD:

        def step() -> None:
            with torch.inference_mode():
                model(x)

    else:

        def step() -> None:
            model.zero_grad(set_to_none=False)
            _scalar_loss(model(x)).backward()

    return step


def _count_flops(step: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def _pick_device(choice: Device) -> torch.device:
    if choice is Device.CUDA or (choice is Device.AUTO and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("speed.device is cuda but torch.cuda.is_available() is False")
        return torch.device("cuda")
    return torch.device("cpu")


def _short(err: BaseException, limit: int = 240) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def measure_cell(job: CellJob) -> CellResult:
    """Measure one cell in *this* process (the child). Failures become an n/a result with the reason."""
    from .models import build_model, count_parameters, input_shape

    speed = job.speed
    start = time.perf_counter()
    result = CellResult(label=job.spec.display, resolution=job.resolution, trial=job.trial, ok=False,
                        batch_size=speed.batch_size)
    torch.set_num_threads(speed.threads)
    torch.manual_seed(job.seed)
    device = _pick_device(speed.device)
    result.device = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
    try:
        model = build_model(
            job.spec, job.task,
            resolution=job.resolution if speed.pass_img_size else None,
            in_chans=speed.in_chans, num_classes=speed.num_classes, spatial_dims=speed.spatial_dims,
        )
    except Exception as err:  # noqa: BLE001 - the reason is the result
        result.reason = f"cannot build at {job.resolution}: {_short(err)}"
        return result
    result.params = count_parameters(model)
    model.to(device).train(speed.mode is PassMode.FORWARD_BACKWARD)
    x = torch.randn(input_shape(speed.batch_size, speed.in_chans, job.resolution, speed.spatial_dims),
                    device=device)
    step = _make_step(model, x, speed.mode)
    try:
        for _ in range(speed.warmup):
            step()
        memory = _PeakMemory(device)
        for _ in range(speed.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result.step_seconds.append(time.perf_counter() - t0)
        result.peak_memory_bytes = memory.peak_above_baseline()
        result.memory_method = memory.method.value
        # Counted after the timed steps so the counting pass never sets the memory peak.
        if speed.count_flops:
            result.flops = _count_flops(step)
    except Exception as err:  # noqa: BLE001
        result.step_seconds = []
        result.peak_memory_bytes = None
        result.reason = f"fails at {job.resolution}: {_short(err)}"
        return result
    result.ok = True
    result.wall_seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------- parent


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def run_cell(job: CellJob) -> CellResult:
    """Measure one cell in a fresh child process; a crash or timeout becomes an n/a result."""
    start = time.perf_counter()
    failed = CellResult(label=job.spec.display, resolution=job.resolution, trial=job.trial, ok=False,
                        batch_size=job.speed.batch_size)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tasks.compare.worker"],
            input=job.to_json(), capture_output=True, text=True,
            timeout=job.speed.timeout_s, env=_child_env(job.speed.threads),
        )
    except subprocess.TimeoutExpired:
        failed.reason = f"timed out after {job.speed.timeout_s:g} s at {job.resolution}"
        return failed
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return CellResult(**json.loads(line[len(RESULT_PREFIX):]))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:240]
    failed.reason = f"child exited with code {proc.returncode} at {job.resolution} (killed for memory?): {tail}"
    failed.wall_seconds = time.perf_counter() - start
    return failed
