"""Scoped forward hooks: record chosen layer outputs for one forward, then remove every hook."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


class LayerCaptureError(RuntimeError):
    """A captured layer misbehaved during the forward (not a tensor, or called twice)."""


@contextmanager
def capture_outputs(
    layers: Mapping[str, nn.Module], graph_from_first: bool = False
) -> Iterator[dict[str, Tensor]]:
    """Record each layer's output during the forward run inside the block.

    Each recorded tensor is a graph node that requires grad (a detached leaf if the layer's
    own output did not, e.g. a frozen backbone), and the layer hands a clone of it downstream,
    so in-place ops after the layer (`ReLU(inplace=True)`) cannot overwrite what was recorded.
    A layer that runs twice in one forward raises `LayerCaptureError`: its CAM would be
    ambiguous. Hooks are removed in `finally`, also when the forward raises.

    With `graph_from_first`, the forward runs without autograd until the first recorded layer
    and with it from there on: gradients w.r.t. the recorded outputs are the same, but nothing
    upstream is kept for backward (no gradient reaches the input or early parameters then).

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(inplace=True))
        >>> with capture_outputs({"0": net[0]}) as outs:
        ...     _ = net(torch.randn(1, 3, 8, 8))
        >>> outs["0"].shape, len(net[0]._forward_hooks)
        (torch.Size([1, 2, 6, 6]), 0)
    """
    recorded: dict[str, Tensor] = {}
    handles = []

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Tensor:
            if not isinstance(output, Tensor):
                raise LayerCaptureError(
                    f"Layer {name!r} returned {type(output).__name__}, not a tensor; "
                    "pick a submodule that returns a single tensor."
                )
            if name in recorded:
                raise LayerCaptureError(
                    f"Layer {name!r} ran more than once in one forward (a shared or reused "
                    "module), so its CAM is ambiguous; pick a layer that runs once."
                )
            if graph_from_first:
                torch.set_grad_enabled(True)
            node = output if output.requires_grad else output.detach().requires_grad_(True)
            recorded[name] = node
            return node.clone()

        return hook

    grad_mode = torch.is_grad_enabled()
    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        if graph_from_first and layers:
            torch.set_grad_enabled(False)
        yield recorded
    finally:
        torch.set_grad_enabled(grad_mode)
        for handle in handles:
            handle.remove()
