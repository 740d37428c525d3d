"""The HTML view of a comparison of runs or groups of runs: the summary table first, then epoch
tables and curves, then overlay grids, in one self-contained file.

The numbers come from `cam_monitor.compare`; this module only lays them out. matplotlib (the
``report`` extra) is imported only inside the functions that draw figures.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .compare import (
    SIMILARITIES,
    SPREAD,
    EpochComparison,
    Group,
    ReportError,
    Run,
    RunGroup,
    Spread,
    SummaryRow,
    check_probes,
    common,
    common_epochs,
    compare_group,
    format_number,
    later_epochs_note,
    overlay_epochs,
    predictions,
    spread_series,
    summarize_groups,
    summary_stats,
)
from .history import Evaluation, ProbeRecord
from .methods import PIXEL_METHODS, SIGNED_METHODS
from .render import (
    caption_choices,
    choose_captions,
    make_map_grid,
    make_overlay_grid,
    segment_caption_choices,
    to_jpeg_bytes,
)
from .schema import (
    DRIFT,
    LOCALIZATION,
    LOCALIZATION_SCORES,
    REF,
    MapKey,
    ScalarKey,
    drift_stat,
    stat_label,
    stat_title,
)

__all__ = ["require_matplotlib", "write_report"]

_REPORT_HINT = "the HTML report needs matplotlib: pip install cam-monitor[report]"
#: Overlay tiles in the report: smaller than the dashboard's and JPEG, to keep reports small.
_TILE, _JPEG_QUALITY = 64, 80


def write_report(
    path: str | Path,
    runs: Sequence[Run | RunGroup],
    *,
    keys: Sequence[Group] | None = None,
    epochs: Sequence[int] | None = None,
    overlays: Sequence[int] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write a self-contained HTML report comparing ``runs`` (single runs or `RunGroup`s of
    seeds); return its path.

    First a summary table (per probe, layer and method: each group's last common-epoch
    localization and drift from its baseline, mean and min-max over its runs, the difference
    to the first group and which is higher), then per (probe, layer, method) an epoch table
    and curves, then overlay grids at the ``overlays`` epochs (default: first and last).
    Two single runs also get their between-run map similarity. Raises `ReportError` if
    matplotlib is missing, the probes differ, or the runs share no epoch or map.
    """
    matplotlib_classes = require_matplotlib()
    groups = [r if isinstance(r, RunGroup) else RunGroup.single(r) for r in runs]
    if len(groups) < 2:
        raise ReportError(f"a report compares at least two runs or groups, got {len(groups)}")
    every = [run for group in groups for run in group.runs]
    notes = list(dict.fromkeys([*notes, *check_probes(*every)]))  # the caller may have them
    if keys is None:
        keys = groups[0].keys
        for group in groups[1:]:
            keys = common(keys, group.keys)
    keys = [MapKey(*key) for key in keys]
    epochs = common_epochs(*every) if epochs is None else list(epochs)
    names = " vs ".join(group.name for group in groups)
    if not keys or not epochs:
        raise ReportError(f"runs {names} share no epoch or (probe, layer, method)")
    overlays = overlay_epochs(epochs, 2) if overlays is None else list(overlays)
    pair = (groups[0].runs[0], groups[1].runs[0]) if _pairwise(groups) else None
    last = epochs[-1]
    rows = summarize_groups(groups, keys, last)
    later = later_epochs_note(every, last)
    if later and later not in notes:
        notes.append(later)
    body = [_summary(groups, rows, last), _runs_table(groups, epochs, notes)]
    body.append("<h2 id='curves'>Curves</h2>")
    body.append(_contents(keys))
    for key in keys:
        comparison = compare_group(*pair, key, epochs) if pair is not None else None
        panels = _panels(groups, key, epochs, comparison)
        figure = _figure_png(matplotlib_classes, panels) if panels else None
        body.append(_curves(groups, key, epochs, comparison, figure))
    body.append(_overlays(groups, keys, overlays))
    page = _PAGE.format(title=_e(f"cam-monitor: {names}"), style=_STYLE, body="\n".join(body))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target


def _pairwise(groups: Sequence[RunGroup]) -> bool:
    """Two single runs: their maps can be compared image by image."""
    return len(groups) == 2 and all(len(group.runs) == 1 for group in groups)


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
body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; max-width: 1400px;
       font-size: 14px; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.15em 0.5em; text-align: right; }
th { background: #f3f3f3; }
td.l, th.l { text-align: left; }
td small { color: #666; }
td.higher { font-weight: bold; }  /* higher, not better: drift, drop, deletion fall */
td.path { word-break: break-all; max-width: 36em; }
table.overlays { table-layout: fixed; width: 100%; }
table.overlays th { text-align: center; }
td.overlay { vertical-align: top; text-align: center; }
img { max-width: 100%; }
section { border-top: 1px solid #888; margin-top: 1.5em; }
p { max-width: 78em; }
.note { color: #a40; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _anchor(group: Group) -> str:
    """An HTML id for a group: letters and digits kept, anything else as -hex-."""
    return "g-" + "".join(
        c if c.isascii() and c.isalnum() else f"-{ord(c):x}-" for c in group.encoded
    )


def _label(key: ScalarKey) -> str:
    return stat_label(key.stat)


def _cell(spread: Spread, higher: bool = False) -> str:
    """A table cell: the mean, with the min-max range in small type below when it has one; the
    higher mean of a row in bold (no colour: for drift, drop and deletion lower is better)."""
    css = " class='higher'" if higher else ""
    text = spread.text()
    if " [" in text:
        mean, spread_text = text.split(" [", 1)
        return f"<td{css}>{mean}<br><small>[{spread_text}</small></td>"
    return f"<td{css}>{text}</td>"


def _group_head(group: RunGroup) -> str:
    runs = len(group.runs)
    return f"<th>{_e(group.name)}<br><small>{runs} run{'s' if runs > 1 else ''}</small></th>"


def _summary(groups: Sequence[RunGroup], rows: Sequence[SummaryRow], epoch: int) -> str:
    """The answer first: every group's localization and drift at the last common epoch."""
    first = groups[0].name
    diffs = "".join(f"<th>{_e(g.name)}<br>&minus; {_e(first)}</th>" for g in groups[1:])
    several = any(len(group.runs) > 1 for group in groups)
    lines = [
        f"<h2 id='summary'>Summary at epoch {epoch}</h2>",
        "<p>Per probe set (domain), layer and method, each group's value at the last epoch "
        "every run evaluated: localization against the masks (<b>energy</b>: share of the CAM "
        "inside the mask; <b>pointing</b>: share of images whose CAM peak is in the mask; "
        "<b>top-k IoU</b>: overlap of the top 20% pixels with the mask; 1 = all on the object) "
        "and drift from each run's reference: its own first evaluation, or the run it named "
        "as <code>reference=</code> (0 = unchanged). "
        + (
            f"A group's cell is the mean of its runs, with the {SPREAD} below it. "
            if several
            else ""
        )
        + "<b>Higher</b> names the group with the higher mean"
        + (", and says when the ranges overlap (no clear difference)." if several else ".")
        + " nan = undefined, - = not recorded (e.g. drift at the baseline).</p>",
        "<table><tr><th class='l'>probe</th><th class='l'>layer / method</th>"
        f"<th class='l'>measure</th>{''.join(_group_head(g) for g in groups)}{diffs}"
        "<th class='l'>higher</th></tr>",
    ]
    spans: dict[tuple[str, ...], int] = {}
    for row in rows:
        maps = row.key.maps
        spans[(maps.probe,)] = spans.get((maps.probe,), 0) + 1
        spans[tuple(maps)] = spans.get(tuple(maps), 0) + 1
    seen: set[tuple[str, ...]] = set()
    for row in rows:
        maps = row.key.maps
        cells = ""
        for span_key, text in (((maps.probe,), maps.probe), (tuple(maps), maps.layer + " / "
                                                            + maps.method)):  # fmt: skip
            if span_key not in seen:
                seen.add(span_key)
                cells += f"<td class='l' rowspan='{spans[span_key]}'>{_e(text)}</td>"
        best = row.highest
        cells += f"<td class='l'>{_e(_label(row.key))}</td>"
        cells += "".join(_cell(v, best == i) for i, v in enumerate(row.values))
        cells += "".join(f"<td>{_signed(d)}</td>" for d in row.differences)
        higher = "-" if best is None else groups[best].name
        if best is not None and several and row.overlaps:
            higher += " (ranges overlap)"
        cells += f"<td class='l'>{_e(higher)}</td>"
        lines.append(f"<tr>{cells}</tr>")
    lines.append("</table>")
    if several:
        lines.append(_single_runs(groups, rows))
    return "\n".join(lines)


def _signed(value: float) -> str:
    text = format_number(value)
    return f"+{text}" if not math.isnan(value) and value > 0 else text


def _single_runs(groups: Sequence[RunGroup], rows: Sequence[SummaryRow]) -> str:
    """The summary's numbers run by run, folded away."""
    heads = "".join(
        f"<th>{_e(group.name)}<br><small>{_e(run.name)}</small></th>"
        for group in groups
        for run in group.runs
    )
    lines = [
        "<details><summary>Single runs</summary>",
        f"<table><tr><th class='l'>probe / layer / method</th><th class='l'>measure</th>{heads}"
        "</tr>",
    ]
    for row in rows:
        values = "".join(f"<td>{format_number(v)}</td>" for run in row.runs for v in run)
        lines.append(
            f"<tr><td class='l'>{_e(' / '.join(row.key.maps))}</td>"
            f"<td class='l'>{_e(_label(row.key))}</td>{values}</tr>"
        )
    lines.append("</table></details>")
    return "\n".join(lines)


def _runs_table(groups: Sequence[RunGroup], epochs: Sequence[int], notes: Sequence[str]) -> str:
    from . import __version__  # here, not at the top: the package may import this module

    rows = []
    for group in groups:
        for run in group.runs:
            hashes = ", ".join(f"{p}: {'/'.join(d)}" for p, d in run.hashes().items()) or "-"
            probe = "yes" if run.probe is not None else "no"
            rows.append(
                f"<tr><td class='l'>{_e(group.name)}</td><td class='l'>{_e(run.name)}</td>"
                f"<td class='l path'><code>{_e(run.folder)}</code></td>"
                f"<td>{len(run.evaluations)}</td><td class='l'>{_e(hashes)}</td>"
                f"<td class='l'>{probe}</td></tr>"
            )
    made = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [
        "<h2 id='runs'>Runs</h2>",
        "<table><tr><th class='l'>group</th><th class='l'>run</th><th class='l'>history</th>"
        "<th>evaluations</th><th class='l'>probe hashes</th><th class='l'>probe.npz</th></tr>",
        *rows,
        "</table>",
        f"<p>Common epochs (epochs completed; 0 = before training): "
        f"{_e(', '.join(map(str, epochs)))}. Made by cam-monitor {_e(__version__)} at {made}.</p>",
    ]
    lines.extend(f"<p class='note'>Note: {_e(note)}</p>" for note in notes)
    return "\n".join(lines)


def _contents(keys: Sequence[Group]) -> str:
    items = "".join(f"<li><a href='#{_anchor(g)}'>{_e(' / '.join(g))}</a></li>" for g in keys)
    return f"<ul>{items}</ul>"


def _curves(
    groups: Sequence[RunGroup],
    key: Group,
    epochs: Sequence[int],
    comparison: Sequence[EpochComparison] | None,
    figure: bytes | None,
) -> str:
    """One (probe, layer, method): its epoch table and its figure."""
    title = " / ".join(key)
    stats = summary_stats(groups, key)
    head = "".join(
        f"<th>{_e(_label(stat))}<br><small>{_e(group.name)}</small></th>"
        for stat in stats
        for group in groups
    )
    if comparison is not None:
        head += "".join(f"<th>{m}<br><small>between runs</small></th>" for m in SIMILARITIES)
        head += "<th class='l'>note</th>"
    series = {
        (stat, index): spread_series(group, stat, epochs)
        for stat in stats
        for index, group in enumerate(groups)
    }
    lines = [f"<section id='{_anchor(key)}'>", f"<h3>{_e(title)}</h3>"]
    lines.append(f"<table><tr><th>epoch</th>{head}</tr>")
    for position, epoch in enumerate(epochs):
        cells = "".join(
            _cell(series[stat, index][position]) for stat in stats for index in range(len(groups))
        )
        if comparison is not None:
            row = comparison[position]
            cells += "".join(
                f"<td>{format_number(row.similarity[m][0]) if m in row.similarity else '-'}</td>"
                for m in SIMILARITIES
            )
            left_out = max((n for _, n in row.similarity.values()), default=0)
            note = row.note or (f"{left_out} of {row.images} images undefined" if left_out else "")
            cells += f"<td class='l'>{_e(note)}</td>"
        lines.append(f"<tr><td>{epoch}</td>{cells}</tr>")
    lines.append("</table>")
    if figure is not None:
        lines.append(_img(figure, f"curves for {title}"))
    lines.append("</section>")
    return "\n".join(lines)


@dataclass(frozen=True)
class _Line:
    label: str
    epochs: list[int]
    spreads: list[Spread]
    runs: list[list[float]]  # single runs of a group of several, drawn thin


@dataclass(frozen=True)
class _Panel:
    title: str
    lines: list[_Line]


def _panels(
    groups: Sequence[RunGroup],
    key: Group,
    epochs: Sequence[int],
    comparison: Sequence[EpochComparison] | None,
) -> list[_Panel]:
    """Drift vs reference, localization and (two single runs) map similarity: panels with data."""
    key = MapKey(*key)
    wanted = [
        *((DRIFT, drift_stat(m, REF)) for m in ("spearman", "topk_iou", "js")),
        *((LOCALIZATION, score) for score in LOCALIZATION_SCORES),
    ]
    panels = []
    for kind, stat in wanted:
        title = stat_title(kind, stat)
        scalar = ScalarKey(kind, key, stat)
        lines = []
        for group in groups:
            spreads = spread_series(group, scalar, epochs)
            runs = []
            if len(group.runs) > 1:
                runs = [[v.mean for v in spread_series(RunGroup.single(run), scalar, epochs)]
                        for run in group.runs]  # fmt: skip
            lines.append(_Line(group.name, list(epochs), spreads, runs))
        if any(s.finite for line in lines for s in line.spreads):
            panels.append(_Panel(title, lines))
    if comparison is not None:
        between = [
            _Line(
                measure,
                [r.epoch for r in comparison],
                [Spread.of([r.similarity.get(measure, (math.nan, 0))[0]]) for r in comparison],
                [],
            )
            for measure in ("spearman", "topk_iou")
        ]
        if any(s.finite for line in between for s in line.spreads):
            names = " vs ".join(g.name for g in groups)
            panels.append(_Panel(f"{names}: map similarity (1 = same)", between))
    return panels


def _figure_png(matplotlib_classes: tuple[Any, Any, Any], panels: Sequence[_Panel]) -> bytes:
    """One PNG with a small line chart per panel, three to a row: each group's mean, its
    min-max band and its single runs (thin) when it has several."""
    figure_class, canvas_class, integer_locator = matplotlib_classes
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = figure_class(figsize=(4.4 * columns, 3.0 * rows), dpi=80)
    # Fixed margins: constrained layout costs more than drawing these small charts.
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.12 / rows, top=1 - 0.08 / rows)
    figure.subplots_adjust(wspace=0.25, hspace=0.45)
    canvas_class(figure)
    markers = ["o", "s", "^", "D", "v", "P"]
    for number, panel in enumerate(panels):
        axes = figure.add_subplot(rows, columns, number + 1)
        for index, line in enumerate(panel.lines):
            colour = f"C{index}"
            marker = markers[index % len(markers)]
            means = [s.mean for s in line.spreads]
            label = line.label
            if line.runs:
                low, high = [s.low for s in line.spreads], [s.high for s in line.spreads]
                axes.fill_between(line.epochs, low, high, color=colour, alpha=0.18, linewidth=0)
                for values in line.runs:
                    axes.plot(line.epochs, values, color=colour, alpha=0.45, linewidth=0.7)
                label = f"{label} (mean, min-max of {len(line.runs)})"
            axes.plot(line.epochs, means, color=colour, marker=marker, markersize=4, label=label)
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


def _captions(
    evaluation: Evaluation, probe: str, labels: np.ndarray | None, height: int, width: int
) -> list[str] | None:
    """Tile captions of one probe, by class name when the history stores class names and they
    fit the tiles: a classifier's predicted and true class; a segmentation probe's class each map
    explains and its IoU on the image (else the share of its pixels predicted as it), as the
    dashboard's captions. None without logits or a segmentation record."""
    segmentation = evaluation.segmentation.get(probe)
    explained = evaluation.targets.get(probe)
    names = evaluation.class_names
    if segmentation is not None and explained is not None and segmentation.share is not None:
        iou = None if segmentation.iou is None else segmentation.iou.tolist()
        candidates = segment_caption_choices(
            explained.tolist(), iou, segmentation.share.tolist(), names
        )
        return choose_captions(candidates, height, width, _TILE)
    predicted = predictions(evaluation, probe)
    if predicted is None:
        return None
    true = labels.tolist() if labels is not None and len(labels) == len(predicted) else None
    candidates = caption_choices(predicted.tolist(), true, names)
    return choose_captions(candidates, height, width, _TILE)


def _regions(
    evaluation: Evaluation, probe: str, record: ProbeRecord | None, count: int
) -> torch.Tensor | None:
    """What the report outlines on each tile: the pixels labelled with the class each map
    explains (a probe with label maps), else the probe's masks; None without either."""
    if record is None:
        return None
    label_maps, explained = record.label_maps.get(probe), evaluation.targets.get(probe)
    if label_maps is not None and explained is not None and len(explained) == count:
        regions = label_maps == np.asarray(explained)[:, None, None]
    else:
        regions = record.masks.get(probe)
    if regions is None or regions.shape[0] != count:
        return None
    return torch.from_numpy(np.ascontiguousarray(regions, dtype=bool))


def _grid_jpeg(run: Run, probe_record: ProbeRecord | None, group: Group, epoch: int) -> bytes:
    """Overlay grid of one run's maps at ``epoch`` as a small JPEG (about square, 64 px tiles);
    maps alone when the probe images are missing. Pixel-level maps are drawn on their own, and
    signed ones (integrated gradients, guided backprop, ...) in the dashboard's diverging
    colours: min-max would paint zero attribution as a mid heat."""
    evaluation = run.by_epoch[epoch]
    maps = torch.from_numpy(evaluation.maps[group])
    probe = group.probe
    count = maps.shape[0]
    nrow = max(1, math.ceil(math.sqrt(count)))
    labels = evaluation.labels.get(probe)
    if labels is None and probe_record is not None:
        labels = probe_record.labels.get(probe)
    inputs = None if probe_record is None else probe_record.inputs.get(probe)
    if inputs is not None and inputs.shape[0] != count:
        inputs = None
    height, width = (inputs if inputs is not None else evaluation.maps[group]).shape[-2:]
    captions = _captions(evaluation, probe, labels, int(height), int(width))
    if captions is not None and len(captions) != count:
        captions = None
    if group.method in PIXEL_METHODS:
        signed = group.method in SIGNED_METHODS
        grid = make_map_grid(maps, signed=signed, captions=captions, nrow=nrow, min_tile=_TILE)
        return to_jpeg_bytes(grid, _JPEG_QUALITY)
    if inputs is not None:
        regions = _regions(evaluation, probe, probe_record, count)
        if regions is not None and regions.shape[-2:] != inputs.shape[-2:]:
            regions = None
        try:
            grid = make_overlay_grid(
                torch.from_numpy(inputs), maps, captions=captions, nrow=nrow, min_tile=_TILE,
                regions=regions,
            )  # fmt: skip
            return to_jpeg_bytes(grid, _JPEG_QUALITY)
        except ValueError:
            pass  # e.g. inputs that are not 1- or 3-channel images: show the maps alone
    grid = make_map_grid(maps, signed=False, captions=captions, nrow=nrow, min_tile=_TILE)
    return to_jpeg_bytes(grid, _JPEG_QUALITY)


def _overlays(groups: Sequence[RunGroup], keys: Sequence[Group], epochs: Sequence[int]) -> str:
    """Overlay grids per (probe, layer, method): a row per epoch, a column per group (its first
    run)."""
    several = any(len(group.runs) > 1 for group in groups)
    lines = [
        "<h2 id='overlays'>Overlays</h2>",
        f"<p>CAMs at epochs {_e(', '.join(map(str, epochs)))}, min-max normalised per image; "
        "captions: ok/x, p: predicted, t: true class (segmentation: the class a map explains, "
        "with its IoU on the image where label maps exist, else the share of the pixels "
        "predicted as it); white outlines: the probe's masks, or the pixels labelled with the "
        "class each map explains"
        + ("; for a group of several runs, its first run is shown" if several else "")
        + ".</p>",
    ]
    heads = "".join(
        f"<th>{_e(g.name)}"
        + (f"<br><small>{_e(g.runs[0].name)}</small>" if several else "")
        + "</th>"
        for g in groups
    )
    for key in keys:
        title = " / ".join(key)
        shown = [group.runs[0] for group in groups]
        record = next(
            (r.probe for r in shown if r.probe is not None and key.probe in r.probe.inputs),
            None,
        )
        if key.method in PIXEL_METHODS:
            what = "maps on their own" + (
                " (blue: negative, white: 0, red: positive; each scaled to its largest |value|)"
                if key.method in SIGNED_METHODS
                else ""
            )
        elif record is not None:
            what = "CAMs over the probe images"
        else:
            what = "CAMs alone (no probe.npz images)"
        lines.append(f"<h3>{_e(title)}: {what}</h3>")
        lines.append(f"<table class='overlays'><tr><th style='width:4em'>epoch</th>{heads}</tr>")
        for epoch in epochs:
            cells = []
            for run in shown:
                evaluation = run.by_epoch.get(epoch)
                if evaluation is None or key not in evaluation.maps:
                    cells.append("<td class='overlay'>no maps</td>")
                    continue
                jpeg = _grid_jpeg(run, record, key, epoch)
                cells.append(
                    f"<td class='overlay'>{_img(jpeg, f'{run.name} epoch {epoch}', 'jpeg')}</td>"
                )
            lines.append(f"<tr><td>{epoch}</td>{''.join(cells)}</tr>")
        lines.append("</table>")
    return "\n".join(lines)
