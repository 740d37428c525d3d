"""ddp_spawn pickles callbacks: a callable argument pickle cannot store (a lambda, a local
function) travels as a `PickleGuard` that names the argument and the fix when pickled.

The arguments guarded are the `EngineOptions` fields flagged `CALLABLE`."""

from __future__ import annotations

import pickle
from dataclasses import replace
from typing import Any

from ..options import CALLABLE, EngineOptions, engine_fields


class PickleGuard:
    """A callable argument that pickle cannot store: copied as itself (`copy.deepcopy` needs no
    pickling), and refused by pickle with a message naming the argument and the fix."""

    def __init__(self, argument: str, fn: Any) -> None:
        self.argument, self.fn = argument, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> PickleGuard:
        return self

    def __reduce__(self) -> Any:
        index = ", or pass an index or key (output_transform=0)"
        raise pickle.PicklingError(
            f"CamMonitor({self.argument}={self.fn!r}) cannot be pickled, which strategy="
            "'ddp_spawn' (and any copy to another process) needs: define it as a function at "
            f"module level{index if self.argument == 'output_transform' else ''}, or use "
            "strategy='ddp'."
        )


class GuardedPickling:
    """Pickles an object's `engine` options guarded (`guarded`), and unpickles them unguarded."""

    engine: EngineOptions

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "engine": guarded(self.engine)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, engine=unguarded(state["engine"]))


def guarded(engine: EngineOptions) -> EngineOptions:
    """`engine` with each callable that pickle cannot store wrapped in a `PickleGuard`."""
    guards = {
        f.name: PickleGuard(f.name, value)
        for f in engine_fields(CALLABLE)
        if callable(value := getattr(engine, f.name)) and not _picklable(value)
    }
    return replace(engine, **guards) if guards else engine


def unguarded(engine: EngineOptions) -> EngineOptions:
    """`engine` with its `PickleGuard`s unwrapped (a copy made without pickling)."""
    guards = {
        f.name: value.fn
        for f in engine_fields(CALLABLE)
        if isinstance(value := getattr(engine, f.name), PickleGuard)
    }
    return replace(engine, **guards) if guards else engine


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True
