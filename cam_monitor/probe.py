"""Probe sets: samples picked once by index (no loader iteration, no randomness), their masks and
boxes, and the one content hash."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler, default_collate

from .batch import IMAGE_KEYS, Batch, leaves, move_to, tensors
from .isolation import preserved_rng
from .measures import boxes_to_masks
from .schema import check_probe_name
from .types import ProbeSpec

LABEL_KEYS = ("label", "labels", "target", "targets", "y")
#: Probe sets above this many images warn once, after the baseline, with what an evaluation
#: of them costs: 16x the default probe. 512 images cost a resnet18 evaluation of 16 layers x 3
#: methods at 64 px 4-6 s, 8 MiB of history and 1.1 GB of RSS without batch_size (232 MiB with
#: batch_size=32, 201 MiB for 32 images: benchmarks/results/probe_size-cpu.md).
LARGE_PROBE = 256
#: The only dict keys read as masks; boxes come only through `masks=`.
MASK_KEYS = ("mask", "masks")


@dataclass(frozen=True)
class ProbeSet:
    """One named probe: model inputs, optional labels and masks, and a content hash.

    `inputs` is what the model is called with: a tensor, or a nested batch (a tuple of tensors,
    a dict with every key of the loader's batch); `image` is the tensor drawn and perturbed.
    `label_maps` are class-index maps `[B, H, W]` (segmentation labels): localization scores
    each image's map against the pixels labelled with the class it explains (`class_masks`).
    """

    name: str
    inputs: Any
    labels: Tensor | None = None
    masks: Tensor | None = None
    digest: str = ""
    label_maps: Tensor | None = None

    @property
    def image(self) -> Tensor | None:
        """The `[B, C, H, W]` image tensor of `inputs`, floating-point, else uint8 pixels
        (`batch.Batch.image`)."""
        return Batch.of(self.inputs).image

    @property
    def length(self) -> int:
        """How many images (rows) the probe holds."""
        return Batch.of(self.inputs).length or 0

    def describe(self) -> str:
        """`inputs` in a message: a tensor's shape and dtype, or each tensor of a nested batch.

        Example:
            >>> batch = {"image": torch.zeros(2, 3, 4, 4), "meta": torch.zeros(2, 5)}
            >>> ProbeSet("p", batch).describe()
            "{'image': (2, 3, 4, 4) torch.float32, 'meta': (2, 5) torch.float32}"
        """
        return _describe(self.inputs)

    def to(self, device: torch.device) -> ProbeSet:
        """A copy with every tensor moved to `device` (once, at setup)."""
        return replace(
            self,
            inputs=move_to(self.inputs, device),
            labels=None if self.labels is None else self.labels.to(device),
            masks=None if self.masks is None else self.masks.to(device),
            label_maps=None if self.label_maps is None else self.label_maps.to(device),
        )

    @property
    def localized(self) -> bool:
        """Whether localization can be scored: the probe has masks or label maps."""
        return self.masks is not None or self.label_maps is not None

    def class_masks(self, classes: Tensor) -> ProbeSet:
        """This probe with `masks` the pixels labelled with each image's class `classes[b]`
        (from its label maps); as it is without label maps."""
        if self.label_maps is None:
            return self
        wanted = classes.to(self.label_maps.device)[:, None, None]
        return replace(self, masks=self.label_maps == wanted)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{tuple(value.shape)} {value.dtype}"
    if isinstance(value, Mapping):
        items = ", ".join(f"{key!r}: {_describe(item)}" for key, item in value.items())
        return "{" + items + "}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_describe(item) for item in value) + ")"
    return type(value).__name__


def large_probe_warning(
    probes: Mapping[str, ProbeSet], seconds: float, history_bytes: int | None
) -> str | None:
    """What an evaluation of probe sets above `LARGE_PROBE` images costs (its measured
    `seconds` and `history_bytes`, None: no history), and how to pay less; None when none is.

    Example:
        >>> big = {"val": ProbeSet("val", torch.zeros(300, 3, 8, 8))}
        >>> large_probe_warning(big, 2.5, 3 * 2**20).split(";")[0]
        "CamMonitor: probe 'val' holds 300 images (above 256)"
    """
    large = {name: probe.length for name, probe in probes.items() if probe.length > LARGE_PROBE}
    if not large:
        return None
    sizes = ", ".join(f"{name!r} holds {length} images" for name, length in large.items())
    stored = "" if history_bytes is None else f" and {history_bytes / 2**20:.1f} MiB of history"
    return (
        f"CamMonitor: probe {sizes} (above {LARGE_PROBE}); one evaluation took {seconds:.1f} s"
        f"{stored}, at every evaluation of the run. Grids draw max_tiles of the images; pass "
        "num_probe= (or a smaller probe) to pay less, batch_size= to bound memory, "
        "history=False to keep no maps."
    )


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
        >>> content_hash(torch.tensor(2)) != content_hash(torch.tensor([2]))
        True
    """
    digest = hashlib.sha256()
    for item in leaves(value, (Tensor, np.ndarray)):
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(np.ascontiguousarray(item, item.dtype.newbyteorder("=")))
        data = item.detach().cpu().contiguous()
        digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
        flat = data.reshape(-1)  # a 0-d tensor (a target of one class) views as bytes too
        digest.update(flat.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
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


def looks_like_masks(value: Any, images: Any) -> bool:
    """Whether `value` is shaped like masks of `images`: `[B, H, W]` or `[B, 1, H, W]` with the
    images' batch size and size. Anything else after `(x, y)` (an index, a weight, a second view,
    soft labels `[B, 4]`) is not a mask.

    Example:
        >>> x = torch.zeros(4, 3, 8, 8)
        >>> [looks_like_masks(v, x) for v in (torch.zeros(4, 8, 8), torch.arange(4), x)]
        [True, False, False]
    """
    if not isinstance(value, Tensor) or not isinstance(images, Tensor) or images.dim() < 3:
        return False
    shape = tuple(value.shape)
    size = (images.shape[0], *images.shape[-2:])
    return shape == size or shape == (size[0], 1, *size[1:])


def split_batch(
    batch: Any, input_key: str | None = None, label_key: str | None = None
) -> tuple[Any, Tensor | None, Tensor | None]:
    """Split a collated batch into `(inputs, labels, masks)`: tuples/lists or dicts.

    A tuple is `(inputs, labels, ...)`; its third element is masks only when `looks_like_masks`.
    A dict is read with `input_key`/`label_key`, else the usual names (`image`, `input`, `x`, ...
    and `label`, `target`, `y`, ...); only a `mask` or `masks` key holds masks.
    """
    if isinstance(batch, Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        inputs = _pick_key(batch, input_key, IMAGE_KEYS, "input")
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
        third = batch[2] if len(batch) > 2 else None
        masks = third if looks_like_masks(third, Batch.of(batch[0]).image) else None
        return batch[0], labels, masks
    raise ValueError(
        f"A probe batch must be a tensor, an (inputs, labels) tuple or a dict, got "
        f"{type(batch).__name__}."
    )


def sample_dataset(
    dataset: Dataset,
    count: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    subset: Sequence[int] | None = None,
) -> tuple[Any, int]:
    """Collate `count` evenly spaced samples of a map-style dataset, or of its items `subset`
    (a loader's sampler over part of it); returns `(batch, length)`."""
    try:
        length = len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise ValueError(
            f"The probe dataset {type(dataset).__name__} has no len() (an IterableDataset?); "
            "pass probe= as a tensor or an (inputs, labels) tuple instead."
        ) from err
    items = range(length) if subset is None else [int(i) for i in subset]
    if len(items) == 0:
        raise ValueError(f"The probe dataset {type(dataset).__name__} is empty.")
    indices = [items[i] for i in evenly_spaced(len(items), count)]
    return (collate_fn or default_collate)([dataset[i] for i in indices]), len(items)


def sampler_subset(loader: DataLoader) -> Sequence[int] | None:
    """The dataset items `loader` draws from when its sampler covers a fixed part of the dataset
    (a `SubsetRandomSampler`, or a list or range of indices, as in a train/val split by
    samplers); None when it may yield any item."""
    sampler = loader.sampler
    if isinstance(sampler, SubsetRandomSampler):
        return sampler.indices
    if isinstance(sampler, (list, tuple, range)) or (
        isinstance(sampler, Tensor) and sampler.dim() == 1 and not sampler.is_floating_point()
    ):
        return sampler
    return None


def _class_labels(labels: Tensor, count: int) -> Tensor | None:
    """Class indices `[B]` from a probe's labels, or None for regression targets, soft or
    multi-hot labels.

    Labels a one-logit binary classifier trains on (`BCEWithLogitsLoss` takes floats, `[B]` or
    `[B, 1]`) are class indices stored as floats: whole numbers >= 0 become a LongTensor. One-hot
    rows `[B, C]` (exactly one 1, the rest 0) become the index of their 1.
    """
    if labels.shape == (count, 1):
        labels = labels[:, 0]
    elif labels.dim() == 2 and labels.shape[0] == count and labels.shape[1] > 1:
        ones, zeros = labels == 1, labels == 0
        if not bool((ones | zeros).all() & (ones.sum(dim=1) == 1).all()):
            return None  # soft (mixup, smoothing) or multi-hot: no one class per image
        return ones.float().argmax(dim=1)
    if labels.shape != (count,):
        return None
    if labels.is_floating_point():
        if not bool(((labels == labels.round()) & (labels >= 0)).all()):
            return None
        labels = labels.long()
    return labels


def model_inputs(batch: Any, inputs: Any, input_key: str | None, whole: bool) -> Any:
    """What the model is called with: the `inputs` `split_batch` found, or with `whole` (a
    `forward=` is given) a dict batch whole, every key kept, `input_key`'s first (where the image
    is looked for first, after the usual image keys)."""
    if not whole or not isinstance(batch, Mapping):
        return inputs
    if input_key is None or input_key not in batch:
        return batch
    first = [(input_key, batch[input_key])]
    return type(batch)(first + [(k, v) for k, v in batch.items() if k != input_key])  # type: ignore[call-arg]


def make_probe(
    name: str,
    spec: Any,
    num_probe: int,
    input_key: str | None = None,
    label_key: str | None = None,
    warn: Callable[[str], None] | None = None,
    whole: bool = False,
    transfer: Callable[[Any], Any] | None = None,
) -> ProbeSet:
    """Turn one probe specification (tensor, tuple, dict or nested batch, Dataset, DataLoader)
    into a `ProbeSet`. A tuple is `(inputs, labels, ...)` whose inputs may be nested (`((x,
    meta), y)`); with `whole` (a `forward=` is given) a dict batch is the model's inputs, whole.
    `transfer` is applied to a batch collated from a Dataset or DataLoader before it is split
    (what the training loop does to each batch it takes from a loader); a batch given as it is
    is the model's input as it is."""
    if isinstance(spec, DataLoader):
        batch, length = sample_dataset(
            spec.dataset, num_probe, spec.collate_fn, sampler_subset(spec)
        )
    elif isinstance(spec, Dataset):
        batch, length = sample_dataset(spec, num_probe)
    elif isinstance(spec, (Tensor, tuple, list, Mapping)):
        batch, length = spec, None
    else:
        raise TypeError(
            f"probe {name!r} must be a Tensor, an (inputs, labels) tuple, a dict batch, a Dataset "
            f"or a DataLoader, got {type(spec).__name__}."
        )
    if length is not None and transfer is not None:
        batch = transfer(batch)
    if length is not None and length < num_probe and warn is not None:
        warn(f"probe {name!r}: num_probe={num_probe} but the dataset holds {length}; using all.")
    inputs, labels, masks = split_batch(batch, input_key, label_key)
    inputs = model_inputs(batch, inputs, input_key, whole)
    rows = Batch.of(inputs).length
    if rows is None:
        found = next(tensors(inputs), None)
        shape = type(inputs).__name__ if found is None else f"shape {tuple(found.shape)}"
        raise TypeError(
            f"probe {name!r}: its inputs hold no batched tensor ({shape}); give a tensor [B, C, "
            "H, W], or a tuple or dict of tensors whose first dimension is the batch."
        )
    if rows == 0:
        raise ValueError(f"probe {name!r} is empty: {_describe(inputs)}.")
    if labels is not None:
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):  # names, ragged lists: not class indices
            labels = None
        if labels is not None and labels.dim() and labels.shape[0] != rows:
            raise ValueError(
                f"probe {name!r} has {rows} images but {labels.shape[0]} labels "
                f"(shape {tuple(labels.shape)}); give one label per image, labels[i] for "
                "inputs[i]."
            )
    image = Batch.of(inputs).image  # label maps and masks are shaped like it
    labels, masks, label_maps = read_label_maps(name, image, labels, masks, warn)
    if labels is not None:
        labels = _class_labels(labels, rows)
    return ProbeSet(name, inputs, labels, masks, content_hash(inputs), label_maps)


def _whole_numbers(value: Tensor) -> bool:
    """Integer values (any integer dtype, or floats that are all whole numbers)."""
    if value.dtype == torch.bool or value.is_complex():
        return False
    return not value.is_floating_point() or bool((value == value.round()).all())


def _class_index_map(masks: Tensor) -> bool:
    """Whether a mask holds class indices: whole numbers other than a binary mask's 0 and 1, or
    0 and 255 (a binary mask saved as an 8-bit image)."""
    if not masks.numel() or not _whole_numbers(masks):
        return False
    binary = (masks == 0) | (masks == 1)
    return not bool(binary.all()) and not bool(((masks == 0) | (masks == 255)).all())


def read_label_maps(
    name: str,
    inputs: Any,
    labels: Tensor | None,
    masks: Any,
    warn: Callable[[str], None] | None = None,
) -> tuple[Tensor | None, Any, Tensor | None]:
    """Split class-index maps (segmentation labels) off a probe's labels and masks: returns
    `(labels, masks, label_maps)`.

    Labels shaped like the images' masks (`[B, H, W]`, `[B, 1, H, W]`) are label maps. A mask
    of whole numbers beyond 0 and 1 is a label map, never binarised into "any class"; an
    integer mask of only 0 and 1 stays a mask, with a warning that it could be either. Bool
    masks, float 0/1 masks and 0/255 masks (an 8-bit image) keep their meaning.

    Example:
        >>> x = torch.zeros(2, 3, 4, 4)
        >>> labels, masks, maps = read_label_maps("p", x, torch.full((2, 4, 4), 2), None)
        >>> labels, masks, maps.shape
        (None, None, torch.Size([2, 4, 4]))
    """
    label_maps = None
    if isinstance(labels, Tensor) and looks_like_masks(labels, inputs) and _whole_numbers(labels):
        label_maps, labels = labels, None
    if isinstance(masks, Tensor) and looks_like_masks(masks, inputs) and _whole_numbers(masks):
        if _class_index_map(masks):
            if label_maps is None:
                label_maps = masks
            masks = None
        elif bool(masks.max() <= 1) and not masks.is_floating_point() and warn is not None:
            warn(
                f"probe {name!r}: its mask ({masks.dtype}) holds only 0 and 1, read as a binary "
                "mask (the object's pixels). If it is a class-index map of classes 0 and 1, pass "
                "it as the labels (a 'label' key or the second element of the tuple), so that "
                "each map is scored against the pixels of the class it explains."
            )
    if label_maps is not None:
        if label_maps.dim() == 4:
            label_maps = label_maps[:, 0]
        label_maps = label_maps.long()
    return labels, masks, label_maps


def probe_sets(probe: Any, input_key: str | None = None) -> dict[str, ProbeSpec] | None:
    """The named probe specifications in `probe=` (None when the Trainer's loaders are to be
    used): a dict of named sets as is, any other batch as the set `"probe"`. Names and types are
    checked here, so a bad `probe=` fails in the constructor.

    Example:
        >>> sorted(probe_sets({"source": torch.zeros(2, 3), "target": torch.ones(2, 3)}))
        ['source', 'target']
        >>> list(probe_sets({"image": torch.zeros(2, 3)}))  # a dict batch is one set
        ['probe']
    """
    if probe is None:
        return None
    kinds = (Tensor, tuple, list, Mapping, Dataset, DataLoader)
    if not isinstance(probe, kinds):
        raise TypeError(
            "`probe` must be None, a Tensor, an (inputs, labels) tuple, a dict batch, a Dataset, "
            f"a DataLoader or a dict of named probe sets, got {type(probe).__name__}."
        )
    if isinstance(probe, Mapping) and not {input_key, *IMAGE_KEYS}.intersection(probe):
        if not probe:
            raise ValueError("`probe` is an empty dict; give at least one named probe set.")
        return {check_probe_name(name): spec for name, spec in probe.items()}
    return {"probe": probe}


def first_loader(loaders: Any) -> DataLoader | None:
    """The first DataLoader inside what `trainer.*_dataloader(s)` returns (one, a list, a dict)."""
    return next(leaves(loaders, DataLoader), None)


def loader_path(loaders: Any, path: str = "") -> str | None:
    """Where the first DataLoader sits inside `loaders`, as an index path: ``"[0]"``,
    ``"['mnist']"``, ``""`` for `loaders` itself (None when there is none).

    Example:
        >>> loader_path({"a": [3, DataLoader(range(2))]})
        "['a'][1]"
    """
    if isinstance(loaders, DataLoader):
        return path
    items: Iterable[tuple[Any, Any]] = ()
    if isinstance(loaders, Mapping):
        items = loaders.items()
    elif isinstance(loaders, (list, tuple)):
        items = enumerate(loaders)
    for key, item in items:
        found = loader_path(item, f"{path}[{key!r}]")
        if found is not None:
            return found
    return None


def describe_loader(loader: DataLoader) -> str:
    """A loader in a message: its dataset's type and size."""
    try:
        size = f", {len(loader.dataset)} items"  # type: ignore[arg-type]
    except TypeError:
        size = ""
    return f"a DataLoader of {type(loader.dataset).__name__}{size}"


def count_loaders(loaders: Any) -> int:
    """How many DataLoaders are inside what `trainer.*_dataloader(s)` returns."""
    return sum(1 for _ in leaves(loaders, DataLoader))


def loader_probe(
    candidates: Iterable[tuple[str, Any]], warn: Callable[[str], None] | None = None
) -> dict[str, ProbeSpec]:
    """`{name: loader}` for the first `(name, loaders)` candidate holding a DataLoader, e.g.
    `[("val", trainer.val_dataloaders), ("train", trainer.train_dataloader)]`; with several
    loaders there, the first is used and `warn` is told so once."""
    for name, loaders in candidates:
        loader = first_loader(loaders)
        if loader is not None:
            count = count_loaders(loaders)
            if count > 1 and warn is not None:
                where = f"{name}_dataloaders{loader_path(loaders)}"
                warn(
                    f"CamMonitor: the Trainer has {count} {name} dataloaders; the probe comes "
                    f"from the first, {where} ({describe_loader(loader)}). To use another, pass "
                    f"it: CamMonitor(probe=loader) or probe={{'name': loader, ...}} for several."
                )
            return {name: loader}
    raise ValueError(
        "CamMonitor found no DataLoader on the Trainer to take a probe from; pass probe= "
        "(a tensor, an (inputs, labels) tuple, a Dataset or a DataLoader)."
    )


def check_masks(masks: object, specs: Mapping[str, ProbeSpec] | None = None) -> None:
    """`masks=` is None, a Tensor (or boxes) for every probe set, or a dict of them per set.

    `specs` are the probe sets of `probe_sets` (None: sampled from the Trainer's loaders).
    Masks for a set sampled by index from a dataset cannot be aligned with its images: refused.
    """
    if masks is None:
        return
    if not isinstance(masks, (Tensor, Mapping)):
        raise TypeError(
            "`masks` must be a Tensor, boxes [B, 4], or a dict of those per probe set, got "
            f"{type(masks).__name__}."
        )
    if specs is None:
        sampled = ["the Trainer's val/train dataloader (probe=None)"]
    else:
        named = specs if not isinstance(masks, Mapping) else {n: specs.get(n) for n in masks}
        sampled = [
            f"probe {name!r} (a {type(spec).__name__})"
            for name, spec in named.items()
            if isinstance(spec, (Dataset, DataLoader))
        ]
    if sampled:
        raise ValueError(
            f"`masks` cannot be aligned with {', '.join(sampled)}: that probe is sampled by "
            "index (num_probe evenly spaced items), so masks given separately would belong to "
            "other images. Put the masks inside the dataset's items (a third element [H, W] or a "
            "'mask' key), or pass the probe explicitly, e.g. probe=(images, labels), masks=masks."
        )


def attach_masks(probe: ProbeSet, masks: Any) -> ProbeSet:
    """`probe` with `masks` (else the masks found in its batch) as bool `[B, H, W]`; boxes
    `[B, 4]` (x0, y0, x1, y1 in pixels) given as `masks` become masks (a batch's `[B, 4]` never
    does); class-index maps (whole numbers beyond 0 and 1) become `label_maps`; a shape that
    cannot fit is a ValueError.

    Example:
        >>> probe = ProbeSet("p", torch.zeros(1, 3, 4, 4))
        >>> attach_masks(probe, torch.tensor([[0, 0, 2, 2]])).masks[0].int().tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    """
    given = masks is not None
    masks = masks if given else probe.masks
    if masks is None:
        return probe
    masks = torch.as_tensor(masks)
    described = Batch.of(probe.inputs)
    batch, size = described.length, described.image_size
    if size is None:
        raise ValueError(
            f"masks for probe {probe.name!r} need an image tensor [B, C, H, W] in its inputs "
            f"({probe.describe()}) to be aligned with; pass the images, or drop masks=."
        )
    if given and masks.shape == (batch, 4) and masks.dtype != torch.bool:
        boxes = masks
        masks = boxes_to_masks(boxes.float(), size)  # boxes only through masks=, never a batch
        _check_boxes(probe.name, boxes, masks, size)
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if tuple(masks.shape) != (batch, *size):
        raise ValueError(
            f"masks for probe {probe.name!r} have shape {tuple(masks.shape)}; expected "
            f"[B, H, W] = {(batch, *size)} like the probe images, or boxes [B, 4] (through "
            "masks= only)."
        )
    if masks.dtype != torch.bool and _class_index_map(masks):  # class indices, not a mask
        return replace(probe, masks=None, label_maps=masks.long())
    return replace(probe, masks=masks if masks.dtype == torch.bool else masks > 0.5)


def _check_boxes(name: str, boxes: Tensor, masks: Tensor, size: tuple[int, int]) -> None:
    """Refuse a box that selects no pixel of its image (outside it, inverted, empty, NaN):
    its localization scores would be NaN at every evaluation, and the cause is the box's
    format (normalised coordinates, (x, y, w, h), swapped corners) more often than its place.
    Boxes that all lie within [0, 1] on a larger image are normalised ones (each would select
    pixel (0, 0) at most), and refused too."""
    height, width = size
    finite = boxes[torch.isfinite(boxes).all(dim=1)]
    if max(height, width) > 2 and len(finite) and bool(((finite >= 0) & (finite <= 1)).all()):
        box = ", ".join(f"{float(v):g}" for v in finite[0].tolist())
        raise ValueError(
            f"masks for probe {name!r}: every box lies within [0, 1], e.g. ({box}), on "
            f"{height}x{width} images: normalised coordinates, which select pixel (0, 0) at "
            "most. Boxes are (x0, y0, x1, y1) in pixels: multiply x by the width and y by "
            "the height."
        )
    empty = (~masks.flatten(1).any(dim=1)).nonzero().flatten().tolist()
    if not empty:
        return
    row = empty[0]
    box = [float(v) for v in boxes[row].tolist()]
    shown = ", ".join(f"{v:g}" for v in box)
    more = f" ({len(empty)} of {len(boxes)} boxes select no pixel)" if len(empty) > 1 else ""
    raise ValueError(
        f"masks for probe {name!r}: the box of row {row}, ({shown}), selects no pixel of "
        f"its {height}x{width} image{more}. Boxes are (x0, y0, x1, y1) in pixels, x0 < x1 and "
        f"y0 < y1, and hold at least one pixel centre of the image (x in [0, {width}], y in "
        f"[0, {height}]). Convert normalised [0, 1] boxes by multiplying x by the width and y "
        "by the height, and (x, y, w, h) boxes to (x, y, x + w, y + h)."
    )


def build_probes(
    specs: Mapping[str, ProbeSpec],
    num_probe: int,
    masks: Tensor | Mapping[str, Tensor] | None = None,
    input_key: str | None = None,
    label_key: str | None = None,
    warn: Callable[[str], None] | None = None,
    whole: bool = False,
    transfer: Callable[[Any], Any] | None = None,
) -> dict[str, ProbeSet]:
    """Every probe set, with its masks, picked without touching any random stream (Python,
    numpy, torch): a dataset's `__getitem__` may draw (augmentations), the run must not see it.

    `masks` is one tensor for every set or a dict per set name; unknown names are a ValueError.
    `transfer` goes to `make_probe`: applied to the batches collated from a Dataset or
    DataLoader (the Trainer's batch-transfer hooks), not to batches given as they are.
    """
    with preserved_rng():
        probes = {
            name: make_probe(
                check_probe_name(name),
                spec,
                num_probe,
                input_key,
                label_key,
                warn,
                whole,
                transfer,
            )
            for name, spec in specs.items()
        }
    if isinstance(masks, Mapping):
        unknown = sorted(set(masks) - set(probes))
        if unknown:
            raise ValueError(
                f"`masks` names probe set(s) {unknown} but the probe sets are {sorted(probes)}; "
                "use the same names as in probe=."
            )
    return {
        name: attach_masks(probe, masks.get(name) if isinstance(masks, Mapping) else masks)
        for name, probe in probes.items()
    }
