"""The dashboard as a user sees it: default curves, one chart per question, tag descriptions,
grids sized for TensorBoard's card, and W&B's step axis; read back from real event files, real
TensorBoard data providers and a real offline W&B run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.summary_pb2 import DataClass
from tensorboard.context import RequestContext
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalars_metadata

from cam_monitor.callback import CamMonitor
from cam_monitor.options import DriftOptions, RenderOptions
from cam_monitor.render import GRID_COLUMNS, make_overlay_grid
from cam_monitor.schema import (
    DEFAULT_MEASURES,
    DRIFT,
    LOCALIZATION,
    LOCALIZATION_DESCRIPTIONS,
    MEASURE_DESCRIPTIONS,
    MEASURE_TITLES,
    MEASURES,
    REF,
    SECONDS_TAG,
    MapKey,
    ScalarKey,
    dashboard_charts,
    describe,
    parse_drift_stat,
    parse_scalar_tag,
)
from cam_monitor.sinks import WANDB_GLOBS, WANDB_STEP
from tests.helpers import (
    Lightning,
    fit,
    read_events,
    shapes_dataset,
    wandb_items,
    wandb_run_records,
)

LAYERS = ["net.features.3", "net.features.5"]


def probe_sets() -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """A 'source' probe set without masks and a 'target' one with the squares as masks."""
    source, target = shapes_dataset(8, seed=3).tensors, shapes_dataset(8, seed=4).tensors
    masks = target[0].mean(dim=1) > 0.75  # the bright square of each image
    return {"source": source, "target": target}, {"target": masks}


def fit_with_tensorboard(tmp_path: Path, lightning: Lightning, **monitor: object) -> Path:
    probes, masks = probe_sets()
    options: dict[str, object] = {"probe": probes, "masks": masks, "num_probe": 8}
    options.update(monitor)
    logger = lightning.loggers.TensorBoardLogger(tmp_path, name="tb")
    fit(CamMonitor(LAYERS, **options), tmp_path, lightning, val=False, logger=logger)
    return Path(logger.log_dir)


def accumulator(log_dir: Path) -> EventAccumulator:
    (events,) = log_dir.glob("events.out.tfevents.*")
    return read_events(events)


def custom_scalars(acc: EventAccumulator) -> layout_pb2.Layout:
    """The layout the custom-scalars page draws, as stored in the event file."""
    (event,) = acc.Tensors(custom_scalars_metadata.CONFIG_SUMMARY_TAG)
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def test_default_measures_are_two_and_all_stay_available() -> None:
    assert DEFAULT_MEASURES == ("spearman", "topk_iou")
    assert set(DEFAULT_MEASURES) < set(MEASURES)
    assert DriftOptions().measures == DEFAULT_MEASURES
    assert CamMonitor("conv").tracker.options.measures == DEFAULT_MEASURES
    every = CamMonitor("conv", drift_measures=list(MEASURES))
    assert every.tracker.options.measures == MEASURES


def test_tensorboard_run_has_one_chart_per_question(tmp_path: Path, lightning: Lightning) -> None:
    acc = accumulator(fit_with_tensorboard(tmp_path, lightning))
    scalars = [t for t in acc.Tags()["scalars"] if parse_scalar_tag(t) is not None]
    drift = [t for t in scalars if t.startswith(f"{DRIFT}/") and not t.endswith("_excluded")]
    measures = {parse_drift_stat(t.rsplit("/", 1)[1])[0] for t in drift}  # type: ignore[index]
    assert measures == set(DEFAULT_MEASURES)
    assert len(drift) == 2 * 2 * len(LAYERS) * 2  # measures x against x layers x probe sets

    layout = custom_scalars(acc)
    assert [c.title for c in layout.category] == ["cam-monitor: source", "cam-monitor: target"]
    charted: list[str] = []
    for category in layout.category:
        probe = category.title.split(": ")[1]
        titles = [chart.title for chart in category.chart]
        assert titles[:2] == [f"drift from baseline: {MEASURE_TITLES[m]}" for m in DEFAULT_MEASURES]
        assert titles[2:4] == [
            f"drift from previous: {MEASURE_TITLES[m]}" for m in DEFAULT_MEASURES
        ]
        has_energy = any(t.startswith("localization: energy") for t in titles)
        assert has_energy == (probe == "target")  # only where there are masks
        for chart in category.chart:
            (pattern,) = chart.multiline.tag
            lines = [t for t in scalars if re.match(pattern, t)]  # as TensorBoard matches them
            assert len(lines) == len(LAYERS), (chart.title, lines)  # one line per layer/method
            assert all(t.split("/")[1] == probe for t in lines)
            charted += lines
    assert sorted(charted) == sorted(
        drift + [t for t in scalars if t.startswith(f"{LOCALIZATION}/") and t.endswith("/energy")]
    )


def test_tensorboard_serves_a_description_with_every_monitor_scalar(
    tmp_path: Path, lightning: Lightning
) -> None:
    log_dir = fit_with_tensorboard(tmp_path, lightning)
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    provider = MultiplexerDataProvider(multiplexer, str(tmp_path))
    run = log_dir.relative_to(tmp_path).as_posix()
    series = provider.list_scalars(RequestContext(), experiment_id="", plugin_name="scalars")[run]
    ours = {t: s for t, s in series.items() if parse_scalar_tag(t) or t == SECONDS_TAG}
    assert len(ours) >= 2 * 2 * len(LAYERS) * 2
    for tag, time_series in ours.items():
        assert time_series.description == describe(tag) != "", tag
        key = parse_scalar_tag(tag)
        if key is not None and key.kind == DRIFT and not key.stat.endswith("_excluded"):
            assert "a distance, 0 = the same" in time_series.description
        if key is not None and key.kind == LOCALIZATION and not key.stat.endswith("_excluded"):
            assert "a score, 1 = " in time_series.description
    # TensorBoard's default (Rust) loader keeps the metadata of a simple value only when it names
    # its data class; once per tag, on the first value
    (events,) = log_dir.glob("events.out.tfevents.*")
    described = [
        value
        for event in EventFileLoader(str(events)).Load()
        for value in event.summary.value
        if value.tag in ours and value.metadata.summary_description
    ]
    assert sorted(v.tag for v in described) == sorted(ours)
    assert all(v.metadata.data_class == DataClass.DATA_CLASS_SCALAR for v in described)
    acc = accumulator(log_dir)  # the described first write is a data point like the others
    assert [e.step for e in acc.Scalars(SECONDS_TAG)] == [0, 3, 6]
    drift = acc.Scalars(f"cam_drift/target/{LAYERS[1]}/gradcam/spearman_ref")
    assert [e.step for e in drift] == [3, 6]


def test_descriptions_say_direction_range_and_what_was_compared() -> None:
    key = MapKey("target", "conv4", "gradcam++")
    for measure in MEASURES:
        assert "a distance, 0 = the same" in MEASURE_DESCRIPTIONS[measure]
        assert "distance, 0 = same" in MEASURE_TITLES[measure]
        text = describe(ScalarKey(DRIFT, key, f"{measure}_{REF}"))
        assert "gradcam++ at conv4 on the target probe set against the reference" in text
    for score, words in LOCALIZATION_DESCRIPTIONS.items():
        assert "a score, 1 = " in words
        assert words in describe(ScalarKey(LOCALIZATION, key, score))
    excluded = describe(ScalarKey(DRIFT, key, "js_prev_excluded"))
    assert excluded.startswith("Images left out of the mean of 'js_prev'")
    assert "previous evaluation" in excluded
    assert describe("train/loss") == describe("cam_drift/a/b/c/unknown_ref") == ""


def test_chart_patterns_are_exact_for_awkward_probe_names() -> None:
    charts = dashboard_charts({"a.b": False, "a/b+": True}, ["js"])
    assert [c.category for c in charts] == ["cam-monitor: a.b"] * 2 + ["cam-monitor: a/b+"] * 3
    tags = [
        ScalarKey(DRIFT, MapKey("a/b+", "layer4.0", "gradcam++"), "js_ref").tag,
        ScalarKey(DRIFT, MapKey("aXb", "layer4.0", "gradcam"), "js_ref").tag,  # '.' is literal
        ScalarKey(DRIFT, MapKey("a.b", "l", "gradcam"), "js_ref_excluded").tag,
    ]
    assert [t for t in tags if re.match(charts[2].pattern, t)] == [tags[0]]
    assert not any(re.match(charts[0].pattern, t) for t in tags[1:])


def test_default_grid_of_sixteen_fits_a_tensorboard_card() -> None:
    """16 probe images of 32 px: 4 x 4 tiles of 96 px, 394 px wide; TensorBoard's image card is
    about 350 px wide (checked on a screenshot, docs/tensorboard_images.png), so tiles show at
    about 85 px, not the 40 px of 8 columns."""
    assert RenderOptions().nrow == GRID_COLUMNS == 4
    assert CamMonitor("conv").render.nrow == GRID_COLUMNS
    captions = ["ok p:triangle t:triangle"] * 16
    grid = make_overlay_grid(torch.rand(16, 3, 32, 32), torch.rand(16, 4, 4), captions=captions)
    assert grid.shape[2] == 4 * (96 + 2) + 2
    rows = (grid.shape[1] - 2) / 4
    assert rows > 96 + 2 and rows.is_integer()  # four rows of captioned tiles


@pytest.mark.slow
def test_wandb_charts_every_monitor_key_against_the_trainer_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    lightning = Lightning("pytorch_lightning")
    probes, masks = probe_sets()
    monitor = CamMonitor(LAYERS[1], probe=probes, masks=masks, num_probe=8)
    logger = lightning.loggers.WandbLogger(save_dir=str(tmp_path), offline=True, project="dash")
    fit(monitor, tmp_path, lightning, val=False, logger=logger)
    run_dir = Path(logger.experiment.dir)
    import wandb

    wandb.finish()
    records, finished = wandb_run_records(run_dir)
    assert finished
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    defined = {m.glob_name or m.name: m for m in metrics}  # glob patterns, and one plain name
    for glob in WANDB_GLOBS:
        assert defined[glob].step_metric == WANDB_STEP, glob
        assert not defined[glob].HasField("summary"), glob  # the default: the last value

    rows = [
        wandb_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"
    ]
    logged = [row for row in rows if SECONDS_TAG in row]
    assert [row[WANDB_STEP] for row in logged] == [0, 3, 6]
    summary: dict[str, object] = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update(wandb_items(record.summary.update))
    drift = f"cam_drift/target/{LAYERS[1]}/gradcam/topk_iou_prev"
    energy = f"cam_loc/target/{LAYERS[1]}/gradcam/energy"
    for key in (drift, energy, SECONDS_TAG):
        last = [row[key] for row in logged if key in row][-1]
        assert summary[key] == pytest.approx(last), key
