"""The type aliases the modules share, in a leaf that imports only torch and typing.

Any module can name these without importing a heavy module for a name, and no import circle
forms through type hints (as captum's `_utils/typing.py` and timm's `layers/typing.py` do).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

#: A layer as a user names it: a dotted name from `model.named_modules()`, a glob, or the module.
LayerSpec = str | nn.Module

#: Turns a layer's output into a `[B, C, H, W]` map (token outputs, unusual layouts).
Reshape = Callable[[Tensor], Tensor]

#: Runs the model on a (nested) batch: `forward(model, batch) -> output`.
ForwardFn = Callable[[nn.Module, Any], Any]

#: Picks the logits from a model's output: a tuple index, a dict key, or a callable.
OutputTransform = int | str | Callable[[Any], Tensor] | None

#: The class explained: 'predicted', 'label', an int, a LongTensor [B], or a callable; for
#: segmentation logits `[B, C, H, W]` also `(class, pixel_mask)`: that class over those pixels.
Target = str | int | Tensor | Callable[[Tensor], Tensor] | tuple[int | Tensor, Tensor]

#: What `probe=` may be, per probe set: a Tensor, an (inputs, labels[, masks]) tuple, a dict
#: batch, a Dataset or a DataLoader.
ProbeSpec = Any
