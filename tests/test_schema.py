from __future__ import annotations

import pytest

from cam_monitor import schema
from cam_monitor.schema import (
    DRIFT,
    IMAGE_PREFIX,
    LOCALIZATION,
    REF,
    SECONDS_TAG,
    STATISTICS,
    MapKey,
    ScalarKey,
    check_probe_name,
    decode,
    drift_stat,
    encode,
    filter_channel_tag,
    filter_maximised_tag,
    image_tag,
    join,
    parse_drift_stat,
    parse_scalar_tag,
    probe_hash_tag,
    split,
)

AWKWARD_NAMES = [
    "source",
    "features.29",
    "gradcam++",
    "domain/a",
    "/leading/and/trailing/",
    "100%",
    "%2F already encoded",
    "50%/50%",
    "with space",
    "  padded  ",
    "back\\slash",
    "ünïcödé 画像 🙂",
    "tab\tand\nnewline\x00nul\x7fdel",
    "plus+and?query#frag&amp",
    "%",
]


@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_a_name_component_round_trips_and_never_holds_a_slash(name: str) -> None:
    assert decode(encode(name)) == name
    assert "/" not in encode(name)
    assert not any(ord(ch) < 32 for ch in encode(name))
    assert split(join(name, name, "x")) == [name, name, "x"]


@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_map_and_scalar_keys_round_trip_any_probe_layer_and_method(name: str) -> None:
    for key in (
        MapKey(name, "layer4", "gradcam"),
        MapKey("val", name, "m"),
        MapKey(name, name, name),
    ):
        assert MapKey.parse(key.encoded) == key
        for kind, stat in (
            (DRIFT, drift_stat("js", REF)),
            (LOCALIZATION, "energy"),
            (STATISTICS, "entropy"),
        ):
            scalar = ScalarKey(kind, key, stat)
            assert parse_scalar_tag(scalar.tag) == scalar
            assert parse_scalar_tag(scalar.excluded.tag) == scalar.excluded
        tag = image_tag(key)
        assert tag.startswith(IMAGE_PREFIX + "/")
        assert MapKey.parse(tag[len(IMAGE_PREFIX) + 1 :]) == key
    assert decode(probe_hash_tag(name).rsplit("/", 1)[1]) == name
    assert split(filter_channel_tag(name, name, 3))[1:3] == [name, name]
    assert decode(filter_maximised_tag(name).split("/")[1]) == name


def test_usual_names_read_unchanged() -> None:
    key = ScalarKey(DRIFT, MapKey("target", "layer4.1.conv2", "gradcam++"), "spearman_prev")
    assert key.tag == "cam_drift/target/layer4.1.conv2/gradcam++/spearman_prev"
    assert image_tag(key.maps) == "cam/target/layer4.1.conv2/gradcam++"
    assert probe_hash_tag("source") == "cam_monitor/probe_hash/source"
    assert image_tag(MapKey("domain/a", "l", "m")) == "cam/domain%2Fa/l/m"


@pytest.mark.parametrize(
    "tag",
    [
        SECONDS_TAG,
        "cam/val/features.3/gradcam",
        "cam_monitor/probe_hash/val",
        "filters/val/features.3/channel_0",
        "cam_drift/val/features.3/js_ref",  # four parts
        "cam_drift/val/features.3/gradcam/js_ref/extra",
        "cam_drift/val//gradcam/js_ref",  # an empty component
        "cam_drift/val/features.3/gradcam/",
        "cam_drifts/val/features.3/gradcam/js_ref",
        "epoch",
        "",
    ],
)
def test_parse_scalar_tag_returns_none_for_other_tags(tag: str) -> None:
    assert parse_scalar_tag(tag) is None


def test_drift_stats_parse_back_and_map_keys_refuse_other_shapes() -> None:
    assert parse_drift_stat(drift_stat("com_shift", REF)) == ("com_shift", REF)
    assert parse_drift_stat("topk_iou_prev") == ("topk_iou", "prev")
    assert parse_drift_stat("entropy") is None and parse_drift_stat("js_later") is None
    for text in ("a/b", "a/b/c/d", "a//c"):
        with pytest.raises(ValueError, match="not an encoded probe/layer/method key"):
            MapKey.parse(text)
    assert set(schema.LOCALIZATION_SCORES) == {"energy", "pointing", "mask_iou"}


@pytest.mark.parametrize("name", ["target", "domain-a", "val_2", "ünï", "with space"])
def test_check_probe_name_accepts_names_a_tag_and_a_folder_can_hold(name: str) -> None:
    assert check_probe_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "   ", "domain/a", "a\\b", "line\nbreak", "nul\x00", "del\x7f", " padded", 3, None]
)
def test_check_probe_name_refuses_slashes_empty_and_control_characters(name: object) -> None:
    with pytest.raises(ValueError, match="probe set name") as info:
        check_probe_name(name)
    assert repr(name) in str(info.value)


def test_every_measure_and_score_has_one_label_and_every_title_comes_from_it() -> None:
    assert tuple(schema.MEASURE_LABELS) == schema.MEASURES
    assert tuple(schema.LOCALIZATION_LABELS) == schema.LOCALIZATION_SCORES
    assert tuple(schema.STAT_LABELS) == schema.STATS
    for measure, label in schema.MEASURE_LABELS.items():
        assert schema.MEASURE_TITLES[measure] == label.title
        assert schema.MEASURE_DESCRIPTIONS[measure] == label.description
        stat = drift_stat(measure, REF)
        assert schema.stat_title(DRIFT, stat) == f"drift from baseline: {label.short}"
        assert schema.stat_title(DRIFT, stat, long=True).endswith(label.title)
        assert schema.stat_label(stat) == f"drift from baseline ({label.short})"
    for score, label in schema.LOCALIZATION_LABELS.items():
        assert schema.stat_title(LOCALIZATION, score) == f"localization: {label.short}"
        assert schema.stat_label(score) == label.short
    with pytest.raises(ValueError, match="No title"):
        schema.stat_title(STATISTICS, "entropy")


def test_metric_prefixes_cover_every_tag_the_monitor_puts_in_the_metrics() -> None:
    key = MapKey("p", "l", "m")
    tags = [ScalarKey(kind, key, "x").tag for kind in schema.SCALAR_KINDS]
    tags += [SECONDS_TAG, probe_hash_tag("p")]
    assert all(tag.startswith(schema.METRIC_PREFIXES) for tag in tags)
    assert not image_tag(key).startswith(schema.METRIC_PREFIXES)


@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_history_array_names_round_trip_any_name(name: str) -> None:
    key = MapKey(name, name, "gradcam++")
    assert schema.parse_array(schema.map_array(key)) == [schema.MAPS_ARRAY, *key]
    assert schema.parse_array(schema.probe_array("logits", name)) == ["logits", name]


def test_history_file_names_are_built_and_read_back_in_one_place() -> None:
    assert schema.map_array(MapKey("source", "features.29", "gradcam")) == (
        "maps/source/features.29/gradcam"
    )
    for index in (0, 7, 99999, 123456):
        name = schema.evaluation_file(index)
        assert schema.evaluation_index(name) == index
        temporary = schema.temporary_file(name, "0a1b2c")
        assert temporary.startswith(".") and schema.temporary_index(temporary) == index
    assert schema.evaluation_file(3) == "eval-00003.npz"
    assert schema.evaluation_index("eval-000003.npz") == 3  # read, though not canonical
    assert schema.evaluation_index("probe.npz") is None
    assert schema.temporary_index(schema.temporary_file(schema.PROBE_FILE, "ab")) is None
