"""One evaluation of a running fit, on rank zero: compute, draw and score, then the scalars to
the Trainer, the run's history and every sink; and the one policy for trouble inside a run.

A monitor never kills a week of training: after the baseline (which checks the whole
configuration, so its errors are raised), a failure warns and skips what it cost, unless
``strict=True``. `Evaluator.fail` is that policy, in one place.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from lightning_utilities.core.rank_zero import rank_zero_warn

from ..drift import AttentionTracker
from ..encoding import EncodedGrid, GridEncoder, PendingGrids
from ..evaluation import (
    EvaluationOutput,
    ImageKey,
    explain_first_failure,
    raised_by_cam_monitor,
    run_evaluation,
)
from ..history import RunHistory, evaluation_record
from ..history.background import WriteError
from ..layers import unwrap_model
from ..options import EngineOptions, FaithfulnessOptions, FilterOptions, RenderOptions
from ..probe import ProbeSet, large_probe_warning
from ..schema import SECONDS_TAG
from ..sinks import Sink, scalar_tags
from ..types import LayerSpec
from .trainer import logging_off, publish_metrics

if TYPE_CHECKING:
    import pytorch_lightning as pl


class Plan(NamedTuple):
    """What an evaluation computes and where it goes, as the monitor holds it now."""

    probes: Mapping[str, ProbeSet]
    layers: Sequence[LayerSpec]
    engine: EngineOptions
    render: RenderOptions
    filters: FilterOptions
    tracker: AttentionTracker
    sinks: Sequence[Sink]
    trust: FaithfulnessOptions | None = None


class Entry(NamedTuple):
    """How the run's history files an evaluation."""

    index: int
    epoch: int
    run: str
    final: bool


class Evaluator:
    """Runs a monitor's evaluations and owns what outlives one: the grid encoder, the run's
    history (`RunHistory`) and the strict-or-warn policy (`fail`)."""

    def __init__(self, strict: bool, record: bool, maps: str = "all") -> None:
        self.strict, self.record, self.maps = strict, record, maps  # maps: `HISTORY_MAPS`
        self.history = RunHistory(rank_zero_warn)  # files written off the training thread
        self.encoder = GridEncoder()  # grids, encoded while drift is scored

    def open_history(self, probes: Mapping[str, ProbeSet], run: str, evaluations: int) -> None:
        """A run's history as a fit starts: the evaluations from `evaluations` on are deleted (a
        resumed run writes them again), and the probe is stored, so reports can draw it."""
        if self.record:
            if evaluations > 0:
                self.history.prune_from(evaluations)
            self.history.write_probe(probes, run=run)

    def evaluate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        plan: Plan,
        entry: Entry,
        baseline: bool = False,
    ) -> bool:
        """Compute, draw, score and log one evaluation; False when it failed and was skipped.

        The grids are encoded on the encoder's threads while drift is scored here, once for
        every sink. The baseline is also the configuration check: any error computing it is
        raised.
        """
        start = time.perf_counter()
        computed = self._compute(trainer, pl_module, plan, baseline)
        if computed is None:
            return False
        output, encoding = computed
        seconds = output.scalars[SECONDS_TAG] = time.perf_counter() - start
        publish_metrics(trainer, scalar_tags(output.scalars))
        stored = self._record(trainer, plan, entry, output)
        if baseline and (large := large_probe_warning(plan.probes, seconds, stored)):
            rank_zero_warn(large)  # once a run: its cost measured on the baseline
        images = self._encoded(trainer, encoding)
        for sink in plan.sinks:  # one logger that fails costs the others nothing
            try:
                sink.log(images, output.scalars, trainer.global_step)
            except Exception as err:
                outcome = "The other loggers and the history have it; training continues"
                self.fail(f"could not log its evaluation {_when(trainer)} to {sink}", err, outcome)
        return True

    def _compute(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, plan: Plan, baseline: bool
    ) -> tuple[EvaluationOutput, PendingGrids[ImageKey] | None] | None:
        """The evaluation's maps, grids (being encoded) and scores; None when it failed and is
        skipped. Errors of the baseline are raised, explained where the model raised them."""
        encoding: PendingGrids[ImageKey] | None = None
        try:
            module = unwrap_model(pl_module)
            with logging_off(module):
                output = run_evaluation(
                    module, plan.probes, plan.layers, plan.engine, plan.render, plan.filters,
                    check_scores=baseline, trust=plan.trust,
                )  # fmt: skip
            if plan.sinks:
                encode = any(sink.needs_bytes for sink in plan.sinks)  # MLflow takes pixels
                image_format = plan.render.image_format
                encoding = self.encoder.submit(output.images, image_format, encode=encode)
            rows = plan.engine.batch_size  # drift scored in the chunks the CAMs were computed in
            scalars, non_finite = plan.tracker.score(output.results, plan.probes, rows)
        except Exception as err:
            if encoding is not None:
                encoding.cancel()
            if baseline and not (isinstance(err, ValueError) and raised_by_cam_monitor(err)):
                raise ValueError(explain_first_failure(plan.probes, err)) from err
            if baseline:
                raise
            return self.fail(f"skipped its evaluation {_when(trainer)}", err)
        if non_finite:
            rank_zero_warn(
                f"CamMonitor: {non_finite} CAMs at step {trainer.global_step} hold NaN or Inf "
                "(non-finite probe inputs or a diverged model?); they are drawn as zeros and "
                "left out of the drift means (see the *_excluded counts)."
            )
        output.scalars.update(scalars)
        return output, encoding

    def _record(
        self, trainer: pl.Trainer, plan: Plan, entry: Entry, output: EvaluationOutput
    ) -> int | None:
        """The evaluation into the run's history, written in the background; its bytes (None:
        nothing recorded)."""
        folder = self.history.folder
        if not self.record or folder is None:
            return None
        try:
            record = evaluation_record(
                entry.index, entry.epoch, trainer.global_step, plan.probes, output.results,
                scalar_tags(output.scalars), run=entry.run, final=entry.final,
                class_names=plan.render.class_names, maps=self.maps,
                batch_size=plan.engine.batch_size,
            )  # fmt: skip
            failed = self.history.write_evaluation(record)
        except Exception as err:
            what = f"could not record its evaluation {_when(trainer)} in its history ({folder})"
            self.fail(what, err, "The loggers still get it; training continues")
            return None
        self.report(failed)
        return record.nbytes

    def _encoded(
        self, trainer: pl.Trainer, encoding: PendingGrids[ImageKey] | None
    ) -> Mapping[ImageKey, EncodedGrid]:
        """The encoded grids; when one cannot be encoded, this evaluation's images are skipped
        and its scalars are still logged."""
        try:
            return encoding.result() if encoding is not None else {}
        except Exception as err:
            what = f"skipped the images of its evaluation {_when(trainer)}"
            self.fail(what, err, "Its scalars are logged; training continues")
            return {}

    def report(self, failed: Sequence[WriteError]) -> None:
        """History writes that failed in the background."""
        for failure in failed:
            self.fail(f"could not write {failure.what} to {self.history.folder}", failure.error)

    def close(self) -> None:
        """No encoding thread left, every history file on disk, failed writes reported."""
        self.encoder.close()
        self.report(self.history.close())

    def abort(self) -> None:
        """`close` while an exception ends the fit: failed writes only warn, since the
        exception is what the user must see."""
        self.encoder.close()
        for failure in self.history.close():
            rank_zero_warn(f"CamMonitor could not write {failure.what}: {failure.error}")

    def fail(self, what: str, err: Exception, outcome: str = "Training continues") -> None:
        """The policy for trouble inside a run. With ``strict=True`` the error is raised; else
        one warning says what failed, why, and what goes on."""
        if self.strict:
            raise err
        rank_zero_warn(
            f"CamMonitor {what}: {type(err).__name__}: {str(err).rstrip('.')}. {outcome}; pass "
            "strict=True to raise instead."
        )


def _when(trainer: pl.Trainer) -> str:
    """When an evaluation ran, as warnings say it."""
    return f"at epoch {trainer.current_epoch}, step {trainer.global_step}"
