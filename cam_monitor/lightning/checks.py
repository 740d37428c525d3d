"""Setup-time checks on the Trainer, its strategy and its other callbacks: a configuration the
monitor cannot serve fails before the first training step, naming the cause and the fix."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.rank_zero import rank_zero_warn

from ..layers import resolve_layers, unwrap_model
from ..schema import INPUT_LAYER, METRIC_PREFIXES, MapKey, image_tag, parse_scalar_tag
from ..types import LayerSpec
from .compat import is_sharded, lightning_classes

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import Strategy

    from ..options import ScheduleOptions
    from .callback import CamMonitor

# The families of tags `publish_metrics` puts into `trainer.callback_metrics`.
MONITORED_PREFIXES = METRIC_PREFIXES

#: A (probe set, layer, method) group of tags a monitor logs.
Group = tuple[str, str, str]


def logged_groups(
    pl_module: pl.LightningModule,
    probes: Iterable[str],
    layers: Sequence[LayerSpec],
    methods: Sequence[str],
) -> set[Group]:
    """The (probe, layer, method) groups a monitor logs once started."""
    names = [name for name, _ in resolve_layers(unwrap_model(pl_module), layers)]
    return {(p, n, m) for p in probes for n in names for m in methods}


def check_strategy(strategy: Strategy) -> None:
    """Refuse sharded strategies of either namespace: no rank holds whole layers to hook."""
    if is_sharded(strategy):
        raise ValueError(
            f"CamMonitor does not support the sharded strategy {type(strategy).__name__}: no "
            "rank holds whole layers to hook. Use ddp, ddp_spawn or a single device for runs "
            "you monitor."
        )


def check_metric_consumers(trainer: pl.Trainer, monitor: CamMonitor) -> None:
    """Callbacks that monitor one of the monitor's tags (ModelCheckpoint, EarlyStopping) need
    one process; another callback with a `monitor` must run after the monitor to see the
    evaluation of the same epoch (Lightning runs ModelCheckpoint and EarlyStopping after every
    other callback at the end of a training epoch, and the monitor evaluates in the epoch's
    closing validation before any callback reads at its end)."""
    consumers = metric_consumers(trainer, monitor)
    if consumers and trainer.world_size > 1:
        raise ValueError(
            f"{type(consumers[0]).__name__}(monitor={consumers[0].monitor!r}) watches a "
            f"CamMonitor tag in a run of {trainer.world_size} processes, but only rank zero "
            "evaluates, so the other ranks never have it. Monitor it on a single device."
        )
    callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
    order = callbacks.index(monitor) if monitor in callbacks else -1
    for cb in consumers:
        if callbacks.index(cb) < order and reads_at_epoch_end(cb, trainer) is None:
            rank_zero_warn(
                f"CamMonitor: {type(cb).__name__}(monitor={cb.monitor!r}) comes before the "
                "monitor in `callbacks`, so at each epoch end it sees the previous evaluation. "
                "List CamMonitor first."
            )


def metric_consumers(
    trainer: pl.Trainer, monitor: CamMonitor, groups: set[Group] | None = None
) -> list[Any]:
    """The Trainer's other callbacks whose `monitor` is a monitor tag; with `groups` (what this
    monitor logs), only those whose tag is one of its groups' (or names none: ``cam_monitor/``
    tags, a tag that does not parse)."""
    consumers = [
        cb for cb in trainer.callbacks  # type: ignore[attr-defined]
        if cb is not monitor and str(getattr(cb, "monitor", None)).startswith(MONITORED_PREFIXES)
    ]  # fmt: skip
    if groups is None:
        return consumers
    mine = []
    for cb in consumers:
        key = parse_scalar_tag(str(cb.monitor))
        group = None if key is None else (key.maps.probe, key.maps.layer, key.maps.method)
        pixel = group is not None and group[1] == INPUT_LAYER
        if group is None or group in groups or (pixel and group[::2] in {g[::2] for g in groups}):
            mine.append(cb)
    return mine


def reads_at_epoch_end(cb: Any, trainer: pl.Trainer) -> bool | None:
    """Whether Lightning's EarlyStopping or ModelCheckpoint `cb` reads its `monitor` at the end
    of a training epoch (after every other callback's `on_train_epoch_end`), False: at the end
    of each validation; None for another callback (its hooks are its own)."""
    if isinstance(cb, lightning_classes("callbacks", "EarlyStopping")):
        flag = getattr(cb, "_check_on_train_epoch_end", None)
        if flag is None:  # what its `setup` decides
            flag = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
        return bool(flag)
    if isinstance(cb, lightning_classes("callbacks", "ModelCheckpoint")):
        return bool(cb._should_save_on_train_epoch_end(trainer))
    return None


def stale_reads(cb: Any, trainer: pl.Trainer, schedule: ScheduleOptions) -> str | None:
    """Why EarlyStopping or ModelCheckpoint `cb` would read its tag where the monitor has not
    just evaluated the current weights (it reads the last evaluation, of earlier weights), and
    the fix; None where each of its reads follows an evaluation at the same step, or for another
    callback. Read at the start of training, when the Trainer knows its batches."""
    at_end = reads_at_epoch_end(cb, trainer)
    if at_end is None:
        return None
    what = f"CamMonitor: {type(cb).__name__}(monitor={cb.monitor!r})"
    stale = (
        "where CamMonitor has not evaluated: each such check reads the last evaluation, of "
        "earlier weights"
    )
    period = 1  # it reads at the end of every `period`-th epoch, or at its validations
    if isinstance(cb, lightning_classes("callbacks", "ModelCheckpoint")):
        interval = getattr(cb, "_train_time_interval", None)
        steps = getattr(cb, "_every_n_train_steps", 0) or 0
        if interval is not None:
            return (
                f"{what} saves every {interval} of training, {stale} (and a checkpoint carries "
                "its value). Fix: save by epoch, or every N training steps with N a multiple "
                "of CamMonitor's every_n_steps."
            )
        if steps and (schedule.every_n_steps is None or steps % schedule.every_n_steps):
            return (
                f"{what} saves every {steps} training steps, {stale} (and a checkpoint "
                f"carries its value). Fix: CamMonitor(every_n_steps={steps}), or "
                "every_n_train_steps a multiple of the monitor's every_n_steps."
            )
        period = getattr(cb, "_every_n_epochs", 1)
        if period < 1:
            return None
    early_stopping = isinstance(cb, lightning_classes("callbacks", "EarlyStopping"))
    flag = "check_on_train_epoch_end" if early_stopping else "save_on_train_epoch_end"
    cv = trainer.check_val_every_n_epoch
    inside = False
    if not at_end:
        timed = getattr(trainer, "_val_check_time_interval", None) is not None
        batch = trainer.val_check_batch
        inside = cv is None or timed or batch is None or batch < trainer.num_training_batches
        period = math.lcm(cv, period) if cv else period
    if inside and not steps_aligned(trainer, schedule.every_n_steps):
        return (
            f"{what} checks at the end of each validation, also those inside an epoch "
            f"(val_check_interval={trainer.val_check_interval!r}, check_val_every_n_epoch={cv}), "
            f"{stale}. Fix: validate once per epoch (val_check_interval=1.0), or "
            f"{type(cb).__name__}({flag}=True) to check at each epoch's end instead."
        )
    if inside:
        return None
    every = schedule.every_n_epochs
    if every is not None and period % every:
        return (
            f"{what} checks at the end of every {_nth(period)} epoch, but CamMonitor evaluates "
            f"at the end of every {_nth(every)} only; the checks in between are {stale}. Fix: "
            f"CamMonitor(every_n_epochs=1){'' if period == 1 else f', or one dividing {period}'}."
        )
    if every is None and not steps_aligned(trainer, schedule.every_n_steps, period):
        return (
            f"{what} checks at the end of every {_nth(period)} epoch, a step that "
            f"CamMonitor(every_n_steps={schedule.every_n_steps}) does not always evaluate; "
            f"those checks are {stale}. Fix: CamMonitor(every_n_epochs={period}), or an "
            "every_n_steps that divides the optimizer steps of an epoch."
        )
    return None


def steps_aligned(trainer: pl.Trainer, every: int | None, epochs: int | None = None) -> bool:
    """Whether every step at which a consumer reads is one `every_n_steps=every` evaluates:
    the end of every `epochs`-th epoch, or (`epochs` None) each validation. Known only with
    automatic optimization and a finite epoch (and, for validations inside an epoch, without
    gradient accumulation or a time interval)."""
    batches = trainer.num_training_batches
    if every is None or not math.isfinite(batches) or not trainer.lightning_module:
        return False
    if not trainer.lightning_module.automatic_optimization:
        return False
    accumulate = trainer.accumulate_grad_batches
    if epochs is not None:
        return (epochs * math.ceil(batches / accumulate)) % every == 0
    batch = trainer.val_check_batch
    if accumulate != 1 or getattr(trainer, "_val_check_time_interval", None) is not None:
        return False
    if batch is None or not math.isfinite(batch):
        return False
    whole = trainer.check_val_every_n_epoch is None or int(batches) % every == 0
    return int(batch) % every == 0 and whole


def _nth(n: int) -> str:
    """1 -> ``1st``, 2 -> ``2nd``, 12 -> ``12th``."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


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


def check_twins(monitor: CamMonitor, monitors: Sequence[CamMonitor]) -> None:
    """Two monitors with one `state_key` would write the same tags, folder and state."""
    key = monitor.state_key
    if any(other is not monitor and other.state_key == key for other in monitors):
        raise ValueError(
            f"Two identical CamMonitors are in this Trainer ({key}): they would write the same "
            "tags, folder and checkpoint state. Keep one, or make them differ in layers, "
            "methods, probe (set names), schedule or save_dir."
        )


def check_save_dir(save_dir: str | os.PathLike[str] | None) -> None:
    """A `save_dir` that is a file would make every history write fail and warn."""
    if save_dir is not None and Path(save_dir).exists() and not Path(save_dir).is_dir():
        raise ValueError(
            f"save_dir={os.fspath(save_dir)!r} is a file, not a folder; pass a folder path (it "
            "is created if missing)."
        )


def check_shared_tags(mine: set[Group], others: Iterable[set[Group]]) -> None:
    """Two monitors logging the same tags to the same loggers would mix their curves."""
    for theirs in others:
        shared = sorted(mine & theirs)
        if shared:
            probe, layer, method = shared[0]
            raise ValueError(
                "Two CamMonitors in this Trainer would both log "
                f"{image_tag(MapKey(probe, layer, method))} ({len(shared)} shared tag "
                "group(s)), mixing their curves. Name their probe sets apart "
                "(probe={'name': ...}), or monitor other layers or methods."
            )


def check_fit(
    monitor: CamMonitor,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    monitors: Sequence[CamMonitor],
    layers: Sequence[LayerSpec] | None,
) -> None:
    """Every setup-time check of one monitor, before any training step: the strategy, the
    callbacks that watch its tags, a twin among `monitors`, its `save_dir`, and its `layers`
    (as given) and filter layers in the model (a typo fails here with the closest names)."""
    check_strategy(trainer.strategy)
    check_metric_consumers(trainer, monitor)
    check_consumer_layers(trainer, pl_module)
    check_twins(monitor, monitors)
    check_save_dir(monitor.outputs.save_dir)
    if layers is not None:
        resolve_layers(pl_module, layers)
    if monitor.filters.channels:
        resolve_layers(pl_module, list(monitor.filters.channels))
