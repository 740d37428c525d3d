"""The HTML view of a comparison of two runs: tables, curves and overlay grids in one file.

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
    EpochComparison,
    Group,
    ReportError,
    Run,
    check_probes,
    common,
    common_epochs,
    compare_group,
    format_number,
    overlay_epochs,
    scalar_series,
)
from .history import ProbeRecord
from .render import caption_text, make_map_grid, make_overlay_grid, to_jpeg_bytes
from .schema import DRIFT, LOCALIZATION, LOCALIZATION_SCORES, REF, MapKey, ScalarKey, drift_stat

__all__ = ["require_matplotlib", "write_report"]

_REPORT_HINT = "the HTML report needs matplotlib: pip install cam-monitor[report]"


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
    groups = common(a.groups, b.groups) if groups is None else [MapKey(*g) for g in groups]
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


def _anchor(group: Group) -> str:
    """An HTML id for a group: letters and digits kept, anything else as -hex-."""
    return "g-" + "".join(
        c if c.isascii() and c.isalnum() else f"-{ord(c):x}-" for c in group.encoded
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
            f"<td>{format_number(row.similarity[m][0]) if m in row.similarity else '-'}</td>"
            for m in SIMILARITIES
        )
        for score in scores:
            cells += f"<td>{format_number(row.localization_a.get(score))}</td>"
            cells += f"<td>{format_number(row.localization_b.get(score))}</td>"
        left_out = max((n for _, n in row.similarity.values()), default=0)
        note = row.note or (f"{left_out} of {row.images} images undefined" if left_out else "")
        lines.append(f"<tr><td>{row.epoch}</td>{cells}<td class='l'>{_e(note)}</td></tr>")
    lines.append("</table>")
    return "\n".join(lines)


@dataclass(frozen=True)
class _Panel:
    title: str
    lines: list[tuple[str, list[int], list[float]]]


def _panels(a: Run, b: Run, group: Group, rows: Sequence[EpochComparison]) -> list[_Panel]:
    """Drift vs reference, localization and between-run similarity: panels with data only."""
    wanted = [
        (DRIFT, drift_stat("spearman", REF), "drift vs first evaluation: 1 - spearman"),
        (DRIFT, drift_stat("topk_iou", REF), "drift vs first evaluation: 1 - top-k IoU"),
        (DRIFT, drift_stat("js", REF), "drift vs first evaluation: JS divergence"),
        (LOCALIZATION, "energy", "localization: energy inside mask"),
        (LOCALIZATION, "pointing", "localization: pointing game"),
        (LOCALIZATION, "mask_iou", "localization: top-k IoU with mask"),
    ]
    panels = []
    for kind, stat, title in wanted:
        key = ScalarKey(kind, group, stat)
        lines = [(run.name, *scalar_series(run, key)) for run in (a, b)]
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
    probe = group.probe
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
    probe_record = a.probe if a.probe is not None and group.probe in a.probe.inputs else b.probe
    has_images = probe_record is not None and group.probe in probe_record.inputs
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
