"""CamMonitor, the Lightning callback: only Lightning concerns (when, which rank, state)."""

from __future__ import annotations

import math
import os
import pickle
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import (  # what both namespaces re-export
    rank_zero_info,
    rank_zero_warn,
)
from torch import Tensor, nn

from .capture import users_hooks_warning
from .default_layer import first_spatial_layer
from .drift import AttentionTracker
from .encoding import EncodedGrid, GridEncoder, PendingGrids
from .evaluation import ImageKey, explain_first_failure, normalisation_warning, run_evaluation
from .history import (
    BackgroundWriter,
    evaluation_record,
    find_history,
    history_runs,
    prune_from,
    read_history,
    write_evaluation,
    write_probe_sets,
)
from .history.background import WriteError
from .layers import resolve_layers, unwrap_model
from .options import (
    DriftOptions,
    EngineOptions,
    FilterOptions,
    RenderOptions,
    check_int,
)
from .probe import (
    ProbeSet,
    build_probes,
    check_masks,
    content_hash,
    loader_probe,
    preserved_rng,
    probe_sets,
)
from .render import GRID_COLUMNS
from .schema import (
    DEFAULT_MEASURES,
    INPUT_LAYER,
    METRIC_PREFIXES,
    SECONDS_TAG,
    MapKey,
    dashboard_charts,
    image_tag,
    parse_scalar_tag,
)
from .sinks import Sink, lightning_classes, run_folder, scalar_tags, sinks_for
from .types import ForwardFn, LayerSpec, OutputTransform, ProbeSpec, Reshape

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import Strategy

# The families of tags `publish_metrics` puts into `trainer.callback_metrics`.
MONITORED_PREFIXES = METRIC_PREFIXES


def check_strategy(strategy: Strategy) -> None:
    """Refuse sharded strategies of either namespace: no rank holds whole layers to hook."""
    name = type(strategy).__name__
    sharded = lightning_classes("strategies", "FSDPStrategy") + lightning_classes(
        "strategies", "ModelParallelStrategy"
    )
    if isinstance(strategy, sharded) or "DeepSpeed" in name:
        raise ValueError(
            f"CamMonitor does not support the sharded strategy {name}: no rank holds whole "
            "layers to hook. Use ddp, ddp_spawn or a single device for runs you monitor."
        )


def check_metric_consumers(trainer: pl.Trainer, monitor: CamMonitor) -> None:
    """Callbacks that monitor one of the monitor's tags (ModelCheckpoint, EarlyStopping) need
    one process, and must run after the monitor to see the evaluation of the same epoch."""
    consumers = [
        cb for cb in trainer.callbacks
        if cb is not monitor and str(getattr(cb, "monitor", None)).startswith(MONITORED_PREFIXES)
    ]  # fmt: skip
    if consumers and trainer.world_size > 1:
        raise ValueError(
            f"{type(consumers[0]).__name__}(monitor={consumers[0].monitor!r}) watches a "
            f"CamMonitor tag in a run of {trainer.world_size} processes, but only rank zero "
            "evaluates, so the other ranks never have it. Monitor it on a single device."
        )
    order = trainer.callbacks.index(monitor) if monitor in trainer.callbacks else -1
    for cb in consumers:
        if trainer.callbacks.index(cb) < order:
            rank_zero_warn(
                f"CamMonitor: {type(cb).__name__}(monitor={cb.monitor!r}) comes before the "
                "monitor in `callbacks`, so at each epoch end it sees the previous evaluation. "
                "List CamMonitor first."
            )


def check_consumer_layers(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """A callback monitoring a ``cam_*`` tag whose layer is no module of the LightningModule
    would wait for a metric that never comes: tags name a layer by its full dotted name."""
    module = unwrap_model(pl_module)
    names = [name for name, _ in module.named_modules(remove_duplicate=False) if name]
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        key = parse_scalar_tag(str(getattr(cb, "monitor", None)))
        if key is None or key.maps.layer == INPUT_LAYER or key.maps.layer in names:
            continue
        fuller = [n for n in names if n.endswith("." + key.maps.layer)]
        hint = (
            f"monitor {key._replace(maps=key.maps._replace(layer=fuller[0])).tag!r}"
            if len(fuller) == 1
            else "monitor the tag with the layer's full name from named_modules()"
        )
        raise ValueError(
            f"{type(cb).__name__}(monitor={cb.monitor!r}) watches layer {key.maps.layer!r}, "
            f"which is not a module of {type(module).__name__}: CamMonitor tags name a layer by "
            f"its full dotted name in the LightningModule, so this tag is never logged. Fix: "
            f"{hint}."
        )


def val_dataloaders(trainer: pl.Trainer) -> Any:
    """The fit's val dataloaders, also where Lightning has not loaded them yet at the start of
    training (epoch 0 does not validate and there is no sanity check): then asked from their
    source (the datamodule, the module's hook or the loaders given to `fit`), leaving the
    random streams as they were and Lightning's own loading to Lightning."""
    if trainer.val_dataloaders is not None or not trainer.enable_validation:
        return trainer.val_dataloaders
    source = getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)
    if source is None:  # a Lightning without it: the train set, as before
        return None
    with preserved_rng():
        return source.dataloader()


def publish_metrics(trainer: pl.Trainer, scalars: Mapping[str, float]) -> None:
    """Every finite scalar the monitor logs into `trainer.callback_metrics` (Lightning keeps that
    dict between steps), so ModelCheckpoint and EarlyStopping can monitor it. An undefined one
    (NaN: every map of the probe set all zero or constant) keeps the last value there, since
    EarlyStopping stops the run on a non-finite value; the loggers and history get the NaN."""
    trainer.callback_metrics.update(
        {tag: torch.tensor(v) for tag, v in scalars.items() if math.isfinite(v)}
    )


@contextmanager
def logging_off(module: nn.Module) -> Iterator[None]:
    """`self.log` / `self.log_dict` calls do nothing inside the block: a model that logs from
    `forward` would otherwise log the probe's values in place of the training batch's, under
    the same names. Shadowed on the instance, and removed after."""
    names = [name for name in ("log", "log_dict") if callable(getattr(module, name, None))]
    found = {name: vars(module)[name] for name in names if name in vars(module)}
    for name in names:
        object.__setattr__(module, name, _ignore)
    try:
        yield
    finally:
        for name in names:
            if name in found:
                object.__setattr__(module, name, found[name])
            else:
                vars(module).pop(name, None)


def _ignore(*args: Any, **kwargs: Any) -> None:
    """Takes a `log` call and does nothing."""


# One class for both namespaces: a subclass of each installed `Callback`, so both Trainers and
# both LightningCLIs accept it.
class CamMonitor(*lightning_classes("callbacks", "Callback")):  # type: ignore[misc]
    """Log Grad-CAM overlays of a fixed probe batch, and how attention drifts, during `fit`.

    A baseline evaluation runs at the start of training (attention at initialisation; it also
    checks the whole configuration), then one at the end of every `every_n_epochs`-th epoch (or
    every `every_n_steps` steps), and a final one at the end of `fit` when the schedule left the
    last step unevaluated; on global rank zero only. The README lists the logged tags. Several
    monitors in one Trainer must differ in layers, methods, probe, schedule or `save_dir`.

    Args:
        layer: a name (``"features.29"``), a glob, a module or a list; None: the last spatial one.
        methods: one or several of ``cam_monitor.ALL_METHODS`` (``"gradcam"``, ``"layercam"``...).
        every_n_epochs: evaluate at the end of every N-th training epoch (None: 1, unless
            ``every_n_steps`` is given).
        every_n_steps: evaluate every N optimizer steps instead (not with ``every_n_epochs``).
        probe: None (samples of the val, else train, dataset), a Tensor, an ``(inputs, labels)``
            tuple, a dict batch, a Dataset, a DataLoader, or a dict of named probe sets.
        num_probe: samples taken from a Dataset or DataLoader probe.
        target: ``"predicted"``, ``"label"``, a class index, a LongTensor [B] or a callable.
        output_transform: picks the logits from a tuple or dict output: index, key or callable.
        forward: ``forward(module, inputs)``, how the model is called on the probe.
        reshape: turns a layer output into ``[B, C, H, W]`` (channels-last outputs and token
            grids of the input's shape: automatic where unambiguous).
        masks: bool ``[B, H, W]`` or boxes ``[B, 4]`` for localization scores, or a dict of them
            (only with an explicit tensor/tuple probe: dataset items carry their own masks).
        input_key: key of the inputs in dict batches (default: ``image``, ``input``, ``x``...).
        label_key: key of the labels in dict batches (default: ``label``, ``target``, ``y``...).
        colormap: OpenCV colormap of the heat maps (``"jet"``, ``"turbo"``, ``"viridis"``...).
        alpha: heat-map opacity over the image, in [0, 1].
        mean: per-channel normalisation mean to undo before drawing (with ``std``).
        std: per-channel normalisation std to undo before drawing (with ``mean``).
        class_names: names for the tile captions.
        nrow: tiles per grid row (4: a 16-image probe reads at TensorBoard's card size).
        views: grids per signed map (``integrated_gradients``, ``guided_backprop``,
            ``deconvnet``, ``guided_gradcam``): any of ``"all"``, ``"pos"``, ``"neg"``.
        gray_views: draw those views in grays instead of blue-white-red.
        image_format: ``"jpeg"`` (quality 90) or ``"png"`` (lossless, several times larger and
            slower to encode): how overlay grids are logged and saved; pixel-level maps are PNG.
        batch_size: probe rows per pass, to bound memory (None: the whole probe at once).
        smooth: noisy copies averaged by the gradient CAMs (Smooth Grad-CAM++ with gradcam++)
            and by ``smoothgrad`` (16 when 0).
        noise: noise std of those copies, as a fraction of each image's value range.
        cam_head: for ``cam``: the Linear classifier after global pooling (default: the last).
        ig_steps: Riemann steps of ``integrated_gradients`` from the all-zero input (black in
            [0, 1], the mean colour for normalised images).
        filters: ``{"features.28": [0, 5]}``: channel activations and inputs that excite them.
        drift_measures: any of ``spearman``, ``pearson``, ``topk_iou``, ``js``, ``com_shift``
            (default: ``spearman`` and ``topk_iou``).
        topk: fraction of pixels for ``topk_iou`` and the mask IoU.
        pointing_tolerance: pixels by which a mask is grown for the pointing game.
        reference: a run directory whose first evaluation is the drift reference (``*_ref``).
        history: write the raw maps of every evaluation to disk (for ``cam-monitor show``).
        save_dir: where history and image-file fallbacks go (default
            ``<log_dir>/cam_monitor``); it must not hold another run's history.
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
        target: str | int | Tensor | Callable[[Tensor], Tensor] = "predicted",
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
        batch_size: int | None = None,
        smooth: int = 0,
        noise: float = 0.15,
        cam_head: str | None = None,
        ig_steps: int = 256,
        filters: Mapping[str, Sequence[int]] | None = None,
        drift_measures: Sequence[str] = DEFAULT_MEASURES,
        topk: float = 0.2,
        pointing_tolerance: int = 0,
        reference: str | Path | None = None,
        history: bool = True,
        save_dir: str | Path | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.layers = self.__init_layers(layer)
        self._layer_spec = self.layers  # the layers as given: state_key stays the same after setup
        self._module_names: dict[int, str] = {}  # module layers' names, found in `setup`
        self.__init_schedule(every_n_epochs, every_n_steps)
        self.__init_probe(probe, num_probe, masks, input_key, label_key)
        self.engine = EngineOptions(
            methods=methods, target=target, forward=forward, output_transform=output_transform,
            reshape=reshape, batch_size=batch_size, smooth=smooth, noise=noise,
            cam_head=cam_head, ig_steps=ig_steps,
        )  # fmt: skip
        self.render = RenderOptions(
            colormap, alpha, mean, std, class_names, nrow, views, gray_views, image_format
        )
        self.filters = FilterOptions({} if filters is None else filters)
        drift = DriftOptions(drift_measures, topk, pointing_tolerance)
        self.tracker = AttentionTracker(drift)
        self.__init_outputs(reference, history, save_dir, strict)
        self._probes: dict[str, ProbeSet] = {}
        self._sinks: list[Sink] = []
        self.folder: Path | None = None
        self.evaluations = 0
        self._last_step = -1
        self._resumed_hashes: dict[str, str] = {}
        self._resumed_settings: dict[str, str] = {}  # `_settings()` of the checkpointed run
        self._resumed_folder: str | None = None  # where the checkpointed run wrote its history
        self.run_id: str | None = None  # set at the start of fit, or by a resumed checkpoint
        self._idle = False  # fast_dev_run: nothing evaluated, nothing written
        self._done_epoch = -1  # the last epoch whose last training batch has run
        self._restored = False  # whether this fit resumed the monitor from a checkpoint
        self._foreign_key: str | None = None  # a checkpoint's other CamMonitor state, unused
        self._writer = BackgroundWriter()  # history files, written off the training thread
        self._encoder = GridEncoder()  # grids, encoded while drift is scored

    def __init_layers(self, layer: Any) -> list[LayerSpec] | None:
        if layer is None:
            return None
        layers = [layer] if isinstance(layer, (str, nn.Module)) else layer
        if isinstance(layers, Sequence) and all(isinstance(i, (str, nn.Module)) for i in layers):
            if not layers:
                raise ValueError("`layer` is an empty list; give at least one layer, or None.")
            return list(layers)
        raise TypeError(
            "`layer` must be a name like 'features.29', a glob, an nn.Module, a list of those, "
            f"or None, got {type(layer).__name__} {layer!r}."
        )

    def __init_schedule(self, every_n_epochs: Any, every_n_steps: Any) -> None:
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1, optional=True)
        every = check_int("every_n_epochs", every_n_epochs, 1, optional=True)
        if every is not None and self.every_n_steps is not None:
            raise ValueError(
                f"`every_n_epochs={every}` and `every_n_steps={self.every_n_steps}` are mutually "
                "exclusive: pass one of them (evaluate by epoch, or every N optimizer steps)."
            )
        self.every_n_epochs = 1 if every is None and self.every_n_steps is None else every

    def __init_probe(
        self, probe: Any, num_probe: int, masks: Any, input_key: Any, label_key: Any
    ) -> None:
        for name, key in (("input_key", input_key), ("label_key", label_key)):
            if key is not None and not isinstance(key, str):
                raise TypeError(f"`{name}` must be a dict key (str) or None, got {key!r}.")
        self._probe_sets = probe_sets(probe, input_key)  # checks types and set names
        self._probe_ids: dict[str, str] | None = None
        check_masks(masks, self._probe_sets)
        self.probe, self.masks, self.input_key, self.label_key = probe, masks, input_key, label_key
        self.num_probe = check_int("num_probe", num_probe, 1)

    def __init_outputs(self, reference: Any, history: Any, save_dir: Any, strict: Any) -> None:
        for name, folder in (("reference", reference), ("save_dir", save_dir)):
            if folder is not None and not isinstance(folder, (str, os.PathLike)):
                raise TypeError(f"`{name}` must be a folder path or None, got {folder!r}.")
        for name, flag in (("history", history), ("strict", strict)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be True or False, got {flag!r}.")
        self.reference, self.history, self.save_dir, self.strict = (
            reference, history, save_dir, strict,
        )  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        """ddp_spawn pickles callbacks: a callable argument pickle cannot store (a lambda, a
        local function) travels as a `_PickleGuard` that names it and the fix when pickled."""
        state = self.__dict__.copy()
        guards = {
            name: _PickleGuard(name, value)
            for name in _CALLABLE_OPTIONS
            if callable(value := getattr(self.engine, name)) and not _picklable(value)
        }
        if guards:
            state["engine"] = replace(self.engine, **guards)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        engine = state["engine"]
        guards = {
            name: value.fn
            for name in _CALLABLE_OPTIONS
            if isinstance(value := getattr(engine, name), _PickleGuard)
        }
        self.__dict__.update(state, engine=replace(engine, **guards) if guards else engine)

    @property
    def methods(self) -> tuple[str, ...]:
        """The validated method names."""
        return self.engine.methods

    @property
    def state_key(self) -> str:
        """What identifies this monitor among several in one Trainer: its layers and methods, and
        its probe, schedule and folder where they are not the defaults (so a lone monitor keeps
        the key older checkpoints were saved under)."""
        return self._state_key(self._module_name)

    def _state_key(self, module_name: Callable[[nn.Module], str]) -> str:
        """`state_key` with `module_name` naming the layers given as modules."""
        layers = self._layer_spec or []
        names = [layer if isinstance(layer, str) else module_name(layer) for layer in layers]
        identity: dict[str, Any] = {"layers": names, "methods": list(self.methods)}
        if self._probe_sets is not None:
            if self._probe_ids is None:  # hashed once: the key is read at every checkpoint
                self._probe_ids = {name: _spec_id(s) for name, s in self._probe_sets.items()}
            identity["probe"] = self._probe_ids
        if self.every_n_steps is not None:
            identity["every_n_steps"] = self.every_n_steps
        elif self.every_n_epochs != 1:
            identity["every_n_epochs"] = self.every_n_epochs
        if self.save_dir is not None:
            identity["save_dir"] = os.fspath(self.save_dir)
        return self._generate_state_key(**identity)

    def _module_name(self, layer: nn.Module) -> str:
        """A module layer in `state_key`: its dotted name once `setup` found it in the model (the
        key checkpoints are saved and loaded under), before that its type and identity (so two
        monitors on two modules of one type can share a Trainer)."""
        return self._module_names.get(id(layer), f"{type(layer).__name__}@{id(layer):x}")

    # -- Lightning hooks ------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer.strategy)
        check_metric_consumers(trainer, self)
        check_consumer_layers(trainer, pl_module)
        for monitor in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(monitor, CamMonitor):  # module layers by name, in every monitor's key
                monitor._name_modules(pl_module)
        twins = [
            cb
            for cb in trainer.callbacks  # type: ignore[attr-defined]
            if isinstance(cb, CamMonitor) and cb is not self and cb.state_key == self.state_key
        ]
        if twins:
            raise ValueError(
                f"Two identical CamMonitors are in this Trainer ({self.state_key}): they would "
                "write the same tags, folder and checkpoint state. Keep one, or make them differ "
                "in layers, methods, probe (set names), schedule or save_dir."
            )
        if self.save_dir is not None and Path(self.save_dir).exists():
            if not Path(self.save_dir).is_dir():  # every history write would fail and warn
                raise ValueError(
                    f"save_dir={os.fspath(self.save_dir)!r} is a file, not a folder; pass a "
                    "folder path (it is created if missing)."
                )
        self._restored = False  # until `load_state_dict` restores a checkpoint in this fit
        self._foreign_key = None
        self._probes, self._sinks = {}, []  # the last fit's: `evaluate()` waits for this fit's
        if self._layer_spec is not None:
            resolve_layers(pl_module, self._layer_spec)  # a typo fails here, before any step
        if self.filters.channels:
            resolve_layers(pl_module, list(self.filters.channels))

    def _name_modules(self, pl_module: pl.LightningModule) -> None:
        """Find the dotted names of the module layers given as objects (a typo fails here)."""
        modules = [layer for layer in self._layer_spec or [] if isinstance(layer, nn.Module)]
        self._module_names = {
            id(layer): resolve_layers(pl_module, [layer])[0][0] for layer in modules
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._idle = bool(trainer.fast_dev_run)
        if self._idle:
            rank_zero_info(
                "CamMonitor: fast_dev_run is on, so the monitor evaluates nothing and writes "
                "nothing in this run."
            )
            return
        if self.evaluations and trainer.global_step == 0 and not self._restored:
            self._start_new_run()
        probes = self._build_probes(trainer, pl_module)  # every rank: one fails, all fail
        if not trainer.is_global_zero:
            return
        self._probes = probes
        for probe in probes.values():
            warning = normalisation_warning(probe, self.render)
            if warning:
                rank_zero_warn(warning)
        if self.layers is None:
            self.layers = [self._default_layer(pl_module)]
        self._check_shared_tags(trainer, pl_module)
        hooks = users_hooks_warning(unwrap_model(pl_module))
        if hooks:
            rank_zero_warn(hooks)
        if self.run_id is None:
            self.run_id = uuid.uuid4().hex[:12]
        self.folder = self._claim_folder(trainer)
        self._sinks = sinks_for(trainer, self.folder)
        if not trainer.loggers:
            rank_zero_warn(
                f"CamMonitor: the Trainer has no logger; grids and scalars go to {self.folder}."
            )
        charts = dashboard_charts(
            {name: probe.masks is not None for name, probe in probes.items()},
            self.tracker.options.measures,
        )
        for sink in self._sinks:
            sink.record_probe({name: probe.digest for name, probe in probes.items()})
            sink.record_dashboard(charts)
        self._check_resumed_probe(probes)
        if self._restored:
            self._check_resumed_settings()
        if self.reference is not None and not self.tracker.reference:
            first = read_history(find_history(self.reference))[0]
            self.tracker.use_reference(first, probes, source=str(self.reference))
        if self.history:
            if self.evaluations > 0:
                self._check_resumed_folder()
                prune_from(self.folder, self.evaluations)  # a resumed run rewrites what came after
            self._write_probe()
        if self.evaluations == 0:
            self._evaluate(trainer, pl_module, epoch=trainer.current_epoch, baseline=True)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.is_last_batch:
            self._done_epoch = trainer.current_epoch
        if self.every_n_steps is None or self._idle or not trainer.is_global_zero:
            return
        # The first step at or past each multiple: the global step can jump by more than one
        # (each optimizer of a manual-optimization step counts) and step over a multiple.
        step = trainer.global_step
        if (
            step > self._last_step
            and step // self.every_n_steps > self._last_step // self.every_n_steps
        ):
            self._evaluate(trainer, pl_module, epoch=self._epochs_completed(trainer))

    def _epochs_completed(self, trainer: pl.Trainer) -> int:
        """Epochs whose training is complete: after an epoch's last batch (in its validation,
        say) `current_epoch` still counts that epoch as running; an evaluation of those weights
        belongs to the epoch-end one's epoch."""
        return trainer.current_epoch + int(self._done_epoch == trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is None or self._idle or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._evaluate(trainer, pl_module, epoch=trainer.current_epoch + 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The final model is evaluated: one last evaluation, marked final, when the schedule
        left the last step unevaluated (early stopping, `max_steps`, an epoch count that
        `every_n_epochs` does not divide)."""
        if self._idle or not trainer.is_global_zero or not self._probes:
            return
        if trainer.global_step != self._last_step:
            self._evaluate(trainer, pl_module, epoch=trainer.current_epoch, final=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every history file is on disk when `fit` returns, and no encoding thread is left."""
        self._encoder.close()
        self._report_writes(self._writer.close())

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._encoder.close()
        self._report_writes(self._writer.close())

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._encoder.close()
        for failure in self._writer.close():  # warn only: the exception is what the user sees
            rank_zero_warn(f"CamMonitor could not write {failure.what}: {failure.error}")

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run one evaluation now, from any hook after training started (even under inference
        mode, e.g. in `on_validation_epoch_end`); rank zero only, like the scheduled ones."""
        if trainer.is_global_zero and self._probes:
            self._evaluate(trainer, pl_module, epoch=self._epochs_completed(trainer))

    def state_dict(self) -> dict[str, Any]:
        return {
            "evaluations": self.evaluations,
            "last_step": self._last_step,
            "probe_hashes": {name: probe.digest for name, probe in self._probes.items()},
            "tracker": self.tracker.state_dict(),
            "run_id": self.run_id,
            "folder": None if self.folder is None else os.fspath(self.folder),
            "settings": self._settings(),
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint whose monitor state was saved under another `state_key` (layers, methods,
        probe, schedule or save_dir changed) continues nothing: say so, this is a new run."""
        if trainer.state.fn != "fit":  # validate/test/predict with ckpt_path: no run goes on
            return
        states = checkpoint.get("callbacks") or {}
        legacy = self._state_key(lambda layer: type(layer).__name__)  # how module layers were keyed
        if self.state_key not in states and legacy in states:
            states[self.state_key] = states[legacy]  # what Lightning hands `load_state_dict`
        claimed = {cb.state_key for cb in trainer.callbacks}  # type: ignore[attr-defined]
        foreign = [
            key for key in states if str(key).startswith("CamMonitor{") and key not in claimed
        ]
        self._foreign_key = None if self.state_key in states or not foreign else str(foreign[0])
        if self._foreign_key is not None:
            rank_zero_warn(
                f"CamMonitor: the checkpoint's CamMonitor state was saved under "
                f"{self._foreign_key}, but this monitor is {self.state_key} (its layers, "
                "methods, probe, schedule or save_dir changed), so it does not continue that "
                f"run: it starts a new run at step {checkpoint.get('global_step', '?')}, with its "
                "own baseline, drift reference, run id and history. Resume with the arguments "
                "the checkpoint was made with to continue the checkpointed run."
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = True
        self.evaluations = int(state_dict.get("evaluations", 0))
        self._last_step = int(state_dict.get("last_step", -1))
        self._resumed_hashes = dict(state_dict.get("probe_hashes", {}))
        self._resumed_folder = state_dict.get("folder")
        self.tracker.load_state_dict(state_dict.get("tracker", {}))
        self._resumed_settings = dict(state_dict.get("settings", {}))
        run_id = state_dict.get("run_id")  # checkpoints from before run ids: the unnamed run ""
        self.run_id = str(run_id) if run_id is not None else ("" if self.evaluations else None)

    # -- internals ------------------------------------------------------------------------------

    def _settings(self) -> dict[str, str]:
        """The arguments outside `state_key` that change the maps or scores a run records, as
        text: a resume with other values warns that its history mixes both."""
        engine, drift = self.engine, self.tracker.options
        values = {
            "target": engine.target, "forward": engine.forward,
            "output_transform": engine.output_transform, "reshape": engine.reshape,
            "smooth": engine.smooth, "noise": engine.noise, "cam_head": engine.cam_head,
            "ig_steps": engine.ig_steps, "masks": self.masks, "drift_measures": drift.measures,
            "topk": drift.topk, "pointing_tolerance": drift.pointing_tolerance,
        }  # fmt: skip
        return {name: _describe(value) for name, value in values.items()}

    def _evaluate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        epoch: int,
        baseline: bool = False,
        final: bool = False,
    ) -> None:
        """Compute, draw, score and log one evaluation; failures warn and skip unless strict.

        The grids are encoded on the encoder's threads while drift is scored here, once for
        every sink. The baseline is also the configuration check: any error computing it is
        raised.
        """
        start = time.perf_counter()
        step = self._last_step = trainer.global_step
        encoding: PendingGrids[ImageKey] | None = None
        try:
            module = unwrap_model(pl_module)
            with logging_off(module):
                output = run_evaluation(
                    module, self._probes, self.layers or [], self.engine, self.render,
                    self.filters, check_scores=baseline,
                )  # fmt: skip
            if self._sinks:
                encode = any(sink.needs_bytes for sink in self._sinks)  # MLflow takes pixels
                encoding = self._encoder.submit(
                    output.images, self.render.image_format, encode=encode
                )
            scalars, non_finite = self.tracker.score(output.results, self._probes)
        except Exception as err:
            if encoding is not None:
                encoding.cancel()
            if baseline and not (isinstance(err, ValueError) and _raised_here(err)):
                raise ValueError(explain_first_failure(self._probes, err)) from err
            if self.strict or baseline:
                raise
            return self._skip(trainer, err)
        if non_finite:
            rank_zero_warn(
                f"CamMonitor: {non_finite} CAMs at step {step} hold NaN or Inf (non-finite probe "
                "inputs or a diverged model?); they are drawn as zeros and left out of the drift "
                "means (see the *_excluded counts)."
            )
        output.scalars.update(scalars)
        output.scalars[SECONDS_TAG] = time.perf_counter() - start
        publish_metrics(trainer, scalar_tags(output.scalars))
        try:
            if self.history and self.folder is not None:
                record = evaluation_record(
                    self.evaluations, epoch, step, self._probes, output.results,
                    scalar_tags(output.scalars), run=self.run_id or "", final=final,
                    class_names=self.render.class_names,
                )  # fmt: skip
                what = f"evaluation {record.index}"
                self._writer.submit(partial(write_evaluation, self.folder, record), what)
                self._report_writes(self._writer.errors())
        except Exception as err:
            if self.strict:
                raise
            rank_zero_warn(
                f"CamMonitor could not record its evaluation at epoch {trainer.current_epoch}, "
                f"step {step} in its history ({self.folder}): {type(err).__name__}: {err}. The "
                "loggers still get it; training continues; pass strict=True to raise instead."
            )
        images = self._encoded(trainer, encoding)
        for sink in self._sinks:  # one logger that fails costs the others nothing
            try:
                sink.log(images, output.scalars, step)
            except Exception as err:
                if self.strict:
                    raise
                rank_zero_warn(
                    f"CamMonitor could not log its evaluation at epoch {trainer.current_epoch}, "
                    f"step {step} to {sink}: {type(err).__name__}: {err}. The "
                    "other loggers and the history have it; training continues; pass "
                    "strict=True to raise instead."
                )
        self.evaluations += 1

    def _encoded(
        self, trainer: pl.Trainer, encoding: PendingGrids[ImageKey] | None
    ) -> Mapping[ImageKey, EncodedGrid]:
        """The encoded grids; when one cannot be encoded, this evaluation's images are skipped
        with a warning and its scalars are still logged (`strict=True` raises)."""
        try:
            return encoding.result() if encoding is not None else {}
        except Exception as err:
            if self.strict:
                raise
            rank_zero_warn(
                f"CamMonitor skipped the images of its evaluation at epoch "
                f"{trainer.current_epoch}, step {trainer.global_step}: {type(err).__name__}: "
                f"{str(err).rstrip('.')}. Its scalars are logged; training continues; pass "
                "strict=True to raise instead."
            )
            return {}

    def _build_probes(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, ProbeSet]:
        """The probe sets, on the module's device and in the precision the Trainer feeds it."""
        specs = self._probe_sets or loader_probe(
            [("val", val_dataloaders(trainer)), ("train", trainer.train_dataloader)],
            rank_zero_warn,
        )
        probes = build_probes(
            specs, self.num_probe, self.masks, self.input_key, self.label_key, rank_zero_warn
        )
        convert, device = trainer.precision_plugin.convert_input, pl_module.device
        return {
            name: replace(probe.to(device), inputs=convert(probe.inputs.to(device)))
            for name, probe in probes.items()
        }

    def _default_layer(self, pl_module: pl.LightningModule) -> str:
        first = next(iter(self._probes.values()))
        engine = self.engine
        module = unwrap_model(pl_module)
        with logging_off(module):
            chosen = first_spatial_layer(
                module, first.inputs, engine.forward, engine.output_transform
            )
        rank_zero_warn(
            f"CamMonitor: no layer given, using {chosen!r} (the last spatial block that the "
            f"class score reaches). Pass CamMonitor(layer={chosen!r}) to choose it yourself."
        )
        return chosen

    def _groups(self, pl_module: pl.LightningModule) -> set[tuple[str, str, str]]:
        """The (probe, layer, method) groups this monitor logs once started."""
        names = [name for name, _ in resolve_layers(unwrap_model(pl_module), self.layers or [])]
        return {(p, n, m) for p in self._probes for n in names for m in self.methods}

    def _check_shared_tags(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Two monitors logging the same tags to the same loggers would mix their curves."""
        if not trainer.loggers:
            return
        mine = self._groups(pl_module)
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(other, CamMonitor) and other is not self and other._probes:
                shared = sorted(mine & other._groups(pl_module))
                if shared:
                    probe, layer, method = shared[0]
                    raise ValueError(
                        "Two CamMonitors in this Trainer would both log "
                        f"{image_tag(MapKey(probe, layer, method))} ({len(shared)} shared tag "
                        "group(s)), mixing their curves. Name "
                        "their probe sets apart (probe={'name': ...}), or monitor other layers "
                        "or methods."
                    )

    def _claim_folder(self, trainer: pl.Trainer) -> Path:
        """This run's folder: one history per run. An explicit `save_dir` holding another run's
        history is refused; a default folder that does gives way to `cam_monitor-<run id>`
        beside it (a fixed logger version, a second monitor). Resuming this run is allowed."""
        folder = run_folder(trainer, self.save_dir)
        if not self.history:
            return folder
        for monitor in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(monitor, CamMonitor):
                monitor._writer.wait()  # another monitor's files, still queued, count too
                if monitor is not self and monitor.history and monitor.folder == folder:
                    if self.save_dir is not None:
                        raise ValueError(
                            f"Two CamMonitors in this Trainer have save_dir="
                            f"{os.fspath(self.save_dir)!r}; one folder holds one monitor's "
                            "history. Give each monitor its own save_dir."
                        )
        others = {run: ix for run, ix in history_runs(folder).items() if run != self.run_id}
        if not others:
            return folder
        found = "; ".join(
            f"run {run or '(no id)'}: {len(ix)} evaluation(s)" for run, ix in others.items()
        )
        if self.save_dir is not None:
            foreign = self._foreign_key
            raise ValueError(
                f"save_dir={os.fspath(self.save_dir)!r} already holds the cam-monitor history of "
                f"another run ({found}); one folder holds one run. Pass a new save_dir, delete "
                "that folder, or resume that run from its checkpoint (trainer.fit(..., "
                "ckpt_path=...))"
                + (
                    "."
                    if foreign is None
                    else f" with the same monitor: the checkpoint's "
                    f"CamMonitor state was saved under {foreign}, this monitor is {self.state_key}."
                )
            )
        own = folder.with_name(f"{folder.name}-{self.run_id or 'legacy'}")
        rank_zero_warn(
            f"CamMonitor: {folder} already holds another run's history ({found}); this run's "
            f"goes to {own}. Give each run its own logger version or save_dir to avoid this."
        )
        return own

    def _start_new_run(self) -> None:
        """Forget the previous fit's run: a fit from step 0 that restored no checkpoint (the
        monitor given to a new Trainer) gets its own baseline, drift reference and run id."""
        self.evaluations, self._last_step, self.run_id = 0, -1, None
        self._done_epoch = -1
        self._resumed_hashes, self._resumed_folder = {}, None
        self.tracker = AttentionTracker(self.tracker.options)
        self.layers = self._layer_spec  # None: chosen again, for this model

    def _write_probe(self) -> None:
        """Store the probe once per run so reports can draw overlays; failure only warns."""
        write = partial(write_probe_sets, self.folder, self._probes, run=self.run_id or "")
        self._writer.submit(write, "the probe")

    def _report_writes(self, failed: Sequence[WriteError]) -> None:
        """History writes that failed in the background: raised with strict, else warned."""
        for failure in failed:
            if self.strict:
                raise failure.error
            rank_zero_warn(
                f"CamMonitor could not write {failure.what} to {self.folder}: "
                f"{type(failure.error).__name__}: {failure.error}. Training continues; pass "
                "strict=True to raise instead."
            )

    def _check_resumed_folder(self) -> None:
        """A run resumed into another folder (Lightning's next logger version) leaves its earlier
        evaluations where they were: say where, since `show`/`compare` read one folder."""
        before = self._resumed_folder
        if before is None or self.folder is None or Path(before) == self.folder:
            return
        if history_runs(self.folder).get(self.run_id or ""):
            return
        rank_zero_warn(
            f"CamMonitor: this resumed run's earlier evaluations (0-{self.evaluations - 1}) are "
            f"in {before}; from here on its history goes to {self.folder} (a new logger "
            "version?), so `cam-monitor show`/`compare` see part of it in each folder. Pass "
            "save_dir= (or a fixed logger version) to keep a run's history in one folder."
        )

    def _check_resumed_settings(self) -> None:
        """A resumed run computing its maps or scores otherwise than before: say what changed."""
        saved, now = self._resumed_settings, self._settings()
        changed = [f"{k} ({saved[k]} -> {v})" for k, v in now.items() if saved.get(k, v) != v]
        if changed:
            rank_zero_warn(
                f"CamMonitor: resumed with other {', '.join(changed)} than the checkpoint's run: "
                "drift across the resume compares maps or scores computed differently, and the "
                "run's history mixes both. Resume with the checkpoint's arguments, or start a new "
                "run (no ckpt_path, or another save_dir) to compare the two."
            )

    def _check_resumed_probe(self, probes: Mapping[str, ProbeSet]) -> None:
        for name, digest in self._resumed_hashes.items():
            if name in probes and probes[name].digest != digest:
                rank_zero_warn(
                    f"CamMonitor: probe {name!r} differs from the checkpoint's (hash "
                    f"{probes[name].digest} vs {digest}); drift after the resume compares "
                    "different images."
                )

    def _skip(self, trainer: pl.Trainer, err: Exception) -> None:
        rank_zero_warn(
            f"CamMonitor skipped its evaluation at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}: {type(err).__name__}: {err}. Training continues; pass "
            "strict=True to raise instead."
        )


_CALLABLE_OPTIONS = ("target", "forward", "output_transform", "reshape")


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


class _PickleGuard:
    """A callable argument that pickle cannot store: copied as itself (`copy.deepcopy` needs no
    pickling), and refused by pickle with a message naming the argument and the fix."""

    def __init__(self, argument: str, fn: Callable[..., Any]) -> None:
        self.argument, self.fn = argument, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> _PickleGuard:
        return self

    def __reduce__(self) -> Any:
        index = ", or pass an index or key (output_transform=0)"
        raise pickle.PicklingError(
            f"CamMonitor({self.argument}={self.fn!r}) cannot be pickled, which strategy="
            "'ddp_spawn' (and any copy to another process) needs: define it as a function at "
            f"module level{index if self.argument == 'output_transform' else ''}, or use "
            "strategy='ddp'."
        )


def _raised_here(err: BaseException) -> bool:
    """Whether cam-monitor raised `err` itself (its own messages name the fix), not the model
    or torch inside it (BatchNorm's "expected 4D input" needs the probe's shape beside it)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    package = Path(__file__).parent
    return tb is not None and package in Path(tb.tb_frame.f_code.co_filename).parents


def _describe(value: Any) -> str:
    """An argument as text that is the same in every process: tensors by content hash,
    functions by import path, modules by type."""
    if isinstance(value, (Tensor, Mapping)):
        return f"tensor {content_hash(value)}"
    if isinstance(value, nn.Module):
        return type(value).__name__
    if callable(value):
        named = value if hasattr(value, "__qualname__") else type(value)  # a callable object
        return f"{getattr(named, '__module__', '?')}.{named.__qualname__}"
    return repr(value)


def _spec_id(spec: Any) -> str:
    """A probe set in `CamMonitor.state_key`: the content hash of a batch, else its type."""
    if isinstance(spec, (Tensor, tuple, list, Mapping)):
        return content_hash(spec)
    try:
        size = str(len(spec))
    except TypeError:  # an IterableDataset
        size = "?"
    return f"{type(spec).__name__}[{size}]"
