"""End to end: two real Lightning fits with CamMonitor, then `cam-monitor show` and `compare`.

Nothing on this path is hand-built: the histories, probe files and TensorBoard events are what
the callback wrote during `Trainer.fit`, and the CLI reads them the way a user would.
"""

from __future__ import annotations

import base64
import math
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import TensorDataset

from cam_monitor import CamMonitor
from cam_monitor.cli import main
from tests.helpers import LitClassifier, fit, read_events, shapes

PROBES = ("source", "target")
LAYERS = ("net.features.3", "net.features.5")
METHODS = ("gradcam", "layercam")
SCORES = ("energy", "pointing", "mask_iou")
EPOCHS = 2
STEPS = 3  # training steps per epoch: 48 images in batches of 16
EVALUATIONS = 1 + EPOCHS  # the baseline before training, then one per epoch
SIZE = 32
REPO = Path(__file__).resolve().parents[1]
GROUPS = [(p, layer, m) for p in PROBES for layer in LAYERS for m in METHODS]


def fit_run(root: Path, name: str, seed: int, lr: float) -> Path:
    """One `Trainer.fit` with a CamMonitor and a TensorBoardLogger; returns the run folder. The
    images hold a square, disc or diamond (the class) at a random place."""
    probes = {p: shapes(8, 100 + i, p, classes="kind") for i, p in enumerate(PROBES)}
    monitor = CamMonitor(
        list(LAYERS),
        methods=list(METHODS),
        probe={p: (images, labels) for p, (images, labels, _) in probes.items()},
        masks={p: masks for p, (_, _, masks) in probes.items()},
        nrow=4,
    )
    images, labels, _ = shapes(16 * STEPS, seed, classes="kind")
    logger = TensorBoardLogger(root, name=name, version=0)
    train = TensorDataset(images, labels)
    fit(monitor, root, model=partial(LitClassifier, lr=lr), train=train, val=False, seed=seed,
        logger=logger, max_epochs=EPOCHS)  # fmt: skip
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    return fit_run(root, "source_only", seed=0, lr=0.05), fit_run(root, "dann", seed=1, lr=0.2)


def tables(out: str) -> dict[str, dict[str, dict[str, str]]]:
    """Every table printed under a "probe / layer / method" title, rows keyed by their first
    cell; a table split for width (blank-line separated, same first header) is merged."""
    found: dict[str, dict[str, dict[str, str]]] = {}
    lines = out.splitlines()
    for number, line in enumerate(lines):
        title = re.sub(r"\s+\(\d+ images\)$", "", line.strip())
        if title.count(" / ") != 2 or not line.strip():
            continue
        rows: dict[str, dict[str, str]] = {}
        at = number + 1
        key = lines[at].split()[0]
        while at < len(lines) and lines[at].split()[:1] == [key]:
            headers = lines[at].split()
            at += 1
            while at < len(lines) and lines[at].strip() and not lines[at].startswith("  *"):
                cells = lines[at].split()
                rows.setdefault(cells[0], {}).update(zip(headers, cells, strict=True))
                at += 1
            at += 1
        found[title] = rows
    return found


def score(cell: str) -> float:
    """A printed localization score: a number in [0, 1], never 'nan' or '-'."""
    value = float(cell.rstrip("*"))
    assert math.isfinite(value) and 0 <= value <= 1, cell
    return value


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_tensorboard_holds_every_grid_and_the_scores(runs: tuple[Path, Path]) -> None:
    for run in runs:
        files = sorted((run / "version_0").glob("events.out.tfevents.*"))
        assert len(files) == 1
        events = read_events(files[0])
        tags = events.Tags()
        assert sorted(tags["images"]) == sorted(f"cam/{'/'.join(g)}" for g in GROUPS)
        for group in GROUPS:
            shots = events.Images(f"cam/{'/'.join(group)}")
            assert [s.step for s in shots] == [STEPS * e for e in range(EVALUATIONS)]
            image = cv2.imdecode(np.frombuffer(shots[-1].encoded_image_string, np.uint8), 1)
            assert image.shape[:2] == (shots[-1].height, shots[-1].width)
        energy = events.Scalars("cam_loc/target/net.features.5/gradcam/energy")
        assert [e.step for e in energy] == [STEPS * e for e in range(EVALUATIONS)]
        assert all(0 <= e.value <= 1 for e in energy)
        assert "cam_drift/source/net.features.3/layercam/spearman_ref" in tags["scalars"]


def test_show_prints_the_run_the_callback_wrote(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_cli(["show", str(runs[0])], capsys)
    assert f"{EVALUATIONS} evaluations; probes: source, target; " in out
    assert f"layers: {', '.join(LAYERS)}; methods: {', '.join(METHODS)}" in out
    printed = tables(out)
    assert set(printed) == {" / ".join(g) for g in GROUPS}
    for rows in printed.values():
        assert [row["epoch"] for row in rows.values()] == [str(e) for e in range(EVALUATIONS)]
        for row in rows.values():
            for name in SCORES:
                score(row[name])
        assert float(rows["2"]["spearman_ref"].rstrip("*")) >= 0
    # The numbers printed are the ones TensorBoard got, read back through its own reader.
    files = sorted((runs[0] / "version_0").glob("events.out.tfevents.*"))
    events = read_events(files[0])
    logged = events.Scalars("cam_loc/source/net.features.3/gradcam/energy")
    row = printed["source / net.features.3 / gradcam"]
    assert [score(row[str(i)]["energy"]) for i in range(EVALUATIONS)] == pytest.approx(
        [e.value for e in logged], abs=5e-5
    )


def check_compare(out: str, groups: list[tuple[str, str, str]]) -> None:
    """`compare` printed both runs, every common epoch and finite scores for ``groups``."""
    assert "A: source_only " in out and "B: dann " in out
    assert f"common epochs: {', '.join(map(str, range(EVALUATIONS)))}" in out
    printed = tables(out)
    assert set(printed) == {" / ".join(g) for g in groups}
    for rows in printed.values():
        assert list(rows) == [str(e) for e in range(EVALUATIONS)]
        for row in rows.values():
            for name in SCORES:
                score(row[f"{name}_A"]), score(row[f"{name}_B"])
            assert -1 <= float(row["spearman"].rstrip("*")) <= 1


def check_report(report: Path, groups: list[tuple[str, str, str]]) -> None:
    """The HTML report has a section per group with both runs' overlay grids as JPEGs at the
    first and last common epoch."""
    html = report.read_text()
    for group in groups:
        assert f"<h3>{' / '.join(group)}</h3>" in html
    found = re.findall(r"<img alt='([^']*) epoch (\d+)' src='data:image/jpeg;base64,([^']*)'", html)
    assert {(name, epoch) for name, epoch, _ in found} == {
        (name, str(epoch)) for name in ("source_only", "dann") for epoch in (0, EVALUATIONS - 1)
    }
    assert len(found) == len(groups) * 2 * 2  # every group, both runs, first and last epoch
    for _, _, data in found[:4]:
        grid = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        # Tiles drawn larger than the 32 px probe images, and not a blank image.
        assert grid is not None and grid.shape[1] > 4 * SIZE and grid.std() > 10


def test_compare_prints_both_runs_and_writes_a_report_with_overlays(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_cli(["compare", *map(str, runs)], capsys)
    check_compare(out, GROUPS)
    # The report draws a matplotlib figure per group: one layer here, every group in the slow
    # test below.
    report = tmp_path / "report.html"
    out = run_cli(["compare", *map(str, runs), "--layer", LAYERS[1], "--out", str(report)], capsys)
    chosen = [g for g in GROUPS if g[1] == LAYERS[1]]
    check_compare(out, chosen)
    assert f"report written to {report}" in out
    check_report(report, chosen)


def run_cli_process(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m cam_monitor.cli ARGS` in a subprocess, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "cam_monitor.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_the_installed_command_runs_show_and_compare(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    report = tmp_path / "report.html"
    show = run_cli_process("show", str(runs[1]), "--probe", "target", "--method", "layercam")
    assert show.returncode == 0, show.stderr
    assert set(tables(show.stdout)) == {f"target / {layer} / layercam" for layer in LAYERS}
    compare = run_cli_process("compare", *map(str, runs), "--out", str(report))
    assert compare.returncode == 0, compare.stderr
    check_compare(compare.stdout, GROUPS)
    check_report(report, GROUPS)
