"""Runs compared by the numbers: loading runs, joining them on epochs, between-run map
similarity, and groups of runs (seeds of one recipe) summarised by their mean and min-max.

The runs are joined on the epoch (epochs completed; the baseline is epoch 0). Nothing here draws
or prints: `cam_monitor.report` turns a comparison into HTML, `cam_monitor.cli` into text.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .history import (
    Evaluation,
    HistoryError,
    ProbeRecord,
    find_histories,
    find_history,
    read_history,
    read_probe,
)
from .measures import as_measured, js_divergence, spearman, summarize, topk_iou
from .render import predicted_classes
from .schema import (
    DRIFT,
    FAITHFULNESS,
    FAITHFULNESS_CHOICES,
    LOCALIZATION,
    LOCALIZATION_SCORES,
    MEASURES,
    REF,
    MapKey,
    ScalarKey,
    drift_stat,
    parse_scalar_tag,
)

__all__ = [
    "SIMILARITIES",
    "SPREAD",
    "EpochComparison",
    "Group",
    "ReportError",
    "Run",
    "RunGroup",
    "Spread",
    "SummaryRow",
    "check_one_run",
    "check_probes",
    "common",
    "common_epochs",
    "compare_group",
    "format_number",
    "group_values",
    "later_epochs_note",
    "load_run",
    "localization",
    "map_similarity",
    "overlay_epochs",
    "predictions",
    "run_labels",
    "scalar_series",
    "spread_series",
    "summarize_groups",
    "summary_stats",
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
    folders: tuple[Path, ...] = ()  # every folder of a resumed run's history (`load_run`)

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


def load_run(
    run_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    strict: bool = False,
    name: str | None = None,
) -> Run:
    """Find and read a run's history and probe; unreadable eval files warn and are skipped
    unless ``strict``. A corrupt ``probe.npz`` warns and is ignored (maps are shown alone).
    A folder whose evaluations were written by different runs is a `HistoryError`.

    A run resumed into a new logger version wrote its history into one folder per version:
    give their parent (``lightning_logs``), or the folders, to read them as one history
    (`merge_resumed`); folders of different runs are a `HistoryError`.
    """
    given = [run_dir] if isinstance(run_dir, (str, os.PathLike)) else list(run_dir)
    found = [[*find_histories(path)] for path in given]
    folders = list(dict.fromkeys(folder for part in found for folder in part))
    parts = [(folder, read_history(folder, strict=strict)) for folder in folders]
    if len(given) == 1 and len(folders) > 1 and len({ev.run for _, h in parts for ev in h}) > 1:
        find_history(given[0])  # several runs' histories below one folder: which one?
    evaluations = merge_resumed(parts)
    probe = None
    for folder in reversed(folders):  # the newest folder's probe: every folder has one
        try:
            probe = read_probe(folder)
        except HistoryError as exc:
            if strict:
                raise
            warnings.warn(str(exc), stacklevel=2)
        if probe is not None:
            break
    label = name if name is not None else (Path(given[0]).resolve().name or str(given[0]))
    return Run(label, folders[0], evaluations, probe, tuple(folders))


def merge_resumed(parts: Sequence[tuple[Path, list[Evaluation]]]) -> list[Evaluation]:
    """One run's evaluations from its folders (each resume into a new logger version starts
    one): checked to be one run's, then by index, where a later folder's evaluation replaces an
    earlier one's (a run resumed from an older checkpoint evaluates those steps again). Folders
    are ordered by their first evaluation's time, then by path."""
    for folder, evaluations in parts:
        check_one_run(folder, evaluations)
    runs = {evaluations[0].run: folder for folder, evaluations in parts if evaluations}
    if len(runs) > 1:
        listing = "; ".join(f"run {run or '(no id)'} in {folder}" for run, folder in runs.items())
        raise HistoryError(
            f"These folders hold the histories of {len(runs)} different training runs "
            f"({listing}); only one run's folders read as one history (a run resumed into a new "
            "logger version keeps its run id). Pass one run's folders."
        )
    ordered = sorted(parts, key=lambda part: (min(ev.time or "" for ev in part[1]), part[0]))
    merged: dict[int, Evaluation] = {}
    for _, evaluations in ordered:
        merged.update((ev.index, ev) for ev in evaluations)
    return [merged[index] for index in sorted(merged)]


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


def run_labels(*paths: Path | str) -> tuple[str, ...]:
    """Short names for run folders: their last parts, with parents added until all differ.

    Example:
        >>> run_labels("runs/dann/version_0", "runs/source_only/version_0")
        ('dann/version_0', 'source_only/version_0')
        >>> run_labels("runs/dann", "runs/source_only", "runs/dann_s1")
        ('dann', 'source_only', 'dann_s1')
        >>> run_labels("runs/dann", "runs/dann")
        ('dann (A)', 'dann (B)')
    """
    parts = [Path(p).parts for p in paths]
    for depth in range(1, max((len(p) for p in parts), default=0) + 1):
        labels = tuple("/".join(p[-depth:]) for p in parts)
        if len(set(labels)) == len(labels):
            return labels
    return tuple(f"{Path(p).name or p} ({_letter(i)})" for i, p in enumerate(paths))


def _letter(index: int) -> str:
    """A, B, ..., Z, then numbers."""
    return chr(ord("A") + index) if index < 26 else str(index + 1)


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


def check_probes(*runs: Run) -> list[str]:
    """Raise `ReportError` when a probe present in two of ``runs`` has different data (hashes).

    Returns warnings: a probe whose hash changed within a run, or has no hash in one run.
    """
    hashes = [run.hashes() for run in runs]
    notes: list[str] = []
    for run, table in zip(runs, hashes, strict=True):
        for probe, digests in table.items():
            if len(digests) > 1:
                notes.append(
                    f"probe {probe!r} changed within run {run.name} (hashes "
                    f"{', '.join(digests)}): its maps before and after are not comparable"
                )
    first, hashes_a = runs[0], hashes[0]
    for b, hashes_b in zip(runs[1:], hashes[1:], strict=True):
        for probe in common(first.probes, b.probes):
            digests_a, digests_b = hashes_a.get(probe, []), hashes_b.get(probe, [])
            if not digests_a or not digests_b:
                missing = first.name if not digests_a else b.name
                notes.append(
                    f"cannot check that probe {probe!r} holds the same data in both runs: "
                    f"{missing} recorded no hash for it"
                )
            elif not set(digests_a) & set(digests_b):
                raise ReportError(
                    f"probe {probe!r} differs between the runs: {first.name} has hash "
                    f"{', '.join(digests_a)}, {b.name} has hash {', '.join(digests_b)}. All runs "
                    "must use the same probe data for a comparison of their maps to mean "
                    "anything."
                )
            differing = ground_truth_differences(first.probe, b.probe, probe)
            if differing:
                notes.append(
                    f"probe {probe!r} holds the same inputs in {first.name} and {b.name} but "
                    f"different {' and '.join(differing)}: "
                    + "; ".join(_TRUTH_EFFECTS[kind] for kind in differing)
                )
    return list(dict.fromkeys(notes))


def later_epochs_note(runs: Sequence[Run], last: int) -> str | None:
    """Where some runs evaluated beyond `last`, the last epoch every run evaluated: which runs
    stopped there (so limit the comparison) and which went on; None where none did."""
    later = [run for run in runs if max(run.by_epoch) > last]
    if not later:
        return None
    stopped = [run.name for run in runs if max(run.by_epoch) == last]
    went_on = ", ".join(f"{run.name} (to epoch {max(run.by_epoch)})" for run in later)
    return (
        f"epoch {last} is the last one every run evaluated"
        + (f": {', '.join(stopped)} stopped there" if stopped else "")
        + f"; {went_on} went on, and {'is' if len(later) == 1 else 'are'} not compared after it"
    )


#: What differing ground truth of a probe makes incomparable between runs.
_TRUTH_EFFECTS = {
    "masks": "their localization scores (cam_loc) measure against different regions and do "
    "not compare",
    "labels": "captions differ, and so do maps explained for target='label'",
    "label maps": "their segmentation scores (class IoU, pixel accuracy) do not compare",
}


def ground_truth_differences(a: ProbeRecord | None, b: ProbeRecord | None, probe: str) -> list[str]:
    """Which of a probe's masks, labels and label maps differ between two runs' stored probes
    (present in one only, or different values); none where either run stored no probe. The
    probe hash covers the inputs alone, so this is where ground truth is checked."""
    if a is None or b is None:
        return []
    found = []
    for kind, field_a, field_b in (
        ("masks", a.masks, b.masks),
        ("labels", a.labels, b.labels),
        ("label maps", a.label_maps, b.label_maps),
    ):
        x, y = field_a.get(probe), field_b.get(probe)
        if (x is None) != (y is None) or (x is not None and not np.array_equal(x, y)):
            found.append(kind)
    return found


def common(a: Sequence[Any], b: Sequence[Any]) -> list[Any]:
    """Items of ``a`` that are also in ``b``, in ``a``'s order.

    Example:
        >>> common(["x", "y", "z"], ["z", "x"])
        ['x', 'z']
    """
    members = set(b)
    return [item for item in a if item in members]


def common_epochs(*runs: Run) -> list[int]:
    """Sorted epochs evaluated in every run.

    Example:
        >>> ev = lambda i, e: Evaluation(i, e, 0, {}, {}, {}, {})
        >>> common_epochs(Run("a", Path("a"), [ev(0, 0), ev(1, 2), ev(2, 4)]),
        ...               Run("b", Path("b"), [ev(0, 0), ev(1, 1), ev(2, 2)]))
        [0, 2]
    """
    if not runs:
        return []
    return sorted(set(runs[0].by_epoch).intersection(*(run.by_epoch for run in runs[1:])))


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


def predictions(evaluation: Evaluation, probe: str) -> np.ndarray | None:
    """Each image's predicted class on ``probe`` at one evaluation (int64 ``[B]``; -1: none):
    a segmentation probe's by the rule of ``target="predicted"`` (its recorded
    `Evaluation.segmentation`: the mean logits of a segmentation model predict nothing), a
    classifier's the argmax of its logits (-1 for NaN or inf logits); None without either.

    Example:
        >>> ev = Evaluation(0, 0, 0, {}, {}, {}, {"val": np.array([[0.0, 2.0], [3.0, 1.0]])})
        >>> predictions(ev, "val").tolist(), predictions(ev, "other")
        ([1, 0], None)
    """
    segmentation = evaluation.segmentation.get(probe)
    if segmentation is not None:
        return segmentation.predicted.astype(np.int64)
    logits = evaluation.logits.get(probe)
    if logits is None or logits.ndim != 2:
        return None
    return np.array(predicted_classes(logits), dtype=np.int64)


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
        else:  # signed maps by their size, as drift scores them
            measured = [as_measured(torch.from_numpy(m), group.method) for m in (maps_a, maps_b)]
            similarity = map_similarity(*(m.numpy() for m in measured))
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


# ----------------------------------------------------------------------------- groups of runs

#: How a group's spread over its runs is given, wherever a group's number is shown.
SPREAD = "min-max over the group's runs"


@dataclass(frozen=True, eq=False)
class RunGroup:
    """Runs of one recipe (seeds, say), compared as one: a display name and its runs."""

    name: str
    runs: tuple[Run, ...]

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError(f"run group {self.name!r} has no runs; give it at least one")
        object.__setattr__(self, "runs", tuple(self.runs))

    @classmethod
    def single(cls, run: Run) -> RunGroup:
        """A group of one run, named after it."""
        return cls(run.name, (run,))

    @cached_property
    def keys(self) -> list[Group]:
        """The (probe, layer, method) present in every run, in the first run's order."""
        found = self.runs[0].groups
        for run in self.runs[1:]:
            found = common(found, run.groups)
        return found

    @cached_property
    def epochs(self) -> list[int]:
        """Epochs evaluated in every run of the group."""
        return common_epochs(*self.runs)


@dataclass(frozen=True)
class Spread:
    """One number over a group's runs: the mean and min-max of the finite values, and counts
    (``total``: the runs that recorded it; None marks a run that did not).

    Example:
        >>> s = Spread.of([0.2, 0.4, float("nan"), None])
        >>> round(s.mean, 6), s.low, s.high, s.finite, s.total
        (0.3, 0.2, 0.4, 2, 3)
        >>> s.text(), Spread.of([0.25]).text(), Spread.of([None, None]).text()
        ('0.3000 [0.2000, 0.4000] (2 of 3 runs)', '0.2500', '-')
    """

    mean: float
    low: float
    high: float
    finite: int
    total: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread:
        """The spread of ``values``; NaN (undefined) and None (not recorded) are left out."""
        recorded = [v for v in values if v is not None]
        finite = [v for v in recorded if not math.isnan(v)]
        if not finite:
            return cls(math.nan, math.nan, math.nan, 0, len(recorded))
        return cls(sum(finite) / len(finite), min(finite), max(finite), len(finite), len(recorded))

    def text(self) -> str:
        """ "mean [min, max]" for several runs, the value alone for one, "-" when no run
        recorded it, "nan" when every recorded value is undefined; "(k of n runs)" when only
        k of the n runs that recorded it have a defined value (a diverged seed, say)."""
        if self.total == 0:
            return "-"
        text = format_number(self.mean)
        if self.finite > 1 and self.low != self.high:
            text += f" [{format_number(self.low)}, {format_number(self.high)}]"
        if 0 < self.finite < self.total:
            text += f" ({self.finite} of {self.total} runs)"
        return text


def group_values(group: RunGroup, key: ScalarKey, epoch: int) -> list[float | None]:
    """Each run's value of one scalar at ``epoch``; None where a run did not record it (NaN:
    recorded, but undefined)."""
    values: list[float | None] = []
    for run in group.runs:
        evaluation = run.by_epoch.get(epoch)
        values.append(None if evaluation is None else evaluation.scalars.get(key.tag))
    return values


def spread_series(group: RunGroup, key: ScalarKey, epochs: Sequence[int]) -> list[Spread]:
    """The group's `Spread` of one scalar at each of ``epochs``."""
    return [Spread.of(group_values(group, key, epoch)) for epoch in epochs]


def summary_stats(groups: Sequence[RunGroup], key: Group) -> list[ScalarKey]:
    """The scalars a summary shows for one (probe, layer, method): the localization scores
    recorded by some run, then the drift from the baseline (1 - Spearman, else the first
    drift measure recorded), then the faithfulness measures and sanity check recorded."""
    key = MapKey(*key)
    recorded = {tag for group in groups for run in group.runs for ev in run.evaluations
                for tag in ev.scalars}  # fmt: skip
    wanted = [ScalarKey(LOCALIZATION, key, score) for score in LOCALIZATION_SCORES]
    chosen = [k for k in wanted if k.tag in recorded]
    for measure in MEASURES:
        drift = ScalarKey(DRIFT, key, drift_stat(measure, REF))
        if drift.tag in recorded:
            chosen.append(drift)
            break
    trust = [ScalarKey(FAITHFULNESS, key, stat) for stat in FAITHFULNESS_CHOICES]
    return chosen + [k for k in trust if k.tag in recorded]


@dataclass(frozen=True)
class SummaryRow:
    """One scalar of one (probe, layer, method) at one epoch, across groups.

    ``values`` holds each group's `Spread`, ``runs`` each group's single-run values (None where
    not recorded); ``differences`` are each later group's mean minus the first group's.
    """

    key: ScalarKey
    epoch: int
    values: tuple[Spread, ...]
    runs: tuple[tuple[float | None, ...], ...]

    @property
    def differences(self) -> tuple[float, ...]:
        first = self.values[0].mean
        return tuple(value.mean - first for value in self.values[1:])

    @property
    def highest(self) -> int | None:
        """Index of the group with the highest mean; None when fewer than two means are
        defined (nothing to compare) or the highest is tied."""
        means = [(v.mean, i) for i, v in enumerate(self.values) if not math.isnan(v.mean)]
        if len(means) < 2:
            return None
        best = max(means)
        return None if sum(m == best[0] for m, _ in means) > 1 else best[1]

    @property
    def overlaps(self) -> bool:
        """Whether the highest group's min-max range overlaps another group's (with several
        runs, a higher mean whose range overlaps is not a clear difference)."""
        best = self.highest
        if best is None:
            return False
        low = self.values[best].low
        return any(v.high >= low for i, v in enumerate(self.values) if i != best and v.finite)


def summarize_groups(
    groups: Sequence[RunGroup], keys: Sequence[Group], epoch: int
) -> list[SummaryRow]:
    """The summary table: for each (probe, layer, method) in ``keys`` and each of its
    `summary_stats`, every group's value at ``epoch`` (mean and min-max over its runs)."""
    rows = []
    for key in keys:
        for stat in summary_stats(groups, key):
            runs = tuple(tuple(group_values(group, stat, epoch)) for group in groups)
            values = tuple(Spread.of(list(values)) for values in runs)
            rows.append(SummaryRow(stat, epoch, values, runs))
    return rows
