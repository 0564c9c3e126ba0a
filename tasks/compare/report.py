"""The comparison's output folder: CSVs, a Markdown table, PNG plots and the environment record.

Files written into the output folder:

- ``summary.csv``: one row per model (parameters, GMACs at the reference resolution, growth exponents,
  accuracy metrics, training time).
- ``measurements.csv``: one row per (model, resolution): throughput, step time, peak memory, GMACs, or
  n/a with the reason.
- ``results.md``: the tables (Markdown), the settings and the n/a reasons.
- ``throughput.png``, ``memory.png``: against resolution, one line per model (log scale).
- ``accuracy_vs_flops.png``: the accuracy metric against GMACs (when accuracy was measured).
- ``environment.json``: machine, CPU, threads, library versions, device, date, command, settings.
- ``config.yaml``: the exact settings of the run (readable back with ``--config``).

GMACs = FLOPs / 2 (one multiply-accumulate is two FLOPs), FLOPs as counted by
``torch.utils.flop_counter.FlopCounterMode`` with the scan formulas registered.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from tasks.common.checkpoint import atomic_write  # noqa: E402
from tasks.common.config import save_config  # noqa: E402
from tasks.common.csv_log import csv_text  # noqa: E402

from .accuracy import PRIMARY_METRIC, metric_title  # noqa: E402
from .config import CompareConfig, PassMode, config_to_dict  # noqa: E402
from .runner import CompareResult  # noqa: E402

__all__ = ["REPORT_FILES", "write_report", "environment_record", "markdown_tables"]

REPORT_FILES = (
    "summary.csv", "measurements.csv", "results.md", "throughput.png", "memory.png",
    "accuracy_vs_flops.png", "environment.json", "config.yaml",
)

MB = 2**20


def _gmacs(flops: float | None) -> float | None:
    return None if flops is None else flops / 2 / 1e9


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if abs(value) >= 10 ** digits:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def summary_rows(result: CompareResult) -> list[dict[str, Any]]:
    cfg = result.config
    ref = cfg.speed.resolutions[0]
    rows = []
    for m in result.models:
        row: dict[str, Any] = {
            "model": m.label,
            "name": m.name,
            "params_m": None if m.params is None else m.params / 1e6,
            f"gmacs_at_{ref}": _gmacs(m.reference.flops) if m.reference else None,
        }
        for cell in m.cells:
            row[f"images_per_s_at_{cell.resolution}"] = cell.images_per_second
        for cell in m.cells:
            row[f"peak_mem_mb_at_{cell.resolution}"] = (
                None if cell.peak_memory_bytes is None else cell.peak_memory_bytes / MB)
        row["time_exponent"] = m.time_exponent
        row["memory_exponent"] = m.memory_exponent
        row["flops_exponent"] = m.flops_exponent
        if m.accuracy is not None:
            for key, value in m.accuracy.metrics.items():
                row[key] = value
            row["train_seconds"] = m.accuracy.train_seconds
            row["accuracy_note"] = "" if m.accuracy.ok else m.accuracy.reason
        rows.append(row)
    return rows


def measurement_rows(result: CompareResult) -> list[dict[str, Any]]:
    cfg = result.config
    rows = []
    for m in result.models:
        for c in m.cells:
            rows.append({
                "model": m.label,
                "resolution": c.resolution,
                "tokens": c.tokens,
                "status": "ok" if c.ok else "n/a",
                "images_per_s": c.images_per_second,
                "step_ms": None if c.step_seconds is None else c.step_seconds * 1e3,
                "peak_mem_mb": None if c.peak_memory_bytes is None else c.peak_memory_bytes / MB,
                "gmacs": _gmacs(c.flops),
                "batch_size": cfg.speed.batch_size,
                "trials_ok": c.trials_ok,
                "reason": c.reason,
            })
    return rows


def markdown_tables(result: CompareResult) -> str:
    """The Markdown tables of ``results.md`` (pasteable into a README)."""
    cfg = result.config
    speed = cfg.speed
    ref = speed.resolutions[0]
    metric_key = PRIMARY_METRIC[cfg.task]
    has_accuracy = any(m.accuracy is not None for m in result.models)
    extra_metrics = []
    for m in result.models:
        if m.accuracy is not None:
            extra_metrics += [k for k in m.accuracy.metrics if k != metric_key and k not in extra_metrics]
    passes = " fwd+bwd" if speed.mode is PassMode.FORWARD_BACKWARD else ""
    header = ["Model", "Params (M)", f"GMACs @{ref}{passes}"]
    if has_accuracy:
        header += [metric_title(k) for k in [metric_key] + extra_metrics] + ["Train (s)"]
    header += ["Time exp.", "Memory exp.", "FLOPs exp."]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for m in result.models:
        row = [m.label, _fmt(None if m.params is None else m.params / 1e6),
               _fmt(_gmacs(m.reference.flops) if m.reference else None)]
        if has_accuracy:
            acc = m.accuracy
            metrics = acc.metrics if acc is not None and acc.ok else {}
            row += [_fmt(metrics.get(metric_key), 4)] + [_fmt(metrics.get(k), 4) for k in extra_metrics]
            row += [_fmt(acc.train_seconds if acc is not None else None)]
        row += [_fmt(m.time_exponent, 2), _fmt(m.memory_exponent, 2), _fmt(m.flops_exponent, 2)]
        lines.append("| " + " | ".join(row) + " |")
    unit = "volumes" if speed.spatial_dims == 3 else "images"
    sections = ["\n".join(lines)]
    if not speed.enabled:
        return sections[0]
    for title, value in (
        (f"Throughput ({unit}/s, batch {speed.batch_size}, {speed.mode.value})",
         lambda c: c.images_per_second),
        (f"Peak memory above the built model (MB, batch {speed.batch_size}, {speed.mode.value})",
         lambda c: None if c.peak_memory_bytes is None else c.peak_memory_bytes / MB),
    ):
        head = ["Model"] + [f"{r}" + ("³" if speed.spatial_dims == 3 else "²") for r in speed.resolutions]
        rows = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for m in result.models:
            rows.append("| " + " | ".join([m.label] + [_fmt(value(c)) for c in m.cells]) + " |")
        sections.append(f"**{title}**\n\n" + "\n".join(rows))
    return "\n\n".join(sections)


def _notes(result: CompareResult) -> list[str]:
    notes = []
    for m in result.models:
        for c in m.cells if result.config.speed.enabled else []:
            if not c.ok:
                notes.append(f"- {m.label} @ {c.resolution}: n/a, {c.reason}")
        if m.accuracy is not None and not m.accuracy.ok:
            notes.append(f"- {m.label} accuracy: n/a, {m.accuracy.reason}")
    return notes


def _settings_line(cfg: CompareConfig) -> str:
    s = cfg.speed
    parts = [f"task {cfg.task.value}", f"batch {s.batch_size}", f"{s.mode.value}", f"{s.threads} threads",
             f"warm-up {s.warmup}", f"median of {s.repeats} steps x {s.trials} isolated trial(s)"]
    if cfg.accuracy.enabled:
        recipe = cfg.accuracy.recipe or "the task's default recipe"
        budget = ", ".join(f"{k}={v}" for k, v in cfg.accuracy.overrides.items()) or "the recipe's"
        parts.append(f"accuracy: {recipe}, budget {budget}, data {cfg.accuracy.data or 'embedded default'}")
    return "; ".join(parts)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _load_note(result: CompareResult) -> str:
    load = result.load_average_at_start
    return f" (load average {load[0]:.1f} at the start)" if load else ""


def _program() -> str:
    name = Path(sys.argv[0]).name
    return "python -m tasks.compare" if name in ("__main__.py", "-m", "-c", "") else name


def environment_record(result: CompareResult) -> dict[str, Any]:
    """Machine, libraries and settings the numbers were measured with."""
    cfg = result.config
    cuda = torch.cuda.is_available()
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([_program()] + sys.argv[1:]),
        "load_average_1_5_15_at_start": result.load_average_at_start,
        "load_average_1_5_15_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_total_gb": None if _memory_total_bytes() is None else round(_memory_total_bytes() / 2**30, 1),
        "threads_per_measurement": cfg.speed.threads,
        "measured_on": result.devices,
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "memory_method": result.memory_methods,
        "flops": "torch.utils.flop_counter.FlopCounterMode; GMACs = FLOPs / 2",
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "torchvision", "timm", "monai", "numpy", "vmamba-toolkit")},
        "git_commit": _git_commit(),
        "scan_kernels": _scan_kernels(),
        "total_seconds": round(result.seconds, 1),
        "settings": config_to_dict(cfg),
    }


def _scan_kernels() -> dict[str, str]:
    """Which path each of our compiled kernels takes here (compiled, or pure PyTorch and why): the numbers of
    our models depend on it, down to rounding."""
    from vmamba.ops.fused import FusedKernel, fused_status

    return {kernel.value: fused_status(kernel) for kernel in FusedKernel}


def _plot_lines(result: CompareResult, value, ylabel: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in result.models:
        pts = [(c.resolution, value(c)) for c in m.cells if value(c) is not None and value(c) > 0]
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=m.label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(result.config.speed.resolutions, [str(r) for r in result.config.speed.resolutions])
    ax.minorticks_off()
    ax.set_xlabel("resolution")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no successful measurement", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def _plot_accuracy(result: CompareResult, path: Path) -> None:
    metric_key = PRIMARY_METRIC[result.config.task]
    metric_name = metric_title(metric_key)
    ref = result.config.speed.resolutions[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    plotted = 0
    for m in result.models:
        flops = m.reference.flops if m.reference else None
        acc = m.accuracy
        if flops is None or acc is None or not acc.ok or metric_key not in acc.metrics:
            continue
        ax.scatter([flops / 2 / 1e9], [acc.metrics[metric_key]], s=40)
        ax.annotate(m.label, (flops / 2 / 1e9, acc.metrics[metric_key]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
        plotted += 1
    if not plotted:
        ax.text(0.5, 0.5, "no model has both GMACs and accuracy", transform=ax.transAxes, ha="center")
    ax.set_xlabel(f"GMACs @{ref} (FLOPs / 2)")
    ax.set_ylabel(metric_name)
    ax.set_title(f"{metric_name} vs compute")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def write_report(result: CompareResult, out_dir: Path) -> list[Path]:
    """Write every report file into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = result.config
    env = environment_record(result)
    written = []

    def put(name: str, text: str) -> None:
        _write_text(out_dir / name, text)
        written.append(out_dir / name)

    put("summary.csv", csv_text(summary_rows(result)))
    put("measurements.csv", csv_text(measurement_rows(result)))
    put("environment.json", json.dumps(env, indent=2) + "\n")
    save_config(cfg, out_dir / "config.yaml")
    written.append(out_dir / "config.yaml")
    unit = "volumes" if cfg.speed.spatial_dims == 3 else "images"
    if cfg.speed.enabled:
        _plot_lines(result, lambda c: c.images_per_second, f"{unit} / s", "Throughput vs resolution",
                    out_dir / "throughput.png")
        _plot_lines(result, lambda c: None if c.peak_memory_bytes is None else c.peak_memory_bytes / MB,
                    "peak memory above model (MB)", "Peak memory vs resolution", out_dir / "memory.png")
        written += [out_dir / "throughput.png", out_dir / "memory.png"]
    if cfg.accuracy.enabled:
        _plot_accuracy(result, out_dir / "accuracy_vs_flops.png")
        written.append(out_dir / "accuracy_vs_flops.png")
    date = env["date"][:10]
    device = env["cuda_device"] if env["cuda_available"] and cfg.speed.device.value != "cpu" else env["cpu"]
    notes = _notes(result)
    text = [
        f"# Comparison ({cfg.task.value}), {date}",
        "",
        f"Machine: {device}, {env['logical_cpus']} logical CPUs{_load_note(result)}; torch {env['versions']['torch']}, "
        f"timm {env['versions']['timm']}, monai {env['versions']['monai']}.",
        f"Settings: {_settings_line(cfg)}.",
        "GMACs = FLOPs / 2, FLOPs counted by torch's FlopCounterMode with the scan formulas registered. "
        + (f"Memory: peak above the child process's baseline after imports, model build and warm-up "
           f"({'; '.join(result.memory_methods)}). Growth exponents: least-squares slope of log(step time), "
           f"log(peak memory) and log(FLOPs) against log(tokens = (resolution / {cfg.speed.token_stride})^{cfg.speed.spatial_dims})."
           if cfg.speed.enabled else "Speed and memory were not measured (speed.enabled: false)."),
        "",
        markdown_tables(result),
    ]
    if notes:
        text += ["", "Not available:", *notes]
    put("results.md", "\n".join(text) + "\n")
    return written
