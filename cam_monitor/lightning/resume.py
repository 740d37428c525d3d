"""What a checkpoint stores of a monitor's run (`RunState`), and how a resumed run differs
from it: each difference is one warning, said once, from `RunState.diff`."""

from __future__ import annotations

import os
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
            if self.settings.get(k, v) != v
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
    functions by import path, modules by type."""
    if isinstance(value, (Tensor, Mapping)):
        return f"tensor {content_hash(value)}"
    if isinstance(value, nn.Module):
        return type(value).__name__
    if isinstance(value, tuple):  # a segmentation target (class, pixel_mask)
        return "(" + ", ".join(_describe(item) for item in value) + ")"
    if callable(value):
        named = value if hasattr(value, "__qualname__") else type(value)  # a callable object
        return f"{getattr(named, '__module__', '?')}.{named.__qualname__}"
    return repr(value)
