"""What the monitor reads from the Trainer and LightningModule, and writes into them, through
their public attributes: the probe from the fit's loaders, the automatic layer,
`callback_metrics`, and the module's `self.log` switched off while the probe runs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..capture import users_hooks_warning
from ..default_layer import first_spatial_layer
from ..drift import AttentionTracker
from ..evaluation import (
    display_warning,
    explain_first_failure,
    normalisation_warning,
    raised_by_cam_monitor,
)
from ..history import find_history, read_history
from ..isolation import TrainingFlags, preserved_rng, set_training
from ..layers import resolve_layers, unwrap_model
from ..probe import ProbeSet, build_probes, loader_probe
from ..schema import dashboard_charts
from ..sinks import Sink, sinks_for
from ..types import LayerSpec
from .compat import lightning_classes

if TYPE_CHECKING:
    from os import PathLike
    from pathlib import Path

    import pytorch_lightning as pl

    from ..options import EngineOptions, ProbeOptions, RenderOptions


def fit_probes(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    options: ProbeOptions,
    whole: bool = False,
) -> dict[str, ProbeSet]:
    """The probe sets (the given ones, else samples of the val, else train, loaders), on the
    module's device and in the precision the Trainer feeds it; with `whole` (a `forward=` is
    given) dict batches are kept whole for it. A batch collated from a Dataset or DataLoader
    goes through the fit's batch-transfer hooks where the user overrides one (`batch_transfer`),
    as the model's training batches do; a probe given as tensors is warned about instead
    (`explicit_probe_warning`)."""
    specs = options.sets or loader_probe(
        [("val", val_dataloaders(trainer)), ("train", trainer.train_dataloader)], rank_zero_warn
    )
    hooks = batch_hooks(trainer, pl_module)
    if warning := explicit_probe_warning(specs, hooks):
        rank_zero_warn(warning)
    transfer = batch_transfer(trainer, pl_module, hooks) if hooks else None
    probes = build_probes(
        specs, options.num_probe, options.masks, options.input_key, options.label_key,
        rank_zero_warn, whole, transfer,
    )  # fmt: skip
    convert, device = trainer.precision_plugin.convert_input, pl_module.device
    moved = {name: probe.to(device) for name, probe in probes.items()}
    return {  # a batch through the hooks was converted before them, as Lightning does
        name: probe
        if transfer and sampled(specs[name])
        else replace(probe, inputs=convert(probe.inputs))
        for name, probe in moved.items()
    }


#: The hooks Lightning calls on every batch it takes from a loader, in this order, after the
#: precision plugin's `convert_input` (its loops' `_on_before_batch_transfer`, then
#: `strategy.batch_to_device`).
BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


def sampled(spec: Any) -> bool:
    """Whether a probe specification is collated by the monitor (a Dataset or DataLoader)."""
    return isinstance(spec, (Dataset, DataLoader))


def batch_hooks(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, BatchHook]:
    """The fit's batch-transfer hooks by name, each with the object Lightning calls it on (the
    datamodule where it overrides it, else the module), where at least one of them is the
    user's own; empty where none is (a batch is then only moved, as the probe always was)."""
    datamodule = getattr(trainer, "datamodule", None)
    owners = {
        name: datamodule if datamodule is not None and overrides(datamodule, name) else pl_module
        for name in BATCH_HOOKS
    }
    if not any(overrides(owner, name) for name, owner in owners.items()):
        return {}
    return {name: BatchHook(owner, getattr(owner, name)) for name, owner in owners.items()}


class BatchHook(NamedTuple):
    """A batch-transfer hook and the LightningModule or DataModule it belongs to (a function
    set as an attribute has no `__self__` to say it)."""

    owner: Any
    call: Callable[..., Any]


def overrides(owner: Any, name: str) -> bool:
    """Whether `owner` (a LightningModule or LightningDataModule) has its own hook `name`, not
    Lightning's (`DataHooks`) of either namespace."""
    method = getattr(owner, name, None)
    function = getattr(method, "__func__", method)
    bases = lightning_classes("core.hooks", "DataHooks")
    return not any(function is getattr(base, name, None) for base in bases)


def batch_transfer(
    trainer: pl.Trainer, pl_module: pl.LightningModule, hooks: Mapping[str, BatchHook]
) -> Callable[[Any], Any]:
    """What the fit does to each batch it takes from a loader (dataloader_idx 0), as a function
    of the collated probe batch: the precision plugin's `convert_input`, then `hooks` in order.

    Run as for a validation batch: `trainer.validating` (Lightning's docs tell hooks to check
    `self.trainer.training`/`validating` for augmentations), the module in eval mode and no
    grad; every random stream (Python, numpy, torch on the CPU and the module's CUDA device) is
    put back after, so a hook that draws leaves training's streams where they were.
    """
    device = trainer.strategy.root_device

    def transfer(batch: Any) -> Any:
        with validation_batch(trainer, pl_module):
            batch = trainer.precision_plugin.convert_input(batch)
            for name in BATCH_HOOKS:
                args = (device, 0) if name == "transfer_batch_to_device" else (0,)
                try:
                    batch = hooks[name].call(batch, *args)
                except Exception as err:  # the user's hook: said where it ran, and how
                    note = getattr(err, "add_note", None)  # Python >= 3.11
                    if note is None:
                        raise
                    owner = type(hooks[name].owner).__name__
                    note(
                        f"CamMonitor: raised by {owner}.{name} "
                        "on the probe batch, which the monitor passes through the batch-transfer "
                        "hooks once at the start of training, as for a validation batch "
                        "(trainer.validating, the module in eval mode, dataloader_idx 0). Pass "
                        "the probe as tensors, as the model sees them after the hooks, to skip it."
                    )
                    raise
            return batch

    return transfer


@contextmanager
def validation_batch(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """The Trainer's stage `validating`, the module in eval mode, no grad and forked random
    streams inside the block; the stage, every module's `training` flag and the streams put
    back after."""
    flags = TrainingFlags(pl_module)
    stage = trainer.state.stage
    device = pl_module.device
    devices = [device.index or 0] if device.type == "cuda" else []
    with preserved_rng(devices), torch.no_grad():
        try:
            trainer.validating = True
            set_training(pl_module, False)
            yield
        finally:
            trainer.state.stage = stage
            flags.restore()


def explicit_probe_warning(specs: Mapping[str, Any], hooks: Mapping[str, BatchHook]) -> str | None:
    """What to say where the fit transforms its batches in batch-transfer hooks of the user's
    but a probe set is given as tensors: that set reaches the model as it is, not through them;
    None otherwise."""
    given = [name for name, spec in specs.items() if not sampled(spec)]
    own = [
        f"{type(hook.owner).__name__}.{name}"
        for name, hook in hooks.items()
        if overrides(hook.owner, name)
    ]
    if not given or not own:
        return None
    sets = ", ".join(repr(name) for name in given)
    return (
        f"CamMonitor: {' and '.join(own)} transform{'s' if len(own) == 1 else ''} every batch "
        f"the model trains on, but probe {sets} is given as tensors, which the monitor feeds "
        "to the model as they are, not through these hooks. If the hooks change the inputs "
        "(normalisation, resizing, a device-side transform), the maps are computed on inputs "
        "unlike the training batches: pass the probe as the model sees it after the hooks, or "
        "pass it as a Dataset or DataLoader (or probe=None, samples of the val loader), which the "
        "monitor collates and passes through the hooks once, as for a validation batch."
    )


def default_layer(pl_module: pl.LightningModule, probe: ProbeSet, engine: EngineOptions) -> str:
    """The layer an expert would pick (`layers.first_spatial_layer`), said in a warning."""
    module = unwrap_model(pl_module)
    try:
        with logging_off(module):
            chosen = first_spatial_layer(
                module, probe.inputs, engine.forward, engine.output_transform
            )
    except Exception as err:  # the model's own error: with the probe's shapes and the fix
        if raised_by_cam_monitor(err):
            raise
        doing = "run the model on the probe to choose a layer"
        raise ValueError(explain_first_failure({probe.name: probe}, err, doing)) from err
    rank_zero_warn(
        f"CamMonitor: no layer given, using {chosen!r} (a transformer's input of its last "
        "attention, else the last spatial block that the class score reaches). Pass "
        f"CamMonitor(layer={chosen!r}) to choose it yourself."
    )
    return chosen


def open_sinks(
    trainer: pl.Trainer,
    folder: Path,
    probes: Mapping[str, ProbeSet],
    measures: Sequence[str],
    trust: Sequence[str] = (),
) -> list[Sink]:
    """A sink for each of the Trainer's loggers (files in `folder` where it has none), each
    told the probe hashes and the dashboard's layout once."""
    sinks = sinks_for(trainer, folder)
    if not trainer.loggers:
        rank_zero_warn(f"CamMonitor: the Trainer has no logger; grids and scalars go to {folder}.")
    localized = {name: p.localized for name, p in probes.items()}
    charts = dashboard_charts(localized, measures, trust)
    for sink in sinks:
        sink.record_probe({name: probe.digest for name, probe in probes.items()})
        sink.record_dashboard(charts)
    return sinks


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


def idle_run(trainer: pl.Trainer) -> bool:
    """Whether this fit is a `fast_dev_run`, where the monitor evaluates and writes nothing
    (said once)."""
    if trainer.fast_dev_run:
        rank_zero_info(
            "CamMonitor: fast_dev_run is on, so the monitor evaluates nothing and writes "
            "nothing in this run."
        )
    return bool(trainer.fast_dev_run)


def module_names(
    pl_module: pl.LightningModule, layers: Sequence[LayerSpec] | None
) -> dict[int, str]:
    """The dotted names of the layers given as module objects, by identity (a module that is
    not in the model fails here)."""
    modules = [layer for layer in layers or [] if isinstance(layer, nn.Module)]
    return {id(layer): resolve_layers(pl_module, [layer])[0][0] for layer in modules}


def start_warnings(
    pl_module: pl.LightningModule, probes: Mapping[str, ProbeSet], render: RenderOptions
) -> Iterator[str]:
    """What to say once at the start of a run: probes whose values do not fit `mean`/`std`,
    and the user's own hooks, which run during evaluations too."""
    for probe in probes.values():
        if warning := normalisation_warning(probe, render):
            yield warning
        if warning := display_warning(probe):
            yield warning
    if hooks := users_hooks_warning(unwrap_model(pl_module)):
        yield hooks


def use_reference_run(
    tracker: AttentionTracker, reference: str | PathLike[str], probes: Mapping[str, ProbeSet]
) -> None:
    """Drift against the first evaluation of another run (`reference=`), not this run's own."""
    first = read_history(find_history(reference))[0]
    tracker.use_reference(first, probes, source=str(reference))
