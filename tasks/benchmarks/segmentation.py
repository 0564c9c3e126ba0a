"""3-D VMamba U-Net against MONAI's SwinUNETR (feature size 48) and UNETR on a 96^3 CT patch.

Batch 1, one input channel, 14 output classes (BTCV), fp32. For every model: parameters, forward time
(inference, ``torch.inference_mode``), forward+backward time (a training step's passes) and the peak memory
a forward+backward needs above the weights, gradients and input. Each (model, pass) is measured in its own
child process (:func:`tasks.compare.speed.run_cell`) so no model's allocations or high-water mark leak into
another's: CPU memory is the resident-set high-water mark above the child's baseline, CUDA memory
``max_memory_allocated`` above it. Children run round-robin over the models (``trials`` rounds) and each
reports the median of its repeats; the table takes the median over trials. Ratios are ours / theirs.

Targets (issue 5): VMamba U-Net forward+backward no slower than SwinUNETR's (ratio <= 1.0) and at most 0.7x
its peak memory, in the same run.
"""
from __future__ import annotations

import statistics

import torch

from tasks.benchmarks.common import format_ratio, print_table
from tasks.compare.config import Device, ModelSource, ModelSpec, PassMode, SpeedConfig, Task
from tasks.compare.speed import CellJob, CellResult, run_cell

OURS = ModelSpec(name="VMambaUNet", source=ModelSource.BACKBONES, label="VMambaUNet")
MODELS = (
    OURS,
    ModelSpec(name="SwinUNETR", source=ModelSource.MONAI, label="SwinUNETR (fs 48)", kwargs={"feature_size": 48}),
    ModelSpec(name="UNETR", source=ModelSource.MONAI, label="UNETR"),
)
REFERENCE = "SwinUNETR (fs 48)"
TARGET_TIME_RATIO = 1.0
TARGET_MEMORY_RATIO = 0.7
NUM_CLASSES = 14


def _median(results: list[CellResult], attr: str) -> float | None:
    values = [getattr(r, attr) for r in results if r.ok and getattr(r, attr) is not None]
    return statistics.median(values) if values else None


def _measure(size: int, mode: PassMode, repeats: int, trials: int) -> dict[str, list[CellResult]]:
    speed = SpeedConfig(resolutions=[size], batch_size=1, in_chans=1, num_classes=NUM_CLASSES, spatial_dims=3,
                        warmup=1, repeats=repeats, trials=trials, mode=mode, threads=torch.get_num_threads(),
                        device=Device.AUTO, timeout_s=3600.0, count_flops=False, pass_img_size=True)
    out: dict[str, list[CellResult]] = {m.display: [] for m in MODELS}
    for trial in range(trials):
        for spec in MODELS:
            result = run_cell(CellJob(spec=spec, task=Task.SEGMENTATION, resolution=size, speed=speed, trial=trial))
            if result.ok:  # progress: the full run takes minutes (SwinUNETR's fwd+bwd alone ~20-30 s a step)
                peak = result.peak_memory_bytes
                memory = "" if peak is None else f", peak {peak / 2**20:.0f} MiB"
                print(f"  {spec.display} {mode.value} trial {trial}: median {result.median_step_seconds:.2f} s"
                      f"{memory} ({result.wall_seconds or 0:.0f} s in its process)", flush=True)
            else:
                print(f"  {spec.display} {mode.value}: n/a ({result.reason})", flush=True)
            out[spec.display].append(result)
    return out


def run(quick: bool) -> None:
    size = 64 if quick else 96
    # One child per (model, pass) with a warm-up and three timed steps; a second trial round would double the
    # ~5 minute run for little: the children already isolate the models and the median drops outliers.
    repeats, trials = (1, 1) if quick else (3, 1)
    forward = _measure(size, PassMode.FORWARD, repeats, trials)
    train = _measure(size, PassMode.FORWARD_BACKWARD, repeats, trials)
    stats = {}
    for spec in MODELS:
        name = spec.display
        stats[name] = {
            "params": _median(train[name], "params") or _median(forward[name], "params"),
            "fwd": _median(forward[name], "median_step_seconds"),
            "fwdbwd": _median(train[name], "median_step_seconds"),
            "mem": _median(train[name], "peak_memory_bytes"),
        }
    ours = stats[OURS.display]
    device = next((r.device for r in train[OURS.display] if r.device), "?")

    def fmt(value: float | None, pattern: str) -> str:
        return pattern.format(value) if value is not None else "n/a"

    def ratio(a: float | None, b: float | None) -> str:
        return format_ratio(a, b) if a is not None and b else "n/a"

    rows = []
    for spec in MODELS:
        s = stats[spec.display]
        rows.append([
            spec.display, fmt(s["params"] and s["params"] / 1e6, "{:.1f}"), fmt(s["fwd"], "{:.2f}"),
            fmt(s["fwdbwd"], "{:.2f}"), fmt(s["mem"] and s["mem"] / 2**20, "{:.0f}"),
            ratio(ours["fwd"], s["fwd"]), ratio(ours["fwdbwd"], s["fwdbwd"]), ratio(ours["mem"], s["mem"]),
        ])
    print_table(
        f"Segmentation: {size}^3, batch 1, 1 -> {NUM_CLASSES} classes, fp32, {device}, "
        f"{torch.get_num_threads()} threads; medians of {repeats} step(s) x {trials} trial(s), one process per "
        f"model and pass",
        ["model", "params (M)", "forward (s)", "fwd+bwd (s)", "fwd+bwd peak (MiB)", "ours/model fwd",
         "ours/model fwd+bwd", "ours/model memory"],
        rows,
    )
    ref = stats[REFERENCE]
    if ours["fwdbwd"] and ref["fwdbwd"] and ours["mem"] and ref["mem"]:
        t, m = ours["fwdbwd"] / ref["fwdbwd"], ours["mem"] / ref["mem"]
        print(f"\ntarget fwd+bwd time vs {REFERENCE}: {t:.2f}x (<= {TARGET_TIME_RATIO}: "
              f"{'met' if t <= TARGET_TIME_RATIO else 'NOT met'}); peak memory: {m:.2f}x (<= {TARGET_MEMORY_RATIO}: "
              f"{'met' if m <= TARGET_MEMORY_RATIO else 'NOT met'})" + (" [quick: 64^3, not the target size]"
                                                                          if quick else ""))
