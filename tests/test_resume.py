"""`cam_monitor.lightning.resume`: what a checkpoint stores of a run, and the warnings a resumed
run that differs from it gets (end to end in test_callback.py and test_lightning.py)."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cam_monitor.history import Evaluation, write_evaluation
from cam_monitor.lightning.resume import RunState, foreign_state, settings
from cam_monitor.options import DriftOptions, EngineOptions
from cam_monitor.schema import MapKey


def one_evaluation(run: str) -> Evaluation:
    """The smallest evaluation a history folder holds: one 2 x 2 map of one image."""
    return Evaluation(
        index=0, epoch=0, step=0, probe_hashes={"val": "a" * 12},
        maps={MapKey("val", "fc", "gradcam"): np.ones((1, 2, 2), np.float32)},
        targets={"val": np.zeros(1, np.int64)}, logits={"val": np.zeros((1, 2), np.float32)},
        run=run,
    )  # fmt: skip


def test_a_state_dict_round_trips_and_old_checkpoints_take_defaults() -> None:
    state = RunState(3, 41, {"val": "0123456789ab"}, {}, "run1", "/tmp/x", {"topk": "0.2"})
    assert RunState.from_state_dict(state.state_dict()) == state
    assert "state_key" not in state.state_dict()
    assert RunState.from_state_dict({}) == RunState()
    # a checkpoint from before run ids: its evaluations belong to the unnamed run ""
    assert RunState.from_state_dict({"evaluations": 2}).run_id == ""


def test_diff_says_each_difference_once_and_nothing_when_unknown() -> None:
    saved = RunState(
        evaluations=2, probe_hashes={"val": "a" * 12}, settings={"topk": "0.2", "noise": "0.15"}
    )
    same = RunState(probe_hashes={"val": "a" * 12}, settings={"topk": "0.2", "noise": "0.15"})
    assert list(saved.diff(same)) == []
    assert list(RunState().diff(same)) == []  # nothing restored: nothing to compare
    other = RunState(probe_hashes={"val": "b" * 12}, settings={"topk": "0.1", "noise": "0.15"})
    probe, changed = saved.diff(other)
    assert f"probe 'val' differs from the checkpoint's (hash {'b' * 12} vs {'a' * 12})" in probe
    assert "resumed with other topk (0.2 -> 0.1) than the checkpoint's run" in changed
    new_setting = RunState(settings={"topk": "0.2", "noise": "0.15", "smooth": "2"})
    assert list(saved.diff(new_setting)) == []  # a setting older checkpoints lack


def test_diff_names_another_state_key_and_another_folder(tmp_path: Path) -> None:
    (key,) = RunState(state_key="CamMonitor{'a': 1}").diff(
        RunState(state_key="CamMonitor{'a': 2}"), global_step=7
    )
    assert "saved under CamMonitor{'a': 1}, but this monitor is CamMonitor{'a': 2}" in key
    assert "starts a new run at step 7" in key
    before = RunState(evaluations=3, run_id="r", folder=str(tmp_path / "v0"))
    (moved,) = before.diff(RunState(run_id="r", folder=str(tmp_path / "v1")))
    assert f"earlier evaluations (0-2) are in {tmp_path / 'v0'}" in moved
    write_evaluation(tmp_path / "v1", one_evaluation("r"))
    assert list(before.diff(RunState(run_id="r", folder=str(tmp_path / "v1")))) == []
    assert list(before.diff(RunState(run_id="r", folder=str(tmp_path / "v0")))) == []


def test_a_foreign_state_is_named_and_a_legacy_key_moves_to_this_one() -> None:
    states: dict[str, object] = {"CamMonitor{'layers': ['Conv2d']}": {"evaluations": 1}}
    key, legacy = "CamMonitor{'layers': ['net.0']}", "CamMonitor{'layers': ['Conv2d']}"
    assert foreign_state(states, key, legacy, {key}) is None
    assert states[key] == {"evaluations": 1}  # where Lightning looks for this monitor's state
    other = {"CamMonitor{'layers': ['x']}": {}}
    assert foreign_state(other, key, legacy, {key}) == "CamMonitor{'layers': ['x']}"
    assert foreign_state(other, key, legacy, {key, "CamMonitor{'layers': ['x']}"}) is None


def test_settings_hold_the_recorded_engine_fields_masks_and_drift_options() -> None:
    text = settings(EngineOptions(), DriftOptions(), None)
    assert list(text) == [
        "target", "forward", "output_transform", "reshape", "smooth", "noise", "cam_head",
        "ig_steps", "masks", "drift_measures", "topk", "pointing_tolerance",
    ]  # fmt: skip
    assert text["target"] == "'predicted'" and text["masks"] == "None"
    masked = settings(EngineOptions(), DriftOptions(), torch.ones(2, 4, 4, dtype=torch.bool))
    assert masked["masks"].startswith("tensor ")


def target_changes(saved: object, now: object) -> list[str]:
    """The warnings for a run saved with `target=saved` and resumed with `target=now`."""
    before = RunState(
        evaluations=2, settings=settings(EngineOptions(target=saved), DriftOptions(), None)
    )
    after = RunState(settings=settings(EngineOptions(target=now), DriftOptions(), None))
    return list(before.diff(after))


def pick(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th most likely class (a function for `functools.partial` targets)."""
    return logits.topk(k, dim=1).indices[:, -1]


HERE = re.escape(f"{__name__}.")
ARGMAX = lambda z: z.argmax(1)  # noqa: E731 (module-level lambdas share one qualified name)
ARGMIN = lambda z: z.argmin(1)  # noqa: E731


def test_functions_of_one_name_but_other_code_or_arguments_are_told_apart() -> None:
    (changed,) = target_changes(ARGMAX, ARGMIN)
    lam = rf"{HERE}<lambda> #\w{{12}}"
    assert re.search(rf"resumed with other target \({lam} -> {lam}\)", changed)
    (changed,) = target_changes(functools.partial(pick, k=1), functools.partial(pick, k=3))
    assert "resumed with other target (functools.partial #" in changed
    assert len(target_changes(functools.partial(pick, 1), functools.partial(pick, 2))) == 1
    assert len(target_changes(functools.partial(pick, k=1), functools.partial(pick, k=1))) == 0
    # defaults and closure values are part of a function's behaviour
    assert len(target_changes(lambda z, k=1: pick(z, k), lambda z, k=2: pick(z, k))) == 1

    def closing_over(k: int) -> object:
        return lambda z: pick(z, k)

    assert len(target_changes(closing_over(1), closing_over(2))) == 1
    assert len(target_changes(closing_over(1), closing_over(1))) == 0


def test_the_same_function_in_another_scope_is_the_same_target() -> None:
    def inner() -> object:
        return lambda z: z.argmax(1)

    assert ARGMAX.__qualname__ != inner().__qualname__
    assert target_changes(ARGMAX, inner()) == []
    assert target_changes(functools.partial(pick, k=1), functools.partial(pick, k=1)) == []


def test_a_checkpoint_naming_functions_by_import_path_alone_compares_as_before() -> None:
    old = {"evaluations": 2, "settings": {"target": f"{__name__}.<lambda>", "topk": "0.2"}}
    saved = RunState.from_state_dict(old)
    now = settings(EngineOptions(target=ARGMIN), DriftOptions(), None)
    assert now["target"].startswith(f"{__name__}.<lambda> #")
    assert list(saved.diff(RunState(settings=now))) == []  # same import path: as before
    elsewhere = settings(EngineOptions(target=pick), DriftOptions(), None)
    (changed,) = saved.diff(RunState(settings=elsewhere))
    assert f"target ({__name__}.<lambda> -> {__name__}.pick #" in changed


@pytest.mark.slow  # three subprocesses
def test_a_function_fingerprint_is_the_same_in_every_process() -> None:
    script = (
        "from cam_monitor.lightning.resume import settings;"
        "from cam_monitor.options import DriftOptions, EngineOptions;"
        "f = lambda z, names=('a', 'b'): z if z in {'x', 'y', 'z', 'w'} else names;"
        "print(settings(EngineOptions(target=f), DriftOptions(), None)['target'])"
    )
    texts = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(texts) == 1 and " #" in texts.pop()
