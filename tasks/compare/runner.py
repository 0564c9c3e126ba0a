"""One comparison run: check the names, measure every cell in isolation, train for accuracy, summarise.

Speed cells run trial by trial with the models interleaved inside each trial (model A, B, C at every
resolution, then again), so a burst of machine noise falls on all models alike; each cell's numbers are
the median over trials of the per-child medians.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .accuracy import AccuracyResult, check_recipe, run_accuracy
from .config import CompareConfig
from .growth import growth_exponent, token_count
from .models import check_models, count_parameters_without_weights
from .speed import CellJob, CellResult, run_cell

__all__ = ["CellSummary", "ModelSummary", "CompareResult", "run_compare", "summarise"]


@dataclass
class CellSummary:
    """One (model, resolution) cell after the trials: medians, or n/a with the reason."""

    resolution: int
    tokens: float
    ok: bool
    reason: str = ""
    images_per_second: float | None = None
    step_seconds: float | None = None
    peak_memory_bytes: int | None = None
    flops: float | None = None
    trials_ok: int = 0


@dataclass
class ModelSummary:
    label: str
    name: str
    params: int | None
    cells: list[CellSummary]
    time_exponent: float | None
    memory_exponent: float | None
    flops_exponent: float | None
    accuracy: AccuracyResult | None

    def cell(self, resolution: int) -> CellSummary | None:
        return next((c for c in self.cells if c.resolution == resolution), None)

    @property
    def reference(self) -> CellSummary | None:
        """The cell at the first configured resolution (where parameters and GMACs are quoted)."""
        return self.cells[0] if self.cells else None


@dataclass
class CompareResult:
    config: CompareConfig
    models: list[ModelSummary]
    raw_cells: list[CellResult] = field(default_factory=list)
    memory_methods: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    seconds: float = 0.0
    load_average_at_start: list[float] | None = None  # other work on the machine skews the timings


def _say(line: str) -> None:
    print(line, flush=True)  # progress lines must show up at once when stdout goes to a log file


def _gives_up(result: CellResult) -> bool:
    """A timeout or a killed child at one size predicts the same at larger sizes: skip them."""
    return not result.ok and (result.reason.startswith("timed out") or result.reason.startswith("child exited"))


def measure_speed(cfg: CompareConfig, progress: Callable[[str], None] = _say) -> list[CellResult]:
    """Every (trial, model, resolution) cell, each in its own child process."""
    speed = cfg.speed
    results: list[CellResult] = []
    resolutions = sorted(speed.resolutions)
    total = speed.trials * len(cfg.models) * len(resolutions)
    done = 0
    for trial in range(speed.trials):
        for spec in cfg.models:
            stopped: str | None = None
            for resolution in resolutions:
                done += 1
                if stopped is not None:
                    result = CellResult(label=spec.display, resolution=resolution, trial=trial, ok=False,
                                        reason=f"skipped: {stopped}", batch_size=speed.batch_size)
                else:
                    result = run_cell(CellJob(spec, cfg.task, resolution, speed, trial=trial, seed=cfg.accuracy.seed))
                    if _gives_up(result):
                        stopped = result.reason
                results.append(result)
                if result.ok:
                    mem = (result.peak_memory_bytes or 0) / 2**20
                    progress(f"[{done}/{total}] {spec.display} @ {resolution}: "
                             f"{result.images_per_second:.3g} img/s, {mem:.0f} MB above baseline")
                else:
                    progress(f"[{done}/{total}] {spec.display} @ {resolution}: n/a ({result.reason})")
    return results


def summarise(cfg: CompareConfig, cells: list[CellResult],
              accuracy: dict[str, AccuracyResult]) -> list[ModelSummary]:
    """Medians over trials per cell, growth exponents per model, accuracy attached."""
    speed = cfg.speed
    out = []
    for spec in cfg.models:
        label = spec.display
        summaries = []
        params = None
        for resolution in speed.resolutions:
            mine = [c for c in cells if c.label == label and c.resolution == resolution]
            ok = [c for c in mine if c.ok]
            tokens = token_count(resolution, speed.token_stride, speed.spatial_dims)
            if params is None:
                params = next((c.params for c in mine if c.params is not None), None)
            if not ok:
                reason = mine[0].reason if mine else "not measured (speed.enabled is false)"
                summaries.append(CellSummary(resolution, tokens, ok=False, reason=reason))
                continue
            step = statistics.median(c.median_step_seconds for c in ok)
            memory = [c.peak_memory_bytes for c in ok if c.peak_memory_bytes is not None]
            flops = [c.flops for c in ok if c.flops is not None]
            summaries.append(CellSummary(
                resolution, tokens, ok=True, images_per_second=speed.batch_size / step, step_seconds=step,
                peak_memory_bytes=int(statistics.median(memory)) if memory else None,
                flops=flops[0] if flops else None, trials_ok=len(ok),
            ))
        if params is None:  # speed off, or no cell got as far as building the model
            params = count_parameters_without_weights(
                spec, cfg.task, resolution=speed.resolutions[0], in_chans=speed.in_chans,
                num_classes=speed.num_classes, spatial_dims=speed.spatial_dims)
        tokens = [c.tokens for c in summaries]
        out.append(ModelSummary(
            label=label, name=spec.name, params=params, cells=summaries,
            time_exponent=growth_exponent(tokens, [c.step_seconds for c in summaries]),
            memory_exponent=growth_exponent(tokens, [c.peak_memory_bytes for c in summaries]),
            flops_exponent=growth_exponent(tokens, [c.flops for c in summaries]),
            accuracy=accuracy.get(label),
        ))
    return out


def run_compare(cfg: CompareConfig, progress: Callable[[str], None] = _say) -> CompareResult:
    """Run the whole comparison described by ``cfg`` and write its report into ``cfg.output``.

    Raises:
        ValueError: a model name its source does not know, or a bad training recipe / budget override
            (both checked before anything is measured).
    """
    from .report import write_report

    start = time.perf_counter()
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    check_models(cfg.models, cfg.task)
    if cfg.accuracy.enabled:
        check_recipe(cfg)
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = measure_speed(cfg, progress) if cfg.speed.enabled else []
    accuracy: dict[str, AccuracyResult] = {}
    if cfg.accuracy.enabled:
        for i, spec in enumerate(cfg.models, 1):
            progress(f"[accuracy {i}/{len(cfg.models)}] training {spec.display}")
            result = run_accuracy(cfg, spec, out_dir / "runs" / _slug(spec.display))
            accuracy[spec.display] = result
            progress(f"[accuracy {i}/{len(cfg.models)}] {spec.display}: {result.describe()}")
    result = CompareResult(
        config=cfg, models=summarise(cfg, cells, accuracy), raw_cells=cells,
        memory_methods=sorted({c.memory_method for c in cells if c.memory_method}),
        devices=sorted({c.device for c in cells if c.device}), load_average_at_start=load,
    )
    result.seconds = time.perf_counter() - start
    write_report(result, out_dir)
    return result


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)
