"""Score trained weights on a Decathlon list: per-class Dice and 95% Hausdorff distance, per case and mean.

    vmamba-seg-evaluate --checkpoint runs/mni152_tissue/best.safetensors
    vmamba-seg-evaluate --checkpoint runs/spleen/best.safetensors --data-dir /data/Task09_Spleen --split validation

The config (network, pre-processing, sliding window) comes from the weights file's header unless ``--config``
is given. Cases are scored after the same deterministic pre-processing as validation during training
(orientation, spacing, intensity, foreground crop), with ``sliding_window_inference`` (or ``SliceInferer``
for 2-D networks). Writes ``evaluation.csv`` (one row per case), ``evaluation.json`` (means) and
``evaluation.png`` (a slice of the first case with the prediction) into ``--output`` (default: the
checkpoint's folder). Under torchrun the cases are split over the processes.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader, partition_dataset

from tasks.common.cli import run_command
from tasks.common.csv_log import CsvLog
from tasks.common.distributed import all_gather_objects, close_distributed, env_rank, init_distributed
from tasks.segmentation.config import SegmentationConfig
from tasks.segmentation.data import check_cases, load_cases, read_dataset_json, split_cases
from tasks.segmentation.engine import (CaseMetrics, MetricTotals, build_model, config_from_checkpoint,
                                       evaluate_cases, load_model_weights)
from tasks.segmentation.plots import plot_overlay
from tasks.segmentation.train import USER_ERRORS, ensure_builtin_data, metric_key
from tasks.segmentation.transforms import val_transforms

__all__ = ["EvaluationResult", "evaluate", "run", "main"]


@dataclass
class EvaluationResult:
    means: dict[str, float]  # dice_<class>, hd95_<class>, dice_<region>, mean_dice, mean_hd95
    cases: list[CaseMetrics]
    class_names: list[str]


def _cases(cfg: SegmentationConfig, split: str) -> list[dict]:
    info, data = read_dataset_json(Path(cfg.data.root) / cfg.data.dataset_json)
    if split == "validation" and cfg.data.val_key not in info.keys:
        # the same hold-out as training used
        return split_cases(info, data, cfg.data.train_key, cfg.data.val_key, cfg.data.val_count,
                           cfg.data.val_fraction)[1]
    return load_cases(info.path, split)


def evaluate(cfg: SegmentationConfig, checkpoint: str | Path, class_names: list[str], split: str = "validation",
             output: str | Path | None = None) -> EvaluationResult:
    """Score ``checkpoint`` on list ``split`` of ``cfg.data.root`` and write the report files (rank 0)."""
    ctx = init_distributed(cfg.train.device)
    try:
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        ensure_builtin_data(cfg, ctx)
        cases = _cases(cfg, split)
        check_cases(cases, cfg.model.in_channels)
        model = build_model(cfg.model, load_encoder_checkpoint=False)
        load_model_weights(model, checkpoint)
        model.to(ctx.device)
        shard = partition_dataset(cases, num_partitions=ctx.world_size, shuffle=False, even_divisible=False)[ctx.rank] \
            if ctx.distributed else cases
        loader = DataLoader(CacheDataset(shard, val_transforms(cfg), cache_rate=cfg.data.cache_rate,
                                         progress=False), batch_size=1, num_workers=cfg.data.num_workers)
        foreground = [metric_key(n) for n in class_names[1:]]
        mine, kept = evaluate_cases(model, loader, cfg, foreground, ctx, progress=cfg.train.progress and ctx.is_main,
                                    keep=1 if cfg.eval.overlay else 0)
        all_cases = [c for part in all_gather_objects(mine, ctx) for c in part]
        means = MetricTotals.from_cases(all_cases, foreground, list(cfg.eval.regions)).means()
        if ctx.is_main:
            out = Path(output) if output is not None else Path(checkpoint).parent
            out.mkdir(parents=True, exist_ok=True)
            log = CsvLog(out / "evaluation.csv")
            log.path.unlink(missing_ok=True)
            for case in all_cases:
                log.append(case.row(foreground))
            (out / "evaluation.json").write_text(json.dumps(
                {"checkpoint": str(checkpoint), "split": split, "cases": len(all_cases), "means": means}, indent=2))
            if kept:
                image, label, pred = kept[0]
                plot_overlay(image, label, pred, class_names, out / "evaluation.png", axis=cfg.slices.axis,
                             title=f"{mine[0].name}: mean Dice {_mean(mine[0].dice):.3f}")
        return EvaluationResult(means, all_cases, class_names)
    finally:
        close_distributed(ctx)


def _mean(values: list[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else float("nan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmamba-seg-evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="weights written by training (.safetensors)")
    parser.add_argument("--config", help="config file or recipe (default: the one stored in the checkpoint)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--data-dir", help="Decathlon folder (sets data.root)")
    parser.add_argument("--split", default="validation",
                        help="dataset.json list to score (default: validation, or training's hold-out)")
    parser.add_argument("--output", help="folder for evaluation.csv/json/png (default: the checkpoint's folder)")
    parser.add_argument("--device", help="cpu, cuda or auto (sets train.device)")
    return parser


def run(argv: list[str] | None = None) -> EvaluationResult:
    args = build_parser().parse_args(argv)
    overrides = ([f"data.root={args.data_dir}"] if args.data_dir else []) + \
                ([f"train.device={args.device}"] if args.device else []) + list(args.set)
    cfg, names = config_from_checkpoint(args.checkpoint, args.config, overrides)
    result = evaluate(cfg, args.checkpoint, names, args.split, args.output)
    if env_rank() == 0:
        print(f"{len(result.cases)} case(s) of '{args.split}':")
        for name in names[1:]:
            key = metric_key(name)
            print(f"  {name:>24s}: Dice {result.means[f'dice_{key}']:.4f}   HD95 {result.means[f'hd95_{key}']:.2f} mm")
        for region in cfg.eval.regions:
            print(f"  {region:>24s}: Dice {result.means[f'dice_{region}']:.4f}")
        print(f"  {'mean':>24s}: Dice {result.means['mean_dice']:.4f}   HD95 {result.means['mean_hd95']:.2f} mm")
    return result


def main(argv: list[str] | None = None) -> None:
    """Console entry point: :func:`run`, with user mistakes reported as ``error: ...`` (exit status 1)."""
    run_command(run, argv, USER_ERRORS)


if __name__ == "__main__":
    main()
