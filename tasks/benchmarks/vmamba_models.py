"""VMamba-T against timm's Swin-T and ViT-S in one process: images/s and FLOPs.

Throughput: fp32 inference (``torch.no_grad``, eval mode) at 224x224, batch 8, medians of interleaved
repeats; printed as images/s and as ratios (target: vmamba_t >= 0.6x swin_tiny_patch4_window7_224).
FLOPs: ``torch.utils.flop_counter`` over one 224x224 image, with the selective scan counted by the formula
``vmamba.ops.flops`` registers for it (the official fvcore rule, 9 * B * L * D * N); elementwise ops are
not counted, as in the official fvcore numbers. Printed as GMACs (FLOPs / 2) beside the official 4.91.
"""
from __future__ import annotations

import timm
import torch

import vmamba  # noqa: F401  registers vmamba_t
from vmamba import ScanPattern
from vmamba.ops.fused import fused_status

from .common import format_ratio, print_table, time_interleaved

MODELS = ("vmamba_t", "swin_tiny_patch4_window7_224", "vit_small_patch16_224")
OFFICIAL_GMACS = 4.91  # official README / fvcore for VMamba-T (tiny_s1l8) at 224x224


def _throughput(quick: bool) -> None:
    batch, repeats = (1, 1) if quick else (8, 5)
    x = torch.randn(batch, 3, 224, 224)
    models = {name: timm.create_model(name).eval() for name in MODELS}

    def infer(model: torch.nn.Module):
        def call() -> object:
            with torch.no_grad():
                return model(x)

        return call

    mixer = models["vmamba_t"].stages[0].blocks[0].op.mixer
    with torch.no_grad():
        path = mixer.map_path(torch.zeros(1, 56, 56, mixer.dim), ScanPattern.CROSS2D)
    print(f"vmamba_t scan path under no_grad: {path.value} (compiled kernels: {fused_status()})")
    timings = time_interleaved({n: infer(m) for n, m in models.items()}, repeats=repeats, warmup=1)
    ips = {n: batch / t.median for n, t in timings.items()}
    rows = [
        [n, f"{ips[n]:.2f}", format_ratio(ips["vmamba_t"], ips[n]) if n != "vmamba_t" else "-"]
        for n in MODELS
    ]
    print_table(
        f"Models: fp32 inference, 224x224, batch {batch}, {torch.get_num_threads()} threads, "
        f"median of {repeats}",
        ["model", "images/s", "vmamba_t / model"],
        rows,
    )


def _flops() -> None:
    from vmamba.ops.flops import count_flops

    model = timm.create_model("vmamba_t").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        gmacs = count_flops(lambda: model(x)) / 2e9
    print_table(
        "vmamba_t FLOPs at 224x224 (torch.utils.flop_counter, selective scan counted)",
        ["GMACs (ours)", "official GMACs", "ours / official"],
        [[f"{gmacs:.3f}", f"{OFFICIAL_GMACS:.2f}", format_ratio(gmacs, OFFICIAL_GMACS)]],
    )


def run(quick: bool) -> None:
    _throughput(quick)
    _flops()
