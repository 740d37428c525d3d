"""Compare two runs' CAM histories: between-run map similarity, and a self-contained HTML report.

The runs are joined on the epoch (epochs completed; the baseline is epoch 0). matplotlib (the
``report`` extra) is imported only inside the functions that draw figures.
"""

from __future__ import annotations

import base64
import html
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .drift import js_divergence, spearman, summarize, topk_iou
from .history import Evaluation, HistoryError, ProbeRecord, find_history, read_history, read_probe
from .render import caption_text, make_map_grid, make_overlay_grid, to_jpeg_bytes

__all__ = [
    "DRIFT_MEASURES",
    "LOCALIZATION_SCORES",
    "SIMILARITIES",
    "EpochComparison",
    "Group",
    "ReportError",
    "Run",
    "check_probes",
    "common_epochs",
    "compare_group",
    "load_run",
    "map_similarity",
    "overlay_epochs",
    "require_matplotlib",
    "run_labels",
    "scalar_name",
    "write_report",
]

#: (probe, layer, method): the unit that maps, curves and tables are made of.
Group = tuple[str, str, str]

#: Between-run measures: spearman and topk_iou are similarities (1 = same), js a divergence.
SIMILARITIES: tuple[str, ...] = ("spearman", "topk_iou", "js")
#: Drift measures the callback logs as `cam_drift/<probe>/<layer>/<method>/<measure>_{ref,prev}`.
DRIFT_MEASURES: tuple[str, ...] = ("spearman", "pearson", "topk_iou", "js", "com_shift")
#: Localization scores the callback logs as `cam_loc/<probe>/<layer>/<method>/<score>`.
LOCALIZATION_SCORES: tuple[str, ...] = ("energy", "pointing", "mask_iou")

_GROUP_KINDS = ("cam_drift", "cam_loc", "cam_stats")
_REPORT_HINT = "the HTML report needs matplotlib: pip install cam-monitor[report]"


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
        known = {"/".join(g): g for g in found}
        for evaluation in self.evaluations:
            for name in evaluation.scalars:
                parsed = parse_scalar(name, known)
                if parsed is not None:
                    found.setdefault(parsed[1])
        return list(found)

    @cached_property
    def probes(self) -> list[str]:
        """Probe names of the groups, in order."""
        return list(dict.fromkeys(p for p, _, _ in self.groups))

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
    label = name if name is not None else (Path(run_dir).resolve().name or str(run_dir))
    return Run(name=label, folder=folder, evaluations=evaluations, probe=probe)


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


def scalar_name(kind: str, group: Group, stat: str) -> str:
    """The scalar tag the callback logs, e.g. ``cam_loc/source/features.29/gradcam/energy``.

    Example:
        >>> scalar_name("cam_drift", ("val", "layer4.1.conv2", "gradcam"), "js_ref")
        'cam_drift/val/layer4.1.conv2/gradcam/js_ref'
    """
    return "/".join((kind, *group, stat))


def parse_scalar(
    name: str, known: Mapping[str, Group] | None = None
) -> tuple[str, Group, str] | None:
    """Split a ``cam_drift``/``cam_loc``/``cam_stats`` tag into (kind, group, stat); else None.

    ``known`` maps "probe/layer/method" to groups with maps, so names holding a "/" resolve;
    otherwise the probe is the first component and the method the one before the stat.

    Example:
        >>> parse_scalar("cam_drift/source/features.29/gradcam/spearman_ref")
        ('cam_drift', ('source', 'features.29', 'gradcam'), 'spearman_ref')
        >>> parse_scalar("cam_monitor/seconds") is None
        True
    """
    kind, _, rest = name.partition("/")
    if kind not in _GROUP_KINDS:
        return None
    base, _, stat = rest.rpartition("/")
    if known is not None and base in known:
        return kind, known[base], stat
    parts = base.split("/")
    if len(parts) < 3 or not stat or not all(parts):
        return None
    return kind, (parts[0], "/".join(parts[1:-1]), parts[-1]), stat


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
    for probe in _common(a.probes, b.probes):
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


def _common(a: Sequence[Any], b: Sequence[Any]) -> list[Any]:
    """Items of ``a`` that are also in ``b``, in ``a``'s order."""
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


def _localization(evaluation: Evaluation, group: Group) -> dict[str, float]:
    """The localization scores recorded for ``group`` in one evaluation."""
    scores = {}
    for score in LOCALIZATION_SCORES:
        name = scalar_name("cam_loc", group, score)
        if name in evaluation.scalars:
            scores[score] = evaluation.scalars[name]
    return scores


def compare_group(a: Run, b: Run, group: Group, epochs: Sequence[int]) -> list[EpochComparison]:
    """Between-run similarity and localization for one group at each of ``epochs`` (common)."""
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
                localization_a=_localization(ev_a, group),
                localization_b=_localization(ev_b, group),
                note=note,
            )
        )
    return rows


# --------------------------------------------------------------------------- HTML report


def write_report(
    path: str | Path,
    a: Run,
    b: Run,
    *,
    groups: Sequence[Group] | None = None,
    epochs: Sequence[int] | None = None,
    overlays: Sequence[int] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write a self-contained HTML report comparing runs ``a`` and ``b``; return its path.

    Per group: a table of between-run similarity and localization, a figure of drift against
    the first evaluation and localization over epochs (both runs), and overlay grids (run A |
    run B) at the ``overlays`` epochs (default: first, middle and last common epoch).
    Raises `ReportError` if matplotlib is missing or the runs share no epoch or group.
    """
    matplotlib_classes = require_matplotlib()
    notes = list(dict.fromkeys([*notes, *check_probes(a, b)]))  # the caller may have them
    if groups is None:
        groups = _common(a.groups, b.groups)
    if epochs is None:
        epochs = common_epochs(a, b)
    if not groups or not epochs:
        raise ReportError(f"runs {a.name} and {b.name} share no epoch or (probe, layer, method)")
    if overlays is None:
        overlays = overlay_epochs(epochs)
    body = [_header(a, b, epochs, notes), _contents(groups)]
    for group in groups:
        rows = compare_group(a, b, group, epochs)
        panels = _panels(a, b, group, rows)
        figure = _figure_png(matplotlib_classes, panels) if panels else None
        body.append(_section(a, b, group, rows, figure, overlays))
    title = f"cam-monitor: {a.name} vs {b.name}"
    page = _PAGE.format(title=_e(title), style=_STYLE, body="\n".join(body))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target


def require_matplotlib() -> tuple[Any, Any, Any]:
    """matplotlib's Figure, Agg canvas and MaxNLocator (no pyplot: no global state, no display);
    `ReportError` with the install command when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ReportError(_REPORT_HINT) from exc
    return Figure, FigureCanvasAgg, MaxNLocator


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td.l, th.l { text-align: left; }
td.overlay { vertical-align: top; text-align: center; }
img { max-width: 100%; }
section { border-top: 2px solid #888; margin-top: 2em; }
.note { color: #a40; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return f"{value:.4f}"


def _anchor(group: Group) -> str:
    """An HTML id for a group: letters and digits kept, anything else as -hex-."""
    return "g-" + "".join(
        c if c.isascii() and c.isalnum() else f"-{ord(c):x}-" for c in "/".join(group)
    )


def _header(a: Run, b: Run, epochs: Sequence[int], notes: Sequence[str]) -> str:
    from . import __version__  # here, not at the top: the package may import this module

    rows = []
    for letter, run in (("A", a), ("B", b)):
        hashes = ", ".join(f"{p}: {'/'.join(d)}" for p, d in run.hashes().items()) or "-"
        probe = "yes" if run.probe is not None else "no"
        rows.append(
            f"<tr><td class='l'>{letter}</td><td class='l'>{_e(run.name)}</td>"
            f"<td class='l'><code>{_e(run.folder)}</code></td><td>{len(run.evaluations)}</td>"
            f"<td class='l'>{_e(hashes)}</td><td class='l'>{probe}</td></tr>"
        )
    made = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [
        "<table><tr><th class='l'>run</th><th class='l'>name</th><th class='l'>history</th>"
        "<th>evaluations</th><th class='l'>probe hashes</th><th class='l'>probe.npz</th></tr>",
        *rows,
        "</table>",
        f"<p>Common epochs (epochs completed; 0 = before training): "
        f"{_e(', '.join(map(str, epochs)))}. Made by cam-monitor {_e(__version__)} at {made}.</p>",
        "<p>Between-run similarity of the maps at the same epoch, averaged over the probe images "
        "where it is defined: <b>spearman</b> (rank correlation) and <b>topk_iou</b> (overlap of "
        "the top 20% pixels), 1 = same attention; <b>js</b> (Jensen-Shannon divergence), "
        "0 = same attention. Drift curves are distances to each run's first evaluation "
        "(0 = unchanged).</p>",
    ]
    lines.extend(f"<p class='note'>Note: {_e(note)}</p>" for note in notes)
    return "\n".join(lines)


def _contents(groups: Sequence[Group]) -> str:
    items = "".join(f"<li><a href='#{_anchor(g)}'>{_e(' / '.join(g))}</a></li>" for g in groups)
    return f"<ul>{items}</ul>"


def _table(a: Run, b: Run, rows: Sequence[EpochComparison]) -> str:
    scores = [
        s
        for s in LOCALIZATION_SCORES
        if any(s in r.localization_a or s in r.localization_b for r in rows)
    ]
    head = "".join(f"<th>{m}</th>" for m in SIMILARITIES)
    for score in scores:
        head += f"<th>{score}<br>{_e(a.name)}</th><th>{score}<br>{_e(b.name)}</th>"
    lines = [f"<table><tr><th>epoch</th>{head}<th class='l'>note</th></tr>"]
    for row in rows:
        cells = "".join(
            f"<td>{_number(row.similarity[m][0]) if m in row.similarity else '-'}</td>"
            for m in SIMILARITIES
        )
        for score in scores:
            cells += f"<td>{_number(row.localization_a.get(score))}</td>"
            cells += f"<td>{_number(row.localization_b.get(score))}</td>"
        left_out = max((n for _, n in row.similarity.values()), default=0)
        note = row.note or (f"{left_out} of {row.images} images undefined" if left_out else "")
        lines.append(f"<tr><td>{row.epoch}</td>{cells}<td class='l'>{_e(note)}</td></tr>")
    lines.append("</table>")
    return "\n".join(lines)


@dataclass(frozen=True)
class _Panel:
    title: str
    lines: list[tuple[str, list[int], list[float]]]


def _series(run: Run, group: Group, kind: str, stat: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of one scalar over a run; NaN where an evaluation lacks it."""
    name = scalar_name(kind, group, stat)
    epochs, values = [], []
    for epoch, evaluation in run.by_epoch.items():
        epochs.append(epoch)
        values.append(evaluation.scalars.get(name, math.nan))
    return epochs, values


def _panels(a: Run, b: Run, group: Group, rows: Sequence[EpochComparison]) -> list[_Panel]:
    """Drift vs reference, localization and between-run similarity: panels with data only."""
    wanted = [
        ("cam_drift", "spearman_ref", "drift vs first evaluation: 1 - spearman"),
        ("cam_drift", "topk_iou_ref", "drift vs first evaluation: 1 - top-k IoU"),
        ("cam_drift", "js_ref", "drift vs first evaluation: JS divergence"),
        ("cam_loc", "energy", "localization: energy inside mask"),
        ("cam_loc", "pointing", "localization: pointing game"),
        ("cam_loc", "mask_iou", "localization: top-k IoU with mask"),
    ]
    panels = []
    for kind, stat, title in wanted:
        lines = [(run.name, *_series(run, group, kind, stat)) for run in (a, b)]
        if any(math.isfinite(v) for _, _, values in lines for v in values):
            panels.append(_Panel(title, lines))
    between = [
        (
            measure,
            [r.epoch for r in rows],
            [r.similarity.get(measure, (math.nan, 0))[0] for r in rows],
        )
        for measure in ("spearman", "topk_iou")
    ]
    if any(math.isfinite(v) for _, _, values in between for v in values):
        panels.append(_Panel(f"{a.name} vs {b.name}: map similarity (1 = same)", between))
    return panels


def _figure_png(matplotlib_classes: tuple[Any, Any, Any], panels: Sequence[_Panel]) -> bytes:
    """One PNG with a small line chart per panel, three to a row."""
    figure_class, canvas_class, integer_locator = matplotlib_classes
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = figure_class(figsize=(4.4 * columns, 3.2 * rows), dpi=80)
    # Fixed margins: constrained layout costs more than drawing these small charts.
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.12 / rows, top=1 - 0.08 / rows)
    figure.subplots_adjust(wspace=0.25, hspace=0.45)
    canvas_class(figure)
    styles = [{"marker": "o", "linestyle": "-"}, {"marker": "s", "linestyle": "--"}]
    for number, panel in enumerate(panels):
        axes = figure.add_subplot(rows, columns, number + 1)
        for (label, xs, ys), style in zip(panel.lines, styles, strict=False):
            axes.plot(xs, ys, label=label, markersize=4, **style)
        axes.set_title(panel.title, fontsize=9)
        axes.set_xlabel("epoch", fontsize=8)
        axes.xaxis.set_major_locator(integer_locator(integer=True))
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _img(image: bytes, alt: str, kind: str = "png") -> str:
    data = base64.b64encode(image).decode("ascii")
    return f"<img alt='{_e(alt)}' src='data:image/{kind};base64,{data}'>"


def _grid_jpeg(run: Run, probe_record: ProbeRecord | None, group: Group, epoch: int) -> bytes:
    """Overlay grid of one run's maps at ``epoch`` as JPEG (a PNG per grid made reports of
    15 MB); maps alone when the probe images are missing."""
    evaluation = run.by_epoch[epoch]
    maps = torch.from_numpy(evaluation.maps[group])
    probe = group[0]
    logits = evaluation.logits.get(probe)
    labels = evaluation.labels.get(probe)
    if labels is None and probe_record is not None:
        labels = probe_record.labels.get(probe)
    captions = None
    if logits is not None and len(logits) == maps.shape[0]:
        true = labels if labels is not None and len(labels) == maps.shape[0] else None
        captions = caption_text(np.argmax(logits, axis=1).tolist(), true, compact=True)
    inputs = None if probe_record is None else probe_record.inputs.get(probe)
    if inputs is not None and inputs.shape[0] == maps.shape[0]:
        try:
            grid = make_overlay_grid(torch.from_numpy(inputs), maps, captions=captions, nrow=4)
            return to_jpeg_bytes(grid)
        except ValueError:
            pass  # e.g. inputs that are not 1- or 3-channel images: show the maps alone
    return to_jpeg_bytes(make_map_grid(maps, signed=False, captions=captions, nrow=4))


def _section(
    a: Run,
    b: Run,
    group: Group,
    rows: Sequence[EpochComparison],
    figure: bytes | None,
    overlays: Sequence[int],
) -> str:
    title = " / ".join(group)
    parts = [f"<section id='{_anchor(group)}'>", f"<h2>{_e(title)}</h2>", _table(a, b, rows)]
    if figure is not None:
        parts.append(_img(figure, f"curves for {title}"))
    probe_record = a.probe if a.probe is not None and group[0] in a.probe.inputs else b.probe
    has_images = probe_record is not None and group[0] in probe_record.inputs
    what = "CAMs over the probe images" if has_images else "CAMs alone (no probe.npz images)"
    parts.append(f"<h3>{what}, min-max normalised per image; captions p: predicted, t: true</h3>")
    parts.append(f"<table><tr><th>epoch</th><th>{_e(a.name)}</th><th>{_e(b.name)}</th></tr>")
    for epoch in overlays:
        cells = []
        for run in (a, b):
            evaluation = run.by_epoch.get(epoch)
            if evaluation is None or group not in evaluation.maps:
                cells.append("<td class='overlay'>no maps</td>")
                continue
            jpeg = _grid_jpeg(run, probe_record, group, epoch)
            image = _img(jpeg, f"{run.name} epoch {epoch}", "jpeg")
            cells.append(f"<td class='overlay'>{image}</td>")
        parts.append(f"<tr><td>{epoch}</td>{''.join(cells)}</tr>")
    parts.append("</table></section>")
    return "\n".join(parts)
