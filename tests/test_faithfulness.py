"""faithfulness() against torchcam 0.5's metrics run live, its isolation guarantees, and the
randomisation sanity check (Adebayo et al. 2018) on a trained model."""

from __future__ import annotations

import copy
import math
import random
import re
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalars_metadata
from torch import nn
from torchcam.methods import GradCAM
from torchcam.metrics import ClassificationMetric, DeletionInsertionMetric

from cam_monitor import FAITHFULNESS_MEASURES, compute_cams, faithfulness, sanity_check
from cam_monitor.cli import main
from cam_monitor.compare import RunGroup, load_run, summarize_groups
from cam_monitor.faithfulness import summarized
from cam_monitor.history import find_history, read_history
from cam_monitor.lightning.callback import CamMonitor
from cam_monitor.options import FaithfulnessOptions
from cam_monitor.schema import (
    FAITHFULNESS,
    FAITHFULNESS_CHOICES,
    FAITHFULNESS_LABELS,
    MapKey,
    ScalarKey,
    describe,
    parse_scalar_tag,
    stat_label,
)
from tests.helpers import Lightning, TinyCNN, fit, read_events, shapes

LAYER = "features.5"


def trained_cnn(steps: int = 40, seed: int = 0) -> TinyCNN:
    """A TinyCNN trained `steps` SGD steps on the placed shapes: its maps mean something."""
    torch.manual_seed(seed)
    model = TinyCNN()
    images, labels, _ = shapes(40, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> TinyCNN:
    return trained_cnn()


@pytest.fixture
def probe() -> torch.Tensor:
    return shapes(6, seed=3)[0]


def torchcam_per_image(
    model: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """torchcam's raw Grad-CAMs of the softmax scores (the maps its metrics rank by) and its four
    metrics, each image on its own so the metric's mean is that image's value."""
    oracle = copy.deepcopy(model)
    softmax = partial(torch.softmax, dim=-1)
    extractor = GradCAM(oracle, LAYER)
    maps, found = [], {name: [] for name in FAITHFULNESS_MEASURES}
    try:
        for i in range(images.shape[0]):
            one = images[i : i + 1]
            scores = softmax(oracle(one))
            cams = extractor(scores.argmax(dim=1).tolist(), scores, normalized=False)
            maps.append(extractor.fuse_cams(cams).detach())
            classification = ClassificationMetric(extractor, softmax)
            classification.update(one)
            summary = classification.summary()
            found["drop"].append(summary["avg_drop"])
            found["increase"].append(summary["conf_increase"])
            curves = DeletionInsertionMetric(extractor, softmax, steps=20)
            curves.update(one)
            summary = curves.summary()
            found["deletion"].append(summary["deletion_auc"])
            found["insertion"].append(summary["insertion_auc"])
    finally:
        extractor.remove_hooks()
    return torch.cat(maps), {name: torch.tensor(v) for name, v in found.items()}


@pytest.mark.slow
def test_every_measure_agrees_with_torchcam_per_image(
    trained: TinyCNN, probe: torch.Tensor
) -> None:
    maps, expected = torchcam_per_image(trained, probe)
    found = faithfulness(trained, probe, maps, steps=20)
    assert list(found) == list(FAITHFULNESS_MEASURES)
    for name in FAITHFULNESS_MEASURES:
        assert found[name].shape == (6,)
        torch.testing.assert_close(found[name], expected[name], atol=1e-5, rtol=0, msg=name)
    # The probe is not degenerate: the values vary between images, and some kept maps raise
    # the score while others drop it.
    assert float(expected["drop"].std()) > 1e-3 and float(expected["insertion"].std()) > 1e-3
    assert 0 < float(expected["increase"].sum()) < 6 or float(expected["drop"].amax()) > 0.05


def test_batched_chunked_or_given_logits_give_the_same_values(
    trained: TinyCNN, probe: torch.Tensor
) -> None:
    result = compute_cams(trained, probe, LAYER)
    maps = result[LAYER, "gradcam"]
    whole = faithfulness(trained, probe, maps, steps=7)
    chunked = faithfulness(trained, probe, maps, steps=7, batch_size=4)
    given = faithfulness(trained, probe, maps, steps=7, logits=result.logits)
    for name in FAITHFULNESS_MEASURES:
        torch.testing.assert_close(chunked[name], whole[name], atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(given[name], whole[name], atol=1e-6, rtol=0, msg=name)


def test_a_map_on_the_evidence_beats_a_map_elsewhere() -> None:
    # The class-0 logit is the top-left quadrant's mean less the bottom-right's: a map on the
    # top-left is the true one, and masking the rest raises the score.
    class TopLeft(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            evidence = x[:, :, :8, :8].mean(dim=(1, 2, 3)) - x[:, :, 8:, 8:].mean(dim=(1, 2, 3))
            return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)

    images = torch.rand(3, 3, 16, 16) + 1.0
    right = torch.zeros(3, 16, 16)
    right[:, :8, :8] = 1.0
    wrong = right.flip(-1).flip(-2)
    good = faithfulness(TopLeft(), images, right, target=0, steps=16)
    bad = faithfulness(TopLeft(), images, wrong, target=0, steps=16)
    assert bool((good["deletion"] < bad["deletion"] - 0.1).all())
    assert bool((good["insertion"] > bad["insertion"] + 0.1).all())
    assert bool((good["drop"] < 1e-6).all()) and bool((bad["drop"] > 0.1).all())
    assert good["increase"].tolist() == [1.0] * 3 and bad["increase"].tolist() == [0.0] * 3


def test_the_model_is_left_exactly_as_it_was(probe: torch.Tensor) -> None:
    model = trained_cnn(steps=3).train()
    model.features[1].eval()  # a mixed train/eval state is kept too
    model(probe).sum().backward()  # .grad holds values the call must not touch
    maps = torch.rand(6, 16, 16)
    before = _snapshot(model)
    faithfulness(model, probe, maps, steps=5)
    sanity_check(model, probe, LAYER, ["gradcam", "guided_backprop"])
    after = _snapshot(model)
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), name
    for old, new in zip(before["grads"], after["grads"], strict=True):
        assert torch.equal(new, old)
    for key in ("training", "hooks", "python", "requires_grad"):
        assert after[key] == before[key], key
    assert torch.equal(after["torch"], before["torch"])
    assert np.array_equal(after["numpy"][1], before["numpy"][1])


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": copy.deepcopy(model.state_dict()),
        "grads": [p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def test_nested_inputs_perturb_the_image_and_keep_the_rest(
    trained: TinyCNN, probe: torch.Tensor
) -> None:
    maps = torch.rand(6, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = faithfulness(trained, probe, maps, steps=4)
    batch = {"image": probe, "ids": torch.arange(6)}
    seen: list[torch.Tensor] = []

    def forward(model: nn.Module, data: dict) -> torch.Tensor:
        seen.append(data["ids"])
        return model(data["image"])

    nested = faithfulness(trained, batch, maps, steps=4, forward=forward, batch_size=5)
    for name in FAITHFULNESS_MEASURES:
        torch.testing.assert_close(nested[name], plain[name], atol=1e-6, rtol=0)
    # Each perturbed copy comes with its own image's other fields.
    assert all(ids.shape[0] <= 5 for ids in seen) and 5 in torch.cat(seen).tolist()


def test_a_map_that_ranks_no_pixel_gives_nan_for_its_image_only(
    trained: TinyCNN, probe: torch.Tensor
) -> None:
    maps = torch.rand(6, 8, 8, generator=torch.Generator().manual_seed(0))
    maps[2, 0, 0] = math.nan
    maps[3] = 0.0  # a Grad-CAM whose ReLU left nothing
    maps[4] = 0.7  # constant
    found = faithfulness(trained, probe, maps, steps=4)
    for name, values in found.items():
        assert bool(torch.isnan(values[[2, 3, 4]]).all()), name
        assert bool(torch.isfinite(values[[0, 1, 5]]).all()), name
    group = MapKey("probe", "layer", "gradcam")
    keys = {ScalarKey(FAITHFULNESS, group, name): values for name, values in found.items()}
    summary = summarized(keys)
    for key, values in keys.items():
        assert summary[key.excluded] == 3.0
        assert summary[key] == pytest.approx(float(values[[0, 1, 5]].mean()))


def test_per_pixel_logits_are_refused_with_the_fix(probe: torch.Tensor) -> None:
    segmenter = nn.Conv2d(3, 4, 1)  # per-pixel logits [B, 4, H, W]
    with pytest.raises(ValueError, match=r"per-pixel logits \(6, 4, 32, 32\).*output_transform="):
        faithfulness(segmenter, probe, torch.rand(6, 8, 8))
    mean = faithfulness(
        segmenter, probe, torch.rand(6, 8, 8), output_transform=lambda out: out.mean(dim=(2, 3))
    )
    assert mean["drop"].shape == (6,)


def test_logit_scores_leave_drop_undefined_where_the_score_is_not_positive() -> None:
    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            level = x.mean(dim=(1, 2, 3))
            return torch.stack([level, -level], dim=1)

    images = torch.stack([torch.ones(3, 8, 8), -torch.ones(3, 8, 8)])
    found = faithfulness(Fixed(), images, torch.rand(2, 4, 4), target=0, scores="logits")
    assert math.isfinite(float(found["drop"][0])) and math.isnan(float(found["drop"][1]))


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"measures": ["dorp"]}, ValueError, "Did you mean 'drop'"),
        ({"steps": 0}, ValueError, "deletion and insertion), got 0"),
        ({"scores": "probabilities"}, ValueError, "softmax, logits"),
        ({"maps": torch.rand(5, 4, 4)}, ValueError, "[6, h, w], got (5, 4, 4)"),
        ({"baseline": torch.zeros(2, 3, 1, 1)}, ValueError, "does not broadcast"),
        ({"target": "label"}, ValueError, "target=labels"),
        ({"target": lambda logits: logits[:, 0]}, ValueError, "returned scores"),
        ({"batch_size": 0}, ValueError, "`batch_size` must be an int >= 1"),
        ({"logits": torch.zeros(6)}, ValueError, "clean logits [6, C] of these inputs, got (6,)"),
    ],
)
def test_bad_arguments_name_the_value_and_the_fix(
    trained: TinyCNN, probe: torch.Tensor, kwargs: dict, error: type, words: str
) -> None:
    arguments = {"maps": torch.rand(6, 4, 4), **kwargs}
    with pytest.raises(error) as info:
        faithfulness(trained, probe, **arguments)
    assert words in str(info.value)


# --------------------------------------------------------------------------- the sanity check


def deeper_cnn(channels: int = 32, steps: int = 20, seed: int = 1) -> nn.Sequential:
    """Four conv-ReLU layers, trained `steps` Adam steps on the placed shapes: deep and wide
    enough for guided backprop's ReLU gating to reconstruct the image, as in the paper."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5),
    )  # fmt: skip
    images, labels, _ = shapes(30, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model.eval()


@pytest.mark.slow
def test_guided_backprop_survives_randomisation_and_gradcam_does_not() -> None:
    """Adebayo et al. (2018): with the layers above re-initialised, guided backprop still shows
    the input's edges, while Grad-CAM, which reads what those layers learned, decorrelates."""
    model = deeper_cnn()
    images = shapes(16, seed=5)[0]
    found = sanity_check(model, images, "7", ["gradcam", "guided_backprop"])
    gradcam = found["7", "gradcam"]
    guided = found["input", "guided_backprop"]
    assert gradcam.shape == guided.shape == (16,)
    assert int(gradcam.isnan().sum()) == int(guided.isnan().sum()) == 0
    assert float(guided.mean()) > 0.6
    assert float(guided.mean()) > float(gradcam.mean()) + 0.4
    # Image by image, not only on average.
    assert float((guided > gradcam).float().mean()) > 0.8


def test_the_randomisation_is_seeded_and_reads_the_real_maps_given(
    trained: TinyCNN, probe: torch.Tensor
) -> None:
    real = compute_cams(trained, probe, LAYER)
    first = sanity_check(trained, probe, LAYER, seed=1, real=real)[LAYER, "gradcam"]
    again = sanity_check(trained, probe, LAYER, seed=1)[LAYER, "gradcam"]
    other = sanity_check(trained, probe, LAYER, seed=2)[LAYER, "gradcam"]
    torch.testing.assert_close(first, again, equal_nan=True)
    assert not torch.allclose(first, other, equal_nan=True)
    # Maps compared with themselves would correlate perfectly: these are another model's.
    assert float(first.nan_to_num(0).abs().amax()) < 0.999


def test_only_modules_after_the_layer_are_reset() -> None:
    # Grad-CAM at the last ReLU reads its activations (before) and the head's weights (after):
    # with a head of one class the map is a multiple of the activations' weighted sum, so
    # re-initialising the head alone keeps the ranking exactly unless the weights change sign.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 1, bias=False),
    )  # fmt: skip
    with torch.no_grad():
        net[4].weight.fill_(1.0)
    images = torch.rand(3, 3, 12, 12)
    # Layer "1": the head (after it) is reset, the conv (before it) is not; for target 1 (the
    # logit z) Grad-CAM is relu(sum_c w_c A_c) / HW.
    activations = net[1](net[0](images))
    real = compute_cams(net, images, "1", target=1)
    found = sanity_check(net, images, "1", target=1, real=real, seed=0)["1", "gradcam"]
    twin = copy.deepcopy(net)
    torch.manual_seed(0)
    twin[4].reset_parameters()
    expected_map = torch.relu((twin[4].weight[0][:, None, None] * activations).sum(dim=1))
    from cam_monitor.measures import spearman

    expected = spearman(real["1", "gradcam"], expected_map.detach())
    torch.testing.assert_close(found, expected, equal_nan=True)


def test_a_module_that_cannot_be_reset_is_named_once(probe: torch.Tensor) -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain

    model = nn.Sequential(TinyCNN(), Scale())
    with pytest.warns(UserWarning, match=r"kept the learned parameters of \['1'\]"):
        sanity_check(model, probe, "0.features.5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sanity_check(model, probe, "0.features.5")


# --------------------------------------------------------------------------- in the monitor


def test_the_monitor_chooses_its_trust_measures_and_refuses_unknown_ones() -> None:
    assert CamMonitor("conv").trust == FaithfulnessOptions(())  # opt-in: see the benchmark
    chosen = CamMonitor("conv", faithfulness=["drop", "sanity"]).trust
    assert chosen.scores == ("drop",) and chosen.sanity
    assert CamMonitor("conv", faithfulness="insertion").trust.measures == ("insertion",)
    with pytest.raises(ValueError, match=r"unknown name.*'sanitty'.*Did you mean 'sanity'"):
        CamMonitor("conv", faithfulness=["sanitty"])


@pytest.mark.slow
def test_a_fit_logs_trust_scalars_charts_history_show_and_summary(
    tmp_path: Path, lightning: Lightning, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = lightning.loggers.TensorBoardLogger(tmp_path, name="tb")
    layer = "net.features.5"
    monitor = CamMonitor(
        layer, probe={"val": shapes(6, seed=3)[:2]}, faithfulness=FAITHFULNESS_CHOICES
    )
    fit(monitor, tmp_path, lightning, val=False, logger=logger)

    acc = read_events(logger.log_dir)
    tags = [t for t in acc.Tags()["scalars"] if t.startswith(f"{FAITHFULNESS}/")]
    expected = {f"{FAITHFULNESS}/val/{layer}/gradcam/{stat}" for stat in FAITHFULNESS_CHOICES}
    assert expected <= set(tags)
    for stat in FAITHFULNESS_CHOICES:
        tag = f"{FAITHFULNESS}/val/{layer}/gradcam/{stat}"
        values = [e.value for e in acc.Scalars(tag)]
        assert len(values) == 3, tag  # the baseline and two epochs
        low = -1.0 if stat == "sanity" else 0.0
        assert all(low <= v <= 1.0 for v in values), (tag, values)
        assert "better" in describe(tag)
    # The custom-scalars layout: one chart per statistic in its own section, every map a line.
    (event,) = acc.Tensors(custom_scalars_metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    (section,) = [c for c in layout.category if "can I trust the maps?" in c.title]
    assert [chart.title for chart in section.chart] == [
        f"can I trust the maps?: {FAITHFULNESS_LABELS[s].title}" for s in FAITHFULNESS_CHOICES
    ]
    for chart, stat in zip(section.chart, FAITHFULNESS_CHOICES, strict=True):
        (pattern,) = chart.multiline.tag
        assert [t for t in tags if re.match(pattern, t)] == [
            f"{FAITHFULNESS}/val/{layer}/gradcam/{stat}"
        ]
    # The history holds them, `cam-monitor show` prints them, the summary ranks them.
    folder = find_history(tmp_path)
    history = read_history(folder)
    assert all(
        parse_scalar_tag(t) is not None for ev in history for t in ev.scalars if "cam_faith" in t
    )
    assert {f"{FAITHFULNESS}/val/{layer}/gradcam/drop"} <= set(history[-1].scalars)
    assert main(["show", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "drop" in out and "insertion" in out and "sanity" in out
    rows = summarize_groups([RunGroup.single(load_run(folder))], [("val", layer, "gradcam")], 1)
    labels = [stat_label(row.key.stat) for row in rows if row.key.kind == FAITHFULNESS]
    assert labels == [FAITHFULNESS_LABELS[s].title for s in FAITHFULNESS_CHOICES]
    assert "average drop (lower is better)" in labels
    assert "insertion AUC (higher is better)" in labels
