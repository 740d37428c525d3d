"""Run a CAM computation without leaving a trace on the model, its buffers or the RNG."""

from __future__ import annotations

import operator
import random
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy


@contextmanager
def isolated(model: nn.Module) -> Iterator[None]:
    """Eval mode, grad enabled, forked random streams; every module's `training` flag, and
    every parameter and buffer the forward changes, put back after.

    Eval mode freezes BatchNorm statistics and silences dropout; the fork means random
    draws inside the block (torch's on the CPU and the model's CUDA devices, numpy's and
    Python's) do not shift the training streams; grad is enabled even when the caller is under
    `no_grad` or `inference_mode`. Tensors a forward updates whatever the mode (a step counter,
    a quantization observer, a queue, an EMA teacher) are restored: see `TensorState`.

    Example:
        >>> net = nn.Sequential(nn.BatchNorm1d(2), nn.Dropout())
        >>> net[1].eval()  # doctest: +ELLIPSIS
        Dropout(...)
        >>> with isolated(net):
        ...     net.training, net[1].training, torch.is_grad_enabled()
        (False, False, True)
        >>> net.training, net[0].training, net[1].training
        (True, True, False)
    """
    modules = list(model.modules())
    flags = [module.training for module in modules]
    with torch.inference_mode(False):
        state = TensorState(model, modules)
    cuda = [d.index or 0 for d in state.devices if d.type == "cuda"]
    try:
        with preserved_rng(cuda), torch.inference_mode(False):
            with torch.enable_grad():
                if any(flags):
                    set_training(model, False)
                yield
    finally:
        for module, flag in zip(modules, flags, strict=True):
            if module.training != flag:
                _set_flag(module, flag)
        with torch.inference_mode(False), torch.no_grad():
            lost = state.restore()
        if lost:
            warnings.warn(
                f"The model's forward changed {', '.join(lost)} in eval mode, inside a CAM "
                "computation (an in-place update in forward that does not check "
                "`self.training`: an EMA teacher, a counter, an Embedding with max_norm?). It "
                "had no copy of them yet, so this change stays and training goes on from the "
                "changed values; from now on they are copied and put back (dense tensors; sparse "
                "ones cannot be). Make the update only when `self.training` is True, or move it "
                "to training_step.",
                stacklevel=3,
            )


@contextmanager
def preserved_rng(devices: Sequence[int] = ()) -> Iterator[None]:
    """Python's, numpy's and torch's random streams (the CPU's and those of the CUDA
    `devices`) as they were before the block, whatever it draws."""
    state = (random.getstate(), np.random.get_state())
    try:
        with torch.random.fork_rng(devices=list(devices)):
            yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


# Per model: the `(id(module), table, name)` of tensors its forward changed inside an earlier
# `isolated` block, copied before each later one so they can be put back.
_CHANGING: weakref.WeakKeyDictionary[nn.Module, set[tuple[int, str, str]]] = (
    weakref.WeakKeyDictionary()
)


class TensorState:
    """Every parameter and buffer of `modules` as found: its object and version counter, and a
    copy of every buffer at a model's first block (then of the tensors seen changing).

    `restore()` puts back replaced tensors and copies back those changed in place, and returns
    the names of changes it had no copy for (parameters the forward writes, the first time),
    learning them. Version counters make the check free; `.data` writes (and some native ops,
    such as the fused observers of quantization-aware training) bypass them, so the first block
    compares buffers by value, and later ones copy back every tensor with a copy. Tensors never
    seen changing are never written.
    """

    def __init__(self, model: nn.Module, modules: Sequence[nn.Module]) -> None:
        self.model, self.modules = model, modules
        self.first = model not in _CHANGING
        self.known = known = _CHANGING.setdefault(model, set())
        # Which tensor each module held under each name (shallow copies of its two tables), and
        # the version counter of each, in walk order: all a call that changes nothing reads.
        self.tables = [(module._parameters.copy(), module._buffers.copy()) for module in modules]
        # A lazy tensor is left out: its first forward initialises it, wherever that runs.
        self.tensors = _tensors(self.tables)
        self.versions = [tensor._version for tensor in self.tensors]
        self.devices = sorted({tensor.device for tensor in self.tensors}, key=str)
        self.copies: dict[tuple[int, str, str], Tensor] = {}
        if not (self.first or known):
            return
        for index, (module, tables) in enumerate(zip(modules, self.tables, strict=True)):
            for kind, table in zip(_KINDS, tables, strict=True):
                every = self.first and kind == "_buffers"
                for name, tensor in table.items():
                    if tensor is None or type(tensor) not in _PLAIN:
                        continue  # a subclass: checked by its version counter only
                    if tensor.layout is torch.strided and (
                        every or (id(module), kind, name) in known
                    ):
                        copy = _copy(tensor)
                        if copy is not None:
                            self.copies[index, kind, name] = copy

    def restore(self) -> list[str]:
        """Put every changed tensor back; the qualified names of changes without a copy."""
        if not self.copies and self._untouched():
            return []
        lost: list[tuple[nn.Module, str]] = []
        position = 0  # in `self.tensors`, walked in the same order
        for index, (module, tables) in enumerate(zip(self.modules, self.tables, strict=True)):
            for kind, table in zip(_KINDS, tables, strict=True):
                now = getattr(module, kind)
                for name, tensor in table.items():
                    if position == len(self.tensors) or tensor is not self.tensors[position]:
                        continue  # None, or lazy when found (it may have been made since)
                    version = self.versions[position]
                    position += 1
                    copy = self.copies.get((index, kind, name))
                    replaced = now.get(name) is not tensor
                    changed = tensor._version != version
                    if not (replaced or changed) and copy is not None:
                        # Writes through `.data` or by some native ops bypass the version
                        # counter: the first block compares, later ones copy back anyway.
                        changed = not self.first or not _equal(tensor, copy)
                    if not (replaced or changed):
                        continue
                    self.known.add((id(module), kind, name))
                    if replaced:
                        now[name] = tensor
                    if changed and copy is not None and copy.shape == tensor.shape:
                        tensor.copy_(copy)
                    elif changed and copy is not None:  # resized through `.data`
                        tensor.data = copy
                    elif changed:
                        lost.append((module, name))
        if not lost:
            return []
        names = {id(m): n for n, m in self.model.named_modules()}
        return [".".join(filter(None, (names.get(id(m), "?"), n))) for m, n in lost]

    def _untouched(self) -> bool:
        """Whether every tensor is still in its place with its version: nothing to put back."""
        if [tensor._version for tensor in self.tensors] != self.versions:
            return False
        now = _tensors((module._parameters, module._buffers) for module in self.modules)
        return len(now) == len(self.tensors) and all(map(operator.is_, now, self.tensors))


def _tensors(tables: Iterable[tuple[dict[str, Tensor | None], ...]]) -> list[Tensor]:
    """The tensors of the modules' tables in walk order, lazy ones (not yet made) left out."""
    return [
        tensor
        for pair in tables
        for table in pair
        for tensor in table.values()
        if tensor is not None and (type(tensor) in _PLAIN or not is_lazy(tensor))
    ]


def _copy(tensor: Tensor) -> Tensor | None:
    """A copy of `tensor`, or None for a dtype that cannot be copied here (a bit type under
    deterministic algorithms, which fill new memory first): checked by its version only."""
    try:
        return tensor.detach().clone()
    except (RuntimeError, NotImplementedError):
        return None


def _equal(a: Tensor, b: Tensor) -> bool:
    """`torch.equal`, or True for the few dtypes and devices it has no kernel for (meta,
    bit types): those are checked by their version counters only."""
    try:
        return torch.equal(a, b)
    except (RuntimeError, NotImplementedError):
        return True


#: The two tables of a module a forward may change, in walk order.
_KINDS = ("_parameters", "_buffers")
#: Plain tensor types: never lazy (this skips `is_lazy`'s isinstance check), and the only ones
#: copied (a subclass may have no `clone` or `equal`).
_PLAIN = (Tensor, nn.Parameter)


def set_training(module: nn.Module, mode: bool) -> None:
    """What `module.train(mode)` does, a few times faster on a large model: a module whose
    class defines its own `train()` gets that called, the others have the flag set directly.

    `Module.__setattr__` looks the name up among parameters, buffers and submodules first:
    about 2 us a module, a third of a millisecond on a resnet50 per switch, twice a CAM call.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> set_training(net, False)
        >>> net.training, net[1].training
        (False, False)
    """
    if type(module).train is not nn.Module.train:
        module.train(mode)
        return
    _set_flag(module, mode)
    for child in module._modules.values():
        if child is not None:
            set_training(child, mode)


def _set_flag(module: nn.Module, mode: bool) -> None:
    """`module.training = mode`, past `Module.__setattr__` where the class keeps the default."""
    if type(module).__setattr__ is nn.Module.__setattr__:
        object.__setattr__(module, "training", mode)
    else:
        module.training = mode
