"""The HTML report: the summary first, groups with mean and min-max, widths that fit 1400 px,
class-name captions, and a demo-sized report under 2 MB; histories written to disk and read back."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from cam_monitor.compare import Run, RunGroup, load_run
from cam_monitor.history import Evaluation, Segmentation, write_probe
from cam_monitor.probe import content_hash
from cam_monitor.report import _captions, write_report
from cam_monitor.schema import DRIFT, LOCALIZATION, MapKey, ScalarKey
from tests.helpers import evaluation, write_history

PROBES = ("target", "source")
LAYERS = ("features.conv4", "features.conv2")
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BATCH, SIZE, EPOCHS = 20, 32, 7
PAGE_WIDTH = 1400


def probe_data() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inputs, labels and masks of two probes: a bright blob (the mask) on noise."""
    rng = np.random.default_rng(0)
    inputs, labels, masks = {}, {}, {}
    for probe in PROBES:
        mask = np.zeros((BATCH, SIZE, SIZE), bool)
        for i in range(BATCH):
            r, c = rng.integers(4, 20, size=2)
            mask[i, r : r + 10, c : c + 8] = True
        noise = rng.normal(0, 0.3, (BATCH, 3, SIZE, SIZE))
        inputs[probe] = (noise + 1.5 * mask[:, None]).astype(np.float32)
        labels[probe] = np.arange(BATCH) % 10
        masks[probe] = mask
    return inputs, labels, masks


def write_run(folder: Path, energy: float, seed: int, class_names: bool = True) -> Path:
    """A run with EPOCHS + 1 evaluations of 2 probes x 2 layers, smooth maps, and scalars whose
    energy at the last epoch is ``energy``."""
    inputs, labels, masks = probe_data()
    hashes = {p: content_hash(x) for p, x in inputs.items()}
    rng = np.random.default_rng(seed)
    evaluations = []
    for epoch in range(EPOCHS + 1):
        maps, scalars = {}, {}
        for probe in PROBES:
            for layer, side in zip(LAYERS, (8, 16), strict=True):
                key = MapKey(probe, layer, "gradcam")
                ys, xs = np.mgrid[0:side, 0:side]
                centre = rng.uniform(2, side - 2, size=(BATCH, 2, 1, 1))
                blobs = np.exp(-((ys - centre[:, 0]) ** 2 + (xs - centre[:, 1]) ** 2) / side)
                maps[key] = blobs.astype(np.float32)
                value = energy * epoch / EPOCHS
                scalars[ScalarKey(LOCALIZATION, key, "energy").tag] = value
                scalars[ScalarKey(LOCALIZATION, key, "pointing").tag] = value / 2
                scalars[ScalarKey(DRIFT, key, "spearman_ref").tag] = 0.05 * epoch
        logits = rng.normal(size=(BATCH, 10)).astype(np.float32)
        logits[np.arange(BATCH), np.arange(BATCH) % 10] += 3.0  # mostly right
        evaluations.append(
            evaluation(
                epoch,
                epoch,
                maps,
                hashes=hashes,
                targets={p: logits.argmax(1) for p in PROBES},
                logits={p: logits for p in PROBES},
                labels=labels,
                scalars=scalars,
                class_names=NAMES if class_names else None,
            )
        )
    write_history(folder / "cam_monitor", evaluations, probe=(inputs, labels, masks, hashes))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("report_runs")
    specs = {"so_s0": (0.2, 0), "so_s1": (0.3, 1), "dann_s0": (0.5, 2), "dann_s1": (0.6, 3)}
    return {name: load_run(write_run(root / name, *spec)) for name, spec in specs.items()}


def images(page: str) -> list[tuple[str, np.ndarray]]:
    """Every embedded image: its kind (png or jpeg) and the decoded pixels."""
    found = re.findall(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", page)
    decoded = []
    for kind, data in found:
        pixels = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        assert pixels is not None
        decoded.append((kind, pixels))
    return decoded


@pytest.mark.slow
def test_report_opens_with_the_summary_of_groups_then_curves_then_overlays(
    runs: dict[str, Run], tmp_path: Path
) -> None:
    groups = [
        RunGroup("source_only", (runs["so_s0"], runs["so_s1"])),
        RunGroup("dann", (runs["dann_s0"], runs["dann_s1"])),
    ]
    page = write_report(tmp_path / "r.html", groups).read_text(encoding="utf-8")
    heads = re.findall(r"<h2 id='(\w+)'>", page)
    assert heads == ["summary", "runs", "curves", "overlays"]
    summary = page[page.index("id='summary'") : page.index("id='runs'")]
    assert page.index("<table") > page.index("id='summary'")  # the first table is the summary
    assert "Summary at epoch 7" in summary and "min-max" in summary
    # target first (the probes' order), energy as mean [min, max] over the two seeds.
    rows = re.findall(r"<tr>(.*?)</tr>", summary)
    first = rows[1]  # after the header row
    assert ">target<" in first and "features.conv4 / gradcam" in first and "energy" in first
    assert "0.2500<br><small>[0.2000, 0.3000]</small>" in first
    assert "0.5500<br><small>[0.5000, 0.6000]</small>" in first
    assert "+0.3000" in first and "<td class='l'>dann</td>" in first  # no overlap: clear
    # The higher mean is bold, never coloured as the better one: lower drift is no worse.
    assert "<td class='higher'>0.5500" in first and "background: #eef6ee" not in page
    assert "Single runs" in summary and summary.count("dann_s") >= 2
    # Curves: one figure per (probe, layer, method); overlays: each group's first run, at the
    # first and last epoch.
    kinds = [kind for kind, _ in images(page)]
    assert kinds.count("png") == 4 and kinds.count("jpeg") == 4 * 2 * 2
    assert re.findall(r"alt='(\w+) epoch (\d+)'", page)[:4] == [
        ("so_s0", "0"),
        ("dann_s0", "0"),
        ("so_s0", "7"),
        ("dann_s0", "7"),
    ]
    assert "between runs" not in page  # map similarity is for two single runs only


@pytest.mark.slow
def test_report_fits_1400_px_and_a_demo_sized_report_stays_under_2_mb(
    runs: dict[str, Run], tmp_path: Path
) -> None:
    path = write_report(tmp_path / "r.html", [runs["so_s0"], runs["dann_s0"]])
    page = path.read_text(encoding="utf-8")
    assert path.stat().st_size < 2_000_000
    assert f"max-width: {PAGE_WIDTH}px" in page
    decoded = images(page)
    figures = [pixels.shape[1] for kind, pixels in decoded if kind == "png"]
    grids = [pixels.shape[1] for kind, pixels in decoded if kind == "jpeg"]
    assert max(figures) <= PAGE_WIDTH - 100
    assert 2 * max(grids) + 200 <= PAGE_WIDTH  # two runs side by side, with the epoch column
    # Two single runs: the epoch tables also give the between-run similarity of the maps.
    assert "spearman<br><small>between runs</small>" in page
    # Fewer than 16 columns in the summary: it fits without horizontal scrolling.
    summary = page[page.index("id='summary'") : page.index("id='runs'")]
    header = re.search(r"<table><tr>(.*?)</tr>", summary)
    assert header is not None and header.group(1).count("<th") <= 8


def test_captions_use_the_class_names_stored_in_the_history(runs: dict[str, Run]) -> None:
    evaluation = runs["so_s0"].evaluations[-1]
    assert evaluation.class_names == NAMES
    labels = np.arange(BATCH) % 10
    captions = _captions(evaluation, "target", labels, 4 * SIZE, 4 * SIZE)
    assert captions is not None and len(captions) == BATCH
    assert any(caption.startswith("ok") and "seven" in caption for caption in captions)
    # On 64 px tiles "x p:three t:seven" does not fit: class numbers, the true class kept whole.
    small = _captions(evaluation, "target", labels, SIZE, SIZE)
    assert small is not None and not any("seven" in caption for caption in small)
    assert all(" t:" in caption for caption in small if caption.startswith("x "))
    unnamed = Evaluation(
        evaluation.index, evaluation.epoch, evaluation.step, {}, {}, {}, evaluation.logits
    )
    plain = _captions(unnamed, "target", labels, SIZE, SIZE)
    assert plain is not None and not any("seven" in caption for caption in plain)
    assert "ok 7" in plain  # a right prediction names its class once


def test_history_without_class_names_reads_back_as_none(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path / "old", 0.4, 0, class_names=False))
    assert all(ev.class_names is None for ev in run.evaluations)
    with np.load(run.folder / "eval-00000.npz") as npz:
        assert "class_names" not in str(npz["meta"])  # older files look exactly like this


def signed_run(folder: Path) -> Run:
    """One image, a black probe; integrated gradients -1 | 0 | +1 in three vertical bands, and
    a Grad-CAM of the same layout (non-negative: 0 | 1 | 2)."""
    bands = np.zeros((1, 32, 32), np.float32)
    bands[:, :, :10], bands[:, :, 22:] = -1.0, 1.0
    inputs = {"val": np.zeros((1, 3, 32, 32), np.float32)}
    hashes = {"val": content_hash(inputs["val"])}
    maps = {("val", "input", "integrated_gradients"): bands, ("val", "conv", "gradcam"): bands + 1}
    evaluations = [evaluation(epoch, epoch, maps, step=epoch, hashes=hashes) for epoch in (0, 1)]
    write_history(folder / "cam_monitor", evaluations, probe=(inputs, {}, {}, hashes))
    return load_run(folder)


def test_signed_maps_are_drawn_with_the_diverging_colours_of_the_dashboard(
    tmp_path: Path,
) -> None:
    """Min-max over a signed map would paint zero attribution as a mid heat (jet's green) and
    negative evidence as 'cold'; the report draws signed maps as the dashboard does: blue for
    negative, white for zero, red for positive, on their own."""
    page = write_report(
        tmp_path / "r.html", [signed_run(tmp_path / "a"), signed_run(tmp_path / "b")]
    ).read_text(encoding="utf-8")
    assert "val / input / integrated_gradients: maps on their own" in page
    assert "val / conv / gradcam: CAMs over the probe images" in page
    section = page[page.index("integrated_gradients: maps") :]
    (_, grid), *_ = images(section)
    row = grid[8]  # a row of the first tile, above its caption; BGR
    left, middle, right = row[10], row[grid.shape[1] // 2], row[-10]
    assert left[0] > 150 and left[2] < 100  # blue
    assert middle.min() > 200  # white, not a heat colour
    assert right[2] > 150 and right[0] < 100  # red


def segmentation_run(folder: Path) -> Run:
    """Two black 32 px scenes, each with a square (class 1) and a circle (class 2) region; the
    maps of image 0 explain the square, those of image 1 the circle."""
    label_maps = np.zeros((2, 32, 32), np.int64)
    label_maps[:, 4:12, 4:12], label_maps[:, 18:28, 18:28] = 1, 2
    inputs = {"val": np.zeros((2, 3, 32, 32), np.float32)}
    hashes = {"val": content_hash(inputs["val"])}
    record = Segmentation(
        predicted=np.array([1, 2]),
        share=np.array([0.06, 0.1], np.float32),
        iou=np.array([0.5, 0.75], np.float32),
        accuracy=np.array([0.6, 0.8], np.float32),
    )
    maps = {("val", "net.head", "gradcam"): np.ones((2, 4, 4), np.float32)}
    evaluations = [
        evaluation(epoch, epoch, maps, step=epoch, hashes=hashes, classes=3,
                   targets={"val": np.array([1, 2])}, segmentation={"val": record},
                   class_names=("background", "square", "circle"))
        for epoch in (0, 1)
    ]  # fmt: skip
    write_history(folder / "cam_monitor", evaluations)
    write_probe(folder / "cam_monitor", inputs, {}, {}, hashes, label_maps={"val": label_maps})
    return load_run(folder)


def test_a_segmentation_report_outlines_and_captions_the_explained_class(tmp_path: Path) -> None:
    """probe.npz keeps the label maps: each tile outlines the pixels labelled with the class its
    map explains (the square on image 0, the circle on image 1), and captions name that class
    and its IoU, not the argmax of the mean logits (all 0 here: 'background')."""
    run = segmentation_run(tmp_path / "a")
    evaluation_1 = run.evaluations[-1]
    assert _captions(evaluation_1, "val", None, 32, 32) == ["square 0.50", "circle 0.75"]
    page = write_report(tmp_path / "r.html", [run, segmentation_run(tmp_path / "b")]).read_text()
    section = page[page.index("val / net.head / gradcam: CAMs over the probe images") :]
    (_, grid), *_ = images(section)
    gray = grid.mean(axis=2)  # tiles of 64 px (32 px enlarged twice) from (2, 2) and (2, 68)

    def edge(tile: int, top: int, left: int, width: int) -> float:
        """The mean brightness along a region's top edge, in grid pixels."""
        x = 2 + 66 * tile + 2 * left
        return float(gray[2 + 2 * top, x : x + 2 * width].mean())

    square, circle = (4, 4, 8), (18, 18, 10)
    assert edge(0, *square) > 180 and edge(1, *circle) > 180  # outlined in white
    assert edge(0, *circle) < 90 and edge(1, *square) < 90  # the other class is not
