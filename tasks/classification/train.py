"""Train an image classifier (VMamba, Vim or any timm model) on ImageFolder data with timm's pipeline.

    vmamba-train-cls                                     # the embedded default: digits, a few minutes on CPU
    vmamba-train-cls --config vmamba_t --data-dir /data/imagenet --output runs/vmamba_t
    vmamba-train-cls --config vmamba_t --output runs/vmamba_t --resume        # continue where it stopped
    torchrun --nproc_per_node 8 -m tasks.classification.train --config vim_s --data-dir /data/imagenet

One step: Mixup/CutMix (timm ``Mixup``) -> forward under autocast -> soft-target cross-entropy -> backward
(GradScaler for float16) -> gradient clipping -> AdamW (``create_optimizer_v2``: no decay on norms, biases
and the model's ``no_weight_decay()``) -> per-step cosine schedule with warm-up (``create_scheduler_v2``)
-> EMA update (``ModelEmaV3``). After every epoch the model and its EMA are scored on the validation split,
a row goes to ``log.csv``, ``curves.png`` is redrawn and the checkpoints are replaced atomically (see
:mod:`tasks.classification.checkpoint`). Under torchrun the model is wrapped in DDP, data is sharded by a
distributed sampler, metrics are summed over processes and only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tasks.classification.checkpoint import (RunFiles, load_resume_state, save_resume_state, save_run_weights,
                                             weights_metadata)
from tasks.classification.config import BuiltinData, ClassificationConfig, resolve_config_path
from tasks.classification.data import PreprocessConfig, build_dataset, build_loader, build_mixup
from tasks.classification.digits import write_digits_imagefolder
from tasks.classification.model import build_model
from tasks.classification.optim import build_optimizer, build_scheduler
from tasks.classification.validate import USER_ERRORS, EvalResult, evaluate, shard_size
from tasks.common.cli import add_config_arguments, add_run_arguments, flag_overrides, run_command
from tasks.common.config import ConfigError, describe_config, load_config, save_config
from tasks.common.csv_log import CsvLog
from tasks.common.distributed import (DistContext, all_gather_objects, all_reduce_sum, barrier, distributed_job,
                                     env_rank)
from tasks.common.plots import plot_curves
from tasks.common.precision import Precision, autocast, check_precision, grad_scaler
from tasks.common.rng import capture_rng_state, restore_rng_state, seed_everything

__all__ = ["RunExistsError", "TrainSummary", "train", "run", "main"]

DEFAULT_CONFIG = "digits"


class RunExistsError(ValueError):
    """The output folder already holds a run and ``--resume`` was not given."""


@dataclass
class TrainSummary:
    """What a call to :func:`train` did."""

    output_dir: Path
    epochs_done: int
    total_epochs: int
    last: dict[str, float] = field(default_factory=dict)  # the final epoch's log row
    best: dict[str, Any] | None = None  # {"top1", "epoch", "source"}
    seconds: float = 0.0


@dataclass
class _Run:
    """The objects of one training run, built once and shared by the epoch loop."""

    ctx: DistContext
    cfg: ClassificationConfig
    files: RunFiles
    class_names: list[str]
    pre: PreprocessConfig
    model: nn.Module  # unwrapped
    ddp_model: nn.Module  # what the training step calls (DDP wrapper or the model itself)
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    train_loader: Any
    val_loader: Any
    val_images: int
    mixup: Any
    criterion: nn.Module
    total_epochs: int
    precision: Precision
    epoch: int = 0  # epochs completed
    num_updates: int = 0
    best: dict[str, Any] | None = None


def _criterion(cfg: ClassificationConfig) -> nn.Module:
    if cfg.mixup_active():
        return SoftTargetCrossEntropy()  # Mixup already smoothed the targets
    if cfg.aug.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.aug.label_smoothing)
    return nn.CrossEntropyLoss()


def _build(cfg: ClassificationConfig, ctx: DistContext, resume: Path | None) -> _Run:
    files = RunFiles(Path(cfg.train.output_dir))
    if resume is None and files.state.exists():
        raise RunExistsError(f"{files.root} already holds a run ({files.state.name}); pass --resume to continue it "
                             f"or choose another output folder")
    precision = check_precision(ctx.device, cfg.train.precision)
    seed_everything(cfg.train.seed + ctx.rank)

    if cfg.data.builtin is BuiltinData.DIGITS and ctx.is_main:
        write_digits_imagefolder(cfg.data.root)
    barrier(ctx)
    train_set = build_dataset(cfg.data, cfg.data.train_split, is_training=True)
    class_names = train_set.class_names
    val_set = build_dataset(cfg.data, cfg.data.val_split, class_names=class_names)
    num_classes = cfg.model.num_classes or len(class_names)
    if num_classes < len(class_names):
        raise ConfigError(f"model.num_classes={num_classes} but {cfg.data.root}/{cfg.data.train_split} has "
                          f"{len(class_names)} classes")

    model = build_model(cfg.model.name, num_classes, cfg.model.kwargs, drop_rate=cfg.model.drop_rate,
                        drop_path_rate=cfg.model.drop_path_rate, checkpoint=cfg.model.init_checkpoint)
    model.to(ctx.device)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    pre = PreprocessConfig.resolve(cfg.data, model)
    common = dict(num_workers=cfg.data.num_workers, distributed=ctx.distributed, pin_memory=cfg.data.pin_memory)
    train_loader = build_loader(train_set, pre, cfg.train.batch_size, ctx.device, is_training=True, aug=cfg.aug,
                                **common)
    val_loader = build_loader(val_set, pre, cfg.train.batch_size, ctx.device, is_training=False, **common)

    optimizer = build_optimizer(cfg, model, ctx.world_size)
    scheduler, total_epochs = build_scheduler(cfg, optimizer, len(train_loader), ctx.world_size)
    ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup) if cfg.ema.enabled else None
    run = _Run(ctx=ctx, cfg=cfg, files=files, class_names=class_names, pre=pre, model=model, ddp_model=model, ema=ema,
               optimizer=optimizer, scheduler=scheduler, scaler=grad_scaler(ctx.device, precision),
               train_loader=train_loader, val_loader=val_loader, val_images=shard_size(len(val_set), ctx),
               mixup=build_mixup(cfg.aug, num_classes), criterion=_criterion(cfg), total_epochs=total_epochs,
               precision=precision)
    if ctx.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{cfg.model.name}: {n_params / 1e6:.2f} M parameters, {num_classes} classes, "
              f"{len(train_set)} train / {len(val_set)} val images, {ctx.world_size} process(es) on {ctx.device}, "
              f"global batch {cfg.train.batch_size * ctx.world_size}, "
              f"peak lr {cfg.learning_rates(ctx.world_size)[0]:.3g}, "
              f"{total_epochs} epochs, {len(train_loader)} steps/epoch")
        if cfg.aug.repeated_aug and not ctx.distributed:
            print("note: aug.repeated_aug needs a distributed run (timm's sampler); off in this single process")
    if resume is not None:
        _restore(run, resume)
    elif ctx.is_main:
        files.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, files.config)
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        run.ddp_model = DistributedDataParallel(model, device_ids=device_ids)
    return run


def _restore(run: _Run, path: Path) -> None:
    """Load a resume state into ``run``; RNG states last, so nothing after them draws differently."""
    state = load_resume_state(path)
    if state["class_names"] != run.class_names:
        raise ValueError(f"cannot resume {path}: it was trained on classes {state['class_names'][:5]}..., "
                         f"the data now has {run.class_names[:5]}...")
    run.model.load_state_dict(state["model"])
    if run.ema is not None:
        if state["ema"] is None:
            raise ValueError(f"cannot resume {path} with EMA on: the run was trained without EMA")
        run.ema.module.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state["scaler"] is not None:
        run.scaler.load_state_dict(state["scaler"])
    run.epoch, run.num_updates, run.best = state["epoch"], state["num_updates"], state["best"]
    if run.ctx.is_main:
        CsvLog(run.files.log).truncate_after("epoch", run.epoch)
        print(f"resumed from {path} after epoch {run.epoch}")
    rng = state["rng"]
    if len(rng) == run.ctx.world_size:
        restore_rng_state(rng[run.ctx.rank])
    else:  # another process count: the data order changes anyway; keep each process's stream distinct
        if run.ctx.is_main:
            print(f"note: resuming {len(rng)}-process RNG states on {run.ctx.world_size} processes; "
                  "augmentation will not replay exactly")
        seed_everything(run.cfg.train.seed + 1000 * run.epoch + run.ctx.rank)


def _train_one_epoch(run: _Run) -> float:
    """One pass over the training shard; returns the mean training loss over all processes."""
    cfg, ctx = run.cfg, run.ctx
    run.ddp_model.train()
    sampler = getattr(run.train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(run.epoch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    count = 0
    bar = tqdm(run.train_loader, desc=f"epoch {run.epoch + 1}/{run.total_epochs}",
               disable=not (cfg.train.progress and ctx.is_main), leave=False)
    for step, (images, target) in enumerate(bar):
        images, target = images.to(ctx.device, non_blocking=True), target.to(ctx.device, non_blocking=True)
        if run.mixup is not None:
            images, target = run.mixup(images, target)
        with autocast(ctx.device, run.precision):
            loss = run.criterion(run.ddp_model(images), target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at epoch {run.epoch + 1}, step {step + 1}; "
                                     "lower the learning rate or train in float32")
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
        else:
            loss.backward()
        if cfg.optim.clip_grad is not None:
            dispatch_clip_grad(run.model.parameters(), cfg.optim.clip_grad, mode=cfg.optim.clip_mode)
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        run.num_updates += 1
        run.scheduler.step_update(num_updates=run.num_updates)
        if run.ema is not None:
            run.ema.update(run.model, step=run.num_updates)
        loss_sum += loss.detach().double() * len(images)
        count += len(images)
        if step % 10 == 0 and bar.disable is False:
            bar.set_postfix(loss=f"{loss_sum.item() / count:.4f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}")
    totals = all_reduce_sum(torch.stack([loss_sum.cpu(), torch.tensor(float(count), dtype=torch.float64)]), ctx)
    return float(totals[0] / totals[1])


def _score(run: _Run) -> tuple[EvalResult, EvalResult | None]:
    kw = dict(precision=run.precision, num_images=run.val_images, progress=run.cfg.train.progress)
    val = evaluate(run.model, run.val_loader, run.ctx, desc="val", **kw)
    ema_val = evaluate(run.ema.module, run.val_loader, run.ctx, desc="val ema", **kw) if run.ema is not None else None
    return val, ema_val


def _write_epoch(run: _Run, row: dict[str, float], val: EvalResult, ema_val: EvalResult | None,
                 rng_states: list[dict[str, Any]]) -> None:
    """Rank 0: log row, best/last weights, resume state (last, so it never points past the weights), plot."""
    files, cfg = run.files, run.cfg
    CsvLog(files.log).append(row)
    candidates = [("model", run.model, val)] + ([("ema", run.ema.module, ema_val)] if ema_val is not None else [])
    def meta(source: str, result: EvalResult) -> dict[str, str]:
        return weights_metadata(cfg, run.class_names, run.pre, run.epoch, source, result.as_dict("val_"))

    source, module, result = max(candidates, key=lambda c: c[2].top1)  # ties keep the raw model
    if run.best is None or result.top1 > run.best["top1"]:
        run.best = {"top1": result.top1, "top5": result.top5, "loss": result.loss, "epoch": run.epoch, "source": source}
        save_run_weights(files.best, module, meta(source, result))
    save_run_weights(files.last, run.model, meta("model", val))
    if ema_val is not None:
        save_run_weights(files.last_ema, run.ema.module, meta("ema", ema_val))
    save_resume_state(files, cfg, epoch=run.epoch, num_updates=run.num_updates, model=run.model,
                      ema=run.ema.module if run.ema is not None else None, optimizer=run.optimizer,
                      scheduler=run.scheduler, scaler=run.scaler, rng_states=rng_states, best=run.best,
                      class_names=run.class_names)
    plot_curves(CsvLog(files.log).rows(), "epoch",
                {"loss": ["train_loss", "val_loss", "ema_val_loss"],
                 "accuracy (%)": ["val_top1", "val_top5", "ema_val_top1", "ema_val_top5"],
                 "learning rate": ["lr"]}, files.curves)


def train(cfg: ClassificationConfig, resume: str | Path | bool | None = None,
          stop_after_epoch: int | None = None) -> TrainSummary:
    """Train as ``cfg`` says.

    Args:
        resume: True (this run's ``last_state.pt``), a state file, or None/False to start afresh.
        stop_after_epoch: return once this many epochs are complete (the schedule still spans all epochs;
            resume later to continue).

    Raises:
        RunExistsError: the output folder holds a run and ``resume`` is off.
        ConfigError, ImageFolderError, UnknownModelError, FileNotFoundError: bad input, named in the message.
    """
    cfg.check()
    started = time.perf_counter()
    with distributed_job(cfg.train.device, cfg.train.threads) as ctx:
        files = RunFiles(Path(cfg.train.output_dir))
        resume_path = files.state if resume is True else (Path(resume) if resume else None)
        run = _build(cfg, ctx, resume_path)
        row: dict[str, float] = {}
        while run.epoch < run.total_epochs and (stop_after_epoch is None or run.epoch < stop_after_epoch):
            epoch_start = time.perf_counter()
            lr = run.optimizer.param_groups[0]["lr"]
            train_loss = _train_one_epoch(run)
            run.epoch += 1
            run.scheduler.step(run.epoch)  # no-op for per-step schedules; moves per-epoch ones
            val, ema_val = _score(run)
            rng_states = all_gather_objects(capture_rng_state(), ctx)  # after scoring: what the next epoch starts from
            row = {"epoch": run.epoch, "lr": lr, "train_loss": train_loss, **val.as_dict("val_"),
                   **(ema_val.as_dict("ema_val_") if ema_val is not None else {}),
                   "epoch_seconds": time.perf_counter() - epoch_start}
            if ctx.is_main:
                _write_epoch(run, row, val, ema_val, rng_states)
                print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}))
            barrier(ctx)
        if run.epoch >= run.total_epochs and ctx.is_main and not row:
            print(f"{files.root}: all {run.total_epochs} epochs already done")
        return TrainSummary(output_dir=files.root, epochs_done=run.epoch, total_epochs=run.total_epochs, last=row,
                            best=run.best, seconds=time.perf_counter() - started)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmamba-train-cls", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the --config file or with --set KEY=VALUE; defaults are the official "
               "ImageNet-1k recipe):\n" + describe_config(ClassificationConfig))
    add_config_arguments(parser, default=DEFAULT_CONFIG, recipe_dir="configs/classification",
                         set_example="optim.base_lr=1e-3")
    parser.add_argument("--data-dir", help="ImageFolder root (sets data.root)")
    parser.add_argument("--epochs", type=int, help="training epochs (sets schedule.epochs)")
    parser.add_argument("--batch-size", type=int, help="images per process per step (sets train.batch_size)")
    parser.add_argument("--device", help="cpu, cuda or auto (sets train.device)")
    add_run_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> ClassificationConfig:
    """The config file named by ``args.config`` with the flag and ``--set`` overrides applied (flags first)."""
    flags = {"data_dir": "data.root", "output": "train.output_dir", "epochs": "schedule.epochs",
             "batch_size": "train.batch_size", "device": "train.device"}
    return load_config(ClassificationConfig, resolve_config_path(args.config), flag_overrides(args, flags))


def run(argv: list[str] | None = None) -> TrainSummary:
    """The command without the error handling: parse ``argv`` and train."""
    args = build_parser().parse_args(argv)
    summary = train(config_from_args(args), resume=args.resume, stop_after_epoch=args.stop_after_epoch)
    if env_rank() == 0 and summary.best is not None and summary.last:
        print(f"done: {summary.epochs_done}/{summary.total_epochs} epochs in {summary.seconds:.0f} s; best val top-1 "
              f"{summary.best['top1']:.2f} % ({summary.best['source']}, epoch {summary.best['epoch']}) -> "
              f"{summary.output_dir}")
    return summary


def main(argv: list[str] | None = None) -> None:
    """Console entry point: :func:`run`, with user mistakes reported as ``error: ...`` (exit status 1)."""
    run_command(run, argv, (*USER_ERRORS, RunExistsError))


if __name__ == "__main__":
    main()
