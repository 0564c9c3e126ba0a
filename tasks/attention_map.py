"""Attention maps for state-space vision models: how much each image patch feeds a chosen token.

For a VMamba or Vim model and an image, the chosen SSM layer's direction-sequences ``(B, K, L, C)`` are
captured with a forward hook on its mixer; :meth:`vmamba.mixers.SequenceMixer.mixing_matrix` turns them into
the per-direction ``L x L`` mixing weights (the quadratic, "attention" form of the scan); the row of the
chosen token in every direction is mapped back onto the patch grid with the cross-scan's own ordering
(:func:`vmamba.cross_merge`, the adjoint of the scan) and the directions are summed — the way people
inspect ViT attention. Each direction is causal along its own scan order, so its map is zero on the patches
that come after the token in that order.

Command line::

    python -m tasks.attention_map --model vmamba_t_rwkv7 --image cat.jpg --token 3 4 --out map.png \\
        [--layer -1] [--checkpoint weights.pth] [--mixer gla] [--model-kwargs depths=(1,1,1,1) dims=32]

Function API: :func:`ssm_layers`, :func:`token_mixing_map`, :func:`save_overlay`, :func:`render_attention_map`.
"""
from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from vmamba import MultiDirectionSSM, ScanPattern, cross_merge, cross_scan
from vmamba.ssm_layer import _insert_middle_tokens, _take_middle_tokens

__all__ = ["MixingMap", "ssm_layers", "token_mixing_map", "save_overlay", "render_attention_map", "main"]


@dataclass
class MixingMap:
    """The mixing weights of one token over the patch grid.

    Attributes:
        weights: ``(Gh, Gw)``, summed over the directions.
        per_direction: ``(K, Gh, Gw)``, direction ``k`` in the cross-scan order of the layer's pattern.
        token: ``(row, col)`` on the grid.
        layer: index of the SSM layer in :func:`ssm_layers` order.
        pattern: the layer's scan pattern.
    """

    weights: Tensor
    per_direction: Tensor
    token: tuple[int, int]
    layer: int
    pattern: ScanPattern


def ssm_layers(model: nn.Module) -> list[MultiDirectionSSM]:
    """The model's multi-direction SSM layers in forward order (VMamba: every VSS block; Vim: every block)."""
    return [m for m in model.modules() if isinstance(m, MultiDirectionSSM)]


@dataclass
class _Capture:
    layer_input: Tensor | None = None
    extra_tokens: int = 0
    sequences: Tensor | None = None


def _run_and_capture(model: nn.Module, layer: MultiDirectionSSM, image: Tensor) -> _Capture:
    """One forward pass that records the layer's input (for its spatial size) and its mixer's input."""
    from vmamba.ops.fused import forced_scan_backend

    capture = _Capture()

    def on_layer(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        capture.layer_input = args[0]
        tokens = kwargs.get("tokens", args[1] if len(args) > 1 else None)
        capture.extra_tokens = 0 if tokens is None else tokens.shape[1]

    def on_mixer(_module: nn.Module, args: tuple) -> None:
        capture.sequences = args[0].detach()

    handles = [
        layer.register_forward_pre_hook(on_layer, with_kwargs=True),
        layer.mixer.register_forward_pre_hook(on_mixer),
    ]
    # Fused fast paths skip the mixer module: Vim's Mamba blocks (the scan backend) and a mixer's own
    # ``forward_map`` over the whole map (returning None there makes the layer scan, mix and merge itself).
    layer.mixer.forward_map = lambda x, pattern: None
    try:
        with torch.no_grad(), forced_scan_backend("torch"):
            model(image)
    finally:
        del layer.mixer.forward_map
        for handle in handles:
            handle.remove()
    if capture.sequences is None or capture.layer_input is None:
        raise ValueError("the chosen SSM layer did not run its mixer during the forward pass")
    return capture


def _grid_layout(
    model: nn.Module, layer: MultiDirectionSSM, capture: _Capture, image: Tensor
) -> tuple[tuple[int, ...], tuple[int, int], int | None]:
    """``(spatial shape the layer scans, patch grid (Gh, Gw), class-token index in a 1-D stream or None)``."""
    x = capture.layer_input
    spatial = tuple(x.shape[1:-1] if layer.channels_last else x.shape[2:])
    if layer.pattern is ScanPattern.CROSS2D:
        return spatial, (spatial[0], spatial[1]), None
    if layer.pattern is ScanPattern.BI1D:
        # Vim scans its whole token stream (class token in the middle): the grid comes from the patch embed.
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is None or not hasattr(patch_embed, "feat_size"):
            raise ValueError("a bi1d layer needs a model with patch_embed.feat_size to map tokens to the grid")
        grid = tuple(patch_embed.feat_size(image.shape[-2:]))
        cls_index = model.cls_index(spatial[0]) if hasattr(model, "cls_index") else None
        expected = grid[0] * grid[1] + (cls_index is not None)
        if spatial[0] != expected:
            raise ValueError(f"stream of {spatial[0]} tokens does not match the patch grid {grid}")
        return spatial, (grid[0], grid[1]), cls_index
    raise ValueError(f"attention maps cover 2-D images; the layer scans with {layer.pattern.value!r}")


def token_mixing_map(
    model: nn.Module, image: Tensor, token: Sequence[int], layer: int = -1
) -> MixingMap:
    """Mixing weights of ``token`` over the patch grid of SSM layer ``layer``.

    Args:
        model: a VMamba (:class:`backbones.vmamba.VSSM`) or Vim model, or any model built of
            :class:`vmamba.MultiDirectionSSM` layers with ``cross2d`` scans.
        image: one preprocessed image ``(C, H, W)`` or ``(1, C, H, W)``.
        token: ``(row, col)`` on that layer's patch grid.
        layer: index into :func:`ssm_layers` (negative counts from the end).

    Returns:
        A :class:`MixingMap` (float32, on the CPU).

    Raises:
        ValueError: no SSM layer, a layer index or token outside the grid, or a batch of several images.
    """
    layers = ssm_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MultiDirectionSSM layer")
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: the model has {len(layers)} SSM layers")
    index = layer % len(layers)
    ssm = layers[index]
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be (C, H, W) or (1, C, H, W), got {tuple(image.shape)}")
    was_training = model.training
    model.eval()
    try:
        capture = _run_and_capture(model, ssm, image)
        spatial, grid, cls_index = _grid_layout(model, ssm, capture, image)
        row, col = (int(t) for t in token)
        if not (0 <= row < grid[0] and 0 <= col < grid[1]):
            raise ValueError(f"token {(row, col)} is outside layer {index}'s {grid[0]}x{grid[1]} patch grid")
        with torch.no_grad():
            mixing = ssm.mixer.mixing_matrix(capture.sequences)[0].float()  # (K, L', L')
    finally:
        model.train(was_training)

    # Where every sequence position sits: scan an index map exactly as the layer scans its input.
    length = 1
    for s in spatial:
        length *= s
    positions = torch.arange(length, dtype=torch.float32).view(1, *spatial, 1)
    order = cross_scan(positions, ssm.pattern, channels_last=True)  # (1, K, L, 1)
    if capture.extra_tokens:
        order = _insert_middle_tokens(order, torch.full((1, capture.extra_tokens, 1), -1.0))
    cell = row * grid[1] + col
    target = cell + int(cls_index is not None and cell >= cls_index)
    where = (order[0, :, :, 0] == target).float().argmax(-1)  # (K,) the token's position per direction
    rows = mixing[torch.arange(mixing.shape[0]), where]  # (K, L'): what each direction feeds into it
    per_direction = []
    for k in range(rows.shape[0]):
        y = torch.zeros_like(rows)
        y[k] = rows[k]
        y = y.view(1, *rows.shape, 1)
        if capture.extra_tokens:
            y, _ = _take_middle_tokens(y, capture.extra_tokens)
        merged = cross_merge(y, spatial, ssm.pattern, channels_last=True).reshape(-1)  # (L,)
        if cls_index is not None:
            merged = torch.cat([merged[:cls_index], merged[cls_index + 1 :]])
        per_direction.append(merged.view(grid))
    per_direction = torch.stack(per_direction)
    return MixingMap(per_direction.sum(0), per_direction, (row, col), index, ssm.pattern)


def save_overlay(
    image: Tensor, mixing: MixingMap, path: str | Path, alpha: float = 0.55, title: str | None = None
) -> Path:
    """Save the image with the mixing weights on top (upsampled to the image), the token marked, as a PNG.

    Args:
        image: ``(3, H, W)`` RGB in ``[0, 1]`` (or ``(1, H, W)`` grey).
        mixing: from :func:`token_mixing_map`.
        path: where the PNG goes (parent folders are created).
        alpha: opacity of the heat map.
        title: figure title (default: layer and token).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = image.detach().float().cpu().clamp(0, 1)
    height, width = img.shape[-2:]
    grid_h, grid_w = mixing.weights.shape
    heat = mixing.weights / mixing.weights.max().clamp(min=1e-12)
    heat = torch.nn.functional.interpolate(heat[None, None], size=(height, width), mode="nearest")[0, 0]
    fig, ax = plt.subplots(figsize=(5, 5 * height / width))
    ax.imshow(img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy(), cmap="gray")
    ax.imshow(heat.numpy(), cmap="inferno", alpha=alpha, vmin=0, vmax=1)
    row, col = mixing.token
    cell_h, cell_w = height / grid_h, width / grid_w
    ax.add_patch(
        matplotlib.patches.Rectangle(
            (col * cell_w, row * cell_h), cell_w, cell_h, fill=False, edgecolor="cyan", linewidth=2
        )
    )
    ax.set_axis_off()
    ax.set_title(title or f"SSM layer {mixing.layer}, token {mixing.token}, {mixing.pattern.value}")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _load_image(path: str | Path, model: nn.Module) -> tuple[Tensor, Tensor]:
    """``(normalised input (1, C, H, W), display RGB (3, H, W) in [0, 1])`` with the model's eval transform."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    transform = create_transform(**config)
    tensor = transform(Image.open(path).convert("RGB"))
    mean = torch.tensor(config["mean"]).view(-1, 1, 1)
    std = torch.tensor(config["std"]).view(-1, 1, 1)
    return tensor.unsqueeze(0), (tensor * std + mean).clamp(0, 1)


def render_attention_map(
    model: str | nn.Module,
    image: str | Path,
    token: Sequence[int],
    out: str | Path,
    layer: int = -1,
    checkpoint: str | Path | None = None,
    **model_kwargs: Any,
) -> MixingMap:
    """Build the model (a timm name, or a module), load and preprocess the image, save the overlay PNG.

    Args:
        model: a registered model name (``vmamba_t``, ``vim_t``, ``vmamba_t_rwkv7``...) or a built model.
        image: path of an image file.
        token: ``(row, col)`` on the chosen layer's patch grid.
        out: the PNG to write.
        layer: SSM layer index (see :func:`ssm_layers`).
        checkpoint: weights for a named model, loaded through timm's checkpoint filter.
        model_kwargs: passed to ``timm.create_model`` (e.g. ``mixer="gla"``).
    """
    if isinstance(model, str):
        import timm

        import vmamba  # noqa: F401  (registers the model families)

        overlay = {"file": str(checkpoint)} if checkpoint else None
        model = timm.create_model(
            model, pretrained=checkpoint is not None, pretrained_cfg_overlay=overlay, **model_kwargs
        )
    elif checkpoint is not None or model_kwargs:
        raise ValueError("checkpoint and model_kwargs apply to a model given by name only")
    inputs, display = _load_image(image, model)
    mixing = token_mixing_map(model, inputs, token, layer)
    save_overlay(display, mixing, out)
    return mixing


def _parse_kwargs(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--model-kwargs expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value  # a bare string such as mixer=gla
    return kwargs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered model name, e.g. vmamba_t or vim_t")
    parser.add_argument("--image", required=True, type=Path, help="image file")
    parser.add_argument("--token", required=True, type=int, nargs=2, metavar=("ROW", "COL"),
                        help="token on the chosen layer's patch grid")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument("--layer", type=int, default=-1, help="SSM layer index (default: the last)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="weights file for the model")
    parser.add_argument("--mixer", default=None, help="swap the sequence mixer (mamba, mamba2, retnet, gla, rwkv7)")
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more timm.create_model arguments, values as Python literals (e.g. depths=(1,1,1,1))")
    args = parser.parse_args(argv)
    kwargs = _parse_kwargs(parser, args.model_kwargs)
    if args.mixer is not None:
        kwargs["mixer"] = args.mixer
    mixing = render_attention_map(args.model, args.image, args.token, args.out, args.layer, args.checkpoint, **kwargs)
    grid_h, grid_w = mixing.weights.shape
    print(f"wrote {args.out}: layer {mixing.layer}, token {mixing.token} on a {grid_h}x{grid_w} grid")


if __name__ == "__main__":
    main()
