"""CamMonitor, the Lightning callback: only Lightning concerns (when, which rank, state)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .drift import MEASURES, boxes_to_masks
from .engine import ForwardFn, OutputTransform
from .evaluation import (
    AttentionTracker,
    CamSettings,
    EvaluationOutput,
    first_spatial_layer,
    run_evaluation,
)
from .history import (
    Evaluation,
    find_history,
    prune_from,
    read_history,
    write_evaluation,
    write_probe,
)
from .layers import LayerSpec, Reshape, resolve_layers, unwrap_model
from .options import check_methods
from .probe import INPUT_KEYS, ProbeSet, make_probe
from .render import check_colormap
from .sinks import Sink, run_folder, sinks_for

ProbeSpec = Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not _is_int(value) or value < 1:
        allowed = "an int >= 1 or None" if optional else "an int >= 1"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _first_loader(loaders: Any) -> DataLoader | None:
    """The first DataLoader inside what `trainer.*_dataloader(s)` returns (one, a list, a dict)."""
    if isinstance(loaders, DataLoader):
        return loaders
    items = loaders.values() if isinstance(loaders, Mapping) else loaders
    if isinstance(items, (list, tuple)) or isinstance(loaders, Mapping):
        for item in items:
            found = _first_loader(item)
            if found is not None:
                return found
    return None


def check_strategy(strategy: Strategy) -> None:
    """Refuse sharded strategies: no rank holds whole layers, so there is nothing to hook."""
    name = type(strategy).__name__
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) or "DeepSpeed" in name:
        raise ValueError(
            f"CamMonitor does not support the sharded strategy {name}: no rank holds whole "
            "layers to hook. Use ddp, ddp_spawn or a single device for runs you monitor."
        )


class CamMonitor(Callback):
    """Log Grad-CAM overlays of a fixed probe batch every N epochs (or steps) during `fit`.

    A baseline evaluation runs at the start of training (attention at initialisation), then one
    at the end of every `every_n_epochs`-th training epoch, on global rank zero only. See the
    README for every argument and the tags it logs.
    """

    def __init__(
        self,
        layer: LayerSpec | Sequence[LayerSpec] | None = None,
        *,
        methods: str | Sequence[str] = "gradcam",
        every_n_epochs: int = 1,
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
        nrow: int = 8,
        batch_size: int | None = None,
        smooth: int = 0,
        noise: float = 0.15,
        cam_head: str | None = None,
        ig_steps: int = 32,
        filters: Mapping[str, Sequence[int]] | None = None,
        drift_measures: Sequence[str] = MEASURES,
        topk: float = 0.2,
        pointing_tolerance: int = 0,
        reference: str | Path | None = None,
        history: bool = True,
        save_dir: str | Path | None = None,
        strict: bool = False,
    ) -> None:
        if layer is None:
            self.layers: list[LayerSpec] | None = None
        elif isinstance(layer, (str, nn.Module)):
            self.layers = [layer]
        elif (
            isinstance(layer, Sequence)
            and layer
            and all(isinstance(item, (str, nn.Module)) for item in layer)
        ):
            self.layers = list(layer)
        else:
            raise ValueError(
                "`layer` must be a name like 'features.29', a glob, an nn.Module, a non-empty "
                f"list of those, or None, got {layer!r}."
            )
        self.methods = check_methods(list(methods) if not isinstance(methods, str) else methods)
        _check_positive("every_n_epochs", every_n_epochs)
        _check_positive("every_n_steps", every_n_steps, optional=True)
        _check_positive("num_probe", num_probe)
        _check_positive("nrow", nrow)
        _check_positive("batch_size", batch_size, optional=True)
        if isinstance(target, str) and target not in ("predicted", "label"):
            raise ValueError(
                f"`target` can be 'predicted', 'label', an int, a LongTensor or a callable, "
                f"got {target!r}."
            )
        if _is_int(target) and target < 0:
            raise ValueError(f"`target` must be a class index >= 0, got {target}.")
        if not isinstance(target, (str, Tensor)) and not _is_int(target) and not callable(target):
            raise ValueError(
                "`target` can be 'predicted', 'label', an int, a LongTensor or a callable, "
                f"got {type(target).__name__}."
            )
        if output_transform is not None and not (
            callable(output_transform) or isinstance(output_transform, (int, str))
        ):
            raise ValueError(
                "`output_transform` must be a callable, a tuple index or a dict key, got "
                f"{type(output_transform).__name__}."
            )
        for name, fn in (("forward", forward), ("reshape", reshape)):
            if fn is not None and not callable(fn):
                raise ValueError(f"`{name}` must be a callable or None, got {type(fn).__name__}.")
        check_colormap(colormap)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}.")
        if (mean is None) != (std is None) or (
            mean is not None and std is not None and len(mean) != len(std)
        ):
            raise ValueError(
                f"`mean` and `std` go together, with one value per channel; got mean={mean!r}, "
                f"std={std!r}."
            )
        if probe is not None and not isinstance(
            probe, (Tensor, tuple, list, Mapping, Dataset, DataLoader)
        ):
            raise ValueError(
                "`probe` must be None, a Tensor, an (inputs, labels) tuple, a Dataset, a "
                f"DataLoader or a dict of named probe sets, got {type(probe).__name__}."
            )
        if masks is not None and not isinstance(masks, (Tensor, Mapping)):
            raise ValueError(
                "`masks` must be a Tensor or a dict of Tensors per probe set, got "
                f"{type(masks).__name__}."
            )
        if not _is_int(smooth) or smooth < 0:
            raise ValueError(f"`smooth` is a number of noisy copies (an int >= 0), got {smooth!r}.")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
            raise ValueError(f"`noise` is a standard deviation >= 0, got {noise!r}.")
        _check_positive("ig_steps", ig_steps)
        filters = dict(filters or {})
        for name, channels in filters.items():
            if (
                not isinstance(name, str)
                or not channels
                or not all(_is_int(c) and c >= 0 for c in channels)
            ):
                raise ValueError(
                    "`filters` maps layer names to channel indices, e.g. "
                    f"{{'features.28': [0, 5]}}; got {name!r}: {channels!r}."
                )
        if not _is_int(pointing_tolerance) or pointing_tolerance < 0:
            raise ValueError(
                f"`pointing_tolerance` must be an int >= 0 (pixels), got {pointing_tolerance!r}."
            )
        if isinstance(drift_measures, str):
            drift_measures = [drift_measures]
        self.tracker = AttentionTracker(drift_measures, topk, pointing_tolerance)
        self.reference = reference
        self.history = history
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.probe = probe
        self.num_probe = num_probe
        self.masks = masks
        self.input_key = input_key
        self.label_key = label_key
        self.save_dir = save_dir
        self.strict = strict
        self.settings = CamSettings(
            layers=list(self.layers or []),
            methods=self.methods,
            target=target,
            forward=forward,
            output_transform=output_transform,
            reshape=reshape,
            batch_size=batch_size,
            colormap=colormap,
            alpha=float(alpha),
            mean=mean,
            std=std,
            class_names=class_names,
            nrow=nrow,
            smooth=smooth,
            noise=float(noise),
            cam_head=cam_head,
            ig_steps=ig_steps,
            filters={name: list(channels) for name, channels in filters.items()},
        )
        self._probes: dict[str, ProbeSet] = {}
        self._sinks: list[Sink] = []
        self.folder: Path | None = None
        self.evaluations = 0
        self._last_step = -1
        self._resumed_hashes: dict[str, str] = {}

    @property
    def state_key(self) -> str:
        names = [
            layer if isinstance(layer, str) else type(layer).__name__ for layer in self.layers or []
        ]
        return self._generate_state_key(layers=names, methods=list(self.methods))

    # -- Lightning hooks ------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer.strategy)
        if self.layers is not None:
            resolve_layers(pl_module, self.layers)  # a typo fails here, before any step
        if self.settings.filters:
            resolve_layers(pl_module, list(self.settings.filters))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probes = self._build_probes(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        self._probes = probes
        if self.layers is None:
            first = next(iter(probes.values()))
            chosen = first_spatial_layer(
                unwrap_model(pl_module), first.inputs, self.settings.forward
            )
            rank_zero_warn(
                f"CamMonitor: no layer given, using {chosen!r} (the last layer with a spatial "
                f"output). Pass CamMonitor(layer={chosen!r}) to choose it yourself."
            )
            self.layers = [chosen]
            self.settings = replace(self.settings, layers=[chosen])
        self.folder = run_folder(trainer, self.save_dir)
        self._sinks = sinks_for(trainer, self.folder)
        if not trainer.loggers:
            rank_zero_warn(
                f"CamMonitor: the Trainer has no logger; PNG grids and scalars go to {self.folder}."
            )
        for sink in self._sinks:
            sink.record_probe({name: probe.digest for name, probe in probes.items()})
        self._check_resumed_probe(probes)
        if self.reference is not None and not self.tracker.reference:
            self._load_reference(pl_module.device)
        if self.history and self.evaluations > 0:
            prune_from(self.folder, self.evaluations)  # a resumed run rewrites what came after
        if self.history:
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
        if self.every_n_steps is None or not trainer.is_global_zero:
            return
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._last_step:
            self._evaluate(trainer, pl_module, epoch=trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps is not None or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._evaluate(trainer, pl_module, epoch=trainer.current_epoch + 1)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run one evaluation now, from any hook after training started (even under inference
        mode, e.g. in `on_validation_epoch_end`); rank zero only, like the scheduled ones."""
        if trainer.is_global_zero and self._probes:
            self._evaluate(trainer, pl_module, epoch=trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "evaluations": self.evaluations,
            "last_step": self._last_step,
            "probe_hashes": {name: probe.digest for name, probe in self._probes.items()},
            "tracker": self.tracker.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.evaluations = int(state_dict.get("evaluations", 0))
        self._last_step = int(state_dict.get("last_step", -1))
        self._resumed_hashes = dict(state_dict.get("probe_hashes", {}))
        self.tracker.load_state_dict(state_dict.get("tracker", {}))

    # -- internals ------------------------------------------------------------------------------

    def _evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, baseline: bool = False
    ) -> None:
        """Compute, draw, score and log one evaluation; failures warn and skip unless strict.

        The baseline is also the configuration check: any error computing it is raised.
        """
        start = time.perf_counter()
        step = trainer.global_step
        self._last_step = step
        try:
            output = run_evaluation(unwrap_model(pl_module), self._probes, self.settings)
            scalars, non_finite = self.tracker.score(output.results, self._probes)
        except Exception as err:
            if baseline and not isinstance(err, ValueError):
                raise ValueError(self._baseline_failure(err)) from err
            if self.strict or baseline:
                raise
            self._skip(trainer, err)
            return
        if non_finite:
            rank_zero_warn(
                f"CamMonitor: {non_finite} CAMs at step {step} hold NaN or Inf (non-finite probe "
                "inputs or a diverged model?); they are drawn as zeros and left out of the drift "
                "means (see the *_excluded counts)."
            )
        output.scalars.update(scalars)
        output.scalars["cam_monitor/seconds"] = time.perf_counter() - start
        try:
            if self.history and self.folder is not None:
                write_evaluation(self.folder, self._record(output, epoch, step))
            for sink in self._sinks:
                sink.log(output.images, output.scalars, step)
        except Exception as err:
            if self.strict:
                raise
            self._skip(trainer, err)
        self.evaluations += 1

    def _record(self, output: EvaluationOutput, epoch: int, step: int) -> Evaluation:
        """The history entry of one evaluation, as numpy arrays."""
        results = output.results
        return Evaluation(
            index=self.evaluations,
            epoch=epoch,
            step=step,
            probe_hashes={name: probe.digest for name, probe in self._probes.items()},
            maps={
                (probe, layer, method): maps.detach().cpu().numpy()
                for probe, result in results.items()
                for (layer, method), maps in result.maps.items()
            },
            targets={name: r.targets.cpu().numpy() for name, r in results.items()},
            logits={name: r.logits.cpu().numpy() for name, r in results.items()},
            labels={
                name: p.labels.cpu().numpy()
                for name, p in self._probes.items()
                if p.labels is not None and name in results
            },
            scalars=dict(output.scalars),
        )

    def _write_probe(self) -> None:
        """Store the probe once per run so reports can draw overlays; failure only warns."""
        probes = {n: p for n, p in self._probes.items() if isinstance(p.inputs, Tensor)}
        try:
            write_probe(
                self.folder,
                inputs={n: p.inputs.detach().float().cpu().numpy() for n, p in probes.items()},
                labels={
                    n: p.labels.cpu().numpy() for n, p in probes.items() if p.labels is not None
                },
                masks={n: p.masks.cpu().numpy() for n, p in probes.items() if p.masks is not None},
                hashes={n: p.digest for n, p in probes.items()},
            )
        except Exception as err:
            if self.strict:
                raise
            rank_zero_warn(f"CamMonitor could not save the probe to {self.folder}: {err}")

    def _baseline_failure(self, err: Exception) -> str:
        """Explain a failure of the first evaluation, which checks the whole configuration."""
        shapes = ", ".join(
            f"{name}: {tuple(p.inputs.shape)} {p.inputs.dtype}" for name, p in self._probes.items()
        )
        hint = ""
        if any(p.inputs.dtype == torch.uint8 for p in self._probes.values()):
            hint = (
                " The probe holds uint8 images and is fed to the model as is: pass float images "
                "prepared like your training batches (e.g. x.float() / 255, then normalised)."
            )
        return (
            f"CamMonitor could not compute its first CAMs ({type(err).__name__}: {err}). The probe "
            f"({shapes}) must be a batch the model accepts, like a training batch; check probe=, "
            f"input_key=, forward= and output_transform=.{hint}"
        )

    def _check_resumed_probe(self, probes: Mapping[str, ProbeSet]) -> None:
        for name, digest in self._resumed_hashes.items():
            if name in probes and probes[name].digest != digest:
                rank_zero_warn(
                    f"CamMonitor: probe {name!r} differs from the checkpoint's (hash "
                    f"{probes[name].digest} vs {digest}); drift after the resume compares "
                    "different images."
                )

    def _load_reference(self, device: torch.device) -> None:
        """Use the first evaluation of another run as the `_ref` of every drift measure."""
        first = read_history(find_history(self.reference))[0]
        for name, digest in first.probe_hashes.items():
            ours = self._probes.get(name)
            if ours is not None and ours.digest != digest:
                raise ValueError(
                    f"reference={str(self.reference)!r} used a different probe {name!r} (hash "
                    f"{digest}, this run {ours.digest}); drift against it would compare different "
                    "images. Use the same probe data or drop reference=."
                )
        for key, maps in first.maps.items():
            self.tracker.reference[key] = torch.from_numpy(maps).float().to(device)

    def _skip(self, trainer: pl.Trainer, err: Exception) -> None:
        rank_zero_warn(
            f"CamMonitor skipped its evaluation at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}: {type(err).__name__}: {err}. Training continues; pass "
            "strict=True to raise instead."
        )

    def _build_probes(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, ProbeSet]:
        """Pick the probe sets once, without touching any random stream, on the module's device."""
        specs = self._probe_specs(trainer)
        rng = (random.getstate(), np.random.get_state())
        try:
            with torch.random.fork_rng(devices=[]):
                probes = {
                    name: make_probe(
                        name, spec, self.num_probe, self.input_key, self.label_key, rank_zero_warn
                    )
                    for name, spec in specs.items()
                }
        finally:
            random.setstate(rng[0])
            np.random.set_state(rng[1])
        if isinstance(self.masks, Mapping):
            unknown = sorted(set(self.masks) - set(probes))
            if unknown:
                raise ValueError(
                    f"`masks` names probe set(s) {unknown} but the probe sets are "
                    f"{sorted(probes)}; use the same names as in probe=."
                )
        probes = {name: self._with_masks(probe) for name, probe in probes.items()}
        convert = trainer.precision_plugin.convert_input
        return {
            name: replace(
                probe.to(pl_module.device), inputs=convert(probe.inputs.to(pl_module.device))
            )
            for name, probe in probes.items()
        }

    def _probe_specs(self, trainer: pl.Trainer) -> dict[str, ProbeSpec]:
        probe = self.probe
        if probe is None:
            for name, loaders in (
                ("val", trainer.val_dataloaders),
                ("train", trainer.train_dataloader),
            ):
                loader = _first_loader(loaders)
                if loader is not None:
                    return {name: loader}
            raise ValueError(
                "CamMonitor found no DataLoader on the Trainer to take a probe from; pass probe= "
                "(a tensor, an (inputs, labels) tuple, a Dataset or a DataLoader)."
            )
        keys = {self.input_key, *INPUT_KEYS}
        if isinstance(probe, Mapping) and not keys.intersection(probe):
            if not probe:
                raise ValueError("`probe` is an empty dict; give at least one named probe set.")
            return dict(probe)
        return {"probe": probe}

    def _with_masks(self, probe: ProbeSet) -> ProbeSet:
        """Attach this probe's masks (given per probe, or found in its batch) as bool [B, H, W];
        boxes [B, 4] (x0, y0, x1, y1 in pixels) become masks."""
        masks = self.masks.get(probe.name) if isinstance(self.masks, Mapping) else self.masks
        masks = probe.masks if masks is None else masks
        if masks is None:
            return probe
        masks = torch.as_tensor(masks)
        batch, size = probe.inputs.shape[0], tuple(probe.inputs.shape[-2:])
        if masks.shape == (batch, 4) and masks.dtype != torch.bool:
            masks = boxes_to_masks(masks.float(), size)
        if masks.dim() == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if tuple(masks.shape) != (batch, *size):
            raise ValueError(
                f"masks for probe {probe.name!r} have shape {tuple(masks.shape)}; expected "
                f"[B, H, W] = {(batch, *size)} like the probe images, or boxes [B, 4]."
            )
        return replace(probe, masks=masks if masks.dtype == torch.bool else masks > 0.5)
