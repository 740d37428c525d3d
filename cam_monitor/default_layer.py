"""The automatic layer choice: the layer an expert would pick for a CAM when none is given.

It runs the model once (an isolated forward and backward of a few probe rows): CNNs get their
last spatial layer that receives a gradient, ViTs the input of the last block's attention
(found from the forward's structure, so a head without gradient yet does not change it),
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
from .layers import POOLING_1D, TokenLayout, as_spatial, token_layout
from .targets import is_logit_map, is_segmentation, pick_logits
from .types import ForwardFn, OutputTransform

_POOLING = (
    *POOLING_1D, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AvgPool3d,
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
    (`[B, C, h, w]`, channels-last, or tokens on a grid) of more than one cell: for a
    segmentation model (logits `[B, C, H, W]`) it first skips the classifier (layers whose
    output is the logits, before their upsampling, 1x1 convolutions to the C classes, and
    dropout or identity modules handing their input on). Then, where an attention module
    (`nn.MultiheadAttention`, or a class named `*Attention*`) gets tokens `[B, N, C]` that such a
    module produced, the producer for the last attention to run (a ViT's last `norm1` / `ln_1`
    / `layernorm_before`); otherwise it skips pooling layers, modules that hand on a pooling
    layer's output or only view an earlier output, containers holding the model's first spatial
    layer (a whole backbone such as `features`), and outputs whose grid gets no gradient from the
    predicted class score; it returns the last one to finish.

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
    # (modules finished when it started, its name, its input tokens) for each attention call
    attended: list[tuple[int, str, Tensor]] = []

    def make_attention_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_: nn.Module, args: Any, kwargs: Any) -> None:
            # The query: the first input, positional (timm, torch) or by keyword (CLIP's
            # `hidden_states=`).
            tokens = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(tokens, Tensor) and tokens.dim() == 3:
                attended.append((len(order), name, tokens))

        return hook

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
    hooks += [
        (m, "forward_pre_kwargs", make_attention_hook(n))
        for n, m in named.items()
        if _is_attention(m)
    ]
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
            layout = token_layout(module, name) if outputs[name].dim() == 3 else None
            grid = _grid_or_none(name, outputs[name], size, named[name], layout, batch.length)
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
        before_attention = _last_attention_input(order, outputs, grids, attended)
        if before_attention is not None:
            return before_attention
        stem = next(iter(grids))
        candidates = [n for n in grids if not stem.startswith(n + ".")] or list(grids)
        layers = {n: named[n] for n in candidates}
        reached = _reached_by_gradient(module, layers, outputs, size, output, output_transform)
    return ([n for n in candidates if n in reached] or candidates)[-1]


def _is_attention(module: nn.Module) -> bool:
    """Whether `module` is an attention layer: torch's, or a class named so (timm's
    `Attention`, Hugging Face's `ViTAttention`, ...) or ending in `Attn` (CaiT's `ClassAttn` and
    `TalkingHeadAttn`).

    Example:
        >>> class ClassAttn(nn.Linear): ...
        >>> _is_attention(ClassAttn(2, 2)), _is_attention(nn.Linear(2, 2))
        (True, False)
    """
    name = type(module).__name__.lower()
    return isinstance(module, nn.MultiheadAttention) or "attention" in name or name.endswith("attn")


def _last_attention_input(
    order: list[str],
    outputs: dict[str, Tensor],
    grids: dict[str, Tensor],
    attended: list[tuple[int, str, Tensor]],
) -> str | None:
    """The module whose output, a grid of tokens, is the input of the last attention call that
    gets one (the last to finish with that very tensor before the call, or with the token
    sequence it slices: timm's attention pooling drops the prefix tokens first); None where
    none does (Swin and MaxViT attend over windows cut from a stage's `[B, h, w, C]` output),
    or where a spatial `[B, C, h, w]` layer runs after that call: the transformer is then a
    backbone before convolutions (a hybrid, a segmentation decoder), chosen as for a CNN."""
    for finished, attention, tokens in reversed(attended):
        after = [n for n in order[finished:] if not n.startswith(attention + ".")]
        if any(name in grids and outputs[name].dim() == 4 for name in after):
            return None
        for name in reversed(order[:finished]):
            output = outputs.get(name)
            if name in grids and output is not None and output.dim() == 3:
                if tokens is output or tokens._base is output:
                    return name
    return None


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
    name: str,
    output: Tensor,
    size: tuple[int, int] | None,
    layer: nn.Module,
    layout: TokenLayout | None,
    rows: int | None,
) -> Tensor | None:
    """The output's spatial view if it has one of more than one cell, else None (also where the
    output is no image: an attention tensor `[B, heads, tokens, dim]`, sequence-first tokens)."""
    if output.dim() not in (3, 4):
        return None
    try:
        grid = as_spatial(name, output, None, size, layer, layout, rows)
    except ValueError:
        return None
    return grid if grid.shape[-2:].numel() > 1 else None


def _reached_by_gradient(
    module: nn.Module,
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
        if grad is None:
            continue
        layout = token_layout(module, name) if grad.dim() == 3 else None
        if bool(as_spatial(name, grad, None, size, layers[name], layout).any()):
            reached.add(name)
    return reached or set(layers)
