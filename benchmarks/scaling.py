"""How the monitor's cost grows with the probe size, the number of layers and of methods.

On the DANN demo's model (32x32 images), three sweeps around the demo's setting (2 layers,
Grad-CAM + Grad-CAM++, one probe set):

- images: 8 to 256 probe images;
- layers: 1 to 8 layers (features.conv4, conv2, conv3, conv1, then relu4 ... relu1);
- methods: 1 to 5 (gradcam, gradcam++, xgradcam, layercam, hirescam) on 32 images.

Two clocks per point, each interleaved over all points within a repetition:

- `engine`: one `compute_cams` call (forward, backward, formulas);
- `evaluation`: one real monitor evaluation inside a one-step Lightning fit: its own
  `cam_monitor/seconds` (compute, drawing, scoring) and the wall time of its epoch-end hook
  (history and PNG writing included).

The engine should be linear in images and almost flat in layers and methods; drawing one grid
per layer and method makes the full evaluation grow with layers x methods.

    python benchmarks/scaling.py --threads 2
    python benchmarks/scaling.py --quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import dann_shapes
import harness
from overhead import Stopwatch, bracketed_seconds, quiet_lightning

from cam_monitor import compute_cams
from cam_monitor.history import read_history

LAYERS: tuple[str, ...] = (
    "features.conv4",
    "features.conv2",
    "features.conv3",
    "features.conv1",
    "features.relu4",
    "features.relu3",
    "features.relu2",
    "features.relu1",
)
METHODS: tuple[str, ...] = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")
KW: dict[str, Any] = {"output_transform": 0}  # the DANN model returns (class, domain) logits


@dataclass(frozen=True)
class Point:
    """One configuration of a sweep."""

    sweep: str
    images: int
    layers: int
    methods: int

    @property
    def label(self) -> str:
        """Short name for progress lines."""
        return f"{self.sweep}:{self.images}/{self.layers}/{self.methods}"


def sweep_points(images: Sequence[int], max_layers: int, base_images: int) -> list[Point]:
    """The three sweeps, each around the demo's 2 layers x 2 methods."""
    points = [Point("images", n, 2, 2) for n in images]
    points += [Point("layers", base_images, k, 2) for k in range(1, max_layers + 1)]
    points += [Point("methods", base_images, 2, m) for m in range(1, len(METHODS) + 1)]
    return points


def time_engine(
    points: Sequence[Point],
    module: torch.nn.Module,
    inputs: Tensor,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[Point, list[float]]:
    """Seconds of one `compute_cams` call per point, interleaved over the points."""

    def call(p: Point) -> Any:
        return lambda: compute_cams(
            module, inputs[: p.images], list(LAYERS[: p.layers]), METHODS[: p.methods], **KW
        )

    seconds, _ = harness.interleaved(
        {p: call(p) for p in points}, args.reps, args.warmup, device, progress=False
    )
    return seconds


def one_evaluation(
    p: Point,
    args: argparse.Namespace,
    probe: tuple[Tensor, Tensor, Tensor],
    loader: Any,
    folder: Path,
) -> tuple[float, float]:
    """A one-step fit with the monitor; the epoch-end evaluation's own and hook seconds."""
    pl.seed_everything(args.seed, verbose=False)
    module = dann_shapes.build_module(True, args.seed)
    x, y, masks = probe
    monitor = dann_shapes.build_monitor(
        p.images,
        args.seed,
        probe={"source": (x[: p.images], y[: p.images])},
        masks={"source": masks[: p.images]},
        layer=list(LAYERS[: p.layers]),
        methods=list(METHODS[: p.methods]),
        every_n_epochs=1,
        save_dir=folder,
    )
    marks: list[tuple[str, str, float]] = []
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        logger=False,
        callbacks=[Stopwatch(marks, "open"), monitor, Stopwatch(marks, "close")],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader)
    wall = bracketed_seconds(marks).get("epoch_end", [float("nan")])[-1]
    history = read_history(folder)
    own = history[-1].scalars.get("cam_monitor/seconds", float("nan"))
    return own, wall


def time_evaluations(
    points: Sequence[Point],
    args: argparse.Namespace,
    probe: tuple[Tensor, Tensor, Tensor],
    loader: Any,
) -> dict[Point, tuple[list[float], list[float]]]:
    """Per point: the monitor's own seconds and the hook's wall seconds, one fit per round."""
    results: dict[Point, tuple[list[float], list[float]]] = {p: ([], []) for p in points}
    with tempfile.TemporaryDirectory(prefix="cam-scaling-") as tmp:
        for round_ in range(args.warmup + args.reps):
            start = time.perf_counter()
            for i, p in enumerate(points):
                own, wall = one_evaluation(p, args, probe, loader, Path(tmp) / f"{round_}-{i}")
                if round_ >= args.warmup:
                    results[p][0].append(own)
                    results[p][1].append(wall)
            took = time.perf_counter() - start
            print(f"  [evaluation round {round_ + 1}] {took:.0f}s", file=sys.stderr, flush=True)
    return results


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares `y = a + b x`: intercept, slope and the largest relative residual."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var
    intercept = mean_y - slope * mean_x
    worst = max(abs(y - intercept - slope * x) / y for x, y in zip(xs, ys, strict=True))
    return intercept, slope, worst


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; `--quick` runs a few small points once."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_arguments(parser, reps=5)
    parser.add_argument("--images", type=int, nargs="+", default=None, help="8 16 ... 256")
    parser.add_argument("--base-images", type=int, default=32, help="for the other sweeps (32)")
    parser.add_argument("--max-layers", type=int, default=None, help="1 to 8")
    parser.add_argument(
        "--evaluation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time real monitor evaluations (one short fit per point and repetition)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 5)
    args.images = args.images or ([8, 16, 32] if args.quick else [8, 16, 32, 64, 128, 256])
    args.max_layers = args.max_layers or (3 if args.quick else len(LAYERS))
    if args.quick:
        args.base_images = min(args.base_images, 16)
    if not 1 <= args.max_layers <= len(LAYERS):
        parser.error(f"--max-layers must be in 1..{len(LAYERS)}")
    if len(args.images) < 2 or min(args.images) < 1:
        parser.error("--images needs at least two sizes >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweeps and print one table with a summary line per sweep."""
    args = parse_args(argv)
    device = harness.setup_torch(args.device, args.threads)
    quiet_lightning()
    info = harness.print_header(
        "CamMonitor cost against probe size, layers and methods",
        device,
        {
            "model": "examples/dann_shapes.py (DANN), 32x32 inputs",
            "reps": f"{args.reps} timed (median), {args.warmup} warm-up, points interleaved",
        },
    )
    largest = max(*args.images, args.base_images)
    probes, masks = dann_shapes.build_probes(largest, args.seed)
    x, y = probes["source"]
    module = dann_shapes.build_module(True, args.seed).to(device)
    points = sweep_points(args.images, args.max_layers, args.base_images)
    print("engine ...", file=sys.stderr, flush=True)
    engine = time_engine(points, module, x.to(device), args, device)
    evaluations: dict[Point, tuple[list[float], list[float]]] = {}
    if args.evaluation:
        print("monitor evaluations ...", file=sys.stderr, flush=True)
        loader, _ = dann_shapes.build_loaders(8, 1, args.seed)
        evaluations = time_evaluations(points, args, (x, y, masks["source"]), loader)
    rows = []
    for p in points:
        own, wall = evaluations.get(p, ([], []))
        rows.append(
            {
                **asdict(p),
                "engine_s": harness.median(engine[p]),
                "engine_spread": harness.spread(engine[p]),
                "evaluation_s": harness.median(own),
                "evaluation_wall_s": harness.median(wall),
            }
        )
    print_report(rows)
    harness.write_json(args.json, {"machine": info, "args": vars(args), "rows": rows})
    return 0


def print_report(rows: Sequence[dict[str, Any]]) -> None:
    """One table, then the fit in images and the flatness in layers and methods."""
    first = {}
    for row in rows:
        first.setdefault(row["sweep"], row)
    headers = [
        "sweep",
        "images",
        "layers",
        "methods",
        "engine s",
        "engine ms/image",
        "engine x first",
        "cam_monitor/seconds",
        "eval wall s",
        "eval x first",
    ]
    table = []
    for row in rows:
        base = first[row["sweep"]]
        table.append(
            [
                row["sweep"],
                row["images"],
                row["layers"],
                row["methods"],
                row["engine_s"],
                1000 * row["engine_s"] / row["images"],
                row["engine_s"] / base["engine_s"],
                row["evaluation_s"],
                row["evaluation_wall_s"],
                row["evaluation_wall_s"] / base["evaluation_wall_s"],
            ]
        )
    print(harness.markdown_table(headers, table))
    print()
    sizes = [r for r in rows if r["sweep"] == "images"]
    xs = [float(r["images"]) for r in sizes]
    for key, name in (("engine_s", "engine"), ("evaluation_wall_s", "evaluation")):
        ys = [r[key] for r in sizes]
        if any(v != v for v in ys):  # NaN: not measured
            continue
        a, b, worst = linear_fit(xs, ys)
        print(
            f"- {name} vs images: {a:.4f} s + {1000 * b:.3f} ms/image; largest deviation from "
            f"the line {100 * worst:.1f}%."
        )
    for sweep in ("layers", "methods"):
        part = [r for r in rows if r["sweep"] == sweep]
        lo, hi = part[0], part[-1]
        print(
            f"- {sweep} {lo[sweep]} -> {hi[sweep]}: engine x{hi['engine_s'] / lo['engine_s']:.2f}"
            + (
                f", evaluation x{hi['evaluation_wall_s'] / lo['evaluation_wall_s']:.2f}"
                if hi["evaluation_wall_s"] == hi["evaluation_wall_s"]
                else ""
            )
        )


if __name__ == "__main__":
    sys.exit(main())
