"""Validate a classifier: top-1, top-5 and loss on an ImageFolder split.

    vmamba-validate-cls --checkpoint runs/digits/best.safetensors --data-dir data/digits
    vmamba-validate-cls --checkpoint vssm1_tiny_0230s_ckpt_epoch_264.pth --model vmamba_t \\
        --data-dir /data/imagenet --img-size 224 --crop-pct 0.875
    torchrun --nproc_per_node 8 -m tasks.classification.validate ...   # shards the images over processes

Weights load through timm's pretrained path (``pretrained=True, pretrained_cfg_overlay=dict(file=...)``), so
an official VMamba/Vim ``.pth`` (``{"model": state_dict}``, converted by the model's checkpoint filter) works
as well as our ``.safetensors`` files, whose header also supplies the model name, its arguments and the class
order and pre-processing. Precedence, lowest first: defaults, ``--config``, our checkpoint's header, flags.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tasks.classification.config import ClassificationConfig, resolve_config_path
from tasks.classification.data import ImageFolderError, PreprocessConfig, build_dataset, build_loader
from tasks.classification.model import UnknownModelError, build_model, checkpoint_info
from tasks.common.checkpoint import CheckpointError
from tasks.common.cli import run_command
from tasks.common.config import ConfigError, describe_config, load_config
from tasks.common.distributed import DistContext, all_reduce_sum, distributed_job, env_rank
from tasks.common.precision import Precision, autocast

__all__ = ["EvalResult", "evaluate", "validate", "run", "main", "USER_ERRORS"]

# Mistakes in what the user gave us: reported as one line, without a traceback, by the command-line entry points.
USER_ERRORS = (ConfigError, ImageFolderError, UnknownModelError, FileNotFoundError, CheckpointError)


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy loss and top-k accuracies (in %) over ``count`` images."""

    loss: float
    top1: float
    top5: float
    count: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, f"{prefix}top1": self.top1, f"{prefix}top5": self.top5}


def shard_size(total: int, ctx: DistContext) -> int:
    """Images this process really owns under timm's ``OrderedDistributedSampler``.

    That sampler pads the list (repeating its first images) so every process gets the same count; the padded
    tail must not be scored twice.
    """
    return len(range(ctx.rank, total, ctx.world_size))


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: torch.utils.data.DataLoader, ctx: DistContext,
             precision: Precision | str = Precision.FLOAT32, num_images: int | None = None,
             progress: bool = False, desc: str = "val") -> EvalResult:
    """Score ``model`` on ``loader``, summed over every process.

    Args:
        loader: batches of ``(images (B, 3, H, W), labels (B,))``; under DDP, a shard per process.
        num_images: images this process owns (:func:`shard_size`); batches past it are padding and ignored.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, count
    remaining = num_images if num_images is not None else float("inf")
    for images, target in tqdm(loader, desc=desc, disable=not (progress and ctx.is_main), leave=False):
        if remaining <= 0:
            break
        images, target = images.to(ctx.device, non_blocking=True), target.to(ctx.device, non_blocking=True)
        if remaining < len(target):
            images, target = images[: int(remaining)], target[: int(remaining)]
        with autocast(ctx.device, precision):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk.eq(target[:, None])
        sums += torch.tensor([F.cross_entropy(logits, target, reduction="sum").item(), hits[:, 0].sum().item(),
                              hits.any(dim=1).sum().item(), len(target)], dtype=torch.float64)
        remaining -= len(target)
    model.train(was_training)
    loss_sum, top1, top5, count = all_reduce_sum(sums, ctx).tolist()
    if count == 0:
        raise ValueError("validation set is empty")
    return EvalResult(loss=loss_sum / count, top1=100 * top1 / count, top5=100 * top5 / count, count=int(count))


def validate(cfg: ClassificationConfig, checkpoint: str | Path, split: str | None = None) -> EvalResult:
    """Load ``checkpoint`` into ``cfg.model`` and score it on ``cfg.data.root/split`` (default: val split)."""
    with distributed_job(cfg.train.device, cfg.train.threads) as ctx:
        info = checkpoint_info(checkpoint)
        split = split or cfg.data.val_split
        class_names = info.get("class_names")
        dataset = build_dataset(cfg.data, split, class_names=class_names)
        num_classes = cfg.model.num_classes or len(dataset.class_names)
        # the checkpoint's classifier must score these classes: keep it whatever the pretrained config says
        model = build_model(cfg.model.name, num_classes, cfg.model.kwargs, checkpoint=checkpoint,
                            checkpoint_classes=num_classes).to(ctx.device)
        pre = PreprocessConfig.resolve(cfg.data, model)
        loader = build_loader(dataset, pre, cfg.train.batch_size, ctx.device, is_training=False,
                              num_workers=cfg.data.num_workers, distributed=ctx.distributed,
                              pin_memory=cfg.data.pin_memory)
        return evaluate(model, loader, ctx, cfg.train.precision, num_images=shard_size(len(dataset), ctx),
                        progress=cfg.train.progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmamba-validate-cls", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (for --set; a --config file sets the same keys):\n" + describe_config(ClassificationConfig))
    parser.add_argument("--checkpoint", required=True, help="our .safetensors weights or an official .pth")
    parser.add_argument("--config", help="config file or recipe name in configs/classification (optional)")
    parser.add_argument("--model", help="timm model name (default: from the checkpoint header or the config)")
    parser.add_argument("--data-dir", help="ImageFolder root (sets data.root)")
    parser.add_argument("--split", help="folder under the root to score (default: data.val_split)")
    parser.add_argument("--img-size", type=int, help="input resolution (sets data.img_size, and model.kwargs.img_size "
                                                     "when the model takes one)")
    parser.add_argument("--crop-pct", type=float, help="centre-crop fraction (sets data.crop_pct)")
    parser.add_argument("--batch-size", type=int, help="images per process per batch (sets train.batch_size)")
    parser.add_argument("--output", help="also write the metrics to this JSON file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return parser


def run(argv: list[str] | None = None) -> EvalResult:
    """The command without the error handling: parse ``argv``, validate, print (rank 0) and return the metrics."""
    args = build_parser().parse_args(argv)
    info = checkpoint_info(args.checkpoint)
    if not info and not (args.model or args.config):
        raise ConfigError(f"{args.checkpoint} has no header naming its model (an official or foreign file): pass "
                          "--model NAME (and --set model.kwargs=... for a non-standard size) or --config")
    overrides: list[str] = []
    if "model" in info:  # our own file: it knows how it was built and how its inputs were prepared
        overrides += [f"model.name={info['model']}", f"model.kwargs={json.dumps(info['model_kwargs'])}"]
        overrides += [f"data.{k}={json.dumps(v)}" for k, v in info.get("preprocess", {}).items()]
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.data_dir:
        overrides.append(f"data.root={args.data_dir}")
    if args.img_size:
        overrides.append(f"data.img_size={args.img_size}")
    if args.crop_pct:
        overrides.append(f"data.crop_pct={args.crop_pct}")
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    overrides += args.set
    cfg = load_config(ClassificationConfig, resolve_config_path(args.config) if args.config else None, overrides)
    if args.img_size and "img_size" in cfg.model.kwargs:
        cfg.model.kwargs["img_size"] = args.img_size
    result = validate(cfg, args.checkpoint, args.split)
    if env_rank() == 0:
        line = json.dumps({"checkpoint": str(args.checkpoint), "model": cfg.model.name, "img_size": cfg.data.img_size,
                           **result.as_dict(), "images": result.count})
        print(line)
        if args.output:
            Path(args.output).write_text(line + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    """Console entry point: :func:`run`, with user mistakes reported as ``error: ...`` (exit status 1)."""
    run_command(run, argv, USER_ERRORS)


if __name__ == "__main__":
    main()
