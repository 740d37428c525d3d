"""A monitor's run across fits (`MonitorRun`): its id and progress, what the checkpoint it
resumed from holds, and the current fit's probes and sinks. The callback decides when; this
object remembers where the run stands and says how a resume differs from its checkpoint."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..history import RunHistory
from ..options import OutputOptions
from ..probe import ProbeSet
from ..sinks import Sink
from .resume import RunState, foreign_state, holds_history


class MonitorRun:
    """Where a monitor's run stands: evaluations done, the last evaluated step, its id, and the
    checkpoint state it resumed from; `probes` and `sinks` are the current fit's.

    Example:
        >>> run = MonitorRun()
        >>> run.restore({"evaluations": 3, "last_step": 40, "run_id": "abc"})
        {}
        >>> run.evaluations, run.last_step, run.id, run.is_new(global_step=0)
        (3, 40, 'abc', False)
    """

    def __init__(self) -> None:
        self.evaluations = 0
        self.last_step = -1
        self.id: str | None = None  # set at the start of fit, or by a resumed checkpoint
        self.done_epoch = -1  # the last epoch whose last training batch has run
        self.closed_epoch = -1  # an epoch whose end was evaluated before `on_train_epoch_end`
        self.early_readers = False  # a callback reads this monitor's tags at validation end
        self.idle = False  # fast_dev_run: nothing evaluated, nothing written
        self.resumed = RunState()  # what the checkpoint this run resumed from holds
        self.restored = False  # whether this fit resumed the run from a checkpoint
        self.foreign_key: str | None = None  # a checkpoint's other CamMonitor state, unused
        self.probes: dict[str, ProbeSet] = {}
        self.sinks: list[Sink] = []

    def prepare_fit(self) -> None:
        """A fit begins: nothing restored yet, and the last fit's probes and sinks are gone
        (`evaluate()` waits for this fit's)."""
        self.restored, self.foreign_key = False, None
        self.probes, self.sinks = {}, []

    def is_new(self, global_step: int) -> bool:
        """A fit from step 0 that restored no checkpoint (the monitor given to a new Trainer)
        is a new run, with its own baseline, drift reference and run id."""
        return bool(self.evaluations) and global_step == 0 and not self.restored

    def forget(self) -> None:
        """Start over: no evaluations, no id, no checkpoint behind this run."""
        self.evaluations, self.last_step, self.id, self.done_epoch = 0, -1, None, -1
        self.closed_epoch = -1
        self.resumed = RunState()

    def name(self) -> str:
        """The run's id, drawn on first use."""
        if self.id is None:
            self.id = uuid.uuid4().hex[:12]
        return self.id

    def epoch_end_evaluated(self, epoch: int, step: int) -> bool:
        """Whether the end of `epoch`, at `step`, was evaluated already: in the epoch's closing
        validation, or before the checkpoint this fit resumed from was saved there (Lightning
        then runs that epoch's `on_train_epoch_end` again)."""
        return self.closed_epoch == epoch and self.last_step == step

    def epochs_completed(self, current_epoch: int) -> int:
        """Epochs whose training is complete: after an epoch's last batch (in its validation,
        say) `current_epoch` still counts that epoch as running; an evaluation of those weights
        belongs to the epoch-end one's epoch."""
        return current_epoch + int(self.done_epoch == current_epoch)

    def state(
        self, folder: Path | None, settings: Mapping[str, str], tracker: Mapping[str, Any] | None
    ) -> RunState:
        """This run as a checkpoint stores it (`tracker`: the drift state, when it is stored)."""
        return RunState(
            self.evaluations,
            self.last_step,
            {name: probe.digest for name, probe in self.probes.items()},
            tracker or {},
            self.id,
            None if folder is None else os.fspath(folder),
            dict(settings),
        )

    def restore(self, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
        """Continue the run a checkpoint's monitor state holds; its drift tracker's state."""
        self.restored = True
        self.resumed = RunState.from_state_dict(state_dict)
        self.evaluations, self.last_step = self.resumed.evaluations, self.resumed.last_step
        self.id = self.resumed.run_id
        return self.resumed.tracker

    def checkpoint_warnings(
        self,
        checkpoint: dict[str, Any],
        key: str,
        legacy: str,
        claimed: set[str],
        outputs: OutputOptions,
    ) -> list[str]:
        """A checkpoint whose monitor state was saved under another `state_key` than `key` (or
        `legacy`, how older versions keyed it; `claimed`: the Trainer's keys) continues nothing:
        a new run starts, and `foreign_key` names that state (nothing said when an explicit
        `save_dir` holds a history: claiming the folder raises, saying it all)."""
        states = checkpoint.get("callbacks") or {}
        self.foreign_key = foreign_state(states, key, legacy, claimed)
        if self.foreign_key is not None and holds_history(outputs.save_dir):
            return []
        saved, now = RunState(state_key=self.foreign_key), RunState(state_key=key)
        return list(saved.diff(now, global_step=checkpoint.get("global_step", "?")))

    def resume_warnings(self, now: RunState, history: bool) -> Iterator[str]:
        """How this run, `now`, differs from the checkpoint it resumed from: probe, settings,
        folder (not compared without a `history`)."""
        saved = self.resumed if self.restored else replace(self.resumed, settings={})
        yield from saved.diff(now if history else replace(now, folder=None))

    def claim(
        self,
        history: RunHistory,
        folder: Path,
        outputs: OutputOptions,
        key: str,
        beside: Sequence[RunHistory],
    ) -> Path:
        """This run's folder (`RunHistory.claim`, beside the other monitors' histories): one
        explicit `save_dir` per monitor (`key`: this monitor's `state_key`, for the error)."""
        run = self.name()  # a new run's id is drawn here
        if not outputs.history:
            history.folder = folder
            return folder
        hint = "." if self.foreign_key is None else (
            f" with the same monitor: the checkpoint's CamMonitor state was saved under "
            f"{self.foreign_key}, this monitor is {key} (its layers, methods, probe, schedule "
            "or save_dir changed), so it cannot continue that run and starts a new one, which "
            "needs a folder of its own."
        )  # fmt: skip
        return history.claim(folder, run, outputs.save_dir, hint, beside)
