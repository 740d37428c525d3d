"""compute_cams(): one forward and one truncated backward serve every layer, method and target."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .capture import capture_outputs
from .isolation import isolated, usable_inputs
from .layers import LayerSpec, Reshape, as_spatial, resolve_layers, unwrap_model
from .methods import apply_method, check_methods, normalize_maps, upsample_maps

Target = str | int | Tensor | Callable[[Tensor], Tensor]
OutputTransform = int | str | Callable[[Any], Tensor] | None
ForwardFn = Callable[[nn.Module, Any], Any]

_PROBABILITY_WARNED = False


@dataclass(frozen=True)
class CamResult:
    """Raw CAMs keyed by `(layer, method)`, float32 `[B, h, w]`, non-negative and unnormalised.

    `targets` holds the class index each map explains (-1 where a callable returned scores),
    `logits` the model's detached float32 logits, `input_size` the probe's `(H, W)`.
    """

    maps: dict[tuple[str, str], Tensor]
    targets: Tensor
    logits: Tensor
    input_size: tuple[int, int] | None = None
    layers: tuple[str, ...] = field(default=())
    methods: tuple[str, ...] = field(default=())

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


def _warn_if_probabilities(logits: Tensor) -> None:
    global _PROBABILITY_WARNED
    if _PROBABILITY_WARNED or logits.shape[1] < 2:
        return
    inside = ((logits >= 0) & (logits <= 1)).all()
    sums_to_one = (logits.sum(dim=1) - 1).abs().amax() < 1e-3
    if bool(inside & sums_to_one):
        _PROBABILITY_WARNED = True
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
    layers: LayerSpec | Sequence[LayerSpec],
    methods: str | Sequence[str] = ("gradcam",),
    target: Target = "predicted",
    forward: ForwardFn | None = None,
    output_transform: OutputTransform = None,
    reshape: Reshape | None = None,
    batch_size: int | None = None,
) -> CamResult:
    """CAMs of `inputs` at every layer and method from one forward and one backward per chunk.

    The model runs in eval mode under a forked RNG; gradients come from
    `torch.autograd.grad(score, activations)`, so parameter `.grad` is never read or written.
    `batch_size` splits a large probe into chunks to bound memory.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(4, 5))
        >>> result = compute_cams(net, torch.randn(2, 3, 16, 16), "0", ["gradcam", "layercam"])
        >>> result["0", "layercam"].shape, result.normalized("0", "gradcam").shape
        (torch.Size([2, 14, 14]), torch.Size([2, 16, 16]))
    """
    module = unwrap_model(model)
    resolved = dict(resolve_layers(module, layers))
    method_names = check_methods(list(methods) if not isinstance(methods, str) else methods)
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")
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

    per_map: dict[tuple[str, str], list[Tensor]] = {
        (n, m): [] for n in resolved for m in method_names
    }
    all_targets: list[Tensor] = []
    all_logits: list[Tensor] = []
    with isolated(module):
        inputs = usable_inputs(inputs)
        start = 0
        for stop in stops:
            chunk = inputs if stop is None else slice_batch(inputs, start, stop)
            chunk_target = target
            if isinstance(target, Tensor) and target.dim() == 1 and stop is not None:
                chunk_target = target[start:stop]
            indices, logits, maps = _one_pass(
                module,
                chunk,
                resolved,
                method_names,
                chunk_target,
                forward,
                output_transform,
                reshape,
            )
            all_targets.append(indices)
            all_logits.append(logits)
            for key, value in maps.items():
                per_map[key].append(value)
            start = stop or 0
    return CamResult(
        maps={key: torch.cat(parts) for key, parts in per_map.items()},
        targets=torch.cat(all_targets),
        logits=torch.cat(all_logits),
        input_size=image_size(inputs),
        layers=tuple(resolved),
        methods=method_names,
    )


def _one_pass(
    module: nn.Module,
    chunk: Any,
    layers: dict[str, nn.Module],
    methods: tuple[str, ...],
    target: Target,
    forward: ForwardFn | None,
    output_transform: OutputTransform,
    reshape: Reshape | None,
) -> tuple[Tensor, Tensor, dict[tuple[str, str], Tensor]]:
    """One forward with scoped hooks, one `autograd.grad`, every method on the same A and G."""
    with capture_outputs(layers) as recorded:
        output = forward(module, chunk) if forward is not None else module(chunk)
    logits = pick_logits(output, output_transform)
    _warn_if_probabilities(logits)
    missing = [name for name in layers if name not in recorded]
    if missing:
        raise ValueError(
            f"Layer(s) {missing} did not run during the forward pass, so they have no CAM. "
            "Pick layers on the path from the input to the class logits."
        )
    names = list(layers)
    spatial = {name: as_spatial(name, recorded[name].detach(), reshape) for name in names}
    indices, scores = resolve_targets(target, logits)
    if not scores.requires_grad:
        raise ValueError(
            f"The class score does not depend on the layers {names}; pick layers that feed "
            "the class logits (or check output_transform=)."
        )
    grads = torch.autograd.grad(scores.sum(), [recorded[n] for n in names], allow_unused=True)
    maps: dict[tuple[str, str], Tensor] = {}
    for name, grad in zip(names, grads, strict=False):
        activation = spatial[name]
        gradient = torch.zeros_like(activation) if grad is None else as_spatial(name, grad, reshape)
        for method in methods:
            maps[name, method] = apply_method(method, activation, gradient)
    return indices, logits.detach().float(), maps
