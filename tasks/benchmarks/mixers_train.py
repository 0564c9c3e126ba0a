"""Does a vmamba_t with each sequence mixer train? 50 AdamW steps on real images, loss before and after.

Issue 4's target: "a vmamba_t with each mixer trains: its loss falls over 50 steps on real data". Every
registered variant (``vmamba_t``, ``vmamba_t_mamba2``, ``vmamba_t_retnet``, ``vmamba_t_gla``,
``vmamba_t_rwkv7``; full width and depth, ``num_classes=10``) is trained from the same seed on the same
batches of scikit-learn's real handwritten digits (the embedded data set of :mod:`tasks.classification.digits`,
its train/val split, upsampled to ``img_size``), with AdamW, a linear warm-up, a cosine decay and gradient
clipping at 5 (the digits recipe's). Drop path is off: the check is about optimisation, and a stochastic
depth draw per step would only add noise to the two loss windows compared.

Printed per mixer: parameters, the mean training loss over the first and the last ``WINDOW`` steps, their
ratio (PASS when ``last / first <= FALL_RATIO``), top-1 on the held-out split after training, and seconds.
``--quick`` trains reduced models (depths 1-1-1-1, 32 channels) for a few steps: a smoke run, no verdict.
"""
from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import vmamba  # noqa: F401  registers the vmamba_t variants with timm
from tasks.benchmarks.common import print_table
from tasks.classification.digits import write_digits_imagefolder

__all__ = ["MODELS", "MixerTrainResult", "TrainSettings", "load_digits_tensors", "run", "train_mixer", "train_mixers"]

# mixer -> the registered full-size model
MODELS: dict[str, str] = {
    "mamba": "vmamba_t",
    "mamba2": "vmamba_t_mamba2",
    "retnet": "vmamba_t_retnet",
    "gla": "vmamba_t_gla",
    "rwkv7": "vmamba_t_rwkv7",
}
WINDOW = 5  # steps averaged at each end of the run
FALL_RATIO = 0.95  # "the loss falls": the last window's mean at most 95 % of the first window's


@dataclass(frozen=True)
class TrainSettings:
    """One training run's budget, identical for every mixer."""

    steps: int = 50
    batch_size: int = 8
    img_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 5
    weight_decay: float = 0.05
    clip_grad: float = 5.0
    seed: int = 0
    model_kwargs: tuple[tuple[str, object], ...] = ()  # e.g. (("depths", (1, 1, 1, 1)), ("dims", 32))

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then cosine decay to 10 % of ``lr`` at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.steps - self.warmup_steps - 1, 1)
        progress = (step - self.warmup_steps) / span
        return self.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class MixerTrainResult:
    mixer: str
    model: str
    params: int
    losses: list[float]
    val_top1: float
    seconds: float

    @property
    def first(self) -> float:
        return float(np.mean(self.losses[:WINDOW]))

    @property
    def last(self) -> float:
        return float(np.mean(self.losses[-WINDOW:]))

    @property
    def ratio(self) -> float:
        return self.last / self.first

    @property
    def fell(self) -> bool:
        return all(math.isfinite(v) for v in self.losses) and self.ratio <= FALL_RATIO


def load_digits_tensors(img_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The embedded digits (train/val split of :func:`write_digits_imagefolder`) as normalised tensors.

    Returns:
        ``x_train (N, 3, img_size, img_size)``, ``y_train (N,)``, ``x_val``, ``y_val`` (ImageNet mean/std,
        the classification recipe's normalisation).
    """
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    with tempfile.TemporaryDirectory(prefix="digits_") as tmp:
        root = write_digits_imagefolder(Path(tmp) / "digits", size=img_size)
        splits = []
        for split in ("train", "val"):
            files = sorted((root / split).glob("*/*.png"))
            images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])  # (N, H, W, 3)
            labels = torch.tensor([int(f.parent.name) for f in files])
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
            splits += [(x - mean) / std, labels]
    return splits[0], splits[1], splits[2], splits[3]


def train_mixer(
    mixer: str,
    settings: TrainSettings,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> MixerTrainResult:
    """Train ``MODELS[mixer]`` for ``settings.steps`` steps; the per-step losses and held-out top-1.

    The model's initialisation and the batch order depend only on ``settings.seed``, so every mixer sees
    the same images in the same order.
    """
    if mixer not in MODELS:
        raise ValueError(f"unknown mixer {mixer!r}; expected one of {sorted(MODELS)}")
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(settings.seed)
    model = timm.create_model(MODELS[mixer], num_classes=10, drop_path_rate=0.0, **dict(settings.model_kwargs))
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(settings.seed))
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for step in range(settings.steps):
        picks = order[torch.arange(step * settings.batch_size, (step + 1) * settings.batch_size) % len(order)]
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_at(step)
        loss = F.cross_entropy(model(x_train[picks]), y_train[picks])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x_val), 64):
            correct += int((model(x_val[i:i + 64]).argmax(1) == y_val[i:i + 64]).sum())
    return MixerTrainResult(mixer, MODELS[mixer], params, losses, 100.0 * correct / len(x_val),
                            time.perf_counter() - start)


def train_mixers(mixers: Sequence[str], settings: TrainSettings) -> list[MixerTrainResult]:
    """:func:`train_mixer` for each mixer on one shared copy of the data; prints a line as each finishes."""
    data = load_digits_tensors(settings.img_size)
    results = []
    for mixer in mixers:
        result = train_mixer(mixer, settings, data)
        print(f"  {mixer}: {result.params / 1e6:.2f} M params, loss {result.first:.3f} -> {result.last:.3f} "
              f"(x{result.ratio:.3f}), val top-1 {result.val_top1:.1f} %, {result.seconds:.0f} s", flush=True)
        results.append(result)
    return results


def run(quick: bool) -> None:
    if quick:
        settings = TrainSettings(steps=2 * WINDOW, batch_size=8, img_size=32,
                                 model_kwargs=(("depths", (1, 1, 1, 1)), ("dims", 32)))
    else:
        settings = TrainSettings()
    size = "reduced (depths 1-1-1-1, dims 32)" if quick else "full size"
    print(f"\nmixers_train: {len(MODELS)} x {settings.steps} AdamW steps, {size}, digits at "
          f"{settings.img_size}x{settings.img_size}, batch {settings.batch_size}, peak lr {settings.lr:g} "
          f"({settings.warmup_steps} warm-up steps, cosine), seed {settings.seed}")
    results = train_mixers(list(MODELS), settings)
    verdict = (lambda r: "n/a (quick)") if quick else (lambda r: "PASS" if r.fell else "FAIL")
    rows = [
        [r.mixer, r.model, f"{r.params / 1e6:.2f} M", f"{r.first:.3f}", f"{r.last:.3f}", f"{r.ratio:.3f}",
         f"{r.val_top1:.1f}", f"{r.seconds:.0f}", verdict(r)]
        for r in results
    ]
    print_table(
        f"vmamba_t per mixer: {settings.steps} steps; loss = mean of the first / last {WINDOW} steps "
        f"(target: last / first <= {FALL_RATIO})",
        ["mixer", "model", "params", "first loss", "last loss", "last / first", "val top-1 (%)", "seconds",
         "loss fell"],
        rows,
    )
