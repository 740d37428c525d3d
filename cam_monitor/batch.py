"""The one model of a nested batch: tensors inside tuples, namedtuples, lists and dicts.

Every pass of the engine and every probe operation walks inputs through `map_tensors` and
`Batch`, so a namedtuple, a list or a dict behaves the same everywhere.

Example:
    >>> from collections import namedtuple
    >>> Pair = namedtuple("Pair", "pixels ids")
    >>> batch = Batch.of(Pair(torch.ones(4, 3, 8, 8), torch.arange(4)))
    >>> batch.length, batch.image_size, type(batch.slice(1, 3).data).__name__
    (4, (8, 8), 'Pair')
    >>> batch.slice(1, 3).data.ids.tolist()
    [1, 2]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def _rebuild_sequence(original: list[Any] | tuple[Any, ...], items: list[Any]) -> Any:
    if hasattr(original, "_fields"):  # a namedtuple takes its fields as arguments
        return type(original)(*items)
    return type(original)(items)


def map_tensors(value: Any, fn: Callable[[Tensor], Any]) -> Any:
    """`value` with `fn` applied to every tensor inside it; containers keep their type.

    Example:
        >>> map_tensors({"x": torch.ones(2), "n": 3}, lambda t: t * 2)
        {'x': tensor([2., 2.]), 'n': 3}
    """
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return type(value)((key, map_tensors(item, fn)) for key, item in value.items())  # type: ignore[call-arg]
    if isinstance(value, (list, tuple)):
        return _rebuild_sequence(value, [map_tensors(item, fn) for item in value])
    return value


def leaves(value: Any, kind: type | tuple[type, ...] = Tensor) -> Iterator[Any]:
    """Every instance of `kind` inside `value` (tuples, lists, dicts), depth first, in order.

    Example:
        >>> list(leaves({"a": [1, "x"], "b": (2,)}, int))
        [1, 2]
    """
    if isinstance(value, kind):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from leaves(item, kind)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from leaves(item, kind)


def tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor inside `value`, depth first, in container order."""
    return leaves(value, Tensor)


def move_to(value: Any, device: torch.device | str) -> Any:
    """Every tensor inside `value` moved to `device`."""
    return map_tensors(value, lambda t: t.to(device))


#: Dict keys read as the images of a batch, before any other float `[B, C, H, W]` tensor.
IMAGE_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values")


def _is_image(tensor: Tensor) -> bool:
    return tensor.dim() == 4 and tensor.is_floating_point()


def _is_pixels(tensor: Tensor) -> bool:
    return tensor.dim() == 4 and tensor.dtype == torch.uint8


def _find_image(inputs: Any) -> Tensor | None:
    """The images of a batch: in a dict, under an image key (a float mask listed before them is
    no image); else the first floating-point `[B, C, H, W]` tensor; with no floating-point one,
    a uint8 `[B, C, H, W]` tensor (display pixels, for a model that converts them itself) the
    same way."""
    for accepted in (_is_image, _is_pixels):
        if isinstance(inputs, Mapping):
            for key in IMAGE_KEYS:
                value = inputs.get(key)
                if isinstance(value, Tensor) and accepted(value):
                    return value
        found = next((t for t in tensors(inputs) if accepted(t)), None)
        if found is not None:
            return found
    return None


@dataclass(frozen=True)
class Batch:
    """A nested batch, normalised once: its data, length (rows) and image tensor.

    `length` is the leading size of the first tensor with a dimension (None when there is
    none); `image` is the floating-point `[B, C, H, W]` tensor under a dict's image key
    (`IMAGE_KEYS`), else the first such tensor; with none, a uint8 `[B, C, H, W]` one found
    the same way, which is drawn as it is but cannot be differentiated or perturbed
    (`require_image` refuses it); None when there is neither.
    """

    data: Any
    length: int | None
    image: Tensor | None

    @classmethod
    def of(cls, inputs: Any) -> Batch:
        """Describe `inputs` (a `Batch` is returned as is)."""
        if isinstance(inputs, Batch):
            return inputs
        if isinstance(inputs, Tensor):  # the common case, without walking a container
            dims = inputs.dim()
            image = inputs if _is_image(inputs) or _is_pixels(inputs) else None
            return cls(inputs, int(inputs.shape[0]) if dims else None, image)
        length = next((int(t.shape[0]) for t in tensors(inputs) if t.dim()), None)
        return cls(inputs, length, _find_image(inputs))

    @property
    def image_size(self) -> tuple[int, int] | None:
        """`(H, W)` of the image tensor, else of the first tensor with >= 3 dimensions."""
        found = self.image
        if found is None:
            found = next((t for t in tensors(self.data) if t.dim() >= 3), None)
        return None if found is None else (int(found.shape[-2]), int(found.shape[-1]))

    def require_image(self, why: str = "Pixel-level methods") -> Tensor:
        """The floating-point image tensor, or a ValueError saying that `why` needs one (naming
        the dtype of a uint8 one)."""
        if self.image is None or not self.image.is_floating_point():
            found = self.image
            if found is None:
                found = next((t for t in tensors(self.data) if t.dim() == 4), None)
            seen = "none was found" if found is None else (
                f"the [B, C, H, W] tensor found is {found.dtype} (shape {tuple(found.shape)}): "
                "pass the probe as float images prepared like a training batch, e.g. "
                "x.float() / 255, then normalised (a model that converts uint8 itself must "
                f"then take them as they are), or do without {why[:1].lower() + why[1:]}"
            )  # fmt: skip
            raise ValueError(
                f"{why} need a floating-point image tensor [B, C, H, W] in the inputs, to "
                f"differentiate or perturb; {seen}."
            )
        return self.image

    def _batched(self, tensor: Tensor) -> bool:
        return tensor.dim() > 0 and self.length is not None and tensor.shape[0] == self.length

    def slice(self, start: int, stop: int) -> Batch:
        """Rows `start:stop` of every batched tensor; other values pass through."""
        return self.select(slice(start, stop))

    def select(self, rows: slice | Tensor) -> Batch:
        """The given rows (a slice or an index tensor) of every batched tensor."""
        data = map_tensors(self.data, lambda t: t[rows] if self._batched(t) else t)
        return Batch.of(data)

    def with_image(self, new_image: Tensor, rows: Tensor | None = None) -> Batch:
        """The image replaced by `new_image`, other batched tensors indexed by `rows` (kept
        whole when None): how noisy copies and interpolation steps are fed to the model."""
        image = self.require_image()

        def rebuild(tensor: Tensor) -> Tensor:
            if tensor is image:
                return new_image
            return tensor[rows] if rows is not None and self._batched(tensor) else tensor

        return Batch.of(map_tensors(self.data, rebuild))

    def to(self, device: torch.device | str) -> Batch:
        """Every tensor moved to `device`."""
        return Batch.of(move_to(self.data, device))

    def usable(self) -> Batch:
        """Inference-mode tensors cloned, so autograd may record operations on them."""
        if isinstance(self.data, Tensor) and not self.data.is_inference():
            return self
        return Batch.of(map_tensors(self.data, lambda t: t.clone() if t.is_inference() else t))
