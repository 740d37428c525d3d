"""The `cam-monitor` command line on small synthetic runs written with the history module."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from cam_monitor.cli import format_bytes, format_table, main
from cam_monitor.history import Segmentation, read_evaluation
from cam_monitor.probe import content_hash
from cam_monitor.schema import MapKey, ScalarKey
from tests.helpers import evaluation, write_history

PROBES = ("source", "target")
LAYERS = ("features.29", "layer4.1.conv2")
METHOD = "gradcam"
BATCH = 8
EPOCHS = (0, 1, 2)
REPO = Path(__file__).resolve().parents[1]


def probe_inputs(seed: int, probes: Sequence[str] = PROBES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: rng.standard_normal((BATCH, 3, 16, 16)).astype(np.float32) for p in probes}


def base_maps(probe: str, layer: str, epoch: int) -> np.ndarray:
    """Run A: each map is a permutation of 1..16 (exact in float16, no ties)."""
    rng = np.random.default_rng([zlib.crc32(probe.encode()), LAYERS.index(layer), epoch])
    perms = np.stack([rng.permutation(16) for _ in range(BATCH)]) + 1
    return perms.reshape(BATCH, 4, 4).astype(np.float32)


def run_b_maps(maps: np.ndarray, epoch: int) -> np.ndarray:
    """Run B: equal at epoch 0, a monotone transform at 1 (same ranks), reversed at 2."""
    if epoch == 0:
        return maps.copy()
    if epoch == 1:
        return maps**2
    return 17.0 - maps


def tag(kind: str, group: MapKey, stat: str) -> str:
    """A scalar's tag as the monitor logs it (probe names with a "/" come out encoded)."""
    return ScalarKey(kind, group, stat).tag


def make_run(
    folder: Path,
    which: str,
    inputs: dict[str, np.ndarray],
    probe: bool = True,
    offset: float = 0.0,
) -> Path:
    """Three evaluations (epochs 0, 1, 2) of each probe in `inputs` x 2 layers x gradcam, maps
    4x4, scalars tagged by the schema; ``offset`` is added to the energy."""
    probes = list(inputs)
    hashes = {p: content_hash(x) for p, x in inputs.items()}
    masks = {p: np.zeros((BATCH, 16, 16), bool) for p in probes}
    for m in masks.values():
        m[:, :8, :8] = True
    labels = {p: np.arange(BATCH) % 3 for p in probes}
    evaluations = []
    for index, epoch in enumerate(EPOCHS):
        maps = {}
        scalars: dict[str, float] = {"cam_monitor/seconds": 0.5 + index}
        for p in probes:
            for layer in LAYERS:
                a = base_maps(p, layer, epoch)
                maps[p, layer, METHOD] = a if which == "a" else run_b_maps(a, epoch)
                group = MapKey(p, layer, METHOD)
                sign = 1 if which == "a" else -1
                scalars[tag("cam_loc", group, "energy")] = 0.5 + sign * 0.1 * epoch + offset
                scalars[tag("cam_loc", group, "pointing")] = 0.25 * (epoch + 1)
                scalars[tag("cam_stats", group, "entropy")] = 0.9
                scalars[tag("cam_drift", group, "spearman_ref")] = 0.1 * epoch
                scalars[tag("cam_drift", group, "topk_iou_ref")] = 0.2 * epoch
                scalars[tag("cam_drift", group, "js_ref")] = (
                    math.nan if epoch == 1 else 0.01 * epoch
                )
                if index:
                    scalars[tag("cam_drift", group, "spearman_prev")] = 0.3
                    scalars[tag("cam_drift", group, "spearman_prev_excluded")] = 2.0
        rng = np.random.default_rng(index)
        logits = {p: rng.standard_normal((BATCH, 3)).astype(np.float32) for p in probes}
        evaluations.append(
            evaluation(index, epoch, maps, step=10 * epoch, hashes=hashes, logits=logits,
                       labels=labels, scalars=scalars)
        )  # fmt: skip
    history = folder / "lightning_logs" / "version_0" / "cam_monitor"
    write_history(history, evaluations, probe=(inputs, labels, masks, hashes) if probe else None)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    inputs = probe_inputs(0)
    return make_run(root / "source_only", "a", inputs), make_run(root / "dann", "b", inputs)


def table(out: str, title: str) -> dict[str, dict[str, str]]:
    """The table printed under the line starting with ``title``, rows keyed by the first cell;
    chunks split for width (blank-line separated, same first column) are merged."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    while not lines[start].strip():
        start += 1
    rows: dict[str, dict[str, str]] = {}
    key = lines[start].split()[0]
    while start < len(lines) and lines[start].split()[:1] == [key]:
        headers = lines[start].split()
        start += 1
        while start < len(lines) and lines[start].strip():
            cells = lines[start].split()
            rows.setdefault(cells[0], {}).update(zip(headers, cells, strict=True))
            start += 1
        start += 1  # the blank line between chunks
    return rows


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- show


def test_show_prints_every_evaluation_and_its_scalars(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["show", str(runs[0])], capsys)
    assert code == 0, err
    assert err == ""
    assert "3 evaluations; probes: source, target; layers: features.29, layer4.1.conv2" in out
    main_table = table(out, "'nan' = undefined")
    assert list(main_table) == ["0", "1", "2"]
    assert [main_table[i]["epoch"] for i in "012"] == ["0", "1", "2"]
    assert [main_table[i]["step"] for i in "012"] == ["0", "10", "20"]
    assert [main_table[i]["seconds"] for i in "012"] == ["0.5000", "1.5000", "2.5000"]
    # Each evaluation's history size: its maps, targets, logits and labels.
    sizes = [read_evaluation(path).nbytes for path in sorted(runs[0].rglob("eval-*.npz"))]
    assert len(sizes) == 3 and min(sizes) > 0
    assert [main_table[i]["history"] for i in "012"] == [format_bytes(n) for n in sizes]
    for p in PROBES:
        for layer in LAYERS:
            block = table(out, f"{p} / {layer} / {METHOD}")
            assert list(block) == ["0", "1", "2"]
            assert block["2"]["spearman_ref"] == "0.2000"
            assert block["0"]["spearman_prev"] == "-"  # not recorded at the baseline
            assert block["1"]["spearman_prev"] == "0.3000*"  # 2 images left out of the mean
            assert block["1"]["js_ref"] == "nan"
            assert block["2"]["energy"] == "0.7000"
            assert block["2"]["pointing"] == "0.7500"
            assert block["0"]["entropy"] == "0.9000"
            assert "spearman_prev_excluded" not in block["1"]
            assert "pearson_ref" not in block["1"]  # never recorded: no column
    # Readable in a 100-column terminal: every table line fits (the path line may not).
    assert all(len(line) <= 100 for line in out.splitlines() if str(runs[0]) not in line)


def test_show_filters_by_probe_layer_and_method(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(
        ["show", str(runs[0]), "--probe", "target", "--layer", "layer4*"], capsys
    )
    assert code == 0
    assert "target / layer4.1.conv2 / gradcam" in out
    assert "source / " not in out and "features.29 / " not in out

    code, out, err = run_main(["show", str(runs[0]), "--probe", "val"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("cam-monitor: error: no (probe, layer, method)")
    assert "probes: source, target" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- compare


def test_compare_prints_between_run_similarity_and_localization(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["compare", str(runs[0]), str(runs[1])], capsys)
    assert code == 0, err
    assert err == ""
    assert "A: source_only" in out and "B: dann" in out
    assert "common epochs: 0, 1, 2" in out
    for p in PROBES:
        for layer in LAYERS:
            rows = table(out, f"{p} / {layer} / {METHOD}  ({BATCH} images)")
            assert list(rows) == ["0", "1", "2"]
            # Epoch 0: identical maps.
            assert rows["0"]["spearman"] == "1.0000"
            assert rows["0"]["topk_iou"] == "1.0000"
            assert rows["0"]["js"] == "0.0000"
            # Epoch 1: B = A**2, same ranks but a different distribution.
            assert rows["1"]["spearman"] == "1.0000"
            assert rows["1"]["topk_iou"] == "1.0000"
            assert float(rows["1"]["js"]) > 0.01
            # Epoch 2: B reverses A's ranking; the top 20% sets are disjoint.
            assert rows["2"]["spearman"] == "-1.0000"
            assert rows["2"]["topk_iou"] == "0.0000"
            assert float(rows["2"]["js"]) > float(rows["1"]["js"])
            # Both runs' localization scores, from their scalars.
            assert [rows[e]["energy_A"] for e in "012"] == ["0.5000", "0.6000", "0.7000"]
            assert [rows[e]["energy_B"] for e in "012"] == ["0.5000", "0.4000", "0.3000"]
            assert rows["2"]["pointing_A"] == rows["2"]["pointing_B"] == "0.7500"
            assert "mask_iou_A" not in rows["0"]


def test_compare_epochs_option_selects_rows(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(
        ["compare", *map(str, runs), "--epochs", "2,0", "--layer", "f*"], capsys
    )
    assert code == 0
    assert list(table(out, "source / features.29 / gradcam")) == ["0", "2"]
    assert "layer4.1.conv2 / gradcam  (" not in out

    code, out, err = run_main(["compare", *map(str, runs), "--epochs", "0,7"], capsys)
    assert code == 2 and out == ""
    assert err == (
        "cam-monitor: error: --epochs 7 not evaluated in both runs; common epochs: 0, 1, 2\n"
    )

    code, _, err = run_main(["compare", *map(str, runs), "--epochs", "one"], capsys)
    assert code == 2
    assert "cam-monitor: error: argument --epochs" in err


def test_compare_refuses_runs_with_different_probe_data(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = probe_inputs(0)
    inputs["target"] = inputs["target"] + 1.0  # another target-domain sample
    other = make_run(tmp_path / "other", "b", inputs)
    code, out, err = run_main(["compare", str(runs[0]), str(other)], capsys)
    assert code == 2
    assert out == ""
    assert err.startswith("cam-monitor: error: probe 'target' differs between the runs")
    assert content_hash(probe_inputs(0)["target"]) in err
    assert content_hash(inputs["target"]) in err
    assert "same probe data" in err
    assert "'source'" not in err  # the source probe is the same in both
    assert err.count("\n") == 1


def test_compare_writes_a_self_contained_html_report(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "reports" / "report.html"
    code, out, err = run_main(
        ["compare", *map(str, runs), "--out", str(out_file), "--probe", "source"], capsys
    )
    assert code == 0, err
    assert f"report written to {out_file}" in out
    page = out_file.read_text(encoding="utf-8")
    # Per group (source x 2 layers): one PNG figure of curves + run A | run B at the first and
    # last epoch (JPEG).
    figures = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    grids = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", page)
    assert len(figures) == page.count("data:image/") - len(grids) == 2
    assert len(grids) == 2 * 2 * 2
    assert all(base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n") for data in figures)
    assert all(base64.b64decode(data).startswith(b"\xff\xd8\xff") for data in grids)
    assert "<script" not in page and "http" not in page  # no external files or libraries
    assert "source_only" in page and "dann" in page
    assert "CAMs over the probe images" in page
    assert "target / " not in page
    assert page.rstrip().endswith("</html>")


def test_report_without_probe_file_shows_maps_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = probe_inputs(1)
    a = make_run(tmp_path / "a", "a", inputs, probe=False)
    b = make_run(tmp_path / "b", "b", inputs, probe=False)
    out_file = tmp_path / "report.html"
    args = ["compare", str(a), str(b), "--out", str(out_file), "--layer", "features.29"]
    code, _, err = run_main([*args, "--epochs", "1"], capsys)
    assert code == 0, err
    page = out_file.read_text(encoding="utf-8")
    assert "CAMs alone (no probe.npz images)" in page
    assert page.count("data:image/png;base64") == 2  # the curves
    assert page.count("data:image/jpeg;base64") == 2 * 2 * 1  # the map grids


def test_report_without_matplotlib_asks_to_install_it(
    runs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import` raise ImportError
    out_file = tmp_path / "report.html"
    code, out, err = run_main(["compare", *map(str, runs), "--out", str(out_file)], capsys)
    assert code == 2 and out == ""  # refused before any work
    assert err.startswith("cam-monitor: error: ") and "pip install cam-monitor[report]" in err
    assert not out_file.exists()


def test_compare_reports_unshared_groups_and_uses_the_first_evaluation_of_an_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = probe_inputs(4)
    a = make_run(tmp_path / "a", "a", inputs)
    # Run B, step-based: two evaluations at epoch 0, one probe and layer only.
    key = ("source", "features.29", METHOD)
    hashes = {"source": content_hash(inputs["source"])}
    evaluations = []
    for index, epoch in enumerate((0, 0, 1)):
        maps = base_maps(*key[:2], epoch)
        maps = {key: 17.0 - maps if index == 1 else maps}
        evaluations.append(evaluation(index, epoch, maps, step=5 * index, hashes=hashes, classes=3))
    write_history(tmp_path / "b" / "cam_monitor", evaluations)
    code, out, err = run_main(["compare", str(a), str(tmp_path / "b")], capsys)
    assert code == 0
    assert err == (
        "cam-monitor: warning: b has several evaluations at epoch(s) 0; the first of each "
        "epoch is compared\ncam-monitor: note: epoch 1 is the last one every run evaluated: b "
        "stopped there; a (to epoch 2) went on, and is not compared after it\n"
    )
    rows = table(out, "source / features.29 / gradcam")
    assert list(rows) == ["0", "1"]
    assert rows["0"]["spearman"] == "1.0000"  # the baseline (index 0), not index 1
    assert rows["0"]["energy_A"] == "0.5000" and rows["0"]["energy_B"] == "-"
    assert "only in a (not compared): source / layer4.1.conv2 / gradcam, target / " in out


def test_probe_named_with_a_slash_survives_write_read_show_and_compare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = probe_inputs(6, probes=("domain/a",))
    a = make_run(tmp_path / "a", "a", inputs)
    b = make_run(tmp_path / "b", "b", inputs)
    with np.load(a / "lightning_logs" / "version_0" / "cam_monitor" / "eval-00000.npz") as npz:
        assert "maps/domain%2Fa/features.29/gradcam" in npz.files  # encoded on disk
        assert "cam_loc/domain%2Fa/features.29/gradcam/energy" in str(npz["meta"])

    code, out, err = run_main(["show", str(a), "--probe", "domain/a"], capsys)
    assert code == 0 and err == ""
    assert "probes: domain/a; layers: features.29, layer4.1.conv2" in out
    headers = next(line for line in out.splitlines() if line.lstrip().startswith("index"))
    parsed = ["index", "epoch", "step", "seconds", "history", "time"]
    assert headers.split() == parsed  # nothing unparsed
    block = table(out, "domain/a / features.29 / gradcam")
    assert block["2"]["energy"] == "0.7000" and block["1"]["spearman_prev"] == "0.3000*"

    code, out, err = run_main(
        ["compare", str(a), str(b), "--out", str(tmp_path / "r.html")], capsys
    )
    assert code == 0 and err == ""
    assert "only in" not in out  # the maps and the scalars name the same groups
    for layer in LAYERS:
        rows = table(out, f"domain/a / {layer} / gradcam  ({BATCH} images)")
        assert rows["0"]["spearman"] == "1.0000" and rows["2"]["spearman"] == "-1.0000"
        assert [rows[e]["energy_B"] for e in "012"] == ["0.5000", "0.4000", "0.3000"]
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<h3>domain/a / features.29 / gradcam</h3>" in page
    assert "CAMs over the probe images" in page  # probe.npz found under the encoded name
    assert page.count("data:image/jpeg;base64") == 2 * 2 * 2


def test_compare_groups_print_a_summary_of_means_and_ranges(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = probe_inputs(0)
    second = make_run(tmp_path / "dann_s1", "b", inputs, offset=0.1)
    third = make_run(tmp_path / "extra", "a", inputs, offset=-0.2)
    group = f"--group=dann={runs[1]},{second}"
    code, out, err = run_main(
        ["compare", str(runs[0]), str(third), group, "--probe", "source"], capsys
    )
    assert code == 0, err
    assert "  dann: dann, dann_s1" in out and "  source_only: source_only" in out
    assert "Summary at epoch 2 (the last common epoch)" in out
    chunks: dict[tuple[str, str], list[str]] = {}
    for line in out.splitlines():
        cells = line.split()
        if cells[:2] == ["source", "/"]:
            chunks.setdefault((cells[2], cells[5]), []).extend(cells[6:])
    # Energy at epoch 2: source_only 0.7, extra 0.5, dann 0.3 and 0.4 (mean 0.35); then the
    # differences to the first group and the higher one.
    assert chunks["features.29", "energy"] == [
        *("0.7000", "0.5000", "0.3500", "[0.3000,", "0.4000]"),
        *("-0.2000", "-0.3500", "source_only"),
    ]
    assert chunks["layer4.1.conv2", "pointing"][-1] == "-"  # a tie names no group
    assert "target / " not in out
    assert all(len(line) <= 100 for line in out.splitlines())


def test_compare_groups_say_what_is_not_in_every_run(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A probe set one run lacks is left out of the summary, and the output says so (as
    `only in` does for two runs), in the terminal and in the report."""
    lone = make_run(tmp_path / "lone", "b", probe_inputs(0, probes=("source",)))
    report = tmp_path / "report.html"
    args = ["compare", str(runs[0]), f"--group=dann={runs[1]},{lone}", "--out", str(report)]
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    assert all(len(line) <= 100 for line in out.splitlines())
    assert not [line for line in out.splitlines() if line.startswith("target / ")]
    text = " ".join(out.split())
    left = "target / features.29 / gradcam, target / layer4.1.conv2 / gradcam"
    for run in ("source_only", "dann"):
        assert f"only in {run}, not in every run (not compared): {left}" in text
    assert "only in lone" not in text
    assert f"Note: only in dann, not in every run (not compared): {left}" in report.read_text()
    code, out, err = run_main([*args[:3], "--probe", "source"], capsys)
    assert code == 0 and "only in" not in out  # what the filters leave out is not noted


def test_an_out_path_that_cannot_be_written_fails_before_the_comparison(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    out = tmp_path / "notes.txt" / "report.html"
    args = ["compare", str(runs[0]), str(runs[1]), "--out", str(out)]
    code, printed, err = run_main(args, capsys)
    assert code == 2 and printed == ""
    assert f"--out {out}: cannot make its folder {out.parent}" in err


def test_compare_names_the_run_that_ends_the_common_epochs(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short = tmp_path / "short"
    shutil.copytree(runs[1], short)
    (last,) = short.rglob("eval-00002.npz")
    last.unlink()  # it stopped after epoch 1
    said = (
        "epoch 1 is the last one every run evaluated: short stopped there; source_only (to epoch 2)"
    )
    for args in (
        ["compare", str(runs[0]), str(short)],
        ["compare", f"--group=a={runs[0]}", f"--group=b={short},{runs[1]}"],
    ):
        code, _, err = run_main(args, capsys)
        assert code == 0, err
        assert said in " ".join(err.split()), err


def test_compare_groups_write_a_report_with_overlays_at_the_chosen_epochs(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    second = make_run(tmp_path / "dann_s1", "b", probe_inputs(0), offset=0.1)
    out_file = tmp_path / "groups.html"
    args = ["compare", str(runs[0]), "--group", f"dann={runs[1]},{second}", "--layer", "f*"]
    code, out, err = run_main([*args, "--epochs", "1", "--out", str(out_file)], capsys)
    assert code == 0, err
    assert f"report written to {out_file}" in out
    page = out_file.read_text(encoding="utf-8")
    # One (probe, layer, method) per probe; each group's first run at epoch 1 only.
    assert (
        re.findall(r"alt='(\w+) epoch (\d+)'", page)
        == [
            ("source_only", "1"),
            ("dann", "1"),
        ]
        * 2
    )
    assert "0.3500<br><small>[0.3000, 0.4000]</small>" in page  # energy at epoch 2, in dann
    code, _, err = run_main([*args, "--epochs", "7"], capsys)
    assert code == 2 and "--epochs 7 not evaluated in every run" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--group", "dann"], "expected NAME=RUN,RUN"),
        (["--group", "=a,b"], "expected NAME=RUN,RUN"),
        (["a", "--group", "g=a,b"], "is given twice"),
        (["--group", "g=a", "--group", "g=b"], "group name 'g' is used twice"),
        (["--group", "g=a,b"], "got 2 run(s) in 1 group(s)"),
    ],
)
def test_compare_group_usage_errors(
    args: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inputs = probe_inputs(0)
    for name in "ab":
        make_run(tmp_path / name, "a", inputs)
    monkeypatch.chdir(tmp_path)  # the runs are named a and b
    code, out, err = run_main(["compare", *args], capsys)
    assert code == 2 and out == ""
    assert message in err and err.count("cam-monitor: error:") == 1


def test_compare_refuses_one_run_given_twice_by_two_paths(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A run folder and its history folder are one run: not two seeds, not two runs."""
    history = runs[1] / "lightning_logs" / "version_0" / "cam_monitor"
    for args in (
        [str(runs[0]), f"--group=dann={runs[1]},{history}"],
        [str(runs[1]), str(history)],
    ):
        code, out, err = run_main(["compare", *args], capsys)
        assert code == 2 and out == ""
        assert "are the same run (history " in err and "name each run once" in err


def test_compare_groups_refuse_a_run_with_other_probe_data(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = probe_inputs(0)
    inputs["target"] = inputs["target"] + 1.0
    other = make_run(tmp_path / "other", "b", inputs)
    code, out, err = run_main(
        ["compare", str(runs[0]), "--group", f"dann={runs[1]},{other}"], capsys
    )
    assert code == 2 and out == ""
    assert "probe 'target' differs between the runs" in err and "other" in err


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("command", ["show", "compare"])
def test_missing_or_empty_run_directory_is_a_one_line_error(
    runs: tuple[Path, Path], tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no evaluations here")
    for bad in (tmp_path / "missing", empty):
        args = [command, str(bad)] if command == "show" else [command, str(runs[0]), str(bad)]
        code, out, err = run_main(args, capsys)
        assert code == 2
        assert out == ""
        assert err.startswith("cam-monitor: error: No cam-monitor history")
        assert str(bad) in err and err.count("\n") == 1 and "Traceback" not in err


def test_truncated_eval_file_is_skipped_with_a_warning_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = probe_inputs(2)
    a = make_run(tmp_path / "a", "a", inputs)
    b = make_run(tmp_path / "b", "b", inputs)
    broken = a / "lightning_logs" / "version_0" / "cam_monitor" / "eval-00001.npz"
    broken.write_bytes(broken.read_bytes()[:200])

    code, out, err = run_main(["show", str(a)], capsys)
    assert code == 0
    assert err.startswith("cam-monitor: warning: Skipping unreadable ")
    assert str(broken) in err and "--strict makes it an error" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(table(out, "'nan' = undefined")) == ["0", "2"]

    code, out, err = run_main(["compare", str(a), str(b)], capsys)
    assert code == 0
    assert "eval-00001.npz" in err
    assert list(table(out, "source / features.29 / gradcam")) == ["0", "2"]

    code, out, err = run_main(["show", "--strict", str(a)], capsys)
    assert code == 2 and out == ""
    assert err.startswith("cam-monitor: error: Cannot read cam-monitor evaluation ")
    assert str(broken) in err and err.count("\n") == 1
    assert "leave out --strict" in err and "read_history" not in err  # the command's own fix


def test_corrupt_probe_file_is_a_warning_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path / "a", "a", probe_inputs(3))
    probe_file = run / "lightning_logs" / "version_0" / "cam_monitor" / "probe.npz"
    probe_file.write_bytes(b"junk")
    code, out, err = run_main(["show", str(run), "--probe", "source"], capsys)
    assert code == 0
    assert err.startswith(f"cam-monitor: warning: Cannot read cam-monitor probe file {probe_file}")
    assert err.count("\n") == 1
    assert list(table(out, "source / features.29 / gradcam")) == ["0", "1", "2"]


def test_usage_errors_exit_2_and_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main([], capsys)
    assert code == 2 and "cam-monitor: error:" in err
    code, _, err = run_main(["compare", "only-one"], capsys)
    assert code == 2 and "needs at least two runs" in err and "got 1 run(s)" in err
    code, out, _ = run_main(["compare", "--help"], capsys)
    assert code == 0 and "--epochs" in out and "--out" in out


def test_format_table_splits_wide_tables_repeating_key_columns() -> None:
    headers = ["index", "epoch", *(f"measure_{i}_ref" for i in range(12))]
    rows = [[str(i), str(2 * i), *("0.1234" for _ in range(12))] for i in range(3)]
    lines = format_table(headers, rows, keep=2, width=100)
    assert max(len(line) for line in lines) <= 100
    chunks = "\n".join(lines).split("\n\n")
    assert len(chunks) == 3
    assert all(chunk.split()[:2] == ["index", "epoch"] for chunk in chunks)
    assert sum(chunk.count("measure_") for chunk in chunks) == 12


@pytest.mark.slow
def test_module_runs_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cam_monitor.cli", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: cam-monitor")
    assert "show" in result.stdout and "compare" in result.stdout


def test_show_and_compare_refuse_a_folder_holding_two_runs(
    tmp_path: Path, runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    mixed = make_run(tmp_path / "mixed", "a", probe_inputs(0))
    history = mixed / "lightning_logs" / "version_0" / "cam_monitor"
    for path in sorted(history.glob("eval-*.npz")):  # the old files carry no run id: one run
        with np.load(path) as npz:
            arrays = dict(npz)
        meta = json.loads(str(arrays["meta"]))
        if meta["index"] < 2:  # a second run that overwrote eval 0-1 and left eval 2
            meta["run"] = "secondrun001"
            arrays["meta"] = np.array(json.dumps(meta))
            np.savez_compressed(path, **arrays)
    code, out, err = run_main(["show", str(mixed)], capsys)
    assert code == 2 and not out
    assert "holds the evaluations of 2 different training runs" in err
    assert "run secondrun001: evaluations 0, 1; run (no id): evaluations 2" in err
    code, out, err = run_main(["compare", str(runs[0]), str(mixed)], capsys)
    assert code == 2 and "2 different training runs" in err
    code, _, _ = run_main(["show", str(runs[0])], capsys)  # one run without ids: readable
    assert code == 0


def test_show_counts_no_class_for_an_image_with_nan_logits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A NaN probe image gives NaN logits; argmax would call them class 0 and, with label 0,
    count the image as correct. It predicts no class, and the captions say '-'."""
    logits = np.array([[np.nan] * 3, [0.0, 2.0, 1.0], [3.0, 0.0, 0.0]], np.float32)
    maps = {("val", "conv", "gradcam"): np.ones((3, 2, 2))}
    write_history(
        tmp_path,
        [evaluation(0, 0, maps, step=0, logits={"val": logits},
                    labels={"val": np.array([0, 1, 2])}, class_names=("cat", "dog", "owl"))],
    )  # fmt: skip
    code, out, _ = run_main(["show", str(tmp_path)], capsys)
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("  val: predicted"))
    assert line == "  val: predicted cat x1, dog x1, none x1 (NaN or inf logits); 1/3 correct"

    from cam_monitor.render import caption_text, predicted_classes

    assert predicted_classes(logits) == [-1, 1, 0]
    assert caption_text(predicted_classes(logits), [0, 1, 2], compact=True) == [
        "p:- t:0", "ok 1", "x p:0 t:2"
    ]  # fmt: skip


def test_show_names_a_segmentation_probes_predicted_and_explained_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A segmentation probe's prediction is its recorded main predicted class (the mean logits,
    all background here, predict nothing); the explained classes and the explained class's
    IoU, pixel accuracy and share follow, their means over the images where they are defined."""
    record = Segmentation(
        predicted=np.array([2, 1, 2]),
        share=np.array([0.1, 0.2, np.nan]),
        iou=np.array([0.5, np.nan, np.nan]),
        accuracy=np.array([0.25, np.nan, np.nan]),
    )
    logits = np.array([[3.0, 1.0, 0.0]] * 3, np.float32)
    maps = {("val", "conv", "gradcam"): np.ones((3, 2, 2))}
    write_history(tmp_path, [evaluation(0, 0, maps, step=0, logits={"val": logits},
                                        targets={"val": np.array([1, 2, -1])},
                                        segmentation={"val": record})])  # fmt: skip
    code, out, _ = run_main(["show", str(tmp_path)], capsys)
    assert code == 0
    lines = out.splitlines()
    at = lines.index("  val: predicted 2 x2, 1 x1")
    assert lines[at + 1 : at + 4] == [
        "    (per image: its most frequent predicted class other than the background, class 0)",
        "    explained 1 x1, 2 x1, none x1 (a target callable's scores)",
        "    explained class, mean of 3 images: IoU 0.5000 (1 of 3), pixel accuracy 0.2500 "
        "(1 of 3), 15.0% (2 of 3) of the pixels",
    ]


def test_show_marks_the_final_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The evaluation added at the end of fit (an epoch count the schedule does not divide) is
    marked, as the history marks it; histories without one get no such column."""
    maps = {("val", "conv", "gradcam"): np.ones((1, 2, 2), np.float32)}
    write_history(
        tmp_path,
        [evaluation(index, epoch, maps, step=4 * epoch, final=index == 2)
         for index, epoch in enumerate((0, 2, 3))],
    )  # fmt: skip
    code, out, _ = run_main(["show", str(tmp_path)], capsys)
    assert code == 0
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("index"))
    assert lines[head].split()[-1] == "final"
    assert [line.split()[-1] == "yes" for line in lines[head + 1 : head + 4]] == [0, 0, 1]
    (tmp_path / "eval-00002.npz").unlink()
    code, out, _ = run_main(["show", str(tmp_path)], capsys)
    assert next(line for line in out.splitlines() if line.startswith("index")).endswith("time")


def test_compare_marks_localization_means_that_left_images_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `show` does: a run's energy over 6 of 8 images (two constant maps) is marked '*' and
    the note says how many images its mean left out."""
    group = MapKey("val", "conv", "gradcam")
    energy = ScalarKey("cam_loc", group, "energy")
    for name, scalars in (("a", {energy.tag: 0.5, energy.excluded.tag: 2.0}),
                          ("b", {energy.tag: 0.4})):  # fmt: skip
        maps = {group: np.arange(32, dtype=np.float32).reshape(2, 4, 4)}
        write_history(tmp_path / name, [evaluation(0, 0, maps, step=0, classes=3, scalars=scalars)])
    code, out, err = run_main(["compare", str(tmp_path / "a"), str(tmp_path / "b")], capsys)
    assert code == 0, err
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("epoch  spearman"))
    row = dict(zip(lines[head].split(), lines[head + 1].split(), strict=True))
    assert (row["energy_A"], row["energy_B"]) == ("0.5000*", "0.4000")
    assert "* epoch 0: images left out of a run's localization: energy_A 2" in out
