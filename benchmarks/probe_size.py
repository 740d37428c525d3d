"""Issue 26's measurements: what one monitor evaluation holds in memory, draws and stores, by
probe size and `batch_size`.

Each row is `--evaluations` evaluations (default 3) in a fresh process, as the callback runs
them without Lightning: `run_evaluation` (CAMs, grids), the drift tracker's scoring (from the
second on, drift against the previous and the reference maps; from the third on, the tracker
holds both beside the new maps, as in a long run), the history record and its write.
The model is torchvision's `resnet18(weights=None)` at 64 px, 10 classes, the issue's 16 conv
layers (``layer*.*.conv*``) x 3 methods (gradcam, gradcam++, layercam). Reported:

- `peak RSS`: the process's peak resident memory (`ru_maxrss`) minus its RSS once the model and
  probe are built (so the row is the evaluations' own peak), in MiB;
- `history`: the evaluation's record (`Evaluation.nbytes`) and its file on disk, in MiB;
- `grid`: the largest grid's size in pixels (the bound is `max_tiles`);
- `seconds`: wall time of the last evaluation (one run; for orientation, not a benchmark).

Run: ``python benchmarks/probe_size.py [--rows 32:none,512:32] [--reps 3] [--out F.md]``.
Nothing here asserts a number.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cam_monitor.drift import AttentionTracker
from cam_monitor.evaluation import run_evaluation
from cam_monitor.history import evaluation_path, evaluation_record, write_evaluation
from cam_monitor.options import DriftOptions, EngineOptions, RenderOptions
from cam_monitor.probe import ProbeSet, content_hash
from cam_monitor.sinks import scalar_tags

LAYERS = "layer*.*.conv*"
METHODS = ("gradcam", "gradcam++", "layercam")


def rss_mib() -> float:
    """The current resident set size, in MiB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def one_evaluation(
    size: int,
    batch_size: int | None,
    max_tiles: int | None = 32,
    methods: tuple[str, ...] = METHODS,
    history_maps: str = "all",
    image: int = 64,
    evaluations: int = 3,
) -> dict[str, Any]:
    """`evaluations` evaluations of a `size`-image probe, in this process; their costs."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(size, 3, image, image)
    probe = ProbeSet("probe", x, torch.arange(size) % 10, None, content_hash(x))
    engine = EngineOptions(methods=methods, batch_size=batch_size)
    tracker = AttentionTracker(DriftOptions())
    before = rss_mib()
    render = RenderOptions(max_tiles=max_tiles)
    with tempfile.TemporaryDirectory() as folder:
        for index in range(evaluations):  # nothing of one outlives it, as in the callback
            start = time.perf_counter()
            output = run_evaluation(model, {"probe": probe}, [LAYERS], engine, render)
            scalars, _ = tracker.score(output.results, {"probe": probe}, batch_size=batch_size)
            record = evaluation_record(
                index, index, index, {"probe": probe}, output.results, scalar_tags(scalars),
                maps=history_maps,
            )  # fmt: skip
            write_evaluation(folder, record)
            on_disk = evaluation_path(folder, index).stat().st_size
            seconds = time.perf_counter() - start
            maps, nbytes = len(output.results["probe"].maps), record.nbytes
            largest = max(output.images.values(), key=lambda grid: grid.shape[-1] * grid.shape[-2])
            grid = f"{largest.shape[-1]} x {largest.shape[-2]}"
            del output, scalars, record, largest
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "probe": size,
        "batch_size": batch_size,
        "max_tiles": max_tiles,
        "methods": " / ".join(methods),
        "history_maps": history_maps,
        "evaluations": evaluations,
        "maps": maps,
        "peak_rss_mib": round(peak - before, 1),
        "history_record_mib": round(nbytes / 2**20, 2),
        "history_file_mib": round(on_disk / 2**20, 2),
        "grid_px": grid,
        "seconds": round(seconds, 1),
    }


def _row(spec: str) -> tuple[Any, ...]:
    """A row's arguments from `probe:batch_size[:max_tiles[:methods[:history_maps]]]`."""
    parts = spec.split(":")

    def number(text: str) -> int | None:
        return None if text == "none" else int(text)

    size, batch = int(parts[0]), number(parts[1])
    max_tiles = number(parts[2]) if len(parts) > 2 else 32
    methods = tuple(parts[3].split("+")) if len(parts) > 3 else METHODS
    history_maps = parts[4] if len(parts) > 4 else "all"
    return size, batch, max_tiles, methods, history_maps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows",
        default="32:none,32:32,512:none,512:32,512:32:none",
        help="probe:batch_size[:max_tiles[:methods[:history_maps]]] rows, comma separated "
        "(methods joined by +; 'none' for None)",
    )
    parser.add_argument("--image", type=int, default=64, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--evaluations", type=int, default=3, help="evaluations per process (drift from the 2nd)"
    )
    parser.add_argument("--reps", type=int, default=1, help="processes per row; median RSS")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 tiny rows")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one row's spec, printed as JSON
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rows, args.image, args.reps = "4:none:2,4:2:2:gradcam:cams", 32, 1
    if args.child:
        row = one_evaluation(*_row(args.child), image=args.image, evaluations=args.evaluations)
        print(json.dumps(row))
        return 0
    rows = []
    for spec in args.rows.split(","):
        reps = []
        for _ in range(args.reps):
            command = [sys.executable, __file__, "--child", spec]
            command += ["--image", str(args.image), "--threads", str(args.threads)]
            command += ["--evaluations", str(args.evaluations)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            reps.append(json.loads(done.stdout.strip().splitlines()[-1]))
        peaks = sorted(rep["peak_rss_mib"] for rep in reps)
        row = {**reps[0], "peak_rss_mib": peaks[len(peaks) // 2]}
        row["rss_range_mib"] = f"{peaks[0]}-{peaks[-1]}"
        rows.append(row)
        print(row, file=sys.stderr)
    headers = list(rows[0])
    lines = [
        f"resnet18 at {args.image} px, {LAYERS} (16 layers) x {', '.join(METHODS)}; "
        f"{args.threads} torch thread(s); torch {torch.__version__}",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(str(row[h]) for h in headers) + " |" for row in rows),
    ]
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
