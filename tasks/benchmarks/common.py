"""Helpers shared by the benchmark sections: interleaved repeats, medians, ratios, tables, and the driver of
the mixer-op sections."""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from vmamba.ops.fused import FusedKernel, ScanBackend, forced_scan_backend, fused_status

__all__ = ["Timing", "time_interleaved", "format_ratio", "print_table", "peak_memory_bytes", "TARGET_FORWARD_RATIO",
           "OpCase", "run_op_cases"]


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
    """Time several callables round-robin so machine noise hits all alike, the order rotated every round
    (A B C, B C A, C A B, ...): a call's time depends on what ran just before it (caches, the allocator's free
    memory), and rotating spreads that over every callable instead of giving each a fixed predecessor.

    Returns the per-callable wall-clock seconds of each repeat; compare medians.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {name: Timing(name, []) for name in fns}
    names = list(fns)
    for round_index in range(repeats):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
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


# ---------------------------------------------------------------------------------------- mixer-op sections
# The driver of ``ops_ssd_gla`` and ``ops_retention_rwkv7``: for each op, side by side in one interleaved run,
# the loop reference, the chunked pure-PyTorch path (``VMAMBA_SCAN_BACKEND=torch``) and the default op (what a
# no-grad call dispatches to: the fused C++ recurrence where it builds), forward; and the loop against the
# chunked path for forward+backward (training always runs the chunked path). Issue 4's target, every op >= 20x
# its loop reference forward, is judged on the default op.

TARGET_FORWARD_RATIO = 20.0


@dataclass(frozen=True)
class OpCase:
    """One op under test: ``make_inputs(length, requires_grad)`` builds its positional inputs; ``reference``
    and ``op`` take them (plus ``kwargs``) and return ``(output, final_state)``."""

    name: str
    reference: Callable[..., tuple[torch.Tensor, object]]
    op: Callable[..., tuple[torch.Tensor, object]]
    make_inputs: Callable[[int, bool], tuple[torch.Tensor, ...]]
    kwargs: dict[str, Any] = field(default_factory=dict)


def _forward(case: OpCase, fn: Callable[..., object], inputs: tuple[torch.Tensor, ...],
             backend: ScanBackend | None = None) -> Callable[[], None]:
    def go() -> None:
        if backend is None:
            fn(*inputs, **case.kwargs)
        else:
            with forced_scan_backend(backend):
                fn(*inputs, **case.kwargs)

    return go


def _forward_backward(case: OpCase, fn: Callable[..., torch.Tensor | tuple[torch.Tensor, object]],
                      inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    def go() -> None:
        for t in inputs:
            t.grad = None
        out = fn(*inputs, **case.kwargs)  # the output, or (output, state) for the fla-style ops
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    return go


def run_op_cases(title: str, cases: list[OpCase], length: int, repeats: int) -> None:
    """Time every case at sequence length ``length`` and print one table titled ``title`` (ratios, verdicts)."""
    rows = []
    for case in cases:
        inputs = case.make_inputs(length, False)
        with torch.no_grad():
            fwd = time_interleaved(
                {
                    "loop": _forward(case, case.reference, inputs),
                    "chunked": _forward(case, case.op, inputs, ScanBackend.TORCH),
                    "default": _forward(case, case.op, inputs),
                },
                repeats=repeats,
            )
        inputs_g = case.make_inputs(length, True)
        both = time_interleaved(
            {"loop": _forward_backward(case, case.reference, inputs_g),
             "chunked": _forward_backward(case, case.op, inputs_g)},
            repeats=max(1, repeats // 2),
        )
        loop_s, chunk_s, default_s = (fwd[key].median for key in ("loop", "chunked", "default"))
        verdict = " (met)" if loop_s / default_s >= TARGET_FORWARD_RATIO else " (missed)"
        rows.append([
            case.name, "forward", f"{loop_s * 1e3:.1f}", f"{chunk_s * 1e3:.2f}", f"{default_s * 1e3:.2f}",
            format_ratio(loop_s, chunk_s), format_ratio(loop_s, default_s) + verdict, f">= {TARGET_FORWARD_RATIO:.0f}x",
        ])
        loop_s, chunk_s = both["loop"].median, both["chunked"].median
        rows.append([
            case.name, "forward+backward", f"{loop_s * 1e3:.1f}", f"{chunk_s * 1e3:.2f}", "-",
            format_ratio(loop_s, chunk_s), "-", "-",
        ])
    print_table(
        title,
        ["op", "pass", "loop ms", "chunked ms", "default ms", "chunked speed-up", "default speed-up", "target"],
        rows,
    )
    print(f"\ndefault path (inference): {fused_status(FusedKernel.RECURRENCE)}; threads: {torch.get_num_threads()}")
