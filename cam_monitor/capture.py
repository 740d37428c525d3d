"""Scoped module hooks: one helper that registers, yields and always removes, and the recorder.

Every hook the package puts on a user's model goes through `scoped_hooks`, so after each call
every module has exactly the hook dictionaries it had before, also when the forward raises.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

#: Which module hook a registration adds: `register_forward_hook`, `register_forward_pre_hook`,
#: or the latter `with_kwargs=True` (`fn(module, args, kwargs)`, for inputs passed by keyword).
HookKind = Literal["forward", "forward_pre", "forward_pre_kwargs"]
Hook = tuple[nn.Module, HookKind, Callable[..., Any]]


class LayerCaptureError(ValueError):
    """A chosen layer cannot be read: it returned a non-tensor, ran twice, or did not run.

    A `ValueError` because the fix is another `layer` (or `reshape=`, `output_transform=`).
    """


def scoped_hooks(hooks: Iterable[Hook]) -> AbstractContextManager[list[RemovableHandle]]:
    """Register `(module, kind, fn)` hooks for the block; remove them all in `finally`.

    Registration happens inside the `try`, so hooks added before a failing registration are
    removed too; removal is idempotent (a handle removed twice is a no-op).

    Example:
        >>> conv = nn.Conv2d(3, 2, 1)
        >>> seen = []
        >>> with scoped_hooks([(conv, "forward", lambda m, a, out: seen.append(out.shape))]):
        ...     _ = conv(torch.zeros(1, 3, 4, 4))
        >>> seen, len(conv._forward_hooks)
        ([torch.Size([1, 2, 4, 4])], 0)
    """
    return _ScopedHooks(hooks)


class _ScopedHooks:
    """`scoped_hooks`' context manager (a class: a CAM call on a small model is bound by such
    host work, and a generator-based one costs twice as much)."""

    def __init__(self, hooks: Iterable[Hook]) -> None:
        self.hooks = hooks
        self.handles: list[RemovableHandle] = []

    def __enter__(self) -> list[RemovableHandle]:
        handles = self.handles
        try:
            for module, kind, fn in self.hooks:
                if kind == "forward":
                    handles.append(module.register_forward_hook(fn))
                elif kind == "forward_pre":
                    handles.append(module.register_forward_pre_hook(fn))
                elif kind == "forward_pre_kwargs":
                    handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
                else:
                    raise ValueError(
                        "hook kind must be 'forward', 'forward_pre' or 'forward_pre_kwargs', got "
                        f"{kind!r}."
                    )
        except BaseException:
            self.__exit__()
            raise
        return handles

    def __exit__(self, *exc_info: object) -> None:
        for handle in reversed(self.handles):
            handle.remove()


#: A module's hook tables, with the words a message uses for them.
_HOOK_TABLES = (
    ("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
    ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"),
)  # fmt: skip
#: Packages whose hooks are how a model computes (spectral and weight norm, pruning,
#: quantization observers) or Lightning's own: not the user's.
_LIBRARY_PACKAGES = ("torch", "lightning", "pytorch_lightning", "lightning_fabric")


def users_hooks(model: nn.Module) -> list[str]:
    """`'name' (kind)` for each module hook of the model, and each global module hook, that
    comes from the user's code rather than from torch or Lightning: hooks that an evaluation's
    forward (and backward) will call.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        >>> _ = nn.utils.spectral_norm(net[0])  # torch's own pre-hook: part of the model
        >>> _ = net[1].register_forward_hook(lambda module, args, output: None)
        >>> users_hooks(net)
        ["'1' (forward hook)"]
    """
    found = [
        f"{name!r} ({kind})"
        for name, module in model.named_modules()
        for table, kind in _HOOK_TABLES
        for hook in getattr(module, table).values()
        if not _from_library(hook)
    ]
    tables = torch.nn.modules.module
    for table, kind in _HOOK_TABLES:
        hooks = getattr(tables, f"_global{table}", {}).values()
        found.extend(f"every module (global {kind})" for hook in hooks if not _from_library(hook))
    return found


def users_hooks_warning(model: nn.Module) -> str | None:
    """What the monitor tells a user whose model carries hooks of their own; None without."""
    hooks = users_hooks(model)
    if not hooks:
        return None
    shown = ", ".join(hooks[:6]) + (f" and {len(hooks) - 6} more" if len(hooks) > 6 else "")
    return (
        f"CamMonitor: the model carries hooks of yours ({shown}). Each evaluation runs the "
        "model's forward on the probe and a backward from the chosen layers, so they run too: "
        "forward hooks at every evaluation, backward hooks where they sit between a chosen layer "
        "and the output. The monitor leaves them in place and cannot tell what they do; if a hook "
        "keeps state between calls that training uses (features appended for a loss, counters, "
        "gradient statistics), skip that bookkeeping when `not module.training`: the monitor "
        "runs the model in eval mode."
    )


def _from_library(hook: Callable[..., Any]) -> bool:
    """Whether a hook is defined in torch or Lightning."""
    while isinstance(hook, functools.partial):
        hook = hook.func
    package = str(getattr(hook, "__module__", None) or "").partition(".")[0]
    return package in _LIBRARY_PACKAGES


def not_a_tensor(name: str, output: object) -> LayerCaptureError:
    """The error for a layer whose output is not one tensor."""
    return LayerCaptureError(
        f"Layer {name!r} returned {type(output).__name__}, not a tensor; pick a submodule that "
        "returns a single tensor."
    )


def ran_twice(name: str) -> LayerCaptureError:
    """The error for a layer called more than once in one forward."""
    parent = name.rpartition(".")[0]
    caller = ""
    if parent:
        caller = f"the module calling it ({parent!r}), whose output may be its last call's, or "
    return LayerCaptureError(
        f"Layer {name!r} ran more than once in one forward (a shared or reused module, such as "
        "the one `relu` a torchvision ResNet block calls after each conv), so its CAM is "
        f"ambiguous; pick a layer that runs once: {caller}the layer right before the call you "
        "mean."
    )


def did_not_run(names: list[str]) -> LayerCaptureError:
    """The error for layers that never ran during the forward."""
    return LayerCaptureError(
        f"Layer(s) {names} did not run during the forward pass, so they have no map. Pick "
        "layers on the path from the input to the output."
    )


class NoGradientError(LayerCaptureError):
    """No gradient reaches a chosen layer (or the input) from the class score: the model cuts it
    off from autograd, so every gradient map there would be zero."""


def no_gradient(names: list[str], reentrant: bool = False) -> NoGradientError:
    """The error for layers (or `"the input"`) that get no gradient from the class score."""
    if reentrant:
        cause = (
            "the model uses reentrant activation checkpointing (torch.utils.checkpoint with "
            "use_reentrant=True), which cannot give gradients w.r.t. a layer or the input; "
            "pass use_reentrant=False to checkpoint()"
        )
    else:
        cause = (
            "likely causes: the model runs the layer under torch.no_grad() or "
            "torch.inference_mode() inside forward (to freeze a backbone, set requires_grad_("
            "False) on its parameters instead); reentrant activation checkpointing "
            "(torch.utils.checkpoint with use_reentrant=True: pass use_reentrant=False); or a "
            ".detach() between the layer and the logits"
        )
    return NoGradientError(
        f"No gradient reaches {', '.join(repr(n) for n in names)} from the class score, so "
        f"gradient maps there would be all zero; {cause}. Remove the cut, or pick a layer "
        "after it."
    )


def capture_outputs(
    layers: Mapping[str, nn.Module], graph_from_first: bool = False, also: Iterable[Hook] = ()
) -> AbstractContextManager[dict[str, Tensor]]:
    """Record each layer's output during the forward run inside the block.

    Each recorded tensor is a graph node that requires grad (a detached leaf if the layer's
    own output did not, e.g. a frozen backbone), and the layer hands a clone of it downstream,
    so in-place ops after the layer (`ReLU(inplace=True)`) cannot overwrite what was recorded.
    A layer that runs twice in one forward raises `LayerCaptureError`: its CAM would be
    ambiguous. Hooks are removed in `finally`, also when the forward raises; `also` are more
    hooks for the same block (registered after these, through `scoped_hooks`).

    With `graph_from_first`, the forward runs without autograd until the first recorded layer
    and with it from there on: gradients w.r.t. the recorded outputs are the same, but nothing
    upstream is kept for backward (no gradient reaches the input or early parameters then).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(inplace=True))
        >>> with capture_outputs({"0": net[0]}) as outs:
        ...     _ = net(torch.randn(1, 3, 8, 8))
        >>> outs["0"].shape, len(net[0]._forward_hooks)
        (torch.Size([1, 2, 6, 6]), 0)
    """
    return _Capture(layers, graph_from_first, also)


class _Capture:
    """`capture_outputs`' context manager."""

    def __init__(
        self, layers: Mapping[str, nn.Module], graph_from_first: bool, also: Iterable[Hook]
    ) -> None:
        self.recorded: dict[str, Tensor] = {}
        self.graph_from_first = graph_from_first and bool(layers)
        hooks: list[Hook] = [
            (module, "forward", self._hook(name, graph_from_first))
            for name, module in layers.items()
        ]
        hooks.extend(also)
        self.hooks = _ScopedHooks(hooks)
        self.grad_mode = True

    def _hook(self, name: str, graph_from_first: bool) -> Callable[[nn.Module, Any, Any], Tensor]:
        recorded = self.recorded

        def hook(module: nn.Module, args: Any, output: Any) -> Tensor:
            if not isinstance(output, Tensor):
                raise not_a_tensor(name, output)
            if name in recorded:
                raise ran_twice(name)
            if graph_from_first:
                torch.set_grad_enabled(True)
            node = output if output.requires_grad else output.detach().requires_grad_(True)
            recorded[name] = node
            return node.clone()

        return hook

    def __enter__(self) -> dict[str, Tensor]:
        self.grad_mode = torch.is_grad_enabled()
        self.hooks.__enter__()
        if self.graph_from_first:
            torch.set_grad_enabled(False)
        return self.recorded

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.hooks.__exit__()
        finally:
            torch.set_grad_enabled(self.grad_mode)
