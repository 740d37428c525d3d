"""Comparing runs by the numbers: groups from maps and tags, probe checks, between-run similarity
against scipy, localization and series read through the schema, loading runs from disk."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import spearmanr

from cam_monitor.compare import (
    SIMILARITIES,
    ReportError,
    Run,
    check_probes,
    common_epochs,
    compare_group,
    format_number,
    load_run,
    localization,
    map_similarity,
    scalar_series,
)
from cam_monitor.history import Evaluation, write_evaluation, write_probe
from cam_monitor.probe import content_hash
from cam_monitor.schema import DRIFT, LOCALIZATION, SECONDS_TAG, MapKey, ScalarKey

GROUP = MapKey("dom/ain", "features.29", "gradcam")


def evaluation(
    index: int,
    epoch: int,
    maps: dict[MapKey, np.ndarray] | None = None,
    scalars: dict[str, float] | None = None,
    hashes: dict[str, str] | None = None,
) -> Evaluation:
    maps = maps or {}
    probes = {key.probe: array.shape[0] for key, array in maps.items()}
    return Evaluation(
        index=index,
        epoch=epoch,
        step=10 * index,
        probe_hashes=hashes if hashes is not None else {p: "aaaaaaaaaaaa" for p in probes},
        maps=maps,
        targets={p: np.zeros(n, np.int64) for p, n in probes.items()},
        logits={p: np.zeros((n, 2), np.float32) for p, n in probes.items()},
        scalars=scalars or {},
    )


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
            evaluation(0, 0, {GROUP: maps}, {energy: 0.25}),
            evaluation(1, 1, {GROUP: maps}),
            evaluation(2, 2, {GROUP: maps}),
        ],
    )
    b = Run(
        "b",
        Path("b"),
        [
            evaluation(0, 0, {GROUP: maps[:, ::-1].copy()}, {energy: 0.75}),
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


def test_load_run_reads_history_and_probe_and_survives_a_corrupt_probe(tmp_path: Path) -> None:
    inputs = np.zeros((2, 3, 4, 4), np.float32)
    history = tmp_path / "run" / "logs" / "cam_monitor"
    for index in range(2):
        write_evaluation(history, evaluation(index, index, {GROUP: np.ones((2, 3, 3))}))
    write_probe(history, {"dom/ain": inputs}, {}, {}, {"dom/ain": content_hash(inputs)})
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
