"""Vim (Vision Mamba): bidirectional Mamba blocks over patch tokens, registered with timm.

Zhu et al., "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model"
(ICML 2024); official code github.com/hustvl/Vim. This is a pure-PyTorch re-implementation on
:class:`vmamba.MultiDirectionSSM` that reproduces the official numbers (``tests/test_vim.py`` checks the
official ``parity_small`` fixture) and loads the released checkpoints through :func:`checkpoint_filter_fn`.

Forward (``B`` images, ``M = Gh * Gw`` patches, ``C = embed_dim``):

1. Patch embed: ``Conv2d(kernel=patch_size, stride=stride)`` -> ``(B, M, C)`` in row-major ``(h, w)`` order.
2. The class token is inserted in the *middle* of the sequence, at index ``M // 2``; then the absolute
   position embedding ``(1, M + 1, C)`` is added (its entry ``M // 2`` belongs to the class token).
3. ``depth`` blocks ``x = x + drop_path(mixer(RMSNorm(x)))`` with the residual stream ``x`` in float32. The
   official code writes this as Add -> Norm -> Mixer (each mixer output is added at the start of the next
   block); both compute the same sums in the same order.
4. The mixer (:class:`vmamba.MultiDirectionSSM` with ``conv="causal"``, ``gate=True``, ``merge_mean=True``):
   a shared ``in_proj`` to ``x, z``; per direction a causal depthwise conv (kernel ``d_conv``) + SiLU, its
   own ``x_proj`` / ``dt_proj`` / ``A`` / ``D`` and a selective scan; the directions are averaged
   (``(y_fwd + y_bwd) / 2``), gated by ``SiLU(z)`` and projected by a shared ``out_proj``. Gating after the
   average equals the official per-direction gating, because the backward branch sees ``z`` flipped too.
5. Final RMSNorm; the head reads the class token at ``M // 2`` (``global_pool="token"``).

Scans (``scan=``):

* ``bi1d`` (official): the token sequence, class token included, forward and reversed.
* ``cross2d`` (the ``*_cross`` models): the four VMamba directions over the patch grid (row-major,
  column-major and both reversed), each with its own conv / x_proj / dt_proj / A / D. The class token is
  *not* a grid cell: it joins every direction in the middle of its sequence, exactly where Vim puts it
  (index ``M // 2`` of each forward direction; each reversed direction is the flip of its forward twin), so
  in each direction it summarises half of the image, and its four outputs are averaged like a grid cell's.
  Restricted to the row-major pair this is exactly the official ``bi1d`` Vim. The token layout of the
  residual stream (class token at ``M // 2`` of the row-major sequence) is the same for both scans, so the
  position embedding, the head and checkpoints work alike.

Speed: on CPU, when the fused C++ scan kernels are available (:mod:`vmamba.ops.fused`), Mamba-mixer blocks
take :meth:`VimBlock.mix_fused`: each direction is scanned in place in the token stream's own order, in
chunks of rows with the state carried across, so no direction copies exist and peak memory stays near a few
``(B, N, d_inner)`` tensors at any resolution. Otherwise (other mixers, CUDA, float64, ``VMAMBA_SCAN_BACKEND=
torch``) they take :meth:`VimBlock.mix_reference` through :class:`vmamba.MultiDirectionSSM`. Both give the
same numbers (``tests/test_vim.py``).

Initialisation follows the official code: ``trunc_normal(0.02)`` position embedding, class token and head
weight; LeCun-normal patch projection; ``out_proj`` Kaiming-uniform scaled by ``1 / sqrt(depth)``; Mamba's
S4D-real ``A``, ``D = 1``, dt bias = inverse softplus of a log-uniform step in ``[dt_min, dt_max]``, except
for the reversed directions, whose dt bias starts at zero (as the official ``dt_proj_b`` ends up after the
model-wide bias reset).
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, RmsNorm, lecun_normal_, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vmamba.blocks import add_drop_path
from vmamba.constant_cache import cached_constant
from vmamba.cross_scan import ScanPattern, scan_indices
from vmamba.mixers import MambaMixer, MixerType
from vmamba.ops import depthwise_conv1d_silu, linear
from vmamba.ops.fused import MAX_D_STATE, fused_multi_scan, use_fused
from vmamba.ssm_layer import ConvPlacement, MultiDirectionSSM

__all__ = ["Vim", "VimBlock", "VimPatchEmbed", "resample_pos_embed", "checkpoint_filter_fn"]

_SCANS = (ScanPattern.BI1D, ScanPattern.CROSS2D)
_GLOBAL_POOLS = ("token", "avg", "")
# Rows per fused-scan call: at most about this many elements per (B, rows, d_inner) temporary, in chunks of
# equal size (long sequences run in chunks with the state carried across, so memory does not grow with the
# chunk count; a 224² batch of 8 is one chunk, which saves a second round of per-call work per direction).
_CHUNK_ELEMENTS = 1 << 20
_MIN_CHUNK_ROWS = 64


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = tuple(int(v) for v in to_2tuple(value))
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


class VimPatchEmbed(nn.Module):
    """Image -> patch tokens by a strided convolution (``stride < patch_size`` gives overlapping patches).

    ``(B, in_chans, H, W) -> (B, Gh * Gw, embed_dim)`` in row-major ``(h, w)`` order, with
    ``G = (size - patch_size) // stride + 1`` per axis. Sizes that leave pixels over raise ``ValueError``,
    unless ``dynamic_img_pad`` pads them (zeros at the bottom / right, as timm's ``PatchEmbed``) up to the
    next size the grid takes.

    Args:
        img_size: the size the model is built for (sets the position-embedding grid).
        patch_size, stride: the convolution's kernel and stride.
        in_chans, embed_dim: input channels and token width.
        strict_img_size: inputs must have exactly ``img_size`` (``False`` for dynamic image sizes).
        dynamic_img_pad: zero-pad inputs that do not fit the patch grid instead of raising.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        stride: int | Sequence[int] | None = None,
        in_chans: int = 3,
        embed_dim: int = 192,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = _pair(patch_size, "patch_size")
        self.stride = self.patch_size if stride is None else _pair(stride, "stride")
        self.img_size = _pair(img_size, "img_size")
        self.in_chans = in_chans
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.grid_size = self.feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride)

    def padded_size(self, img_size: Sequence[int]) -> tuple[int, int]:
        """``(H, W)`` after ``dynamic_img_pad``'s padding: per axis the smallest ``patch + k * stride`` that is
        at least the size (the size itself without ``dynamic_img_pad``)."""
        if not self.dynamic_img_pad:
            return int(img_size[0]), int(img_size[1])
        padded = [
            patch + max(0, -(-(int(size) - patch) // stride)) * stride
            for size, patch, stride in zip(img_size, self.patch_size, self.stride)
        ]
        return padded[0], padded[1]

    def feat_size(self, img_size: Sequence[int]) -> tuple[int, int]:
        """The patch grid ``(Gh, Gw)`` of an ``(H, W)`` image (after ``dynamic_img_pad``'s padding);
        ``ValueError`` when the grid cannot take it."""
        grid = []
        sizes = self.padded_size(img_size)
        for size, patch, stride, axis in zip(sizes, self.patch_size, self.stride, ("height", "width")):
            if size < patch or (size - patch) % stride:
                raise ValueError(
                    f"image {axis} {size} does not fit the patch grid (patch {patch}, stride {stride}): it must be "
                    f"{patch} + k * {stride}, e.g. {patch + max(0, round((size - patch) / stride)) * stride}"
                )
            grid.append((size - patch) // stride + 1)
        return grid[0], grid[1]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}")
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} differs from the model's img_size {self.img_size}; create the "
                "model with that img_size or with dynamic_img_size=True"
            )
        self.feat_size(x.shape[-2:])
        height, width = self.padded_size(x.shape[-2:])
        if (height, width) != tuple(x.shape[-2:]):
            x = F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))
        return self.proj(x).flatten(2).transpose(1, 2)


class VimBlock(nn.Module):
    """Pre-norm residual block on the token stream: ``x + drop_path(mixer(RMSNorm(x)))``.

    Args:
        dim: token width ``C``.
        scan: ``bi1d`` (official Vim) or ``cross2d`` (see the module docstring for the class token).
        mixer, mixer_kwargs: the sequence mixer run along every direction.
        d_conv: kernel of the per-direction causal depthwise conv.
        expand: ``d_inner / dim``.
        norm_eps: RMSNorm epsilon.
        drop_path: stochastic-depth rate of the mixer branch.

    Shapes:
        ``x: (B, N, C)`` with ``N = Gh * Gw`` (+ 1 with a class token at ``cls_index = Gh * Gw // 2``).
    """

    def __init__(
        self,
        dim: int,
        scan: ScanPattern | str = ScanPattern.BI1D,
        mixer: MixerType | str = MixerType.MAMBA,
        mixer_kwargs: dict[str, Any] | None = None,
        d_conv: int = 4,
        expand: float = 2.0,
        norm_eps: float = 1e-5,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm = RmsNorm(dim, eps=norm_eps)
        self.op = MultiDirectionSSM(
            dim,
            pattern=scan,
            mixer=mixer,
            mixer_kwargs=mixer_kwargs,
            expand=expand,
            gate=True,
            conv=ConvPlacement.CAUSAL,
            conv_kernel=d_conv,
            conv_bias=True,
            out_norm=False,
            merge_mean=True,
            bias=False,
            channels_last=True,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, grid_size: tuple[int, int], cls_index: int | None) -> Tensor:
        # The residual stays in x's dtype (float32); the norm runs in the weights' dtype, as the official code.
        h = self.norm(x.to(self.norm.weight.dtype))
        return add_drop_path(x, self.mix(h, grid_size, cls_index), self.drop_path)

    def mix(self, h: Tensor, grid_size: tuple[int, int], cls_index: int | None) -> Tensor:
        """``h: (B, N, C) -> (B, N, C)``: the mixer over the tokens, class token as in the module docstring.

        With a Mamba mixer and the fused kernels available this runs :meth:`mix_fused`; otherwise (and as the
        reference it is tested against) :meth:`mix_reference`.
        """
        # The kernels compute in float32: float64 (e.g. gradcheck) stays on the reference path.
        mixer = self.op.mixer
        if (
            isinstance(mixer, MambaMixer)
            and mixer.d_state <= MAX_D_STATE
            and h.dtype != torch.float64
            and use_fused(h)
        ):
            return self.mix_fused(h, grid_size, cls_index)
        return self.mix_reference(h, grid_size, cls_index)

    def mix_reference(self, h: Tensor, grid_size: tuple[int, int], cls_index: int | None) -> Tensor:
        """The mixer through :class:`vmamba.MultiDirectionSSM` (cross-scan copies, any mixer)."""
        if self.op.pattern is ScanPattern.BI1D:
            # With the class token in the middle, the token sequence is exactly the 1-D sequence Vim scans.
            return self.op(h)
        batch, _, channels = h.shape
        if cls_index is None:
            return self.op(h.reshape(batch, *grid_size, channels)).flatten(1, 2)
        grid = torch.cat([h[:, :cls_index], h[:, cls_index + 1 :]], dim=1).reshape(batch, *grid_size, channels)
        y, y_cls = self.op(grid, tokens=h[:, cls_index : cls_index + 1])
        y = y.flatten(1, 2)
        return torch.cat([y[:, :cls_index], y_cls, y[:, cls_index:]], dim=1)

    def mix_fused(self, h: Tensor, grid_size: tuple[int, int], cls_index: int | None) -> Tensor:
        """The same numbers as :meth:`mix_reference` (Mamba mixer only) in the stream's own row order.

        Each direction is scanned in place by :func:`vmamba.ops.fused.fused_multi_scan` (no direction copies
        for the row-major pair; one gather for the column-major pair of ``cross2d``) in chunks of rows, the
        state carried from chunk to chunk, and accumulated into one ``(B, N, d_inner)`` output. Only a chunk's
        conv / x_proj / dt_proj results exist at a time, so peak memory stays near a few ``(B, N, d_inner)``
        tensors at any resolution. A reversed direction's causal conv is the anti-causal conv (kernel
        flipped) in its forward twin's order.
        """
        op, mixer = self.op, self.op.mixer
        batch, n, _ = h.shape
        k, e = op.pattern.num_directions, op.d_inner
        half = k // 2
        orders = direction_orders(op.pattern, grid_size, cls_index, n).to(h.device)  # (K/2, N)
        w_x, w_z = op.in_proj.weight.split(e)
        b_x, b_z = op.in_proj.bias.split(e) if op.in_proj.bias is not None else (None, None)
        x = linear(h, w_x, b_x)  # (B, N, E); z is computed after the scans to keep memory low
        a = -torch.exp(mixer.A_logs.float()).view(k, e, -1).transpose(1, 2)  # (K, S, E)
        chunks = -(-n * batch * e // _CHUNK_ELEMENTS)
        rows = max(_MIN_CHUNK_ROWS, -(-n // max(1, chunks)))
        if op.pattern is ScanPattern.BI1D and rows >= n:  # the whole stream in one call
            y = self._scan_pair(x, a)
        else:
            y = None
            for axis in range(half):
                order = None if _visits_in_stream_order(orders[axis]) else orders[axis]
                seq = x if order is None else x[:, order]  # (B, N, E) in this direction's order
                for kk in (axis, axis + half):
                    y = self._scan_direction(seq, kk, kk >= half, a, rows, y, order)
        del x
        grad = torch.is_grad_enabled()
        z = F.silu(linear(h, w_z, b_z), inplace=not grad)
        y = y * z if grad else y.mul_(z)
        # out_proj((y / K) * silu(z)): 1/K is a power of two, so folding it into the weight gives the same bits.
        out = linear(y.to(op.out_proj.weight.dtype), op.out_proj.weight * (1.0 / k), op.out_proj.bias)
        return op.dropout(out)

    def _scan_pair(self, x: Tensor, a: Tensor) -> Tensor:
        """Both ``bi1d`` directions over the whole stream ``x (B, N, E)`` in one kernel pass: one conv call
        writes the two directions' inputs interleaved ``(B, N, 2, E)`` (the reversed one anti-causal with the
        taps flipped), and the scan sums ``<C, h_k> + D_k u_k`` over both into one ``(B, N, E)`` float32
        output (``a: (2, S, E)``)."""
        op, mixer = self.op, self.op.mixer
        batch, n, e = x.shape
        width = op.conv.kernel_size[0]
        rank, d_state = mixer.dt_rank, mixer.d_state
        w = op.conv.weight.view(2, e, width).transpose(1, 2)  # (2, w, E)
        taps = torch.stack([w[0], w[1].flip(0)])  # the reversed direction's causal conv, in forward order
        u = depthwise_conv1d_silu(x, taps, op.conv.bias.view(2, e), 0, n, [-(width - 1), 0])  # (B, N, 2, E)
        x_dbl = torch.stack([linear(u[:, :, kk], mixer.x_proj_weight[kk]) for kk in range(2)], dim=2)
        dt, b_in, c_out = torch.split(x_dbl, [rank, d_state, d_state], dim=-1)  # (B, N, 2, *)
        forward = torch.arange(n, device=x.device)
        y, _ = fused_multi_scan(  # the kernel projects dt (delta = dt_projs_weight[k] @ dt) tile by tile
            u, dt, a, b_in.unsqueeze(3), c_out.unsqueeze(3), torch.stack([forward, forward.flip(0)]),
            delta_bias=mixer.dt_projs_bias.float(), D=mixer.Ds.view(2, e).float(), dt_weight=mixer.dt_projs_weight,
        )
        return y

    def _scan_direction(
        self,
        seq: Tensor,
        kk: int,
        reverse: bool,
        a: Tensor,
        rows: int,
        y: Tensor | None,
        order: Tensor | None,
    ) -> Tensor:
        """Scan direction ``kk`` over ``seq (B, N, E)`` (its forward twin's order; backwards if ``reverse``)
        and add ``<C, h> + D u`` (the D skip fused in the kernel) into ``y (B, N, E)`` float32 at the stream
        rows ``order`` (identity if ``None``); returns ``y``, a new tensor when ``y`` is ``None`` (the scan's
        own output when one call covers the whole stream in its own order)."""
        op, mixer = self.op, self.op.mixer
        batch, n, e = seq.shape
        width = op.conv.kernel_size[0]
        conv_w = op.conv.weight.view(-1, e, width)[kk].t()  # (w, E)
        conv_b = op.conv.bias.view(-1, e)[kk]
        if reverse:
            conv_w = conv_w.flip(0)  # causal in reversed order == anti-causal, flipped, in forward order
        conv_w = conv_w.contiguous()  # contiguous taps: a strided weight slows the reference's addcmul four-fold
        rank, d_state = mixer.dt_rank, mixer.d_state
        x_proj, dt_proj = mixer.x_proj_weight[kk], mixer.dt_projs_weight[kk]
        dt_bias, d_skip = mixer.dt_projs_bias[kk : kk + 1].float(), mixer.Ds.view(-1, e)[kk : kk + 1].float()
        starts = list(range(0, n, rows))
        state = None
        # the conv reads w - 1 rows of history before the chunk (after it when reversed)
        offset = 0 if reverse else -(width - 1)
        for start in reversed(starts) if reverse else starts:
            stop = min(n, start + rows)
            c = stop - start
            u = depthwise_conv1d_silu(seq, conv_w, conv_b, start, stop, offset)  # (B, c, E)
            x_dbl = linear(u, x_proj)  # (B, c, R + 2S)
            dt, b_in, c_out = torch.split(x_dbl, [rank, d_state, d_state], dim=-1)
            index = torch.arange(c, device=seq.device)
            y_c, state = fused_multi_scan(  # delta = dt_proj @ dt inside the kernel
                u.unsqueeze(2), dt.unsqueeze(2), a[kk : kk + 1], b_in[:, :, None, None], c_out[:, :, None, None],
                (index.flip(0) if reverse else index).unsqueeze(0), delta_bias=dt_bias, initial_state=state,
                D=d_skip, dt_weight=dt_proj.unsqueeze(0),
            )
            if y is None:
                if c == n and order is None:  # one call covered the whole stream in its own order
                    y = y_c
                    continue
                y = y_c.new_zeros(batch, n, e)
            if order is None:
                y[:, start:stop] += y_c
            else:
                y.index_add_(1, order[start:stop], y_c)
        return y


def _visits_in_stream_order(order: Tensor) -> bool:
    """Whether ``order (N,)`` is ``0 .. N-1`` (the direction reads the stream as it is, no gather). While the
    model is traced (torch.compile / export, fake values) the answer is no: the gather is right either way."""
    if torch.compiler.is_compiling() or type(order) is not Tensor:
        return False
    return bool(torch.equal(order, torch.arange(order.shape[0], device=order.device)))


def _build_direction_orders(scan: ScanPattern, grid_size: tuple[int, int], cls_index: int | None, n: int) -> Tensor:
    if scan is ScanPattern.BI1D:
        return torch.arange(n).unsqueeze(0)
    rows = scan_indices(grid_size, ScanPattern.CROSS2D)[:2]  # (2, M) patch positions, row- / column-major
    if cls_index is None:
        return rows
    stream = rows + (rows >= cls_index).long()  # patch p sits at stream row p, or p + 1 past the class token
    mid = rows.shape[1] // 2
    cls = torch.full((2, 1), cls_index, dtype=torch.long)
    return torch.cat([stream[:, :mid], cls, stream[:, mid:]], dim=1)


def direction_orders(scan: ScanPattern, grid_size: tuple[int, int], cls_index: int | None, n: int) -> Tensor:
    """Stream rows visited by each forward direction, ``(K/2, N)`` int64; the reversed ones are their flips.

    ``bi1d``: the stream itself (class token included, in the middle). ``cross2d``: row-major and
    column-major over the patch grid, the class token inserted at index ``M // 2`` of each.
    """
    scan, grid_size = ScanPattern.parse(scan), tuple(grid_size)
    return cached_constant(("vim_direction_orders", scan, grid_size, cls_index, n),
                           lambda: _build_direction_orders(scan, grid_size, cls_index, n))


class Vim(nn.Module):
    """Vision Mamba classifier (timm surface: ``forward_features``, ``forward_head``, ``forward_intermediates``...).

    Args:
        img_size: input size the position embedding is built for (int or ``(H, W)``).
        patch_size, stride: patch-embedding kernel and stride (``stride=None`` means ``patch_size``).
        in_chans: input channels.
        num_classes: classes of the linear head (0: no head).
        global_pool: ``"token"`` (the middle class token, official), ``"avg"`` (mean of the patch tokens) or
            ``""`` (no pooling: ``forward_head`` gets all tokens).
        embed_dim, depth: token width and number of blocks.
        d_state: Mamba state size (other mixers take their sizes from ``mixer_kwargs``).
        d_conv: kernel of the causal depthwise conv.
        expand: ``d_inner / embed_dim``.
        scan: ``"bi1d"`` (official) or ``"cross2d"`` (four directions over the patch grid).
        mixer: the sequence mixer (:class:`vmamba.MixerType`: mamba, mamba2, retnet, gla, rwkv7).
        mixer_kwargs: extra mixer arguments.
        class_token: use the middle class token (required by ``global_pool="token"``).
        dynamic_img_size: accept any input size the patch grid takes, resampling the position embedding.
        dynamic_img_pad: zero-pad (bottom / right) an input the patch grid cannot take to the next size it
            can, instead of raising (timm's ViT option; use with ``dynamic_img_size``).
        norm_eps: RMSNorm epsilon.
        drop_rate: dropout before the head.
        pos_drop_rate: dropout after adding the position embedding (the official ``drop_rate``).
        drop_path_rate: stochastic depth, rising linearly over the blocks (the official schedule).

    Raises:
        ValueError: an unsupported scan / pool, a class-token pool without a class token, an image size the
            patch grid cannot take, or an unknown mixer.

    Example:
        >>> model = Vim(img_size=64, embed_dim=48, depth=2, num_classes=10)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        stride: int | Sequence[int] | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2.0,
        scan: ScanPattern | str = ScanPattern.BI1D,
        mixer: MixerType | str = MixerType.MAMBA,
        mixer_kwargs: dict[str, Any] | None = None,
        class_token: bool = True,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        norm_eps: float = 1e-5,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        scan = ScanPattern.parse(scan)
        if scan not in _SCANS:
            raise ValueError(f"Vim scans tokens with {[s.value for s in _SCANS]}, got {scan.value!r}")
        mixer = MixerType.parse(mixer)
        self._check_pool(global_pool, class_token)
        if depth <= 0 or embed_dim <= 0:
            raise ValueError(f"depth and embed_dim must be positive, got {depth}, {embed_dim}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.scan = scan
        self.mixer_type = mixer
        self.num_prefix_tokens = 1 if class_token else 0
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.patch_embed = VimPatchEmbed(
            img_size, patch_size, stride, in_chans, embed_dim, strict_img_size=not dynamic_img_size,
            dynamic_img_pad=dynamic_img_pad,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        kwargs = dict(mixer_kwargs or {})
        if mixer is MixerType.MAMBA:
            kwargs.setdefault("d_state", d_state)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(
            *[
                VimBlock(embed_dim, scan, mixer, kwargs, d_conv, expand, norm_eps, drop_path=dpr[i])
                for i in range(depth)
            ]
        )
        reduction = self.patch_embed.stride[0]
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f"blocks.{i}") for i in range(depth)]
        self.norm = RmsNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @staticmethod
    def _check_pool(global_pool: str, class_token: bool) -> None:
        if global_pool not in _GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {_GLOBAL_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError('global_pool="token" reads the class token; use class_token=True or global_pool="avg"')

    # ---- init ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation (see the module docstring)."""
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for block in self.blocks:
            _init_block(block, len(self.blocks))

    # ---- timm surface ----------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embedding, class token and the SSM's ``A_log`` / ``D`` (every parameter so marked)."""
        names = {"pos_embed", "cls_token"}
        names.update(n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False))
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self._check_pool(global_pool, self.cls_token is not None)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def cls_index(self, num_tokens: int) -> int | None:
        """Index of the class token in a stream of ``num_tokens`` tokens (``None`` without one)."""
        return (num_tokens - 1) // 2 if self.cls_token is not None else None

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images ``(B, in_chans, H, W)`` -> the float32 token stream ``(B, N, C)`` and the patch grid."""
        tokens = self.patch_embed(x)  # validates channels and size
        grid = self.patch_embed.feat_size(x.shape[-2:])
        if self.cls_token is not None:
            mid = tokens.shape[1] // 2
            cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :mid], cls, tokens[:, mid:]], dim=1)
        pos_embed = self.pos_embed
        if grid != self.patch_embed.grid_size:
            pos_embed = resample_pos_embed(pos_embed, grid, self.patch_embed.grid_size, self.num_prefix_tokens)
        tokens = self.pos_drop(tokens + pos_embed)
        # The residual stream is kept in (at least) float32, as the official residual_in_fp32.
        return tokens.to(torch.promote_types(tokens.dtype, torch.float32)), grid

    def _run_block(self, block: VimBlock, x: Tensor, grid: tuple[int, int]) -> Tensor:
        cls_index = self.cls_index(x.shape[1])
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(block, x, grid, cls_index, use_reentrant=False)
        return block(x, grid, cls_index)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, in_chans, H, W) -> (B, N, C)``: the final-normed token stream (class token at ``cls_index``)."""
        x, grid = self._embed(x)
        for block in self.blocks:
            x = self._run_block(block, x, grid)
        return self.norm(x.to(self.norm.weight.dtype))

    def pool(self, x: Tensor) -> Tensor:
        """``(B, N, C) -> (B, C)`` per ``global_pool`` (``""`` returns ``x`` unchanged)."""
        if self.global_pool == "token":
            return x[:, self.cls_index(x.shape[1])]
        if self.global_pool == "avg":
            return _drop_cls(x, self.cls_index(x.shape[1])).mean(dim=1)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Block outputs as feature maps.

        Args:
            x: images ``(B, in_chans, H, W)``.
            indices: blocks to return: the last ``n`` if an int, these if a list, all if ``None``.
            return_prefix_tokens: pair each map with the class token ``(B, 1, C)``.
            norm: apply the final norm to each output.
            stop_early: stop after the last requested block.
            output_fmt: ``"NCHW"`` maps ``(B, C, Gh, Gw)`` or ``"NLC"`` tokens ``(B, Gh * Gw, C)``.
            intermediates_only: return only the list.

        Returns:
            The list, or ``(forward_features(x), list)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates, prefixes = [], []
        for i, block in enumerate(blocks):
            x = self._run_block(block, x, grid)
            if i in take_indices:
                y = self.norm(x.to(self.norm.weight.dtype)) if norm else x
                cls_index = self.cls_index(y.shape[1])
                if cls_index is not None:
                    prefixes.append(y[:, cls_index : cls_index + 1])
                y = _drop_cls(y, cls_index)
                if output_fmt == "NCHW":
                    y = y.reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append(y)
        if return_prefix_tokens and prefixes:
            intermediates = list(zip(intermediates, prefixes))
        if intermediates_only:
            return intermediates
        for block in self.blocks[len(blocks) :]:
            x = self._run_block(block, x, grid)
        return self.norm(x.to(self.norm.weight.dtype)), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last requested one (and the norm / head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def _drop_cls(x: Tensor, cls_index: int | None) -> Tensor:
    """``(B, N, C)`` without the class token at ``cls_index``."""
    if cls_index is None:
        return x
    return torch.cat([x[:, :cls_index], x[:, cls_index + 1 :]], dim=1)


@torch.no_grad()
def _init_block(block: VimBlock, depth: int) -> None:
    out_proj = block.op.out_proj
    # GPT-2-style: residual-branch outputs scaled by 1/sqrt(depth) (one residual per block).
    nn.init.kaiming_uniform_(out_proj.weight, a=math.sqrt(5))
    out_proj.weight /= math.sqrt(depth)
    mixer = block.op.mixer
    if isinstance(mixer, MambaMixer):
        # The official model-wide reset zeroes every Linear bias not marked _no_reinit: only dt_proj's is,
        # so the backward direction's dt bias starts at 0 (softplus(0) = log 2).
        half = mixer.num_directions // 2
        mixer.dt_projs_bias[half:].zero_()
        for p in (mixer.A_logs, mixer.Ds):
            p._no_weight_decay = True


def resample_pos_embed(
    pos_embed: Tensor,
    new_size: Sequence[int],
    old_size: Sequence[int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Resize a Vim position embedding to another patch grid, keeping the class token in the middle.

    ``pos_embed: (1, M + T, C)`` with the class token (``T = 1``) at index ``M // 2`` ->
    ``(1, M' + T, C)``, ``M' = prod(new_size)``, the class entry moved unchanged to ``M' // 2`` and the grid
    entries interpolated. ``old_size=None`` assumes a square grid.
    """
    if num_prefix_tokens not in (0, 1):
        raise ValueError(f"Vim has at most one class token, got num_prefix_tokens={num_prefix_tokens}")
    num_patches = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"cannot infer a square grid from {num_patches} position-embedding entries")
        old_size = (side, side)
    if old_size[0] * old_size[1] != num_patches:
        raise ValueError(f"position embedding has {num_patches} grid entries, not {tuple(old_size)}")
    if tuple(old_size) == tuple(new_size):
        return pos_embed
    cls_index = num_patches // 2 if num_prefix_tokens else None
    grid = resample_abs_pos_embed(
        _drop_cls(pos_embed, cls_index), list(new_size), list(old_size), num_prefix_tokens=0,
        interpolation=interpolation, antialias=antialias,
    )
    if cls_index is None:
        return grid
    mid = grid.shape[1] // 2
    return torch.cat([grid[:, :mid], pos_embed[:, cls_index : cls_index + 1], grid[:, mid:]], dim=1)


# ---- checkpoints ----------------------------------------------------------------------------------------
# Official per-layer Mamba parameters -> (our name under blocks.i.op, how the two directions combine).
_OFFICIAL_PAIRS = {
    "conv1d.weight": ("conv.weight", "cat"),
    "conv1d.bias": ("conv.bias", "cat"),
    "x_proj.weight": ("mixer.x_proj_weight", "stack"),
    "dt_proj.weight": ("mixer.dt_projs_weight", "stack"),
    "dt_proj.bias": ("mixer.dt_projs_bias", "stack"),
    "A_log": ("mixer.A_logs", "cat"),
    "D": ("mixer.Ds", "cat"),
}
_OFFICIAL_BACKWARD = {
    "conv1d.weight": "conv1d_b.weight",
    "conv1d.bias": "conv1d_b.bias",
    "x_proj.weight": "x_proj_b.weight",
    "dt_proj.weight": "dt_proj_b.weight",
    "dt_proj.bias": "dt_proj_b.bias",
    "A_log": "A_b_log",
    "D": "D_b",
}
_OFFICIAL_SHARED = {"in_proj.weight": "op.in_proj.weight", "out_proj.weight": "op.out_proj.weight"}


def _num_blocks(state_dict: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    found = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _convert_official(state_dict: dict[str, Tensor], model: Vim) -> dict[str, Tensor]:
    if model.mixer_type is not MixerType.MAMBA or model.scan is not ScanPattern.BI1D:
        raise ValueError(
            "official Vim checkpoints hold bidirectional (bi1d) Mamba weights; this model uses "
            f"scan={model.scan.value!r}, mixer={model.mixer_type.value!r}"
        )
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for i in range(_num_blocks(state_dict, "layers")):
        src, dst = f"layers.{i}.mixer.", f"blocks.{i}.op."
        for name, (ours, how) in _OFFICIAL_PAIRS.items():
            pair = (state_dict[src + name], state_dict[src + _OFFICIAL_BACKWARD[name]])
            out[dst + ours] = torch.cat(pair) if how == "cat" else torch.stack(pair)
            used.update((src + name, src + _OFFICIAL_BACKWARD[name]))
        for name, ours in _OFFICIAL_SHARED.items():
            out[f"blocks.{i}.{ours}"] = state_dict[src + name]
            used.add(src + name)
        out[f"blocks.{i}.norm.weight"] = state_dict[f"layers.{i}.norm.weight"]
        used.add(f"layers.{i}.norm.weight")
    if "norm_f.weight" in state_dict:
        out["norm.weight"] = state_dict["norm_f.weight"]
        used.add("norm_f.weight")
    # The rest (patch_embed, cls_token, pos_embed, head) keeps its name; unknown official extras (layer
    # scale, RoPE, double class tokens) pass through so a strict load names them.
    out.update({k: v for k, v in state_dict.items() if k not in used})
    return out


def checkpoint_filter_fn(state_dict: dict[str, Any], model: Vim) -> dict[str, Tensor]:
    """Official Vim (or our own) state dict -> this model's, resampling the position embedding if needed.

    Accepts the released ``{"model": state_dict}`` or a bare state dict (keys may carry ``module.`` /
    ``model.`` prefixes). The two official directions (``conv1d`` / ``conv1d_b``, ``x_proj`` / ``x_proj_b``,
    ...) are stacked into the per-direction parameters of :class:`vmamba.mixers.MambaMixer`.

    Raises:
        ValueError: the checkpoint's embedding size, depth or patch size differs from the model's, or an
            official checkpoint meets a model with another scan or mixer.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    for prefix in ("module.", "model."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None:
        raise ValueError("not a Vim checkpoint: it has no patch_embed.proj.weight")
    if proj.shape[0] != model.embed_dim:
        raise ValueError(f"checkpoint embedding size {proj.shape[0]} does not match the model's {model.embed_dim}")
    if tuple(proj.shape[-2:]) != model.patch_embed.patch_size:
        raise ValueError(
            f"checkpoint patch size {tuple(proj.shape[-2:])} does not match the model's {model.patch_embed.patch_size}"
        )
    official = any(k.startswith("layers.") for k in state_dict)
    depth = _num_blocks(state_dict, "layers" if official else "blocks")
    if depth != len(model.blocks):
        raise ValueError(f"checkpoint depth {depth} does not match the model's {len(model.blocks)} blocks")
    if official:
        state_dict = _convert_official(state_dict, model)
    else:
        state_dict = dict(state_dict)
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        state_dict["pos_embed"] = resample_pos_embed(
            pos_embed, model.patch_embed.grid_size, num_prefix_tokens=model.num_prefix_tokens
        )
    return state_dict


# ---- pretrained configs and registration ---------------------------------------------------------------
def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2401.09417",
        **kwargs,
    }


_HF = "https://huggingface.co/hustvl/{repo}/resolve/main/{file}"
_T_URL = _HF.format(repo="Vim-tiny-midclstok", file="vim_t_midclstok_76p1acc.pth")
_T8_URL = _HF.format(repo="Vim-tiny-midclstok", file="vim_t_midclstok_ft_78p3acc.pth")
_S_URL = _HF.format(repo="Vim-small-midclstok", file="vim_s_midclstok_80p5acc.pth")
_S8_URL = _HF.format(repo="Vim-small-midclstok", file="vim_s_midclstok_ft_81p6acc.pth")
_B_URL = _HF.format(repo="Vim-base-midclstok", file="vim_b_midclstok_81p9acc.pth")

# The official registered names (hustvl/Vim vim/models_mamba.py), kept as aliases.
_OFFICIAL_T = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
_OFFICIAL_T8 = "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
_OFFICIAL_S = "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
_OFFICIAL_S8 = "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
_OFFICIAL_B = "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2"

default_cfgs = generate_default_cfgs(
    {
        "vim_t.in1k": _cfg(_T_URL),
        "vim_s.in1k": _cfg(_S_URL),
        "vim_b.in1k": _cfg(_B_URL),
        "vim_t_s8.in1k": _cfg(_T8_URL),
        "vim_s_s8.in1k": _cfg(_S8_URL),
        "vim_t_cross": _cfg(),
        "vim_s_cross": _cfg(),
        "vim_b_cross": _cfg(),
        f"{_OFFICIAL_T}.in1k": _cfg(_T_URL),
        f"{_OFFICIAL_S}.in1k": _cfg(_S_URL),
        f"{_OFFICIAL_B}.in1k": _cfg(_B_URL),
        f"{_OFFICIAL_T8}.in1k": _cfg(_T8_URL),
        f"{_OFFICIAL_S8}.in1k": _cfg(_S8_URL),
    }
)


def _create_vim(variant: str, pretrained: bool = False, **kwargs: Any) -> Vim:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        Vim,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


_TINY = dict(patch_size=16, embed_dim=192, depth=24)
_SMALL = dict(patch_size=16, embed_dim=384, depth=24)
_BASE = dict(patch_size=16, embed_dim=768, depth=24)
_STRIDE8 = dict(stride=8)
_CROSS = dict(scan=ScanPattern.CROSS2D)


@register_model
def vim_t(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-tiny (7M, 76.1% ImageNet top-1)."""
    return _create_vim("vim_t", pretrained, **{**_TINY, **kwargs})


@register_model
def vim_s(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-small (26M, 80.5%)."""
    return _create_vim("vim_s", pretrained, **{**_SMALL, **kwargs})


@register_model
def vim_b(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-base (98M, 81.9%)."""
    return _create_vim("vim_b", pretrained, **{**_BASE, **kwargs})


@register_model
def vim_t_s8(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-tiny+ (patch 16, stride 8; 78.3%)."""
    return _create_vim("vim_t_s8", pretrained, **{**_TINY, **_STRIDE8, **kwargs})


@register_model
def vim_s_s8(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-small+ (patch 16, stride 8; 81.6%)."""
    return _create_vim("vim_s_s8", pretrained, **{**_SMALL, **_STRIDE8, **kwargs})


@register_model
def vim_t_cross(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-tiny blocks with the four-direction cross2d scan (no released weights)."""
    return _create_vim("vim_t_cross", pretrained, **{**_TINY, **_CROSS, **kwargs})


@register_model
def vim_s_cross(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-small blocks with the four-direction cross2d scan (no released weights)."""
    return _create_vim("vim_s_cross", pretrained, **{**_SMALL, **_CROSS, **kwargs})


@register_model
def vim_b_cross(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-base blocks with the four-direction cross2d scan (no released weights)."""
    return _create_vim("vim_b_cross", pretrained, **{**_BASE, **_CROSS, **kwargs})


@register_model
def vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(
    pretrained: bool = False, **kwargs: Any
) -> Vim:
    """Official name of :func:`vim_t`."""
    return _create_vim(_OFFICIAL_T, pretrained, **{**_TINY, **kwargs})


@register_model
def vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(
    pretrained: bool = False, **kwargs: Any
) -> Vim:
    """Official name of :func:`vim_t_s8`."""
    return _create_vim(_OFFICIAL_T8, pretrained, **{**_TINY, **_STRIDE8, **kwargs})


@register_model
def vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(
    pretrained: bool = False, **kwargs: Any
) -> Vim:
    """Official name of :func:`vim_s`."""
    return _create_vim(_OFFICIAL_S, pretrained, **{**_SMALL, **kwargs})


@register_model
def vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(
    pretrained: bool = False, **kwargs: Any
) -> Vim:
    """Official name of :func:`vim_s_s8`."""
    return _create_vim(_OFFICIAL_S8, pretrained, **{**_SMALL, **_STRIDE8, **kwargs})


@register_model
def vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2(
    pretrained: bool = False, **kwargs: Any
) -> Vim:
    """Official name of :func:`vim_b`."""
    return _create_vim(_OFFICIAL_B, pretrained, **{**_BASE, **kwargs})
