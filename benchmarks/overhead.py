"""What CamMonitor costs a real fit: the DANN demo's model, with and without the monitor.

Three arms, alternated within every repetition (plain, monitor, idle, plain, ...), each a fresh
model fitted for one epoch of `--steps` steps at the demo's batch size:

- `plain`: no monitor;
- `monitor`: the demo's monitor (2 probe sets x 16 images, 2 layers, 2 methods) every epoch;
- `idle`: the same monitor with `every_n_epochs=1000`, so it never fires between its baseline
  and the final model's evaluation at the end of fit.

Checkpointing, progress bars and the model summary are off in every arm, and so is the logger
unless `--logger tensorboard` gives every arm one (the monitor then writes its grids and
scalars there instead of PNG files and a CSV). Reported: the
median fit wall time and its ratio to `plain`, the monitor's own `cam_monitor/seconds` (compute,
drawing and scoring, from its history files), and the wall time spent inside its hooks
(measured by two stopwatch callbacks placed around it, so history and PNG writing count too).

With `--setup issue14`, the fit is issue 14's CPU setup instead (resnet18, 224 px, a 16-image
probe, 2 layers x 2 methods, TensorBoardLogger, 1 torch thread; see evaluation_cost.py): the fit
cost of one evaluation against `compute_cams` on the same probe, with TensorBoard's pure-Python
CRC32C and with `crc32c`, and one evaluation timed piece by piece.

    python benchmarks/overhead.py --threads 2
    python benchmarks/overhead.py --setup issue14
    python benchmarks/overhead.py --quick
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import dann_shapes
import evaluation_cost
import harness

from cam_monitor.history import read_history

ARMS: tuple[str, ...] = ("plain", "monitor", "idle")
IDLE_EVERY = 1000


class Stopwatch(pl.Callback):
    """Two of these around another callback time its train-start, epoch-end and train-end hooks.

    Lightning calls callbacks in list order, so `[Stopwatch(marks, "open"), monitor,
    Stopwatch(marks, "close")]` brackets everything the monitor does in those hooks.
    """

    def __init__(self, marks: list[tuple[str, str, float]], edge: str) -> None:
        self.marks = marks
        self.edge = edge

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marks.append(("train_start", self.edge, time.perf_counter()))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marks.append(("epoch_end", self.edge, time.perf_counter()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marks.append(("train_end", self.edge, time.perf_counter()))


def bracketed_seconds(marks: Sequence[tuple[str, str, float]]) -> dict[str, list[float]]:
    """Seconds between each `open` mark and the `close` mark that follows it, per hook."""
    spans: dict[str, list[float]] = {}
    opened: dict[str, float] = {}
    for hook, edge, when in marks:
        if edge == "open":
            opened[hook] = when
        elif hook in opened:
            spans.setdefault(hook, []).append(when - opened.pop(hook))
    return spans


def quiet_lightning() -> None:
    """Silence Lightning's banner lines and the warnings every arm shares."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (
        ".*does not have many workers.*",
        ".*the Trainer has no logger.*",
        ".*You defined a `validation_step` but have no `val_dataloader`.*",
        ".*`training_step` returned `None`.*",
        ".*The number of training batches.*is smaller than the logging interval.*",
        ".*isinstance\\(treespec, LeafSpec\\).*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def fit_once(
    arm: str,
    args: argparse.Namespace,
    loaders: tuple[Any, Any],
    workdir: Path,
    run: int,
) -> dict[str, Any]:
    """Fit one fresh model for one epoch in `arm`; wall time and what the monitor reports."""
    pl.seed_everything(args.seed, workers=True, verbose=False)
    module = dann_shapes.build_module(args.adapt, args.seed)
    marks: list[tuple[str, str, float]] = []
    callbacks: list[pl.Callback] = []
    folder = workdir / f"{arm}-{run}"
    monitor = None
    if arm != "plain":
        every = 1 if arm == "monitor" else IDLE_EVERY
        monitor = dann_shapes.build_monitor(
            args.num_probe, args.seed, every_n_epochs=every, save_dir=folder
        )
        callbacks = [Stopwatch(marks, "open"), monitor, Stopwatch(marks, "close")]
    logger: Any = False
    if args.logger == "tensorboard":
        logger = TensorBoardLogger(folder / "tb", name="", version="")
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=None if args.val else 0,
    )
    train_loader, val_loader = loaders
    harness.synchronize(torch.device(args.device))
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader if args.val else None)
    harness.synchronize(torch.device(args.device))
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"arm": arm, "fit_s": seconds, "evaluations": 0}
    if monitor is not None:
        spans = bracketed_seconds(marks)
        history = read_history(folder) if monitor.evaluations else []
        result.update(
            evaluations=monitor.evaluations,
            monitor_s=[ev.scalars.get("cam_monitor/seconds", float("nan")) for ev in history],
            hook_s=spans,
        )
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; `--quick` shrinks the epoch for a smoke check."""
    demo = dann_shapes.parse_args([])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_arguments(parser, reps=5)
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (200)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help=f"per domain (demo: {demo.batch_size})"
    )
    parser.add_argument("--num-probe", type=int, default=16, help="images per probe set (16)")
    parser.add_argument(
        "--adapt", action=argparse.BooleanOptionalAction, default=True, help="DANN (default)"
    )
    parser.add_argument("--val", action="store_true", help="also run the demo's validation")
    parser.add_argument(
        "--logger",
        choices=["none", "tensorboard"],
        default="none",
        help="none: PNG files + scalars.csv (default); tensorboard: a TensorBoardLogger per fit",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--setup",
        choices=["demo", "issue14"],
        default="demo",
        help="demo: the DANN demo's fit (default); issue14: resnet18 at 224 px, 1 torch thread, "
        "fit cost per evaluation against compute_cams, CRC arms and a breakdown",
    )
    parser.add_argument("--epochs", type=int, default=None, help="issue14 only (3)")
    args = parser.parse_args(argv)
    if args.setup == "issue14":
        return args
    args.reps = args.reps or (1 if args.quick else 5)
    args.steps = args.steps or (5 if args.quick else 200)
    args.batch_size = args.batch_size or (8 if args.quick else demo.batch_size)
    if min(args.reps, args.steps, args.batch_size, args.num_probe) < 1 or args.warmup < 0:
        parser.error("--reps, --steps, --batch-size and --num-probe must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Alternate the arms, then print the table and the derived overheads."""
    args = parse_args(argv)
    if args.setup == "issue14":
        return issue14(args)
    device = harness.setup_torch(args.device, args.threads)
    quiet_lightning()
    info = harness.print_header(
        "CamMonitor overhead on a DANN fit",
        device,
        {
            "model": f"examples/dann_shapes.py ({'DANN' if args.adapt else 'source only'})",
            "epoch": f"{args.steps} steps, batch {args.batch_size} per domain"
            + (", with validation" if args.val else ", no validation"),
            "logger": args.logger,
            "monitor": f"2 probe sets x {args.num_probe} images, layers "
            f"{list(dann_shapes.CAM_LAYERS)}, methods {list(dann_shapes.CAM_METHODS)}",
            "reps": f"{args.reps} timed (median), {args.warmup} warm-up, arms alternated",
        },
    )
    loaders = dann_shapes.build_loaders(args.batch_size, args.steps, args.seed)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cam-overhead-") as tmp:
        for round_ in range(args.warmup + args.reps):
            for arm in ARMS:
                result = fit_once(arm, args, loaders, Path(tmp), round_)
                result["timed"] = round_ >= args.warmup
                runs.append(result)
            done = ", ".join(f"{r['arm']} {r['fit_s']:.1f}s" for r in runs[-len(ARMS) :])
            print(f"  [round {round_ + 1}] {done}", file=sys.stderr, flush=True)
    rows = summarize(runs)
    print_report(rows, args)
    harness.write_json(args.json, {"machine": info, "args": vars(args), "rows": rows, "runs": runs})
    return 0


def issue14(args: argparse.Namespace) -> int:
    """Issue 14's CPU setup: fit cost per evaluation, compute_cams, CRC arms, breakdown."""
    device = harness.setup_torch(args.device, 1 if args.threads is None else args.threads)
    quiet_lightning()
    setup = evaluation_cost.CPU_SETUP
    if args.quick:
        setup = evaluation_cost.quick(setup)
    given = {"steps": args.steps, "batch_size": args.batch_size, "epochs": args.epochs}
    setup = replace(setup, **{k: v for k, v in given.items() if v is not None})
    if args.num_probe != 16:
        setup = replace(setup, num_probe=args.num_probe)
    reps = args.reps or (1 if args.quick else 3)
    warmup = 0 if args.quick else args.warmup
    versions = harness.package_versions(["crc32c", "tensorboard", "opencv-python-headless"])
    info = harness.print_header(
        "Issue 14: what one evaluation costs a fit, against compute_cams",
        device,
        {
            "setup": setup.describe(),
            "packages": ", ".join(f"{k} {v}" for k, v in versions.items()),
            "reps": f"{reps} timed (median), {warmup} warm-up, arms alternated",
        },
    )
    payload = evaluation_cost.measure(setup, device, reps, warmup)
    harness.write_json(args.json, {"machine": info, "args": vars(args), **payload})
    return 0


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per arm over the timed runs."""
    timed = [r for r in runs if r["timed"]]
    plain = harness.median([r["fit_s"] for r in timed if r["arm"] == "plain"])
    rows = []
    for arm in ARMS:
        mine = [r for r in timed if r["arm"] == arm]
        fits = [r["fit_s"] for r in mine]
        per_eval = [s for r in mine for s in r.get("monitor_s", [])]
        start = [s for r in mine for s in r.get("hook_s", {}).get("train_start", [])]
        end = [s for r in mine for s in r.get("hook_s", {}).get("epoch_end", [])]
        in_hooks = [sum(sum(v) for v in r.get("hook_s", {}).values()) for r in mine]
        rows.append(
            {
                "arm": arm,
                "fit_s": harness.median(fits),
                "spread": harness.spread(fits),
                "ratio": harness.median(fits) / plain,
                "evaluations": mine[0]["evaluations"] if mine else 0,
                "cam_monitor_seconds": harness.median(per_eval) if per_eval else None,
                "train_start_hook_s": harness.median(start) if start else None,
                "epoch_end_hook_s": harness.median(end) if end else None,
                "in_hooks_s": harness.median(in_hooks) if arm != "plain" else None,
            }
        )
    return rows


def print_report(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> None:
    """The arm table and the overheads it implies."""
    headers = [
        "arm",
        "fit s (median)",
        "spread",
        "x plain",
        "evaluations",
        "cam_monitor/seconds per eval",
        "on_train_start s",
        "on_train_epoch_end s",
        "in monitor hooks s",
    ]
    table = [
        [
            r["arm"],
            r["fit_s"],
            r["spread"],
            r["ratio"],
            r["evaluations"],
            r["cam_monitor_seconds"],
            r["train_start_hook_s"],
            r["epoch_end_hook_s"],
            r["in_hooks_s"],
        ]
        for r in rows
    ]
    print(harness.markdown_table(headers, table))
    by_arm = {r["arm"]: r for r in rows}
    plain, monitor, idle = by_arm["plain"], by_arm["monitor"], by_arm["idle"]
    print()
    if monitor["epoch_end_hook_s"] is not None:
        steady = monitor["epoch_end_hook_s"] / plain["fit_s"]
        print(
            f"- monitor every epoch: fit x{monitor['ratio']:.3f} for this one-epoch fit, which "
            f"holds two evaluations (the baseline at train start and the epoch end). In a long "
            f"run each further epoch pays one evaluation: {monitor['epoch_end_hook_s']:.3f} s "
            f"in on_train_epoch_end = {100 * steady:.2f}% of a plain epoch (target: <= 2%)."
        )
    if idle["in_hooks_s"] is not None:
        rest = (idle["fit_s"] - idle["in_hooks_s"]) / plain["fit_s"]
        print(
            f"- idle monitor (every_n_epochs={IDLE_EVERY}): fit x{idle['ratio']:.3f}. It still "
            f"runs its baseline evaluation at train start and the final model's at the end of "
            f"fit ({idle['in_hooks_s']:.3f} s in its hooks, once per fit); without them the fit "
            f"is x{rest:.3f} of plain (target: 1.00 within noise; spread of plain fits: "
            f"{100 * plain['spread']:.1f}%)."
        )
    print(
        "\nspread = (max - min) / median of the timed fits. cam_monitor/seconds is the monitor's "
        "own clock (compute, drawing, scoring); the hook columns are wall time inside its hooks, "
        "history and PNG writing included."
    )


if __name__ == "__main__":
    sys.exit(main())
