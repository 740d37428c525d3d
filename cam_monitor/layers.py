"""Find layers: the names a user gives (dotted names, globs, modules), or one chosen for them.

Models are unwrapped first (DDP, DataParallel, `torch.compile`); layer outputs are viewed as
spatial maps `[B, C, h, w]` here too.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .batch import Batch
from .capture import Hook, scoped_hooks
from .isolation import isolated

if TYPE_CHECKING:
    from .options import ForwardFn

LayerSpec = str | nn.Module
Reshape = Callable[[Tensor], Tensor]

_GLOB_CHARS = re.compile(r"[*?\[]")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (`.module`) and `torch.compile` (`._orig_mod`) wrappers.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3))
        >>> unwrap_model(nn.DataParallel(net)) is net
        True
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
        if isinstance(model, wrappers):
            model = model.module
            continue
        return model


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    """`*` and `?` stay inside one dotted segment; `**` crosses segments."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i)
            if end == -1:
                out.append(re.escape(pattern[i]))
                i += 1
            else:
                out.append(pattern[i : end + 1].replace("[!", "[^"))
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _not_found(asked: str, names: list[str], model: nn.Module) -> ValueError:
    close = difflib.get_close_matches(asked, names, n=3, cutoff=0.0)
    hint = ", ".join(repr(c) for c in close) if close else "(the model has no submodules)"
    return ValueError(
        f"No layer named {asked!r} in {type(model).__name__}. Closest names: {hint}. "
        "Use a name from model.named_modules()."
    )


def _by_suffix(asked: str, names: list[str], model: nn.Module) -> str:
    """The one name ending in `.asked` (a net wrapped as `self.model` in a LightningModule)."""
    matches = [n for n in names if n.endswith("." + asked)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(
            f"Layer name {asked!r} is ambiguous in {type(model).__name__}: it ends "
            f"{', '.join(repr(m) for m in matches)}. Pass the full dotted name."
        )
    raise _not_found(asked, names, model)


def resolve_layers(
    model: nn.Module, layers: LayerSpec | Sequence[LayerSpec]
) -> list[tuple[str, nn.Module]]:
    """Return `(name, module)` for each requested layer, in the order asked, without repeats.

    Names are looked up after unwrapping DDP and `torch.compile`. A name that is not exact but
    ends exactly one module's dotted name (`"features.29"` for `model.features.29`) resolves to
    it. A glob such as `"features.*"` matches within one dotted segment (`**` crosses segments).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        >>> [name for name, _ in resolve_layers(net, "*")]
        ['0', '1', '2']
    """
    model = unwrap_model(model)
    named = {name: module for name, module in model.named_modules() if name}
    names = list(named)
    by_identity = {id(module): name for name, module in named.items()}
    specs: Iterable[LayerSpec] = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
    found: dict[str, nn.Module] = {}
    for spec in specs:
        if isinstance(spec, nn.Module):
            name = by_identity.get(id(spec))
            if name is None:
                raise ValueError(
                    f"The module {type(spec).__name__} passed as a layer is not a submodule of "
                    f"{type(model).__name__}. Pass a module from model.named_modules() or its name."
                )
            found.setdefault(name, spec)
        elif isinstance(spec, str):
            if _GLOB_CHARS.search(spec):
                regex = _glob_to_regex(spec)
                matches = [n for n in names if regex.match(n)]
                if not matches:
                    raise _not_found(spec, names, model)
                for name in matches:
                    found.setdefault(name, named[name])
            elif spec in named:
                found.setdefault(spec, named[spec])
            else:
                name = _by_suffix(spec, names, model)
                found.setdefault(name, named[name])
        else:
            raise TypeError(
                f"A layer must be a name, a glob or an nn.Module, got {type(spec).__name__}."
            )
    if not found:
        raise ValueError("No layer given: pass at least one layer name, glob or module.")
    return list(found.items())


def as_spatial(name: str, output: Tensor, reshape: Reshape | None = None) -> Tensor:
    """View a layer output as `[B, C, h, w]`: as is, via `reshape`, or from square-grid tokens.

    Tokens `[B, N, C]` are accepted when `N` is a square, or a square plus one leading
    class token, which is dropped.

    Example:
        >>> import torch
        >>> as_spatial("blocks.0", torch.zeros(2, 1 + 16, 8)).shape
        torch.Size([2, 8, 4, 4])
    """
    if reshape is not None:
        output = reshape(output)
        if not isinstance(output, Tensor) or output.dim() != 4:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"reshape() must return a [B, C, H, W] tensor for layer {name!r}, got {shape}."
            )
        return output
    if output.dim() == 4:
        return output
    if output.dim() == 3:
        batch, tokens, channels = output.shape
        for skip in (0, 1):
            side = round((tokens - skip) ** 0.5)
            if side > 0 and side * side == tokens - skip:
                grid = output[:, skip:, :]
                return grid.transpose(1, 2).reshape(batch, channels, side, side)
    raise ValueError(
        f"Layer {name!r} outputs shape {tuple(output.shape)}; a CAM needs a spatial map "
        "[B, C, H, W] or tokens [B, N, C] on a square grid (optionally after one class token). "
        "Pick a convolutional layer, or pass reshape= to turn this output into [B, C, H, W]."
    )


_POOLING = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d,
)  # fmt: skip


def first_spatial_layer(module: nn.Module, inputs: Any, forward: ForwardFn | None) -> str:
    """Name of the last module (run once, not a pooling layer) whose output is `[B, C, h, w]`.

    Used when no layer is configured: one isolated no-grad forward on `inputs` (any nested
    batch), with scoped hooks on every submodule.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(4, 2))
        >>> batch = {"pixels": torch.zeros(2, 3, 8, 8)}
        >>> first_spatial_layer(net, batch, lambda model, b: model(b["pixels"]))
        '1'
    """
    seen: dict[str, int] = {}
    order: list[str] = []
    spatial: set[str] = set()

    def make_hook(name: str, layer: nn.Module) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_: nn.Module, __: Any, output: Any) -> None:
            seen[name] = seen.get(name, 0) + 1
            order.append(name)
            if isinstance(output, Tensor) and output.dim() == 4 and output.shape[-2:].numel() > 1:
                if not isinstance(layer, _POOLING):
                    spatial.add(name)

        return hook

    data = Batch.of(inputs).data
    hooks: list[Hook] = [(m, "forward", make_hook(n, m)) for n, m in module.named_modules() if n]
    with scoped_hooks(hooks), isolated(module), torch.no_grad():
        module(data) if forward is None else forward(module, data)
    candidates = [n for n in order if n in spatial and seen[n] == 1]
    if not candidates:
        raise ValueError(
            f"{type(module).__name__} has no layer with a spatial [B, C, H, W] output; pass "
            "layer= explicitly (with reshape= for token outputs)."
        )
    return candidates[-1]
