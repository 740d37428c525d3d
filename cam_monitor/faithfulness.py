"""Can the maps be trusted? Faithfulness measures and the randomisation sanity check.

`faithfulness` perturbs the probe images by their maps and reads the model's class score back:
Average Drop and Increase in Confidence (Chattopadhay et al. 2018, Grad-CAM++) keep the pixels
a map points at; deletion and insertion (Petsiuk et al. 2018, RISE) remove or restore them in
`steps` intervals, most important first. Every perturbed copy of every image is built on the
model's device and scored in chunks of rows, without gradients, inside `isolated`.

`sanity_check` is the model-randomisation test of Adebayo et al. (2018): the maps recomputed on
a copy of the model whose parameters after the monitored layer are re-initialised, and their
per-image Spearman correlation with the real maps. A map that stays the same when what the model
learned is gone does not explain what it learned.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .attribution import pass_ranges
from .batch import Batch
from .capture import scoped_hooks
from .engine import CamResult, compute, extra_pass_rows
from .isolation import isolated, preserved_rng
from .layers import resolve_layers, unwrap_model
from .measures import as_measured, spearman, summarize
from .methods import INPUT_METHODS, normalize_maps, upsample_maps
from .notices import quiet
from .options import EngineOptions, check_choices, check_int
from .schema import FAITHFULNESS, FAITHFULNESS_MEASURES, INPUT_LAYER, SANITY, MapKey, ScalarKey
from .targets import check_engine_target, class_scores, pick_logits, resolve_targets, target_rows
from .types import ForwardFn, LayerSpec, OutputTransform, Reshape, Target

if TYPE_CHECKING:
    from .options import FaithfulnessOptions

__all__ = ["FAITHFULNESS_MEASURES", "SCORES", "faithfulness", "sanity_check"]

#: What a measure reads from the logits: the target's softmax probability, or its raw logit.
SCORES: tuple[str, ...] = ("softmax", "logits")


def faithfulness(
    model: nn.Module,
    inputs: Any,
    maps: Tensor,
    target: Target = "predicted",
    measures: str | Sequence[str] = FAITHFULNESS_MEASURES,
    steps: int = 20,
    baseline: float | Tensor | None = None,
    scores: str = "softmax",
    forward: ForwardFn | None = None,
    output_transform: OutputTransform = None,
    batch_size: int | None = None,
    *,
    logits: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per image, how much the model's class score depends on the pixels `maps` point at.

    Each map of `maps` (`[B, h, w]`, any resolution) is min-max normalised per image at its own
    resolution, then bilinearly upsampled (``align_corners=False``) to the input size: `m`.
    With `s` the target's score (its softmax probability, or with ``scores="logits"`` its logit):

    - ``"drop"``: Average Drop, ``relu(s(x) - s(m * x)) / s(x)`` (lower is better); NaN where
      ``s(x) <= 0``, which only raw logits can give;
    - ``"increase"``: Increase in Confidence, 1.0 where ``s(m * x) > s(x)``, else 0.0;
    - ``"deletion"`` / ``"insertion"``: the pixels ranked by `m` (highest first, ties in pixel
      order) are replaced by `baseline` (deletion, lower is better) or restored from it onto
      the baseline (insertion, higher is better) in `steps` intervals of ``ceil(H*W / steps)``
      pixels, every channel at once; the area under the score curve by the trapezoid rule over
      the fraction perturbed.

    Cost, in forwards of the probe: 1 for the clean scores (none when `logits` are given), 1
    for drop and increase together,
    ``2 * steps - 1`` for deletion and insertion together (they share the all-baseline input).
    These agree with torchcam 0.5's `ClassificationMetric` and `DeletionInsertionMetric`
    (``logits_fn=softmax``) given the same maps. An image whose map is not finite, or is
    constant (all zero, say: no pixel is ranked above another), gets NaN.

    Args:
        model: the classifier; DDP and ``torch.compile`` wrappers are unwrapped. It runs in eval
            mode under `isolated` and `torch.no_grad`: weights, buffers, modes, RNG and
            ``.grad`` are as they were after the call.
        inputs: a Tensor ``[B, C, H, W]`` or a nested batch holding one (see `compute_cams`);
            the image tensor is perturbed, other batched tensors follow their image.
        maps: ``[B, h, w]``, e.g. ``result[layer, method]`` of a `CamResult`; a signed map is
            ranked by its magnitude (see `measures.as_measured`) only if you pass it so.
        target: the class explained: ``"predicted"`` (argmax of the clean logits), an int, a
            LongTensor ``[B]`` (``result.targets``) or a callable ``(logits) -> LongTensor[B]``.
        measures: any of ``"drop"``, ``"increase"``, ``"deletion"``, ``"insertion"``.
        steps: perturbation intervals of deletion and insertion.
        baseline: what deleted pixels become (default zeros): a number or a tensor broadcasting
            to the images. Drop and increase always mask towards zero (``m * x``).
        scores: ``"softmax"`` or ``"logits"``.
        forward: ``forward(module, inputs)``: how the model is called on (perturbed) inputs.
        output_transform: picks the class logits from a tuple/dict output.
        batch_size: rows per forward (None: the probe at once for the clean and masked inputs,
            and as many perturbed copies as 16 images of 224 x 224 pixels hold).
        logits: the clean logits ``[B, C]`` when known (``result.logits`` of the `CamResult`
            the maps come from): saves the clean forward.

    Returns:
        ``{measure: float32 [B]}`` in the order of `measures`, on the images' device.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
        >>> x = torch.randn(2, 3, 16, 16)
        >>> found = faithfulness(net, x, torch.rand(2, 4, 4), steps=8)
        >>> {name: tuple(value.shape) for name, value in found.items()}
        {'drop': (2,), 'increase': (2,), 'deletion': (2,), 'insertion': (2,)}
    """
    chosen = check_choices("measures", measures, FAITHFULNESS_MEASURES)
    check_int("steps", steps, 1, why="perturbation intervals of deletion and insertion")
    (score_kind,) = check_choices("scores", scores, SCORES)
    check_engine_target(target)
    # The engine's own checks of target, forward, output_transform and batch_size.
    options = EngineOptions(
        target=target, forward=forward, output_transform=output_transform, batch_size=batch_size
    )
    module = unwrap_model(model)
    batch = Batch.of(inputs)
    image = batch.require_image("Faithfulness measures")
    _check_maps(maps, image)
    with isolated(module), torch.no_grad():
        run = _Runner(module, options, score_kind)
        batch = batch.usable()
        image = batch.require_image()
        weights = _weights(maps, image)
        valid = _rankable(maps).to(image.device)
        if logits is None:
            logits = torch.cat([run.logits(batch.slice(*r)) for r in run.ranges(batch)])
        else:
            logits = _check_logits(logits, image)
        whole = target if isinstance(target, Tensor) else None
        indices, _ = resolve_targets(target, logits, whole)
        if callable(target) and bool((indices < 0).any()):
            raise ValueError(
                "Faithfulness measures score the perturbed images by class, but target= "
                "returned scores; pass a callable returning class indices LongTensor[B], "
                "the indices themselves, or 'predicted'."
            )
        clean = run.pick(logits, indices)
        found: dict[str, Tensor] = {}
        if "drop" in chosen or "increase" in chosen:
            masked = batch.with_image(weights[:, None] * image)
            kept = torch.cat([run.scores(masked.slice(*r), indices[r[0] : r[1]])
                              for r in run.ranges(batch)])  # fmt: skip
            drop = torch.relu(clean - kept) / clean
            found["drop"] = torch.where(clean > 0, drop, math.nan)
            found["increase"] = (kept > clean).float()
        if "deletion" in chosen or "insertion" in chosen:
            base = _baseline(baseline, image)
            deletion, insertion = _curves(run, batch, weights, base, indices, clean, steps)
            found["deletion"], found["insertion"] = deletion, insertion
    return {
        name: torch.where(valid, found[name].float(), math.nan).to(image.device) for name in chosen
    }


class _Runner:
    """The model's logits and target scores on rows of a batch, in passes of `batch_size`."""

    def __init__(self, module: nn.Module, options: EngineOptions, score_kind: str) -> None:
        self.module, self.options, self.score_kind = module, options, score_kind

    def ranges(self, batch: Batch) -> list[tuple[int, int]]:
        """The row ranges of the clean and masked passes."""
        return pass_ranges(int(batch.length or 0), self.options.batch_size)

    def logits(self, rows: Batch) -> Tensor:
        forward = self.options.forward
        output = forward(self.module, rows.data) if forward is not None else self.module(rows.data)
        return class_scores(_classification(pick_logits(output, self.options.output_transform)))

    def pick(self, logits: Tensor, indices: Tensor) -> Tensor:
        """Each row's score of its class: a softmax probability or a logit."""
        table = logits.softmax(dim=1) if self.score_kind == "softmax" else logits
        return table.gather(1, indices[:, None])[:, 0]

    def scores(self, rows: Batch, indices: Tensor) -> Tensor:
        return self.pick(self.logits(rows), indices)


def _check_maps(maps: Tensor, image: Tensor) -> None:
    """Refuse maps that are not one `[h, w]` map per image."""
    if not isinstance(maps, Tensor):
        raise TypeError(f"`maps` must be a Tensor [B, h, w], got {type(maps).__name__}.")
    if maps.dim() != 3 or maps.shape[0] != image.shape[0]:
        raise ValueError(
            f"`maps` must hold one [h, w] map per image, [{image.shape[0]}, h, w], got "
            f"{tuple(maps.shape)}. Pass result[layer, method] of the same probe (squeeze a "
            "channel axis of [B, 1, h, w])."
        )


def _classification(logits: Tensor) -> Tensor:
    """Class logits `[B, C]` as float32; per-pixel logits (segmentation) are refused."""
    if logits.dim() == 4:
        raise ValueError(
            f"Faithfulness measures score one class per image, but the model gives per-pixel "
            f"logits {tuple(logits.shape)} (segmentation). Pass output_transform= returning "
            "class logits [B, C] (such as the mean over pixels: lambda out: out.mean(dim=(2, "
            "3))), or leave faithfulness off for this model."
        )
    return logits.float()


def _check_logits(logits: Tensor, image: Tensor) -> Tensor:
    """Given clean logits as the scores read them: float32 `[B, C]` on the images' device."""
    if isinstance(logits, Tensor):
        _classification(logits)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != image.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"`logits` must be the clean logits [{image.shape[0]}, C] of these inputs, got "
            f"{shape}. Pass result.logits of the CamResult the maps come from, or None."
        )
    return class_scores(logits.detach().to(image.device).float())


def _rankable(maps: Tensor) -> Tensor:
    """Per map, whether it is finite and not constant: a constant map points nowhere, and
    scoring it would score a black image (drop, increase) or a raster-order wipe (deletion).

    Example:
        >>> _rankable(torch.stack([torch.eye(2), torch.zeros(2, 2), torch.full((2, 2), 0.7)]))
        tensor([ True, False, False])
    """
    flat = maps.detach().flatten(1)
    return torch.isfinite(flat).all(dim=1) & (flat.amax(dim=1) > flat.amin(dim=1))


def _weights(maps: Tensor, image: Tensor) -> Tensor:
    """Maps min-max normalised at their resolution, upsampled to the image: `[B, H, W]`."""
    flat = normalize_maps(maps.detach().to(image.device).float(), eps=0.0)
    size = (int(image.shape[-2]), int(image.shape[-1]))
    return upsample_maps(flat, size).to(image.dtype)


def _baseline(baseline: float | Tensor | None, image: Tensor) -> Tensor:
    """The deletion baseline as a tensor of the image's shape (default zeros)."""
    if baseline is None:
        return torch.zeros_like(image)
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float, Tensor)):
        raise TypeError(
            f"`baseline` must be None, a number or a tensor, got {type(baseline).__name__}."
        )
    value = torch.as_tensor(baseline, dtype=image.dtype, device=image.device).detach()
    try:
        return value.expand_as(image)
    except RuntimeError as err:
        raise ValueError(
            f"`baseline` of shape {tuple(value.shape)} does not broadcast to the images "
            f"{tuple(image.shape)}; pass a number, [C, 1, 1], [1, C, H, W] or [B, C, H, W]."
        ) from err


def _curves(
    run: _Runner,
    batch: Batch,
    weights: Tensor,
    base: Tensor,
    indices: Tensor,
    clean: Tensor,
    steps: int,
) -> tuple[Tensor, Tensor]:
    """Deletion and insertion areas `[B]`: every perturbed copy of every image stacked along
    the batch and scored in passes of rows, no loop over images."""
    image = batch.require_image()
    count, channels = image.shape[0], image.shape[1]
    pixels = weights.shape[-2] * weights.shape[-1]
    stride = -(-pixels // steps)
    counts = [*range(0, pixels, stride), pixels]
    fractions = torch.tensor(counts, dtype=torch.float32, device=image.device) / pixels
    inner = counts[1:-1]
    # Per image: the all-baseline copy (deletion's last point, insertion's first), then the
    # inner points of deletion, then those of insertion.
    point_counts = torch.tensor([pixels, *inner, *inner], device=image.device)
    restores = torch.tensor([False] * (1 + len(inner)) + [True] * len(inner), device=image.device)
    points = len(point_counts)
    order = weights.flatten(1).float().argsort(dim=1, descending=True, stable=True)
    ranks = order.argsort(dim=1)
    flat_image, flat_base = image.flatten(2), base.flatten(2)
    rows_per_pass = extra_pass_rows(batch, run.options.batch_size)
    found = []
    for start, stop in pass_ranges(count * points, rows_per_pass):
        job = torch.arange(start, stop, device=image.device)
        row, point = job // points, job % points
        perturbed = ranks[row] < point_counts[point][:, None]
        original = perturbed == restores[point][:, None]
        rows = torch.where(original[:, None], flat_image[row], flat_base[row])
        rows = rows.view(-1, channels, *image.shape[2:])
        found.append(run.scores(batch.with_image(rows, row), indices[row]))
    scored = torch.cat(found).view(count, points)
    empty, deleted, restored = (
        scored[:, :1],
        scored[:, 1 : 1 + len(inner)],
        scored[:, 1 + len(inner) :],
    )
    deletion = torch.cat([clean[:, None], deleted, empty], dim=1)
    insertion = torch.cat([empty, restored, clean[:, None]], dim=1)
    return torch.trapezoid(deletion, fractions, dim=1), torch.trapezoid(insertion, fractions, dim=1)


def sanity_check(
    model: nn.Module,
    inputs: Any,
    layers: LayerSpec | Sequence[LayerSpec],
    methods: str | Sequence[str] = ("gradcam",),
    target: Target = "predicted",
    forward: ForwardFn | None = None,
    output_transform: OutputTransform = None,
    reshape: Reshape | None = None,
    batch_size: int | None = None,
    *,
    seed: int = 0,
    real: CamResult | None = None,
) -> dict[tuple[str, str], Tensor]:
    """The model-randomisation test (Adebayo et al. 2018): per `(layer, method)`, each image's
    Spearman correlation between its real map and the map of a randomised copy of the model.

    The copy has every module that runs after the layer, and has a ``reset_parameters``,
    re-initialised, cascading from the head down (deepest layer first: one copy serves every
    layer); it explains the same classes as the real maps (`real.targets`). Maps that depend on
    what the model learned decorrelate (near 0); a value near 1 says the map shows the input
    (its edges), not the model. Pixel methods (guided backprop, saliency, ...) are recomputed
    on the copy randomised after the deepest layer; signed maps are compared by magnitude.
    A constant map has no ranking: its correlation is NaN.

    Cost: a deep copy of the model (its parameters and buffers, once more in memory), one
    forward of one image to learn the order in which modules run, and one `compute_cams` per
    layer on the copy. The global random streams are left as they were (the re-initialisation
    draws from a stream seeded by `seed`).

    Args:
        model, inputs, layers, methods, target, forward, output_transform, reshape,
            batch_size: as in `compute_cams`.
        seed: seed of the re-initialisation.
        real: the real maps of these inputs, when computed already (else computed here).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
        >>> found = sanity_check(net, torch.randn(2, 3, 16, 16), "1")
        >>> list(found), tuple(found["1", "gradcam"].shape)
        ([('1', 'gradcam')], (2,))
    """
    options = EngineOptions(
        methods=methods,
        target=target,
        forward=forward,
        output_transform=output_transform,
        reshape=reshape,
        batch_size=batch_size,
    )
    check_int("seed", seed, 0, why="seed of the re-initialisation")
    return randomization_check(model, inputs, layers, options, real=real, seed=seed)


def randomization_check(
    model: nn.Module,
    inputs: Any,
    layers: LayerSpec | Sequence[LayerSpec],
    options: EngineOptions,
    *,
    real: CamResult | None = None,
    seed: int = 0,
) -> dict[tuple[str, str], Tensor]:
    """`sanity_check` with its options built: what an evaluation calls."""
    check_engine_target(options.target)
    module = unwrap_model(model)
    named = resolve_layers(module, layers)
    if not named:
        raise ValueError("The sanity check needs at least one layer to randomise after.")
    if real is None:
        real = compute(module, inputs, [name for name, _ in named], options)
    if bool((real.targets >= 0).all()):
        # The copy explains the classes the real maps explain, not its own predictions.
        options = _with_target(options, real.targets)
    start, end = _execution_order(module, inputs, options)
    missing = [name for name, layer in named if layer not in end]
    if missing:
        raise ValueError(f"Layer(s) {missing} did not run in the model's forward on the probe.")
    twin = _copy(module)
    twins = dict(zip(module.modules(), twin.modules(), strict=True))
    reset: set[nn.Module] = set()
    randomised: dict[tuple[str, str], Tensor] = {}
    deepest_first = sorted(named, key=lambda pair: end[pair[1]], reverse=True)
    layer_methods = tuple(m for m in options.methods if m not in INPUT_METHODS)
    devices = sorted({p.device.index or 0 for p in twin.parameters() if p.is_cuda})
    with preserved_rng(devices):
        torch.random.default_generator.manual_seed(seed)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        for position, (name, layer) in enumerate(deepest_first):
            after = [m for m in start if start[m] > end[layer] and m not in reset]
            _reinitialise([twins[m] for m in sorted(after, key=start.__getitem__, reverse=True)])
            reset.update(after)
            wanted = options.methods if position == 0 else layer_methods
            if not wanted:
                continue
            stage = EngineOptions(**{**_fields(options), "methods": wanted})
            with quiet():  # the engine's warnings on the randomised copy are no news
                result = compute(twin, inputs, [name], stage)
            randomised.update(result.maps)
    _warn_unreset(module, start, end[deepest_first[-1][1]])
    spans = pass_ranges(int(real.targets.shape[0]), options.batch_size)  # per image: chunked
    checked: dict[tuple[str, str], Tensor] = {}
    for (layer, method), value in randomised.items():
        if (layer, method) in real.maps and (layer == INPUT_LAYER or layer in dict(named)):
            ours = real[layer, method]
            checked[layer, method] = torch.cat([
                spearman(as_measured(ours[a:b], method), as_measured(value[a:b], method))
                for a, b in spans
            ])  # fmt: skip
    return checked


def _fields(options: EngineOptions) -> dict[str, Any]:
    """The fields of `options` as keywords."""
    return {name: getattr(options, name) for name in options.__dataclass_fields__}


def _with_target(options: EngineOptions, target: Tensor) -> EngineOptions:
    return EngineOptions(**{**_fields(options), "target": target})


def _execution_order(
    module: nn.Module, inputs: Any, options: EngineOptions
) -> tuple[dict[nn.Module, int], dict[nn.Module, int]]:
    """When each module first starts and last ends in one forward of the first probe image:
    a counter, read by forward pre-hooks and hooks on every module."""
    start: dict[nn.Module, int] = {}
    end: dict[nn.Module, int] = {}
    clock = iter(range(1 << 62))

    def started(mod: nn.Module, args: Any) -> None:
        start.setdefault(mod, next(clock))

    def ended(mod: nn.Module, args: Any, output: Any) -> None:
        end[mod] = next(clock)

    hooks = [(m, "forward_pre", started) for m in module.modules()]
    hooks += [(m, "forward", ended) for m in module.modules()]
    first = Batch.of(inputs).slice(0, 1)
    with isolated(module), torch.no_grad(), scoped_hooks(hooks):
        forward = options.forward
        _ = forward(module, first.data) if forward is not None else module(first.data)
    return start, end


def _copy(module: nn.Module) -> nn.Module:
    """A deep copy of the model, without its parameters' `.grad`."""
    try:
        twin = copy.deepcopy(module)
    except Exception as err:
        raise ValueError(
            f"The sanity check needs a deep copy of the model, and copy.deepcopy("
            f"{type(module).__name__}) failed: {err}. Make the model deep-copyable (keep locks, "
            "open files and such out of its attributes), or turn the sanity check off."
        ) from err
    for parameter in twin.parameters():
        parameter.grad = None
    return twin


def _reinitialise(modules: Sequence[nn.Module]) -> None:
    """Call each module's `reset_parameters` (under `no_grad`), in the order given."""
    with torch.no_grad():
        for mod in modules:
            reset = getattr(mod, "reset_parameters", None)
            if callable(reset):
                reset()


# Models already warned about parameters the sanity check cannot reset.
_WARNED_UNRESET: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _warn_unreset(module: nn.Module, start: dict[nn.Module, int], after: int) -> None:
    """Warn once about modules after the layer that hold parameters but cannot be reset."""
    if module in _WARNED_UNRESET:
        return
    names = {m: n for n, m in module.named_modules()}
    kept = [
        names[m] or type(m).__name__
        for m in start
        if start[m] > after
        and not callable(getattr(m, "reset_parameters", None))
        and any(p is not None for p in m._parameters.values())
    ]
    if kept:
        _WARNED_UNRESET.add(module)
        warnings.warn(
            f"The sanity check kept the learned parameters of {kept}: they run after the layer "
            "but have no reset_parameters(). Their weights stay, so the randomised maps may "
            "look more like the real ones than they would; give those modules a "
            "reset_parameters().",
            stacklevel=3,
        )


def trust_scores(
    module: nn.Module,
    probe: str,
    inputs: Any,
    result: CamResult,
    layers: Sequence[LayerSpec],
    options: EngineOptions,
    trust: FaithfulnessOptions,
) -> dict[ScalarKey, Tensor]:
    """Per image, every chosen faithfulness measure and the sanity check of each map of one
    probe set's `result`, keyed as logged (`schema.FAITHFULNESS`). Signed maps are measured
    by magnitude; the clean logits and targets are the evaluation's own (no extra forward).
    The measures run on `options.batch_size` images at a time (their perturbed copies, in
    passes of that many rows, are the passes of the whole probe: the values are the same)."""
    found: dict[ScalarKey, Tensor] = {}
    if trust.scores:
        known = bool((result.targets >= 0).all())
        target = result.targets if known else options.target
        batch = Batch.of(inputs)
        spans = pass_ranges(int(result.targets.shape[0]), options.batch_size)
        for (layer, method), maps in result.maps.items():
            parts: dict[str, list[Tensor]] = {}
            for start, stop in spans:
                values = faithfulness(
                    module, batch.slice(start, stop).data, as_measured(maps[start:stop], method),
                    target=target_rows(target, start, stop), measures=trust.scores,
                    forward=options.forward, output_transform=options.output_transform,
                    batch_size=options.batch_size, logits=result.logits[start:stop],
                )  # fmt: skip
                for name, value in values.items():
                    parts.setdefault(name, []).append(value)
            for name, chunks in parts.items():
                key = ScalarKey(FAITHFULNESS, MapKey(probe, layer, method), name)
                found[key] = torch.cat(chunks)
    if trust.sanity and layers:
        checked = randomization_check(module, inputs, list(layers), options, real=result)
        for (layer, method), value in checked.items():
            found[ScalarKey(FAITHFULNESS, MapKey(probe, layer, method), SANITY)] = value
    return found


def summarized(values: Mapping[ScalarKey, Tensor]) -> dict[ScalarKey, float]:
    """Each key's mean over its finite values, and its `excluded` count where some were not
    finite, in one host transfer."""
    if not values:
        return {}
    keys = list(values)
    sizes = [int(values[key].numel()) for key in keys]
    host = torch.cat([values[key].detach().float().flatten().cpu() for key in keys])
    scalars: dict[ScalarKey, float] = {}
    for key, part in zip(keys, host.split(sizes), strict=True):
        mean, excluded = summarize(part)
        scalars[key] = mean
        if excluded:
            scalars[key.excluded] = float(excluded)
    return scalars
