"""Issue 14's measurements: what one evaluation costs a fit, against `compute_cams`, and why.

The fit setups of issue 14 (CPU: resnet18 at 224 px, a 16-image probe, `layer3` + `layer4`,
gradcam + gradcam++, a TensorBoardLogger, one torch thread; GPU: resnet50, batch 64,
bf16-mixed, 40 steps x 3 epochs, the same monitor), fitted in three arms alternated within
each repetition:

- `plain`: the logger, no monitor;
- `monitor`: the monitor, TensorBoard's pure-Python CRC32C forced;
- `monitor+crc32c`: the monitor with `install_fast_crc()` (skipped where `crc32c` is missing).

Every fit ends in Lightning's `logger.finalize` (flush and `close()` of the event writer), so
the writer's backlog is paid inside the fit; its own seconds are reported too. Then each piece
of one evaluation is timed on its own (engine, drawing, PNG / JPEG encoding, TensorBoard writing
of the JPEG grids with either CRC, drift scoring, history write), and the monitor's in-loop
path: the grids encoded once on its encoder's threads while drift is scored. Used by
`overhead.py --setup issue14` and by `gpu_check.py`; nothing here asserts a timing.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

# -- every cam_monitor name this file times, in one place: update these after the refactor ---
from cam_monitor import CamMonitor, compute_cams, tensorboard_crc
from cam_monitor.drift import AttentionTracker
from cam_monitor.encoding import EncodedGrid, GridEncoder
from cam_monitor.engine import CamResult
from cam_monitor.evaluation import render_probe
from cam_monitor.history import Evaluation, evaluation_record, write_evaluation
from cam_monitor.options import DriftOptions, RenderOptions
from cam_monitor.probe import ProbeSet, content_hash
from cam_monitor.render import to_jpeg_bytes, to_png_bytes
from cam_monitor.schema import MapKey, image_tag
from cam_monitor.sinks import add_encoded_image, scalar_tags


def draw_grids(probe: ProbeSet, result: CamResult, setup: FitSetup) -> dict[MapKey, Tensor]:
    """The monitor's overlay grids (uint8 CHW, on the probe's device), captions included, with
    its defaults."""
    return render_probe(probe, result, RenderOptions())


def history_entry(
    index: int, probe: ProbeSet, result: CamResult, scalars: dict[Any, float]
) -> Evaluation:
    """What the monitor writes to its history for one probe (maps moved to numpy here)."""
    return evaluation_record(index, 0, 0, {probe.name: probe}, {probe.name: result}, scalars)


@contextmanager
def crc_mode(fast: bool) -> Iterator[bool]:
    """TensorBoard's writer with the C CRC32C (`fast`) or forced to its pure-Python one.

    The pure-Python arm hides the `crc32c` package from `install_fast_crc`, so it stays slow
    also where the monitor installs the fast CRC itself. Yields whether the fast one is in use.
    """
    tensorboard_crc.uninstall_fast_crc()
    try:
        if fast:
            yield tensorboard_crc.install_fast_crc()
        else:
            with mock.patch.object(tensorboard_crc, "_candidate", lambda: None):
                yield False
    finally:
        tensorboard_crc.uninstall_fast_crc()


def writer_crc() -> Callable[[bytes], int]:
    """The masked CRC32C function TensorBoard's record writer uses right now."""
    from tensorboard.summary.writer import record_writer

    return record_writer.masked_crc32c


@contextmanager
def writer_using(masked_crc32c: Callable[[bytes], int]) -> Iterator[None]:
    """TensorBoard's record writer with `masked_crc32c`, unchecked: for timing only."""
    from tensorboard.summary.writer import record_writer

    before = record_writer.masked_crc32c
    record_writer.masked_crc32c = masked_crc32c
    try:
        yield
    finally:
        record_writer.masked_crc32c = before


# -- the setups -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FitSetup:
    """A fit of issue 14: model, data, precision and the monitor's probe, layers and methods."""

    model: str = "resnet18"
    image_size: int = 224
    batch_size: int = 8
    steps: int = 3
    epochs: int = 3
    precision: str = "32-true"
    num_probe: int = 16
    layers: tuple[str, ...] = ("layer3", "layer4")
    methods: tuple[str, ...] = ("gradcam", "gradcam++")
    num_classes: int = 10
    distinct_batches: int = 4

    @property
    def monitor_layers(self) -> tuple[str, ...]:
        """Layer names inside the LightningModule (the network is its `net`)."""
        return tuple(f"net.{name}" for name in self.layers)

    @property
    def evaluations(self) -> int:
        """The baseline at train start and one per epoch end."""
        return 1 + self.epochs

    def describe(self) -> str:
        return (
            f"{self.model} (weights=None), {self.image_size} px, batch {self.batch_size}, "
            f"{self.steps} steps x {self.epochs} epochs, {self.precision}; monitor: "
            f"{self.num_probe}-image probe, {list(self.layers)}, {list(self.methods)}, every "
            "epoch, TensorBoardLogger"
        )


#: Issue 14's CPU setup (run with one torch thread); the fit is kept short, its length cancels
#: out in the difference of fits.
CPU_SETUP = FitSetup()
#: Issue 14's GPU setup.
GPU_SETUP = FitSetup(model="resnet50", batch_size=64, steps=40, epochs=3, precision="bf16-mixed")
#: Smoke-test sizes (`--quick`).
QUICK = {"image_size": 64, "batch_size": 2, "steps": 2, "epochs": 1, "num_probe": 4}

ARMS: tuple[str, ...] = ("plain", "monitor", "monitor+crc32c")


def quick(setup: FitSetup) -> FitSetup:
    """The same setup at smoke-test sizes."""
    return replace(setup, **QUICK)


class Classifier(pl.LightningModule):
    """A torchvision classifier trained with SGD on cross-entropy."""

    def __init__(self, setup: FitSetup) -> None:
        super().__init__()
        self.net = getattr(torchvision.models, setup.model)(
            weights=None, num_classes=setup.num_classes
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Batches(Dataset):
    """`steps` ready-made random batches, a few distinct ones cycled, already on the device: no
    loader cost in any arm."""

    def __init__(self, setup: FitSetup, device: torch.device, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        shape = (setup.batch_size, 3, setup.image_size, setup.image_size)
        self.steps = setup.steps
        self.batches = [
            (
                torch.randn(shape, generator=generator).to(device),
                torch.randint(0, setup.num_classes, (setup.batch_size,), generator=generator).to(
                    device
                ),
            )
            for _ in range(min(setup.distinct_batches, setup.steps))
        ]

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.batches[index % len(self.batches)]


def probe_images(setup: FitSetup, seed: int = 1) -> Tensor:
    """The fixed probe: `num_probe` random images (CPU; the monitor moves them)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(setup.num_probe, 3, setup.image_size, setup.image_size, generator=generator)


class Stopwatch(pl.Callback):
    """Two of these around the monitor time everything it does in its hooks."""

    def __init__(self, marks: list[tuple[str, float]], edge: str) -> None:
        self.marks = marks
        self.edge = edge

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marks.append((self.edge, time.perf_counter()))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marks.append((self.edge, time.perf_counter()))


class TimedTensorBoardLogger(TensorBoardLogger):
    """A TensorBoardLogger that times its `finalize` (flush and `close()` of the event writer)."""

    finalize_s: float = 0.0

    def finalize(self, status: str) -> None:
        start = time.perf_counter()
        super().finalize(status)
        self.finalize_s += time.perf_counter() - start


def fit_once(
    arm: str, setup: FitSetup, device: torch.device, folder: Path, seed: int = 0
) -> dict[str, Any]:
    """One fresh fit in `arm`; wall time (finalize included), finalize, seconds in the hooks."""
    pl.seed_everything(seed, workers=True, verbose=False)
    module = Classifier(setup)
    loader = DataLoader(Batches(setup, device, seed), batch_size=None)
    marks: list[tuple[str, float]] = []
    callbacks: list[pl.Callback] = []
    monitor = None
    if arm != "plain":
        monitor = CamMonitor(
            list(setup.monitor_layers),
            methods=list(setup.methods),
            probe=probe_images(setup),
            num_probe=setup.num_probe,
        )
        callbacks = [Stopwatch(marks, "open"), monitor, Stopwatch(marks, "close")]
    logger = TimedTensorBoardLogger(folder, name="", version="")
    trainer = pl.Trainer(
        max_epochs=setup.epochs,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=setup.precision,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    with crc_mode(fast=arm == "monitor+crc32c") as fast:
        harness.synchronize(device)
        start = time.perf_counter()
        trainer.fit(module, loader)
        harness.synchronize(device)
        seconds = time.perf_counter() - start
    hooks = sum(b[1] - a[1] for a, b in zip(marks[::2], marks[1::2], strict=True))
    return {
        "arm": arm,
        "fit_s": seconds,
        "finalize_s": logger.finalize_s,
        "evaluations": monitor.evaluations if monitor else 0,
        "in_hooks_s": hooks if monitor else None,
        "fast_crc": fast,
    }


def cams_call(setup: FitSetup, device: torch.device) -> Callable[[], Any]:
    """`compute_cams` on the probe as the monitor calls it (layers of the LightningModule),
    called once untimed."""
    module = Classifier(setup).to(device)
    probe = probe_images(setup).to(device)
    layers, methods = list(setup.monitor_layers), list(setup.methods)

    def run() -> Any:
        return compute_cams(module, probe, layers, methods)

    run()
    return run


def run_fits(
    setup: FitSetup, device: torch.device, reps: int, warmup: int, arms: Sequence[str] = ARMS
) -> tuple[list[dict[str, Any]], list[float]]:
    """Alternate the arms (plain, monitor, monitor+crc32c, plain, ...); every fit recorded.

    `compute_cams` on the probe is timed twice after each round's fits, so the yardstick sees
    the same machine load as the fits. Returns the fits and its timed seconds.
    """
    if "monitor+crc32c" in arms:
        with crc_mode(fast=True) as available:
            pass
        if not available:
            print("note: crc32c is not installed; arm monitor+crc32c skipped", file=sys.stderr)
            arms = [a for a in arms if a != "monitor+crc32c"]
    runs: list[dict[str, Any]] = []
    engine: list[float] = []
    cams = cams_call(setup, device)
    with tempfile.TemporaryDirectory(prefix="cam-issue14-") as tmp:
        for round_ in range(warmup + reps):
            for arm in arms:
                run = fit_once(arm, setup, device, Path(tmp) / f"{arm}-{round_}")
                run["timed"] = round_ >= warmup
                runs.append(run)
            seconds = [harness.timed(cams, device)[0] for _ in range(2)]
            if round_ >= warmup:
                engine += seconds
            done = ", ".join(f"{r['arm']} {r['fit_s']:.2f}s" for r in runs[-len(arms) :])
            print(
                f"  [fit round {round_ + 1}] {done}, compute_cams {min(seconds):.3f}s",
                file=sys.stderr,
                flush=True,
            )
    return runs, engine


def summarize_fits(runs: Sequence[Mapping[str, Any]], engine_s: float) -> list[dict[str, Any]]:
    """Per arm: median fit, finalize and hook seconds; fit cost per evaluation and its ratio."""
    timed = [r for r in runs if r["timed"]]
    plain = harness.median([r["fit_s"] for r in timed if r["arm"] == "plain"])
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in timed):
        mine = [r for r in timed if r["arm"] == arm]
        fits = [r["fit_s"] for r in mine]
        evaluations = mine[0]["evaluations"]
        fit = harness.median(fits)
        cost = (fit - plain) / evaluations if evaluations else None
        hooks = [r["in_hooks_s"] for r in mine if r["in_hooks_s"] is not None]
        rows.append(
            {
                "arm": arm,
                "fit_s": fit,
                "spread": harness.spread(fits),
                "x_plain": fit / plain,
                "evaluations": evaluations,
                "cost_per_evaluation_s": cost,
                "in_loop_per_evaluation_s": harness.median(hooks) / evaluations if hooks else None,
                "finalize_s": harness.median([r["finalize_s"] for r in mine]),
                "x_compute_cams": cost / engine_s if cost is not None else None,
            }
        )
    return rows


def print_fits(rows: Sequence[Mapping[str, Any]], engine: Sequence[float]) -> None:
    """The arm table, then the fit cost of one evaluation against `compute_cams`."""
    headers = [
        "arm",
        "fit s (median)",
        "spread",
        "x plain",
        "evaluations",
        "fit cost per eval s",
        "in monitor hooks per eval s",
        "logger finalize (close) s",
        "cost / compute_cams",
    ]
    keys = ["arm", "fit_s", "spread", "x_plain", "evaluations", "cost_per_evaluation_s"]
    keys += ["in_loop_per_evaluation_s", "finalize_s", "x_compute_cams"]
    print(harness.markdown_table(headers, [[r[k] for k in keys] for r in rows]))
    median = harness.median(engine)
    print(
        f"\ncompute_cams on the same probe: {median:.3f} s (median of {len(engine)}: twice after "
        f"each round of fits; spread {100 * harness.spread(engine):.0f}%). Fit cost per "
        "evaluation = (fit - plain fit) / evaluations, Lightning's logger finalize (flush + "
        "close) inside every fit. Target: cost / compute_cams <= 1.25 (CPU)."
    )


# -- one evaluation, piece by piece ---------------------------------------------------------


def breakdown(
    setup: FitSetup, device: torch.device, reps: int, warmup: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Time each piece of one evaluation directly; also PNG against JPEG for the real grids."""
    from torch.utils.tensorboard import SummaryWriter

    module = Classifier(setup).to(device)
    inputs = probe_images(setup).to(device)
    probe = ProbeSet("probe", inputs, digest=content_hash(inputs))
    layers, methods = list(setup.monitor_layers), list(setup.methods)
    result = compute_cams(module, inputs, layers, methods)
    grids = draw_grids(probe, result, setup)
    pngs = {tag: to_png_bytes(g) for tag, g in grids.items()}
    jpegs = {tag: to_jpeg_bytes(g, 90) for tag, g in grids.items()}
    encoded = jpegs  # what the monitor logs by default (image_format="jpeg")
    tracker = AttentionTracker(DriftOptions())
    scalars, _ = tracker.score({"probe": result}, {"probe": probe})
    scalars, _ = tracker.score({"probe": result}, {"probe": probe})  # now with prev and ref
    counter = iter(range(10**9))

    crcs = {False: writer_crc()}  # TensorBoard's own, then the fast one where it installs
    with crc_mode(fast=True) as available:
        if available:
            crcs[True] = writer_crc()

    with tempfile.TemporaryDirectory(prefix="cam-breakdown-") as tmp:
        writers = {fast: SummaryWriter(f"{tmp}/tb-{fast}") for fast in crcs}

        def tensorboard(fast: bool) -> Callable[[], None]:
            def run() -> None:
                with writer_using(crcs[fast]):
                    writer, step = writers[fast], next(counter)
                    for key, data in encoded.items():
                        image = EncodedGrid(grids[key], data, "jpeg")
                        add_encoded_image(writer, image_tag(key), image, step)
                    for tag, value in scalar_tags(scalars).items():
                        writer.add_scalar(tag, value, global_step=step)
                    writer.flush()  # waits for the writer thread: CRC and file write

            return run

        def crc(fast: bool) -> Callable[[], None]:
            def run() -> None:
                for data in encoded.values():
                    crcs[fast](data)

            return run

        encoder = GridEncoder()

        def in_loop() -> None:
            """What the monitor does after drawing: encode on its threads, score meanwhile."""
            pending = encoder.submit(grids, "jpeg")
            tracker.score({"probe": result}, {"probe": probe})
            pending.result()

        pieces: dict[str, Callable[[], Any]] = {
            "engine: compute_cams": lambda: compute_cams(module, inputs, layers, methods),
            "drawing the grids": lambda: draw_grids(probe, result, setup),
            "PNG encoding (level 1)": lambda: [to_png_bytes(g) for g in grids.values()],
            "JPEG encoding (quality 90)": lambda: [to_jpeg_bytes(g, 90) for g in grids.values()],
            ENCODER_PIECE: lambda: encoder.submit(grids, "jpeg").result(),
            "TensorBoard write, pure-Python CRC": tensorboard(False),
            "TensorBoard write, crc32c": tensorboard(True),
            "of which CRC32C, pure Python": crc(False),
            "of which CRC32C, crc32c": crc(True),
            "drift scoring": lambda: tracker.score({"probe": result}, {"probe": probe}),
            IN_LOOP_PIECE: in_loop,
            "history write": lambda: write_evaluation(
                Path(tmp) / "history", history_entry(next(counter), probe, result, scalars)
            ),
        }
        if not available:
            pieces = {k: v for k, v in pieces.items() if not k.endswith("crc32c")}
        seconds, _ = harness.interleaved(pieces, reps, warmup, device, progress=False)
        encoder.close()
        for writer in writers.values():
            writer.close()

    rows = [
        {"piece": name, "seconds": harness.median(s), "spread": harness.spread(s)}
        for name, s in seconds.items()
    ]
    engine = rows[0]["seconds"]
    for row in rows:
        row["x_compute_cams"] = row["seconds"] / engine
    shape = next(iter(grids.values())).shape
    encodings = [
        {
            "format": name,
            "grids": len(blobs),
            "grid_px": f"{shape[2]} x {shape[1]}",
            "ms_per_grid": 1e3 * harness.median(seconds[key]) / len(blobs),
            "kib_per_grid": sum(len(b) for b in blobs.values()) / len(blobs) / 1024,
        }
        for name, key, blobs in (
            ("PNG (OpenCV, level 1)", "PNG encoding (level 1)", pngs),
            ("JPEG (OpenCV, quality 90)", "JPEG encoding (quality 90)", jpegs),
        )
    ]
    return rows, encodings


#: The breakdown's rows for the encoder: JPEG encoding on its threads, and overlapped with scoring.
ENCODER_PIECE = "JPEG encoding by the monitor's encoder (nvJPEG on a GPU)"
IN_LOOP_PIECE = "in the loop: scoring, encoding alongside"


def print_breakdown(
    rows: Sequence[Mapping[str, Any]], encodings: Sequence[Mapping[str, Any]]
) -> None:
    """The pieces of one evaluation, and PNG against JPEG per grid."""
    print("\n## One evaluation, piece by piece (each timed on its own)\n")
    table = [[r["piece"], 1e3 * r["seconds"], r["spread"], r["x_compute_cams"]] for r in rows]
    print(harness.markdown_table(["piece", "median ms", "spread", "x compute_cams"], table))
    found = {r["piece"]: r["seconds"] for r in rows}
    common = ("engine: compute_cams", "drawing the grids", "drift scoring", "history write")
    base = sum(found[k] for k in common)
    engine = found["engine: compute_cams"]
    slow = base + found["JPEG encoding (quality 90)"] + found["TensorBoard write, pure-Python CRC"]
    print(
        f"\nSum of the pieces with JPEG grids and TensorBoard's pure-Python CRC: {slow:.3f} s = "
        f"x{slow / engine:.2f} compute_cams (the TensorBoard writes carry the JPEG bytes)."
    )
    if "TensorBoard write, crc32c" in found:
        fast = base + found["JPEG encoding (quality 90)"] + found["TensorBoard write, crc32c"]
        png = fast - found["JPEG encoding (quality 90)"] + found["PNG encoding (level 1)"]
        print(
            f"As the monitor runs by default (JPEG, crc32c): {fast:.3f} s = x{fast / engine:.2f}; "
            f"with image_format='png': about {png:.3f} s = x{png / engine:.2f} (plus a larger "
            "write)."
        )
        rest = found["TensorBoard write, crc32c"] + found["history write"]
        now = found["engine: compute_cams"] + found["drawing the grids"] + found[IN_LOOP_PIECE]
        print(
            f"The monitor's path (encoding once, on {GridEncoder().max_workers} threads, while "
            f"drift is scored): {now + rest:.3f} s = x{(now + rest) / engine:.2f} compute_cams."
        )
    print("\n## Grid encoding\n")
    keys = ["format", "grids", "grid_px", "ms_per_grid", "kib_per_grid"]
    print(harness.markdown_table(["format", "grids", "grid (w x h)", "ms per grid", "KiB per grid"],
                                 [[e[k] for k in keys] for e in encodings]))  # fmt: skip


def measure(
    setup: FitSetup, device: torch.device, reps: int, warmup: int, fits: bool = True
) -> dict[str, Any]:
    """The fits with `compute_cams` between them (unless `fits` is False), then the breakdown;
    printed and returned."""
    payload: dict[str, Any] = {"setup": asdict(setup)}
    if fits:
        runs, engine = run_fits(setup, device, reps, warmup)
        rows = summarize_fits(runs, harness.median(engine))
        print_fits(rows, engine)
        payload.update(compute_cams_s=engine, fits=rows, runs=runs)
    pieces, encodings = breakdown(setup, device, max(reps, 3), warmup)
    print_breakdown(pieces, encodings)
    payload.update(breakdown=pieces, encodings=encodings)
    return payload
