"""Channel views ("filter views"): what chosen channels of a layer respond to, on a probe or by
optimisation.

Both functions run under `isolated(model)` (eval mode, forked RNG, modes restored), stop the
forward at the layer with a scoped hook removed in `finally`, and never touch parameters or
their `.grad`: activation maximisation differentiates w.r.t. an image the function owns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .batch import Batch
from .capture import did_not_run, not_a_tensor, scoped_hooks
from .isolation import isolated
from .layers import as_spatial, resolve_layers, token_layout, unwrap_model
from .types import ForwardFn, LayerSpec, Reshape


class _LayerReached(Exception):
    """Raised by the hook to end the forward once the layer has produced its output."""


def one_layer(model: nn.Module, layer: LayerSpec) -> tuple[str, nn.Module]:
    """The one `(full name, module)` that `layer` names in `model`; a ValueError otherwise."""
    found = resolve_layers(model, layer)
    if len(found) != 1:
        names = [name for name, _ in found]
        raise ValueError(f"Filter views need exactly one layer, but {layer!r} matches {names}.")
    return found[0]


def _layer_output(
    model: nn.Module,
    inputs: Any,
    name: str,
    layer: nn.Module,
    forward: ForwardFn | None,
    reshape: Reshape | None,
    size: tuple[int, int] | None,
) -> Tensor:
    """The layer's output as `[B, C, h, w]` for an input of `size` (read as the engine reads
    it: channels-last and token outputs too); the forward stops right after the layer."""
    recorded: list[Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if not isinstance(output, Tensor):
            raise not_a_tensor(name, output)
        recorded.append(output)
        raise _LayerReached

    with scoped_hooks([(layer, "forward", hook)]):
        try:
            forward(model, inputs) if forward is not None else model(inputs)
        except _LayerReached:
            pass
    if not recorded:
        raise did_not_run([name])
    output = recorded[0]
    layout = token_layout(model, name) if output.dim() == 3 else None
    return as_spatial(name, output, reshape, size, layer, layout, Batch.of(inputs).length)


def _channel_list(channels: int | Sequence[int], available: int, name: str) -> list[int]:
    chosen = [channels] if isinstance(channels, int) else list(channels)
    if not chosen:
        raise ValueError("Pass at least one channel index.")
    for channel in chosen:
        if isinstance(channel, bool) or not isinstance(channel, int):
            raise TypeError(f"Channel indices must be ints, got {channel!r}.")
        if not 0 <= channel < available:
            raise ValueError(
                f"Channel {channel} is outside layer {name!r}'s {available} channels "
                f"(valid: 0..{available - 1})."
            )
    return chosen


def filter_activations(
    model: nn.Module,
    inputs: Any,
    layer: LayerSpec,
    channels: int | Sequence[int],
    *,
    forward: ForwardFn | None = None,
    reshape: Reshape | None = None,
) -> Tensor:
    """Activation maps of `channels` of `layer` for a batch: float32 `[B, len(channels), h, w]`.

    One forward (stopped at the layer) in eval mode; raw, signed values as the layer emits them.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
        >>> filter_activations(net, torch.randn(5, 3, 16, 16), "1", [0, 3]).shape
        torch.Size([5, 2, 14, 14])
    """
    module = unwrap_model(model)
    name, target = one_layer(module, layer)
    with isolated(module), torch.no_grad():
        batch = Batch.of(inputs).usable()
        output = _layer_output(module, batch.data, name, target, forward, reshape, batch.image_size)
        chosen = _channel_list(channels, output.shape[1], name)
        index = torch.tensor(chosen, device=output.device)
        return output.index_select(1, index).float()


def visualize_filter(
    model: nn.Module,
    layer: LayerSpec,
    channel: int | Sequence[int],
    steps: int = 64,
    lr: float = 0.1,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    *,
    in_channels: int = 3,
    forward: ForwardFn | None = None,
    reshape: Reshape | None = None,
) -> Tensor:
    """Activation maximisation: images `[len(channel), in_channels, H, W]` that excite each channel.

    Each image starts as N(0, 0.1^2) noise from a generator seeded with `seed` and takes
    `steps` Adam steps (learning rate `lr`) up the mean activation of its channel; several
    channels are optimised together in one batch. Unconstrained and unregularised: normalise
    the result for display. Model parameters, `.grad`, modes and the global RNG are untouched.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> visualize_filter(net, "0", 2, steps=3, size=(8, 8)).shape
        torch.Size([1, 3, 8, 8])
    """
    module = unwrap_model(model)
    name, target = one_layer(module, layer)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}.")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}.")
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"size must be (H, W) with positive ints, got {size!r}.")
    tensors = [*module.parameters(), *module.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    generator = torch.Generator(device=device).manual_seed(seed)
    count = 1 if isinstance(channel, int) else len(channel)
    shape = (max(count, 1), in_channels, *size)
    start = 0.1 * torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    image = start.to(dtype).requires_grad_(True)
    optimizer = torch.optim.Adam([image], lr=lr)
    with isolated(module):
        with torch.no_grad():
            probe = _layer_output(module, image, name, target, forward, reshape, size)
        chosen = _channel_list(channel, probe.shape[1], name)
        rows = torch.arange(len(chosen), device=device)
        index = torch.tensor(chosen, device=device)
        for _ in range(steps):
            activation = _layer_output(module, image, name, target, forward, reshape, size)
            objective = activation[rows, index].float().mean(dim=(1, 2)).sum()
            (grad,) = torch.autograd.grad(-objective, image)
            image.grad = grad
            optimizer.step()
    return image.detach()
