"""One monitor evaluation without Lightning: the CAMs of every probe set and the grids to log.

Grids are keyed by `schema.MapKey` (overlay grids) or by a tag built in `schema` (filter
views); they become strings only in `sinks`. Scoring lives in `drift`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.utils import make_grid

from .attribution import pass_ranges
from .batch import Batch, tensors
from .capture import scoped_hooks
from .channels import filter_activations, one_layer, visualize_filter
from .engine import CamResult, compute
from .faithfulness import summarized, trust_scores
from .layers import unwrap_model
from .measures import segment_measures
from .methods import PIXEL_METHODS, SIGNED_METHODS
from .options import EngineOptions, FaithfulnessOptions, FilterOptions, RenderOptions
from .probe import ProbeSet
from .render import (
    caption_choices,
    choose_captions,
    denormalize,
    display_channels,
    draw_map_grid,
    draw_overlays,
    draw_view_grid,
    drawn_rows,
    predicted_classes,
    segment_caption_choices,
    to_uint8_images,
)
from .schema import MapKey, ScalarKey, filter_channel_tag, filter_maximised_tag, view_method
from .targets import main_class
from .types import LayerSpec

#: An image's key: a `MapKey` for an overlay grid, or a filter-view tag built by `schema`.
ImageKey = MapKey | str
#: A scalar's key: a `ScalarKey`, or a fixed tag such as `schema.SECONDS_TAG`.
ScalarName = ScalarKey | str


@dataclass
class EvaluationOutput:
    """One evaluation: raw CAMs per probe set, grids (uint8 CHW: CAM overlays on the probe's
    device until `encoding` encodes them, the rest on the CPU) and scalars, by key."""

    results: dict[str, CamResult] = field(default_factory=dict)
    images: dict[ImageKey, Tensor] = field(default_factory=dict)
    scalars: dict[ScalarName, float] = field(default_factory=dict)


def probe_options(options: EngineOptions, probe: ProbeSet) -> EngineOptions:
    """The engine options for one probe set: `target="label"` becomes the probe's labels; with
    label maps, each image's `main_class` over the pixels labelled with it."""
    if isinstance(options.target, str) and options.target == "label":
        if probe.label_maps is not None:  # each image's main labelled class, over its pixels
            classes = main_class(probe.label_maps)
            return replace(options, target=(classes, probe.label_maps == classes[:, None, None]))
        if probe.labels is None:
            raise ValueError(
                f'target="label" needs labels, but probe {probe.name!r} has none; pass an '
                "(inputs, labels) tuple as probe=, name the labels' key of dict batches with "
                "label_key= (default: label, labels, target, targets, y), or use "
                'target="predicted".'
            )
        return replace(options, target=probe.labels)
    return options


def compute_probe(
    module: nn.Module, probe: ProbeSet, layers: Sequence[LayerSpec], options: EngineOptions
) -> CamResult:
    """Every layer and method for one probe set, in one pass per chunk."""
    options = probe_options(options, probe)
    return compute(module, probe.inputs, list(layers), options)


def render_probe(
    probe: ProbeSet, result: CamResult, options: RenderOptions
) -> dict[MapKey, Tensor]:
    """Grids (uint8 CHW) for each layer and method of one probe set: of every image up to
    `options.max_tiles`, else of that many evenly spaced (`drawn_rows`). CAM overlays stay on
    the images' device (a GPU encodes them as JPEG there), pixel-level maps come to the CPU."""
    images = probe.image
    if images is None:
        raise ValueError(
            f"Cannot draw probe {probe.name!r}: its inputs ({probe.describe()}) hold no "
            "floating-point or uint8 image tensor [B, C, H, W]; name it with input_key= (dict "
            "batches) or put the images first."
        )
    maps, rows = result.maps, drawn_rows(images.shape[0], options.max_tiles)
    if rows is not None:
        index = torch.tensor(rows, device=images.device)
        images = images[index]
        maps = {key: value[index.to(value.device)] for key, value in maps.items()}
    candidates = probe_captions(probe, result, options.class_names, rows)
    captions = choose_captions(candidates, images.shape[-2], images.shape[-1])
    grids: dict[MapKey, Tensor] = {}
    overlays: dict[MapKey, Tensor] = {}  # drawn together: the images are prepared once
    for (layer, method), drawn in maps.items():
        key = MapKey(probe.name, layer, method)
        if method in SIGNED_METHODS:
            grids.update(view_grids(probe.name, layer, method, drawn, captions, options))
        elif method in PIXEL_METHODS:
            grids[key] = draw_map_grid(drawn, captions, options)
        else:
            grids[key] = overlays[key] = drawn  # a placeholder keeping the key's place
    if overlays:
        grids.update(draw_overlays(images.detach(), overlays, captions, options))
    return grids


def probe_captions(
    probe: ProbeSet,
    result: CamResult,
    names: Sequence[str] | None,
    rows: Sequence[int] | None = None,
) -> list[list[str]]:
    """Caption lists, the widest first, for `choose_captions`, of the images `rows` (None: all;
    `render_probe` reads the drawn ones alone). A classifier's read "ok pred cat / true cat"
    where the tiles are wide enough, else "ok p:cat t:cat" (class numbers are always compact); a
    segmentation model's name the class explained and its IoU on the image where label maps
    exist, else the share of pixels predicted as it ("car IoU 0.72", "car 0.72", then
    "3 0.72")."""
    if result.predicted_maps is not None:
        targets = _rows_of(result.targets, rows)
        label_maps = None if probe.label_maps is None else _rows_of(probe.label_maps, rows)
        measured = segment_measures(_rows_of(result.predicted_maps, rows), targets, label_maps)
        iou = None if measured.iou is None else measured.iou.tolist()
        classes, share = targets.tolist(), measured.share.tolist()
        return segment_caption_choices(classes, iou, share, names)
    true = None if probe.labels is None else _rows_of(probe.labels, rows).tolist()
    return caption_choices(predicted_classes(_rows_of(result.logits, rows)), true, names)


def _rows_of(tensor: Tensor, rows: Sequence[int] | None) -> Tensor:
    """The rows `rows` of `tensor` (None: all of it)."""
    return tensor if rows is None else tensor[torch.tensor(rows, device=tensor.device)]


def view_grids(
    probe: str,
    layer: str,
    method: str,
    maps: Tensor,
    captions: Sequence[str] | None,
    options: RenderOptions,
) -> dict[MapKey, Tensor]:
    """One grid per view of a signed method's maps, keyed by `schema.view_method`."""
    return {
        MapKey(probe, layer, view_method(method, view)): draw_view_grid(
            maps, view, captions, options
        )
        for view in options.views
    }


def filter_grids(
    module: nn.Module,
    probes: Mapping[str, ProbeSet],
    filters: FilterOptions,
    engine: EngineOptions,
    render: RenderOptions,
) -> dict[str, Tensor]:
    """Per filter layer: each channel's activations on every probe, and the channels' optimised
    input images (activation maximisation), as grids tagged `filters/...`."""
    grids: dict[str, Tensor] = {}
    hooks = {"forward": engine.forward, "reshape": engine.reshape}
    for given, channels in filters.channels.items():
        layer, _ = one_layer(unwrap_model(module), given)  # tags use the full name, as CAMs do
        for probe in probes.values():
            acts = drawn_activations(module, probe, layer, channels, engine, render)
            for index, channel in enumerate(channels):
                grids[filter_channel_tag(probe.name, layer, channel)] = draw_map_grid(
                    acts[:, index], None, render
                )
        first = Batch.of(next(iter(probes.values())).inputs)
        size = first.image_size or (64, 64)
        # The optimised inputs are shaped like the probe's images (1 channel for grayscale).
        in_channels = 3 if first.image is None else int(first.image.shape[1])
        images = visualize_filter(
            module, layer, list(channels), steps=filters.steps, size=size,
            in_channels=in_channels, **hooks,
        )  # fmt: skip
        # In the data's colours, like the probe, then scaled per image: they are unbounded.
        tiles = to_uint8_images(denormalize(images.detach().float(), render.mean, render.std))
        grids[filter_maximised_tag(layer)] = make_grid(tiles, nrow=len(channels), padding=2)
    return grids


def drawn_activations(
    module: nn.Module,
    probe: ProbeSet,
    layer: str,
    channels: Sequence[int],
    engine: EngineOptions,
    render: RenderOptions,
) -> Tensor:
    """`filter_activations` of the images the CAM grids draw (`drawn_rows`), in chunks of
    `batch_size`: `[drawn, len(channels), h, w]`."""
    batch = Batch.of(probe.inputs)
    rows = drawn_rows(batch.length or 0, render.max_tiles)
    if rows is not None:
        batch = batch.select(torch.tensor(rows))
    hooks = {"forward": engine.forward, "reshape": engine.reshape}
    if batch.length is None:  # no batched tensor to split
        return filter_activations(module, batch.data, layer, list(channels), **hooks)
    parts = [batch.slice(*span) for span in pass_ranges(batch.length, engine.batch_size)]
    return torch.cat(
        [filter_activations(module, part.data, layer, list(channels), **hooks) for part in parts]
    )


def run_evaluation(
    module: nn.Module,
    probes: Mapping[str, ProbeSet],
    layers: Sequence[LayerSpec],
    engine: EngineOptions,
    render: RenderOptions,
    filters: FilterOptions | None = None,
    check_scores: bool = False,
    trust: FaithfulnessOptions | None = None,
) -> EvaluationOutput:
    """Compute and draw every probe set; raises on failure (the caller decides to warn or not).
    With `check_scores` (the first evaluation), logits that look like embeddings are refused.
    With `trust`, the faithfulness measures and sanity check it names are scored too."""
    output = EvaluationOutput()
    per_image: dict[ScalarKey, Tensor] = {}
    for name, probe in probes.items():
        with class_score_check(module, engine, check_scores) as check:
            result = compute_probe(module, probe, layers, engine)
            check(result, probe.labels, render.class_names)
        names, classes = render.class_names, int(result.logits.shape[-1])
        if check_scores and names is not None and len(names) < classes:
            raise ValueError(
                f"`class_names` has {len(names)} names but the logits have {classes} classes; "
                "give one name per class (a caption names the predicted class, any of them)."
            )
        if check_scores:
            check_labels(probe, result)
        output.results[name] = result
        output.images.update(render_probe(probe, result, render))
        if trust is not None and trust.measures:
            options = probe_options(engine, probe)
            per_image.update(
                trust_scores(module, name, probe.inputs, result, layers, options, trust)
            )
    output.scalars.update(summarized(per_image))
    if filters is not None and filters.channels:
        output.images.update(filter_grids(module, probes, filters, engine, render))
    return output


def check_labels(probe: ProbeSet, result: CamResult) -> None:
    """Refuse a classifier's probe labels that are no class index of its output (`[0, C)` for
    C logits): captions, the history and `cam-monitor show` set them beside the predictions.
    Checked at the baseline, where the logits' width is first known; a segmentation probe's
    label maps (where 255 and -100 mean "no label") are not its `labels` and are left alone."""
    labels = probe.labels
    if labels is None or not labels.numel() or result.predicted_maps is not None:
        return
    classes = int(result.logits.shape[-1])
    outside = ((labels < 0) | (labels >= classes)).nonzero().flatten()
    if not outside.numel():  # read back once, at the baseline
        return
    row = int(outside[0])
    total, bad = labels.numel(), outside.numel()
    count = f" ({bad} of its {total} labels are out of range)" if bad > 1 else ""
    raise ValueError(
        f"Probe {probe.name!r} has label {int(labels[row])} at row {row}{count}, but the model's "
        f"output has {classes} classes (labels 0..{classes - 1}): a probe's labels must be class "
        "indices of the output (captions and the history set them beside the predictions). "
        f"Remap the labels to 0..{classes - 1} (an unlabelled image, -1 or -100, has no place "
        "in the probe), pass the images alone (probe=images) to drop them, name the labels' "
        "key of dict batches with label_key=, or, if the output is not the class scores, fix "
        "output_transform= or forward=."
    )


def raised_by_cam_monitor(err: BaseException) -> bool:
    """Whether cam-monitor raised `err` itself (its own messages name the fix), not the model
    or torch inside it (BatchNorm's "expected 4D input" needs the probe's shape beside it)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    package = Path(__file__).parent
    return tb is not None and package in Path(tb.tb_frame.f_code.co_filename).parents


def explain_first_failure(
    probes: Mapping[str, ProbeSet], err: Exception, doing: str = "compute its first CAMs"
) -> str:
    """Why the first evaluation (or the first call of the model, `doing`), which checks the
    whole configuration, may have failed: the probe shapes and dtypes, and what to check."""
    shapes = ", ".join(f"{n}: {p.describe()}" for n, p in probes.items())
    hint = ""
    if any(t.dtype == torch.uint8 for p in probes.values() for t in tensors(p.inputs)):
        hint = (
            " The probe holds uint8 images and is fed to the model as is: pass float images "
            "prepared like your training batches (e.g. x.float() / 255, then normalised)."
        )
    nested = [p.name for p in probes.values() if not isinstance(p.inputs, Tensor)]
    if nested or (isinstance(err, TypeError) and "positional argument" in str(err)):
        said = f"Probe {nested[0]!r} is a nested batch" if nested else "For more inputs"
        hint += (
            f" {said}: forward= receives it whole (a dict batch with every key, the inputs of "
            "an (inputs, labels) tuple), e.g. forward=lambda module, batch: "
            "module(batch['image'], batch['meta']), or module(*inputs) for a tuple."
        )
    return (
        f"CamMonitor could not {doing} ({type(err).__name__}: {err}). The probe "
        f"({shapes}) must be a batch the model accepts, like a training batch; check probe=, "
        f"input_key=, forward= and output_transform=.{hint}"
    )


@contextmanager
def class_score_check(
    module: nn.Module, options: EngineOptions, enabled: bool = True
) -> Iterator[Callable[..., None]]:
    """Record which Linear layers run inside the block; the `check(result, labels, names)` it
    yields refuses logits that look like embeddings: a Linear layer taking inputs of their width
    did not run (the classifier that `training_step` calls on `forward`'s output). Off with
    `forward=`, and without `enabled` (no hooks at all).

    Such a layer may also be a second head on the class scores (a GAN-like discriminator, an
    auxiliary loss): it is let be where the probe's class `labels` show it (they fit the
    output's width but not that layer's classes) or `names` do (one class name per output
    column, and that layer has another number of classes)."""
    linears: dict[str, nn.Linear] = {}
    if enabled and options.forward is None:
        linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear) and n}
    ran: set[str] = set()

    def check(
        result: CamResult, labels: Tensor | None = None, names: Sequence[str] | None = None
    ) -> None:
        rows, width = result.logits.shape
        heads = [n for n, m in linears.items() if n not in ran and m.in_features == width]
        if heads and labels is not None and labels.numel() and result.predicted_maps is None:
            low, top = int(labels.min()), int(labels.max())  # once, at the baseline
            if 0 <= low and top < width:  # class indices of the output: not of a smaller head
                heads = [n for n in heads if _head_classes(linears[n]) > top]
        if heads and names is not None and len(names) == width:
            heads = [n for n in heads if _head_classes(linears[n]) == width]
        if not heads:
            return
        name, head = heads[0], linears[heads[0]]
        call = f"module.{name}" if name.isidentifier() else f"module.get_submodule({name!r})"
        named = all(_head_classes(linears[n]) != width for n in heads)  # names would settle it
        names_too = " (or class_names= with one name per output column)" if named else ""
        raise ValueError(
            f"The model's output on the probe has shape [{rows}, {width}], and {name!r} (Linear "
            f"{head.in_features} -> {head.out_features}) takes inputs of that width but did not "
            "run in forward(). Either the output is embeddings that "
            f"{name!r} turns into class scores (in training_step?), and the maps would explain "
            "embedding dimensions, not classes: pass forward= to call it, e.g. "
            f"CamMonitor(forward=lambda module, x: {call}(module(x))). Or the output already is "
            f"the class scores and {name!r} is another head (a discriminator or an auxiliary "
            "loss on them): pass forward=lambda module, x: module(x) to explain the output as "
            f"it is{names_too}. A module-level function pickles, for ddp_spawn."
        )

    hooks = [(m, "forward", lambda *_, name=n: ran.add(name)) for n, m in linears.items()]
    with scoped_hooks(hooks):  # type: ignore[arg-type]
        yield check


def _head_classes(head: nn.Linear) -> int:
    """The classes a Linear head scores: its outputs, two for one logit (a binary classifier)."""
    return max(head.out_features, 2)


def display_warning(probe: ProbeSet) -> str | None:
    """What the grids of a probe whose images have other than 1 or 3 channels show (RGBA,
    2-channel, multispectral: `display_channels`), said once; None for 1 or 3 channels."""
    image = probe.image
    if image is None or image.shape[1] in (1, 3) or image.shape[-1] in (1, 3):
        return None  # channels-last [B, H, W, 1|3] is refused with its own fix when drawn
    channels = int(image.shape[1])
    shown = display_channels(channels)
    what = "channel 0 as grey" if len(shown) == 1 else "channels 0, 1 and 2 as RGB"
    return (
        f"CamMonitor: probe {probe.name!r} has {channels}-channel images (shape "
        f"{tuple(image.shape)}); the CAMs use them whole, and the overlays draw {what}. To draw "
        "a view of your own, read the maps from the history (cam_monitor.history.read_history) "
        "and draw them with cam_monitor.render.make_overlay_grid over [B, 1 or 3, H, W] images."
    )


def normalisation_warning(probe: ProbeSet, options: RenderOptions) -> str | None:
    """Why `mean`/`std` cannot be the probe's normalisation, if they cannot: undoing them puts
    most pixels outside [0, 1] (0-255 values?), or the probe has no negative value at all
    (un-normalised [0, 1] images, which undoing them would wash out). None when they fit."""
    image = Batch.of(probe.inputs).image
    if options.mean is None or options.std is None or image is None:
        return None
    if not image.is_floating_point():  # uint8 pixels are drawn as they are, mean/std unused
        return None
    if image.shape[1] != len(options.mean) or len(options.mean) != len(options.std):
        return None  # drawing reports the mismatch
    x = image.detach().float()
    mean = torch.tensor(options.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(options.std, device=x.device).view(1, -1, 1, 1)
    shown = x * std + mean
    outside, lowest = (((shown < -0.05) | (shown > 1.05)).float().mean(), x.min())
    outside, lowest = float(outside), float(lowest)  # once per probe, at the start of fit
    where = f"CamMonitor: probe {probe.name!r} with `mean`/`std`"
    if outside > 0.2:
        return (
            f"{where} = {options.mean}/{options.std}: {outside:.0%} of its pixels fall outside "
            "[0, 1] once the normalisation is undone (values 0-255?), so the overlays would be "
            "clipped to white and black. Pass the probe prepared like a training batch, or the "
            "mean and std it was normalised with."
        )
    if lowest >= 0 and any(m > 0 for m in options.mean):
        return (
            f"{where} = {options.mean}/{options.std}: the probe has no negative value, so it "
            "does not look normalised with them (values in [0, 1]?); undoing them would wash "
            "the overlays out. Drop mean=/std= for an un-normalised probe, or pass it "
            "normalised like a training batch."
        )
    return None
