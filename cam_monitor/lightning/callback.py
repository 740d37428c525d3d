"""CamMonitor, the Lightning callback: only Lightning concerns (when, which rank, state).

The hooks read as a decision and an action; what they act through lives beside this module:
`checks` (setup-time checks), `evaluator` (one evaluation and the strict-or-warn policy),
`resume` (what a checkpoint holds), `run` (where the run stands), `trainer` (probes, layer and
sinks of a fit), `pickling` and `compat` (both namespaces); the options live in
`cam_monitor.options`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.rank_zero import rank_zero_warn  # both namespaces re-export it
from torch import Tensor

from ..drift import AttentionTracker
from ..options import check_layers, monitor_options
from ..render import GRID_COLUMNS, MAX_TILES
from ..schema import DEFAULT_FAITHFULNESS, DEFAULT_MEASURES
from ..sinks import run_folder
from ..types import ForwardFn, LayerSpec, OutputTransform, ProbeSpec, Reshape, Target
from .checks import (
    Group,
    check_fit,
    check_shared_tags,
    logged_groups,
    metric_consumers,
    reads_at_epoch_end,
    stale_reads,
)
from .compat import lightning_classes
from .evaluator import Entry, Evaluator, Plan
from .pickling import GuardedPickling
from .resume import RunState, layer_names, settings, state_identity
from .run import MonitorRun
from .trainer import (
    default_layer,
    fit_probes,
    idle_run,
    module_names,
    open_sinks,
    start_warnings,
    use_reference_run,
)

if sys.version_info >= (3, 12):
    from typing import override
else:
    from typing_extensions import override

if TYPE_CHECKING:
    import pytorch_lightning as pl


# One class for both namespaces: a subclass of each installed `Callback`, so both Trainers and
# both LightningCLIs accept it.
class CamMonitor(*lightning_classes("callbacks", "Callback"), GuardedPickling):  # type: ignore[misc]
    """Log Grad-CAM overlays of a fixed probe batch, and how attention drifts, during `fit`.

    A baseline evaluation runs at the start of training (attention at initialisation; it also
    checks the whole configuration), then one at the end of every `every_n_epochs`-th epoch (or
    every `every_n_steps` steps), and a final one at the end of `fit` when the schedule left the
    last step unevaluated; on global rank zero only. Several monitors in one Trainer must differ
    in layers, methods, probe, schedule or `save_dir`. docs/arguments.md details every argument.

    Args:
        layer: a name (``"features.29"``), a glob, a module or a list; None: the last spatial one.
        methods: one or several of ``cam_monitor.ALL_METHODS`` (``"gradcam"``, ``"layercam"``...).
        every_n_epochs: evaluate every N-th epoch's end (None: 1, unless ``every_n_steps``).
        every_n_steps: evaluate every N optimizer steps instead (not with ``every_n_epochs``).
        probe: None (samples of the val, else train, dataset), a Tensor, an ``(inputs, labels)``
            tuple (inputs may nest), a dict batch, a Dataset, a DataLoader, or named probe sets.
        num_probe: samples taken from a Dataset or DataLoader probe.
        target: ``"predicted"``, ``"label"``, a class index, a LongTensor [B] or a callable; for
            segmentation also ``(class, pixel_mask)`` (docs/segmentation.md).
        output_transform: picks the logits from a tuple or dict output: index, key or callable.
        forward: ``forward(module, inputs)``, how the model is called on the probe; it receives
            a tuple batch's inputs (nested ones too) and a dict batch whole, every key kept.
        reshape: turns a layer output into ``[B, C, H, W]`` (automatic where unambiguous).
        masks: bool ``[B, H, W]``, boxes ``[B, 4]`` (x0, y0, x1, y1 in pixels, each selecting
            a pixel) or class-index label maps for localization scores, or a dict of them (only
            with an explicit tensor/tuple probe).
        input_key: key of the inputs in dict batches (default: ``image``, ``input``, ``x``...).
        label_key: key of the labels in dict batches (default: ``label``, ``target``, ``y``...).
        colormap: OpenCV colormap of the heat maps (``"jet"``, ``"turbo"``, ``"viridis"``...).
        alpha: heat-map opacity over the image, in [0, 1].
        mean: per-channel normalisation mean to undo before drawing (with ``std``).
        std: per-channel normalisation std to undo before drawing (with ``mean``).
        class_names: names for the tile captions.
        nrow: tiles per grid row (4: a 16-image probe reads at TensorBoard's card size).
        views: grids per signed map: any of ``"all"``, ``"pos"``, ``"neg"``.
        gray_views: draw those views in grays instead of blue-white-red.
        image_format: ``"jpeg"`` (quality 90) or ``"png"`` for overlay grids (pixel maps: PNG).
        max_tiles: images per grid (None: all); evenly spaced ones, the whole probe is scored.
        batch_size: probe rows per pass, to bound memory (None: the whole probe at once).
        smooth: noisy copies averaged by the gradient CAMs and ``smoothgrad`` (16 when 0).
        noise: noise std of those copies, as a fraction of each image's value range.
        cam_head: for ``cam``: the Linear classifier after global pooling (default: the last).
        ig_steps: Riemann steps of ``integrated_gradients`` from the all-zero input.
        filters: ``{"features.28": [0, 5]}``: channel activations and inputs that excite them.
        drift_measures: any of ``spearman``, ``pearson``, ``topk_iou``, ``js``, ``com_shift``.
        topk: fraction of pixels for ``topk_iou`` and the mask IoU.
        pointing_tolerance: pixels by which a mask is grown for the pointing game.
        faithfulness: any of ``drop``, ``increase``, ``deletion``, ``insertion``, ``sanity``
            (can the maps be trusted?), logged under ``cam_faith/``; None or ``()``: none.
        reference: a run directory whose first evaluation is the drift reference (``*_ref``).
        history: write the raw maps of every evaluation to disk (for ``cam-monitor show``).
        history_maps: which maps the history keeps: ``"all"``, ``"cams"`` or ``"none"``.
        save_dir: where history and image files go (default ``<log_dir>/cam_monitor``); it must
            not hold another run's history.
        strict: re-raise errors inside later evaluations instead of warning and skipping.

    Raises:
        TypeError: in the constructor, for an argument of the wrong type.
        ValueError: in the constructor, for a bad value; before the first training step, for a
            layer, probe, target, masks or ``class_names`` that do not fit the model, a sharded
            strategy, an identical second monitor, a ``save_dir`` that is a file or holds another
            run's history, or a callback monitoring a tag whose layer is not a full module name.
        PicklingError: when pickled (``ddp_spawn`` does) holding a lambda or local function as
            ``target``, ``forward``, ``output_transform`` or ``reshape``.

    Example::

        >>> monitor = CamMonitor("features.29", methods=["gradcam", "layercam"], every_n_epochs=2)
        >>> monitor.layers, monitor.methods
        (['features.29'], ('gradcam', 'layercam'))
        >>> # trainer = pl.Trainer(callbacks=[monitor]); trainer.fit(model, loaders)
    """

    def __init__(
        self,
        layer: LayerSpec | Sequence[LayerSpec] | None = None,
        *,
        methods: str | Sequence[str] = "gradcam",
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        probe: ProbeSpec = None,
        num_probe: int = 16,
        target: Target = "predicted",
        output_transform: OutputTransform = None,
        forward: ForwardFn | None = None,
        reshape: Reshape | None = None,
        masks: Tensor | Mapping[str, Tensor] | None = None,
        input_key: str | None = None,
        label_key: str | None = None,
        colormap: str = "jet",
        alpha: float = 0.5,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: Sequence[str] | None = None,
        nrow: int = GRID_COLUMNS,
        views: str | Sequence[str] = "all",
        gray_views: bool = False,
        image_format: str = "jpeg",
        max_tiles: int | None = MAX_TILES,
        batch_size: int | None = None,
        smooth: int = 0,
        noise: float = 0.15,
        cam_head: str | None = None,
        ig_steps: int = 256,
        filters: Mapping[str, Sequence[int]] | None = None,
        drift_measures: str | Sequence[str] = DEFAULT_MEASURES,
        topk: float = 0.2,
        pointing_tolerance: int = 0,
        faithfulness: str | Sequence[str] | None = DEFAULT_FAITHFULNESS,
        reference: str | Path | None = None,
        history: bool = True,
        history_maps: str = "all",
        save_dir: str | Path | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.layers = check_layers(layer)
        options = monitor_options(locals())  # each takes the arguments named as its fields
        self._layer_spec = self.layers  # the layers as given: state_key stays the same after setup
        self._module_names: dict[int, str] = {}  # module layers' names, found in `setup`
        self.schedule, self.probe_options, self.engine, self.render, self.filters = options[:5]
        self.tracker = AttentionTracker(options.drift)
        self.trust, self.outputs = options.trust, options.outputs
        self.run = MonitorRun()  # the run's id and progress, this fit's probes and sinks
        outputs = self.outputs
        self._evaluator = Evaluator(outputs.strict, outputs.history, outputs.history_maps)

    def __repr__(self) -> str:
        """What `print(monitor)` shows: layers, methods, probe sets and schedule (the probe
        sets' rows once a fit built them)."""
        layers = "None (chosen at fit)" if self.layers is None else repr(self.layers)
        probes = self.probe_options.describe()
        if self.run.probes:
            probes = "{" + ", ".join(f"{n!r}: {p.length}" for n, p in self.run.probes.items())
            probes += "}"
        return (
            f"CamMonitor(layer={layers}, methods={list(self.methods)}, probe={probes}, "
            f"{self.schedule.describe()})"
        )

    @property
    def methods(self) -> tuple[str, ...]:
        """The validated method names."""
        return self.engine.methods

    @property
    def evaluations(self) -> int:
        """Evaluations this run has logged (a resumed run counts its checkpoint's)."""
        return self.run.evaluations

    @property
    def run_id(self) -> str | None:
        """This run's id in its history, once `fit` started or a checkpoint restored it."""
        return self.run.id

    @property
    def every_n_epochs(self) -> int | None:
        return self.schedule.every_n_epochs

    @property
    def every_n_steps(self) -> int | None:
        return self.schedule.every_n_steps

    @property
    def folder(self) -> Path | None:
        """This run's folder (history, image files), once `fit` started."""
        return self._evaluator.history.folder

    @property
    @override
    def state_key(self) -> str:
        """What identifies this monitor among several in one Trainer: its layers and methods, and
        its probe, schedule and folder where they are not the defaults (so a lone monitor keeps
        the key older checkpoints were saved under)."""
        return self._key()

    def _key(self, legacy: bool = False) -> str:
        """`state_key`; `legacy`: as older checkpoints keyed module layers (by type)."""
        names = layer_names(self._layer_spec, self._module_names, legacy)
        return self._generate_state_key(
            **state_identity(names, self.methods, self.probe_options, self.schedule, self.outputs)
        )

    # -- Lightning hooks ------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_setup(trainer, pl_module)
            self.run.prepare_fit()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run.idle = idle_run(trainer)
        if self.run.idle:
            return
        if self.run.is_new(trainer.global_step):
            self._start_new_run()
        whole = self.engine.forward is not None  # forward= receives dict batches whole
        probes = fit_probes(trainer, pl_module, self.probe_options, whole)  # one rank fails: all
        if self.run.restored and self.run.last_step == trainer.global_step:
            self.run.closed_epoch = trainer.current_epoch  # saved after this epoch's evaluation
        if trainer.is_global_zero:
            self._open_run(trainer, pl_module, probes)
            self._check_consumer_timing(trainer, pl_module)
            if self.evaluations == 0:
                self._evaluate(trainer, pl_module, epoch=trainer.current_epoch, baseline=True)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.is_last_batch:
            self.run.done_epoch = trainer.current_epoch
        if self._should_evaluate_step(trainer):
            self._evaluate(trainer, pl_module, self.run.epochs_completed(trainer.current_epoch))

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """An evaluation due at this epoch's end runs in the epoch's closing validation when a
        callback reads the monitor's tags at validation end (ModelCheckpoint and EarlyStopping
        do when validation is not exactly once per epoch): before it reads, same weights."""
        if self._should_evaluate_in_validation(trainer):
            self._evaluate(trainer, pl_module, epoch=trainer.current_epoch + 1)
            self.run.closed_epoch = trainer.current_epoch

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_evaluate_epoch(trainer):
            self._evaluate(trainer, pl_module, epoch=trainer.current_epoch + 1)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The final model is evaluated: one last evaluation, marked final, when the schedule
        left the last step unevaluated (early stopping, `max_steps`, an epoch count that
        `every_n_epochs` does not divide)."""
        if self._should_evaluate_final(trainer):
            self._evaluate(trainer, pl_module, epoch=trainer.current_epoch, final=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every history file is on disk when `fit` returns, and no encoding thread is left."""
        self._evaluator.close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._evaluator.close()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._evaluator.abort()

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run one evaluation now, from any hook after training started (even under inference
        mode, e.g. in `on_validation_epoch_end`); rank zero only, like the scheduled ones."""
        if trainer.is_global_zero and self.run.probes:
            self._evaluate(trainer, pl_module, self.run.epochs_completed(trainer.current_epoch))

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._run_state(self.tracker.state_dict()).state_dict()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint whose monitor state was saved under another `state_key` (layers, methods,
        probe, schedule or save_dir changed) continues nothing: say so, this is a new run."""
        if trainer.state.fn == "fit":  # validate/test/predict with ckpt_path: no run goes on
            keys = self.state_key, self._key(legacy=True)  # module layers were once keyed by type
            claimed = {cb.state_key for cb in trainer.callbacks}  # type: ignore[attr-defined]
            for warning in self.run.checkpoint_warnings(checkpoint, *keys, claimed, self.outputs):
                rank_zero_warn(warning)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(self.run.restore(state_dict))

    # -- decisions ------------------------------------------------------------------------------

    def _active(self, trainer: pl.Trainer) -> bool:
        """Scheduled evaluations run on rank zero, outside fast_dev_run."""
        return not self.run.idle and trainer.is_global_zero

    def _should_evaluate_step(self, trainer: pl.Trainer) -> bool:
        due = self.schedule.due_at_step(trainer.global_step, self.run.last_step)
        return due and self._active(trainer)

    def _should_evaluate_epoch(self, trainer: pl.Trainer) -> bool:
        """The end of this epoch is due and was not evaluated in its closing validation."""
        done = self.run.epoch_end_evaluated(trainer.current_epoch, trainer.global_step)
        return (
            self.schedule.due_at_epoch(trainer.current_epoch) and not done and self._active(trainer)
        )

    def _should_evaluate_in_validation(self, trainer: pl.Trainer) -> bool:
        """This validation of `fit` closes an epoch (it follows the epoch's last batch) whose
        end is due, and a callback reads the monitor's tags at validation end."""
        closing = self.run.done_epoch == trainer.current_epoch and not trainer.sanity_checking
        fitting = trainer.state.fn == "fit" and bool(self.run.probes)
        return (
            self.run.early_readers and closing and fitting and self._should_evaluate_epoch(trainer)
        )

    def _should_evaluate_final(self, trainer: pl.Trainer) -> bool:
        """Training ended on a step the schedule did not evaluate."""
        unevaluated = trainer.global_step != self.run.last_step
        return self._active(trainer) and bool(self.run.probes) and unevaluated

    # -- actions --------------------------------------------------------------------------------

    def _check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """What the Trainer, its strategy, its other callbacks and the model must allow."""
        for monitor in _monitors(trainer):  # module layers by name, in every monitor's key
            monitor._module_names = module_names(pl_module, monitor._layer_spec)
        check_fit(self, trainer, pl_module, _monitors(trainer), self._layer_spec)

    def _check_consumer_timing(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Which callbacks read this monitor's tags at validation end (the epoch's evaluation
        then runs in its closing validation), and a warning for each that would read where no
        evaluation of the current weights is (`checks.stale_reads`)."""
        consumers = metric_consumers(trainer, self, self._groups(pl_module))
        self.run.early_readers = any(not reads_at_epoch_end(cb, trainer) for cb in consumers)
        for cb in consumers:
            if warning := stale_reads(cb, trainer, self.schedule):
                rank_zero_warn(warning)

    def _start_new_run(self) -> None:
        """Forget the previous fit's run: its evaluations, drift reference, run id and layers."""
        self.run.forget()
        self.tracker = AttentionTracker(self.tracker.options)
        self.layers = self._layer_spec  # None: chosen again, for this model

    def _open_run(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, probes: dict[str, Any]
    ) -> None:
        """On rank zero, at the start of training: the layers, the run's folder and sinks, the
        resume warnings, the drift reference and the probe on disk."""
        self.run.probes = probes
        for warning in start_warnings(pl_module, probes, self.render):
            rank_zero_warn(warning)
        if self.layers is None:
            self.layers = [default_layer(pl_module, next(iter(probes.values())), self.engine)]
        if trainer.loggers:
            others = [m for m in _monitors(trainer) if m is not self and m.run.probes]
            check_shared_tags(self._groups(pl_module), [m._groups(pl_module) for m in others])
        measures = self.tracker.options.measures, self.trust.measures
        self.run.sinks = open_sinks(trainer, self._claim_folder(trainer), probes, *measures)
        for warning in self.run.resume_warnings(self._run_state(), self.outputs.history):
            rank_zero_warn(warning)
        if self.outputs.reference is not None and not self.tracker.reference:
            use_reference_run(self.tracker, self.outputs.reference, probes)
        self._evaluator.open_history(probes, self.run.id or "", self.evaluations)

    def _claim_folder(self, trainer: pl.Trainer) -> Path:
        """This run's folder (`RunHistory.claim`); one explicit `save_dir` per monitor."""
        others = [m for m in _monitors(trainer) if m is not self and m.outputs.history]
        beside = [m._evaluator.history for m in others]
        folder = run_folder(trainer, self.outputs.save_dir)
        return self.run.claim(self._evaluator.history, folder, self.outputs, self.state_key, beside)

    def _groups(self, pl_module: pl.LightningModule) -> set[Group]:
        return logged_groups(pl_module, self.run.probes, self.layers or [], self.methods)

    def _run_state(self, tracker: Mapping[str, Any] | None = None) -> RunState:
        """This run as a checkpoint stores it (`tracker`: the drift state, when it is stored)."""
        recorded = settings(self.engine, self.tracker.options, self.probe_options.masks)
        return self.run.state(self.folder, recorded, tracker)

    def _evaluate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        epoch: int,
        baseline: bool = False,
        final: bool = False,
    ) -> None:
        """One evaluation of the model now (`Evaluator.evaluate`), counted when it ran."""
        run = self.run
        run.last_step = trainer.global_step
        plan = Plan(
            run.probes, self.layers or [], self.engine, self.render, self.filters,
            self.tracker, run.sinks, self.trust,
        )  # fmt: skip
        entry = Entry(run.evaluations, epoch, run.id or "", final)
        if self._evaluator.evaluate(trainer, pl_module, plan, entry, baseline):
            run.evaluations += 1


def _monitors(trainer: pl.Trainer) -> list[CamMonitor]:
    """Every CamMonitor in the Trainer's callbacks, this one included."""
    callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
    return [cb for cb in callbacks if isinstance(cb, CamMonitor)]
