"""What a checkpoint stores of a monitor's run (`RunState`), and how a resumed run differs
from it: each difference is one warning, said once, from `RunState.diff`."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..history import history_runs
from ..options import (
    RECORDED,
    DriftOptions,
    EngineOptions,
    OutputOptions,
    ProbeOptions,
    ScheduleOptions,
    engine_fields,
)
from ..probe import content_hash


@dataclass(frozen=True)
class RunState:
    """A monitor's run as its checkpoint holds it (`CamMonitor.state_dict`).

    `state_key` is the key it is stored under in the checkpoint (not in the dict itself);
    `settings` are the arguments outside that key that change the recorded maps, as text
    (`settings`).
    """

    evaluations: int = 0
    last_step: int = -1
    probe_hashes: Mapping[str, str] = field(default_factory=dict)
    tracker: Mapping[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    folder: str | None = None
    settings: Mapping[str, str] = field(default_factory=dict)
    state_key: str | None = None

    def state_dict(self) -> dict[str, Any]:
        """The dict a checkpoint stores (every field but `state_key`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "state_key"}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> RunState:
        """The state of a checkpoint's dict; keys that older checkpoints lack take defaults."""
        evaluations = int(state.get("evaluations", 0))
        run_id = state.get("run_id")  # checkpoints from before run ids: the unnamed run ""
        return cls(
            evaluations=evaluations,
            last_step=int(state.get("last_step", -1)),
            probe_hashes=dict(state.get("probe_hashes", {})),
            tracker=state.get("tracker", {}),
            run_id=str(run_id) if run_id is not None else ("" if evaluations else None),
            folder=state.get("folder"),
            settings=dict(state.get("settings", {})),
        )

    def diff(self, now: RunState, global_step: Any = "?") -> Iterator[str]:
        """The warnings for a run resumed from this state that is now `now`: another
        `state_key` (a new run, at `global_step`), another probe, other settings, another
        folder. A field either side leaves unknown (None, empty) is not compared."""
        if self.state_key is not None and now.state_key not in (None, self.state_key):
            yield (
                f"CamMonitor: the checkpoint's CamMonitor state was saved under "
                f"{self.state_key}, but this monitor is {now.state_key} (its layers, "
                "methods, probe, schedule or save_dir changed), so it does not continue that "
                f"run: it starts a new run at step {global_step}, with its own baseline, drift "
                "reference, run id and history. Resume with the arguments the checkpoint was "
                "made with to continue the checkpointed run."
            )
        for name, digest in self.probe_hashes.items():
            if name in now.probe_hashes and now.probe_hashes[name] != digest:
                yield (
                    f"CamMonitor: probe {name!r} differs from the checkpoint's (hash "
                    f"{now.probe_hashes[name]} vs {digest}); drift after the resume compares "
                    "different images."
                )
        changed = [
            f"{k} ({self.settings[k]} -> {v})"
            for k, v in now.settings.items()
            if k in self.settings and _differs(self.settings[k], v)
        ]
        if changed:
            yield (
                f"CamMonitor: resumed with other {', '.join(changed)} than the checkpoint's run: "
                "drift across the resume compares maps or scores computed differently, and the "
                "run's history mixes both. Resume with the checkpoint's arguments, or start a new "
                "run (no ckpt_path, or another save_dir) to compare the two."
            )
        if self._moved_to(now):
            yield (
                f"CamMonitor: this resumed run's earlier evaluations (0-{self.evaluations - 1}) "
                f"are in {self.folder}; from here on its history goes to {now.folder} (a new "
                "logger version?). `cam-monitor show`/`compare` read the two as one history "
                f"when given their parent ({_common_parent(self.folder, now.folder)}) or both "
                "folders; pass save_dir= (or a fixed logger version) to keep a run's history "
                "in one folder."
            )

    def _moved_to(self, now: RunState) -> bool:
        """Whether the earlier evaluations are in another folder than `now`'s, which holds none
        of this run yet (Lightning's next logger version)."""
        if not self.evaluations or self.folder is None or now.folder is None:
            return False
        if Path(self.folder) == Path(now.folder):
            return False
        return not history_runs(now.folder).get(now.run_id or "")


def _common_parent(first: str | os.PathLike[str], second: str | os.PathLike[str]) -> str:
    """The deepest folder holding both folders."""
    return os.path.commonpath([os.path.abspath(first), os.path.abspath(second)])


def holds_history(save_dir: str | os.PathLike[str] | None) -> bool:
    """Whether an explicit `save_dir` already holds a run's history (a new run is refused it)."""
    return save_dir is not None and bool(history_runs(save_dir))


def layer_names(
    layers: Sequence[Any] | None, module_names: Mapping[int, str], legacy: bool = False
) -> list[str]:
    """The layers as a `state_key` names them: a module by its dotted name once `setup` found it
    in the model (`module_names`), before that by type and identity (so two monitors on two
    modules of one type can share a Trainer); `legacy`: by type alone, as older keys did."""
    return [
        layer if isinstance(layer, str)
        else type(layer).__name__ if legacy
        else module_names.get(id(layer), f"{type(layer).__name__}@{id(layer):x}")
        for layer in layers or []
    ]  # fmt: skip


def state_identity(
    layers: Sequence[str],
    methods: Sequence[str],
    probe: ProbeOptions,
    schedule: ScheduleOptions,
    outputs: OutputOptions,
) -> dict[str, Any]:
    """What a monitor's `state_key` is built from: its layers (by name) and methods, and its
    probe, schedule and folder where they are not the defaults (so a lone monitor keeps the key
    older checkpoints were saved under)."""
    identity: dict[str, Any] = {"layers": list(layers), "methods": list(methods)}
    if probe.ids is not None:
        identity["probe"] = probe.ids
    if schedule.every_n_steps is not None:
        identity["every_n_steps"] = schedule.every_n_steps
    elif schedule.every_n_epochs != 1:
        identity["every_n_epochs"] = schedule.every_n_epochs
    if outputs.save_dir is not None:
        identity["save_dir"] = os.fspath(outputs.save_dir)
    return identity


def foreign_state(states: dict[str, Any], key: str, legacy: str, claimed: set[str]) -> str | None:
    """The key of a checkpoint's CamMonitor state (in `states`, the checkpoint's callback
    states) that no monitor of the Trainer `claimed`, when none is under this monitor's `key`.
    A state under `legacy` (how module layers were once keyed) is moved to `key`, where
    Lightning looks for it."""
    if key not in states and legacy in states:
        states[key] = states[legacy]  # what Lightning hands `load_state_dict`
    foreign = [k for k in states if str(k).startswith("CamMonitor{") and k not in claimed]
    return None if key in states or not foreign else str(foreign[0])


def settings(engine: EngineOptions, drift: DriftOptions, masks: Any) -> dict[str, str]:
    """The arguments outside `state_key` that change the maps or scores a run records, as text
    that is the same in every process: the engine's `RECORDED` fields, the masks and the drift
    options, by argument name."""
    values = {f.name: getattr(engine, f.name) for f in engine_fields(RECORDED)}
    values["masks"] = masks
    for f in fields(drift):
        values[f.metadata.get("argument", f.name)] = getattr(drift, f.name)
    return {name: _describe(value) for name, value in values.items()}


def _describe(value: Any) -> str:
    """An argument as text that is the same in every process: tensors by content hash,
    functions by import path and fingerprint (`_fingerprint`), modules and callable objects by
    type."""
    if isinstance(value, (Tensor, Mapping)):
        return f"tensor {content_hash(value)}"
    if isinstance(value, nn.Module):
        return type(value).__name__
    if isinstance(value, tuple):  # a segmentation target (class, pixel_mask)
        return "(" + ", ".join(_describe(item) for item in value) + ")"
    if callable(value):
        named = value if hasattr(value, "__qualname__") else type(value)  # a callable object
        path = f"{getattr(named, '__module__', '?')}.{named.__qualname__}"
        digest = _fingerprint(value)
        return path if digest is None else f"{path} #{digest}"
    return repr(value)


_FINGERPRINTED = re.compile(r"(?s)(.+) #([0-9a-f]{12})")


def _differs(saved: str, now: str) -> bool:
    """Whether a setting's text in a checkpoint (`saved`) and now name different arguments:
    two fingerprinted functions by fingerprint alone (the same code in another scope is the
    same function); a checkpoint from before fingerprints by import path, as it was compared
    then."""
    old, new = _FINGERPRINTED.fullmatch(saved), _FINGERPRINTED.fullmatch(now)
    if old and new:
        return old[2] != new[2]
    if new:
        return saved != new[1]
    return saved != now


def _fingerprint(value: Any) -> str | None:
    """12 hex digits that tell functions of different behaviour apart, the same in every
    process: for a function (a lambda too) its module, code (bytecode, constants, names),
    defaults and closure values; for a bound method its function's and its instance's type;
    for a `functools.partial` its function's and its arguments. None for other callables
    (classes, builtins, callable objects), which are told apart by name alone."""
    text = _behaviour(value)
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()[:12]


def _behaviour(value: Any) -> str | None:
    """The text `_fingerprint` digests."""
    if isinstance(value, functools.partial):
        func = _behaviour(value.func)
        if func is None:
            func = _value_text(value.func)
        arguments = [_value_text(arg) for arg in value.args]
        keywords = _value_text(value.keywords)
        return f"partial({func}; {', '.join(arguments)}; {keywords})"
    if isinstance(value, types.MethodType):
        func = _behaviour(value.__func__)
        if func is None:
            return None
        return f"method({func}; {_type_name(value.__self__)})"
    if isinstance(value, types.FunctionType):
        cells = []
        for cell in value.__closure__ or ():
            try:
                cells.append(_value_text(cell.cell_contents))
            except ValueError:  # a cell not yet filled
                cells.append("<empty>")
        return (
            f"function({value.__module__}; {_code_text(value.__code__)}; "
            f"{_value_text(value.__defaults__)}; {_value_text(value.__kwdefaults__)}; "
            f"({', '.join(cells)}))"
        )
    return None


def _code_text(code: types.CodeType) -> str:
    """A code object's bytecode, constants (nested code objects alike) and names, but not its
    name or qualified name: the same lambda in another scope reads the same."""
    consts = [
        _code_text(const) if isinstance(const, types.CodeType) else _const_text(const)
        for const in code.co_consts
    ]
    return f"code({code.co_code.hex()}; ({', '.join(consts)}); {code.co_names!r})"


def _const_text(const: Any) -> str:
    """A code constant as text: frozensets (`x in {...}`) sorted, since their order follows
    string hashing, which differs from process to process."""
    if isinstance(const, frozenset):
        return "frozenset(" + ", ".join(sorted(_const_text(item) for item in const)) + ")"
    if isinstance(const, tuple):
        return "(" + ", ".join(_const_text(item) for item in const) + ",)"
    return repr(const)


def _value_text(value: Any) -> str:
    """A default, closure value or partial argument as text that is the same in every process:
    numbers, strings, booleans, None and tuples or lists of them by value, tensors by content
    hash, dicts by sorted key, functions and classes by import path, anything else by type."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return type(value).__name__ + "(" + ", ".join(_value_text(v) for v in value) + ")"
    if isinstance(value, dict):
        items = sorted((repr(k), _value_text(v)) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if isinstance(value, Tensor):
        return f"tensor {content_hash(value)}"
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return _type_name(value)


def _type_name(value: Any) -> str:
    """A value's type by import path."""
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"
