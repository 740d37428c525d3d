"""Run a CAM computation without leaving a trace on the model, its buffers or the RNG."""

from __future__ import annotations

import _random
import ctypes
import operator
import platform
import random
import struct
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from .notices import warn


def isolated(model: nn.Module) -> AbstractContextManager[None]:
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
    return _Isolation(model)


class _Isolation:
    """`isolated`'s context manager: a class, not a generator, since a CAM call on a small
    model is bound by such host work. Under `inference_mode`, the whole block (the copies, the
    computation, the restore) runs under `inference_mode(False)`; otherwise grad mode is set
    and put back directly."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.guard: torch.inference_mode | None = None
        self.grad: bool | None = None
        self.rng: RandomStates | None = None
        self.flags: TrainingFlags | None = None
        self.state: TensorState | None = None

    def __enter__(self) -> None:
        if torch.is_inference_mode_enabled():
            self.guard = torch.inference_mode(False)
            self.guard.__enter__()
        try:
            self.flags = flags = TrainingFlags(self.model)
            self.state = TensorState(self.model, flags.modules)
            self.rng = RandomStates(self.state.cuda)
            self.grad = torch.is_grad_enabled()
            torch.set_grad_enabled(True)
            if any(flags.flags):
                set_training(self.model, False)
        except BaseException:
            self._exit()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self._exit()

    def _exit(self) -> None:
        lost: list[str] = []
        try:
            if self.grad is not None:
                torch.set_grad_enabled(self.grad)
            if self.rng is not None:
                self.rng.restore()
            if self.flags is not None:
                self.flags.restore()
            if self.state is not None:
                lost = self.state.restore()
        finally:
            if self.guard is not None:
                self.guard.__exit__(None, None, None)
        if lost:
            warn(
                f"The model's forward changed {', '.join(lost)} in eval mode, inside a CAM "
                "computation (an in-place update in forward that does not check "
                "`self.training`: an EMA teacher, a counter, an Embedding with max_norm?). It "
                "had no copy of them yet, so this change stays and training goes on from the "
                "changed values; from now on they are copied and put back (dense tensors; sparse "
                "ones cannot be). Make the update only when `self.training` is True, or move it "
                "to training_step.",
                stacklevel=3,
            )


class TrainingFlags:
    """Every module's `training` flag as found (`modules` in `all_modules` order); `restore()`
    puts back those changed since."""

    __slots__ = ("flags", "modules")

    def __init__(self, model: nn.Module) -> None:
        self.modules = all_modules(model)
        self.flags = [module.training for module in self.modules]

    def restore(self) -> None:
        """Every flag as found."""
        for module, flag in zip(self.modules, self.flags, strict=True):
            if module.training != flag:
                _set_flag(module, flag)


def all_modules(model: nn.Module) -> list[nn.Module]:
    """`list(model.modules())`, without a generator per module (3x faster), where no module
    defines its own `named_modules`.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> all_modules(net) == list(net.modules())
        True
    """
    if type(model).modules is not _MODULES:
        return list(model.modules())
    found: list[nn.Module] = []
    memo: set[nn.Module] = set()
    stack = [model]
    while stack:  # depth first, children in order, each module once: named_modules' walk
        module = stack.pop()
        if module in memo:
            continue
        if type(module).named_modules is not _NAMED_MODULES:
            return list(model.modules())
        memo.add(module)
        found.append(module)
        children = module._modules
        if children:
            stack.extend([child for child in reversed(children.values()) if child is not None])
    return found


_MODULES = nn.Module.modules
_NAMED_MODULES = nn.Module.named_modules


@contextmanager
def preserved_rng(devices: Sequence[int] = ()) -> Iterator[None]:
    """Python's, numpy's and torch's random streams (the CPU's and those of the CUDA
    `devices`) as they were before the block, whatever it draws."""
    states = RandomStates(devices)
    try:
        yield
    finally:
        states.restore()


class RandomStates:
    """Python's, numpy's and torch's random states (the CPU's and those of the CUDA `devices`)
    as found; `restore()` puts them back.

    `random.getstate()` and `np.random.get_state()` build a tuple of 625 ints and an array of
    624 (80 us, most of a CAM call's host time on a small model): where `RawStates` was checked
    on this interpreter and numpy, the same states are copied as bytes instead (1 us).
    """

    __slots__ = ("cpu", "cuda", "devices", "saved", "tuples")

    def __init__(self, devices: Sequence[int] = ()) -> None:
        raw = RawStates.get()
        generators = _global_generators() if raw is not None else None
        if raw is not None and generators is not None:
            self.saved: _Saved | None = raw.views(*generators).save()
            self.tuples: tuple[Any, Any] | None = None
        else:
            self.saved = None
            self.tuples = (random.getstate(), np.random.get_state())
        self.devices = devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(device) for device in devices]

    def restore(self) -> None:
        """Put every state back."""
        torch.set_rng_state(self.cpu)
        for device, device_state in zip(self.devices, self.cuda, strict=True):
            torch.cuda.set_rng_state(device_state, device)
        if self.saved is not None:
            views = self.saved[0]
            if views.legacy._bit_generator is not views.bit_generator:  # replaced in the block
                np.random.set_bit_generator(views.bit_generator)
            views.restore(self.saved)
        elif self.tuples is not None:
            random.setstate(self.tuples[0])
            np.random.set_state(self.tuples[1])


#: What `_StateViews.save` copied: the views, then Python's words, its `gauss_next`, numpy's
#: key and position, its cached Gaussian.
_Saved = tuple["_StateViews", bytes, Any, bytes, bytes]


class _StateViews:
    """Memory views of one Python and one numpy generator's states (holding both generators
    and the bit generator, so the memory stays theirs)."""

    __slots__ = ("bit_generator", "gauss", "legacy", "numpy_mt", "python", "python_mt")

    def __init__(self, python: random.Random, legacy: np.random.RandomState, offset: int) -> None:
        self.python, self.legacy = python, legacy
        self.bit_generator = bit_generator = legacy._bit_generator
        address = int(bit_generator.ctypes.state_address)
        self.python_mt = _view(id(python) + _HEADER, _PY_MT_BYTES)
        self.numpy_mt = _view(address, _NP_MT_BYTES)
        self.gauss = _view(id(legacy) + offset, _GAUSS_BYTES)

    def save(self) -> _Saved:
        """The states' bytes, as they are now."""
        return (
            self,
            self.python_mt.tobytes(),
            self.python.gauss_next,  # type: ignore[attr-defined]
            self.numpy_mt.tobytes(),
            self.gauss.tobytes(),
        )

    def restore(self, saved: _Saved) -> None:
        """Put back what `save` copied."""
        self.python_mt[:] = saved[1]
        self.python.gauss_next = saved[2]  # type: ignore[attr-defined]
        self.numpy_mt[:] = saved[3]
        self.gauss[:] = saved[4]


def _view(address: int, size: int) -> memoryview:
    """The `size` bytes at `address`, writable (copied with plain memoryview operations: a
    ctypes call costs twice as much)."""
    return memoryview((ctypes.c_char * size).from_address(address)).cast("B")


class RawStates:
    """The states of Python's `random` and numpy's legacy `RandomState` copied as bytes.

    Python's: the Mersenne Twister's index and 624 words (the fields after the object's header)
    and `gauss_next`. numpy's: the MT19937 key and position, at the address of numpy's
    documented `bit_generator.ctypes.state_address`, and the cached Gaussian (`has_gauss`,
    `gauss`), whose place in a `RandomState` is found by setting known values.

    `get()` builds it once and checks it on private generators: draws of every kind (through a
    twist, odd numbers of Gaussians, a reseed), with and without a cached Gaussian, are undone
    exactly as `random.setstate` and `np.random.set_state` undo them, as `getstate()` and
    `get_state()` read. Where a check fails it is None, and `preserved_rng` uses the tuples.
    """

    def __init__(self, gauss_offset: int) -> None:
        self.gauss_offset = gauss_offset
        self._last: _StateViews | None = None

    @staticmethod
    def get() -> RawStates | None:
        """The checked copier, or None where the states must go through the tuples."""
        raw = _RAW.get("raw", False)
        if raw is False:
            raw = _RAW["raw"] = RawStates.build()
        return raw

    @staticmethod
    def build() -> RawStates | None:
        """A copier that passed its check, else None: only on CPython (where `id` is an
        address), and only where Python's generator has the fields read (`int index;
        uint32_t state[624]`, and nothing after them but padding)."""
        python_fields = _random.Random.__basicsize__ - _HEADER
        if platform.python_implementation() != "CPython" or not (
            _PY_MT_BYTES <= python_fields < _PY_MT_BYTES + 8
        ):
            return None
        try:
            offset = _gauss_offset(np.random.RandomState(0))
            raw = None if offset is None else RawStates(offset)
            return raw if raw is not None and raw._undoes_every_draw() else None
        except Exception:  # an unforeseen layout or numpy: the tuples are always right
            return None

    def views(self, python: random.Random, legacy: np.random.RandomState) -> _StateViews:
        """The views of these generators' states (those of the last call where they are the
        same objects)."""
        last = self._last
        if (
            last is None
            or last.python is not python
            or last.legacy is not legacy
            or last.bit_generator is not legacy._bit_generator
        ):
            last = _StateViews(python, legacy, self.gauss_offset)
            if python is random.getstate.__self__:  # type: ignore[attr-defined]
                self._last = last  # the global ones: kept (private ones are not)
        return last

    def _undoes_every_draw(self) -> bool:
        """Whether putting the bytes back undoes draws as `setstate` / `set_state` would."""
        python, legacy = random.Random(1), np.random.RandomState(1)
        for cached in (False, True):  # without, then with, a cached Gaussian when saved
            if cached:
                python.gauss()
                legacy.standard_normal(1)
            before = (python.getstate(), _plain(legacy.get_state()))
            views = self.views(python, legacy)
            saved = views.save()
            python.gauss()
            python.getrandbits(32 * 700)  # through a twist
            legacy.standard_normal(3)
            legacy.random_sample(700)
            moved = (python.getstate(), _plain(legacy.get_state())) != before
            python.seed(2)
            legacy.seed(2)
            views.restore(saved)
            if not moved or (python.getstate(), _plain(legacy.get_state())) != before:
                return False
        return True


#: The one `RawStates` of this process, once built (None: the tuples are used).
_RAW: dict[str, RawStates | None] = {}


def _global_generators() -> tuple[random.Random, np.random.RandomState] | None:
    """Python's and numpy's global generators, where they are the standard types that
    `random.getstate` / `np.random.get_state` read (and `RawStates` was checked on)."""
    python = getattr(random.getstate, "__self__", None)
    legacy = getattr(np.random.mtrand, "_rand", None)
    if (
        type(python) is random.Random
        and getattr(random.setstate, "__self__", None) is python
        and type(legacy) is np.random.RandomState
        and getattr(np.random.get_state, "__self__", None) is legacy
        and getattr(np.random.set_state, "__self__", None) is legacy
        and type(legacy._bit_generator) is np.random.MT19937
    ):
        return python, legacy
    return None


def _plain(state: tuple[Any, ...]) -> tuple[Any, ...]:
    """`np.random.get_state()` comparable with ==."""
    return (state[0], state[1].tolist(), *state[2:])


def _gauss_offset(legacy: np.random.RandomState) -> int | None:
    """Where `has_gauss` (an int) and `gauss` (the double 8 bytes on) sit in a `RandomState`:
    found by setting two known pairs through `set_state`; None unless exactly one place fits."""
    size = type(legacy).__basicsize__
    key, position = legacy.get_state()[1:3]
    found = []
    for has_gauss, gauss in ((1, 0.7241843319278103), (0, -3.1862079429306255)):
        legacy.set_state(("MT19937", key, position, has_gauss, gauss))
        memory = ctypes.string_at(id(legacy), size)
        found.append(
            {
                offset - 8
                for offset in range(16, size - 7, 8)
                if memory[offset : offset + 8] == struct.pack("d", gauss)
                and memory[offset - 8 : offset - 4] == struct.pack("i", has_gauss)
            }
        )
    places = found[0] & found[1]
    return places.pop() if len(places) == 1 else None


#: Bytes before an object's own fields (`PyObject_HEAD`).
_HEADER = object.__basicsize__
#: Python's `_random.Random` fields: `int index; uint32_t state[624]`.
_PY_MT_BYTES = 4 + 624 * 4
#: numpy's `mt19937_state`: `uint32_t key[624]; int pos`.
_NP_MT_BYTES = 624 * 4 + 4
#: `int has_gauss`, its padding, `double gauss`.
_GAUSS_BYTES = 16


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
        self.model = model
        known = _CHANGING.get(model)
        self.first = known is None
        if known is None:
            known = _CHANGING[model] = set()
        self.known = known
        # Which tensor each module held under each name (shallow copies of its two tables), and
        # the version counter of each, in walk order: all a call that changes nothing reads.
        # Modules holding none are left out: a tensor added in the block is never taken away.
        self.holders = [module for module in modules if module._parameters or module._buffers]
        self.tables = [(m._parameters.copy(), m._buffers.copy()) for m in self.holders]
        # A lazy tensor is left out: its first forward initialises it, wherever that runs.
        self.tensors = _tensors(self.tables)
        self.versions = [tensor._version for tensor in self.tensors]
        #: The CUDA devices the tensors are on (whose random states `isolated` keeps).
        self.cuda = sorted({tensor.get_device() for tensor in self.tensors if tensor.is_cuda})
        self.copies: dict[tuple[int, str, str], Tensor] = {}
        if not (self.first or known):
            return
        for index, (module, tables) in enumerate(zip(self.holders, self.tables, strict=True)):
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
        with torch.no_grad():
            return self._put_back()

    def _put_back(self) -> list[str]:
        lost: list[tuple[nn.Module, str]] = []
        position = 0  # in `self.tensors`, walked in the same order
        for index, (module, tables) in enumerate(zip(self.holders, self.tables, strict=True)):
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
        now = _tensors([(module._parameters, module._buffers) for module in self.holders])
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
