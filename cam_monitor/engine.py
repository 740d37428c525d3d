"""compute_cams(): one forward and one truncated backward serve every layer, method and target.

`compute_cams` turns its keywords into `EngineOptions` and calls `compute`, which normalises the
inputs once into a `Batch`; every pass (clean, noisy, integrated gradients, guided backprop,
chunks of `batch_size`) works on that `Batch`.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .attribution import (
    ScoreFn,
    add_rows,
    channel_sum,
    check_finite_baseline,
    completeness_warning,
    deconvnet,
    guided_backprop,
    integrated_gradients,
    noise_scale,
    noisy_rows,
    pass_ranges,
    resolve_baseline,
    saliency_map,
)
from .batch import Batch
from .capture import Hook, capture_outputs, did_not_run, no_gradient
from .isolation import isolated
from .layers import (
    unwrap_model,
)
from .measures import as_measured
from .methods import (
    CAM_METHODS,
    SIGN_SENSITIVE_METHODS,
    apply_method,
    as_float32,
    class_activation_map,
    gradient_maps,
    normalize_maps,
    upsample_maps,
)
from .notices import warn
from .options import EngineOptions, engine_options
from .plan import Plan, plan_for
from .schema import INPUT_LAYER
from .targets import (
    check_engine_target,
    class_scores,
    is_logit_map,
    is_segmentation,
    pick_logits,
    resolve_segment_targets,
    resolve_targets,
    segment_scores,
    target_rows,
    warn_if_probabilities,
)
from .types import ForwardFn, LayerSpec, OutputTransform, Reshape, Target

__all__ = ["CamResult", "ForwardFn", "OutputTransform", "Target", "compute", "compute_cams"]


@dataclass(frozen=True)
class CamResult:
    """Raw maps keyed by `(layer, method)`, float32 `[B, h, w]`, unnormalised.

    CAM methods sit at layer resolution and are non-negative; pixel methods sit at input
    resolution, keyed `("input", method)` (`guided_gradcam`: `(layer, "guided_gradcam")`);
    those in `SIGNED_METHODS` keep their sign. `targets` holds the class index each map
    explains (-1 where a callable returned scores), `logits` the model's detached float32
    logits (for one logit z per image, the two class scores (-z, z)), `input_size` the probe's
    `(H, W)`, `extras` per-image numbers such as `"integrated_gradients.completeness_gap"`
    (sum of attributions minus the score difference to the baseline) and
    `"integrated_gradients.score_delta"` (that difference), each `[B]`.

    For a segmentation model (logits `[B, C, H, W]`), `logits` holds each class's mean logit
    over the image `[B, C]`, `pixel_masks` the pixels each image's score summed its class over
    (float `[B, H, W]` at the logits' size) and `predicted_maps` the argmax class of every
    pixel (`[B, H, W]`); both are None for a classifier.
    """

    maps: dict[tuple[str, str], Tensor]
    targets: Tensor
    logits: Tensor
    input_size: tuple[int, int] | None = None
    layers: tuple[str, ...] = field(default=())
    methods: tuple[str, ...] = field(default=())
    extras: dict[str, Tensor] = field(default_factory=dict)
    pixel_masks: Tensor | None = None
    predicted_maps: Tensor | None = None

    def __getitem__(self, key: tuple[str, str]) -> Tensor:
        if key not in self.maps:
            raise KeyError(f"No map for {key!r}; available: {sorted(self.maps)}")
        return self.maps[key]

    def upsampled(self, layer: str, method: str, size: tuple[int, int] | None = None) -> Tensor:
        """The map of `(layer, method)` resized bilinearly to `size` (default: the input size)."""
        target = size or self.input_size
        if target is None:
            raise ValueError("The input size is unknown here; pass size=(H, W).")
        return upsample_maps(self[layer, method], target)

    def normalized(
        self, layer: str, method: str, size: tuple[int, int] | None = None, eps: float = 1e-7
    ) -> Tensor:
        """Per-image min-max normalised map in [0, 1], at `size` (default: the input size).

        A signed map (`SIGNED_METHODS`) is normalised by its magnitude, as drift and
        localization read it: the strongest pixel of either sign is 1, no attribution about 0.
        """
        return normalize_maps(as_measured(self.upsampled(layer, method, size), method), eps)


def compute_cams(
    model: nn.Module,
    inputs: Any,
    layers: LayerSpec | Sequence[LayerSpec] | None,
    methods: str | Sequence[str] = ("gradcam",),
    target: Target = "predicted",
    forward: ForwardFn | None = None,
    output_transform: OutputTransform = None,
    reshape: Reshape | None = None,
    batch_size: int | None = None,
    *,
    smooth: int = 0,
    noise: float = 0.15,
    seed: int = 0,
    cam_head: LayerSpec | None = None,
    ig_steps: int = 256,
    ig_baseline: float | Tensor | None = None,
) -> CamResult:
    """CAMs and attributions of `inputs` for every layer and method, batched and side-effect free.

    The gradient CAMs (`gradcam`, `gradcam++`, `xgradcam`, `layercam`, `hirescam`), `cam` and
    `saliency` share one forward and one `torch.autograd.grad` per chunk; `smooth`,
    `smoothgrad`, `integrated_gradients`, `guided_backprop` and `deconvnet` add passes of at most
    `batch_size` rows (when None: the probe's rows or 16 images of 224 x 224 pixels, whichever
    is more; see `extra_pass_rows`). The model runs in eval mode under a forked RNG;
    gradients are taken w.r.t. activations and inputs only, so parameter `.grad` is untouched.

    Args:
        model: the network; DDP and ``torch.compile`` wrappers are unwrapped.
        inputs: a Tensor ``[B, C, H, W]``, or a nested batch (tuple, dict, namedtuple) holding
            one, passed whole to the model: give ``forward`` to pick the images out of it. Pixel
            methods differentiate and perturb the float ``[B, C, H, W]`` tensor under a dict's
            image key (`batch.IMAGE_KEYS`), else the first one.
        layers: names from ``model.named_modules()``, globs or modules, or a list of these;
            None (or ``[]``) when every method is input-level. A layer (or, for pixel methods,
            the input) that no gradient reaches raises `NoGradientError` (a `ValueError`).
        methods: one or several of `ALL_METHODS`.
        target: ``"predicted"`` (argmax), a class index, a LongTensor ``[B]`` (e.g. the labels),
            or a callable ``(logits) -> LongTensor[B]`` or ``-> scores[B]``. For segmentation
            logits ``[B, C, H, W]`` a class is explained over the pixels the model assigns to
            it (its logit summed there); ``(class, pixel_mask)`` names the pixels, and
            ``"predicted"`` is each image's most frequent predicted class other than the
            background (class 0); see docs/segmentation.md.
        forward: ``forward(module, inputs)``: how the (unwrapped) model is called on ``inputs``.
        output_transform: picks the class logits from a tuple/dict output: index, key or callable.
        reshape: turns a layer output into ``[B, C, H, W]`` (channels-last and token grids are
            handled without it where the shape is unambiguous).
        batch_size: rows per pass, to bound memory (None: the whole batch at once, and extra
            passes as `extra_pass_rows` says).
        smooth: gradient CAMs use the mean of G (and of G^2, G^3 for Smooth Grad-CAM++) over
            ``smooth`` noisy copies, with activations of the clean input; ``smoothgrad`` uses
            that many copies (16 when 0). ``cam`` has no gradient to smooth.
        noise: noise std of those copies, as a fraction of each image's value range.
        seed: seed of the generator drawing that noise (the global RNG is not used).
        cam_head: for ``cam``: the ``nn.Linear`` fed by global average pooling of the layer
            (default: the model's last ``nn.Linear``); ``cam`` refuses layers that do not feed it.
        ig_steps: midpoint Riemann steps of ``integrated_gradients``.
        ig_baseline: its baseline (default zeros, i.e. black for images in [0, 1]).

    Pixel maps are `[B, H, W]` at input resolution: `saliency` is max over channels of
    |dS/dx| and `smoothgrad` max over channels of its mean over noisy copies (both >= 0);
    `integrated_gradients`, `guided_backprop`, `deconvnet` and `guided_gradcam` (guided backprop
    times the upsampled Grad-CAM of each layer) are signed sums over channels.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(4, 5))
        >>> result = compute_cams(net, torch.randn(2, 3, 16, 16), "0", ["gradcam", "layercam"])
        >>> result["0", "layercam"].shape, result.normalized("0", "gradcam").shape
        (torch.Size([2, 14, 14]), torch.Size([2, 16, 16]))
        >>> pixels = compute_cams(net, torch.randn(2, 3, 16, 16), None, "saliency")
        >>> pixels["input", "saliency"].shape
        torch.Size([2, 16, 16])
    """
    options = engine_options(locals())  # every field is an argument of this name
    return compute(model, inputs, layers, options, ig_baseline=ig_baseline)


def compute(
    model: nn.Module,
    inputs: Any,
    layers: LayerSpec | Sequence[LayerSpec] | None,
    options: EngineOptions,
    *,
    ig_baseline: float | Tensor | None = None,
) -> CamResult:
    """`compute_cams` with its options already built: what the callback's evaluation calls.

    `inputs` is any nested batch (or a `Batch`); it is normalised once here and every pass
    works on that `Batch`. `options.target` must be class indices, 'predicted' or a callable:
    'label' is the callback's to resolve.
    """
    check_engine_target(options.target)
    module = unwrap_model(model)
    plan = plan_for(module, layers, options)
    batch = Batch.of(inputs)
    total = batch.length
    if total == 0:
        raise ValueError("The inputs hold an empty batch; pass at least one sample.")
    target = options.target
    classes = target[0] if isinstance(target, tuple) else target
    if isinstance(classes, Tensor) and classes.dim() == 1 and total is not None:
        if classes.shape[0] != total:
            raise ValueError(
                f"`target` holds {classes.shape[0]} indices for a batch of {total} inputs; pass "
                "one class index per image."
            )
    # One chunk (the whole batch, not a slice of it) unless `batch_size` splits it.
    ranges: list[tuple[int, int] | None] = [None]
    if total and options.batch_size is not None and options.batch_size < total:
        ranges = list(pass_ranges(total, options.batch_size))

    if "integrated_gradients" in options.methods:
        check_finite_baseline(ig_baseline)
    whole = None if len(ranges) == 1 else _Rows(total)
    with isolated(module):
        batch = batch.usable()
        generator: torch.Generator | None = None
        if plan.noisy_copies:
            device = batch.require_image("Noisy copies (smooth=, smoothgrad)").device
            generator = torch.Generator(device=device).manual_seed(options.seed)
        for rows in ranges:
            chunk = batch if rows is None else batch.slice(*rows)
            chunk_target = target if rows is None else target_rows(target, *rows)
            chunk_baseline = None
            if "integrated_gradients" in options.methods:  # the chunk's: not the whole probe's
                given = ig_baseline
                if rows is not None and isinstance(given, Tensor) and given.dim() == 4:
                    given = given[rows[0] : rows[1]] if len(given) == total else given
                chunk_baseline = resolve_baseline(given, chunk.require_image())
            clean, maps, extras = _explain_chunk(
                module, chunk, chunk_target, options, plan, generator, chunk_baseline
            )
            if whole is not None:  # its rows of the probe's outputs, then its tensors go
                whole.add(rows, clean, maps, extras)  # before the next chunk makes its own
                del clean, maps, extras
    if whole is None:
        masks, predicted = clean.pixel_masks, clean.predicted
        indices, logits = clean.indices, clean.logits
    else:
        maps, extras, found = whole.maps, whole.extras, whole.per_image
        indices, logits = found["indices"], found["logits"]
        masks, predicted = found.get("pixel_masks"), found.get("predicted")
    if masks is not None:
        _warn_if_unpredicted(module, indices, masks)
    size = batch.image_size
    seen = _seen(module)
    _warn_if_all_zero(seen, maps, plan)
    _warn_if_one_cell(seen, maps, plan, size, options.methods)
    if extras:
        _warn_if_incomplete(module, extras, options.ig_steps)
    return CamResult(
        maps=maps,
        targets=indices,
        logits=logits,
        input_size=size,
        layers=tuple(plan.layers),
        methods=options.methods,
        extras=extras,
        pixel_masks=masks,
        predicted_maps=predicted,
    )


class _Rows:
    """The outputs of a probe's chunks, each written into one tensor allocated at the first
    chunk. Chunks kept until a final `cat` sit between the next chunks' freed temporaries and
    fragment the host heap (and kept whole, their activations and gradients add up to the
    unchunked peak): resnet18's 48 maps of 512 images at 64 px, 32 at a time, peaked at
    195-199 MiB of RSS with the chunks' maps in lists and one chunk's activations alive beside
    the next's, 114-115 MiB this way (97-107 MiB for 32 images alone)."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.maps: dict[tuple[str, str], Tensor] = {}
        self.extras: dict[str, Tensor] = {}
        self.per_image: dict[str, Tensor] = {}

    def add(
        self,
        rows: tuple[int, int] | None,
        clean: _CleanPass,
        maps: dict[tuple[str, str], Tensor],
        extras: dict[str, Tensor],
    ) -> None:
        """One chunk's outputs as rows `rows` of the probe's."""
        assert rows is not None  # a chunk of several
        per_image = {
            "indices": clean.indices, "logits": clean.logits,
            "pixel_masks": clean.pixel_masks, "predicted": clean.predicted,
        }  # fmt: skip
        tables: tuple[tuple[dict[Any, Tensor], dict[Any, Tensor | None]], ...] = (
            (self.maps, maps), (self.extras, extras), (self.per_image, per_image),
        )  # fmt: skip
        for table, values in tables:
            for key, value in values.items():
                if value is None:
                    continue
                out = table.get(key)
                if out is None:
                    out = table[key] = value.new_empty((self.total, *value.shape[1:]))
                out[rows[0] : rows[1]] = value


# What each model has been checked for (keys such as `("ill-posed", layer, method)`), so a
# check that needs a host sync runs on its first call only, and a warning is given once.
_SEEN: weakref.WeakKeyDictionary[nn.Module, set[tuple[str, ...]]] = weakref.WeakKeyDictionary()


def _seen(module: nn.Module) -> set[tuple[str, ...]]:
    """What `module` has been checked for."""
    seen = _SEEN.get(module)
    if seen is None:
        seen = _SEEN[module] = set()
    return seen


def _first_time(module: nn.Module, key: tuple[str, ...]) -> bool:
    """True the first time `key` is asked about for `module`; records it."""
    seen = _seen(module)
    if key in seen:
        return False
    seen.add(key)
    return True


#: Methods with a map per layer: the CAMs, and guided Grad-CAM (zero where its Grad-CAM is).
_LAYER_MAPS = CAM_METHODS | {"guided_gradcam"}


def _warn_if_all_zero(
    seen: set[tuple[str, ...]], maps: dict[tuple[str, str], Tensor], plan: Plan
) -> None:
    """One warning per layer whose CAMs are exactly zero for every image (a model's first call
    only: `seen` is what it has been checked for)."""
    for name in plan.layers:
        if ("all-zero", name) in seen:
            continue
        seen.add(("all-zero", name))
        zero = [m for (layer, m), v in maps.items() if layer == name and m in _LAYER_MAPS
                and not bool(v.any())]  # fmt: skip
        if zero:
            warn(
                f"The {', '.join(zero)} maps at layer {name!r} are exactly zero for every probe "
                "image: its activations are all zero (dead ReLUs?), no gradient reaches it "
                "(a multiplication by zero, a rounding op or a constant head between the layer "
                "and the logits), or every channel weight is negative. Pick another layer, or "
                "try layercam / hirescam.",
                stacklevel=3,
            )


def _warn_if_incomplete(module: nn.Module, extras: dict[str, Tensor], steps: int) -> None:
    """One warning per model when integrated gradients miss the completeness check on some
    image of the whole probe (every chunk counted)."""
    gap = extras.get("integrated_gradients.completeness_gap")
    if gap is None or ("ig-steps",) in _SEEN.get(module, ()):
        return
    message = completeness_warning(gap, extras["integrated_gradients.score_delta"], steps)
    if message is not None:
        _first_time(module, ("ig-steps",))
        warn(message, stacklevel=4)


def _warn_if_one_cell(
    seen: set[tuple[str, ...]],
    maps: dict[tuple[str, str], Tensor],
    plan: Plan,
    size: tuple[int, int] | None,
    methods: tuple[str, ...],
) -> None:
    """One warning per layer whose maps are a single cell (resnet's layer4 at 32 px)."""
    cam = next((method for method in methods if method in CAM_METHODS), None)
    if cam is None:
        return
    for name in plan.layers:
        shape = maps[name, cam].shape
        if shape[-2] * shape[-1] != 1 or ("one-cell", name) in seen:
            continue
        seen.add(("one-cell", name))
        where = f" for a {size[0]}x{size[1]} input" if size is not None else ""
        warn(
            f"Layer {name!r} gives a 1x1 map{where}: one cell holds no spatial information, so "
            "its CAM is flat and drawn without heat. Pick an earlier layer with a larger grid, "
            "or feed larger images.",
            stacklevel=3,
        )


def _warn_if_ill_posed(module: nn.Module, name: str, activation: Tensor, method: str) -> None:
    """Warn once per layer and method when Grad-CAM++ / XGrad-CAM meet signed activations."""
    if method not in SIGN_SENSITIVE_METHODS or not _first_time(module, ("ill-posed", name, method)):
        return
    share = float((activation < 0).float().mean())
    if share > NEGATIVE_SHARE_LIMIT:
        warn(
            f"{method} at layer {name!r}: {share:.0%} of its activations are negative (a "
            f"BatchNorm, LayerNorm, GELU or Hardswish output?). {method} divides by "
            "per-channel activation sums, which signed activations bring near zero, so its "
            "weights can explode and the map is ill-posed there. Use gradcam, layercam or "
            "hirescam at this layer, or pick a layer after a ReLU.",
            stacklevel=4,
        )


#: Share of negative activations above which Grad-CAM++ and XGrad-CAM warn (post-ReLU: 0).
NEGATIVE_SHARE_LIMIT = 0.01


@dataclass(slots=True)
class _CleanPass:
    """What the clean forward and its one `autograd.grad` produce for one chunk."""

    indices: Tensor
    logits: Tensor
    scores: Tensor
    activations: dict[str, Tensor]
    gradients: dict[str, Tensor]
    input_gradients: Tensor | None
    head_inputs: list[Tensor]
    #: Segmentation only: the pixels each score summed over, and the argmax class map.
    pixel_masks: Tensor | None = None
    predicted: Tensor | None = None
    #: Whether autograd started at the first hooked layer (False: the forward needed it all).
    pruned: bool = True


def _explain_chunk(
    module: nn.Module,
    chunk: Batch,
    target: Target,
    options: EngineOptions,
    plan: Plan,
    generator: torch.Generator | None,
    baseline: Tensor | None,
) -> tuple[_CleanPass, dict[tuple[str, str], Tensor], dict[str, Tensor]]:
    """Every requested map of one probe chunk: the clean pass, then any extra batched passes."""
    clean = _clean_pass(module, chunk, target, options, plan)
    layer_grads: dict[str, tuple[Tensor, tuple[Tensor, Tensor] | None]] = {
        name: (grad, None) for name, grad in clean.gradients.items()
    }
    input_maps: dict[str, Tensor] = {}
    extras: dict[str, Tensor] = {}
    if clean.input_gradients is not None:
        input_maps["saliency"] = saliency_map(clean.input_gradients)
    guided = None
    if plan.extra_passes:
        guided = _extra_passes(
            module, chunk, target, options, plan, generator, baseline, clean, layer_grads,
            input_maps, extras,
        )  # fmt: skip
    maps: dict[tuple[str, str], Tensor] = {}
    gradient_methods = plan.gradient_methods
    for name in plan.layers:
        activation = clean.activations[name]
        for method in gradient_methods:
            _warn_if_ill_posed(module, name, activation, method)
        computed: dict[str, Tensor] = {}
        if gradient_methods:
            grad, moments = layer_grads[name]
            computed = gradient_maps(gradient_methods, activation, grad, moments)
        for method in options.methods:
            if method in computed:
                maps[name, method] = computed[method]
            elif method == "cam":
                maps[name, method] = _cam_map(name, activation, clean, plan)
            elif method == "guided_gradcam":
                assert guided is not None
                grad, _ = layer_grads[name]
                coarse = apply_method("gradcam", activation, grad)
                fine = upsample_maps(coarse, (guided.shape[-2], guided.shape[-1]))
                maps[name, method] = (guided * fine[:, None]).sum(dim=1)
    for method in options.methods:
        if method in input_maps:
            maps[INPUT_LAYER, method] = input_maps[method]
    return clean, maps, extras


def _extra_passes(
    module: nn.Module,
    chunk: Batch,
    target: Target,
    options: EngineOptions,
    plan: Plan,
    generator: torch.Generator | None,
    baseline: Tensor | None,
    clean: _CleanPass,
    layer_grads: dict[str, tuple[Tensor, tuple[Tensor, Tensor] | None]],
    input_maps: dict[str, Tensor],
    extras: dict[str, Tensor],
) -> Tensor | None:
    """The batched passes beyond the clean one (noisy copies, integrated gradients, guided
    backprop, deconvnet), written into `layer_grads`, `input_maps` and `extras`. Returns guided
    backprop's gradients where guided Grad-CAM needs them."""
    guided = None
    rows_per_pass = extra_pass_rows(chunk, options.batch_size)
    score_fn = _scorer(module, options, target, clean.indices, clean.pixel_masks)
    if plan.noisy_copies:
        assert generator is not None
        smoothed, smoothgrad = _noisy_passes(
            chunk, score_fn, options, plan, clean, generator, rows_per_pass
        )
        layer_grads.update(smoothed)
        if smoothgrad is not None:
            input_maps["smoothgrad"] = smoothgrad.amax(dim=1)
    if "integrated_gradients" in options.methods:
        assert baseline is not None
        attributions, base_scores = integrated_gradients(
            score_fn, chunk, baseline, options.ig_steps, rows_per_pass
        )
        input_maps["integrated_gradients"] = channel_sum(attributions)
        delta = clean.scores - base_scores
        extras["integrated_gradients.score_delta"] = delta
        gap = attributions.flatten(1).sum(dim=1) - delta
        extras["integrated_gradients.completeness_gap"] = gap
    if "guided_backprop" in options.methods or "guided_gradcam" in options.methods:
        guided = guided_backprop(module, score_fn, chunk, rows_per_pass)
        if "guided_backprop" in options.methods:
            input_maps["guided_backprop"] = channel_sum(guided)
    if "deconvnet" in options.methods:
        deconv = deconvnet(module, score_fn, chunk, rows_per_pass)
        input_maps["deconvnet"] = channel_sum(deconv)
    return guided


#: Pixels an extra pass (IG steps, noisy copies) holds at most without `batch_size`, unless the
#: probe itself holds more: a 16-image probe at 224 x 224.
EXTRA_PASS_PIXELS = 16 * 224 * 224


def extra_pass_rows(chunk: Batch, batch_size: int | None) -> int | None:
    """Rows per extra pass: `batch_size`, else the chunk's rows or `EXTRA_PASS_PIXELS` worth of
    its images, whichever is more (all of a probe's IG steps in one forward can exhaust memory).

    Example:
        >>> extra_pass_rows(Batch.of(torch.zeros(4, 3, 112, 112)), None)
        64
    """
    if batch_size is not None or chunk.image is None:
        return batch_size
    height, width = chunk.image.shape[-2:]
    return max(int(chunk.image.shape[0]), EXTRA_PASS_PIXELS // max(1, height * width))


def _run(module: nn.Module, options: EngineOptions, rows: Batch) -> Any:
    """The model's output on `rows`, through `options.forward` when given."""
    forward = options.forward
    return forward(module, rows.data) if forward is not None else module(rows.data)


def _clean_pass(
    module: nn.Module, chunk: Batch, target: Target, options: EngineOptions, plan: Plan
) -> _CleanPass:
    """One forward with scoped hooks and at most one `autograd.grad` (layers and/or input)."""
    image = None
    if "saliency" in options.methods:
        image = chunk.require_image().detach().requires_grad_(True)
        chunk = chunk.with_image(image)
    # Without an input gradient, autograd starts at the first hooked layer: nothing upstream
    # is kept for backward. Should the model itself switch autograd off after that layer (the
    # score has no graph), or modify in place a view it took before the layer (which autograd
    # forbids for a view made without grad), the forward is run again with the whole graph.
    prune = image is None
    while True:
        head_inputs: list[Tensor] = []
        also = () if plan.head is None else [_input_recorder(plan.head[1], head_inputs)]
        try:
            with capture_outputs(plan.layers, graph_from_first=prune, also=also) as recorded:
                output = _run(module, options, chunk)
        except RuntimeError as error:
            if not (prune and _NO_GRAD_VIEW in str(error)):
                raise
            prune = False
            continue
        logits = pick_logits(output, options.output_transform)
        if chunk.length is not None and logits.shape[0] != chunk.length:
            raise ValueError(
                f"The logits have {logits.shape[0]} rows for {chunk.length} input images; a "
                "map explains each image's own class score, so the logits need one row per "
                "image ([B, C]). A squeeze() in forward drops the batch axis of a batch of one: "
                "use squeeze(-1) or flatten(1)."
            )
        if len(recorded) != len(plan.layers):
            raise did_not_run([name for name in plan.layers if name not in recorded])
        whole = options.target if isinstance(options.target, Tensor) else None
        masks = None
        if is_segmentation(logits):
            indices, masks, scores = resolve_segment_targets(target, logits, whole)
        else:
            indices, scores = resolve_targets(target, logits, whole)
        if not (prune and plan.layer_gradients and not scores.requires_grad):
            break
        prune = False
    warn_if_probabilities(module, logits)
    names = list(plan.layers)
    table = as_float32(class_scores(logits).detach())
    predicted = None
    if masks is not None:
        predicted = table.argmax(dim=1)
        for name in names:
            _warn_if_logit_map(module, name, recorded[name], logits.detach())
        table = table.mean(dim=(2, 3))
    reshape, size, rows = options.reshape, chunk.image_size, chunk.length
    spatial = {
        name: plan.spatial(name, recorded[name].detach(), reshape, size, rows) for name in names
    }
    if plan.layer_gradients and not scores.requires_grad:
        raise no_gradient(names)
    wrt = [recorded[n] for n in names] if plan.layer_gradients and not plan.smooth_layers else []
    if image is not None:
        wrt.append(image)
    with_input = image is not None
    wrt_names = names[: len(wrt) - with_input] + (["the input"] if with_input else [])
    grads = _gradients(scores, wrt, wrt_names)
    gradients: dict[str, Tensor] = {
        name: plan.spatial(name, grad, reshape, size, rows)
        for name, grad in zip(names, grads[: len(wrt) - with_input], strict=False)
    }
    input_gradients = grads[-1] if image is not None else None
    return _CleanPass(
        indices=indices,
        logits=table,
        scores=as_float32(scores.detach()),
        activations=spatial,
        gradients=gradients,
        input_gradients=input_gradients,
        head_inputs=head_inputs,
        pixel_masks=masks,
        predicted=predicted,
        pruned=prune,
    )


#: Part of autograd's error for an in-place change of a view taken under `no_grad`.
_NO_GRAD_VIEW = "created in no_grad mode"


def _warn_if_unpredicted(module: nn.Module, indices: Tensor, masks: Tensor) -> None:
    """Warn when an explained class has no pixel to be scored over: its score is 0 and its map
    all zero, an absence rather than an explanation. Checked on a model's first call only (a
    host sync), over all its images (every chunk of `batch_size`)."""
    if not _first_time(module, ("empty-segment",)):
        return
    empty = (masks.flatten(1).sum(dim=1) == 0) & (indices >= 0)
    if not bool(empty.any()):
        return
    image = int(empty.nonzero()[0, 0])
    warn(
        f"Class {int(indices[image])} covers no pixel of image {image} (no pixel predicted as it, "
        "or an empty pixel mask): its score there is 0 and its map all zero. Explain a class "
        "the model predicts (target='predicted'), or name the pixels: target=(class, mask).",
        stacklevel=3,
    )


def _warn_if_logit_map(module: nn.Module, name: str, output: Tensor, logits: Tensor) -> None:
    """Warn (once per model and layer) when a layer outputs the segmentation logits themselves
    (before their upsampling): its Grad-CAM is then the class's logit map with its negative
    part cut off, not an explanation from features."""
    if not isinstance(output, Tensor) or not _first_time(module, ("logit-map", name)):
        return
    if not is_logit_map(output, logits):
        return
    warn(
        f"Layer {name!r} outputs the segmentation logits (upsampled, they are the model's "
        "output): its Grad-CAM of a class is that class's logit map cut at zero, not an "
        "explanation. Pick the features before the classifier (layer=None chooses them; for "
        "torchvision's FCN and DeepLabV3 the layer before 'classifier.4', or 'backbone').",
        stacklevel=4,
    )


def _gradients(scores: Tensor, wrt: list[Tensor], names: list[str]) -> list[Tensor]:
    """`autograd.grad` of the summed scores w.r.t. `wrt`; `NoGradientError` naming the layers
    (or "the input") that no gradient reaches, where a map would otherwise be silently zero."""
    if not wrt:
        return []
    try:
        grads = torch.autograd.grad(scores.sum(), wrt, allow_unused=True)
    except RuntimeError as err:
        if "checkpoint" in str(err):
            raise no_gradient(names, reentrant=True) from err
        raise
    if any(grad is None for grad in grads):
        raise no_gradient([name for name, grad in zip(names, grads, strict=True) if grad is None])
    return list(grads)


def _input_recorder(head: nn.Linear, into: list[Tensor]) -> Hook:
    """A pre-hook on `head` appending the first positional input of its every call to `into`."""

    def hook(module: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], Tensor):
            into.append(args[0].detach())

    return head, "forward_pre", hook


def _scorer(
    module: nn.Module,
    options: EngineOptions,
    target: Target,
    indices: Tensor,
    masks: Tensor | None = None,
) -> ScoreFn:
    """Run the model on rows and return, per row, the score of its probe image's class (for
    segmentation: summed over its probe image's pixel mask)."""

    # Indices are -1 only where a callable target returned scores, and then all of them are:
    # only such a callable makes this read the indices back (once, at the first extra pass).
    by_score = functools.cache(lambda: callable(target) and bool((indices < 0).any()))

    def score(rows: Batch, image_index: Tensor) -> Tensor:
        logits = pick_logits(_run(module, options, rows), options.output_transform)
        if not by_score():
            if masks is not None:
                table = class_scores(logits)
                return segment_scores(table, indices[image_index], masks[image_index])
            return class_scores(logits).gather(1, indices[image_index][:, None])[:, 0]
        assert callable(target)
        scores = target(logits)
        if not isinstance(scores, Tensor) or scores.shape != (logits.shape[0],):
            raise ValueError("A target callable must return scores [B] for every batch it gets.")
        return scores

    return score


def _noisy_passes(
    chunk: Batch,
    score_fn: ScoreFn,
    options: EngineOptions,
    plan: Plan,
    clean: _CleanPass,
    generator: torch.Generator,
    rows_per_pass: int | None,
) -> tuple[dict[str, tuple[Tensor, tuple[Tensor, Tensor] | None]], Tensor | None]:
    """Mean layer gradients (and G^2, G^3 moments) and mean |input gradient| over noisy copies.

    Returns `({layer: (mean G, (mean G^2, mean G^3) or None)}, mean |grad| [B, C, H, W] or None)`.
    Copies of every image are stacked along the batch and run in passes of `batch_size` rows.
    """
    image = chunk.require_image("Noisy copies (smooth=, smoothgrad)")
    copies = plan.noisy_copies
    layers = plan.layers if plan.smooth_layers else {}
    names = list(layers)
    want_input = "smoothgrad" in options.methods
    want_moments = "gradcam++" in options.methods
    powers = 3 if want_moments else 1
    sums = {
        name: [
            torch.zeros(clean.activations[name].shape, device=image.device) for _ in range(powers)
        ]
        for name in names
    }
    input_sum = torch.zeros(image.shape, device=image.device) if want_input else None
    sigma = noise_scale(image, options.noise)
    size = chunk.image_size
    for start, stop in pass_ranges(image.shape[0] * copies, rows_per_pass):
        index = torch.arange(start, stop, device=image.device) // copies
        rows = noisy_rows(image, index, sigma, generator)
        if want_input:
            rows.requires_grad_(True)
        with capture_outputs(layers, graph_from_first=clean.pruned and not want_input) as recorded:
            scores = score_fn(chunk.with_image(rows, index), index)
        wrt = [recorded[name] for name in names] + ([rows] if want_input else [])
        grads = _gradients(scores, wrt, names + (["the input"] if want_input else []))
        for name, grad in zip(names, grads, strict=False):
            value = plan.spatial(name, grad, options.reshape, size, stop - start).float()
            for power, total in enumerate(sums[name], start=1):
                add_rows(total, index, value if power == 1 else value.pow(power))
        if input_sum is not None:
            add_rows(input_sum, index, grads[-1].float().abs())
    layer_means: dict[str, tuple[Tensor, tuple[Tensor, Tensor] | None]] = {}
    for name, parts in sums.items():
        means = [part / copies for part in parts]
        layer_means[name] = (means[0], (means[1], means[2]) if want_moments else None)
    return layer_means, None if input_sum is None else input_sum / copies


def _cam_map(name: str, activation: Tensor, clean: _CleanPass, plan: Plan) -> Tensor:
    """Original CAM at `name`, after checking that the layer feeds the head through GAP."""
    assert plan.head is not None
    head_name, head = plan.head
    if len(clean.head_inputs) != 1:
        raise ValueError(
            f"cam_head {head_name!r} ran {len(clean.head_inputs)} times in one forward; 'cam' "
            "needs the linear classifier that produces the logits once. Pass cam_head= "
            "the name of that nn.Linear."
        )
    rows = head.weight.detach()
    if head.out_features == 1:
        rows = class_scores(rows.T).T  # class 0 of one logit z is -z: its row is -w
    if rows.shape[0] != clean.logits.shape[1]:
        raise ValueError(
            f"cam_head {head_name!r} has {head.out_features} outputs but the logits have "
            f"{clean.logits.shape[1]} classes; pass cam_head= the nn.Linear producing the logits."
        )
    if bool((clean.indices < 0).any()):
        raise ValueError(
            "'cam' explains class indices, but target= returned scores; pass class indices "
            "(or 'predicted') as target, or use a gradient method."
        )
    channels = activation.shape[1]
    if channels != head.in_features:
        raise ValueError(
            f"'cam' at layer {name!r}: the head {head_name!r} takes {head.in_features} features "
            f"but the layer has {channels} channels. Pass layers= the layer whose output is "
            f"globally average-pooled into {head_name!r}, or cam_head= the nn.Linear reading "
            f"{name!r}'s pooled {channels} channels."
        )
    pooled = activation.float().mean(dim=(2, 3))
    head_in = clean.head_inputs[0].float()
    head_in = head_in.flatten(1) if head_in.dim() > 1 else head_in
    scale = float(pooled.abs().amax()) + 1e-6
    # A pool rounded to bfloat16 (a bf16 model, bf16 autocast) is off by up to eps/2 of it.
    dtypes = [activation.dtype, clean.head_inputs[0].dtype]
    eps = max(torch.finfo(d).eps if d.is_floating_point else 0.0 for d in dtypes)
    tolerance = max(1e-3, 2 * eps) * scale
    if head_in.shape != pooled.shape or float((head_in - pooled).abs().amax()) > tolerance:
        raise ValueError(
            f"'cam' at layer {name!r}: the input of the head {head_name!r} is not the global "
            f"average pool of {name!r}'s output, so CAM is undefined there. Pass layers= the "
            "layer whose output is pooled straight into the head (after its activation function "
            "or norm), or use 'gradcam'; a norm between the pooling and the head (ConvNeXt's "
            "classifier) leaves no layer for CAM."
        )
    weights = rows[clean.indices.to(rows.device)]
    return class_activation_map(activation, weights)
