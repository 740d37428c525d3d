"""One run's history on disk: its folder (claimed once, never shared with another run's), and
the probe and evaluations written into it off the training thread."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from .background import BackgroundWriter, WriteError
from .records import write_probe_sets
from .store import history_runs, prune_from, write_evaluation

if TYPE_CHECKING:
    from ..probe import ProbeSet
    from .format import Evaluation


class RunHistory:
    """A run's history folder and the background writer that fills it.

    Failed writes are not raised here: `errors` and `close` hand them to the caller, whose
    policy decides (the callback raises them with ``strict=True``, else warns).
    """

    def __init__(self, warn: Callable[[str], object] = warnings.warn) -> None:
        self.folder: Path | None = None
        self._warn = warn  # rank zero's warning, in the callback
        self._writer = BackgroundWriter()

    def claim(
        self,
        folder: Path,
        run: str | None,
        save_dir: str | os.PathLike[str] | None,
        hint: str = ".",
        beside: Iterable[RunHistory] = (),
    ) -> Path:
        """Take `folder` for the run `run`: one history per run, one writer per folder. An
        explicit `save_dir` holding another run's history (`hint` ends that message), or taken
        by a history `beside` this one (other monitors of the Trainer), is refused; a default
        folder holding another run's gives way to `<folder>-<run id>` beside it. The run itself
        may come back."""
        beside = list(beside)
        for history in [self, *beside]:
            history.wait()  # files still queued count too
        if save_dir is not None and any(other.folder == folder for other in beside):
            raise ValueError(
                f"Two CamMonitors in this Trainer have save_dir={os.fspath(save_dir)!r}; one "
                "folder holds one monitor's history. Give each monitor its own save_dir."
            )
        others = {r: ix for r, ix in history_runs(folder).items() if r != run}
        if not others:
            self.folder = folder
            return folder
        found = "; ".join(
            f"run {r or '(no id)'}: {len(ix)} evaluation(s)" for r, ix in others.items()
        )
        if save_dir is not None:
            raise ValueError(
                f"save_dir={os.fspath(save_dir)!r} already holds the cam-monitor history of "
                f"another run ({found}); one folder holds one run. Pass a new save_dir, delete "
                "that folder, or resume that run from its checkpoint (trainer.fit(..., "
                f"ckpt_path=...)){hint}"
            )
        self.folder = folder.with_name(f"{folder.name}-{run or 'legacy'}")
        self._warn(
            f"CamMonitor: {folder} already holds another run's history ({found}); this run's "
            f"goes to {self.folder}. Give each run its own logger version or save_dir to avoid "
            "this."
        )
        return self.folder

    def prune_from(self, index: int) -> None:
        """Delete the evaluations from `index` on: a resumed run writes them again."""
        if self.folder is not None:
            prune_from(self.folder, index)

    def write_probe(self, probes: Mapping[str, ProbeSet], run: str) -> None:
        """Store the probe once per run, so reports can draw overlays."""
        self._writer.submit(partial(write_probe_sets, self.folder, probes, run=run), "the probe")

    def write_evaluation(self, record: Evaluation) -> list[WriteError]:
        """Queue one evaluation; the writes that failed since the last call."""
        write = partial(write_evaluation, self.folder, record)
        self._writer.submit(write, f"evaluation {record.index}")
        return self._writer.errors()

    def wait(self) -> None:
        """Wait until every queued write is on disk."""
        self._writer.wait()

    def close(self) -> list[WriteError]:
        """Finish every queued write and stop the writer; the writes that failed."""
        return self._writer.close()
