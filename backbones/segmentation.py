"""VMamba U-Net: VMamba stages on the cross-scan module, decoded by MONAI's UNETR blocks, in 2-D and 3-D.

The encoder is the VMamba v2 recipe written for ``spatial_dims`` 2 or 3: a stem of two stride-2 3^N convs,
then four stages of :class:`~vmamba.blocks.VSSBlock` (scanned with ``cross2d`` in 2-D, the six-direction
``cross3d`` in 3-D), a stride-2 conv + LayerNorm opening stages 1-3. Like MONAI's ``SwinUNETR`` it returns a
five-level pyramid at strides 2, 4, 8, 16, 32 (the stem's stride-2 map, then each stage's output), and the
same decoder as ``SwinUNETR`` turns it into per-voxel logits: ``UnetrBasicBlock`` on the input and on every
level, ``UnetrUpBlock`` from stride 32 back to stride 1, ``UnetOutBlock``.

Where this differs from ``SwinUNETR`` and why:

* The SSM stages start at stride 4 (VMamba's layout); the stride-2 level is the stem's first conv. Scanning
  the stride-2 map (48^3 tokens for a 96^3 patch) would cost more than the rest of the encoder together.
* Encoder widths (``dims``) and decoder width (``feature_size``) are independent: every level goes through a
  ``UnetrBasicBlock`` that maps ``dims[i]`` to ``feature_size * 2**i``. The full-resolution decoder blocks
  dominate ``SwinUNETR``'s cost (their convs scale with ``feature_size**2``), so the default decoder is
  half as wide (24 vs 48) while the encoder keeps SwinUNETR's widths 48-384.
* Any input size is accepted: the input is zero-padded at the high end of each axis to a multiple of 32 (and
  one axis to 64 if all would be 32: the decoder's instance norm needs more than one voxel at stride 32),
  and the logits are cropped back, so ``forward`` returns the input's spatial size. Training patches and
  sliding windows should be multiples of 32 so that no compute goes to padding.

Parameter names of the encoder follow :class:`backbones.vmamba.VSSM` (``encoder.stem.conv1``,
``encoder.stages.i.downsample.conv``, ``encoder.stages.i.blocks.j.op.mixer...``), so a 2-D encoder starts
from an official VMamba ImageNet checkpoint through that model's ``checkpoint_filter_fn``
(:meth:`VMambaUNet.load_encoder_checkpoint`).

Default sizes (``dims=(48, 96, 192, 384)``, ``depths=(2, 2, 2, 2)``, ``feature_size=24``, ``ssm_ratio=1``,
``d_state=1``) were chosen so that one forward+backward pass on a 96^3 patch is no slower than
``SwinUNETR(feature_size=48)`` and peaks at <= 0.7x its memory; ``python -m tasks.benchmark segmentation``
measures both side by side (provisional, 2 shared CPU threads, fp32, 14 classes: 0.47x SwinUNETR's
forward+backward time and 0.32x its peak memory, 22.5M vs 62.2M parameters).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from timm.models import checkpoint_seq
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vmamba.blocks import LayerNormNd, VSSBlock
from vmamba.mixers import MixerType

__all__ = ["padding_for", "ConvStemNd", "ConvDownsampleNd", "VMambaStageNd", "VMambaEncoder", "VMambaUNet", "SIZE_MULTIPLE"]

SIZE_MULTIPLE = 32  # total stride of the pyramid; inputs are padded up to a multiple of it
_CONVS: dict[int, type[nn.Module]] = {2: nn.Conv2d, 3: nn.Conv3d}


def _check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in _CONVS:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return spatial_dims


def _channels_last(x: Tensor) -> Tensor:
    return x.movedim(1, -1)


def _channels_first(x: Tensor) -> Tensor:
    return x.movedim(-1, 1)


def _channels_last_strided(w: Tensor) -> Tensor:
    """A copy of a conv weight ``(O, I, *k)`` laid out channels-last: strides ``(I * prod(k), 1, ..., I)``."""
    out_ch, in_ch, *kernel = w.shape
    strides = [in_ch * math.prod(kernel), 1] + [in_ch * math.prod(kernel[j + 1:]) for j in range(len(kernel))]
    return torch.empty_strided(w.shape, strides, dtype=w.dtype, device=w.device).copy_(w)


def padding_for(size: Sequence[int]) -> list[int]:
    """Zeros added at the high end of each axis: up to a multiple of 32, and the last axis to 64 when every
    axis would be 32 (a one-voxel stride-32 map cannot be instance-normalised)."""
    pad = [(-s) % SIZE_MULTIPLE for s in size]
    if all(s + p == SIZE_MULTIPLE for s, p in zip(size, pad)):
        pad[-1] += SIZE_MULTIPLE
    return pad


class ConvStemNd(nn.Module):
    """Two padded stride-2 3^N convs (the VMamba v2 stem) in N-d, keeping the stride-2 map for the pyramid.

    ``conv1 -> norm1 -> GELU`` gives the stride-2 level ``(B, dim // 2, *S/2)`` (channel-first);
    ``conv2 -> norm2`` gives the stage-0 input ``(B, *S/4, dim)`` (channel-last). In 2-D the parameters have
    the names and shapes of :class:`backbones.vmamba.ConvStem`.
    """

    def __init__(self, spatial_dims: int, in_chans: int, dim: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        conv = _CONVS[_check_spatial_dims(spatial_dims)]
        self.conv1 = conv(in_chans, dim // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = LayerNormNd(dim // 2, eps=norm_eps)
        self.act = nn.GELU()
        self.conv2 = conv(dim // 2, dim, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x: (B, in_chans, *S)`` -> ``((B, dim // 2, *S/2), (B, *S/4, dim))``."""
        mid = self.act(self.norm1(self.conv1(x)))
        return mid, self.norm2(_channels_last(self.conv2(mid)))


class ConvDownsampleNd(nn.Module):
    """Stride-2 3^N conv + LayerNorm on channel-last maps: ``(B, *S, dim) -> (B, *S/2, dim_out)``."""

    def __init__(self, spatial_dims: int, dim: int, dim_out: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = _CONVS[_check_spatial_dims(spatial_dims)](dim, dim_out, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim_out, eps=norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(_channels_last(self.conv(_channels_first(x))))


class VMambaStageNd(nn.Module):
    """Optional stride-2 downsample, then ``depth`` VSS blocks, on channel-last maps ``(B, *S, C)``."""

    def __init__(
        self,
        spatial_dims: int,
        dim: int,
        dim_out: int,
        depth: int,
        downsample: bool,
        drop_path: Sequence[float],
        norm_eps: float = 1e-5,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = ConvDownsampleNd(spatial_dims, dim, dim_out, norm_eps) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            VSSBlock(dim_out, spatial_dims, drop_path=drop_path[j], norm_eps=norm_eps, channels_last=True,
                     **block_kwargs)
            for j in range(depth)
        ])

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class VMambaEncoder(nn.Module):
    """VMamba v2 backbone for 2-D or 3-D maps, returning a five-level channel-first pyramid.

    Args:
        spatial_dims: 2 or 3.
        in_chans: input channels.
        depths: VSS blocks per stage (four stages).
        dims: stage widths (four).
        mixer, mixer_kwargs, d_state, ssm_ratio, gate, conv_kernel, conv_bias, mlp_ratio: as in
            :class:`backbones.vmamba.VSSM` (``d_state`` only for the Mamba mixer).
        drop_path_rate: stochastic depth, increasing linearly over all blocks.
        norm_eps: LayerNorm epsilon.

    Shapes:
        ``(B, in_chans, *S)`` with every ``S`` divisible by 32 -> ``[(B, dims[0] // 2, *S/2),
        (B, dims[0], *S/4), (B, dims[1], *S/8), (B, dims[2], *S/16), (B, dims[3], *S/32)]``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_chans: int,
        depths: Sequence[int] = (2, 2, 2, 2),
        dims: Sequence[int] = (48, 96, 192, 384),
        mixer: MixerType | str = MixerType.MAMBA,
        mixer_kwargs: dict[str, Any] | None = None,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        gate: bool = False,
        conv_kernel: int = 3,
        conv_bias: bool = False,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        mixer = MixerType.parse(mixer)
        self.depths, self.dims = tuple(depths), tuple(dims)
        mixer_kwargs = {**({"d_state": d_state} if mixer is MixerType.MAMBA else {}), **(mixer_kwargs or {})}
        block_kwargs = dict(mixer=mixer, mixer_kwargs=mixer_kwargs, ssm_ratio=ssm_ratio, gate=gate,
                            conv_kernel=conv_kernel, conv_bias=conv_bias, mlp_ratio=mlp_ratio)
        self.block_kwargs = dict(block_kwargs, d_state=d_state, norm_eps=norm_eps)  # for checkpoint mapping
        self.stem = ConvStemNd(spatial_dims, in_chans, dims[0], norm_eps)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.Sequential(*[
            VMambaStageNd(spatial_dims, dims[max(i - 1, 0)], dims[i], depths[i], downsample=i > 0,
                          drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_eps=norm_eps, **block_kwargs)
            for i in range(len(depths))
        ])
        # the stage outputs are un-normalised residual streams; the stem level is already normalised
        self.out_norms = nn.ModuleList([nn.LayerNorm(d, eps=norm_eps) for d in dims])
        self.out_channels = (dims[0] // 2, *dims)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward(self, x: Tensor) -> list[Tensor]:
        mid, h = self.stem(x)
        levels = [mid]
        for stage, norm in zip(self.stages, self.out_norms):
            h = stage(h)
            levels.append(_channels_first(norm(h)))
        return levels


class VMambaUNet(nn.Module):
    """U-Net with a VMamba encoder and MONAI's UNETR decoder blocks, for ``spatial_dims`` 2 or 3.

    Args:
        in_channels: image channels (e.g. 1 for CT, 4 for the BraTS MRI sequences).
        out_channels: classes (logits per voxel).
        spatial_dims: 2 (slices, ``cross2d`` scans) or 3 (volumes, ``cross3d`` scans).
        depths: VSS blocks in each of the four encoder stages.
        dims: encoder widths of the four stages (each even and positive); the stride-2 level has ``dims[0] // 2``.
        feature_size: decoder width at full resolution (doubled at every level, ``16 * feature_size`` at
            stride 32), as ``SwinUNETR``'s ``feature_size``.
        mixer: sequence mixer of every SSM layer (``mamba``, ``mamba2``, ``retnet``, ``gla``, ``rwkv7``).
        mixer_kwargs: extra arguments of the mixer, the same for every stage (head sizes must divide every
            stage's ``d_inner = ssm_ratio * dims[i]``: e.g. ``{"head_dim": 16}`` for ``mamba2`` at the default
            widths).
        d_state: Mamba state size (VMamba v2: 1).
        ssm_ratio: ``d_inner / dim`` in the SSM layers.
        mlp_ratio: MLP width in each VSS block (0 removes the MLP).
        drop_path_rate: stochastic depth of the encoder.
        norm_name: normalisation of the MONAI decoder blocks (``"instance"``, ``"batch"``, ...).
        res_block: residual units in the decoder blocks (as ``SwinUNETR``).
        grad_checkpointing: recompute encoder stages and decoder blocks in the backward pass (less memory,
            about one more forward of time).
        channels_last: keep conv weights and activations in the channels-last memory format
            (``torch.channels_last_3d`` / ``torch.channels_last``); the CPU convolution kernels, backward above
            all, run about 1.3-2x faster on it. Numbers are the same either way.

    Raises:
        ValueError: ``spatial_dims`` not 2 or 3; non-positive channels or feature size; ``dims`` / ``depths``
            not four entries, ``dims`` odd or non-positive, ``depths`` negative; an unknown mixer. In
            ``forward``: an input that is not ``(B, in_channels, *spatial)``.

    Example:
        >>> net = VMambaUNet(in_channels=1, out_channels=3, spatial_dims=3, dims=(8, 16, 32, 64), feature_size=8)
        >>> net(torch.randn(1, 1, 40, 32, 36)).shape   # padded to 64x32x64 inside, cropped back
        torch.Size([1, 3, 40, 32, 36])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 3,
        depths: Sequence[int] = (2, 2, 2, 2),
        dims: Sequence[int] = (48, 96, 192, 384),
        feature_size: int = 24,
        mixer: MixerType | str = MixerType.MAMBA,
        mixer_kwargs: dict[str, Any] | None = None,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        norm_name: tuple | str = "instance",
        res_block: bool = True,
        grad_checkpointing: bool = False,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        _check_spatial_dims(spatial_dims)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("feature_size", feature_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        dims, depths = tuple(dims), tuple(depths)
        if len(dims) != 4 or any(not isinstance(d, int) or d <= 0 or d % 2 for d in dims):
            raise ValueError(f"dims must be four positive even integers (one per stage), got {dims}")
        if len(depths) != 4 or any(not isinstance(d, int) or d < 0 for d in depths):
            raise ValueError(f"depths must be four non-negative integers (one per stage), got {depths}")
        self.spatial_dims = spatial_dims
        self.in_channels, self.out_channels = in_channels, out_channels
        self.feature_size = feature_size
        self.grad_checkpointing = False
        self.encoder = VMambaEncoder(spatial_dims, in_channels, depths, dims, mixer=mixer, mixer_kwargs=mixer_kwargs,
                                     d_state=d_state, ssm_ratio=ssm_ratio, mlp_ratio=mlp_ratio,
                                     drop_path_rate=drop_path_rate)
        # decoder width at strides 1, 2, 4, 8, 16, 32 (SwinUNETR's layout)
        widths = [feature_size] + [feature_size * 2**i for i in range(5)]
        basic = dict(spatial_dims=spatial_dims, kernel_size=3, stride=1, norm_name=norm_name, res_block=res_block)
        # skips[0] works on the input itself (stride 1), skips[1..4] on pyramid levels 0..3 (strides 2..16)
        in_chs = (in_channels, *self.encoder.out_channels[:4])
        self.skips = nn.ModuleList([
            UnetrBasicBlock(in_channels=c, out_channels=w, **basic) for c, w in zip(in_chs, widths[:5])
        ])
        self.bottleneck = UnetrBasicBlock(in_channels=self.encoder.out_channels[4], out_channels=widths[5], **basic)
        # ups[i] upsamples stride 2**(i+1) to stride 2**i and fuses skips[i]
        self.ups = nn.ModuleList([
            UnetrUpBlock(spatial_dims=spatial_dims, in_channels=widths[i + 1], out_channels=widths[i], kernel_size=3,
                         upsample_kernel_size=2, norm_name=norm_name, res_block=res_block)
            for i in range(5)
        ])
        self.head = UnetOutBlock(spatial_dims=spatial_dims, in_channels=feature_size, out_channels=out_channels)
        if grad_checkpointing:
            self.set_grad_checkpointing(True)
        self.memory_format = (torch.channels_last_3d if spatial_dims == 3 else torch.channels_last) if channels_last \
            else torch.contiguous_format
        if channels_last:
            # Weights get exactly the strides their gradients come back with, since DDP's gradient buckets
            # follow the weights: channels-last for every kernel wider than one voxel (depthwise ones included,
            # whose size-1 channel axis ``contiguous(memory_format=...)`` would leave alone) and for the
            # one-voxel kernels that read the channels-last encoder maps; the decoder's other one-voxel kernels
            # receive contiguous maps and keep contiguous weights. (A map with size-1 axes can still bring a
            # gradient whose strides differ on those axes only: the same memory layout, a harmless DDP notice.)
            reads_encoder = {id(m) for part in (self.encoder, self.skips, self.bottleneck) for m in part.modules()}
            for module in self.modules():
                if isinstance(module, nn.modules.conv._ConvNd) and (
                        math.prod(module.kernel_size) > 1 or id(module) in reads_encoder):
                    module.weight.data = _channels_last_strided(module.weight.data)

    # -- surface ----------------------------------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass: encoder stages (timm ``checkpoint_seq``) and every
        decoder block (``torch.utils.checkpoint``)."""
        self.grad_checkpointing = enable
        self.encoder.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The Mamba ``A_logs`` / ``Ds`` (marked ``_no_weight_decay`` by their mixer) and nothing else."""
        return {name for name, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    def check_input(self, x: Tensor) -> None:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            axes = ", ".join("DHW"[3 - self.spatial_dims:])
            raise ValueError(
                f"{type(self).__name__} expects (B, {self.in_channels}, {axes}) with {self.in_channels} input "
                f"channel(s), got a tensor of shape {tuple(x.shape)}"
            )
        if any(s == 0 for s in x.shape[2:]):
            raise ValueError(f"empty spatial size {tuple(x.shape[2:])}")

    def _run(self, block: nn.Module, *args: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The encoder pyramid of a size-32-divisible input (see :class:`VMambaEncoder`)."""
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, in_channels, *S)`` -> logits ``(B, out_channels, *S)`` for any ``S``."""
        self.check_input(x)
        if type(x) is not Tensor:  # MONAI's MetaTensor: its metadata tracking costs time and trips custom ops
            x = x.as_subclass(Tensor)
        size = x.shape[2:]
        pad = padding_for(size)
        if any(pad):
            # F.pad takes (last axis low, high, previous axis low, high, ...)
            x = F.pad(x, [p for axis_pad in reversed(pad) for p in (0, axis_pad)])
        x = x.contiguous(memory_format=self.memory_format)
        levels = self.encoder(x)
        skips = [self._run(self.skips[0], x)] + [self._run(blk, lvl) for blk, lvl in zip(self.skips[1:], levels[:4])]
        h = self._run(self.bottleneck, levels[4])
        for i in range(4, -1, -1):
            h = self._run(self.ups[i], h, skips[i])
        logits = self.head(h)
        if any(pad):
            logits = logits[(slice(None), slice(None), *(slice(0, s) for s in size))]
        return logits

    # -- weights from a VMamba ImageNet checkpoint -----------------------------------------------------------

    def load_encoder_checkpoint(self, checkpoint: str | Path | Mapping[str, Any]) -> dict[str, list[str]]:
        """Start the 2-D encoder from a VMamba classifier checkpoint (official ``.pth``, ``{"model": ...}``,
        or a state dict of :class:`backbones.vmamba.VSSM`), given as a local file or a mapping.

        The checkpoint is converted by :func:`backbones.vmamba.checkpoint_filter_fn` against a ``VSSM`` of
        this encoder's depths, widths and block options, then its ``stem`` and ``stages`` weights are copied
        into ``encoder``; the classifier and its norm are dropped. A 3-channel first conv is adapted to
        ``in_channels`` with timm's ``adapt_input_conv`` (summed for 1 channel, repeated and rescaled else).

        Returns:
            ``{"loaded": [...], "skipped": [...]}`` encoder parameter names set from the checkpoint and the
            checkpoint keys that were not used (the classifier).

        Raises:
            ValueError: for a 3-D network, or a checkpoint whose layout or shapes do not fit this encoder
                (naming the keys).
            FileNotFoundError: the file does not exist.
        """
        from timm.models import adapt_input_conv

        from backbones.vmamba import VSSM, checkpoint_filter_fn

        if self.spatial_dims != 2:
            raise ValueError("VMamba ImageNet checkpoints are 2-D; load_encoder_checkpoint needs spatial_dims=2")
        if not isinstance(checkpoint, Mapping):
            path = Path(checkpoint)
            if not path.is_file():
                raise FileNotFoundError(f"encoder checkpoint {path} does not exist")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        enc, kw = self.encoder, self.encoder.block_kwargs
        with torch.device("meta"):
            reference = VSSM(in_chans=3, num_classes=1000, depths=enc.depths, dims=enc.dims, mixer=kw["mixer"],
                             mixer_kwargs=kw["mixer_kwargs"], d_state=kw["d_state"], ssm_ratio=kw["ssm_ratio"],
                             gate=kw["gate"], conv_kernel=kw["conv_kernel"], conv_bias=kw["conv_bias"],
                             mlp_ratio=kw["mlp_ratio"], norm_eps=kw["norm_eps"], drop_path_rate=0.0)
        converted = checkpoint_filter_fn(checkpoint, reference)
        own = enc.state_dict()
        loaded, skipped, updates = [], [], {}
        for key, value in converted.items():
            if key not in own:
                skipped.append(key)
                continue
            if key == "stem.conv1.weight" and value.shape[1] != own[key].shape[1]:
                value = adapt_input_conv(own[key].shape[1], value)
            if value.shape != own[key].shape:
                raise ValueError(f"checkpoint key {key} has shape {tuple(value.shape)}, the encoder "
                                 f"expects {tuple(own[key].shape)}")
            updates[key] = value
            loaded.append(key)
        missing = [k for k in own if k not in updates and not k.startswith("out_norms.")]
        if missing:
            raise ValueError(f"checkpoint leaves {len(missing)} encoder weights unset: {missing[:8]}")
        enc.load_state_dict(updates, strict=False)
        return {"loaded": loaded, "skipped": skipped}
