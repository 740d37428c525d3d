"""One monitor evaluation without Lightning: CAMs of every probe set, grids and scalars to log."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .engine import CamResult, ForwardFn, OutputTransform, Target, compute_cams
from .isolation import isolated
from .layers import LayerSpec, Reshape
from .probe import ProbeSet
from .render import caption_text, make_overlay_grid


@dataclass(frozen=True)
class CamSettings:
    """What to compute (layers, methods, target) and how to draw it (colormap, alpha, ...)."""

    layers: Sequence[LayerSpec]
    methods: tuple[str, ...]
    target: Target = "predicted"
    forward: ForwardFn | None = None
    output_transform: OutputTransform = None
    reshape: Reshape | None = None
    batch_size: int | None = None
    colormap: str = "jet"
    alpha: float = 0.5
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    class_names: Sequence[str] | None = None
    nrow: int = 8


@dataclass
class EvaluationOutput:
    """Results of one evaluation: raw CAMs per probe, image grids and scalars keyed by tag."""

    results: dict[str, CamResult] = field(default_factory=dict)
    images: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)


def image_tag(probe: str, layer: str, method: str) -> str:
    """The dashboard tag of an overlay grid: `cam/<probe>/<layer>/<method>`."""
    return f"cam/{probe}/{layer}/{method}"


def probe_target(settings: CamSettings, probe: ProbeSet) -> Target:
    """The engine target for one probe: `"label"` becomes the probe's labels."""
    if isinstance(settings.target, str) and settings.target == "label":
        if probe.labels is None:
            raise ValueError(
                f'target="label" needs labels, but probe {probe.name!r} has none; pass an '
                '(inputs, labels) tuple as probe=, or use target="predicted".'
            )
        return probe.labels
    return settings.target


def compute_probe(module: nn.Module, probe: ProbeSet, settings: CamSettings) -> CamResult:
    """Every layer and method for one probe set, in one pass per chunk."""
    return compute_cams(
        module,
        probe.inputs,
        settings.layers,
        settings.methods,
        target=probe_target(settings, probe),
        forward=settings.forward,
        output_transform=settings.output_transform,
        reshape=settings.reshape,
        batch_size=settings.batch_size,
    )


def render_probe(probe: ProbeSet, result: CamResult, settings: CamSettings) -> dict[str, Tensor]:
    """Overlay grids (uint8 CHW on the CPU) for each layer and method of one probe set."""
    predicted = result.logits.argmax(dim=1).tolist()
    true = None if probe.labels is None else probe.labels.tolist()
    names = settings.class_names
    captions = caption_text(predicted, true, names, compact=names is None)
    images = probe.inputs
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"Cannot draw probe {probe.name!r}: inputs are {shape}, not [B, C, H, W].")
    grids = {}
    for layer in result.layers:
        for method in result.methods:
            grids[image_tag(probe.name, layer, method)] = make_overlay_grid(
                images.detach(),
                result[layer, method],
                captions=captions,
                colormap=settings.colormap,
                alpha=settings.alpha,
                mean=settings.mean,
                std=settings.std,
                nrow=settings.nrow,
            )
    return grids


def run_evaluation(
    module: nn.Module, probes: Mapping[str, ProbeSet], settings: CamSettings
) -> EvaluationOutput:
    """Compute and draw every probe set; raises on failure (the caller decides to warn or not)."""
    output = EvaluationOutput()
    for name, probe in probes.items():
        result = compute_probe(module, probe, settings)
        output.results[name] = result
        output.images.update(render_probe(probe, result, settings))
    return output


def first_spatial_layer(module: nn.Module, inputs: Any, forward: ForwardFn | None) -> str:
    """Name of the last module (run once, not a pooling layer) whose output is `[B, C, h, w]`.

    Used when no layer is configured: one isolated no-grad forward with hooks removed after.
    """
    seen: dict[str, int] = {}
    order: list[str] = []
    spatial: set[str] = set()
    pooling = (
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d,
    )  # fmt: skip

    def make_hook(name: str, module_: nn.Module) -> Any:
        def hook(_: nn.Module, __: Any, output: Any) -> None:
            seen[name] = seen.get(name, 0) + 1
            order.append(name)
            if isinstance(output, Tensor) and output.dim() == 4 and output.shape[-2:].numel() > 1:
                if not isinstance(module_, pooling):
                    spatial.add(name)

        return hook

    handles = [m.register_forward_hook(make_hook(n, m)) for n, m in module.named_modules() if n]
    try:
        with isolated(module), torch.no_grad():
            module(inputs) if forward is None else forward(module, inputs)
    finally:
        for handle in handles:
            handle.remove()
    candidates = [n for n in order if n in spatial and seen[n] == 1]
    if not candidates:
        raise ValueError(
            f"{type(module).__name__} has no layer with a spatial [B, C, H, W] output; pass "
            "layer= explicitly (with reshape= for token outputs)."
        )
    return candidates[-1]
