"""History records built from the monitor's live objects: `ProbeSet` and `CamResult` to numpy."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..attribution import pass_ranges
from ..engine import CamResult
from ..measures import segment_measures
from ..methods import PIXEL_METHODS
from ..probe import ProbeSet
from ..schema import MapKey, ScalarKey
from ..targets import main_class
from .format import Evaluation, Segmentation
from .store import write_probe

__all__ = ["evaluation_record", "segmentation_record", "write_probe_sets"]


def evaluation_record(
    index: int,
    epoch: int,
    step: int,
    probes: Mapping[str, ProbeSet],
    results: Mapping[str, CamResult],
    scalars: Mapping[str, float],
    run: str = "",
    final: bool = False,
    class_names: Sequence[str] | None = None,
    maps: str = "all",
    batch_size: int | None = None,
) -> Evaluation:
    """The history entry of one evaluation: every map as float32 numpy on the CPU, keyed by
    `MapKey`, with targets, logits, labels (for probes that have them), the per-image
    `Segmentation` of segmentation probes, and the probes' `ProbeSet.digest` (an empty digest is
    left out: it identifies nothing).

    ``scalars`` are keyed by tag; `ScalarKey` keys are accepted and written as their tag.
    ``run`` is the id of the writing run; ``final`` marks the evaluation added at the end of fit.
    ``class_names`` are stored for captions in reports and `cam-monitor show`. ``maps``: which
    maps are stored, "all", "cams" (not the pixel-level ones) or "none"
    (`options.HISTORY_MAPS`). ``batch_size``: images measured at a time for the segmentation
    entries (None: all at once), as the evaluation computed them.
    """
    _check_table("probes", probes, ProbeSet)
    _check_table("results", results, CamResult)
    stored = {
        MapKey(probe, layer, method): cam
        for probe, result in results.items()
        for (layer, method), cam in result.maps.items()
        if maps == "all" or (maps == "cams" and method not in PIXEL_METHODS)
    }
    kept = dict(zip(stored, _numpy_float32(list(stored.values())), strict=True))
    return Evaluation(
        index=index,
        epoch=epoch,
        step=step,
        probe_hashes={name: probe.digest for name, probe in probes.items() if probe.digest},
        maps=kept,
        targets={name: _numpy(result.targets) for name, result in results.items()},
        logits={name: _numpy(result.logits, float32=True) for name, result in results.items()},
        labels={
            name: _numpy(probe.labels)
            for name, probe in probes.items()
            if probe.labels is not None and name in results
        },
        scalars={_tag(key): value for key, value in scalars.items()},
        run=run,
        final=final,
        class_names=None if class_names is None else tuple(class_names),
        segmentation={
            name: segmentation_record(result, probes.get(name), batch_size)
            for name, result in results.items()
            if result.predicted_maps is not None
        },
    )


def segmentation_record(
    result: CamResult, probe: ProbeSet | None = None, batch_size: int | None = None
) -> Segmentation:
    """A segmentation result's per-image record: each image's predicted class by the rule of
    `target="predicted"` (`main_class` of the argmax map), and how the model predicts the class
    its maps explain (`measures.segment_measures`, against the probe's label maps if any).
    Measured `batch_size` images at a time (None: all at once): the values are per image."""
    if result.predicted_maps is None:
        raise ValueError("segmentation_record needs a segmentation result (per-pixel logits)")
    label_maps = None if probe is None else probe.label_maps
    classes = int(result.logits.shape[1])
    predicted, measured = [], []
    for start, stop in pass_ranges(int(result.targets.shape[0]), batch_size):
        maps = result.predicted_maps[start:stop]
        labels = None if label_maps is None else label_maps[start:stop]
        predicted.append(main_class(maps, classes))
        measured.append(segment_measures(maps, result.targets[start:stop], labels))

    def joined(parts: list[Tensor | None]) -> np.ndarray | None:
        return None if parts[0] is None else _numpy(torch.cat(parts), float32=True)  # type: ignore[arg-type]

    return Segmentation(
        predicted=_numpy(torch.cat(predicted)),
        share=_numpy(torch.cat([found.share for found in measured]), float32=True),
        iou=joined([found.iou for found in measured]),
        accuracy=joined([found.accuracy for found in measured]),
    )


def write_probe_sets(
    folder: str | os.PathLike[str], probes: Mapping[str, ProbeSet], run: str = ""
) -> Path:
    """Store the probe sets' images (the inputs of a one-tensor probe, the image tensor of a
    nested one), labels, masks and label maps in ``folder/probe.npz`` (with the id of the
    ``run``), so reports can draw overlays and regions; raises on failure (the caller decides
    whether that only warns). The hashes are of the whole inputs, as the run logged them.
    """
    _check_table("probes", probes, ProbeSet)
    images = {
        name: probe.inputs if isinstance(probe.inputs, Tensor) else probe.image
        for name, probe in probes.items()
    }
    stored = {name: probe for name, probe in probes.items() if images[name] is not None}
    return write_probe(
        folder,
        inputs={name: _numpy(images[name], float32=True) for name in stored},  # type: ignore[arg-type]
        labels={n: _numpy(p.labels) for n, p in stored.items() if p.labels is not None},
        masks={n: _numpy(p.masks) for n, p in stored.items() if p.masks is not None},
        hashes={name: probe.digest for name, probe in stored.items() if probe.digest},
        run=run,
        label_maps={n: _numpy(p.label_maps) for n, p in stored.items() if p.label_maps is not None},
    )


def _numpy(tensor: Tensor, float32: bool = False) -> np.ndarray:
    """A CPU numpy copy of ``tensor``, as float32 when asked (maps, logits, inputs)."""
    tensor = tensor.detach()
    if float32:
        tensor = tensor.float()
    return tensor.cpu().numpy()


def _numpy_float32(tensors: Sequence[Tensor]) -> list[np.ndarray]:
    """`_numpy(t, float32=True)` of each tensor, in one copy to the host per device (a copy
    per map waited on the GPU once per map)."""
    found: list[np.ndarray | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    for indices in by_device.values():
        flat = [tensors[i].detach().float().reshape(-1) for i in indices]
        host = (torch.cat(flat) if len(flat) > 1 else flat[0]).cpu().numpy()
        parts = np.split(host, np.cumsum([t.numel() for t in flat])[:-1])
        for i, part in zip(indices, parts, strict=True):
            found[i] = part.reshape(tensors[i].shape)
    return found  # type: ignore[return-value]


def _tag(key: str | ScalarKey) -> str:
    return key.tag if isinstance(key, ScalarKey) else key


def _check_table(argument: str, table: object, kind: type) -> None:
    if not isinstance(table, Mapping):
        raise TypeError(
            f"{argument} must be a mapping of probe name to {kind.__name__}, got "
            f"{type(table).__name__}"
        )
    for name, value in table.items():
        if not isinstance(value, kind):
            raise TypeError(
                f"{argument}[{name!r}] must be a {kind.__name__}, got {type(value).__name__}"
            )
