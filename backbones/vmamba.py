"""VMamba (VSSM): visual state-space models with a four-direction cross-scan, registered with timm.

Paper: `VMamba: Visual State Space Model` - https://arxiv.org/abs/2401.10166
Official code: https://github.com/MzeroMiko/VMamba (``classification/models/vmamba.py``). This is an
independent re-implementation with the same numbers: official checkpoints load through
:func:`checkpoint_filter_fn` and reproduce the official logits.

Two official recipes, chosen with explicit options instead of ``forward_type`` strings:

* **v2** (``vmamba_{tiny,small,base}_s1l8/s1l20/s2l5/s2l15``; ``vmamba_t/s/b``): SS2D without the z-gate,
  ``d_state=1``, depthwise 3x3 conv without bias, LayerNorm (eps 1e-5) everywhere, an MLP in every block,
  a stem of two stride-2 3x3 convs and a stride-2 3x3 conv + LayerNorm between stages.
* **v0** (``vmamba_{tiny,small,base}_v0``): SS2D with the z-gate (``y * silu(z)``), ``d_state=16``,
  ``ssm_ratio=2``, conv with bias, no MLP, a 4x4 stride-4 patch stem and Swin patch merging between stages.

Layout: the network runs channel-last ``(B, H, W, C)`` internally (fastest on CPU; the official
channel-first LayerNorm2d/Linear2d are the same maps). ``forward_features`` returns ``(B, H/32, W/32, C)``
(``output_fmt = "NHWC"`` like timm's Swin); ``forward_intermediates`` and ``features_only`` return NCHW maps
at strides 4, 8, 16, 32.

Official checkpoints: ``timm.create_model("vmamba_t", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``
with ``PATH`` a ``.pth`` holding ``{"model": state_dict}`` (or a bare state dict) or a ``.safetensors``, in the
official classification layout, the repository's one-file layout or the legacy names;
:func:`checkpoint_filter_fn` converts them and names any key that does not fit. The released files are
whole training checkpoints (with a yacs config object that timm's ``weights_only`` loader refuses), so every
file goes through :meth:`VSSM.load_pretrained` (``custom_load``, which timm would otherwise switch off for a
``file`` in the overlay; pass ``custom_load=False`` to force timm's loader): :func:`read_checkpoint` restores
only tensors and takes ``"model"`` (not the EMA copy), as the official loader does.

Input sizes: the v2 stem and downsampling are padded stride-2 convs, so any ``H, W >= 1`` works (each
stride-2 step maps ``n -> ceil(n / 2)``; non-square is fine). The v0 patch stem needs ``H`` and ``W`` to be
multiples of 4 and raises ``ValueError`` naming the nearest valid sizes otherwise; odd sizes later on are
zero-padded by patch merging as in the official code.
"""
from __future__ import annotations

import collections
import pickle
import re
import types
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, trunc_normal_
from timm.models import adapt_input_conv, build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from vmamba.blocks import LayerNormNd, VSSBlock
from vmamba.linear import Linear
from vmamba.mixers import MixerType, SequenceMixer

__all__ = ["VSSM", "StemType", "DownsampleType", "ConvStem", "PatchStem", "ConvDownsample", "PatchMerging",
           "VSSStage", "checkpoint_filter_fn"]


class _Choice(str, Enum):
    """A string option whose bad values are refused with the list of valid ones."""

    @classmethod
    def _missing_(cls, value: object) -> "_Choice":
        names = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"unknown {cls.__name__} {value!r}; expected one of {names}")


class StemType(_Choice):
    """``conv``: two stride-2 3x3 convs (official v2 ``patchembed_version="v2"``);
    ``patch``: one 4x4 stride-4 conv (official v0 ``patchembed_version="v1"``)."""

    CONV = "conv"
    PATCH = "patch"


class DownsampleType(_Choice):
    """``conv``: stride-2 3x3 conv + LayerNorm (official ``downsample_version="v3"``);
    ``patch_merging``: Swin patch merging, LayerNorm(4C) + Linear(4C -> 2C) (official ``"v1"``)."""

    CONV = "conv"
    PATCH_MERGING = "patch_merging"


# ----------------------------------------------------------------------------------------------- blocks


def _to_channels_last(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1)


def _to_channels_first(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


def _conv_channels_last(conv: nn.Conv2d, images: Tensor) -> Tensor:
    """``conv`` on ``(B, C, H, W)`` images with its output laid out channel-last: ``(B, H', W', C')`` contiguous.

    The input is converted to channels_last memory first (a copy of the small input, not of the wider output),
    so the convolution writes NHWC directly and the LayerNorm after it reads a contiguous last axis: no copy
    of the output. Same values (up to the convolution's float rounding).
    """
    return _to_channels_last(conv(images.contiguous(memory_format=torch.channels_last)))


class ConvStem(nn.Module):
    """Two overlapping stride-2 3x3 convs: ``(B, in_chans, H, W) -> (B, ceil(H/4), ceil(W/4), dim)``.

    conv1 -> LayerNorm -> GELU -> conv2 -> LayerNorm (official v2 patch embedding).
    """

    size_multiple = 1  # padded stride-2 convs take any size

    def __init__(self, in_chans: int, dim: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = LayerNormNd(dim // 2, eps=norm_eps, channels_last=True)  # same parameters as channel-first
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(_conv_channels_last(self.conv1, x)))  # (B, H/2, W/2, dim/2)
        return self.norm2(_to_channels_last(self.conv2(_to_channels_first(x))))


class PatchStem(nn.Module):
    """Non-overlapping 4x4 patches: ``(B, in_chans, H, W) -> (B, H/4, W/4, dim)``; conv -> LayerNorm."""

    size_multiple = 4

    def __init__(self, in_chans: int, dim: int, norm_eps: float = 1e-5, patch_size: int = 4) -> None:
        super().__init__()
        self.size_multiple = patch_size
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(_conv_channels_last(self.conv, x))


class ConvDownsample(nn.Module):
    """Stride-2 3x3 conv + LayerNorm: ``(B, H, W, dim) -> (B, ceil(H/2), ceil(W/2), dim_out)``."""

    def __init__(self, dim: int, dim_out: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim_out, eps=norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(_to_channels_last(self.conv(_to_channels_first(x))))


class PatchMerging(nn.Module):
    """Swin patch merging: ``(B, H, W, dim) -> (B, ceil(H/2), ceil(W/2), dim_out)``.

    Odd sizes are zero-padded at the bottom/right (as the official code does). The 2x2 neighbours are
    concatenated in the official order ``(h0 w0), (h1 w0), (h0 w1), (h1 w1)``, then LayerNorm(4C) and a
    bias-free Linear.
    """

    def __init__(self, dim: int, dim_out: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = Linear(4 * dim, dim_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, channels = x.shape
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
            height, width = height + height % 2, width + width % 2
        # (B, H/2, dh, W/2, dw, C) -> (B, H/2, W/2, dw, dh, C): channel blocks ordered by (dw, dh)
        x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).permute(0, 1, 3, 4, 2, 5)
        return self.reduction(self.norm(x.reshape(batch, height // 2, width // 2, 4 * channels)))


_STEMS: dict[StemType, type[nn.Module]] = {StemType.CONV: ConvStem, StemType.PATCH: PatchStem}
_DOWNSAMPLES: dict[DownsampleType, type[nn.Module]] = {
    DownsampleType.CONV: ConvDownsample,
    DownsampleType.PATCH_MERGING: PatchMerging,
}


# ------------------------------------------------------------------------------------------------ stage


class VSSStage(nn.Module):
    """Optional downsample, then ``depth`` VSS blocks, on channel-last maps ``(B, H, W, C)``.

    The official code puts the downsample at the end of stages 0-2; here it opens stages 1-3 (timm
    convention), so stage ``i`` outputs the stride ``4 * 2**i`` map (``features_only``).
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        depth: int,
        downsample: DownsampleType | None,
        drop_path: Sequence[float],
        norm_eps: float = 1e-5,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        if downsample is None:
            if dim != dim_out:
                raise ValueError(f"a stage without downsample keeps its width, got {dim} -> {dim_out}")
            self.downsample: nn.Module = nn.Identity()
        else:
            self.downsample = _DOWNSAMPLES[downsample](dim, dim_out, norm_eps=norm_eps)
        self.blocks = nn.Sequential(*[
            VSSBlock(dim_out, drop_path=drop_path[j], norm_eps=norm_eps, channels_last=True, **block_kwargs)
            for j in range(depth)
        ])

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


# ------------------------------------------------------------------------------------------------ model


class VSSM(nn.Module):
    """VMamba backbone + classifier.

    Args:
        in_chans: input channels.
        num_classes: classes of the linear head (0: no head, ``forward`` returns pooled features).
        global_pool: timm pool type of the head (``"avg"`` as the official model).
        depths: blocks per stage.
        dims: width of stage 0 (doubled at each stage) or the width of every stage.
        stem: :class:`StemType` (v2: ``conv``, v0: ``patch``).
        downsample: :class:`DownsampleType` between stages (v2: ``conv``, v0: ``patch_merging``).
        mixer: sequence mixer of every SSM layer (``mamba``, ``mamba2``, ``retnet``, ``gla``, ``rwkv7``).
        mixer_kwargs: extra mixer arguments (override ``d_state``).
        d_state: state size of the Mamba (S6) mixer (ignored by the other mixers, which take their settings
            from ``mixer_kwargs``).
        ssm_ratio: ``d_inner / dim`` of the SSM layer.
        gate: the z-gate ``y * silu(z)`` (v0).
        conv_kernel, conv_bias: depthwise conv before the scan.
        mlp_ratio: MLP width per block; 0 removes the MLP branch (v0).
        norm_eps: epsilon of every LayerNorm (official: 1e-5).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.

    Raises:
        ValueError: on inconsistent arguments; in ``forward`` on an input of the wrong rank, channel count or
            (v0 only) a spatial size that is not a multiple of the patch size.

    Example:
        >>> model = VSSM(depths=(1, 1, 1, 1), dims=24, num_classes=10)
        >>> model(torch.randn(2, 3, 64, 48)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (2, 2, 9, 2),
        dims: int | Sequence[int] = 96,
        stem: StemType | str = StemType.CONV,
        downsample: DownsampleType | str = DownsampleType.CONV,
        mixer: MixerType | str = MixerType.MAMBA,
        mixer_kwargs: dict[str, Any] | None = None,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        gate: bool = False,
        conv_kernel: int = 3,
        conv_bias: bool = False,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        depths = tuple(int(d) for d in depths)
        num_stages = len(depths)
        if num_stages == 0 or min(depths) < 0:
            raise ValueError(f"depths must be a non-empty sequence of non-negative ints, got {depths}")
        if isinstance(dims, int):
            dims = tuple(dims * 2**i for i in range(num_stages))
        dims = tuple(int(d) for d in dims)
        if len(dims) != num_stages:
            raise ValueError(f"dims {dims} and depths {depths} must have the same length")
        if in_chans <= 0:
            raise ValueError(f"in_chans must be positive, got {in_chans}")
        stem, downsample, mixer = StemType(stem), DownsampleType(downsample), MixerType.parse(mixer)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.output_fmt = "NHWC"
        self.mixer = mixer

        mixer_kwargs = {**({"d_state": d_state} if mixer is MixerType.MAMBA else {}), **(mixer_kwargs or {})}
        block_kwargs = dict(
            mixer=mixer, mixer_kwargs=mixer_kwargs, ssm_ratio=ssm_ratio, gate=gate,
            conv_kernel=conv_kernel, conv_bias=conv_bias, mlp_ratio=mlp_ratio,
        )
        self.stem = _STEMS[stem](in_chans, dims[0], norm_eps=norm_eps)
        # the official stochastic-depth rule (float32 linspace over all blocks)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, self.feature_info = [], []
        for i in range(num_stages):
            stages.append(VSSStage(
                dims[max(i - 1, 0)], dims[i], depths[i],
                downsample=downsample if i > 0 else None,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                norm_eps=norm_eps,
                **block_kwargs,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = nn.LayerNorm(self.num_features, eps=norm_eps)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC"
        )
        _init_weights(self)

    # -- timm surface --------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters marked ``_no_weight_decay`` by their module (the Mamba ``A_logs`` and ``Ds``, as in
        mamba-ssm and the official VMamba initialisation; note that the official training script ignores
        the mark and decays ``A_logs``)."""
        return {name for name, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str | Path) -> None:
        """timm's loading hook (the cfgs set ``custom_load``): :func:`read_checkpoint`, then
        :func:`checkpoint_filter_fn`, then the adaptations timm makes itself (the first conv for another
        ``in_chans``, a fresh classifier for another ``num_classes``), then a strict load."""
        state = checkpoint_filter_fn(read_checkpoint(checkpoint_path), self)
        cfg = getattr(self, "pretrained_cfg", None) or {}
        source_chans = (cfg.get("input_size") or (3,))[0]
        first = f"{cfg.get('first_conv', '')}.weight"
        if first in state and state[first].shape[1] != self.in_chans:
            state[first] = adapt_input_conv(self.in_chans, state[first], base_chans=source_chans)
        strict = True
        if cfg.get("classifier") and self.num_classes != cfg.get("num_classes", self.num_classes):
            for suffix in (".weight", ".bias"):
                state.pop(cfg["classifier"] + suffix, None)
            strict = False  # only the classifier stays at its initialisation; the filter checked the rest
        self.load_state_dict(state, strict=strict)

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(B, in_chans, H, W)`` with a size the stem takes."""
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects images (B, {self.in_chans}, H, W), got shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"{type(self).__name__} was built for in_chans={self.in_chans}, got {x.shape[1]} "
                             f"channels (shape {tuple(x.shape)})")
        multiple = self.stem.size_multiple
        height, width = x.shape[-2:]
        if height < 1 or width < 1 or height % multiple or width % multiple:
            def near(n: int) -> str:
                lo, hi = n - n % multiple, n + (-n) % multiple
                return f"{hi}" if lo == 0 else f"{lo} or {hi}"
            raise ValueError(
                f"this {type(self.stem).__name__} needs H and W to be positive multiples of {multiple}, got "
                f"{height}x{width}; crop/pad to H = {near(height)}, W = {near(width)}"
            )

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (strides 4, 8, 16, 32) besides the final features.

        Args:
            x: ``(B, in_chans, H, W)``.
            indices: last ``n`` stages if int, all if None, else the stage indices to return.
            norm: apply the final norm to the last stage's map when it is taken.
            stop_early: stop after the last stage needed.
            output_fmt: ``NCHW`` or ``NHWC`` for the intermediates.
            intermediates_only: return only the list.

        Returns:
            ``[(B, C_i, H_i, W_i)]`` (or NHWC), and the final ``(B, H/32, W/32, C)`` features unless
            ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self.check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        last = len(self.stages) - 1
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(_to_channels_first(y).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.norm(x)  # the final norm is sized for the last stage only
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and norm/head) not needed to produce the ``indices`` intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.num_classes = 0
            self.head.reset(0, "", in_features=self.num_features)
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, in_chans, H, W) -> (B, H/32, W/32, C)`` (normalised, before pooling)."""
        self.check_input(x)
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``(B, h, w, C) -> (B, num_classes)``, or the pooled ``(B, C)`` when ``pre_logits``."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------------- init


def _init_weights(model: nn.Module) -> None:
    """The official initialisation: every ``nn.Linear`` outside the mixers gets a truncated normal
    (std 0.02) weight and a zero bias; LayerNorms start at (1, 0); convs keep PyTorch's default; each mixer
    keeps its own initialisation (Mamba's dt / A / D rules)."""
    inside_mixers = {id(m) for mixer in model.modules() if isinstance(mixer, SequenceMixer) for m in mixer.modules()}
    for module in model.modules():
        if id(module) in inside_mixers:
            continue
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------- checkpoint conversion

_MAMBA_PARAMS = ("x_proj_weight", "A_logs", "Ds", "dt_projs_weight", "dt_projs_bias")
# official VSSM._load_from_state_dict: names of older training code
_LEGACY_RULES: tuple[tuple[str, str], ...] = (
    (r"^patch_embed\.proj\.", "patch_embed.0."),
    (r"^patch_embed\.norm\.", "patch_embed.2."),
    (r"^(layers\.\d+\.blocks\.\d+)\.ln_1\.", r"\1.norm."),
    (r"^(layers\.\d+\.blocks\.\d+)\.self_attention\.", r"\1.op."),
    (r"^norm\.", "classifier.norm."),
    (r"^head\.", "classifier.head."),
)
_STEM_RULES: dict[type[nn.Module], tuple[tuple[str, str], ...]] = {
    ConvStem: ((r"^patch_embed\.0\.", "stem.conv1."), (r"^patch_embed\.2\.", "stem.norm1."),
               (r"^patch_embed\.5\.", "stem.conv2."), (r"^patch_embed\.7\.", "stem.norm2.")),
    PatchStem: ((r"^patch_embed\.0\.", "stem.conv."), (r"^patch_embed\.2\.", "stem.norm.")),
}
# official downsample sub-module names (classification layout, then the one-file layout) -> ours
_DOWNSAMPLE_NAMES: dict[type[nn.Module], dict[str, str]] = {
    ConvDownsample: {"1": "conv", "3": "norm"},
    PatchMerging: {"norm": "norm", "reduction": "reduction", "1": "norm", "2": "reduction"},
}
_BLOCK_RULES: tuple[tuple[str, str], ...] = (
    (r"^layers\.(\d+)\.blocks\.(\d+)\.op\.(" + "|".join(_MAMBA_PARAMS) + r")$", r"stages.\1.blocks.\2.op.mixer.\3"),
    # one-file layout: the per-direction projections stored as grouped 1x1 conv weights
    (r"^layers\.(\d+)\.blocks\.(\d+)\.op\.x_proj\.weight$", r"stages.\1.blocks.\2.op.mixer.x_proj_weight"),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.op\.dt_projs\.weight$", r"stages.\1.blocks.\2.op.mixer.dt_projs_weight"),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.op\.conv2d\.", r"stages.\1.blocks.\2.op.conv."),
    (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"^classifier\.norm\.", "norm."),
    (r"^classifier\.head\.", "head.fc."),
)


def _apply_rules(key: str, rules: Sequence[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key, n = re.subn(pattern, repl, key)
        if n:
            break
    return key


def _official_to_timm_key(key: str, model: VSSM) -> str:
    key = _apply_rules(key, _LEGACY_RULES)
    key = _apply_rules(key, _STEM_RULES.get(type(model.stem), ()))
    match = re.match(r"^layers\.(\d+)\.downsample\.([^.]+)\.(.+)$", key)
    if match and len(model.stages) > int(match.group(1)) + 1:
        names = _DOWNSAMPLE_NAMES.get(type(model.stages[int(match.group(1)) + 1].downsample), {})
        if match.group(2) in names:
            return f"stages.{int(match.group(1)) + 1}.downsample.{names[match.group(2)]}.{match.group(3)}"
    return _apply_rules(key, _BLOCK_RULES)


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            return state_dict[key]
    return state_dict


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: VSSM) -> dict[str, Tensor]:
    """Convert an official VMamba state dict to this model's names, and check it fits.

    Accepts the classification layout (``classification/models/vmamba.py``), the repository's one-file
    layout (``x_proj.weight`` / ``dt_projs.weight`` as grouped 1x1 convs, ``downsample.1/.2`` patch merging)
    and the legacy names the official loader renames (``patch_embed.proj``, ``ln_1``, ``self_attention``,
    ``norm``, ``head``); ``{"model": ...}`` wrappers are unwrapped. A state dict already in this model's
    names passes through the same checks.

    Raises:
        ValueError: naming the checkpoint keys the model does not use, the model keys the checkpoint lacks,
            and the keys whose shapes differ. The classifier (``head.fc``) and the first conv are left to
            timm, which re-sizes them for other ``num_classes`` / ``in_chans``.
    """
    state_dict = _unwrap(state_dict)
    target = model.state_dict()
    native = any(k.startswith(("stem.", "stages.")) for k in state_dict)
    out: dict[str, Tensor] = {}
    source_of: dict[str, str] = {}
    for key, value in state_dict.items():
        new_key = key if native else _official_to_timm_key(key, model)
        if new_key in target and value.shape != target[new_key].shape and value.numel() == target[new_key].numel() \
                and new_key.endswith(("mixer.x_proj_weight", "mixer.dt_projs_weight")):
            value = value.reshape(target[new_key].shape)  # one-file layout: (K*R', C) -> (K, R', C)
        out[new_key] = value
        source_of[new_key] = key

    def adaptable(k: str) -> bool:  # timm re-sizes the classifier and the first conv after this filter
        return k.startswith(("head.fc.", "stem.conv1.weight", "stem.conv.weight"))

    unexpected = sorted(source_of[k] for k in out if k not in target and not adaptable(k))
    missing = sorted(k for k in target if k not in out and not adaptable(k))
    mismatched = sorted(
        f"{source_of[k]} {tuple(out[k].shape)} vs {tuple(target[k].shape)}"
        for k in out if k in target and out[k].shape != target[k].shape and not adaptable(k)
    )
    if unexpected or missing or mismatched:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint keys the model does not use: {_short(unexpected)}")
        if missing:
            parts.append(f"{len(missing)} model keys missing from the checkpoint: {_short(missing)}")
        if mismatched:
            parts.append(f"{len(mismatched)} keys with another shape (checkpoint vs model): {_short(mismatched)}")
        raise ValueError(f"checkpoint does not match this {type(model).__name__}: " + "; ".join(parts))
    return out


def _short(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


class _Inert(dict):
    """Stands in for any pickled object that is not a tensor or a plain container: accepts whatever the
    unpickler hands it and does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


_TORCH_REBUILDERS = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"}


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Restores tensors, torch dtypes/sizes and builtin containers; every other global becomes :class:`_Inert`,
    so no code named by the file runs (the official training config is a yacs ``CfgNode``)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in _TORCH_REBUILDERS:
            return getattr(torch._utils, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        return _Inert


_TENSORS_ONLY_PICKLE = types.SimpleNamespace(
    __name__="tensors_only_pickle", Unpickler=_TensorsOnlyUnpickler, load=pickle.load
)


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The weights in a checkpoint file, for :func:`checkpoint_filter_fn`.

    ``.safetensors``, or a torch file holding a state dict or a training checkpoint such as the official
    releases (``{"model": ..., "optimizer": ..., "config": <yacs CfgNode>, ...}``). Tensors and plain containers
    are restored and any other pickled object becomes an inert placeholder, so nothing from the file runs and
    yacs need not be installed. The weights come from ``"model"`` (the official loader's key), else
    ``"state_dict"``, else ``"model_ema"``, else the top level.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TENSORS_ONLY_PICKLE)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(checkpoint.get(key), Mapping):
            return dict(checkpoint[key])
    return dict(checkpoint)


# ------------------------------------------------------------------------------------------------- cfgs


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic",  # official eval: resize 256, center crop 224
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1", "classifier": "head.fc",
        "custom_load": True,  # VSSM.load_pretrained: released training checkpoints carry a yacs config object
        "license": "mit",
        "paper_ids": "arXiv:2401.10166",
        **kwargs,
    }


_RELEASES = "https://github.com/MzeroMiko/VMamba/releases/download/"
_URL_TINY_S1L8 = _RELEASES + "%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth"
_URL_SMALL_S2L15 = _RELEASES + "%23v2cls/vssm_small_0229_ckpt_epoch_222.pth"
_URL_BASE_S2L15 = _RELEASES + "%23v2cls/vssm_base_0229_ckpt_epoch_237.pth"

default_cfgs = generate_default_cfgs({
    "vmamba_t.in1k": _cfg(_URL_TINY_S1L8),
    "vmamba_s.in1k": _cfg(_URL_SMALL_S2L15),
    "vmamba_b.in1k": _cfg(_URL_BASE_S2L15),
    "vmamba_tiny_s1l8.in1k": _cfg(_URL_TINY_S1L8),
    "vmamba_small_s1l20.in1k": _cfg(_RELEASES + "%23v2cls/vssm1_small_0229s_ckpt_epoch_240.pth"),
    "vmamba_base_s1l20.in1k": _cfg(_RELEASES + "%23v2cls/vssm1_base_0229s_ckpt_epoch_225.pth"),
    "vmamba_tiny_s2l5.in1k": _cfg(_RELEASES + "%23v2cls/vssm_tiny_0230_ckpt_epoch_262.pth"),
    "vmamba_small_s2l15.in1k": _cfg(_URL_SMALL_S2L15),
    "vmamba_base_s2l15.in1k": _cfg(_URL_BASE_S2L15),
    "vmamba_tiny_v0.in1k": _cfg(_RELEASES + "%23v0cls/vssmtiny_dp01_ckpt_epoch_292.pth", first_conv="stem.conv"),
    "vmamba_small_v0.in1k": _cfg(_RELEASES + "%23v0cls/vssmsmall_dp03_ckpt_epoch_238.pth", first_conv="stem.conv"),
    "vmamba_base_v0.in1k": _cfg(_RELEASES + "%23v0cls/vssmbase_dp06_ckpt_epoch_241.pth", first_conv="stem.conv"),
    # the mixer swaps have no released weights
    "vmamba_t_mamba2": _cfg(),
    "vmamba_t_retnet": _cfg(),
    "vmamba_t_gla": _cfg(),
    "vmamba_t_rwkv7": _cfg(),
})


# ---------------------------------------------------------------------------------------------- builder


def _create_vmamba(variant: str, pretrained: bool = False, **kwargs: Any) -> VSSM:
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay and "custom_load" not in overlay:
        # timm resets ``custom_load`` when the overlay names its own weights (``file=...``), assuming a plain
        # state dict; released VMamba checkpoints carry a yacs config that timm's weights-only load refuses.
        # VSSM.load_pretrained reads every format (safetensors, state dicts, the releases), so keep it.
        kwargs["pretrained_cfg_overlay"] = dict(overlay, custom_load=True)
    return build_model_with_cfg(
        VSSM,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


# the two official recipes, as explicit options
_V2 = dict(stem=StemType.CONV, downsample=DownsampleType.CONV, d_state=1, gate=False, conv_bias=False, mlp_ratio=4.0)
_V0 = dict(stem=StemType.PATCH, downsample=DownsampleType.PATCH_MERGING, d_state=16, ssm_ratio=2.0, gate=True,
           conv_bias=True, mlp_ratio=0.0)
_TINY_S1L8 = dict(_V2, depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0, drop_path_rate=0.2)
_SMALL_S2L15 = dict(_V2, depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.3)
_BASE_S2L15 = dict(_V2, depths=(2, 2, 15, 2), dims=128, ssm_ratio=2.0, drop_path_rate=0.6)


@register_model
def vmamba_t(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-T of the official README (= ``vmamba_tiny_s1l8``): 30.2M params, 4.9 GMACs, 82.6% top-1."""
    return _create_vmamba("vmamba_t", pretrained, **dict(_TINY_S1L8, **kwargs))


@register_model
def vmamba_s(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-S of the official README (= ``vmamba_small_s2l15``): 50.1M params, 8.7 GMACs, 83.6% top-1."""
    return _create_vmamba("vmamba_s", pretrained, **dict(_SMALL_S2L15, **kwargs))


@register_model
def vmamba_b(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-B of the official README (= ``vmamba_base_s2l15``): 88.6M params, 15.4 GMACs, 83.9% top-1."""
    return _create_vmamba("vmamba_b", pretrained, **dict(_BASE_S2L15, **kwargs))


@register_model
def vmamba_tiny_s1l8(pretrained: bool = False, **kwargs: Any) -> VSSM:
    return _create_vmamba("vmamba_tiny_s1l8", pretrained, **dict(_TINY_S1L8, **kwargs))


@register_model
def vmamba_small_s1l20(pretrained: bool = False, **kwargs: Any) -> VSSM:
    model_args = dict(_V2, depths=(2, 2, 20, 2), dims=96, ssm_ratio=1.0, drop_path_rate=0.3)
    return _create_vmamba("vmamba_small_s1l20", pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_base_s1l20(pretrained: bool = False, **kwargs: Any) -> VSSM:
    model_args = dict(_V2, depths=(2, 2, 20, 2), dims=128, ssm_ratio=1.0, drop_path_rate=0.5)
    return _create_vmamba("vmamba_base_s1l20", pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_tiny_s2l5(pretrained: bool = False, **kwargs: Any) -> VSSM:
    model_args = dict(_V2, depths=(2, 2, 5, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.2)
    return _create_vmamba("vmamba_tiny_s2l5", pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_small_s2l15(pretrained: bool = False, **kwargs: Any) -> VSSM:
    return _create_vmamba("vmamba_small_s2l15", pretrained, **dict(_SMALL_S2L15, **kwargs))


@register_model
def vmamba_base_s2l15(pretrained: bool = False, **kwargs: Any) -> VSSM:
    return _create_vmamba("vmamba_base_s2l15", pretrained, **dict(_BASE_S2L15, **kwargs))


@register_model
def vmamba_tiny_v0(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """Vanilla VMamba-T (v0): 22.9M params."""
    model_args = dict(_V0, depths=(2, 2, 9, 2), dims=96, drop_path_rate=0.2)
    return _create_vmamba("vmamba_tiny_v0", pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_small_v0(pretrained: bool = False, **kwargs: Any) -> VSSM:
    model_args = dict(_V0, depths=(2, 2, 27, 2), dims=96, drop_path_rate=0.3)
    return _create_vmamba("vmamba_small_v0", pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_base_v0(pretrained: bool = False, **kwargs: Any) -> VSSM:
    model_args = dict(_V0, depths=(2, 2, 27, 2), dims=128, drop_path_rate=0.6)
    return _create_vmamba("vmamba_base_v0", pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_t_mamba2(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """``vmamba_t`` with the Mamba-2 (SSD) mixer."""
    return _create_vmamba("vmamba_t_mamba2", pretrained, **dict(_TINY_S1L8, mixer=MixerType.MAMBA2) | kwargs)


@register_model
def vmamba_t_retnet(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """``vmamba_t`` with the RetNet (retention) mixer."""
    return _create_vmamba("vmamba_t_retnet", pretrained, **dict(_TINY_S1L8, mixer=MixerType.RETNET) | kwargs)


@register_model
def vmamba_t_gla(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """``vmamba_t`` with the gated linear attention mixer."""
    return _create_vmamba("vmamba_t_gla", pretrained, **dict(_TINY_S1L8, mixer=MixerType.GLA) | kwargs)


@register_model
def vmamba_t_rwkv7(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """``vmamba_t`` with the RWKV-7 (generalized delta rule) mixer."""
    return _create_vmamba("vmamba_t_rwkv7", pretrained, **dict(_TINY_S1L8, mixer=MixerType.RWKV7) | kwargs)
