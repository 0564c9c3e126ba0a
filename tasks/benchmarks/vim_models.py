"""Vim-T against timm's DeiT-Tiny: images/s and peak memory at 224², 512² and 1024², fp32 inference.

Both models are built for each resolution (position embeddings resampled at creation) and timed side by side
(interleaved repeats, medians) in one run. Ratios are ``vim_t / deit_tiny``: above 1 for throughput means Vim
is faster, below 1 for memory means Vim needs less. The scan backend in use (fused C++ kernels or pure
PyTorch) is printed first.

Targets: at 1024² at least 1.4x deit_tiny's throughput (issue 8, the fused kernels; issue 3 asked for more
than 1x) with less peak memory (issue 3); at 224² at least 0.5x its throughput (issues 3 and 8).
"""
from __future__ import annotations

import timm
import torch

import vmamba  # noqa: F401  registers vim_t
from tasks.benchmarks.common import format_ratio, peak_memory_bytes, print_table, time_interleaved
from vmamba.ops.fused import fused_status

TARGET_224 = 0.5
TARGET_1024 = 1.4
# (image size, batch): larger images get smaller batches so each timed call stays a few seconds.
FULL = ((224, 8), (512, 2), (1024, 1))
QUICK = ((224, 1), (512, 1))


def _models(size: int) -> dict[str, torch.nn.Module]:
    return {
        "vim_t": timm.create_model("vim_t", img_size=size).eval(),
        "deit_tiny": timm.create_model("deit_tiny_patch16_224", img_size=size).eval(),
    }


def run(quick: bool) -> None:
    print(f"\nvim_models: scan backend = {fused_status()}")
    repeats = 1 if quick else 5
    rows = []
    for size, batch in QUICK if quick else FULL:
        models = _models(size)
        images = torch.randn(batch, 3, size, size)

        def call(model: torch.nn.Module):
            def go() -> None:
                with torch.inference_mode():
                    model(images)

            return go

        calls = {name: call(model) for name, model in models.items()}
        timings = time_interleaved(calls, repeats=repeats, warmup=1)
        rate = {name: batch / t.median for name, t in timings.items()}
        memory = {name: peak_memory_bytes(fn) for name, fn in calls.items()}
        target = TARGET_1024 if size == 1024 else TARGET_224 if size == 224 else None
        speed = rate["vim_t"] / rate["deit_tiny"]
        mem = memory["vim_t"] / memory["deit_tiny"]
        verdict = ""
        if target is not None:
            met = speed >= target and (size != 1024 or mem < 1.0)
            wanted = f"speed >= {target}x" + (", memory < 1x" if size == 1024 else "")
            verdict = f"{'met' if met else 'NOT met'} ({wanted})"
        rows.append(
            [
                f"{size}x{size}",
                batch,
                f"{rate['vim_t']:.2f}",
                f"{rate['deit_tiny']:.2f}",
                format_ratio(rate["vim_t"], rate["deit_tiny"]),
                f"{memory['vim_t'] / 2**20:.0f}",
                f"{memory['deit_tiny'] / 2**20:.0f}",
                format_ratio(memory["vim_t"], memory["deit_tiny"]),
                verdict,
            ]
        )
        del models
    print_table(
        f"vim_t vs deit_tiny_patch16_224, fp32 inference, {torch.get_num_threads()} threads, "
        f"medians of {repeats} interleaved repeats",
        ["size", "batch", "vim_t img/s", "deit img/s", "speed ratio", "vim_t peak MiB", "deit peak MiB",
         "memory ratio", "target"],
        rows,
    )
    print("speed ratio = vim_t / deit_tiny images/s; memory ratio = vim_t / deit_tiny peak bytes")
