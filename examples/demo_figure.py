"""Draw the README's demo figure: target-domain localization and drift of two runs over epochs.

Reads the CamMonitor histories that ``make demo`` writes and plots, for the target probe and
Grad-CAM, the energy inside the shape mask and the drift from the first evaluation at the last
conv layer, and the energy at the earlier one (the two layers tell different stories)::

    python examples/demo_figure.py demo_runs/source_only demo_runs/dann --out figure.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cam_monitor.compare import Run, load_run, scalar_series
from cam_monitor.report import require_matplotlib
from cam_monitor.schema import MapKey, ScalarKey

#: (layer, scalar kind, statistic, panel title)
PANELS: tuple[tuple[str, str, str, str], ...] = (
    ("features.conv4", "cam_loc", "energy", "conv4: CAM energy inside the shape"),
    ("features.conv4", "cam_loc", "pointing", "conv4: pointing-game hit rate"),
    ("features.conv4", "cam_drift", "spearman_ref", "conv4: drift from init (1 - Spearman)"),
    ("features.conv2", "cam_loc", "energy", "conv2: CAM energy inside the shape"),
)


def series(run: Run, probe: str, layer: str, kind: str, stat: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of one logged scalar over a run's evaluations; NaN where missing."""
    return scalar_series(run, ScalarKey(kind, MapKey(probe, layer, "gradcam"), stat))


def draw(runs: Sequence[Run], probe: str, out: Path) -> Path:
    """One row of line charts, one line per run; written as PNG to `out`."""
    figure_class, canvas_class, integer_locator = require_matplotlib()
    figure = figure_class(figsize=(4.0 * len(PANELS), 3.1), dpi=100)
    canvas_class(figure)
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.16, top=0.82, wspace=0.25)
    figure.suptitle(f"Grad-CAM on {probe}-domain probes, {' vs '.join(r.name for r in runs)}")
    for number, (layer, kind, stat, title) in enumerate(PANELS):
        axes = figure.add_subplot(1, len(PANELS), number + 1)
        for run in runs:
            axes.plot(*series(run, probe, layer, kind, stat), marker="o", label=run.name)
        axes.set_title(f"{probe}: {title}", fontsize=9)
        axes.set_xlabel("epoch", fontsize=8)
        axes.xaxis.set_major_locator(integer_locator(integer=True))
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
        if number == 0:
            axes.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (or their cam_monitor/)")
    parser.add_argument("--probe", default="target", help="probe set to plot (default: target)")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    runs = [load_run(path) for path in args.runs]
    print(f"wrote {draw(runs, args.probe, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
