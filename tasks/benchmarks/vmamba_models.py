"""VMamba-T against timm's Swin-T and ViT-S in one process: images/s (inference and training) and FLOPs.

Inference: fp32, ``torch.no_grad``, eval mode, 224x224, batch 8. Training step: fp32, train mode, batch 8,
forward + cross-entropy backward + AdamW step (torch's fused implementation for every model, as the training jobs
use: :func:`tasks.common.optim.fused_kwargs`). Every model and scan path is timed side by side (interleaved
repeats, medians) and printed as images/s and as ``vmamba_t / model`` ratios. VMamba-T runs once per scan
backend (:func:`vmamba.ops.fused.forced_scan_backend`): ``auto`` (the default choice, per stage, see
:meth:`vmamba.mixers.MambaMixer.map_path`), ``fused`` (the compiled kernel wherever it applies) and
``torch`` (pure PyTorch); the SS2D front end's depthwise conv + SiLU and the MLP's bias + GELU follow the
same switch (:func:`vmamba.ops.depthwise_conv2d_silu`, :func:`vmamba.ops.linear_gelu`), and so do its linear
layers (:func:`vmamba.ops.linear`: oneDNN's GEMM instead of ATen's MKL one). Targets (issue 8): inference
>= 0.95x and training step >= 0.9x swin_tiny_patch4_window7_224 as timm builds it (issue 2: inference >= 0.6x).
Swin-T also runs a second time with its ``nn.Linear`` layers swapped for :class:`vmamba.linear.Linear`
(``[oneDNN linears]``), so the table shows how much of the ratio is the GEMM library rather than the model.

FLOPs: ``torch.utils.flop_counter`` over one 224x224 image, with the selective scan counted by the formula
``vmamba.ops.flops`` registers for it (the official fvcore rule, 9 * B * L * D * N); elementwise ops are
not counted, as in the official fvcore numbers. Printed as GMACs (FLOPs / 2) beside the official 4.91.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F

import vmamba  # noqa: F401  registers vmamba_t
from vmamba import ScanPattern
from vmamba.linear import Linear
from vmamba.mixers import MambaMixer
from vmamba.ops.fused import ScanBackend, forced_scan_backend, fused_status
from vmamba.ops.linear import onednn_linear_status

from ..common.optim import fused_kwargs
from .common import Timing, format_ratio, print_table, time_interleaved

REFERENCES = ("swin_tiny_patch4_window7_224", "vit_small_patch16_224")
SWIN = REFERENCES[0]
SWIN_ONEDNN = f"{SWIN} [oneDNN linears]"
BACKENDS = (ScanBackend.AUTO, ScanBackend.FUSED, ScanBackend.TORCH)
INFER_TARGET, TRAIN_TARGET = 0.95, 0.9  # vmamba_t / swin_tiny images/s (issue 8)
OFFICIAL_GMACS = 4.91  # official README / fvcore for VMamba-T (tiny_s1l8) at 224x224


def _vmamba_label(backend: ScanBackend) -> str:
    return f"vmamba_t [{backend.value}]"


def _with_onednn_linears(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every plain ``nn.Linear`` turned into :class:`vmamba.linear.Linear` (same parameters)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = Linear
    return model


def _stage_paths(model: torch.nn.Module, backend: ScanBackend, grad: bool) -> str:
    """The scan path each stage's first block takes at 224x224 (e.g. ``torch_cross2d/fused/...``)."""
    paths = []
    size = 56
    for stage in model.stages:
        mixer = stage.blocks[0].op.mixer
        if not isinstance(mixer, MambaMixer):
            return "n/a"
        x = torch.zeros(1, size, size, mixer.dim)
        with forced_scan_backend(backend), torch.set_grad_enabled(grad):
            paths.append(mixer.map_path(x, ScanPattern.CROSS2D).value)
        size //= 2
    return "/".join(paths)


def _print_rates(title: str, batch: int, timings: dict[str, Timing], target: float) -> None:
    """Images/s and ``vmamba_t / model`` ratios of the medians; each verdict also gives the spread of the
    per-round ratios (the rounds are interleaved, so each round's pair shares the machine's state)."""
    rates = {name: batch / timing.median for name, timing in timings.items()}
    vmamba_names = [n for n in rates if n.startswith("vmamba_t")]
    refs = [n for n in rates if n not in vmamba_names]
    header = ["model", "images/s"] + [f"{v} / model" for v in vmamba_names]
    rows = [[n, f"{rates[n]:.2f}"] + ["-" if n in vmamba_names else format_ratio(rates[v], rates[n])
                                      for v in vmamba_names] for n in rates]
    print_table(title, header, rows)
    if SWIN not in refs:
        return
    verdicts = []
    for v in vmamba_names:
        ratio = rates[v] / rates[SWIN]
        rounds = [ref / ours for ours, ref in zip(timings[v].seconds, timings[SWIN].seconds)]
        verdicts.append(
            f"{v}: {ratio:.3f}x swin_tiny ({'met' if ratio >= target else 'NOT met'}, target >= {target}x);"
            f" per round {min(rounds):.3f}-{max(rounds):.3f}x, median {statistics.median(rounds):.3f}x"
        )
    if SWIN_ONEDNN in rates:
        verdicts += [f"{v}: {rates[v] / rates[SWIN_ONEDNN]:.3f}x {SWIN_ONEDNN} (same GEMM library, no target)"
                     for v in vmamba_names]
    print("\n".join(verdicts))


def _inference(quick: bool) -> None:
    batch, repeats = (1, 1) if quick else (8, 5)
    x = torch.randn(batch, 3, 224, 224)
    torch.manual_seed(0)
    vmamba_t = timm.create_model("vmamba_t").eval()
    models = {name: timm.create_model(name).eval() for name in REFERENCES}
    models[SWIN_ONEDNN] = _with_onednn_linears(timm.create_model(SWIN).eval())

    def infer(model: torch.nn.Module, backend: ScanBackend | None = None) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad(), forced_scan_backend(backend or ScanBackend.AUTO):
                return model(x)

        return call

    calls = {_vmamba_label(b): infer(vmamba_t, b) for b in BACKENDS}
    calls.update({name: infer(m) for name, m in models.items()})
    print(f"\nvmamba_models: compiled kernels (scan, depthwise conv + SiLU, MLP bias + GELU): {fused_status()}")
    print(f"vmamba_models: linear layers (vmamba.ops.linear): {onednn_linear_status()}; F.linear on the [torch] path")
    for b in BACKENDS:
        print(f"{_vmamba_label(b)} inference scan path per stage: {_stage_paths(vmamba_t, b, grad=False)}")
    timings = time_interleaved(calls, repeats=repeats, warmup=1)
    _print_rates(
        f"Inference: fp32, 224x224, batch {batch}, {torch.get_num_threads()} threads, median of {repeats}",
        batch, timings, INFER_TARGET,
    )


def _training(quick: bool) -> None:
    """One optimisation step per call: forward, cross-entropy, backward, AdamW step (weights change, shapes not)."""
    batch, repeats = (1, 1) if quick else (8, 7)  # a step is ~2 s; 7 repeats steady the median of a ratio that sits near its target
    x = torch.randn(batch, 3, 224, 224)
    target = torch.randint(0, 1000, (batch,))

    def step(name: str, backend: ScanBackend | None = None, onednn_linears: bool = False) -> Callable[[], object]:
        torch.manual_seed(0)
        model = timm.create_model(name).train()
        if onednn_linears:
            _with_onednn_linears(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **fused_kwargs("adamw", model.parameters()))

        def call() -> object:
            with forced_scan_backend(backend or ScanBackend.AUTO):
                loss = F.cross_entropy(model(x), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return loss

        return call

    trained = (ScanBackend.FUSED, ScanBackend.TORCH)  # auto trains on the fused kernel when it builds
    calls = {_vmamba_label(b): step("vmamba_t", b) for b in trained}
    calls[SWIN] = step(SWIN)
    calls[SWIN_ONEDNN] = step(SWIN, onednn_linears=True)
    probe = timm.create_model("vmamba_t").train()
    for b in trained:
        print(f"{_vmamba_label(b)} training scan path per stage: {_stage_paths(probe, b, grad=True)}")
    timings = time_interleaved(calls, repeats=repeats, warmup=1)
    _print_rates(
        f"Training step (forward + backward + fused AdamW step): fp32, 224x224, batch {batch}, "
        f"{torch.get_num_threads()} threads, median of {repeats}",
        batch, timings, TRAIN_TARGET,
    )


def _flops() -> None:
    from vmamba.ops.flops import count_flops

    model = timm.create_model("vmamba_t").eval()
    x = torch.randn(1, 3, 224, 224)
    # counted on the pure-PyTorch path, which follows the official rule term by term (the compiled kernel's
    # count leaves out the elementwise D skip)
    with torch.no_grad(), forced_scan_backend(ScanBackend.TORCH):
        gmacs = count_flops(lambda: model(x)) / 2e9
    print_table(
        "vmamba_t FLOPs at 224x224 (torch.utils.flop_counter, selective scan counted)",
        ["GMACs (ours)", "official GMACs", "ours / official"],
        [[f"{gmacs:.3f}", f"{OFFICIAL_GMACS:.2f}", format_ratio(gmacs, OFFICIAL_GMACS)]],
    )


def run(quick: bool) -> None:
    _inference(quick)
    _training(quick)
    _flops()
