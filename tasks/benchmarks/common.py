"""Timing helpers shared by the benchmark sections: interleaved repeats, medians, ratios."""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["Timing", "time_interleaved", "format_ratio", "print_table", "peak_memory_bytes"]


@dataclass
class Timing:
    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1
) -> dict[str, Timing]:
    """Time several callables round-robin (A B C A B C ...) so machine noise hits all alike.

    Returns the per-callable wall-clock seconds of each repeat; compare medians.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {name: Timing(name, []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            out[name].seconds.append(time.perf_counter() - start)
    return out


def format_ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator > 0 else "n/a"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a Markdown table (readable in a terminal, pasteable into the README)."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by ``fn`` on CUDA, or its peak RSS growth on CPU (measured in a child process
    by callers that need isolation; here a best-effort in-process estimate via the CPU allocator profiler)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        fn()
        return int(torch.cuda.max_memory_allocated())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = current = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        # self_: an op's cpu_memory_usage includes its children's allocations, so summing it over nested
        # events (einsum -> bmm, ...) counts them twice.
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak
