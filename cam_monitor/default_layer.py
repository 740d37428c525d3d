"""The automatic layer choice: the layer an expert would pick for a CAM when none is given.

It runs the model once (an isolated forward and backward of a few probe rows): CNNs get their
last spatial layer that receives a gradient, ViTs the input of the last block's attention,
segmentation models the last features before the classifier. `layers` only looks names up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .batch import Batch
from .capture import Hook, scoped_hooks
from .isolation import isolated
from .layers import as_spatial
from .targets import is_logit_map, is_segmentation, pick_logits
from .types import ForwardFn, OutputTransform

_POOLING = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d,
)  # fmt: skip


def first_spatial_layer(
    module: nn.Module,
    inputs: Any,
    forward: ForwardFn | None,
    output_transform: OutputTransform = None,
) -> str:
    """The layer an expert would pick for a CAM when none is configured (see docs/methods.md).

    One isolated forward and backward of (up to 4 rows of) `inputs`, any nested batch, with
    scoped hooks on every submodule. Of the modules that ran once and have a spatial output
    (`[B, C, h, w]`, channels-last, or tokens on a grid) of more than one cell, it skips pooling
    layers, modules that hand on a pooling layer's output or only view an earlier output,
    containers holding the model's first spatial layer (a whole backbone such as `features`),
    and outputs whose grid gets no gradient from the predicted class score (a ViT's tokens
    after its last attention); it returns the last one to finish. For a segmentation model
    (logits `[B, C, H, W]`) it also skips the classifier: layers whose output is the logits
    (before their upsampling), 1x1 convolutions to the C classes, and dropout or identity
    modules handing their input on, so the choice is the last features before the classifier.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(4, 2))
        >>> batch = {"pixels": torch.zeros(2, 3, 8, 8)}
        >>> first_spatial_layer(net, batch, lambda model, b: model(b["pixels"]))
        '1'
    """
    named = {name: layer for name, layer in module.named_modules() if name}
    runs: dict[str, int] = {}
    order: list[str] = []
    outputs: dict[str, Tensor] = {}
    pooled: dict[int, Tensor] = {}  # kept alive so that ids stay unique

    def make_hook(name: str, layer: nn.Module) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_: nn.Module, args: Any, output: Any) -> None:
            runs[name] = runs.get(name, 0) + 1
            order.append(name)
            if not isinstance(output, Tensor):
                return
            if isinstance(layer, _PASS_ON) and args and output is args[0]:
                return  # dropout in eval mode: the same tensor as the layer before
            if isinstance(layer, _POOLING) or id(output) in pooled:
                pooled[id(output)] = output
                return
            if output._base is not None and any(output._base is t for t in outputs.values()):
                return  # only a view of an earlier output (a permute, a flatten)
            outputs[name] = output

        return hook

    batch = Batch.of(inputs)
    if batch.length:
        batch = batch.slice(0, min(batch.length, 4))
    size = batch.image_size
    hooks: list[Hook] = [(m, "forward", make_hook(n, m)) for n, m in named.items()]
    with scoped_hooks(hooks), isolated(module), torch.enable_grad():
        batch = batch.usable()
        if batch.image is not None and batch.image.is_floating_point():
            # Gradients reach every layer, also in a frozen backbone.
            batch = batch.with_image(batch.image.detach().requires_grad_(True))
        output = module(batch.data) if forward is None else forward(module, batch.data)
        grids: dict[str, Tensor] = {}
        for name in order:
            if runs[name] != 1 or name not in outputs or name in grids:
                continue
            grid = _grid_or_none(name, outputs[name], size, named[name])
            if grid is not None:
                grids[name] = grid
        if not grids:
            raise ValueError(
                f"{type(module).__name__} has no layer with a spatial [B, C, H, W] output; pass "
                "layer= explicitly (with reshape= for token outputs)."
            )
        _drop_classifier(grids, named, output, output_transform)
        if not grids:
            raise ValueError(
                f"{type(module).__name__} has no spatial layer before its segmentation "
                "classifier; pass layer= explicitly."
            )
        stem = next(iter(grids))
        candidates = [n for n in grids if not stem.startswith(n + ".")] or list(grids)
        layers = {n: named[n] for n in candidates}
        reached = _reached_by_gradient(layers, outputs, size, output, output_transform)
    return ([n for n in candidates if n in reached] or candidates)[-1]


#: Modules that, in eval mode, hand their input on unchanged.
_PASS_ON = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


def _drop_classifier(
    grids: dict[str, Tensor],
    named: dict[str, nn.Module],
    output: Any,
    output_transform: OutputTransform,
) -> None:
    """Remove a segmentation model's classifier from `grids`: the layers whose output is the
    logits map (`is_logit_map`) and 1x1 convolutions to the classes (LR-ASPP's two heads)."""
    try:
        logits = pick_logits(output, output_transform)
    except (TypeError, ValueError):
        return
    if not is_segmentation(logits):
        return
    classes = logits.shape[1]
    for name in list(grids):
        layer = named[name]
        to_classes = (
            isinstance(layer, nn.Conv2d)
            and layer.out_channels == classes
            and layer.kernel_size == (1, 1)
        )
        if to_classes or is_logit_map(grids[name], logits):
            del grids[name]


def _grid_or_none(
    name: str, output: Tensor, size: tuple[int, int] | None, layer: nn.Module
) -> Tensor | None:
    """The output's spatial view if it has one of more than one cell, else None."""
    if output.dim() not in (3, 4):
        return None
    try:
        grid = as_spatial(name, output, None, size, layer)
    except ValueError:
        return None
    return grid if grid.shape[-2:].numel() > 1 else None


def _reached_by_gradient(
    layers: dict[str, nn.Module],
    outputs: dict[str, Tensor],
    size: tuple[int, int] | None,
    output: Any,
    output_transform: OutputTransform,
) -> set[str]:
    """The layers whose spatial grid gets a non-zero gradient from the predicted class scores;
    every layer when the output gives no logits or no gradient (the engine will say why)."""
    try:
        logits = pick_logits(output, output_transform)
    except (TypeError, ValueError):
        return set(layers)
    wanted = [n for n in layers if outputs[n].requires_grad]
    if not logits.requires_grad or not wanted:
        return set(layers)
    tensors = list({id(outputs[n]): outputs[n] for n in wanted}.values())
    grads = torch.autograd.grad(logits.float().amax(dim=1).sum(), tensors, allow_unused=True)
    by_id = {id(t): g for t, g in zip(tensors, grads, strict=True)}
    reached = set()
    for name in wanted:
        grad = by_id[id(outputs[name])]
        if grad is not None and bool(as_spatial(name, grad, None, size, layers[name]).any()):
            reached.add(name)
    return reached or set(layers)
