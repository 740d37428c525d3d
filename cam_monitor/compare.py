"""Runs compared by the numbers: loading runs, joining them on epochs, between-run map similarity.

The runs are joined on the epoch (epochs completed; the baseline is epoch 0). Nothing here draws
or prints: `cam_monitor.report` turns a comparison into HTML, `cam_monitor.cli` into text.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .drift import js_divergence, spearman, summarize, topk_iou
from .history import Evaluation, HistoryError, ProbeRecord, find_history, read_history, read_probe
from .schema import LOCALIZATION, LOCALIZATION_SCORES, MapKey, ScalarKey, parse_scalar_tag

__all__ = [
    "SIMILARITIES",
    "EpochComparison",
    "Group",
    "ReportError",
    "Run",
    "check_one_run",
    "check_probes",
    "common",
    "common_epochs",
    "compare_group",
    "format_number",
    "load_run",
    "localization",
    "map_similarity",
    "overlay_epochs",
    "run_labels",
    "scalar_series",
]

#: (probe, layer, method): the unit that maps, curves and tables are made of.
Group = MapKey

#: Between-run measures: spearman and topk_iou are similarities (1 = same), js a divergence.
SIMILARITIES: tuple[str, ...] = ("spearman", "topk_iou", "js")


class ReportError(Exception):
    """Two runs cannot be compared (different probe data, nothing in common), or no matplotlib."""


@dataclass(frozen=True, eq=False)
class Run:
    """One run's history: a display name, its folder, evaluations sorted by index, the probe.

    The derived views (`by_epoch`, `groups`, ...) are computed once: treat a Run as read-only.
    """

    name: str
    folder: Path
    evaluations: list[Evaluation]
    probe: ProbeRecord | None = None

    @cached_property
    def by_epoch(self) -> dict[int, Evaluation]:
        """The first evaluation of each epoch (the one closest to the epoch's end), by epoch."""
        chosen: dict[int, Evaluation] = {}
        for evaluation in self.evaluations:
            chosen.setdefault(evaluation.epoch, evaluation)
        return dict(sorted(chosen.items()))

    @cached_property
    def repeated_epochs(self) -> list[int]:
        """Epochs with several evaluations (step-based schedules); `by_epoch` keeps the first."""
        counts: dict[int, int] = {}
        for evaluation in self.evaluations:
            counts[evaluation.epoch] = counts.get(evaluation.epoch, 0) + 1
        return sorted(epoch for epoch, count in counts.items() if count > 1)

    @cached_property
    def groups(self) -> list[Group]:
        """Every (probe, layer, method) with maps or scalars, in first-appearance order."""
        found: dict[Group, None] = {}
        for evaluation in self.evaluations:
            found.update(dict.fromkeys(evaluation.maps))
        for evaluation in self.evaluations:
            for name in evaluation.scalars:
                key = parse_scalar_tag(name)
                if key is not None:
                    found.setdefault(key.maps)
        return list(found)

    @cached_property
    def probes(self) -> list[str]:
        """Probe names of the groups, in order."""
        return list(dict.fromkeys(group.probe for group in self.groups))

    def hashes(self) -> dict[str, list[str]]:
        """Every probe hash recorded for each probe name, in order of appearance."""
        seen: dict[str, dict[str, None]] = {}
        for evaluation in self.evaluations:
            for probe, digest in evaluation.probe_hashes.items():
                seen.setdefault(probe, {})[digest] = None
        if self.probe is not None:
            for probe, digest in self.probe.hashes.items():
                seen.setdefault(probe, {digest: None})
        return {probe: list(digests) for probe, digests in seen.items()}


@dataclass(frozen=True)
class EpochComparison:
    """One epoch of one group in both runs: map similarity and both runs' localization scores.

    ``similarity`` maps each of `SIMILARITIES` to (mean over finite images, images left out);
    it is empty (and ``note`` says why) when the maps cannot be compared.
    """

    epoch: int
    index_a: int
    index_b: int
    images: int
    similarity: dict[str, tuple[float, int]] = field(default_factory=dict)
    localization_a: dict[str, float] = field(default_factory=dict)
    localization_b: dict[str, float] = field(default_factory=dict)
    note: str = ""


def load_run(run_dir: str | Path, *, strict: bool = False, name: str | None = None) -> Run:
    """Find and read a run's history and probe; unreadable eval files warn and are skipped
    unless ``strict``. A corrupt ``probe.npz`` warns and is ignored (maps are shown alone).
    A folder whose evaluations were written by different runs is a `HistoryError`.
    """
    folder = find_history(run_dir)
    evaluations = read_history(folder, strict=strict)
    try:
        probe = read_probe(folder)
    except HistoryError as exc:
        if strict:
            raise
        warnings.warn(str(exc), stacklevel=2)
        probe = None
    check_one_run(folder, evaluations)
    label = name if name is not None else (Path(run_dir).resolve().name or str(run_dir))
    return Run(name=label, folder=folder, evaluations=evaluations, probe=probe)


def check_one_run(folder: Path, evaluations: Sequence[Evaluation]) -> None:
    """Refuse a history folder holding evaluations of several runs (their run ids differ; files
    without a run id count as one run): their drift and epochs would be read as one run's."""
    runs: dict[str, list[int]] = {}
    for evaluation in evaluations:
        runs.setdefault(evaluation.run, []).append(evaluation.index)
    if len(runs) > 1:
        listing = "; ".join(
            f"run {run or '(no id)'}: evaluations {', '.join(map(str, indices))}"
            for run, indices in runs.items()
        )
        raise HistoryError(
            f"{folder} holds the evaluations of {len(runs)} different training runs ({listing}); "
            "they cannot be read as one history. Move each run's eval-*.npz files into a folder "
            "of its own (or delete the older run's), then pass that folder."
        )


def run_labels(a: Path | str, b: Path | str) -> tuple[str, str]:
    """Short names for two run folders: their last parts, with parents added until they differ.

    Example:
        >>> run_labels("runs/dann/version_0", "runs/source_only/version_0")
        ('dann/version_0', 'source_only/version_0')
        >>> run_labels("runs/dann", "runs/source_only")
        ('dann', 'source_only')
        >>> run_labels("runs/dann", "runs/dann")
        ('dann (A)', 'dann (B)')
    """
    parts_a, parts_b = Path(a).parts, Path(b).parts
    for depth in range(1, max(len(parts_a), len(parts_b)) + 1):
        label_a, label_b = "/".join(parts_a[-depth:]), "/".join(parts_b[-depth:])
        if label_a != label_b:
            return label_a, label_b
    return f"{Path(a).name or a} (A)", f"{Path(b).name or b} (B)"


def format_number(value: float | None) -> str:
    """A table cell, in the terminal and in the report: 4 decimals, "nan" for an undefined
    value, "-" for a missing one.

    Example:
        >>> [format_number(v) for v in (0.25, float("nan"), None, float("inf"))]
        ['0.2500', 'nan', '-', 'inf']
    """
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4f}"


def map_similarity(a: np.ndarray, b: np.ndarray, k: float = 0.2) -> dict[str, tuple[float, int]]:
    """Spearman, top-k IoU and Jensen-Shannon divergence between matching maps ``[B, h, w]``,
    each as (mean over the images where it is defined, number of images left out).

    Example:
        >>> a = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
        >>> sim = map_similarity(a, a)
        >>> [round(sim[m][0], 6) for m in SIMILARITIES]
        [1.0, 1.0, 0.0]
    """
    ta = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    tb = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))
    return {
        "spearman": summarize(spearman(ta, tb)),
        "topk_iou": summarize(topk_iou(ta, tb, k)),
        "js": summarize(js_divergence(ta, tb)),
    }


def check_probes(a: Run, b: Run) -> list[str]:
    """Raise `ReportError` when a probe present in both runs has different data (hashes).

    Returns warnings: a probe whose hash changed within a run, or has no hash in one run.
    """
    hashes_a, hashes_b = a.hashes(), b.hashes()
    notes: list[str] = []
    for run, hashes in ((a, hashes_a), (b, hashes_b)):
        for probe, digests in hashes.items():
            if len(digests) > 1:
                notes.append(
                    f"probe {probe!r} changed within run {run.name} (hashes "
                    f"{', '.join(digests)}): its maps before and after are not comparable"
                )
    for probe in common(a.probes, b.probes):
        digests_a, digests_b = hashes_a.get(probe, []), hashes_b.get(probe, [])
        if not digests_a or not digests_b:
            missing = a.name if not digests_a else b.name
            notes.append(
                f"cannot check that probe {probe!r} holds the same data in both runs: "
                f"{missing} recorded no hash for it"
            )
        elif not set(digests_a) & set(digests_b):
            raise ReportError(
                f"probe {probe!r} differs between the runs: {a.name} has hash "
                f"{', '.join(digests_a)}, {b.name} has hash {', '.join(digests_b)}. Both runs "
                "must use the same probe data for a comparison of their maps to mean anything."
            )
    return notes


def common(a: Sequence[Any], b: Sequence[Any]) -> list[Any]:
    """Items of ``a`` that are also in ``b``, in ``a``'s order.

    Example:
        >>> common(["x", "y", "z"], ["z", "x"])
        ['x', 'z']
    """
    members = set(b)
    return [item for item in a if item in members]


def common_epochs(a: Run, b: Run) -> list[int]:
    """Sorted epochs evaluated in both runs.

    Example:
        >>> ev = lambda i, e: Evaluation(i, e, 0, {}, {}, {}, {})
        >>> common_epochs(Run("a", Path("a"), [ev(0, 0), ev(1, 2), ev(2, 4)]),
        ...               Run("b", Path("b"), [ev(0, 0), ev(1, 1), ev(2, 2)]))
        [0, 2]
    """
    return sorted(set(a.by_epoch) & set(b.by_epoch))


def overlay_epochs(epochs: Sequence[int], count: int = 3) -> list[int]:
    """The first, middle and last of ``epochs`` (all of them when there are ``count`` or fewer).

    Example:
        >>> overlay_epochs([0, 1, 2, 3, 4, 5])
        [0, 2, 5]
        >>> overlay_epochs([0, 3])
        [0, 3]
    """
    if len(epochs) <= count:
        return list(epochs)
    picks = [round(i * (len(epochs) - 1) / max(count - 1, 1)) for i in range(count)]
    return [epochs[i] for i in dict.fromkeys(picks)]


def localization(evaluation: Evaluation, group: Group) -> dict[str, float]:
    """The localization scores recorded for ``group`` in one evaluation, by score name."""
    scores = {}
    for score in LOCALIZATION_SCORES:
        tag = ScalarKey(LOCALIZATION, group, score).tag
        if tag in evaluation.scalars:
            scores[score] = evaluation.scalars[tag]
    return scores


def scalar_series(run: Run, key: ScalarKey) -> tuple[list[int], list[float]]:
    """(epochs, values) of one logged scalar over a run's `Run.by_epoch`; NaN where missing.

    Example:
        >>> from cam_monitor.schema import DRIFT
        >>> key = ScalarKey(DRIFT, MapKey("val", "conv", "gradcam"), "js_ref")
        >>> ev = lambda i, e, s: Evaluation(i, e, 0, {}, {}, {}, {}, scalars=s)
        >>> scalar_series(Run("a", Path("a"), [ev(0, 0, {key.tag: 0.0}), ev(1, 3, {})]), key)
        ([0, 3], [0.0, nan])
    """
    epochs, values = [], []
    for epoch, evaluation in run.by_epoch.items():
        epochs.append(epoch)
        values.append(evaluation.scalars.get(key.tag, math.nan))
    return epochs, values


def compare_group(a: Run, b: Run, group: Group, epochs: Sequence[int]) -> list[EpochComparison]:
    """Between-run similarity and localization for one group at each of ``epochs`` (common)."""
    group = MapKey(*group)
    rows = []
    epochs_a, epochs_b = a.by_epoch, b.by_epoch
    for epoch in epochs:
        ev_a, ev_b = epochs_a[epoch], epochs_b[epoch]
        maps_a, maps_b = ev_a.maps.get(group), ev_b.maps.get(group)
        similarity: dict[str, tuple[float, int]] = {}
        note = ""
        images = 0
        if maps_a is None or maps_b is None:
            note = f"no maps in {a.name if maps_a is None else b.name}"
        elif maps_a.shape != maps_b.shape:
            note = f"maps differ in shape: {tuple(maps_a.shape)} vs {tuple(maps_b.shape)}"
        else:
            similarity = map_similarity(maps_a, maps_b)
            images = maps_a.shape[0]
        rows.append(
            EpochComparison(
                epoch=epoch,
                index_a=ev_a.index,
                index_b=ev_b.index,
                images=images,
                similarity=similarity,
                localization_a=localization(ev_a, group),
                localization_b=localization(ev_b, group),
                note=note,
            )
        )
    return rows
