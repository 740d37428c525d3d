"""The benchmark scripts still run: `--quick` smoke runs in subprocesses, checked by what they did.

Timings are never asserted here; the scripts' numbers live in benchmarks/results/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # each script starts a Python and a small benchmark

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / f"{name}.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


def test_engine_quick_agrees_with_captum_and_checks_the_targets(tmp_path: Path) -> None:
    args = ("--models", "resnet50", "--contenders", "ours", "captum", "--no-memory")
    payload, stdout = run_script("engine", tmp_path, *args)
    rows = {(r["scenario"], r["contender"]): r for r in payload["rows"]}
    assert set(rows) == {(s, c) for s in ("1x1", "4x5") for c in ("forward", "ours", "captum")}
    assert rows["4x5", "ours"]["maps"] == rows["4x5", "captum"]["maps"] == "20/20"
    assert rows["1x1", "captum"]["max_abs_diff"] < 1e-4
    assert rows["4x5", "captum"]["max_abs_diff"] < 1e-4
    assert all(s > 0 for r in payload["rows"] for s in r["all_seconds"])
    assert "## Targets" in stdout and "4x5: ours / forward <= 1.6" in stdout


def test_host_overhead_quick_times_every_contender_on_the_same_maps(tmp_path: Path) -> None:
    payload, stdout = run_script("host_overhead", tmp_path)
    rows = {row["contender"]: row for row in payload["rows"]}
    assert set(rows) == {"forward", "floor", "ours", "torchcam", "captum"}
    assert all(rows[name]["max_abs_diff"] < 1e-5 for name in ("ours", "torchcam", "captum"))
    assert all(s > 0 for row in rows.values() for s in row["all_seconds"])
    assert rows["floor"]["x_floor"] == 1.0 and "compute_cams / floor <= 1.3" in stdout


def test_host_overhead_prototypes_give_the_floors_maps(tmp_path: Path) -> None:
    contenders = ("--contenders", "ours", "lean", "lean_unisolated")
    payload, _ = run_script("host_overhead", tmp_path, *contenders)
    rows = {row["contender"]: row for row in payload["rows"]}
    assert set(rows) == {"floor", "ours", "lean", "lean_unisolated"}
    assert all(rows[name]["max_abs_diff"] < 1e-6 for name in ("lean", "lean_unisolated"))


def test_evaluation_ops_quick_counts_each_piece_of_both_monitors(tmp_path: Path) -> None:
    payload, stdout = run_script("evaluation_ops", tmp_path)
    rows = {row["monitor"]: row for row in payload["rows"]}
    assert {name: row["maps"] for name, row in rows.items()} == {"issue 14": 4, "wide": 24}
    for row in rows.values():
        assert row["drawing the grids"] > 0 and row["drift, localization, entropy"] > 0
    # drawn in one pass: six times the grids, far fewer than six times the ops
    assert rows["wide"]["drawing the grids"] < 3 * rows["issue 14"]["drawing the grids"]
    assert "| monitor | maps |" in stdout


def test_overhead_quick_runs_three_arms_with_a_tensorboard_logger(tmp_path: Path) -> None:
    payload, stdout = run_script("overhead", tmp_path, "--logger", "tensorboard")
    evaluations = {row["arm"]: row["evaluations"] for row in payload["rows"]}
    # the baseline, then the epoch end (monitor) or the final model at the end of fit (idle)
    assert evaluations == {"plain": 0, "monitor": 2, "idle": 2}
    assert "- logger: tensorboard" in stdout


@pytest.fixture(scope="module")
def scaling_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_script("scaling", tmp_path_factory.mktemp("scaling"))[0]["rows"]


@pytest.mark.parametrize("sweep", ["images", "layers", "methods"])
def test_scaling_quick_sweeps_one_thing_at_a_time(
    sweep: str, scaling_rows: list[dict[str, Any]]
) -> None:
    rows = [r for r in scaling_rows if r["sweep"] == sweep]
    assert len(rows) >= 3
    varying = {key: len({r[key] for r in rows}) for key in ("images", "layers", "methods")}
    assert varying[sweep] == len(rows) and sum(varying.values()) == len(rows) + 2
    assert all(r["evaluation_s"] > 0 for r in rows)


def test_fidelity_quick_measures_ig_gaps_and_bf16_correlations(tmp_path: Path) -> None:
    payload, stdout = run_script("fidelity", tmp_path)
    as_built = [r for r in payload["ig"] if r["state"] == "as built"]
    assert as_built and all(r["max"] < 1e-3 for r in as_built), "homogeneous: IG is exact"
    assert all(len(r["relative_gaps"]) == 2 for r in payload["ig"])
    assert {r["method"] for r in payload["bf16"]} >= {"gradcam", "saliency"}
    assert "## CPU bf16 autocast vs float32" in stdout


def test_gpu_check_runs_on_cpu_and_reports_every_target(tmp_path: Path) -> None:
    # The one script a session with a GPU runs: it must still start, check and report here.
    out = tmp_path / "gpu.json"
    script = BENCHMARKS / "gpu_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(out.read_text())
    results = {c["check"]: c["result"] for c in payload["checks"]}
    assert "FAIL" not in results.values(), payload["checks"]
    assert results["maps stay on the model's device"] == "PASS"
    assert any(name.startswith("fit on cpu") and r == "PASS" for name, r in results.items())
    targets = [row[0] for row in payload["targets"]]
    for target in ("engine 1x1", "engine 4x5", "in-loop s per evaluation", "close()", "plain fit",
                   "cost per evaluation / compute_cams <= 2", "plain fit <= 1.05"):  # fmt: skip
        assert any(target in name for name in targets), (target, targets)
    contenders = {(r["scenario"], r["contender"]) for r in payload["engine"]}
    assert {("1x1", "floor"), ("1x1", "ours"), ("4x5", "floor"), ("4x5", "ours")} <= contenders
    jpeg = {row["path"]: row for row in payload["jpeg"]}  # issue 28, the GPU encoders' CPU paths
    cpu_path = jpeg["CPU path: to host, OpenCV on the encoder's threads"]
    assert (cpu_path["encoder"], cpu_path["chroma"], cpu_path["mean_vs_cpu"]) == (
        "opencv",
        "4:4:4",
        0,
    )
    for name in ("torchcodec", "torchvision"):
        row = jpeg[f"{name} alone, on CPU tensors"]
        assert (row["encoder"], row["chroma"]) == (name, "4:2:0") and row["mean_vs_cpu"] > 0
    assert results["JPEG grids on the GPU: the encoder that ran"] == "SKIP"
    assert results["pytest test_cuda_grids_are_drawn_and_encoded_on_the_gpu"] == "SKIP"
    assert "## JPEG encoding of one evaluation's grids" in done.stdout
    assert "all checks passed" in done.stdout


def test_probe_size_quick_measures_memory_history_and_grids(tmp_path: Path) -> None:
    payload, stdout = run_script("probe_size", tmp_path)
    first, second = payload["rows"]
    assert (first["probe"], first["batch_size"], second["batch_size"]) == (4, None, 2)
    width, height = map(int, first["grid_px"].split(" x "))
    assert width == 2 * 98 + 2 and height < 2 * 98  # max_tiles=2 of the 4 images: one row
    assert first["peak_rss_mib"] > 0 and first["history_file_mib"] > 0
    assert second["history_maps"] == "cams" and second["methods"] == "gradcam"
    assert second["history_record_mib"] < first["history_record_mib"]  # 1 method of 3 kept
    assert "| probe | batch_size |" in stdout


def test_faithfulness_cost_quick_times_every_measure_and_decides_the_default(
    tmp_path: Path,
) -> None:
    payload, stdout = run_script("faithfulness_cost", tmp_path)
    names = {row["contender"] for row in payload["rows"]}
    assert {"compute_cams (gradcam)", "drop + increase", "deletion + insertion"} <= names
    assert {"sanity check (gradcam)", "torchcam ClassificationMetric"} <= names
    assert payload["default"] in {"on by default", "opt-in"}
    assert "## Default" in stdout
