"""One monitor evaluation without Lightning: CAMs of every probe set, grids and scalars to log."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.utils import make_grid

from .batch import Batch
from .drift import MEASURES, drift, energy_inside, entropy, mask_iou, pointing_game, summarize
from .engine import CamResult, ForwardFn, OutputTransform, Target, compute_cams
from .filters import filter_activations, visualize_filter
from .isolation import isolated
from .layers import LayerSpec, Reshape
from .methods import PIXEL_METHODS, SIGNED_METHODS
from .probe import ProbeSet
from .render import (
    caption_text,
    choose_captions,
    make_map_grid,
    make_overlay_grid,
    to_uint8_images,
)


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
    smooth: int = 0
    noise: float = 0.15
    cam_head: str | None = None
    ig_steps: int = 32
    filters: Mapping[str, Sequence[int]] = field(default_factory=dict)
    filter_steps: int = 64


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
        smooth=settings.smooth,
        noise=settings.noise,
        cam_head=settings.cam_head,
        ig_steps=settings.ig_steps,
    )


def render_probe(probe: ProbeSet, result: CamResult, settings: CamSettings) -> dict[str, Tensor]:
    """Overlay grids (uint8 CHW on the CPU) for each layer and method of one probe set."""
    predicted = result.logits.argmax(dim=1).tolist()
    true = None if probe.labels is None else probe.labels.tolist()
    names = settings.class_names
    images = probe.inputs
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"Cannot draw probe {probe.name!r}: inputs are {shape}, not [B, C, H, W].")
    # Class names read "ok pred cat / true cat" where the tiles are wide enough, else "ok p:cat
    # t:cat"; class numbers are always compact.
    options = [caption_text(predicted, true, names, compact=True)]
    if names is not None:
        options.insert(0, caption_text(predicted, true, names))
    captions = choose_captions(options, images.shape[-2], images.shape[-1])
    grids = {}
    for (layer, method), maps in result.maps.items():
        tag = image_tag(probe.name, layer, method)
        if method in PIXEL_METHODS:
            grids[tag] = make_map_grid(
                maps, signed=method in SIGNED_METHODS, captions=captions, nrow=settings.nrow
            )
        else:
            grids[tag] = make_overlay_grid(
                images.detach(),
                maps,
                captions=captions,
                colormap=settings.colormap,
                alpha=settings.alpha,
                mean=settings.mean,
                std=settings.std,
                nrow=settings.nrow,
            )
    return grids


def filter_grids(
    module: nn.Module, probes: Mapping[str, ProbeSet], settings: CamSettings
) -> dict[str, Tensor]:
    """Per filter layer: each channel's activations on every probe, and the channels' optimised
    input images (activation maximisation), as grids tagged `filters/...`."""
    grids: dict[str, Tensor] = {}
    for layer, channels in settings.filters.items():
        for probe in probes.values():
            acts = filter_activations(
                module, probe.inputs, layer, list(channels), forward=settings.forward,
                reshape=settings.reshape,
            )  # fmt: skip
            for index, channel in enumerate(channels):
                grids[f"filters/{probe.name}/{layer}/channel_{channel}"] = make_map_grid(
                    acts[:, index], signed=False, nrow=settings.nrow
                )
        images = visualize_filter(
            module, layer, list(channels), steps=settings.filter_steps,
            size=Batch.of(next(iter(probes.values())).inputs).image_size or (64, 64),
            forward=settings.forward, reshape=settings.reshape,
        )  # fmt: skip
        tiles = to_uint8_images(images.detach())
        grids[f"filters/{layer}/maximised"] = make_grid(tiles, nrow=len(channels), padding=2)
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
    if settings.filters:
        output.images.update(filter_grids(module, probes, settings))
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


LOCALIZATION_SCORES = ("energy", "pointing", "mask_iou")
_NON_FINITE = "__non_finite_maps__"


class AttentionTracker:
    """Remembers the reference and previous maps per (probe, layer, method) and scores new ones.

    Drift is a distance per measure (1 - correlation, 1 - IoU, JS, centre-of-mass shift) against
    the previous evaluation (`_prev`) and the reference (`_ref`, by default the first evaluation).
    Per-image values are gathered on the device and moved to the host in one transfer.
    """

    def __init__(
        self, measures: Sequence[str] = MEASURES, topk: float = 0.2, tolerance: int = 0
    ) -> None:
        unknown = [m for m in measures if m not in MEASURES]
        if unknown or not measures:
            raise ValueError(
                f"Unknown drift measure(s) {unknown}; choose from {', '.join(MEASURES)}."
            )
        if not 0 < topk <= 1:
            raise ValueError(f"`topk` is a fraction of pixels in (0, 1], got {topk!r}.")
        self.measures = tuple(measures)
        self.topk = topk
        self.tolerance = tolerance
        self.reference: dict[tuple[str, str, str], Tensor] = {}
        self.previous: dict[tuple[str, str, str], Tensor] = {}

    def score(
        self, results: Mapping[str, CamResult], probes: Mapping[str, ProbeSet]
    ) -> tuple[dict[str, float], int]:
        """Drift, localization and entropy scalars; also the number of non-finite maps seen."""
        per_image: dict[str, Tensor] = {}
        non_finite: list[Tensor] = []
        for probe_name, result in results.items():
            masks = probes[probe_name].masks
            for (layer, method), raw in result.maps.items():
                maps = raw.abs() if method in SIGNED_METHODS else raw  # measures need mass >= 0
                key = (probe_name, layer, method)
                base = f"{probe_name}/{layer}/{method}"
                non_finite.append((~torch.isfinite(maps)).flatten(1).any(1))
                for suffix, other in (
                    ("prev", self.previous.get(key)),
                    ("ref", self.reference.get(key)),
                ):
                    if other is None or other.shape != maps.shape:
                        continue
                    for measure in self.measures:
                        values = drift(other.to(maps.device), maps, measure, k=self.topk)
                        per_image[f"cam_drift/{base}/{measure}_{suffix}"] = values
                per_image[f"cam_stats/{base}/entropy"] = entropy(maps)
                if masks is not None:
                    per_image[f"cam_loc/{base}/energy"] = energy_inside(maps, masks)
                    per_image[f"cam_loc/{base}/pointing"] = pointing_game(
                        maps, masks, self.tolerance
                    )
                    per_image[f"cam_loc/{base}/mask_iou"] = mask_iou(maps, masks, self.topk)
                self.previous[key] = maps
                self.reference.setdefault(key, maps)
        if non_finite:  # one value, riding along in the single host transfer of _summaries
            per_image[_NON_FINITE] = torch.cat(non_finite).sum(dim=0, keepdim=True).float()
        scalars = _summaries(per_image)
        return scalars, round(scalars.pop(_NON_FINITE, 0.0))

    def state_dict(self) -> dict[str, Any]:
        """Reference and previous maps on the CPU, keyed by 'probe/layer/method'."""
        return {
            "reference": {"/".join(k): v.cpu() for k, v in self.reference.items()},
            "previous": {"/".join(k): v.cpu() for k, v in self.previous.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        def keyed(maps: Mapping[str, Tensor]) -> dict[tuple[str, str, str], Tensor]:
            out = {}
            for name, value in maps.items():
                probe, rest = name.split("/", 1)
                layer, method = rest.rsplit("/", 1)
                out[probe, layer, method] = value
            return out

        self.reference = keyed(state.get("reference", {}))
        self.previous = keyed(state.get("previous", {}))


def _summaries(per_image: Mapping[str, Tensor]) -> dict[str, float]:
    """Mean over finite values per tag, plus `excluded_*` counts where some were not finite."""
    if not per_image:
        return {}
    sizes = [v.numel() for v in per_image.values()]
    flat = torch.cat([v.detach().float().flatten() for v in per_image.values()]).cpu()
    scalars: dict[str, float] = {}
    for (tag, _), chunk in zip(per_image.items(), flat.split(sizes), strict=True):
        mean, excluded = summarize(chunk)
        scalars[tag] = mean
        if excluded:
            scalars[f"{tag}_excluded"] = float(excluded)
    return scalars
