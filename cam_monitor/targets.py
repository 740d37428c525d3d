"""Logits from model outputs, and the target class indices and scores a map explains."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .notices import warn
from .types import OutputTransform, Target

# Models already checked for probability outputs: the check costs a host sync, so once each.
_PROBABILITY_CHECKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def is_model_output(output: Any) -> bool:
    """Whether `output` is a Hugging Face `ModelOutput` (checked without importing transformers).

    Example:
        >>> is_model_output({"logits": torch.zeros(2, 5)})
        False
    """
    return any(
        kind.__name__ == "ModelOutput" and kind.__module__.partition(".")[0] == "transformers"
        for kind in type(output).__mro__
    )


def pick_logits(output: Any, output_transform: OutputTransform) -> Tensor:
    """Apply `output_transform` (a callable, a tuple index or a dict key) and check the shape:
    class logits `[B, C]` (one logit per image `[B]` becomes `[B, 1]`), or per-pixel logits
    `[B, C, H, W]` of a segmentation model (see `resolve_segment_targets`).

    Without `output_transform`, a Hugging Face `ModelOutput` gives its `.logits`; any other
    tuple or dict output is refused (which head is the class head is the user's to say).

    Example:
        >>> pick_logits((torch.zeros(2, 5), torch.zeros(2, 2)), 0).shape
        torch.Size([2, 5])
    """
    if output_transform is None:
        picked = output
        if not isinstance(output, Tensor) and is_model_output(output):
            logits = getattr(output, "logits", None)
            picked = logits if isinstance(logits, Tensor) else output
    elif callable(output_transform):
        picked = output_transform(output)
    elif isinstance(output_transform, (int, str)):
        if isinstance(output, Tensor):  # an index would pick one image's row as the logits
            raise ValueError(
                f"output_transform={output_transform!r} picks a head from a tuple or dict output, "
                f"but the model returned a Tensor of shape {tuple(output.shape)}: the logits "
                "already. Leave output_transform=None, or pass a callable."
            )
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
            "`output_transform` must be a callable, a tuple index or a dict key, got "
            f"{type(output_transform).__name__}."
        )
    if not isinstance(picked, Tensor):
        raise ValueError(_not_a_tensor(picked))
    if picked.dim() == 1:
        return picked[:, None]  # one logit per image (BCEWithLogitsLoss): see `class_scores`
    if picked.dim() not in (2, 4):
        raise ValueError(
            f"Class logits must have shape [B, C] (classification) or [B, C, H, W] (per-pixel "
            f"scores, segmentation), got {tuple(picked.shape)}. Pass output_transform= to "
            "return them."
        )
    return picked


def _not_a_tensor(picked: Any) -> str:
    """Why a model output is no logits tensor, with the `output_transform` that picks one."""
    kind = type(picked).__name__
    size = f" of {len(picked)} elements" if isinstance(picked, (tuple, list, dict)) else ""
    if isinstance(picked, Mapping):
        tensors = {k: v for k, v in picked.items() if isinstance(v, Tensor) and v.dim() in (2, 4)}
        if tensors:
            key = "out" if "out" in tensors else next(iter(tensors))
            shapes = ", ".join(f"{k!r}: {tuple(v.shape)}" for k, v in tensors.items())
            return (
                f"The model returned a {kind} ({shapes}), not a logits tensor. Pass "
                f"output_transform={key!r} to explain the scores under that key "
                "([B, C] class logits, or [B, C, H, W] per-pixel logits of a segmentation model)."
            )
    return (
        f"The model returned a {kind}{size}, not a logits tensor. Pass output_transform= to "
        "pick the class head: an index (output_transform=0 for (class_logits, domain_logits)),"
        " a dict key (output_transform='out' for torchvision's segmentation models), or a "
        "callable returning logits [B, C] or [B, C, H, W]."
    )


def class_scores(logits: Tensor) -> Tensor:
    """The score of each class `[B, C]`: the logits, or `(-z, z)` for one logit `z` per image.

    A binary classifier with one logit (sigmoid, `BCEWithLogitsLoss`) predicts class 1 where
    z > 0; the evidence for class 0 is the evidence against class 1, -z (the convention of
    pytorch-grad-cam's `BinaryClassifierOutputTarget`), so its argmax is the prediction.

    Example:
        >>> class_scores(torch.tensor([[2.0], [-1.0]])).tolist()
        [[-2.0, 2.0], [1.0, -1.0]]
    """
    return torch.cat([-logits, logits], dim=1) if logits.shape[1] == 1 else logits


def _open_unit(values: Tensor) -> Tensor:
    """Where values lie strictly between 0 and 1, as a sigmoid's outputs do."""
    return (values > 0) & (values < 1)


#: Autograd nodes that pass values through unchanged (views, copies, indexing): looked through
#: to find the operation that made a model's outputs.
_PASS_THROUGH = (
    "View", "UnsafeView", "Reshape", "Select", "Slice", "Clone", "ToCopy", "Squeeze",
    "Unsqueeze", "Expand", "AsStrided", "T", "Permute", "Transpose", "Index", "Alias",
)  # fmt: skip
#: The operations whose outputs are probabilities.
_SQUASHING = ("Sigmoid", "Softmax", "Hardsigmoid")


def made_by_squashing(values: Tensor) -> bool | None:
    """Whether the operation that made `values` (views and copies looked through) is a
    sigmoid or a softmax; None when autograd recorded nothing to read it from (no_grad).

    Example:
        >>> x = torch.randn(2, 3, requires_grad=True)
        >>> made_by_squashing(x.sigmoid()[:, :2]), made_by_squashing(x * 2)
        (True, False)
    """
    node = values.grad_fn
    if node is None:
        return None
    while node is not None:
        name = type(node).__name__.rstrip("0123456789").removesuffix("Backward")
        if name in _SQUASHING:
            return True
        if name not in _PASS_THROUGH or not node.next_functions:
            return False
        node = node.next_functions[0][0]
    return False


def warn_if_probabilities(module: nn.Module, logits: Tensor) -> None:
    """Warn when a model's outputs are probabilities; checked on its first call only.

    Where autograd recorded the forward, only outputs a sigmoid or softmax made qualify: the
    values alone cannot tell sigmoid outputs from the small logits of a fresh head (all in
    (0, 1) for some seeds). Without a record (no_grad), the values decide.
    """
    if module in _PROBABILITY_CHECKED:
        return
    _PROBABILITY_CHECKED.add(module)
    if made_by_squashing(logits) is False:
        return
    if logits.shape[1] == 1:
        # Logits of a binary classifier fall on both sides of 0; 8 images all in (0, 1) are
        # sigmoid outputs, read as "class 1" every time (a chance of 2^-8 for symmetric logits).
        if logits.shape[0] >= 8 and bool(_open_unit(logits).all()):
            warn(
                "The model's one output per image looks like sigmoid probabilities (all in "
                "[0, 1]). One output is read as a logit z, class 1 where z > 0, so every image "
                "reads as class 1 and the maps explain a saturated sigmoid; return the logit "
                "(remove the sigmoid, or use output_transform= to return the pre-sigmoid score).",
                stacklevel=3,
            )
        return
    inside = ((logits >= 0) & (logits <= 1)).all()
    sums_to_one = (logits.sum(dim=1) - 1).abs().amax() < 1e-3
    # Rows summing to 1 are a softmax; 8 values or more all strictly inside (0, 1) a sigmoid
    # (multi-label). A sigmoid never gives an exact 0, which a ReLU head gives (squeezenet's
    # scores at initialisation are in [0, 1]: they are no probabilities).
    # Per-pixel logits of an untrained segmentation head are often all in (0, 1): only a
    # softmax over the classes counts there.
    sigmoid = _open_unit(logits).all() & (logits.numel() >= 8) & (logits.dim() == 2)
    if bool(inside & sums_to_one | sigmoid):
        warn(
            "The model output looks like probabilities (every value in [0, 1]: a softmax or a "
            "sigmoid). Gradients of a saturated softmax or sigmoid vanish and CAMs turn to "
            "noise; explain the logits instead (remove the softmax or sigmoid, or use "
            "output_transform= to return the scores before it).",
            stacklevel=3,
        )


#: Target tensors already checked, with the `(version, classes)` they were checked at: the
#: check reads the values back (a host sync on a GPU), so the probe's labels, passed again at
#: every evaluation, are read once, and again only after an in-place change.
_CHECKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: The last of them (looked up without `_CHECKED`'s Python-level weak reference).
_LAST_CHECKED: list[tuple[weakref.ref[Tensor], tuple[int, int]] | None] = [None]


def _check_indices(indices: Tensor, num_classes: int, source: Tensor | None = None) -> None:
    """Refuse class indices outside `[0, num_classes)` (a GPU gather would abort the process);
    `source`, the caller's tensor they come from, is remembered as checked."""
    # An inference tensor keeps no version counter: it is checked at every call.
    stamp = None
    if source is not None and not source.is_inference():
        stamp = (source._version, num_classes)
    if stamp is not None:
        last = _LAST_CHECKED[0]
        if last is not None and last[0]() is source and last[1] == stamp:
            return  # the tensor checked last (the probe labels, every evaluation)
        if _CHECKED.get(source) == stamp:
            _LAST_CHECKED[0] = (weakref.ref(source), stamp)
            return
    if indices.numel() and bool((indices < 0).any() | (indices >= num_classes).any()):
        bad = indices[(indices < 0) | (indices >= num_classes)][0].item()
        raise ValueError(
            f"Target index {bad} is outside the logits' {num_classes} classes "
            f"(valid: 0..{num_classes - 1}). Check target= or output_transform=."
        )
    if stamp is not None:
        _CHECKED[source] = stamp
        _LAST_CHECKED[0] = (weakref.ref(source), stamp)


def check_engine_target(target: Target) -> None:
    """Refuse `target='label'`: only the callback knows the labels; the engine needs indices."""
    if isinstance(target, str) and target == "label":
        raise ValueError(
            "`target`='label' is resolved by CamMonitor from the probe labels; the engine needs "
            "class indices: pass the labels themselves (target=labels, a LongTensor [B]), "
            "'predicted', an int or a callable."
        )


def resolve_targets(
    target: Target, logits: Tensor, whole: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Return `(class indices [B], scores [B])`; indices are -1 where a callable gave scores.

    `target` has been validated by `EngineOptions` (its type and value) and by `compute` (not
    'label'); only what needs the logits is checked here. A tensor `target` that is a chunk of
    `whole` is checked through `whole`, once per tensor. Logits `[B, 1]` are two classes (see
    `class_scores`); a callable gets the logits as they are.

    Example:
        >>> indices, scores = resolve_targets("predicted", torch.tensor([[0.0, 2.0], [3.0, 1.0]]))
        >>> indices.tolist(), scores.tolist()
        ([1, 0], [2.0, 3.0])
    """
    if isinstance(target, tuple):
        raise ValueError(
            "A (class, pixel_mask) target (also target='label' with label maps) explains a class "
            "over pixels of per-pixel logits [B, C, H, W], but the model gave class logits of "
            f"shape {tuple(logits.shape)}. Return the per-pixel logits (output_transform=), or "
            "pass class indices: an int, a LongTensor [B] or 'predicted'."
        )
    table = class_scores(logits)
    batch, num_classes = table.shape
    if isinstance(target, str):  # 'predicted'
        indices = table.detach().argmax(dim=1)
    elif isinstance(target, int):
        if not 0 <= target < num_classes:
            _check_indices(torch.tensor([target]), num_classes)  # the same message
        indices = torch.full((batch,), target, dtype=torch.long, device=logits.device)
    elif isinstance(target, Tensor):
        checked = target if whole is None else whole
        _check_indices(checked, num_classes, source=checked)
        # A copy: the result never aliases the caller's labels, and labels moved to the device
        # under inference mode (a validation batch's), which autograd refuses, become normal.
        indices = target.to(logits.device, torch.long, copy=True)
        if indices.shape != (batch,):  # one class for every image
            indices = indices.expand(batch).contiguous()
    else:  # a callable
        returned = _call_target(target, logits, batch)
        if returned.is_floating_point():
            return torch.full((batch,), -1, dtype=torch.long, device=logits.device), returned
        indices = returned.to(torch.long)
        _check_indices(indices, num_classes)
    return indices, table.gather(1, indices.unsqueeze(1)).squeeze(1)


# -- segmentation: per-pixel logits [B, C, H, W] ---------------------------------------------------

#: The class that `target="predicted"` and `target="label"` pass over on segmentation maps while
#: another class is present: background, class 0 in VOC, ADE20K-style and most label maps.
BACKGROUND_CLASS = 0
#: Label values read as "no label" in class-index maps (`ignore_index` of VOC and of torch's
#: `cross_entropy`): never a class to explain nor a pixel to score.
IGNORE_LABELS = (255, -100)


def is_segmentation(logits: Tensor) -> bool:
    """Whether `logits` are per-pixel class scores `[B, C, H, W]` (a segmentation model's)."""
    return logits.dim() == 4


def main_class(class_map: Tensor, num_classes: int | None = None) -> Tensor:
    """The class each image is mostly about: per map of `[B, H, W]` class indices, its most
    frequent class other than `BACKGROUND_CLASS`, or the background where no other class is
    there. Values in `IGNORE_LABELS`, negative or `>= num_classes` are not counted.

    This is the rule of `target="predicted"` (on the argmax map) and `target="label"` (on the
    label maps) for segmentation. Ties go to the lower class index.

    Example:
        >>> main_class(torch.tensor([[[0, 0, 2], [2, 1, 255]], [[0, 0, 0], [0, 0, 0]]]))
        tensor([2, 0])
    """
    flat = class_map.flatten(1).long()
    ignored = torch.zeros_like(flat, dtype=torch.bool)
    for value in IGNORE_LABELS:
        ignored |= flat == value
    if num_classes is None:
        known = flat[~ignored & (flat >= 0)]
        num_classes = int(known.max()) + 1 if known.numel() else 1
    count = num_classes
    valid = ~ignored & (flat >= 0) & (flat < count)
    counts = torch.zeros(flat.shape[0], max(count, 1), device=flat.device)
    counts.scatter_add_(1, torch.where(valid, flat, 0), valid.float())
    others = counts.clone()
    others[:, BACKGROUND_CLASS] = -1
    best = others.argmax(dim=1)
    return torch.where(others.amax(dim=1) > 0, best, BACKGROUND_CLASS)


def pixel_masks(pixels: Tensor, batch: int, size: tuple[int, int]) -> Tensor:
    """A target's pixel mask as float `[B, H, W]` at the logits' `size`: `[H, W]` is shared by
    every image, `[B, 1, H, W]` is squeezed, another size is resized (nearest), bool becomes
    0/1 and float weights are kept (as pytorch-grad-cam's `SemanticSegmentationTarget` does); an
    integer mask of other values than 0 and 1 (a label map) is refused."""
    mask = pixels.detach()
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() == 2:
        mask = mask.expand(batch, *mask.shape)
    if mask.dim() != 3 or mask.shape[0] != batch:
        raise ValueError(
            f"A target's pixel mask must be [H, W] or [B, H, W] with B={batch}, got shape "
            f"{tuple(mask.shape)}; pass target=(class, mask) with one mask per image."
        )
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        stray = mask[(mask != 0) & (mask != 1)]
        if stray.numel():
            values = sorted({int(v) for v in stray.unique()[:5].tolist()})
            raise ValueError(
                f"A target's pixel mask of {mask.dtype} holds {values} besides 0 and 1: that "
                "reads as a label map, whose class values (and ignore index, 255) would weigh "
                "its pixels. Pass target=(class, labels == class), a bool mask, or float weights."
            )
    mask = mask.float()
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = nn.functional.interpolate(mask[:, None], size=size, mode="nearest")[:, 0]
    return mask


def segment_scores(table: Tensor, indices: Tensor, masks: Tensor) -> Tensor:
    """Per image, the sum of its class's logit over its mask: `sum_hw z[b, k_b] * m[b]` `[B]`."""
    rows = torch.arange(table.shape[0], device=table.device)
    return (table[rows, indices.to(table.device)] * masks.to(table.device)).flatten(1).sum(dim=1)


def target_rows(target: Target, start: int, stop: int) -> Target:
    """The part of a per-image target for images `start:stop` (class indices `[B]`, pixel masks
    `[B, H, W]`); anything shared by every image as it is."""

    def rows(value: Any) -> Any:
        per_image = isinstance(value, Tensor) and value.dim() in (1, 3, 4)
        return value[start:stop] if per_image else value

    if isinstance(target, tuple):
        return (rows(target[0]), rows(target[1]))
    return rows(target) if isinstance(target, Tensor) and target.dim() == 1 else target


def resolve_segment_targets(
    target: Target, logits: Tensor, whole: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Return `(class indices [B], pixel masks [B, H, W], scores [B])` for per-pixel logits.

    Each image's score is its class's logit summed over its pixel mask, as pytorch-grad-cam's
    `SemanticSegmentationTarget(k, mask)` scores it. The mask is where the model predicts the
    class (argmax == k) unless `target=(class, mask)` gives it. `"predicted"` explains each
    image's `main_class` of the argmax map. A callable gets the logits `[B, C, H, W]` and
    returns class indices `[B]` (scored over their predicted pixels) or scores `[B]` (then the
    indices are -1 and the masks all ones).

    Example:
        >>> z = torch.zeros(1, 3, 2, 2); z[0, 2, 0] = 1.0  # class 2 on the top row
        >>> indices, masks, scores = resolve_segment_targets("predicted", z)
        >>> indices.tolist(), masks[0].tolist(), scores.tolist()
        ([2], [[1.0, 1.0], [0.0, 0.0]], [2.0])
    """
    table = class_scores(logits)
    batch, num_classes, height, width = table.shape
    predicted = table.detach().argmax(dim=1)
    given = None
    if isinstance(target, tuple):
        target, given = target
    if isinstance(target, str):  # 'predicted'
        indices = main_class(predicted, num_classes)
    elif callable(target) and not isinstance(target, Tensor):
        returned = _call_target(target, logits, batch)
        if returned.is_floating_point():
            ones = torch.ones(batch, height, width, device=logits.device)
            return torch.full((batch,), -1, dtype=torch.long, device=logits.device), ones, returned
        indices = returned.to(torch.long)
        _check_indices(indices, num_classes)
    else:
        indices, _ = resolve_targets(target, table[:, :, 0, 0], whole)
    if given is None:
        masks = (predicted == indices[:, None, None]).float()
    else:
        masks = pixel_masks(given.to(logits.device), batch, (height, width))
    return indices, masks, segment_scores(table, indices, masks)


def is_logit_map(output: Tensor, logits: Tensor) -> bool:
    """Whether a layer's `output` is the segmentation `logits` `[B, C, H, W]` themselves, at the
    logits' size or smaller (torchvision upsamples the classifier's output bilinearly).

    Example:
        >>> z = torch.randn(1, 3, 4, 4)
        >>> up = nn.functional.interpolate(z, size=(8, 8), mode="bilinear")
        >>> is_logit_map(z, up), is_logit_map(z, z + 1)
        (True, False)
    """
    if output.dim() != 4 or output.shape[:2] != logits.shape[:2]:
        return False
    if output.shape[-2] > logits.shape[-2] or output.shape[-1] > logits.shape[-1]:
        return False
    found = output.detach().float()
    if found.shape[-2:] != logits.shape[-2:]:
        found = nn.functional.interpolate(
            found, size=logits.shape[-2:], mode="bilinear", align_corners=False
        )
    wanted = logits.detach().float()
    scale = float(wanted.abs().amax()) + 1e-6
    return float((found - wanted).abs().amax()) <= 1e-4 * scale


def _call_target(target: Callable[[Any], Any], logits: Tensor, batch: int) -> Tensor:
    """What a target callable returns for `logits`: class indices or scores, one per image."""
    returned = target(logits)
    if not isinstance(returned, Tensor) or returned.shape != (batch,):
        shape = tuple(returned.shape) if isinstance(returned, Tensor) else type(returned)
        raise ValueError(
            "A target callable must return class indices LongTensor[B] or scores [B] for "
            f"B={batch}, got {shape}."
        )
    return returned
