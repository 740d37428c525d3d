"""compute_cams(): one forward and one truncated backward serve every layer, method and target."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .attribution import (
    SMOOTHGRAD_SAMPLES,
    ScoreFn,
    add_rows,
    channel_sum,
    find_image,
    guided_backprop,
    integrated_gradients,
    noise_scale,
    noisy_rows,
    pass_ranges,
    rebuild_inputs,
    resolve_baseline,
    saliency_map,
)
from .capture import capture_outputs
from .isolation import isolated, usable_inputs
from .layers import LayerSpec, Reshape, as_spatial, resolve_layers, unwrap_model
from .methods import (
    GRADIENT_METHODS,
    INPUT_KEY,
    INPUT_METHODS,
    apply_method,
    check_methods,
    class_activation_map,
    normalize_maps,
    upsample_maps,
)

Target = str | int | Tensor | Callable[[Tensor], Tensor]
OutputTransform = int | str | Callable[[Any], Tensor] | None
ForwardFn = Callable[[nn.Module, Any], Any]

# Models already checked for probability outputs: the check costs a host sync, so once each.
_PROBABILITY_CHECKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclass(frozen=True)
class CamResult:
    """Raw maps keyed by `(layer, method)`, float32 `[B, h, w]`, unnormalised.

    CAM methods sit at layer resolution and are non-negative; pixel methods sit at input
    resolution, keyed `("input", method)` (`guided_gradcam`: `(layer, "guided_gradcam")`);
    those in `SIGNED_METHODS` keep their sign. `targets` holds the class index each map
    explains (-1 where a callable returned scores), `logits` the model's detached float32
    logits, `input_size` the probe's `(H, W)`, `extras` per-image numbers such as
    `"integrated_gradients.completeness_gap"` (sum of attributions minus the score difference
    to the baseline) and `"integrated_gradients.score_delta"` (that difference), each `[B]`.
    """

    maps: dict[tuple[str, str], Tensor]
    targets: Tensor
    logits: Tensor
    input_size: tuple[int, int] | None = None
    layers: tuple[str, ...] = field(default=())
    methods: tuple[str, ...] = field(default=())
    extras: dict[str, Tensor] = field(default_factory=dict)

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
        """Per-image min-max normalised map in [0, 1], at `size` (default: the input size)."""
        return normalize_maps(self.upsampled(layer, method, size), eps)


def pick_logits(output: Any, output_transform: OutputTransform) -> Tensor:
    """Apply `output_transform` (a callable, a tuple index or a dict key) and check `[B, C]`."""
    if output_transform is None:
        picked = output
    elif callable(output_transform):
        picked = output_transform(output)
    elif isinstance(output_transform, (int, str)):
        try:
            picked = output[output_transform]
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(
                f"output_transform={output_transform!r} cannot pick from the model output of "
                f"type {type(output).__name__}: {err}. Use an index for a tuple, a key for a dict, "
                "or a callable."
            ) from err
    else:
        raise TypeError(
            "output_transform must be a callable, an int or a str, got "
            f"{type(output_transform).__name__}."
        )
    if not isinstance(picked, Tensor):
        kind = type(picked).__name__
        size = f" of {len(picked)} elements" if isinstance(picked, (tuple, list, dict)) else ""
        raise ValueError(
            f"The model returned a {kind}{size}, not a logits tensor. Pass output_transform= to "
            "pick the class head: an index (output_transform=0 for (class_logits, domain_logits)),"
            " a dict key, or a callable returning logits [B, C]."
        )
    if picked.dim() != 2:
        raise ValueError(
            f"Class logits must have shape [B, C], got {tuple(picked.shape)}. Pass "
            "output_transform= to return [B, C] logits."
        )
    return picked


def _warn_if_probabilities(module: nn.Module, logits: Tensor) -> None:
    """Warn when a model's outputs look like probabilities; checked on its first call only."""
    if module in _PROBABILITY_CHECKED or logits.shape[1] < 2:
        return
    _PROBABILITY_CHECKED.add(module)
    inside = ((logits >= 0) & (logits <= 1)).all()
    sums_to_one = (logits.sum(dim=1) - 1).abs().amax() < 1e-3
    if bool(inside & sums_to_one):
        warnings.warn(
            "The model output looks like probabilities (rows in [0, 1] summing to 1). Gradients "
            "of a saturated softmax vanish and CAMs turn to noise; explain the logits instead "
            "(remove the softmax, or use output_transform= to return pre-softmax scores).",
            stacklevel=3,
        )


def _check_indices(indices: Tensor, num_classes: int) -> None:
    if indices.numel() and bool((indices < 0).any() | (indices >= num_classes).any()):
        bad = indices[(indices < 0) | (indices >= num_classes)][0].item()
        raise ValueError(
            f"Target index {bad} is outside the logits' {num_classes} classes "
            f"(valid: 0..{num_classes - 1}). Check target= or output_transform=."
        )


def resolve_targets(target: Target, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Return `(class indices [B], scores [B])`; indices are -1 where a callable gave scores."""
    batch, num_classes = logits.shape
    if isinstance(target, str):
        if target != "predicted":
            raise ValueError(
                f"target={target!r} is not understood; use 'predicted', an int, a LongTensor[B] "
                "or a callable."
            )
        indices = logits.detach().argmax(dim=1)
    elif isinstance(target, bool):
        raise TypeError("target must be 'predicted', an int, a LongTensor or a callable, got bool.")
    elif isinstance(target, int):
        if not 0 <= target < num_classes:
            raise ValueError(
                f"Target index {target} is outside the logits' {num_classes} classes "
                f"(valid: 0..{num_classes - 1})."
            )
        indices = torch.full((batch,), target, dtype=torch.long, device=logits.device)
    elif isinstance(target, Tensor):
        if target.is_floating_point() or target.dim() > 1:
            raise ValueError(
                f"A target tensor must hold integer class indices of shape [B], got dtype "
                f"{target.dtype} and shape {tuple(target.shape)}."
            )
        indices = target.to(logits.device, torch.long).expand(batch)
        _check_indices(indices, num_classes)
    elif callable(target):
        returned = target(logits)
        if not isinstance(returned, Tensor) or returned.shape != (batch,):
            shape = tuple(returned.shape) if isinstance(returned, Tensor) else type(returned)
            raise ValueError(
                "A target callable must return class indices LongTensor[B] or scores [B] for "
                f"B={batch}, got {shape}."
            )
        if returned.is_floating_point():
            return torch.full((batch,), -1, dtype=torch.long, device=logits.device), returned
        indices = returned.to(torch.long)
        _check_indices(indices, num_classes)
    else:
        raise TypeError(
            "target must be 'predicted', an int, a LongTensor[B] or a callable, got "
            f"{type(target).__name__}."
        )
    return indices, logits.gather(1, indices[:, None])[:, 0]


def batch_length(inputs: Any) -> int | None:
    """Leading dimension of the first tensor found in `inputs` (tensors, tuples, lists, dicts)."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() else None
    items = inputs.values() if isinstance(inputs, Mapping) else inputs
    if isinstance(items, (list, tuple)) or isinstance(inputs, Mapping):
        for item in items:
            found = batch_length(item)
            if found is not None:
                return found
    return None


def image_size(inputs: Any) -> tuple[int, int] | None:
    """`(H, W)` of the first tensor with at least three dimensions in `inputs`."""
    if isinstance(inputs, Tensor):
        return (int(inputs.shape[-2]), int(inputs.shape[-1])) if inputs.dim() >= 3 else None
    items = inputs.values() if isinstance(inputs, Mapping) else inputs
    if isinstance(items, (list, tuple)) or isinstance(inputs, Mapping):
        for item in items:
            found = image_size(item)
            if found is not None:
                return found
    return None


def slice_batch(inputs: Any, start: int, stop: int) -> Any:
    """Rows `start:stop` of every batched tensor inside `inputs`."""
    if isinstance(inputs, Tensor):
        return inputs[start:stop] if inputs.dim() else inputs
    if isinstance(inputs, Mapping):
        return type(inputs)((k, slice_batch(v, start, stop)) for k, v in inputs.items())
    if isinstance(inputs, (list, tuple)):
        items = [slice_batch(item, start, stop) for item in inputs]
        return type(inputs)(*items) if hasattr(inputs, "_fields") else type(inputs)(items)
    return inputs


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
    ig_steps: int = 32,
    ig_baseline: float | Tensor | None = None,
) -> CamResult:
    """CAMs and attributions of `inputs` for every layer and method, batched and side-effect free.

    The gradient CAMs (`gradcam`, `gradcam++`, `xgradcam`, `layercam`, `hirescam`), `cam` and
    `saliency` share one forward and one `torch.autograd.grad` per chunk; `smooth`,
    `smoothgrad`, `integrated_gradients` and `guided_backprop` add batched passes of at most
    `batch_size` rows (unbounded when None). The model runs in eval mode under a forked RNG;
    gradients are taken w.r.t. activations and inputs only, so parameter `.grad` is untouched.

    - `layers`: names, globs or modules; None (or `[]`) when every method is input-level.
    - `smooth=n`: gradient CAMs use the mean of G (and of G^2, G^3 for Smooth Grad-CAM++)
      over `n` noisy copies, with activations of the clean input; `smoothgrad` uses `n` copies
      (16 when `smooth=0`). Noise std is `noise` times each image's value range, drawn from a
      generator seeded with `seed` (the global RNG is not used). `cam` has no gradient to smooth.
    - `cam_head`: the `nn.Linear` fed by global average pooling of the layer (default: the
      model's last `nn.Linear`); `cam` refuses layers that do not feed it that way.
    - `ig_steps`, `ig_baseline`: midpoint Riemann steps and baseline (default zeros, i.e. black
      for images in [0, 1]) of `integrated_gradients`.

    Pixel maps are `[B, H, W]` at input resolution: `saliency` is max over channels of
    |dS/dx| and `smoothgrad` max over channels of its mean over noisy copies (both >= 0);
    `integrated_gradients`, `guided_backprop` and `guided_gradcam` (guided backprop times
    the upsampled Grad-CAM of each layer) are signed sums over channels.

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
    module = unwrap_model(model)
    method_names = check_methods(list(methods) if not isinstance(methods, str) else methods)
    resolved = _resolve_layer_arg(module, layers, method_names)
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")
    _check_options(smooth, noise, seed, ig_steps)
    head = _resolve_head(module, cam_head) if "cam" in method_names else None
    plan = _Plan(
        layers=resolved,
        methods=method_names,
        forward=forward,
        output_transform=output_transform,
        reshape=reshape,
        batch_size=batch_size,
        smooth=smooth,
        noise=float(noise),
        head=head,
        ig_steps=ig_steps,
    )
    total = batch_length(inputs)
    if total == 0:
        raise ValueError("The inputs hold an empty batch; pass at least one sample.")
    if isinstance(target, Tensor) and target.dim() == 1 and total is not None:
        if target.shape[0] != total:
            raise ValueError(
                f"target holds {target.shape[0]} indices for a batch of {total} inputs."
            )
    step = batch_size if (batch_size and total) else (total or 1)
    stops = [*list(range(step, total, step)), total] if total else [None]

    per_map: dict[tuple[str, str], list[Tensor]] = {}
    per_extra: dict[str, list[Tensor]] = {}
    all_targets: list[Tensor] = []
    all_logits: list[Tensor] = []
    with isolated(module):
        inputs = usable_inputs(inputs)
        baseline = None
        if "integrated_gradients" in method_names:
            baseline = resolve_baseline(ig_baseline, find_image(inputs))
        generator: torch.Generator | None = None
        start = 0
        for stop in stops:
            chunk = inputs if stop is None else slice_batch(inputs, start, stop)
            chunk_target = target
            if isinstance(target, Tensor) and target.dim() == 1 and stop is not None:
                chunk_target = target[start:stop]
            if plan.noisy_copies and generator is None:
                device = find_image(chunk, "Noisy copies (smooth=, smoothgrad)").device
                generator = torch.Generator(device=device).manual_seed(seed)
            chunk_baseline = None
            if baseline is not None:
                chunk_baseline = baseline if stop is None else baseline[start:stop]
            indices, logits, maps, extras = _explain_chunk(
                module, chunk, chunk_target, plan, generator, chunk_baseline
            )
            all_targets.append(indices)
            all_logits.append(logits)
            for key, value in maps.items():
                per_map.setdefault(key, []).append(value)
            for key, value in extras.items():
                per_extra.setdefault(key, []).append(value)
            start = stop or 0
    return CamResult(
        maps={key: torch.cat(parts) for key, parts in per_map.items()},
        targets=torch.cat(all_targets),
        logits=torch.cat(all_logits),
        input_size=image_size(inputs),
        layers=tuple(resolved),
        methods=method_names,
        extras={key: torch.cat(parts) for key, parts in per_extra.items()},
    )


def _resolve_layer_arg(
    module: nn.Module, layers: LayerSpec | Sequence[LayerSpec] | None, methods: tuple[str, ...]
) -> dict[str, nn.Module]:
    """Resolve `layers`; None or empty is fine only when every method works at input level."""
    if layers is None or (isinstance(layers, (list, tuple)) and not layers):
        needing = [m for m in methods if m not in INPUT_METHODS]
        if needing:
            raise ValueError(
                f"Method(s) {needing} need at least one layer; pass layers= (a name such as "
                "'features.29', a glob or a module). Only "
                f"{', '.join(sorted(INPUT_METHODS))} work without one."
            )
        return {}
    return dict(resolve_layers(module, layers))


def _check_options(smooth: int, noise: float, seed: int, ig_steps: int) -> None:
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 0:
        raise ValueError(
            f"smooth must be the number of noisy copies (an int >= 0), got {smooth!r}."
        )
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(
            f"noise must be a number >= 0 (std as a fraction of each image's value range), "
            f"got {noise!r}."
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}.")
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"ig_steps must be a positive int, got {ig_steps!r}.")


def _resolve_head(module: nn.Module, cam_head: LayerSpec | None) -> tuple[str, nn.Linear]:
    """The Linear classifier `cam` reads weights from: `cam_head`, else the model's last Linear."""
    if cam_head is None:
        linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                f"method 'cam' needs a global-average-pooling -> nn.Linear classifier, but "
                f"{type(module).__name__} has no nn.Linear. Use 'gradcam' (it equals CAM on "
                "such models and works on any architecture)."
            )
        return linears[-1]
    found = resolve_layers(module, [cam_head])
    if len(found) != 1:
        raise ValueError(
            f"cam_head={cam_head!r} matches {[n for n, _ in found]}; name one nn.Linear."
        )
    name, head = found[0]
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"cam_head={name!r} is a {type(head).__name__}, not an nn.Linear; pass the name of "
            "the linear classifier that reads the globally average-pooled features."
        )
    return name, head


@dataclass(frozen=True)
class _Plan:
    """Everything `_explain_chunk` needs besides the chunk and its target."""

    layers: dict[str, nn.Module]
    methods: tuple[str, ...]
    forward: ForwardFn | None
    output_transform: OutputTransform
    reshape: Reshape | None
    batch_size: int | None
    smooth: int
    noise: float
    head: tuple[str, nn.Linear] | None
    ig_steps: int

    @property
    def gradient_methods(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m in GRADIENT_METHODS)

    @property
    def layer_gradients(self) -> bool:
        """Whether gradients w.r.t. the layers are needed (gradient CAMs, guided Grad-CAM)."""
        return bool(self.layers) and bool(self.gradient_methods or "guided_gradcam" in self.methods)

    @property
    def smooth_layers(self) -> bool:
        return self.smooth > 0 and self.layer_gradients

    @property
    def noisy_copies(self) -> int:
        """Noisy copies per image for smoothed CAMs and SmoothGrad (0: no noisy passes)."""
        if self.smooth_layers or "smoothgrad" in self.methods:
            return self.smooth or SMOOTHGRAD_SAMPLES
        return 0


@dataclass
class _CleanPass:
    """What the clean forward and its one `autograd.grad` produce for one chunk."""

    indices: Tensor
    logits: Tensor
    scores: Tensor
    activations: dict[str, Tensor]
    gradients: dict[str, Tensor]
    input_gradients: Tensor | None
    head_inputs: list[Tensor]


def _explain_chunk(
    module: nn.Module,
    chunk: Any,
    target: Target,
    plan: _Plan,
    generator: torch.Generator | None,
    baseline: Tensor | None,
) -> tuple[Tensor, Tensor, dict[tuple[str, str], Tensor], dict[str, Tensor]]:
    """Every requested map of one probe chunk: the clean pass, then any extra batched passes."""
    clean = _clean_pass(module, chunk, target, plan)
    score_fn = _scorer(module, plan, target, clean.indices)
    layer_grads: dict[str, tuple[Tensor, tuple[Tensor, Tensor] | None]] = {
        name: (grad, None) for name, grad in clean.gradients.items()
    }
    input_maps: dict[str, Tensor] = {}
    extras: dict[str, Tensor] = {}
    if clean.input_gradients is not None:
        input_maps["saliency"] = saliency_map(clean.input_gradients)
    if plan.noisy_copies:
        assert generator is not None
        smoothed, smoothgrad = _noisy_passes(module, chunk, score_fn, plan, clean, generator)
        layer_grads.update(smoothed)
        if smoothgrad is not None:
            input_maps["smoothgrad"] = smoothgrad.amax(dim=1)
    if "integrated_gradients" in plan.methods:
        assert baseline is not None
        image = find_image(chunk)
        attributions, base_scores = integrated_gradients(
            score_fn, chunk, image, baseline, plan.ig_steps, plan.batch_size
        )
        input_maps["integrated_gradients"] = channel_sum(attributions)
        delta = clean.scores - base_scores
        extras["integrated_gradients.score_delta"] = delta
        extras["integrated_gradients.completeness_gap"] = attributions.flatten(1).sum(dim=1) - delta
    guided = None
    if "guided_backprop" in plan.methods or "guided_gradcam" in plan.methods:
        guided = guided_backprop(module, score_fn, chunk, find_image(chunk), plan.batch_size)
        if "guided_backprop" in plan.methods:
            input_maps["guided_backprop"] = channel_sum(guided)

    maps: dict[tuple[str, str], Tensor] = {}
    for name in plan.layers:
        activation = clean.activations[name]
        for method in plan.methods:
            if method in GRADIENT_METHODS:
                grad, moments = layer_grads[name]
                maps[name, method] = apply_method(method, activation, grad, moments)
            elif method == "cam":
                maps[name, method] = _cam_map(name, activation, clean, plan)
            elif method == "guided_gradcam":
                assert guided is not None
                grad, _ = layer_grads[name]
                coarse = apply_method("gradcam", activation, grad)
                fine = upsample_maps(coarse, (guided.shape[-2], guided.shape[-1]))
                maps[name, method] = (guided * fine[:, None]).sum(dim=1)
    for method in plan.methods:
        if method in input_maps:
            maps[INPUT_KEY, method] = input_maps[method]
    return clean.indices, clean.logits, maps, extras


def _clean_pass(module: nn.Module, chunk: Any, target: Target, plan: _Plan) -> _CleanPass:
    """One forward with scoped hooks and at most one `autograd.grad` (layers and/or input)."""
    image = None
    if "saliency" in plan.methods:
        original = find_image(chunk)
        image = original.detach().requires_grad_(True)
        chunk = rebuild_inputs(chunk, original, image, None)
    # Without an input gradient, autograd starts at the first hooked layer: nothing upstream
    # is kept for backward. Should the model itself switch autograd off after that layer, the
    # score has no graph and the forward is run again with the whole graph.
    prune = image is None
    while True:
        head_inputs: list[Tensor] = []
        with (
            capture_outputs(plan.layers, graph_from_first=prune) as recorded,
            _record_inputs(plan.head, head_inputs),
        ):
            output = plan.forward(module, chunk) if plan.forward is not None else module(chunk)
        logits = pick_logits(output, plan.output_transform)
        missing = [name for name in plan.layers if name not in recorded]
        if missing:
            raise ValueError(
                f"Layer(s) {missing} did not run during the forward pass, so they have no CAM. "
                "Pick layers on the path from the input to the class logits."
            )
        indices, scores = resolve_targets(target, logits)
        if not (prune and plan.layer_gradients and not scores.requires_grad):
            break
        prune = False
    _warn_if_probabilities(module, logits)
    names = list(plan.layers)
    spatial = {name: as_spatial(name, recorded[name].detach(), plan.reshape) for name in names}
    if plan.layer_gradients and not scores.requires_grad:
        raise ValueError(
            f"The class score does not depend on the layers {names}; pick layers that feed "
            "the class logits (or check output_transform=)."
        )
    wrt = [recorded[n] for n in names] if plan.layer_gradients and not plan.smooth_layers else []
    if image is not None:
        wrt.append(image)
    grads: tuple[Tensor | None, ...] = ()
    if wrt:
        grads = torch.autograd.grad(scores.sum(), wrt, allow_unused=True)
    gradients: dict[str, Tensor] = {}
    for name, grad in zip(names, grads[: len(wrt) - (image is not None)], strict=False):
        activation = spatial[name]
        gradients[name] = (
            torch.zeros_like(activation) if grad is None else as_spatial(name, grad, plan.reshape)
        )
    input_gradients = None
    if image is not None:
        input_gradients = grads[-1] if grads[-1] is not None else torch.zeros_like(image)
    return _CleanPass(
        indices=indices,
        logits=logits.detach().float(),
        scores=scores.detach().float(),
        activations=spatial,
        gradients=gradients,
        input_gradients=input_gradients,
        head_inputs=head_inputs,
    )


@contextmanager
def _record_inputs(head: tuple[str, nn.Linear] | None, into: list[Tensor]) -> Iterator[None]:
    """Append the first positional input of every call of `head` to `into` (scoped pre-hook)."""
    if head is None:
        yield
        return

    def hook(module: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], Tensor):
            into.append(args[0].detach())

    handle = head[1].register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _scorer(module: nn.Module, plan: _Plan, target: Target, indices: Tensor) -> ScoreFn:
    """Run the model on rows and return, per row, the score of its probe image's class."""

    def score(rows: Any, image_index: Tensor) -> Tensor:
        output = plan.forward(module, rows) if plan.forward is not None else module(rows)
        logits = pick_logits(output, plan.output_transform)
        chosen = indices[image_index]
        if bool((chosen >= 0).all()):
            return logits.gather(1, chosen[:, None])[:, 0]
        assert callable(target)
        scores = target(logits)
        if not isinstance(scores, Tensor) or scores.shape != (logits.shape[0],):
            raise ValueError("A target callable must return scores [B] for every batch it gets.")
        return scores

    return score


def _noisy_passes(
    module: nn.Module,
    chunk: Any,
    score_fn: ScoreFn,
    plan: _Plan,
    clean: _CleanPass,
    generator: torch.Generator,
) -> tuple[dict[str, tuple[Tensor, tuple[Tensor, Tensor] | None]], Tensor | None]:
    """Mean layer gradients (and G^2, G^3 moments) and mean |input gradient| over noisy copies.

    Returns `({layer: (mean G, (mean G^2, mean G^3) or None)}, mean |grad| [B, C, H, W] or None)`.
    Copies of every image are stacked along the batch and run in passes of `batch_size` rows.
    """
    image = find_image(chunk, "Noisy copies (smooth=, smoothgrad)")
    copies = plan.noisy_copies
    layers = plan.layers if plan.smooth_layers else {}
    names = list(layers)
    want_input = "smoothgrad" in plan.methods
    want_moments = "gradcam++" in plan.methods
    powers = 3 if want_moments else 1
    sums = {
        name: [
            torch.zeros(clean.activations[name].shape, device=image.device) for _ in range(powers)
        ]
        for name in names
    }
    input_sum = torch.zeros(image.shape, device=image.device) if want_input else None
    sigma = noise_scale(image, plan.noise)
    for start, stop in pass_ranges(image.shape[0] * copies, plan.batch_size):
        index = torch.arange(start, stop, device=image.device) // copies
        rows = noisy_rows(image, index, sigma, generator)
        if want_input:
            rows.requires_grad_(True)
        with capture_outputs(layers, graph_from_first=not want_input) as recorded:
            scores = score_fn(rebuild_inputs(chunk, image, rows, index), index)
        wrt = [recorded[name] for name in names] + ([rows] if want_input else [])
        grads = torch.autograd.grad(scores.sum(), wrt, allow_unused=True)
        for name, grad in zip(names, grads, strict=False):
            if grad is None:
                continue
            value = as_spatial(name, grad, plan.reshape).float()
            for power, total in enumerate(sums[name], start=1):
                add_rows(total, index, value if power == 1 else value.pow(power))
        if input_sum is not None and grads[-1] is not None:
            add_rows(input_sum, index, grads[-1].float().abs())
    layer_means: dict[str, tuple[Tensor, tuple[Tensor, Tensor] | None]] = {}
    for name, parts in sums.items():
        means = [part / copies for part in parts]
        layer_means[name] = (means[0], (means[1], means[2]) if want_moments else None)
    return layer_means, None if input_sum is None else input_sum / copies


def _cam_map(name: str, activation: Tensor, clean: _CleanPass, plan: _Plan) -> Tensor:
    """Original CAM at `name`, after checking that the layer feeds the head through GAP."""
    assert plan.head is not None
    head_name, head = plan.head
    if len(clean.head_inputs) != 1:
        raise ValueError(
            f"cam_head {head_name!r} ran {len(clean.head_inputs)} times in one forward; 'cam' "
            "needs the linear classifier that produces the logits once. Pass cam_head= "
            "the name of that nn.Linear."
        )
    if head.out_features != clean.logits.shape[1]:
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
    if head_in.shape != pooled.shape or float((head_in - pooled).abs().amax()) > 1e-3 * scale:
        raise ValueError(
            f"'cam' at layer {name!r}: the input of the head {head_name!r} is not the global "
            f"average pool of {name!r}'s output, so CAM is undefined there. Pass layers= the "
            "layer right before the pooling (after its activation function), or use 'gradcam'."
        )
    weights = head.weight.detach()[clean.indices.to(head.weight.device)]
    return class_activation_map(activation, weights)
