"""Train a 2-D or 3-D VMamba U-Net on CT / MRI volumes in the Medical Segmentation Decathlon layout.

    vmamba-seg-train                                    # the embedded default: MNI152 brain tissue, CPU
    vmamba-seg-train --config spleen --data-dir /data/Task09_Spleen --output runs/spleen
    vmamba-seg-train --config spleen --output runs/spleen --resume           # continue where it stopped
    torchrun --nproc_per_node 4 -m tasks.segmentation.train --config btcv --data-dir /data/btcv

One step: patches (3-D: ``RandCropByPosNegLabeld`` + flips / rot90 / intensity; 2-D: albumentations slices)
-> forward under autocast -> ``DiceCELoss`` (softmax, one-hot labels) -> backward (GradScaler for float16)
-> optional gradient clipping -> AdamW (no decay on norms, biases and the model's ``no_weight_decay()``)
-> per-step warm-up cosine schedule. Every ``val_every`` epochs the whole validation volumes go through
``sliding_window_inference`` (Gaussian blending; ``SliceInferer`` for 2-D networks) and are scored with
per-class Dice and 95% Hausdorff distance. Files in the output folder, each replaced atomically:
``best.safetensors`` / ``last.safetensors`` (weights; the header carries the config, class names and
metrics, so ``evaluate`` / ``predict`` need nothing else), ``last_state.pt`` (optimizer, scheduler, epoch:
for ``--resume``), ``log.csv``, ``curves.png``, ``overlay.png``, ``metrics.json``.

Under torchrun every process caches and trains on its own shard of the training cases (DDP), validation is
sharded too and metric sums are reduced; only rank 0 writes files. Epoch ``e`` draws its random numbers from
seeds derived from ``(train.seed, e, rank)``, so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, Dataset, partition_dataset
from monai.data.utils import set_rnd
from monai.losses import DiceCELoss
from monai.optimizers import WarmupCosineSchedule
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tasks.common.checkpoint import load_state, save_state, save_weights
from tasks.common.cli import add_config_arguments, add_run_arguments, flag_overrides, run_command
from tasks.common.config import ConfigError, describe_config, load_config, save_config
from tasks.common.csv_log import CsvLog
from tasks.common.distributed import DistContext, all_reduce_sum, barrier, close_distributed, env_rank, \
    init_distributed
from tasks.common.optim import fused_kwargs
from tasks.common.precision import autocast, check_precision, grad_scaler
from tasks.common.run_files import RunFiles as CommonRunFiles
from tasks.segmentation.config import DEFAULT_CONFIG, BuiltinData, SegmentationConfig, resolve_config_path
from tasks.segmentation.data import DatasetError, check_cases, read_dataset_json, split_cases
from tasks.segmentation.engine import MetricTotals, build_model, evaluate_cases, plain, weights_metadata
from tasks.segmentation.plots import plot_overlay, plot_training_curves
from tasks.segmentation.transforms import SliceDataset, train_transforms, val_transforms

__all__ = ["USER_ERRORS", "RunExistsError", "RunFiles", "TrainSummary", "prepare_data", "train", "run", "main",
           "metric_key"]

USER_ERRORS = (ConfigError, DatasetError, FileNotFoundError, ValueError)


class RunExistsError(ValueError):
    """The output folder already holds a run and ``--resume`` was not given."""


@dataclass(frozen=True)
class RunFiles(CommonRunFiles):
    """The files of one segmentation run folder: the common ones plus the overlay and the metrics summary."""

    @property
    def overlay(self) -> Path:
        return self.root / "overlay.png"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"


@dataclass
class TrainSummary:
    """What a call to :func:`train` did."""

    output_dir: Path
    epochs_done: int
    total_epochs: int
    class_names: list[str]  # all classes, background first
    last: dict[str, float] = field(default_factory=dict)  # the final epoch's log row
    best: dict[str, Any] | None = None  # {"epoch", "mean_dice", per-class ...}
    seconds: float = 0.0  # wall clock, data preparation included
    cpu_seconds: float = 0.0  # CPU time of this process (all its threads)


def metric_key(name: str) -> str:
    """A class name as a metric / CSV column suffix (``"grey matter"`` -> ``grey_matter``)."""
    return "_".join(name.strip().lower().split()) or "class"


# ------------------------------------------------------------------------------------------------- data


def ensure_builtin_data(cfg: SegmentationConfig, ctx: DistContext | None = None) -> None:
    """Write the built-in data set into ``data.root`` when asked to and missing (rank 0; others wait).
    ``ctx`` None: a single process."""
    if cfg.data.builtin is BuiltinData.MNI152_TISSUE:
        if ctx is None or ctx.is_main:
            from tasks.segmentation.mni152 import Mni152TissueSpec, build_mni152_tissue

            try:
                spec = Mni152TissueSpec(**cfg.data.build_kwargs)
            except TypeError as e:
                raise ConfigError(f"data.build_kwargs does not fit the MNI152 builder: {e}") from None
            build_mni152_tissue(cfg.data.root, spec)
        if ctx is not None:
            barrier(ctx)


def prepare_data(cfg: SegmentationConfig, ctx: DistContext) -> tuple[list[dict], list[dict], list[str]]:
    """Training and validation cases (checked against the network) and the class names.

    Raises:
        FileNotFoundError / DatasetError: a missing or malformed ``dataset.json`` or data file.
        ConfigError: ``dataset.json`` lists another number of classes or channels than the model config.
    """
    ensure_builtin_data(cfg, ctx)
    info, data = read_dataset_json(Path(cfg.data.root) / cfg.data.dataset_json)
    if info.labels and len(info.labels) != cfg.model.out_channels:
        raise ConfigError(f"{info.path} lists {len(info.labels)} labels {info.labels} but model.out_channels is "
                          f"{cfg.model.out_channels}")
    if info.modalities and len(info.modalities) != cfg.model.in_channels:
        raise ConfigError(f"{info.path} lists {len(info.modalities)} modalities {info.modalities} but "
                          f"model.in_channels is {cfg.model.in_channels}")
    names = info.labels or ["background"] + [f"class_{i}" for i in range(1, cfg.model.out_channels)]
    train_cases, val_cases = split_cases(info, data, cfg.data.train_key, cfg.data.val_key, cfg.data.val_count,
                                         cfg.data.val_fraction)
    if cfg.data.check_files:
        check_cases(train_cases + val_cases, cfg.model.in_channels)
    return train_cases, val_cases, names


def _shard(cases: list[dict], ctx: DistContext, even: bool) -> list[dict]:
    if not ctx.distributed:
        return cases
    return partition_dataset(cases, num_partitions=ctx.world_size, shuffle=False, even_divisible=even)[ctx.rank]


@dataclass
class _Data:
    train_ds: Any  # what set_rnd re-seeds every epoch
    slices: SliceDataset | None
    train_loader: DataLoader
    val_loader: DataLoader
    generator: torch.Generator


def _build_data(cfg: SegmentationConfig, ctx: DistContext, train_cases: list[dict], val_cases: list[dict]) -> _Data:
    workers, progress = cfg.data.num_workers, cfg.train.progress and ctx.is_main
    # every process trains on an equal-sized shard (DDP steps in lock-step) and scores its share of validation
    train_shard, val_shard = _shard(train_cases, ctx, even=True), _shard(val_cases, ctx, even=False)
    generator = torch.Generator()
    train_ds = CacheDataset(train_shard, train_transforms(cfg), cache_rate=cfg.data.cache_rate,
                            num_workers=max(workers, 1), progress=progress)
    slices = None
    if cfg.model.spatial_dims == 2:
        slices = SliceDataset(train_ds, cfg, seed=cfg.train.seed + ctx.rank)
    loader = DataLoader(slices if slices is not None else train_ds, batch_size=cfg.train.batch_size, shuffle=True,
                        num_workers=workers, generator=generator, drop_last=False,
                        pin_memory=ctx.device.type == "cuda")
    val_ds = CacheDataset(val_shard, val_transforms(cfg), cache_rate=cfg.data.cache_rate,
                          num_workers=max(workers, 1), progress=progress) if val_shard else Dataset([], None)
    val_loader = DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=workers)
    return _Data(train_ds, slices, loader, val_loader, generator)


def _seed_epoch(cfg: SegmentationConfig, epoch: int, ctx: DistContext, data: _Data) -> None:
    """Everything random in epoch ``epoch`` follows from this (data order, crops, augmentation, drop-path)."""
    seed = (cfg.train.seed * 1_000_003 + epoch * 10_007 + ctx.rank) % 2**31
    data.generator.manual_seed(seed)
    set_rnd(data.train_ds, seed)  # MONAI's random transforms when loading in this process
    if data.slices is not None:
        data.slices.set_epoch(epoch)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ train


def _optimizer(cfg: SegmentationConfig, model: nn.Module) -> torch.optim.Optimizer:
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, cfg.optim.weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, **fused_kwargs("adamw", model.parameters()))


def _train_epoch(cfg: SegmentationConfig, ctx: DistContext, ddp_model: nn.Module, model: nn.Module,
                 loader: DataLoader, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: WarmupCosineSchedule, scaler: torch.amp.GradScaler | None, epoch: int) -> float:
    ddp_model.train()
    total = torch.zeros(2, dtype=torch.float64)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not (cfg.train.progress and ctx.is_main),
               leave=False)
    for batch in bar:
        image, label = plain(batch["image"]).to(ctx.device), plain(batch["label"]).to(ctx.device)
        with autocast(ctx.device, cfg.train.precision):
            logits = ddp_model(image)
        loss = loss_fn(logits.float(), label)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.optim.clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        value = loss.item()
        total += torch.tensor([value * image.shape[0], image.shape[0]], dtype=torch.float64)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    total = all_reduce_sum(total, ctx)
    return float(total[0] / max(total[1], 1))


def _validate(cfg: SegmentationConfig, ctx: DistContext, model: nn.Module, loader: DataLoader,
              class_names: list[str], files: RunFiles, epoch: int) -> dict[str, float]:
    foreground = [metric_key(n) for n in class_names[1:]]
    regions = list(cfg.eval.regions)
    cases, kept = evaluate_cases(model, loader, cfg, foreground, ctx, progress=cfg.train.progress and ctx.is_main,
                                 keep=1 if cfg.eval.overlay else 0)
    means = MetricTotals.from_cases(cases, foreground, regions).reduce(ctx).means()
    if ctx.is_main and kept:
        image, label, pred = kept[0]
        dice = ", ".join(f"{n} {means[f'dice_{metric_key(n)}']:.3f}" for n in class_names[1:])
        plot_overlay(image, label, pred, class_names, files.overlay, axis=cfg.slices.axis,
                     title=f"epoch {epoch + 1}: Dice {dice}")
    return means


def _check_run_folder(files: RunFiles, resume: bool) -> None:
    if not resume and (files.state.exists() or files.last.exists()):
        raise RunExistsError(f"{files.root} already holds a run; pass --resume to continue it or choose another "
                             f"--output")


def _save_checkpoints(cfg: SegmentationConfig, files: RunFiles, model: nn.Module, optimizer, scheduler, scaler,
                      epoch: int, best: dict[str, Any] | None, class_names: list[str],
                      metrics: dict[str, float] | None) -> None:
    save_weights(files.last, model.state_dict(), weights_metadata(cfg, class_names, epoch + 1, metrics,
                                                                  type(model).__name__))
    save_state(files.state, {
        "epoch": epoch + 1,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "best": json.dumps(best),
        "model": model.state_dict(),
    })


def train(cfg: SegmentationConfig, resume: bool | str | None = None, stop_after_epoch: int | None = None,
          network: nn.Module | None = None) -> TrainSummary:
    """Train per ``cfg``; ``resume`` continues from ``OUTPUT/last_state.pt`` (True) or a given state file.

    ``network`` replaces the :class:`~backbones.segmentation.VMambaUNet` that ``cfg.model`` describes with
    any segmentation module taking ``(B, in_channels, *roi)`` to ``(B, out_channels, *roi)`` (MONAI's
    SwinUNETR / UNETR in comparisons at equal recipe and budget); ``cfg.model`` still gives the channel
    counts, and the weights files name the network's class (evaluate / predict rebuild only VMambaUNet).

    Raises:
        ConfigError / DatasetError / FileNotFoundError / ValueError: bad configuration or data, before any
            training step; RunExistsError: the output folder holds a run and ``resume`` is not set.
    """
    cfg.check()
    started, cpu_started = time.perf_counter(), time.process_time()
    ctx = init_distributed(cfg.train.device)
    try:
        check_precision(ctx.device, cfg.train.precision)
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        files = RunFiles(Path(cfg.train.output_dir))
        _check_run_folder(files, bool(resume))
        torch.manual_seed(cfg.train.seed)  # model initialisation: the same on every process
        model = (network if network is not None else build_model(cfg.model, load_encoder_checkpoint=not resume))
        model = model.to(ctx.device)
        train_cases, val_cases, class_names = prepare_data(cfg, ctx)
        data = _build_data(cfg, ctx, train_cases, val_cases)
        ddp_model: nn.Module = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                                       else None) if ctx.distributed else model
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        optimizer = _optimizer(cfg, model)
        steps = len(data.train_loader)
        scheduler = WarmupCosineSchedule(optimizer, warmup_steps=round(cfg.optim.warmup_epochs * steps),
                                         t_total=cfg.train.epochs * steps, end_lr=cfg.optim.lr * cfg.optim.min_lr_ratio)
        scaler = grad_scaler(ctx.device, cfg.train.precision)
        start_epoch, best = 0, None
        if resume:
            state_path = files.state if resume is True else Path(resume)
            if not state_path.is_file():
                raise FileNotFoundError(f"cannot resume: {state_path} does not exist")
            state = load_state(state_path)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state["scaler"]:
                scaler.load_state_dict(state["scaler"])
            start_epoch, best = int(state["epoch"]), json.loads(state["best"])
        log = CsvLog(files.log)
        if ctx.is_main:
            files.root.mkdir(parents=True, exist_ok=True)
            save_config(cfg, files.config)
            log.truncate_after("epoch", start_epoch)
            params = sum(p.numel() for p in model.parameters())
            what = f"mixer {cfg.model.mixer}" if network is None else "given network"
            print(f"{type(model).__name__} {cfg.model.spatial_dims}-D, {params / 1e6:.2f}M parameters, {what}; "
                  f"{len(train_cases)} training / {len(val_cases)} validation cases; {steps} steps per epoch on "
                  f"{ctx.world_size} process(es), device {ctx.device}", flush=True)
        last_row: dict[str, float] = {}
        end_epoch = cfg.train.epochs if stop_after_epoch is None else min(cfg.train.epochs, stop_after_epoch)
        for epoch in range(start_epoch, end_epoch):
            _seed_epoch(cfg, epoch, ctx, data)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = _train_epoch(cfg, ctx, ddp_model, model, data.train_loader, loss_fn, optimizer, scheduler, scaler,
                                epoch)
            # CPU seconds as well as wall seconds: on a shared machine the wall clock says little
            row: dict[str, float] = {"epoch": epoch + 1, "train_loss": loss, "lr": scheduler.get_last_lr()[0],
                                     "train_seconds": time.perf_counter() - t0,
                                     "train_cpu_seconds": time.process_time() - c0}
            metrics = None
            if (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs:
                metrics = _validate(cfg, ctx, model, data.val_loader, class_names, files, epoch)
                row.update({f"val_{k}": v for k, v in metrics.items()})
                if best is None or (not math.isnan(metrics["mean_dice"]) and metrics["mean_dice"] > best["mean_dice"]):
                    best = {"epoch": epoch + 1, **metrics}
                    if ctx.is_main:
                        save_weights(files.best, model.state_dict(),
                                     weights_metadata(cfg, class_names, epoch + 1, metrics, type(model).__name__))
            if ctx.is_main:
                _save_checkpoints(cfg, files, model, optimizer, scheduler, scaler, epoch, best, class_names, metrics)
                log.append(row)
                plot_training_curves(log.rows(), [metric_key(n) for n in class_names[1:]], files.curves)
                _print_epoch(row, class_names)
            last_row = row
            barrier(ctx)
        summary = TrainSummary(files.root, end_epoch, cfg.train.epochs, class_names, last_row, best,
                               time.perf_counter() - started, time.process_time() - cpu_started)
        if ctx.is_main:
            files.metrics.write_text(json.dumps({"best": best, "last": last_row, "seconds": summary.seconds,
                                                 "cpu_seconds": summary.cpu_seconds, "class_names": class_names},
                                                indent=2))
        return summary
    finally:
        close_distributed(ctx)


def _print_epoch(row: dict[str, float], class_names: list[str]) -> None:
    text = (f"epoch {int(row['epoch'])}: loss {row['train_loss']:.4f} ({row['train_seconds']:.0f} s, "
            f"{row['train_cpu_seconds']:.0f} s CPU)")
    if "val_mean_dice" in row:
        dice = ", ".join(f"{n} {row[f'val_dice_{metric_key(n)}']:.3f}" for n in class_names[1:])
        text += f"; val Dice {dice}; mean {row['val_mean_dice']:.3f}"
        if not math.isnan(row.get("val_mean_hd95", float("nan"))):
            text += f"; HD95 {row['val_mean_hd95']:.2f} mm"
    print(text, flush=True)


# -------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmamba-seg-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the --config file or with --set KEY=VALUE):\n" + describe_config(SegmentationConfig))
    add_config_arguments(parser, default=DEFAULT_CONFIG, recipe_dir="configs/segmentation",
                         set_example="optim.lr=2e-4")
    parser.add_argument("--data-dir", help="Decathlon folder holding dataset.json (sets data.root)")
    parser.add_argument("--epochs", type=int, help="training epochs (sets train.epochs)")
    parser.add_argument("--device", help="cpu, cuda or auto (sets train.device)")
    add_run_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> SegmentationConfig:
    """The config named by ``args.config`` with the flag and ``--set`` overrides applied (flags first)."""
    flags = {"data_dir": "data.root", "output": "train.output_dir", "epochs": "train.epochs", "device": "train.device"}
    return load_config(SegmentationConfig, resolve_config_path(args.config), flag_overrides(args, flags))


def run(argv: list[str] | None = None) -> TrainSummary:
    """The command without the error handling: parse ``argv`` and train."""
    args = build_parser().parse_args(argv)
    summary = train(config_from_args(args), resume=args.resume, stop_after_epoch=args.stop_after_epoch)
    if env_rank() == 0 and summary.best is not None:
        best = summary.best
        print(f"done: {summary.epochs_done}/{summary.total_epochs} epochs in {summary.seconds:.0f} s "
              f"({summary.cpu_seconds:.0f} s CPU, {torch.get_num_threads()} thread(s)) -> {summary.output_dir}")
        print(f"best validation (epoch {best['epoch']}):")
        for name in summary.class_names[1:]:
            key = metric_key(name)
            print(f"  {name:>24s}: Dice {best[f'dice_{key}']:.4f}   HD95 {best[f'hd95_{key}']:.2f} mm")
        print(f"  {'mean':>24s}: Dice {best['mean_dice']:.4f}   HD95 {best['mean_hd95']:.2f} mm")
    return summary


def main(argv: list[str] | None = None) -> None:
    """Console entry point: :func:`run`, with user mistakes reported as ``error: ...`` (exit status 1)."""
    run_command(run, argv, (*USER_ERRORS, RunExistsError))


if __name__ == "__main__":
    main()
