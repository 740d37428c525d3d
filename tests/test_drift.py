"""The attention tracker: scalar keys, old and new state dicts, and another run as reference."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from cam_monitor.drift import AttentionTracker
from cam_monitor.engine import CamResult, compute_cams
from cam_monitor.history import Evaluation
from cam_monitor.measures import (
    drift,
    energy_inside,
    entropy,
    mask_iou,
    pointing_game,
    summarize,
)
from cam_monitor.options import DriftOptions
from cam_monitor.probe import ProbeSet, content_hash
from cam_monitor.schema import MEASURES, MapKey, ScalarKey, drift_stat
from tests.helpers import DispatchedOps, TinyCNN

GEN = torch.Generator().manual_seed(0)


def result(maps: torch.Tensor, layer: str = "l", method: str = "gradcam") -> CamResult:
    batch = maps.shape[0]
    return CamResult(
        maps={(layer, method): maps}, targets=torch.zeros(batch, dtype=torch.long),
        logits=torch.zeros(batch, 3),
    )  # fmt: skip


def probe(name: str, batch: int = 2, masks: torch.Tensor | None = None) -> ProbeSet:
    images = torch.rand(batch, 3, 8, 8, generator=GEN)
    return ProbeSet(name, images, masks=masks, digest=content_hash(images))


def test_scalar_keys_give_the_documented_tags_for_real_maps() -> None:
    images = torch.rand(3, 3, 32, 32, generator=GEN)
    with torch.random.fork_rng():  # a fixed model: some initialisations give all-zero maps,
        torch.manual_seed(0)  # which the `_excluded` counts below would count
        model = TinyCNN()
    cams = compute_cams(model, images, "features.3", ["gradcam", "layercam"])
    probes = {"val": ProbeSet("val", images, masks=images.mean(1) > 0.5)}
    tracker = AttentionTracker(DriftOptions(measures=("spearman", "js")))
    first, bad = tracker.score({"val": cams}, probes)
    second, _ = tracker.score({"val": cams}, probes)
    assert bad == 0 and all(isinstance(key, ScalarKey) for key in first)
    tags = {key.tag for key in second}
    assert "cam_drift/val/features.3/gradcam/spearman_prev" in tags
    assert "cam_drift/val/features.3/layercam/js_ref" in tags
    assert "cam_stats/val/features.3/gradcam/entropy" in tags
    assert "cam_loc/val/features.3/layercam/pointing" in tags
    assert not any("pearson" in tag for tag in tags)  # only the measures asked for
    assert not any(key.kind == "cam_drift" for key in first)  # nothing to compare at first
    drift = [v for k, v in second.items() if k.kind == "cam_drift" and k.stat != "js_ref"]
    assert drift and all(abs(v) < 1e-5 for v in drift)  # the same maps: no drift


def test_state_dict_round_trip_keeps_a_probe_name_with_a_slash() -> None:
    first, later = torch.rand(2, 4, 4, generator=GEN), torch.rand(2, 4, 4, generator=GEN)
    probes = {"domain/a": probe("domain/a")}
    tracker = AttentionTracker()
    tracker.score({"domain/a": result(first, "layer4.1")}, probes)
    tracker.score({"domain/a": result(later, "layer4.1")}, probes)
    state = tracker.state_dict()
    assert set(state["reference"]) == {"domain%2Fa/layer4.1/gradcam"}

    resumed = AttentionTracker()
    resumed.load_state_dict(state)
    key = MapKey("domain/a", "layer4.1", "gradcam")
    assert set(resumed.reference) == set(resumed.previous) == {key}
    assert torch.equal(resumed.reference[key], first) and torch.equal(resumed.previous[key], later)
    scalars, _ = resumed.score({"domain/a": result(later, "layer4.1")}, probes)
    tags = {k.tag: v for k, v in scalars.items()}
    assert tags["cam_drift/domain%2Fa/layer4.1/gradcam/spearman_prev"] == pytest.approx(0, abs=1e-6)
    assert tags["cam_drift/domain%2Fa/layer4.1/gradcam/spearman_ref"] > 0.01


def test_state_dicts_of_the_first_version_still_load() -> None:
    maps = torch.rand(2, 4, 4, generator=GEN)
    old = {  # keys joined with '/', unencoded, no "key_format"
        "reference": {"source/net.features/5/gradcam++": maps},
        "previous": {"source/net.features/5/gradcam++": maps * 2},
    }
    tracker = AttentionTracker()
    tracker.load_state_dict(old)
    key = MapKey("source", "net.features/5", "gradcam++")
    assert torch.equal(tracker.reference[key], maps)
    assert torch.equal(tracker.previous[key], maps * 2)
    tracker.load_state_dict({})  # a checkpoint without tracker state
    assert tracker.reference == tracker.previous == {}


def other_run_as_reference(ours: ProbeSet) -> tuple[AttentionTracker, np.ndarray, Evaluation]:
    """A tracker (pearson) whose reference is another run's first evaluation of `ours` at layer
    'l' (gradcam); that run's maps and its evaluation."""
    maps = np.random.default_rng(0).random((2, 4, 4), dtype=np.float32)
    other_run = Evaluation(
        index=0, epoch=0, step=0, probe_hashes={ours.name: ours.digest},
        maps={(ours.name, "l", "gradcam"): maps}, targets={}, logits={},
    )  # fmt: skip
    tracker = AttentionTracker(DriftOptions(measures=("pearson",)))
    tracker.use_reference(other_run, {ours.name: ours})
    return tracker, maps, other_run


def test_use_reference_loads_maps_and_refuses_another_probe() -> None:
    ours = probe("val")
    tracker, maps, other_run = other_run_as_reference(ours)
    np.testing.assert_array_equal(tracker.reference[MapKey("val", "l", "gradcam")].numpy(), maps)
    scalars, _ = tracker.score({"val": result(torch.from_numpy(maps))}, {"val": ours})
    ref = ScalarKey("cam_drift", MapKey("val", "l", "gradcam"), "pearson_ref")
    assert scalars[ref] == pytest.approx(0, abs=1e-6)

    different = probe("val")
    with pytest.raises(ValueError, match=r"reference='runs/a' used a different probe 'val'"):
        AttentionTracker().use_reference(other_run, {"val": different}, source="runs/a")


def test_a_map_the_reference_run_lacks_gets_no_ref_drift_and_a_warning_not_its_own_start() -> None:
    ours = probe("val")
    tracker, _, _ = other_run_as_reference(ours)
    other_layer = result(torch.rand(2, 4, 4, generator=GEN), layer="m")
    with pytest.warns(UserWarning, match=r"holds no maps of val/m/gradcam.*it holds val/l/gradcam"):
        tracker.score({"val": other_layer}, {"val": ours})
    later = result(torch.rand(2, 4, 4, generator=GEN), layer="m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        scalars, _ = tracker.score({"val": later}, {"val": ours})
    key = MapKey("val", "m", "gradcam")
    assert ScalarKey("cam_drift", key, "pearson_prev") in scalars
    assert ScalarKey("cam_drift", key, "pearson_ref") not in scalars  # not this run's start
    resumed = AttentionTracker(DriftOptions(measures=("pearson",)))
    resumed.load_state_dict(tracker.state_dict())
    assert resumed.external and key not in resumed.reference


def test_a_signed_reference_from_another_run_is_measured_by_magnitude() -> None:
    """A history stores signed maps as computed; drift reads them as the tracker reads its own
    (|map|), so a run compared with the same maps as reference has drifted by zero. The tracker
    keeps the result's own tensors as previous and reference maps: no copy per evaluation."""
    ours = probe("val", 3)
    signed = torch.randn(3, 4, 4, generator=GEN)
    key = MapKey("val", "input", "integrated_gradients")
    other_run = Evaluation(
        index=0, epoch=0, step=0, probe_hashes={"val": ours.digest},
        maps={key: signed.numpy()}, targets={}, logits={},
    )  # fmt: skip
    tracker = AttentionTracker(DriftOptions(measures=("spearman", "pearson")))
    tracker.use_reference(other_run, {"val": ours})
    now = result(signed.clone(), "input", "integrated_gradients")
    scalars, _ = tracker.score({"val": now}, {"val": ours})
    for measure in ("spearman", "pearson"):
        assert scalars[ScalarKey("cam_drift", key, f"{measure}_ref")] == pytest.approx(0, abs=1e-6)
    assert tracker.previous[key] is now.maps["input", "integrated_gradients"]


def test_non_finite_maps_are_counted_and_excluded() -> None:
    maps = torch.rand(3, 4, 4, generator=GEN)
    maps[1, 0, 0] = math.nan
    tracker = AttentionTracker()
    scalars, non_finite = tracker.score({"p": result(maps)}, {"p": probe("p", 3)})
    entropy = ScalarKey("cam_stats", MapKey("p", "l", "gradcam"), "entropy")
    assert non_finite == 1
    assert scalars[entropy.excluded] == 1.0 and math.isfinite(scalars[entropy])


def test_options_must_be_drift_options() -> None:
    with pytest.raises(TypeError, match="`options` must be a DriftOptions or None, got dict"):
        AttentionTracker({"topk": 0.2})  # type: ignore[arg-type]


def one_by_one(
    maps: dict[MapKey, torch.Tensor],
    earlier: dict[str, dict[MapKey, torch.Tensor]],
    masks: dict[str, torch.Tensor | None],
    options: DriftOptions,
) -> dict[ScalarKey, float]:
    """The scalars as the tracker computed them before it batched: one call per map and pair."""
    per_image: dict[ScalarKey, torch.Tensor] = {}
    for key, current in maps.items():
        for against, found in earlier.items():
            other = found.get(key)
            if other is not None and other.shape == current.shape:
                for measure in options.measures:
                    stat = drift_stat(measure, against)
                    per_image[ScalarKey("cam_drift", key, stat)] = drift(
                        other, current, measure, k=options.topk
                    )
        per_image[ScalarKey("cam_stats", key, "entropy")] = entropy(current)
        mask = masks[key.probe]
        if mask is not None:
            per_image[ScalarKey("cam_loc", key, "energy")] = energy_inside(current, mask)
            tolerance = options.pointing_tolerance
            per_image[ScalarKey("cam_loc", key, "pointing")] = pointing_game(
                current, mask, tolerance
            )
            per_image[ScalarKey("cam_loc", key, "mask_iou")] = mask_iou(current, mask, options.topk)
    scalars: dict[ScalarKey, float] = {}
    for key, values in per_image.items():
        scalars[key], excluded = summarize(values)
        if excluded:
            scalars[key.excluded] = float(excluded)
    return scalars


def awkward_maps(batch: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """ReLU'd noise on a few levels (ties, exact zeros), with an all-zero map, a constant one,
    a NaN and an Inf."""
    maps = (torch.randn(batch, *size, generator=generator).clamp_min(0) * 4).round() / 4
    maps[0], maps[1] = 0.0, 0.5
    maps[2, 0, 0], maps[3, -1, -1] = math.nan, math.inf
    return maps


@pytest.mark.parametrize("batch_size", [None, 2, 4])
def test_batched_scores_equal_one_call_per_map_and_pair(batch_size: int | None) -> None:
    """Maps of equal shape are scored in one call per measure, on `batch_size` images at a time
    (probe sets of 6 and 5 images: uneven chunks, and a set that ends before the other): the
    scalars, their order and the excluded counts are those of scoring each map and pair on its
    own."""
    generator = torch.Generator().manual_seed(3)
    options = DriftOptions(measures=MEASURES, topk=0.3, pointing_tolerance=1)
    masks = torch.rand(6, 16, 16, generator=generator) > 0.6
    masks[5] = False  # an empty mask: localization is undefined for that image
    probes = {"src": probe("src", 6, masks=masks), "tgt": probe("tgt", 5)}
    shapes = {"layer3": (8, 8), "layer4": (4, 4), "layer4.1": (4, 4)}
    methods = ("gradcam", "gradcam++", "integrated_gradients")  # the last one keeps its sign
    tracker = AttentionTracker(options)
    earlier: dict[str, dict[MapKey, torch.Tensor]] = {"prev": {}, "ref": {}}
    for evaluation in range(3):
        results, scored = {}, {}
        for name, probe_set in probes.items():
            batch = probe_set.inputs.shape[0]
            raw = {
                (layer, method): awkward_maps(batch, size, generator)
                for layer, size in shapes.items()
                for method in methods
            }
            if evaluation == 2:  # a map whose shape changed is not compared
                raw["layer4", "gradcam"] = awkward_maps(batch, (2, 2), generator)
            sign = torch.randn(batch, 8, 8, generator=generator).sign()
            raw["layer3", "integrated_gradients"] *= sign
            results[name] = CamResult(
                maps=raw, targets=torch.zeros(batch, dtype=torch.long), logits=torch.zeros(batch, 3)
            )
            scored.update({MapKey(name, *layer_method): v.abs() for layer_method, v in raw.items()})
        masks_by_probe = {name: p.masks for name, p in probes.items()}
        expected = one_by_one(scored, earlier, masks_by_probe, options)
        scalars, non_finite = tracker.score(results, probes, batch_size)
        assert list(scalars) == list(expected)  # the same keys, in the same order
        for key, value in expected.items():  # bit for bit, but for com_shift's matmul
            close = 1e-6 if key.stat.startswith("com_shift") else 0.0
            assert scalars[key] == pytest.approx(value, rel=0, abs=close, nan_ok=True), key.tag
        assert non_finite == 2 * len(scored)  # a NaN and an Inf map each time
        earlier = {"prev": scored, "ref": earlier["ref"] or scored}
    assert any(k.kind == "cam_drift" and k.stat == "spearman_prev" for k in scalars)
    assert any(k.kind == "cam_loc" for k in scalars) and any(
        k.stat.endswith("_excluded") for k in scalars
    )


def test_each_map_is_sorted_once_whatever_it_is_compared_with() -> None:
    """Spearman's ranks and the top-k set share one sort, and a new map compared with its
    previous and its reference maps is prepared once: an evaluation makes one sort of its new
    and earlier maps together per shape, however many layers and methods (it made four, and
    sorted each new map twice in each: once per earlier map)."""
    generator = torch.Generator().manual_seed(0)
    options = DriftOptions(measures=("spearman", "topk_iou"), topk=0.2)

    def sorts(methods: tuple[str, ...]) -> int:
        tracker = AttentionTracker(options)
        probes = {"src": probe("src", 4)}
        for _ in range(3):  # the third has previous maps other than its reference
            maps = {("layer", m): awkward_maps(4, (6, 6), generator) for m in methods}
            result = CamResult(maps=maps, targets=torch.zeros(4, dtype=torch.long),
                               logits=torch.zeros(4, 3))  # fmt: skip
            with DispatchedOps() as ops:
                tracker.score({"src": result}, probes)
        return ops.names["sort"] + ops.names["topk"]

    assert sorts(("gradcam",)) == sorts(("gradcam", "gradcam++", "layercam")) == 1
