"""The fixed probe: samples picked once by index, with no loader iteration and no randomness."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values")
LABEL_KEYS = ("label", "labels", "target", "targets", "y")
MASK_KEYS = ("mask", "masks", "segmentation")


@dataclass(frozen=True)
class ProbeSet:
    """One named probe: model inputs, optional labels and masks, and a content hash."""

    name: str
    inputs: Any
    labels: Tensor | None = None
    masks: Tensor | None = None
    digest: str = ""

    def to(self, device: torch.device) -> ProbeSet:
        """A copy with every tensor moved to `device` (once, at setup)."""
        return replace(
            self,
            inputs=move_to(self.inputs, device),
            labels=None if self.labels is None else self.labels.to(device),
            masks=None if self.masks is None else self.masks.to(device),
        )


def move_to(value: Any, device: torch.device) -> Any:
    """Move tensors nested in tuples, lists and dicts to `device`."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return type(value)((k, move_to(v, device)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(move_to(v, device) for v in value)
    return value


def evenly_spaced(length: int, count: int) -> list[int]:
    """`count` indices spread evenly over `range(length)`, first and last included.

    Example:
        >>> evenly_spaced(10, 4)
        [0, 3, 6, 9]
        >>> evenly_spaced(3, 8)
        [0, 1, 2]
    """
    if count >= length:
        return list(range(length))
    if count == 1:
        return [0]
    return [round(i * (length - 1) / (count - 1)) for i in range(count)]


def content_hash(value: Any) -> str:
    """The one probe hash: 12 hex digits of every tensor's shape, dtype and bytes, in order.

    Numpy arrays hash as the tensors `torch.from_numpy` makes of them, so a probe hashes the
    same before and after a trip through a history file, on any machine.

    Example:
        >>> x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        >>> content_hash(x) == content_hash(x.numpy()) != content_hash(x.double())
        True
    """
    digest = hashlib.sha256()

    def feed(item: Any) -> None:
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(np.ascontiguousarray(item, item.dtype.newbyteorder("=")))
        if isinstance(item, Tensor):
            data = item.detach().cpu().contiguous()
            digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        elif isinstance(item, Mapping):
            for key in sorted(item, key=str):
                digest.update(str(key).encode())
                feed(item[key])
        elif isinstance(item, (list, tuple)):
            for sub in item:
                feed(sub)

    feed(value)
    return digest.hexdigest()[:12]


def _pick_key(batch: Mapping[str, Any], key: str | None, defaults: Sequence[str], what: str) -> Any:
    if key is not None:
        if key not in batch:
            raise ValueError(
                f"{what}_key={key!r} is not in the batch; its keys are {sorted(map(str, batch))}."
            )
        return batch[key]
    for candidate in defaults:
        if candidate in batch:
            return batch[candidate]
    return None


def split_batch(
    batch: Any, input_key: str | None = None, label_key: str | None = None
) -> tuple[Any, Tensor | None, Tensor | None]:
    """Split a collated batch into `(inputs, labels, masks)`: tuples/lists or dicts.

    A tuple is `(inputs, labels[, masks])`; a dict is read with `input_key`/`label_key`,
    else the usual names (`image`, `input`, `x`, ... and `label`, `target`, `y`, ...).
    """
    if isinstance(batch, Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        inputs = _pick_key(batch, input_key, INPUT_KEYS, "input")
        if inputs is None:
            raise ValueError(
                f"Cannot find the inputs in a batch with keys {sorted(map(str, batch))}; "
                "pass input_key= (and label_key=) to CamMonitor."
            )
        labels = _pick_key(batch, label_key, LABEL_KEYS, "label")
        masks = _pick_key(batch, None, MASK_KEYS, "mask")
        return inputs, labels, masks
    if isinstance(batch, (list, tuple)) and batch:
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        masks = batch[2] if len(batch) > 2 and isinstance(batch[2], Tensor) else None
        return batch[0], labels, masks
    raise ValueError(
        f"A probe batch must be a tensor, an (inputs, labels) tuple or a dict, got "
        f"{type(batch).__name__}."
    )


def sample_dataset(
    dataset: Dataset, count: int, collate_fn: Callable[[list[Any]], Any] | None = None
) -> tuple[Any, int]:
    """Collate `count` evenly spaced samples of a map-style dataset; returns `(batch, length)`."""
    try:
        length = len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise ValueError(
            f"The probe dataset {type(dataset).__name__} has no len() (an IterableDataset?); "
            "pass probe= as a tensor or an (inputs, labels) tuple instead."
        ) from err
    if length == 0:
        raise ValueError(f"The probe dataset {type(dataset).__name__} is empty.")
    indices = evenly_spaced(length, count)
    return (collate_fn or default_collate)([dataset[i] for i in indices]), length


def make_probe(
    name: str,
    spec: Any,
    num_probe: int,
    input_key: str | None = None,
    label_key: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> ProbeSet:
    """Turn one probe specification (tensor, tuple, Dataset, DataLoader) into a `ProbeSet`."""
    if isinstance(spec, DataLoader):
        batch, length = sample_dataset(spec.dataset, num_probe, spec.collate_fn)
    elif isinstance(spec, Dataset):
        batch, length = sample_dataset(spec, num_probe)
    elif isinstance(spec, (Tensor, tuple, list, Mapping)):
        batch, length = spec, None
    else:
        raise TypeError(
            f"probe {name!r} must be a Tensor, an (inputs, labels) tuple, a dict batch, a Dataset "
            f"or a DataLoader, got {type(spec).__name__}."
        )
    if length is not None and length < num_probe and warn is not None:
        warn(f"probe {name!r}: num_probe={num_probe} but the dataset holds {length}; using all.")
    inputs, labels, masks = split_batch(batch, input_key, label_key)
    if not isinstance(inputs, Tensor):
        raise TypeError(f"probe {name!r}: inputs must be a tensor, got {type(inputs).__name__}.")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(f"probe {name!r} is empty: shape {tuple(inputs.shape)}.")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.shape != (inputs.shape[0],):
            labels = None  # regression targets or one-hot: no class label to caption
    return ProbeSet(name, inputs, labels, masks, content_hash(inputs))
