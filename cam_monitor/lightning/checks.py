"""Setup-time checks on the Trainer, its strategy and its other callbacks: a configuration the
monitor cannot serve fails before the first training step, naming the cause and the fix."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.rank_zero import rank_zero_warn

from ..layers import resolve_layers, unwrap_model
from ..schema import INPUT_LAYER, METRIC_PREFIXES, MapKey, image_tag, parse_scalar_tag
from ..types import LayerSpec
from .compat import is_sharded

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import Strategy

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
    one process, and must run after the monitor to see the evaluation of the same epoch."""
    consumers = [
        cb for cb in trainer.callbacks  # type: ignore[attr-defined]
        if cb is not monitor and str(getattr(cb, "monitor", None)).startswith(MONITORED_PREFIXES)
    ]  # fmt: skip
    if consumers and trainer.world_size > 1:
        raise ValueError(
            f"{type(consumers[0]).__name__}(monitor={consumers[0].monitor!r}) watches a "
            f"CamMonitor tag in a run of {trainer.world_size} processes, but only rank zero "
            "evaluates, so the other ranks never have it. Monitor it on a single device."
        )
    callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
    order = callbacks.index(monitor) if monitor in callbacks else -1
    for cb in consumers:
        if callbacks.index(cb) < order:
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
