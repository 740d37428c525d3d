"""History files: round trips, atomic writes, corrupt files, discovery, pruning, probe hashes,
format-1 files built by hand, and the records built from real probe sets and CAM results."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cam_monitor.engine import CamResult, compute_cams
from cam_monitor.history import (
    PROBE_FILE,
    Evaluation,
    HistoryError,
    Segmentation,
    evaluation_path,
    evaluation_record,
    find_history,
    history_runs,
    prune_from,
    read_evaluation,
    read_history,
    read_probe,
    write_evaluation,
    write_probe,
    write_probe_sets,
)
from cam_monitor.probe import ProbeSet, content_hash
from cam_monitor.schema import DRIFT, LOCALIZATION, SECONDS_TAG, MapKey, ScalarKey

PROBES = ("source", "target")
LAYERS = ("features.29", "layer4.1.conv2")
METHODS = ("gradcam", "gradcam++")


def make_evaluation(index: int = 0, seed: int = 0, **scalars: float) -> Evaluation:
    """Two probes (batch 3 and 2) x two layers x two methods, labels for "source" only."""
    rng = np.random.default_rng(seed)
    batch = {"source": 3, "target": 2}
    maps = {
        (p, layer, m): rng.random((batch[p], 4, 5), dtype=np.float32) * 10
        for p in PROBES
        for layer in LAYERS
        for m in METHODS
    }
    return Evaluation(
        index=index,
        epoch=2 * index,
        step=100 * index + 7,
        probe_hashes={p: f"{p[:1]}" * 12 for p in PROBES},
        maps=maps,
        targets={p: rng.integers(0, 10, batch[p]) for p in PROBES},
        logits={p: rng.standard_normal((batch[p], 10)).astype(np.float32) for p in PROBES},
        labels={"source": np.array([1, 2, 2**40])},
        scalars={"drift/prev": 0.25, **scalars},
    )


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    ev = make_evaluation(index=3, first=float("nan"), up=float("inf"), down=float("-inf"))
    path = write_evaluation(tmp_path / "new" / "cam_monitor", ev)
    assert path == tmp_path / "new" / "cam_monitor" / "eval-00003.npz"
    back = read_evaluation(path)

    assert (back.index, back.epoch, back.step) == (3, 6, 307)
    assert back.probe_hashes == ev.probe_hashes
    assert back.probes == PROBES and back.layers == LAYERS and back.methods == METHODS
    assert list(back.maps) == list(ev.maps)
    for key, original in ev.maps.items():
        assert back.maps[key].dtype == np.float32
        np.testing.assert_array_equal(back.maps[key], original.astype(np.float32))
    for probe in PROBES:
        assert back.targets[probe].dtype == np.int64
        np.testing.assert_array_equal(back.targets[probe], ev.targets[probe])
        np.testing.assert_array_equal(back.logits[probe], ev.logits[probe])
    assert list(back.labels) == ["source"]
    np.testing.assert_array_equal(back.labels["source"], [1, 2, 2**40])
    assert back.scalars["drift/prev"] == 0.25
    assert math.isnan(back.scalars["first"])
    assert back.scalars["up"] == math.inf and back.scalars["down"] == -math.inf
    assert back.time is not None and back.time.startswith("20") and back.time.endswith("+00:00")


def test_maps_keep_tiny_values_nan_and_inf(tmp_path: Path) -> None:
    values = np.array([[[1e-9, -3e-7, np.nan], [np.inf, -np.inf, 1e6]]], dtype=np.float64)
    ev = Evaluation(
        index=0,
        epoch=0,
        step=0,
        probe_hashes={},
        maps={("p", "l", "m"): values},
        targets={"p": np.array([0], dtype=np.int32)},
        logits={"p": np.zeros((1, 2))},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning from the cast either
        back = read_evaluation(write_evaluation(tmp_path, ev)).maps["p", "l", "m"]
    np.testing.assert_array_equal(back, values.astype(np.float32))
    assert back[0, 0, 0] > 0  # float16 would have flushed 1e-9 to zero


def test_awkward_names_round_trip(tmp_path: Path) -> None:
    key = ("dom/ain", "blk\\1.conv", "50%+cam")
    ev = Evaluation(
        index=0,
        epoch=0,
        step=0,
        probe_hashes={"dom/ain": "abc"},
        maps={key: np.ones((1, 2, 2)), ("Quelle-ü", "a.b", "m"): np.ones((1, 2, 2))},
        targets={"dom/ain": np.array([1]), "Quelle-ü": np.array([0])},
        logits={"dom/ain": np.zeros((1, 3)), "Quelle-ü": np.zeros((1, 3))},
    )
    path = write_evaluation(tmp_path, ev)
    back = read_evaluation(path)
    assert set(back.maps) == {key, ("Quelle-ü", "a.b", "m")}
    assert back.probe_hashes == {"dom/ain": "abc"}
    with np.load(path) as npz:
        assert "maps/dom%2Fain/blk%5C1.conv/50%25+cam" in npz.files
        assert "maps/Quelle-ü/a.b/m" in npz.files


def test_history_is_sorted_by_index(tmp_path: Path) -> None:
    for index in (2, 100000, 0, 1):
        write_evaluation(tmp_path, make_evaluation(index=index, seed=index))
    assert "eval-100000.npz" in names(tmp_path)
    history = read_history(tmp_path)
    assert [ev.index for ev in history] == [0, 1, 2, 100000]
    np.testing.assert_array_equal(
        history[2].targets["source"], make_evaluation(index=2, seed=2).targets["source"]
    )


def test_rewrite_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    write_evaluation(tmp_path, make_evaluation(index=0, seed=0))
    write_evaluation(tmp_path, make_evaluation(index=0, seed=5))
    assert names(tmp_path) == {"eval-00000.npz"}
    back = read_history(tmp_path)[0]
    np.testing.assert_array_equal(back.logits["target"], make_evaluation(seed=5).logits["target"])


def test_a_file_of_another_run_is_never_replaced(tmp_path: Path) -> None:
    """Two runs started at once with one save_dir: the second's write of an index the first
    already wrote fails naming both runs (the callback warns), instead of taking its place."""
    write_evaluation(tmp_path, replace(make_evaluation(index=0, seed=0), run="aaaa"))
    with pytest.raises(HistoryError, match=r"eval-00000.npz was written by run aaaa, not by thi"):
        write_evaluation(tmp_path, replace(make_evaluation(index=0, seed=5), run="bbbb"))
    with pytest.raises(HistoryError, match=r"run \(no id\)"):
        write_evaluation(tmp_path, make_evaluation(index=0, seed=5))
    assert history_runs(tmp_path) == {"aaaa": [0]}
    back = read_history(tmp_path)[0]
    np.testing.assert_array_equal(back.logits["target"], make_evaluation(seed=0).logits["target"])
    write_evaluation(tmp_path, replace(make_evaluation(index=0, seed=5), run="aaaa"))  # resumed
    assert history_runs(tmp_path) == {"aaaa": [0]} and len(names(tmp_path)) == 1
    inputs = {"p": np.zeros((1, 3, 2, 2))}
    write_probe(tmp_path, inputs, {}, {}, {"p": "x"}, run="aaaa")
    with pytest.raises(HistoryError, match=r"probe.npz was written by run aaaa"):
        write_probe(tmp_path, {"p": np.ones((1, 3, 2, 2))}, {}, {}, {"p": "y"}, run="bbbb")
    record = read_probe(tmp_path)
    assert record is not None and record.run == "aaaa" and record.hashes == {"p": "x"}


def test_failed_write_cleans_up_its_temp_file(tmp_path: Path) -> None:
    (tmp_path / "eval-00000.npz").mkdir()  # os.replace onto a folder fails for real
    with pytest.raises(OSError):
        write_evaluation(tmp_path, make_evaluation())
    assert names(tmp_path) == {"eval-00000.npz"}


def test_readers_ignore_temp_and_foreign_files(tmp_path: Path) -> None:
    write_evaluation(tmp_path, make_evaluation(index=0))
    (tmp_path / ".eval-00001.npz.0123abcd.tmp").write_bytes(b"PK\x03\x04 half a file")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "eval-1.npz").write_bytes(b"not canonical")
    (tmp_path / "eval-00002.npz.bak").write_bytes(b"backup")
    (tmp_path / "images").mkdir()
    assert [ev.index for ev in read_history(tmp_path)] == [0]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_file_raises_naming_it_unless_not_strict(tmp_path: Path) -> None:
    for index in range(3):
        write_evaluation(tmp_path, make_evaluation(index=index))
    bad = evaluation_path(tmp_path, 1)
    truncate(bad)
    with pytest.raises(HistoryError, match=r"eval-00001\.npz") as info:
        read_history(tmp_path)
    assert "strict=False" in str(info.value) and "Delete" in str(info.value)
    assert isinstance(info.value, ValueError)

    with pytest.warns(UserWarning, match=r"eval-00001\.npz"):
        history = read_history(tmp_path, strict=False)
    assert [ev.index for ev in history] == [0, 2]


def test_corrupt_bytes_inside_a_complete_zip_are_detected(tmp_path: Path) -> None:
    path = write_evaluation(tmp_path, make_evaluation())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("maps/source/features.29/gradcam.npy")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for offset in range(start + 5, start + 25):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(HistoryError, match="truncated or corrupt"):
        read_evaluation(path)


def test_empty_file_and_all_corrupt_history(tmp_path: Path) -> None:
    evaluation_path(tmp_path, 0).write_bytes(b"")
    with pytest.raises(HistoryError, match=r"eval-00000\.npz"):
        read_history(tmp_path)
    with pytest.warns(UserWarning), pytest.raises(HistoryError, match="all 1 eval-"):
        read_history(tmp_path, strict=False)


def test_renamed_file_is_rejected(tmp_path: Path) -> None:
    shutil.copy(write_evaluation(tmp_path, make_evaluation(index=0)), tmp_path / "eval-00004.npz")
    with pytest.raises(HistoryError, match=r"eval-00004\.npz.*renamed"):
        read_history(tmp_path)
    with pytest.warns(UserWarning, match=r"eval-00004\.npz"):
        assert [ev.index for ev in read_history(tmp_path, strict=False)] == [0]


def test_newer_format_asks_for_an_upgrade(tmp_path: Path) -> None:
    path = evaluation_path(tmp_path, 0)
    np.savez_compressed(path, meta=np.array(json.dumps({"format": 2, "index": 0})))
    with pytest.raises(HistoryError, match=r"format 2.*upgrade"):
        read_evaluation(path)


def test_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match=r"No cam-monitor history.*does not exist"):
        read_history(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(HistoryError, match=r"No cam-monitor history in .*expected eval-\*\.npz"):
        read_history(tmp_path)
    with pytest.raises(HistoryError, match="not a folder"):
        read_history(tmp_path / "notes.txt")
    with pytest.raises(HistoryError, match="does not exist"):
        read_evaluation(tmp_path / "eval-00000.npz")


def test_find_history_in_nested_run_dirs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    history = run / "lightning_logs" / "version_0" / "cam_monitor"
    write_evaluation(history, make_evaluation())
    (run / "lightning_logs" / "version_0" / "checkpoints").mkdir()
    (run / ".hidden" / "cam_monitor").mkdir(parents=True)
    write_evaluation(run / ".hidden" / "cam_monitor", make_evaluation())  # skipped: hidden
    assert find_history(run) == history
    assert find_history(history) == history
    assert find_history(history / "eval-00000.npz") == history

    wandb_run = tmp_path / "wb" / "wandb" / "run-20240101_000000-abc" / "files" / "cam_monitor"
    write_evaluation(wandb_run, make_evaluation())
    (tmp_path / "wb" / "wandb" / "latest-run").symlink_to(wandb_run.parents[1])
    assert find_history(tmp_path / "wb") == wandb_run  # the symlink is not a second match


def test_find_history_ambiguous_or_absent(tmp_path: Path) -> None:
    first = tmp_path / "lightning_logs" / "version_0" / "cam_monitor"
    second = tmp_path / "lightning_logs" / "version_1" / "cam_monitor"
    write_evaluation(first, make_evaluation())
    write_evaluation(second, make_evaluation())
    with pytest.raises(HistoryError, match="Found 2") as info:
        find_history(tmp_path)
    assert str(first) in str(info.value) and str(second) in str(info.value)

    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(HistoryError, match="Looked in") as info:
        find_history(empty)
    assert "checkpoints" in str(info.value)
    with pytest.raises(HistoryError, match="does not exist"):
        find_history(tmp_path / "nope")


def test_prune_from_deletes_later_evaluations(tmp_path: Path) -> None:
    for index in range(5):
        write_evaluation(tmp_path, make_evaluation(index=index))
    (tmp_path / ".eval-00003.npz.00ff.tmp").write_bytes(b"crashed write")
    (tmp_path / ".eval-00001.npz.00ff.tmp").write_bytes(b"crashed write")
    (tmp_path / "notes.txt").write_text("kept")

    deleted = prune_from(tmp_path, 3)
    assert [p.name for p in deleted] == [
        ".eval-00003.npz.00ff.tmp",
        "eval-00003.npz",
        "eval-00004.npz",
    ]
    assert not any(p.exists() for p in deleted)
    assert [ev.index for ev in read_history(tmp_path)] == [0, 1, 2]
    assert (tmp_path / "notes.txt").exists() and (tmp_path / ".eval-00001.npz.00ff.tmp").exists()
    assert prune_from(tmp_path, 3) == []
    assert prune_from(tmp_path / "nope", 0) == []
    with pytest.raises(ValueError, match=">= 0"):
        prune_from(tmp_path, -1)


def test_probe_hash_is_the_probes_content_hash_and_stable() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    y = np.array([0, 1], dtype=np.int64)
    reference = content_hash([x, y])
    assert len(reference) == 12 and int(reference, 16) >= 0
    assert content_hash([x.copy(), y.copy()]) == reference
    assert content_hash([np.asfortranarray(x), y]) == reference
    assert content_hash([x.astype(">f4"), y.astype(">i8")]) == reference  # byte order ignored
    assert content_hash([torch.from_numpy(x), torch.from_numpy(y)]) == reference
    assert reference == "b2926bb4bfda"  # pinned: must not change across versions or machines

    changed = x.copy()
    changed[1, 2, 3] += 1
    assert content_hash([changed, y]) != reference
    assert content_hash([x.astype(np.float64), y]) != reference
    assert content_hash([x.reshape(4, 3, 2), y]) != reference
    assert content_hash([y, x]) != reference
    assert content_hash([x]) != reference
    assert content_hash(x) == content_hash([x])
    with pytest.raises(TypeError):
        content_hash([np.array([object()])])


def test_format_is_readable_with_plain_numpy(tmp_path: Path) -> None:
    ev = make_evaluation(index=12, first=float("nan"))
    path = write_evaluation(tmp_path, ev)
    assert path.name == "eval-00012.npz"
    with np.load(path, allow_pickle=False) as npz:
        files = set(npz.files)
        meta = json.loads(str(npz["meta"]))
        assert npz["meta"].shape == () and npz["meta"].dtype.kind == "U"
        cam = npz["maps/target/layer4.1.conv2/gradcam++"]
        assert (cam.dtype, cam.shape) == (np.float32, (2, 4, 5))
        assert npz["targets/source"].dtype == np.int64
        assert npz["logits/target"].dtype == np.float32
        assert npz["labels/source"].dtype == np.int64
    expected = {f"maps/{p}/{layer}/{m}" for p in PROBES for layer in LAYERS for m in METHODS}
    expected |= {f"{kind}/{p}" for kind in ("targets", "logits") for p in PROBES}
    assert files == expected | {"labels/source", "meta"}
    assert set(meta) == {
        "format",
        "index",
        "epoch",
        "step",
        "probe_hashes",
        "probes",
        "layers",
        "methods",
        "scalars",
        "time",
    }
    assert (meta["format"], meta["index"], meta["epoch"], meta["step"]) == (1, 12, 24, 1207)
    assert meta["probes"] == list(PROBES) and meta["layers"] == list(LAYERS)
    assert meta["methods"] == list(METHODS)
    assert meta["scalars"] == {"drift/prev": 0.25, "first": None}
    assert meta["probe_hashes"] == ev.probe_hashes
    np.testing.assert_allclose(cam, ev.maps["target", "layer4.1.conv2", "gradcam++"], rtol=1e-3)


def test_invalid_evaluations_fail_before_touching_disk(tmp_path: Path) -> None:
    good = make_evaluation()
    bad_cases = {
        "no entry for probe": dict(targets={"source": good.targets["source"]}),
        "batch size": dict(labels={"target": np.array([1, 2, 3])}),
        "3 dimensions": dict(maps={("source", "l", "m"): np.ones((3, 4))}),
        "integer dtype": dict(targets={**good.targets, "source": np.array([0.5, 1.0, 2.0])}),
        "must be a number": dict(scalars={"loss": "low"}),
        "index must be >= 0": dict(index=-1),
    }
    for message, change in bad_cases.items():
        fields = {**good.__dict__, **change}
        with pytest.raises(ValueError, match=message):
            write_evaluation(tmp_path / "out", Evaluation(**fields))
    assert not (tmp_path / "out").exists()


def test_evaluation_repr_is_short() -> None:
    text = repr(make_evaluation(index=1))
    assert text.startswith("Evaluation(index=1, epoch=2, step=107, probes=('source', 'target')")
    assert "array" not in text and len(text) < 300


def test_file_permissions_follow_umask(tmp_path: Path) -> None:
    mode = write_evaluation(tmp_path, make_evaluation()).stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


# --------------------------------------------------------------------------- probe file


def probe_arrays() -> tuple[dict[str, np.ndarray], ...]:
    rng = np.random.default_rng(0)
    inputs = {"source": rng.standard_normal((3, 3, 8, 8)), "dom/ain": rng.random((2, 1, 8, 8))}
    labels = {"source": np.array([0, 4, 2], dtype=np.int32)}
    masks = {"source": rng.random((3, 8, 8)), "dom/ain": np.ones((2, 8, 8), bool)}
    hashes = {p: content_hash(x.astype(np.float32)) for p, x in inputs.items()}
    return inputs, labels, masks, hashes


def test_probe_round_trip_with_dtypes_and_awkward_names(tmp_path: Path) -> None:
    inputs, labels, masks, hashes = probe_arrays()
    path = write_probe(tmp_path / "hist", inputs, labels, masks, hashes)
    assert path == tmp_path / "hist" / PROBE_FILE
    assert names(tmp_path / "hist") == {"probe.npz"}  # no temporary file left
    record = read_probe(tmp_path / "hist")
    assert record is not None
    assert record.probes == ("source", "dom/ain")
    assert record.hashes == hashes
    for probe, x in inputs.items():
        assert record.inputs[probe].dtype == np.float32
        np.testing.assert_array_equal(record.inputs[probe], x.astype(np.float32))
        assert content_hash(record.inputs[probe]) == hashes[probe]  # same hash after the trip
    assert record.labels["source"].dtype == np.int64
    assert record.labels["source"].tolist() == [0, 4, 2] and "dom/ain" not in record.labels
    assert record.masks["source"].dtype == bool
    np.testing.assert_array_equal(record.masks["source"], masks["source"] > 0.5)
    assert record.masks["dom/ain"].all()
    with np.load(path) as npz:  # readable with numpy alone, names encoded as for maps
        assert {"inputs/source", "inputs/dom%2Fain", "labels/source", "meta"} <= set(npz.files)
        meta = json.loads(str(npz["meta"]))
    assert meta["format"] == 1 and meta["kind"] == "probe" and meta["hashes"] == hashes


def test_missing_probe_file_reads_as_none(tmp_path: Path) -> None:
    write_evaluation(tmp_path, make_evaluation())
    assert read_probe(tmp_path) is None
    assert read_probe(tmp_path / "missing") is None


def test_corrupt_probe_file_raises_naming_it(tmp_path: Path) -> None:
    path = write_probe(tmp_path, *probe_arrays())
    truncate(path)
    with pytest.raises(HistoryError, match=r"probe\.npz.*truncated or corrupt"):
        read_probe(tmp_path)
    path.write_bytes(b"")
    with pytest.raises(HistoryError, match=r"probe\.npz"):
        read_probe(tmp_path)
    # An evaluation file renamed to probe.npz is not a probe.
    shutil.copy(write_evaluation(tmp_path, make_evaluation()), path)
    with pytest.raises(HistoryError, match="not a probe description"):
        read_probe(tmp_path)


def test_newer_probe_format_asks_for_an_upgrade(tmp_path: Path) -> None:
    meta = json.dumps({"format": 2, "kind": "probe", "probes": [], "hashes": {}})
    np.savez(tmp_path / PROBE_FILE, meta=np.array(meta))
    with pytest.raises(HistoryError, match="upgrade cam-monitor"):
        read_probe(tmp_path)


def test_invalid_probes_fail_before_touching_disk(tmp_path: Path) -> None:
    inputs, labels, masks, hashes = probe_arrays()
    bad_cases = {
        "4 dimensions": ({"source": np.ones((3, 8, 8))}, labels, masks),
        "integer dtype": (inputs, {"source": np.array([0.5, 1.0, 2.0])}, masks),
        "batch size": (inputs, labels, {"source": np.ones((2, 8, 8), bool)}),
        "3 dimensions": (inputs, labels, {"source": np.ones((3, 8))}),
        "non-empty": ({"": np.ones((1, 3, 2, 2))}, {}, {}),
    }
    for message, (x, y, m) in bad_cases.items():
        with pytest.raises(ValueError, match=message):
            write_probe(tmp_path / "out", x, y, m, hashes)
    assert not (tmp_path / "out").exists()


def test_probe_file_does_not_disturb_the_history_readers(tmp_path: Path) -> None:
    write_probe(tmp_path, *probe_arrays())
    with pytest.raises(HistoryError, match="No cam-monitor history"):
        find_history(tmp_path)
    for index in range(2):
        write_evaluation(tmp_path, make_evaluation(index=index))
    assert find_history(tmp_path) == tmp_path
    assert [ev.index for ev in read_history(tmp_path)] == [0, 1]
    assert [p.name for p in prune_from(tmp_path, 0)] == ["eval-00000.npz", "eval-00001.npz"]
    assert names(tmp_path) == {"probe.npz"}


# --------------------------------------------------------------------------- format 1 by hand


def test_a_format_1_file_built_by_hand_from_the_documentation_reads_back(tmp_path: Path) -> None:
    """Files written by earlier versions stay readable: this one follows the documented format
    (history/format.py) with numpy and json alone, not the writer."""
    meta = {
        "format": 1,
        "index": 4,
        "epoch": 2,
        "step": 40,
        "probe_hashes": {"dom/ain": "0123456789ab"},
        "probes": ["dom/ain"],
        "layers": ["features.29"],
        "methods": ["gradcam++"],
        "scalars": {
            "cam_drift/dom%2Fain/features.29/gradcam++/js_ref": 0.125,
            "cam_loc/dom%2Fain/features.29/gradcam++/energy": None,
            "cam_monitor/seconds": "inf",
        },
        "time": "2024-05-01T12:00:00+00:00",
    }
    cam = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3) * 1e-5
    folder = tmp_path / "cam_monitor"
    folder.mkdir()
    np.savez_compressed(
        folder / "eval-00004.npz",
        **{
            "maps/dom%2Fain/features.29/gradcam++": cam,
            "targets/dom%2Fain": np.array([3, 1], np.int64),
            "logits/dom%2Fain": np.ones((2, 5), np.float32),
            "labels/dom%2Fain": np.array([3, 0], np.int64),
            "meta": np.array(json.dumps(meta)),
        },
    )
    inputs = np.linspace(0, 1, 2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    probe_meta = {
        "format": 1,
        "kind": "probe",
        "probes": ["dom/ain"],
        "hashes": {"dom/ain": "0123456789ab"},
        "time": "2024-05-01T12:00:00+00:00",
    }
    np.savez_compressed(
        folder / "probe.npz",
        **{
            "inputs/dom%2Fain": inputs,
            "masks/dom%2Fain": np.eye(4, dtype=bool)[None].repeat(2, 0),
            "meta": np.array(json.dumps(probe_meta)),
        },
    )

    assert find_history(tmp_path) == folder
    (ev,) = read_history(folder)
    assert (ev.index, ev.epoch, ev.step, ev.time) == (4, 2, 40, "2024-05-01T12:00:00+00:00")
    assert list(ev.maps) == [("dom/ain", "features.29", "gradcam++")]
    key = next(iter(ev.maps))
    assert isinstance(key, MapKey) and key.probe == "dom/ain"
    np.testing.assert_array_equal(ev.maps[key], cam)
    assert ev.targets["dom/ain"].tolist() == [3, 1] and ev.labels["dom/ain"].tolist() == [3, 0]
    assert ev.probe_hashes == {"dom/ain": "0123456789ab"}
    drift = ScalarKey(DRIFT, key, "js_ref").tag
    assert ev.scalars[drift] == 0.125
    assert math.isnan(ev.scalars[ScalarKey(LOCALIZATION, key, "energy").tag])
    assert ev.scalars[SECONDS_TAG] == math.inf
    record = read_probe(folder)
    assert record is not None and record.probes == ("dom/ain",)
    np.testing.assert_array_equal(record.inputs["dom/ain"], inputs)
    assert record.masks["dom/ain"].dtype == bool and record.masks["dom/ain"].sum() == 8
    assert record.labels == {} and record.hashes == {"dom/ain": "0123456789ab"}

    # Written back by this version, the file holds the same arrays and metadata.
    again = write_evaluation(tmp_path / "again", ev)
    with np.load(again) as npz, np.load(folder / "eval-00004.npz") as old:
        assert set(npz.files) == set(old.files)
        assert json.loads(str(npz["meta"])) == meta


def test_a_segmentation_file_of_the_old_format_loads_and_its_prediction_falls_back(
    tmp_path: Path,
) -> None:
    """A segmentation run's history as cam-monitor wrote it before the segmentation entries
    (numpy and json alone: targets, each class's mean logit, no `predicted/`; a probe without
    `label_maps/`) still reads; its predictions are the logits' argmax, as before."""
    meta = {
        "format": 1, "index": 0, "epoch": 0, "step": 0, "probe_hashes": {"val": "ab" * 6},
        "probes": ["val"], "layers": ["net.classifier.0"], "methods": ["gradcam"],
        "scalars": {}, "time": "2024-05-01T12:00:00+00:00", "run": "r1",
        "class_names": ["background", "square", "circle"],
    }  # fmt: skip
    folder = tmp_path / "old"
    folder.mkdir()
    mean_logits = np.array([[2.0, 0.5, 1.0], [3.0, 0.1, 0.2]], np.float32)
    np.savez(
        folder / "eval-00000.npz",
        **{
            "maps/val/net.classifier.0/gradcam": np.ones((2, 4, 4), np.float32),
            "targets/val": np.array([2, 1], np.int64),
            "logits/val": mean_logits,
            "meta": np.array(json.dumps(meta)),
        },
    )
    probe_meta = {"format": 1, "kind": "probe", "probes": ["val"], "hashes": {"val": "ab" * 6},
                  "time": "2024-05-01T12:00:00+00:00", "run": "r1"}  # fmt: skip
    inputs = np.zeros((2, 3, 8, 8), np.float32)
    np.savez(
        folder / "probe.npz", **{"inputs/val": inputs, "meta": np.array(json.dumps(probe_meta))}
    )

    (ev,) = read_history(folder)
    assert ev.segmentation == {} and ev.targets["val"].tolist() == [2, 1]
    assert ev.class_names == ("background", "square", "circle") and ev.run == "r1"
    record = read_probe(folder)
    assert record is not None and record.label_maps == {} and record.probes == ("val",)
    from cam_monitor.compare import predictions

    assert predictions(ev, "val").tolist() == [0, 0]  # what `show` printed for it before
    # Written back by this version, nothing is added to it.
    with np.load(write_evaluation(tmp_path / "again", ev)) as npz:
        assert set(npz.files) == {"maps/val/net.classifier.0/gradcam", "targets/val",
                                  "logits/val", "meta"}  # fmt: skip


def test_segmentation_entries_and_label_maps_round_trip(tmp_path: Path) -> None:
    record = Segmentation(
        predicted=np.array([2, 0, 1]),
        share=np.array([0.25, 0.0, np.nan]),
        iou=np.array([0.5, np.nan, 0.0]),
        accuracy=np.array([1.0, np.nan, 0.0]),
    )
    maps = {("val", "l", "gradcam"): np.ones((3, 2, 2), np.float32)}
    ev = Evaluation(0, 0, 0, {}, maps, {"val": np.array([2, 0, 1])},
                    {"val": np.zeros((3, 3))}, segmentation={"val": record})  # fmt: skip
    path = write_evaluation(tmp_path, ev)
    with np.load(path) as npz:
        assert npz["predicted/val"].dtype == np.int64
        assert npz["class_iou/val"].dtype == npz["class_share/val"].dtype == np.float32
    back = read_evaluation(path).segmentation["val"]
    np.testing.assert_array_equal(back.predicted, [2, 0, 1])
    for name in ("share", "iou", "accuracy"):
        np.testing.assert_array_equal(getattr(back, name), getattr(record, name))
    assert ev.nbytes == replace(ev, segmentation={}).nbytes + 4 * 3 * 8  # counted too
    unlabelled = Segmentation(np.array([1, 1, 1]), np.array([0.1, 0.2, 0.3]))
    back = read_evaluation(
        write_evaluation(tmp_path / "b", replace(ev, segmentation={"val": unlabelled}))
    )
    assert back.segmentation["val"].iou is None and back.segmentation["val"].accuracy is None
    with pytest.raises(ValueError, match=r"segmentation\['val'\].share has batch size 2"):
        wrong = Segmentation(np.array([1, 1, 1]), np.array([0.1, 0.2]))
        write_evaluation(tmp_path / "c", replace(ev, segmentation={"val": wrong}))
    with pytest.raises(ValueError, match=r"segmentation\['val'\].predicted must have an integer"):
        wrong = Segmentation(np.array([1.0, 1.0, 1.0]))
        write_evaluation(tmp_path / "c", replace(ev, segmentation={"val": wrong}))

    # Label maps in probe.npz stay class indices (255 and -100 too), never binarised.
    label_maps = np.array([[[0, 2], [255, 1]], [[-100, 3], [3, 0]]])
    inputs = {"val": np.zeros((2, 3, 2, 2))}
    write_probe(tmp_path / "p", inputs, {}, {}, {"val": "x"}, label_maps={"val": label_maps})
    with np.load(tmp_path / "p" / PROBE_FILE) as npz:
        assert npz["label_maps/val"].dtype == np.int16  # a quarter of int64's bytes
    stored = read_probe(tmp_path / "p")
    assert stored is not None and stored.probes == ("val",)
    assert stored.label_maps["val"].dtype == np.int64
    np.testing.assert_array_equal(stored.label_maps["val"], label_maps)
    wide = label_maps * 1000  # beyond int16: kept whole
    write_probe(tmp_path / "q", inputs, {}, {}, {"val": "x"}, label_maps={"val": wide})
    np.testing.assert_array_equal(read_probe(tmp_path / "q").label_maps["val"], wide)
    with pytest.raises(ValueError, match=r"label_maps\['val'\] must have an integer dtype"):
        write_probe(tmp_path / "r", inputs, {}, {}, {}, label_maps={"val": label_maps > 0})


# --------------------------------------------------------------------------- records


class TwoConv(torch.nn.Module):
    """Two conv layers, pooled to 3 classes: just enough for compute_cams."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1, stride=2)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(features.mean(dim=(2, 3)))


def real_probes_and_results() -> tuple[dict[str, ProbeSet], dict[str, CamResult]]:
    """A labelled, masked "source" probe, an unlabelled "dom/ain" one, and a probe whose inputs
    are a dict (no CAMs computed for it), with CAMs from `compute_cams` on a tiny conv net."""
    torch.manual_seed(0)
    model = TwoConv().eval()
    generator = torch.Generator().manual_seed(3)
    source = torch.randn(3, 3, 8, 8, generator=generator, dtype=torch.float64)
    target = torch.randn(2, 3, 8, 8, generator=generator)
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[:, 2:6, 2:6] = True
    probes = {
        "source": ProbeSet("source", source, torch.tensor([0, 2, 1]), masks, content_hash(source)),
        "dom/ain": ProbeSet("dom/ain", target, None, None, content_hash(target)),
        "nested": ProbeSet("nested", {"x": target}, None, None, content_hash({"x": target})),
    }
    results = {
        name: compute_cams(
            model.double() if name == "source" else model.float(),
            probes[name].inputs,
            ["conv1", "conv2"],
            methods=("gradcam", "gradcam++"),
        )
        for name in ("source", "dom/ain")
    }
    return probes, results


def test_evaluation_record_holds_what_the_callback_computed(tmp_path: Path) -> None:
    probes, results = real_probes_and_results()
    key = ScalarKey(DRIFT, MapKey("dom/ain", "conv2", "gradcam"), "js_ref")
    scalars = {key: 0.5, SECONDS_TAG: 0.01}
    ev = evaluation_record(7, epoch=3, step=21, probes=probes, results=results, scalars=scalars)
    assert (ev.index, ev.epoch, ev.step) == (7, 3, 21)
    assert ev.probes == ("source", "dom/ain")
    assert ev.layers == ("conv1", "conv2") and ev.methods == ("gradcam", "gradcam++")
    for name, result in results.items():
        for (layer, method), cam in result.maps.items():
            stored = ev.maps[MapKey(name, layer, method)]
            assert stored.dtype == np.float32 and stored.shape == tuple(cam.shape)
            np.testing.assert_array_equal(stored, cam.float().numpy())
        np.testing.assert_array_equal(ev.targets[name], result.targets.numpy())
        assert ev.logits[name].dtype == np.float32
        np.testing.assert_array_equal(ev.logits[name], result.logits.float().numpy())
    assert list(ev.labels) == ["source"] and ev.labels["source"].tolist() == [0, 2, 1]
    assert ev.probe_hashes == {name: probe.digest for name, probe in probes.items()}
    assert ev.scalars == {key.tag: 0.5, SECONDS_TAG: 0.01}
    assert ev.segmentation == {}  # a classifier's record: no segmentation entries

    back = read_evaluation(write_evaluation(tmp_path, ev))
    assert list(back.maps) == list(ev.maps)
    np.testing.assert_array_equal(
        back.maps["dom/ain", "conv2", "gradcam++"], ev.maps["dom/ain", "conv2", "gradcam++"]
    )
    assert back.scalars == ev.scalars and back.probe_hashes == ev.probe_hashes

    with pytest.raises(TypeError, match=r"results\['source'\] must be a CamResult"):
        evaluation_record(0, 0, 0, probes, {"source": results["source"].maps}, {})
    with pytest.raises(TypeError, match="probes must be a mapping"):
        evaluation_record(0, 0, 0, list(probes.values()), results, {})  # type: ignore[arg-type]


def test_write_probe_sets_stores_tensor_probes_with_their_hashes(tmp_path: Path) -> None:
    probes, _ = real_probes_and_results()
    path = write_probe_sets(tmp_path / "hist", probes)
    assert path == tmp_path / "hist" / PROBE_FILE
    record = read_probe(tmp_path / "hist")
    assert record is not None
    assert record.probes == ("source", "dom/ain", "nested")  # a nested probe: its image
    assert record.hashes == {name: probe.digest for name, probe in probes.items()}
    np.testing.assert_array_equal(record.inputs["nested"], probes["nested"].inputs["x"].numpy())
    assert record.inputs["source"].dtype == np.float32
    np.testing.assert_array_equal(record.inputs["source"], probes["source"].inputs.float().numpy())
    np.testing.assert_array_equal(record.inputs["dom/ain"], probes["dom/ain"].inputs.numpy())
    # The float32 inputs of a float32 probe hash as the probe did in the run.
    assert content_hash(record.inputs["dom/ain"]) == probes["dom/ain"].digest
    assert record.labels["source"].tolist() == [0, 2, 1] and "dom/ain" not in record.labels
    np.testing.assert_array_equal(record.masks["source"], probes["source"].masks.numpy())
    bad = {"source": probes["source"].inputs}
    with pytest.raises(TypeError, match=r"probes\['source'\] must be a ProbeSet"):
        write_probe_sets(tmp_path / "other", bad)  # type: ignore[arg-type]
    assert not (tmp_path / "other").exists()


def test_run_id_and_final_flag_round_trip_and_old_files_have_none(tmp_path: Path) -> None:
    def evaluation(index: int, **extra: object) -> Evaluation:
        maps = {("p", "l", "gradcam"): np.ones((1, 2, 2), np.float32)}
        targets, logits = {"p": np.zeros(1, np.int64)}, {"p": np.zeros((1, 3), np.float32)}
        return Evaluation(index, index, 10 * index, {}, maps, targets, logits, **extra)  # type: ignore[arg-type]

    write_evaluation(tmp_path, evaluation(0))  # as written before run ids
    write_evaluation(tmp_path, evaluation(1, run="abc123", final=True))
    old, new = read_history(tmp_path)
    assert (old.run, old.final, new.run, new.final) == ("", False, "abc123", True)
    with np.load(tmp_path / "eval-00000.npz") as npz:
        assert not {"run", "final"} & set(json.loads(str(npz["meta"])))
    assert history_runs(tmp_path) == {"": [0], "abc123": [1]}
    assert history_runs(tmp_path / "missing") == {}
    write_probe(tmp_path, {"p": np.zeros((1, 3, 2, 2))}, {}, {}, {"p": "x"}, run="abc123")
    record = read_probe(tmp_path)
    assert record is not None and record.run == "abc123"


def test_background_writer_keeps_order_reports_errors_and_pickles() -> None:
    import copy
    import pickle

    from cam_monitor.history import BackgroundWriter

    writer, done = BackgroundWriter(maxsize=2), []
    for i in range(20):  # more than the queue holds: submit waits instead of dropping
        writer.submit(lambda i=i: done.append(i), f"write {i}")
    writer.submit(lambda: open("/nonexistent/dir/file", "w"), "the probe")
    clone = copy.deepcopy(writer)  # a live thread and lock do not travel (ddp_spawn pickles)
    failed = writer.flush()
    assert done == list(range(20))
    assert [(f.what, type(f.error)) for f in failed] == [("the probe", FileNotFoundError)]
    assert writer.flush() == [] and writer.close() == []
    restored = pickle.loads(pickle.dumps(clone))
    restored.submit(lambda: done.append("again"), "one more")
    assert restored.close() == [] and done[-1] == "again"


def test_a_run_claims_its_own_folder_and_writes_in_the_background(tmp_path: Path) -> None:
    from cam_monitor.history import RunHistory

    folder = tmp_path / "cam_monitor"
    write_evaluation(folder, replace(make_evaluation(0), run="first"))
    said: list[str] = []
    run = RunHistory(said.append)
    assert run.claim(folder, "first", None, ".") == folder and not said  # the run comes back
    with pytest.raises(ValueError, match=r"already holds the cam-monitor history of another run"):
        RunHistory(said.append).claim(folder, "second", str(folder), ".")
    second = RunHistory(said.append)
    assert second.claim(folder, "second", None, ".") == tmp_path / "cam_monitor-second"
    assert second.folder == tmp_path / "cam_monitor-second"
    assert len(said) == 1 and "already holds another run's history" in said[0]
    assert second.write_evaluation(replace(make_evaluation(0), run="second")) == []
    assert second.close() == []
    assert history_runs(second.folder) == {"second": [0]}
