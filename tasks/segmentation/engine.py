"""What training, evaluation and prediction share: the network from its config, sliding-window inference,
per-class Dice / 95% Hausdorff metrics summed over processes, and the checkpoint's self-description."""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import yaml
from monai.inferers import SliceInferer, sliding_window_inference
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from torch import Tensor, nn
from tqdm import tqdm

from backbones.segmentation import VMambaUNet
from tasks.common.checkpoint import load_weights, read_weights_metadata
from tasks.common.config import apply_overrides, config_from_dict, config_to_dict, load_config
from tasks.common.distributed import DistContext, all_reduce_sum
from tasks.common.precision import autocast
from tasks.segmentation.config import ModelConfig, SegmentationConfig, resolve_config_path

__all__ = ["plain", "build_model", "infer", "CaseMetrics", "MetricTotals", "case_metrics", "evaluate_cases",
           "weights_metadata", "config_from_checkpoint", "load_model_weights"]


def plain(t: Any) -> Tensor:
    """A plain ``torch.Tensor`` view of a MONAI ``MetaTensor`` (or any array)."""
    return t.as_subclass(Tensor) if isinstance(t, Tensor) else torch.as_tensor(t)


def build_model(cfg: ModelConfig, load_encoder_checkpoint: bool = True) -> VMambaUNet:
    """The :class:`~backbones.segmentation.VMambaUNet` a config describes; the encoder starts from
    ``cfg.encoder_checkpoint`` when one is set and ``load_encoder_checkpoint`` (False when trained weights are
    loaded next anyway)."""
    model = VMambaUNet(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, spatial_dims=cfg.spatial_dims,
        depths=tuple(cfg.depths), dims=tuple(cfg.dims), feature_size=cfg.feature_size, mixer=cfg.mixer,
        mixer_kwargs=dict(cfg.mixer_kwargs), d_state=cfg.d_state, ssm_ratio=cfg.ssm_ratio, mlp_ratio=cfg.mlp_ratio,
        drop_path_rate=cfg.drop_path_rate, norm_name=cfg.norm_name, grad_checkpointing=cfg.grad_checkpointing,
    )
    if cfg.encoder_checkpoint and load_encoder_checkpoint:
        model.load_encoder_checkpoint(cfg.encoder_checkpoint)
    return model


def infer(model: nn.Module, image: Tensor, cfg: SegmentationConfig) -> Tensor:
    """Logits for whole volumes: ``image (B, C, X, Y, Z) -> (B, out_channels, X, Y, Z)``.

    3-D networks: ``sliding_window_inference`` with ``roi_size`` windows (Gaussian blending by default).
    2-D networks: MONAI's ``SliceInferer`` runs the same 2-D sliding window over every slice along
    ``slices.axis``.
    """
    roi, ev = list(cfg.transforms.roi_size), cfg.eval
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device, cfg.train.precision):
        if cfg.model.spatial_dims == 3:
            out = sliding_window_inference(image, roi, ev.sw_batch_size, model, overlap=ev.overlap, mode=ev.blend,
                                           sw_device=device, device=torch.device("cpu"), progress=False)
        else:
            inferer = SliceInferer(spatial_dim=cfg.slices.axis, roi_size=roi, sw_batch_size=ev.sw_batch_size,
                                   overlap=ev.overlap, mode=ev.blend, sw_device=device, device=torch.device("cpu"),
                                   progress=False)
            out = inferer(image, model)
    return plain(out).float()


@dataclass
class CaseMetrics:
    """One case's scores: per foreground class (index 0 = label 1) and per region; NaN when undefined
    (class absent from both prediction and truth for Dice; from either for HD95)."""

    name: str
    dice: list[float]
    hd95: list[float]
    region_dice: dict[str, float] = field(default_factory=dict)

    def row(self, class_names: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"case": self.name}
        for name, d, h in zip(class_names, self.dice, self.hd95):
            out[f"dice_{name}"] = d
            out[f"hd95_{name}"] = h
        out.update({f"dice_{k}": v for k, v in self.region_dice.items()})
        return out


def _binary_dice(pred: Tensor, truth: Tensor) -> float:
    inter, total = float((pred & truth).sum()), float(pred.sum() + truth.sum())
    return 2 * inter / total if total > 0 else float("nan")


def case_metrics(
    name: str,
    pred: Tensor,
    label: Tensor,
    num_classes: int,
    spacing: Sequence[float] | None,
    hd95: bool,
    regions: Mapping[str, Sequence[int]] | None = None,
) -> CaseMetrics:
    """Dice (MONAI ``DiceMetric``) and 95% Hausdorff distance in mm (``HausdorffDistanceMetric``) per class.

    Args:
        pred, label: integer label maps ``(1, X, Y, Z)`` (or ``(1, H, W)``).
        num_classes: classes including background; metrics cover 1..num_classes-1.
        spacing: voxel size in mm for HD95 (None: voxels).
        regions: name -> labels whose union is scored with a binary Dice (BraTS WT/TC/ET).
    """
    pred_oh = nn.functional.one_hot(pred.long()[0], num_classes).movedim(-1, 0)[None].float()
    label_oh = nn.functional.one_hot(label.long()[0], num_classes).movedim(-1, 0)[None].float()
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(pred_oh, label_oh)[0]
    # Both empty is a perfect score, but MONAI reports NaN for an empty truth; keep NaN (not averaged).
    hd = [float("nan")] * (num_classes - 1)
    if hd95:
        with warnings.catch_warnings():  # MONAI warns for every class absent from a case; NaN says it already
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            hd_t = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
                pred_oh, label_oh, spacing=list(spacing) if spacing is not None else None)[0]
        hd = [float(v) if math.isfinite(float(v)) else float("nan") for v in hd_t]
    regions_out = {}
    for region, labels in (regions or {}).items():
        members = torch.tensor(list(labels))
        regions_out[region] = _binary_dice(torch.isin(pred.long(), members), torch.isin(label.long(), members))
    return CaseMetrics(name=name, dice=[float(v) for v in dice], hd95=hd, region_dice=regions_out)


@dataclass
class MetricTotals:
    """Sums and counts of the defined (non-NaN) per-case values, reducible over processes."""

    class_names: list[str]  # foreground classes
    region_names: list[str]
    sums: Tensor  # (2 * classes + regions,): dice per class, hd95 per class, dice per region
    counts: Tensor

    @property
    def names(self) -> list[str]:
        return ([f"dice_{c}" for c in self.class_names] + [f"hd95_{c}" for c in self.class_names]
                + [f"dice_{r}" for r in self.region_names])

    @classmethod
    def from_cases(cls, cases: Iterable[CaseMetrics], class_names: Sequence[str],
                   region_names: Sequence[str] = ()) -> "MetricTotals":
        width = 2 * len(class_names) + len(region_names)
        sums, counts = torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
        for case in cases:
            values = list(case.dice) + list(case.hd95) + [case.region_dice[r] for r in region_names]
            for i, v in enumerate(values):
                if not math.isnan(v):
                    sums[i] += v
                    counts[i] += 1
        return cls(list(class_names), list(region_names), sums, counts)

    def reduce(self, ctx: DistContext) -> "MetricTotals":
        both = all_reduce_sum(torch.stack([self.sums, self.counts]), ctx)
        return MetricTotals(self.class_names, self.region_names, both[0], both[1])

    def means(self) -> dict[str, float]:
        """Mean of every metric over the cases where it is defined, plus ``mean_dice`` / ``mean_hd95`` over
        the foreground classes."""
        out = {n: float(s / c) if c > 0 else float("nan") for n, s, c in zip(self.names, self.sums, self.counts)}
        for kind in ("dice", "hd95"):
            defined = [out[f"{kind}_{c}"] for c in self.class_names if not math.isnan(out[f"{kind}_{c}"])]
            out[f"mean_{kind}"] = sum(defined) / len(defined) if defined else float("nan")
        return out


def evaluate_cases(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    cfg: SegmentationConfig,
    class_names: Sequence[str],
    ctx: DistContext,
    progress: bool = False,
    keep: int = 0,
) -> tuple[list[CaseMetrics], list[tuple[Tensor, Tensor, Tensor]]]:
    """Run :func:`infer` on every case of ``loader`` (batch size 1) and score it.

    Returns the per-case metrics of this process and up to ``keep`` ``(image, label, prediction)`` triples
    (CPU, first channel of the image) for overlay plots.
    """
    model.eval()
    spacing = cfg.transforms.pixdim
    results, kept = [], []
    for batch in tqdm(loader, desc="validate", disable=not progress, leave=False):
        image, label = plain(batch["image"]).to(ctx.device), plain(batch["label"])
        logits = infer(model, image, cfg)
        pred = logits.argmax(1, keepdim=True)
        name = str(batch["name"][0]) if "name" in batch else "case"
        results.append(case_metrics(name, pred[0], label[0], cfg.model.out_channels, spacing,
                                    cfg.eval.hd95, cfg.eval.regions))
        if len(kept) < keep:
            kept.append((image[0, 0].cpu(), label[0, 0].cpu(), pred[0, 0].cpu()))
    return results, kept


# ------------------------------------------------------------------------------ self-describing weights


def weights_metadata(cfg: SegmentationConfig, class_names: Sequence[str], epoch: int,
                     metrics: Mapping[str, float] | None = None, network: str = "VMambaUNet") -> dict[str, str]:
    """String metadata stored in the safetensors header: the full config, class names, epoch, metrics and
    the network's class name."""
    return {"config": yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "class_names": json.dumps(list(class_names)),
            "epoch": str(epoch), "metrics": json.dumps(dict(metrics or {})), "network": network,
            "format": "vmamba-seg/1"}


def config_from_checkpoint(checkpoint: str | Path, config: str | Path | None = None,
                           overrides: Sequence[str] = ()) -> tuple[SegmentationConfig, list[str]]:
    """The job config a weights file was trained with (or ``config``), with ``overrides`` applied, and its
    class names.

    Raises:
        FileNotFoundError: the weights file does not exist.
        ValueError: it carries no config and none was given.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    meta = read_weights_metadata(checkpoint)
    if meta.get("network", "VMambaUNet") != "VMambaUNet":
        raise ValueError(f"{checkpoint} holds a {meta['network']}; evaluate / predict rebuild VMambaUNet only")
    if config is not None:
        cfg = load_config(SegmentationConfig, resolve_config_path(config), overrides)
    elif "config" in meta:
        data = apply_overrides(SegmentationConfig, yaml.safe_load(meta["config"]), overrides)
        cfg = config_from_dict(SegmentationConfig, data)
    else:
        raise ValueError(f"{checkpoint} carries no training config; pass --config")
    cfg.check()
    names = json.loads(meta["class_names"]) if "class_names" in meta else \
        ["background"] + [f"class_{i}" for i in range(1, cfg.model.out_channels)]
    return cfg, names


def load_model_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Load a ``.safetensors`` written by training into ``model`` (strict: names and shapes must match)."""
    state = load_weights(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint} does not fit the configured network: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
