"""Comparing runs by the numbers: groups from maps and tags, probe checks, between-run similarity
against scipy, localization and series read through the schema, loading runs from disk, and
groups of runs (seeds) summarised by mean and min-max, also on histories written by real fits."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from pytorch_lightning.loggers import CSVLogger
from scipy.spatial.distance import jensenshannon
from scipy.stats import spearmanr
from torch.utils.data import TensorDataset

from cam_monitor.compare import (
    SIMILARITIES,
    ReportError,
    Run,
    RunGroup,
    Spread,
    check_probes,
    common_epochs,
    compare_group,
    format_number,
    load_run,
    localization,
    map_similarity,
    run_labels,
    scalar_series,
    spread_series,
    summarize_groups,
    summary_stats,
)
from cam_monitor.history import ProbeRecord
from cam_monitor.probe import content_hash
from cam_monitor.schema import DRIFT, LOCALIZATION, SECONDS_TAG, MapKey, ScalarKey
from tests.helpers import (
    ClassifierSteps,
    Lightning,
    LitClassifier,
    evaluation,
    fit,
    loader,
    shapes,
    write_history,
)

GROUP = MapKey("dom/ain", "features.29", "gradcam")


def test_map_similarity_matches_scipy_per_image_and_counts_undefined_images() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((4, 5, 6), dtype=np.float32)
    b = rng.random((4, 5, 6), dtype=np.float32)
    b[3] = 0.5  # a constant map: rank correlation and top-k set undefined, JS defined (uniform)
    sim = map_similarity(a, b)
    assert set(sim) == set(SIMILARITIES)

    rho = [spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(3)]
    assert sim["spearman"][1] == 1
    assert sim["spearman"][0] == pytest.approx(np.mean(rho), abs=1e-5)

    k = math.ceil(0.2 * 30)
    ious = []
    for i in range(3):
        top_a = set(np.argsort(-a[i].ravel())[:k])
        top_b = set(np.argsort(-b[i].ravel())[:k])
        ious.append(len(top_a & top_b) / len(top_a | top_b))
    assert sim["topk_iou"] == (pytest.approx(np.mean(ious), abs=1e-6), 1)

    js = [jensenshannon(a[i].ravel(), b[i].ravel()) ** 2 for i in range(4)]  # natural log
    assert sim["js"] == (pytest.approx(np.mean(js), abs=1e-5), 0)


def test_groups_come_from_maps_and_schema_tags_in_first_appearance_order() -> None:
    loc_only = MapKey("dom/ain", "layer4", "gradcam++")
    first = evaluation(0, 0, maps={GROUP: np.ones((2, 3, 3))}, scalars={SECONDS_TAG: 1.0})
    second = evaluation(
        1,
        1,
        maps={GROUP: np.ones((2, 3, 3))},
        scalars={
            ScalarKey(LOCALIZATION, loc_only, "energy").tag: 0.5,
            ScalarKey(DRIFT, GROUP, "js_ref").tag: 0.1,
            "loss": 2.0,  # not a monitor tag: no group
        },
    )
    run = Run("a", Path("a"), [first, second])
    assert run.groups == [GROUP, loc_only]
    assert all(isinstance(group, MapKey) for group in run.groups)
    assert run.probes == ["dom/ain"]
    assert run.hashes() == {"dom/ain": ["aaaaaaaaaaaa"]}


def test_by_epoch_keeps_the_first_evaluation_of_each_epoch() -> None:
    run = Run("a", Path("a"), [evaluation(0, 0), evaluation(1, 0), evaluation(2, 3)])
    assert [ev.index for ev in run.by_epoch.values()] == [0, 2]
    assert run.repeated_epochs == [0]
    other = Run("b", Path("b"), [evaluation(0, 3), evaluation(1, 4)])
    assert common_epochs(run, other) == [3]


def test_check_probes_refuses_different_data_and_notes_what_it_cannot_check() -> None:
    maps = {GROUP: np.ones((2, 3, 3))}
    same = Run("a", Path("a"), [evaluation(0, 0, maps)])
    assert check_probes(same, Run("b", Path("b"), [evaluation(0, 0, maps)])) == []

    other = Run("b", Path("b"), [evaluation(0, 0, maps, hashes={"dom/ain": "bbbbbbbbbbbb"})])
    with pytest.raises(ReportError, match=r"'dom/ain' differs.*aaaaaaaaaaaa.*bbbbbbbbbbbb"):
        check_probes(same, other)

    unhashed = Run("c", Path("c"), [evaluation(0, 0, maps, hashes={})])
    (note,) = check_probes(same, unhashed)
    assert "c recorded no hash" in note

    changed = Run(
        "d",
        Path("d"),
        [evaluation(0, 0, maps), evaluation(1, 1, maps, hashes={"dom/ain": "cccccccccccc"})],
    )
    notes = check_probes(changed, same)
    assert len(notes) == 1 and "changed within run d" in notes[0]


def test_compare_group_reads_localization_through_the_schema_and_explains_gaps() -> None:
    rng = np.random.default_rng(1)
    maps = rng.random((3, 4, 4), dtype=np.float32)
    energy = ScalarKey(LOCALIZATION, GROUP, "energy").tag
    a = Run(
        "a",
        Path("a"),
        [
            evaluation(0, 0, {GROUP: maps}, scalars={energy: 0.25}),
            evaluation(1, 1, {GROUP: maps}),
            evaluation(2, 2, {GROUP: maps}),
        ],
    )
    b = Run(
        "b",
        Path("b"),
        [
            evaluation(0, 0, {GROUP: maps[:, ::-1].copy()}, scalars={energy: 0.75}),
            evaluation(1, 1, {GROUP: maps[:, :2]}),
            evaluation(2, 2, {MapKey("dom/ain", "other", "gradcam"): maps}),
        ],
    )
    rows = compare_group(a, b, tuple(GROUP), [0, 1, 2])  # a plain tuple works as a group
    assert [row.epoch for row in rows] == [0, 1, 2]
    assert rows[0].images == 3 and rows[0].note == ""
    assert rows[0].similarity == map_similarity(maps, maps[:, ::-1])
    assert rows[0].localization_a == {"energy": 0.25}
    assert rows[0].localization_b == {"energy": 0.75}
    assert (
        rows[1].similarity == {} and rows[1].note == "maps differ in shape: (3, 4, 4) vs (3, 2, 4)"
    )
    assert rows[2].similarity == {} and rows[2].note == "no maps in b"
    assert localization(a.evaluations[1], GROUP) == {}


def test_scalar_series_follows_epochs_with_nan_for_missing_values() -> None:
    key = ScalarKey(DRIFT, GROUP, "spearman_ref")
    run = Run(
        "a",
        Path("a"),
        [evaluation(0, 0, scalars={key.tag: 0.0}), evaluation(1, 2), evaluation(2, 5)],
    )
    epochs, values = scalar_series(run, key)
    assert epochs == [0, 2, 5]
    assert values[0] == 0.0 and math.isnan(values[1]) and math.isnan(values[2])


def test_the_same_inputs_with_other_masks_or_labels_are_noted_as_not_comparable() -> None:
    maps = {GROUP: np.ones((2, 3, 3))}
    inputs = {"dom/ain": np.zeros((2, 3, 4, 4), np.float32)}
    masks = np.zeros((2, 4, 4), bool)
    masks[:, :2] = True
    labels = np.array([0, 1])

    def run(name: str, masks: np.ndarray | None, labels: np.ndarray) -> Run:
        probe = ProbeRecord(
            inputs, {"dom/ain": labels}, {} if masks is None else {"dom/ain": masks}
        )
        return Run(name, Path(name), [evaluation(0, 0, maps)], probe=probe)

    assert check_probes(run("a", masks, labels), run("b", masks.copy(), labels.copy())) == []
    (note,) = check_probes(run("a", masks, labels), run("b", ~masks, labels))
    assert "'dom/ain' holds the same inputs in a and b but different masks" in note
    assert "localization scores (cam_loc)" in note
    (note,) = check_probes(run("a", masks, labels), run("c", None, labels[::-1].copy()))
    assert "different masks and labels" in note and "target='label'" in note


def test_load_run_reads_history_and_probe_and_survives_a_corrupt_probe(tmp_path: Path) -> None:
    inputs = np.zeros((2, 3, 4, 4), np.float32)
    history = tmp_path / "run" / "logs" / "cam_monitor"
    write_history(
        history,
        [evaluation(index, index, {GROUP: np.ones((2, 3, 3))}) for index in range(2)],
        probe=({"dom/ain": inputs}, {}, {}, {"dom/ain": content_hash(inputs)}),
    )
    run = load_run(tmp_path / "run")
    assert run.name == "run" and run.folder == history
    assert [ev.index for ev in run.evaluations] == [0, 1]
    assert run.probe is not None and run.probe.inputs["dom/ain"].shape == (2, 3, 4, 4)

    (history / "probe.npz").write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match=r"probe\.npz"):
        assert load_run(tmp_path / "run", name="x").probe is None
    with pytest.raises(ValueError, match=r"probe\.npz"):
        load_run(tmp_path / "run", strict=True)


def test_one_number_formatter_for_terminal_and_report() -> None:
    values = (1 / 3, -2.0, float("nan"), None, float("-inf"))
    assert [format_number(v) for v in values] == ["0.3333", "-2.0000", "nan", "-", "-inf"]


# --------------------------------------------------------------------------- groups of runs

ENERGY = ScalarKey(LOCALIZATION, GROUP, "energy")
DRIFT_REF = ScalarKey(DRIFT, GROUP, "spearman_ref")


def scored_run(name: str, energies: list[float], drift: float | None = 0.1) -> Run:
    """A run with one evaluation per epoch and the given energy at each."""
    maps = {GROUP: np.ones((2, 3, 3), np.float32)}
    evaluations = []
    for epoch, value in enumerate(energies):
        scalars = {ENERGY.tag: value}
        if drift is not None:
            scalars[DRIFT_REF.tag] = drift * epoch
        evaluations.append(evaluation(epoch, epoch, maps, scalars=scalars))
    return Run(name, Path(name), evaluations)


def test_spread_is_mean_and_min_max_of_the_defined_values() -> None:
    spread = Spread.of([0.1, float("nan"), 0.5, 0.3])
    assert spread.mean == pytest.approx(0.3) and (spread.low, spread.high) == (0.1, 0.5)
    assert (spread.finite, spread.total) == (3, 4)
    assert spread.text() == "0.3000 [0.1000, 0.5000] (3 of 4 runs)"  # one run undefined
    assert Spread.of([0.1, float("nan"), None]).text() == "0.1000 (1 of 2 runs)"
    assert Spread.of([0.1, 0.5, None]).text() == "0.3000 [0.1000, 0.5000]"  # one not recorded
    undefined = Spread.of([float("nan"), float("nan")])
    assert math.isnan(undefined.mean) and undefined.finite == 0 and undefined.text() == "nan"
    assert Spread.of([0.2, 0.2]).text() == "0.2000"  # no range where the runs agree


def test_summarize_groups_gives_each_group_its_mean_range_difference_and_the_higher() -> None:
    baseline = RunGroup("source_only", (scored_run("s0", [0.3, 0.2]), scored_run("s1", [0.3, 0.4])))
    adapted = RunGroup("dann", (scored_run("d0", [0.3, 0.5]), scored_run("d1", [0.3, 0.7])))
    assert baseline.keys == [GROUP] and baseline.epochs == [0, 1]
    rows = summarize_groups([baseline, adapted], [GROUP], epoch=1)
    assert [row.key for row in rows] == [ENERGY, DRIFT_REF]  # localization, then drift
    energy = rows[0]
    assert energy.values[0] == Spread(pytest.approx(0.3), 0.2, 0.4, 2, 2)
    assert energy.values[1] == Spread(pytest.approx(0.6), 0.5, 0.7, 2, 2)
    assert energy.runs == ((0.2, 0.4), (0.5, 0.7))
    assert energy.differences == (pytest.approx(0.3),)
    assert energy.highest == 1 and not energy.overlaps  # 0.5-0.7 lies above 0.2-0.4
    close = RunGroup("close", (scored_run("c0", [0.3, 0.35]), scored_run("c1", [0.3, 0.39])))
    (row, _) = summarize_groups([baseline, close], [GROUP], epoch=1)
    assert row.highest == 1 and row.overlaps  # 0.37 > 0.3 but 0.35-0.39 is inside 0.2-0.4
    drift = rows[1]
    assert drift.highest is None  # both groups drifted 0.1: a tie names no one
    undefined = RunGroup("flat", (scored_run("f0", [0.3, float("nan")]),))
    (row, _) = summarize_groups([undefined, baseline], [GROUP], epoch=1)
    assert row.highest is None  # one defined mean: nothing to be higher than
    (row, _) = summarize_groups([undefined, baseline, adapted], [GROUP], epoch=1)
    assert row.highest == 2  # still the highest of the groups that have a value
    series = spread_series(adapted, ENERGY, [0, 1])
    assert [s.mean for s in series] == [pytest.approx(0.3), pytest.approx(0.6)]


def test_a_value_no_run_recorded_reads_as_missing_not_as_undefined() -> None:
    """'-' = not recorded, 'nan' = undefined, as in `show`: the baseline has no drift (no
    earlier map), which is not the drift of a constant map."""
    runs = [scored_run("s0", [0.3, 0.2]), scored_run("s1", [0.3, 0.4])]
    del runs[1].evaluations[1].scalars[DRIFT_REF.tag]
    runs[0].evaluations[1].scalars[DRIFT_REF.tag] = math.nan
    for run in runs:
        del run.evaluations[0].scalars[DRIFT_REF.tag]  # as the monitor writes a baseline
    group = RunGroup("g", tuple(runs))
    (_, at_baseline) = summarize_groups([group, group], [GROUP], epoch=0)
    assert at_baseline.values[0].text() == "-" and at_baseline.runs[0] == (None, None)
    (_, later) = summarize_groups([group, group], [GROUP], epoch=1)
    assert later.values[0].text() == "nan" and later.values[0].total == 1
    assert later.runs[0][1] is None and math.isnan(later.runs[0][0])
    assert [s.text() for s in spread_series(group, DRIFT_REF, [0, 1])] == ["-", "nan"]


def test_summary_stats_fall_back_to_a_recorded_drift_measure() -> None:
    run = scored_run("a", [0.3], drift=None)
    js = ScalarKey(DRIFT, GROUP, "js_ref")
    run.evaluations[0].scalars[js.tag] = 0.2
    assert summary_stats([RunGroup.single(run)], GROUP) == [ENERGY, js]
    with pytest.raises(ValueError, match="no runs"):
        RunGroup("empty", ())


def test_check_probes_compares_every_run_with_the_first() -> None:
    maps = {GROUP: np.ones((2, 3, 3))}
    runs = [Run(n, Path(n), [evaluation(0, 0, maps)]) for n in "abc"]
    assert check_probes(*runs) == []
    odd = Run("d", Path("d"), [evaluation(0, 0, maps, hashes={"dom/ain": "dddddddddddd"})])
    with pytest.raises(ReportError, match=r"a has hash aaaaaaaaaaaa, d has hash dddddddddddd"):
        check_probes(*runs, odd)
    assert run_labels("x/s0/run", "x/s1/run", "y/s0/run") == ("x/s0/run", "x/s1/run", "y/s0/run")


# -- on histories written by real fits ------------------------------------------------------

CLASS_NAMES = ("north-west", "north-east", "south-west", "south-east", "centre")
FIT_PROBES = ("target", "source")


def fit_run(root: Path, name: str, seed: int, lr: float) -> Path:
    """One real `Trainer.fit` (2 epochs) with a CamMonitor on two probes with masks."""
    from cam_monitor import CamMonitor

    probes = {p: shapes(10, 50 + i, p) for i, p in enumerate(FIT_PROBES)}
    monitor = CamMonitor(
        "net.features.5",
        probe={p: (x, y) for p, (x, y, _) in probes.items()},
        masks={p: m for p, (_, _, m) in probes.items()},
        class_names=list(CLASS_NAMES),
        save_dir=root / name / "cam_monitor",
    )
    images, labels, _ = shapes(48, seed)
    logger = CSVLogger(root, name=name, version="")
    train = TensorDataset(images, labels)
    fit(monitor, root / name, model=partial(LitClassifier, lr=lr), train=train, val=False,
        seed=seed, logger=logger)  # fmt: skip
    return root / name


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Two recipes x two seeds, each a real fit."""
    root = tmp_path_factory.mktemp("fits")
    return {
        recipe: [fit_run(root, f"{recipe}_s{seed}", seed, lr) for seed in (0, 1)]
        for recipe, lr in (("slow", 0.01), ("fast", 0.2))
    }


def read_scalar(folder: Path, epoch: int, tag: str) -> float:
    """A scalar straight from an eval file's JSON meta, with numpy alone."""
    for path in sorted((folder / "cam_monitor").glob("eval-*.npz")):
        with np.load(path) as npz:
            meta = json.loads(str(npz["meta"]))
        if meta["epoch"] == epoch:
            value = meta["scalars"][tag]
            return math.nan if value is None else float(value)
    raise AssertionError(f"no evaluation at epoch {epoch} in {folder}")


@pytest.mark.slow
def test_grouped_comparison_on_real_fits_matches_the_files(fitted: dict[str, list[Path]]) -> None:
    groups = [
        RunGroup(recipe, tuple(load_run(path) for path in paths))
        for recipe, paths in fitted.items()
    ]
    run = groups[0].runs[0]
    assert run.evaluations[-1].class_names == CLASS_NAMES  # stored by the callback
    assert check_probes(*(r for g in groups for r in g.runs)) == []  # same probes everywhere
    keys = groups[0].keys
    assert keys == [MapKey(p, "net.features.5", "gradcam") for p in FIT_PROBES]
    epochs = common_epochs(*(r for g in groups for r in g.runs))
    assert epochs == [0, 1, 2]
    rows = summarize_groups(groups, keys, epochs[-1])
    stats = [(row.key.maps.probe, row.key.kind, row.key.stat) for row in rows]
    assert stats == [
        (p, kind, stat)
        for p in FIT_PROBES
        for kind, stat in [(LOCALIZATION, s) for s in ("energy", "pointing", "mask_iou")]
        + [(DRIFT, "spearman_ref")]
    ]
    for row in rows:
        for group, spread, singles in zip(groups, row.values, row.runs, strict=True):
            paths = fitted[group.name]
            expected = [read_scalar(path, epochs[-1], row.key.tag) for path in paths]
            assert singles == pytest.approx(expected, nan_ok=True)
            finite = [v for v in expected if not math.isnan(v)]
            assert spread.finite == len(finite)
            if finite:
                assert spread.mean == pytest.approx(np.mean(finite))
                assert (spread.low, spread.high) == (min(finite), max(finite))
        difference = row.values[1].mean - row.values[0].mean
        assert row.differences == (pytest.approx(difference, nan_ok=True),)


@pytest.mark.slow
def test_cli_compares_groups_of_real_fits_and_shows_class_names(
    fitted: dict[str, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cam_monitor.cli import main

    report = tmp_path / "report.html"
    groups = [f"{recipe}={','.join(map(str, paths))}" for recipe, paths in fitted.items()]
    args = ["compare", "--group", groups[0], "--group", groups[1], "--out", str(report)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "slow: slow_s0, slow_s1" in out and "fast: fast_s0, fast_s1" in out
    assert "Summary at epoch 2" in out and "fast-slow" in out
    page = report.read_text(encoding="utf-8")
    # The answer first: the summary table, then the runs, the curves, the overlays.
    order = [page.index(h) for h in ("Summary at epoch 2", "id='runs'", "id='curves'",
                                     "id='overlays'")]  # fmt: skip
    assert order == sorted(order) and page.index("<table") > order[0]
    assert "2 runs" in page and "Single runs" in page and "min-max" in page

    assert main(["show", str(fitted["fast"][0])]) == 0
    out = capsys.readouterr().out
    predicted = next(line for line in out.splitlines() if line.startswith("  target: predicted"))
    assert any(name in predicted for name in CLASS_NAMES) and "/10 correct" in predicted


class OnDemand:
    """`ClassifierSteps` that calls `CamMonitor.evaluate` at each validation end, as the README
    suggests, and once after training."""

    monitor = None

    def on_validation_epoch_end(self) -> None:
        if self.monitor is not None and not self.trainer.sanity_checking:
            self.monitor.evaluate(self.trainer, self)

    def on_train_end(self) -> None:
        if self.monitor is not None:
            self.monitor.evaluate(self.trainer, self)


def schedule_fit(
    root: Path, name: str, lightning: Lightning, on_demand: bool = False, **schedule: int
) -> Run:
    """Seed 0, 2 epochs of 3 steps, the same probe: only the monitor's schedule differs."""
    from cam_monitor import CamMonitor

    images, labels, _ = shapes(12, seed=3)
    monitor = CamMonitor("net.features.5", probe=(images[:4], labels[:4]),
                         save_dir=root / name, **schedule)  # fmt: skip
    steps = type("Steps", (OnDemand, ClassifierSteps), {"monitor": monitor if on_demand else None})
    data = loader(TensorDataset(images, labels), batch_size=4)
    fit(monitor, root / name, lightning, model=lightning.module(steps), train=data, val=data,
        num_sanity_val_steps=0)  # fmt: skip
    return load_run(root / name, name=name)


def test_a_step_schedule_labels_each_evaluation_with_the_epochs_completed(
    tmp_path: Path, lightning: Lightning
) -> None:
    """An evaluation after an epoch's last step has completed that epoch, like the epoch-end one
    on the same weights: the same training evaluated by steps and by epochs compares as
    identical at every epoch, not epoch 1 of one run against epoch 2 of the other."""
    by_steps = schedule_fit(tmp_path, "steps", lightning, every_n_steps=3)
    by_epochs = schedule_fit(tmp_path, "epochs", lightning, every_n_epochs=1)
    assert [(e.epoch, e.step) for e in by_steps.evaluations] == [(0, 0), (1, 3), (2, 6)]
    assert [(e.epoch, e.step) for e in by_epochs.evaluations] == [(0, 0), (1, 3), (2, 6)]
    assert by_steps.repeated_epochs == []
    key = MapKey("probe", "net.features.5", "gradcam")
    for row in compare_group(by_steps, by_epochs, key, common_epochs(by_steps, by_epochs)):
        assert row.index_a == row.index_b
        assert row.similarity["spearman"][0] == pytest.approx(1.0)
    # `evaluate()` at the end of each epoch's validation: the epochs completed, as scheduled.
    on_demand = schedule_fit(tmp_path, "demand", lightning, on_demand=True, every_n_epochs=99)
    assert [(e.epoch, e.step) for e in on_demand.evaluations] == [(0, 0), (1, 3), (2, 6), (2, 6)]
    for row in compare_group(on_demand, by_epochs, key, [0, 1, 2]):
        assert row.similarity["spearman"][0] == pytest.approx(1.0)


def test_signed_maps_are_compared_by_their_size_as_drift_scores_them() -> None:
    """Integrated gradients of opposite sign put the same weight on the same pixels: between
    runs they compare as drift would (on |map|), not as anti-correlated with JS undefined."""
    rng = np.random.default_rng(4)
    maps = rng.standard_normal((3, 6, 6)).astype(np.float32)
    key = MapKey("val", "input", "integrated_gradients")
    a = Run("a", Path("a"), [evaluation(0, 0, {key: maps})])
    b = Run("b", Path("b"), [evaluation(0, 0, {key: -maps})])
    (row,) = compare_group(a, b, key, [0])
    assert row.similarity["spearman"] == (pytest.approx(1.0), 0)
    assert row.similarity["topk_iou"] == (pytest.approx(1.0), 0)
    assert row.similarity["js"] == (pytest.approx(0.0, abs=1e-6), 0)
    assert np.array_equal(a.evaluations[0].maps[key], maps)  # the history is left as it is
