"""Semantic segmentation: per-pixel logits, label maps, the automatic layer and a monitored fit,
on real torchvision segmentation models (no weights) and pytorch-grad-cam as the oracle."""

from __future__ import annotations

import sys
import warnings
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torchvision.models import segmentation

from cam_monitor import CamMonitor, compute_cams
from cam_monitor.cli import main as cli
from cam_monitor.compare import load_run
from cam_monitor.default_layer import first_spatial_layer
from cam_monitor.drift import AttentionTracker
from cam_monitor.evaluation import compute_probe, probe_captions, probe_options, run_evaluation
from cam_monitor.history import evaluation_record, read_history
from cam_monitor.measures import class_iou
from cam_monitor.options import EngineOptions, RenderOptions
from cam_monitor.probe import ProbeSet, build_probes, probe_sets
from cam_monitor.report import _captions, _regions
from cam_monitor.schema import LOCALIZATION, MapKey, ScalarKey
from cam_monitor.sinks import scalar_tags
from cam_monitor.targets import main_class
from tests.helpers import Lightning, fit, read_events

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import shapes
from segmentation import TinySegmenter

SIZE = 64


@cache
def torchvision_model(name: str) -> nn.Module:
    """A torchvision segmentation model with random weights (4 classes), in eval mode."""
    torch.manual_seed(0)
    build = getattr(segmentation, name)
    return build(weights=None, weights_backbone=None, num_classes=4).eval()


def scenes(n: int = 4, domain: str = "source", size: int = SIZE) -> tuple[Tensor, Tensor]:
    return shapes.make_scenes(n, domain, size, seed=5)


class OutOnly(nn.Module):
    """pytorch-grad-cam takes a model returning a tensor: torchvision's `["out"]`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["out"]


def grad_cam_reference(model: nn.Module, layer: str, x: Tensor, targets: list) -> np.ndarray:
    """pytorch-grad-cam's Grad-CAM, run live: normalised maps at the input size."""
    from pytorch_grad_cam import GradCAM

    wrapped = OutOnly(model)
    with GradCAM(wrapped, [wrapped.model.get_submodule(layer)]) as cam:
        return cam(x, targets)


def as_reference_scales(maps: Tensor, size: tuple[int, int]) -> np.ndarray:
    """Our raw layer-resolution maps through pytorch-grad-cam's own resize and normalisation
    (per layer, then across layers), so the comparison is of the maps themselves."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    per_layer = scale_cam_image(maps.numpy(), size)[:, None]
    return scale_cam_image(per_layer.max(axis=1))


# -- 1. segmentation logits ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "layer"),
    [("fcn_resnet50", "backbone.layer4"), ("deeplabv3_mobilenet_v3_large", "classifier.0")],
)
def test_a_class_over_its_predicted_pixels_agrees_with_pytorch_grad_cam(
    name: str, layer: str
) -> None:
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    model = torchvision_model(name)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    predicted = model(x)["out"].argmax(dim=1)
    classes = main_class(predicted)  # a class each image predicts somewhere: a non-empty mask
    result = compute_cams(model, x, layer, "gradcam", target=classes, output_transform="out")
    assert torch.equal(result.targets, classes)
    expected_masks = (predicted == classes[:, None, None]).float()
    assert result.pixel_masks is not None and torch.equal(result.pixel_masks, expected_masks)
    targets = [
        SemanticSegmentationTarget(int(k), m.numpy())
        for k, m in zip(classes, expected_masks, strict=True)
    ]
    theirs = grad_cam_reference(model, layer, x, targets)
    ours = as_reference_scales(result[layer, "gradcam"], (SIZE, SIZE))
    assert theirs.max() > 0.5  # a real map, not two zero maps agreeing
    assert np.abs(ours - theirs).max() < 2e-6

    # (class, pixel_mask): that class over those pixels, one mask shared by both images.
    region = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    region[8:40, 16:56] = True
    given = compute_cams(model, x, layer, "gradcam", target=(1, region), output_transform="out")
    targets = [SemanticSegmentationTarget(1, region.float().numpy())] * 2
    theirs = grad_cam_reference(model, layer, x, targets)
    ours = as_reference_scales(given[layer, "gradcam"], (SIZE, SIZE))
    assert theirs.max() > 0.5 and np.abs(ours - theirs).max() < 2e-6


def test_per_image_targets_masks_and_chunks_give_the_same_maps() -> None:
    torch.manual_seed(0)
    model = TinySegmenter(num_classes=5).eval()
    x, labels = scenes(4, size=32)
    wanted = main_class(labels)  # a class each image has pixels of
    assert len(set(wanted.tolist())) > 1
    masks = labels == wanted[:, None, None]
    whole = compute_cams(model, x, "backbone", "gradcam", (wanted, masks), output_transform="out")
    chunked = compute_cams(
        model, x, "backbone", "gradcam", (wanted, masks), output_transform="out", batch_size=1
    )
    assert torch.equal(whole.targets, wanted)
    assert torch.allclose(whole["backbone", "gradcam"], chunked["backbone", "gradcam"], atol=1e-6)
    # Each image's map explains its own class over its own pixels: image 0 alone gives its map.
    alone = compute_cams(
        model, x[:1], "backbone", "gradcam", (int(wanted[0]), masks[:1]), output_transform="out"
    )
    assert torch.allclose(alone["backbone", "gradcam"][0], whole["backbone", "gradcam"][0])
    # The int target is scored over the pixels predicted as it.
    assert whole.predicted_maps is not None
    k = int(main_class(whole.predicted_maps)[0])
    one = compute_cams(model, x, "backbone", "gradcam", k, output_transform="out")
    assert one.predicted_maps is not None and one.pixel_masks is not None
    assert torch.equal(one.pixel_masks.bool(), one.predicted_maps == k)


def test_extra_passes_score_the_class_over_its_pixels() -> None:
    # Integrated gradients add up to the score difference to the baseline: the masked sum.
    torch.manual_seed(0)
    model = TinySegmenter(num_classes=5).eval()
    x, labels = scenes(2, size=32)
    classes = main_class(labels)
    target = (classes, labels == classes[:, None, None])
    result = compute_cams(
        model, x, None, "integrated_gradients", target, output_transform="out", ig_steps=64
    )
    delta = result.extras["integrated_gradients.score_delta"]
    logits = model(x)["out"].detach()
    masks = target[1].float()
    scores = torch.stack([(logits[i, k] * masks[i]).sum() for i, k in enumerate(classes)])
    base = model(torch.zeros_like(x))["out"].detach()
    base_scores = torch.stack([(base[i, k] * masks[i]).sum() for i, k in enumerate(classes)])
    assert torch.allclose(delta, scores - base_scores, rtol=1e-4, atol=1e-4)
    gap = result.extras["integrated_gradients.completeness_gap"]
    assert (gap.abs() < 0.05 * delta.abs().clamp(min=1)).all()


def test_predicted_is_the_most_frequent_class_other_than_the_background() -> None:
    maps = torch.tensor([[[0, 0, 0], [0, 2, 2], [1, 3, 255]], [[0, 0, 0], [0, 0, 0], [0, 0, 0]]])
    assert main_class(maps).tolist() == [2, 0]  # 255 is ignored; background only if alone
    assert main_class(maps, num_classes=2).tolist() == [1, 0]  # classes 2, 3 do not exist

    torch.manual_seed(0)
    model = TinySegmenter(num_classes=5).eval()
    x, _ = scenes(4, size=32)
    result = compute_cams(model, x, "backbone", output_transform="out")
    assert result.predicted_maps is not None
    assert torch.equal(result.targets, main_class(result.predicted_maps))
    assert result.logits.shape == (4, 5)  # each class's mean logit over the image


def test_a_class_predicted_nowhere_warns_instead_of_a_silent_empty_map() -> None:
    torch.manual_seed(0)
    model = TinySegmenter(num_classes=5).eval()
    x, _ = scenes(2, size=32)
    predicted = model(x)["out"].argmax(dim=1)
    absent = next(k for k in range(5) if not bool((predicted == k).any()))
    with pytest.warns(
        UserWarning, match=rf"Class {absent} covers no pixel.*target=\(class, mask\)"
    ):
        compute_cams(model, x, "backbone", target=absent, output_transform="out")


def test_an_image_without_its_class_in_a_later_chunk_warns_too() -> None:
    torch.manual_seed(0)
    model = TinySegmenter(num_classes=5).eval()  # a fresh model: its first call is checked
    x, _ = scenes(3, size=32)
    pixels = torch.ones(3, 32, 32, dtype=torch.bool)
    pixels[2] = False  # the class's pixels are named on images 0 and 1, none on image 2
    with pytest.warns(UserWarning, match=r"Class 1 covers no pixel of image 2 "):
        compute_cams(model, x, "backbone", target=(1, pixels), output_transform="out",
                     batch_size=1)  # fmt: skip


def test_a_label_map_given_as_a_target_mask_is_refused_and_a_0_1_one_is_a_mask() -> None:
    torch.manual_seed(0)
    model = TinySegmenter(num_classes=5).eval()
    x, _ = scenes(2, size=32)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, 8:20, 8:20] = 2
    labels[:, :2] = 255  # an ignore border
    with pytest.raises(ValueError, match=r"holds \[2, 255\] besides 0 and 1.*labels == class"):
        compute_cams(model, x, "backbone", target=(2, labels), output_transform="out")
    as_int = compute_cams(model, x, "backbone", target=(2, (labels == 2).long()),
                          output_transform="out")  # fmt: skip
    as_bool = compute_cams(model, x, "backbone", target=(2, labels == 2), output_transform="out")
    assert torch.equal(as_int["backbone", "gradcam"], as_bool["backbone", "gradcam"])
    assert torch.equal(as_int.pixel_masks, as_bool.pixel_masks)


def test_a_dict_output_names_its_key_and_bad_targets_name_the_fix() -> None:
    model = torchvision_model("lraspp_mobilenet_v3_large")
    x = torch.randn(1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"'out': \(1, 4, 64, 64\).*output_transform='out'"):
        compute_cams(model, x, "classifier.cbr")
    result = compute_cams(model, x, "classifier.cbr", output_transform="out")  # the hint works
    assert result["classifier.cbr", "gradcam"].shape[0] == 1
    with pytest.raises(
        ValueError,
        match=r"pixel mask of target=\(class, pixel_mask\) must be .* or \[B, H, W\], got list",
    ):
        compute_cams(model, x, "classifier.cbr", target=(1, [0, 1]), output_transform="out")
    with pytest.raises(ValueError, match=r"\(class, pixel_mask\).*got 3 elements"):
        compute_cams(model, x, "classifier.cbr", target=(1, x, x), output_transform="out")
    with pytest.raises(ValueError, match=r"Target index 7 .* 4 classes"):
        compute_cams(model, x, "classifier.cbr", target=7, output_transform="out")


# -- 3. the automatic layer ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fcn_resnet50", "classifier.2"),
        ("deeplabv3_mobilenet_v3_large", "classifier.3"),
        ("lraspp_mobilenet_v3_large", "classifier.cbr"),
    ],
)
def test_the_automatic_layer_is_the_last_features_before_the_classifier(
    name: str, expected: str
) -> None:
    model = torchvision_model(name)
    x = torch.randn(2, 3, SIZE, SIZE)
    chosen = first_spatial_layer(model, x, None, "out")
    assert chosen == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "logit map" warning at the chosen layer
        result = compute_cams(model, x, chosen, output_transform="out")
    assert result[chosen, "gradcam"].flatten(1).amax(dim=1).gt(0).all()


def test_an_explicit_logits_layer_warns_that_its_map_is_the_logit_map() -> None:
    model = torchvision_model("deeplabv3_mobilenet_v3_large")
    x = torch.randn(2, 3, SIZE, SIZE)
    with pytest.warns(UserWarning, match=r"'classifier' outputs the segmentation logits"):
        result = compute_cams(model, x, "classifier", output_transform="out")
    # What the warning says: the map is the explained class's logit map, cut at zero.
    logits = model.classifier(model.backbone(x)["out"]).detach()
    k = result.targets
    logit_map = logits[torch.arange(2), k].clamp(min=0)
    cam = result["classifier", "gradcam"]
    ratio = cam.flatten(1).amax(1) / logit_map.flatten(1).amax(1)
    assert torch.allclose(cam, logit_map * ratio[:, None, None], atol=1e-5)


# -- 2. label maps are not masks -----------------------------------------------------------------


def test_a_class_index_mask_is_a_label_map_scored_against_the_explained_class() -> None:
    # The case: {"image": x, "mask": values 0..2}, target=2.
    x, labels = scenes(4, size=32)
    labels = labels.clamp(max=2)
    (probe,) = build_probes(probe_sets({"image": x, "mask": labels}), 4).values()
    assert probe.masks is None and probe.label_maps is not None
    assert torch.equal(probe.label_maps, labels)
    torch.manual_seed(0)
    model = TinySegmenter(num_classes=3).eval()
    options = EngineOptions(target=2, output_transform="out")
    result = compute_probe(model, probe, ["backbone"], options)
    assert result.targets.tolist() == [2, 2, 2, 2]

    def energy(scored: ProbeSet) -> float:
        scalars, _ = AttentionTracker().score({"probe": result}, {"probe": scored})
        key = ScalarKey(LOCALIZATION, MapKey("probe", "backbone", "gradcam"), "energy")
        return scalars[key]

    class_two = energy(replace(probe, label_maps=None, masks=labels == 2))
    any_class = energy(replace(probe, label_maps=None, masks=labels > 0))
    assert energy(probe) == class_two != any_class  # class 2's pixels, not "any class"


@pytest.mark.parametrize("layout", ["tuple", "dict-label", "masks="])
def test_label_maps_with_target_label_explain_the_main_labelled_class(layout: str) -> None:
    x, labels = scenes(4, size=32)
    given = None
    if layout == "tuple":
        spec = {"probe": (x, labels)}
    elif layout == "dict-label":
        spec = probe_sets({"image": x, "label": labels})
    else:
        spec, given = {"probe": x}, labels
    (probe,) = build_probes(spec, 4, masks=given).values()
    assert probe.labels is None and torch.equal(probe.label_maps, labels)
    options = probe_options(EngineOptions(target="label", output_transform="out"), probe)
    classes, pixels = options.target
    assert torch.equal(classes, main_class(labels)) and bool((classes > 0).all())
    assert torch.equal(pixels, labels == classes[:, None, None])
    torch.manual_seed(0)
    result = compute_probe(TinySegmenter(num_classes=5).eval(), probe, ["backbone"], options)
    assert torch.equal(result.targets, classes)
    assert result.pixel_masks is not None and torch.equal(result.pixel_masks.bool(), pixels)


def test_binary_masks_keep_their_meaning_and_a_0_1_integer_mask_is_called_ambiguous() -> None:
    x = torch.zeros(2, 3, 8, 8)
    for mask in (torch.rand(2, 8, 8) > 0.5, (torch.rand(2, 8, 8) > 0.5).float()):
        (probe,) = build_probes(probe_sets({"image": x, "mask": mask}), 2).values()
        assert probe.label_maps is None and torch.equal(probe.masks, mask > 0.5)
    eight_bit = (torch.rand(2, 8, 8) > 0.5).to(torch.uint8) * 255  # a binary mask saved as PNG
    (probe,) = build_probes(probe_sets({"image": x, "mask": eight_bit}), 2).values()
    assert probe.label_maps is None and torch.equal(probe.masks, eight_bit > 0)
    (probe,) = build_probes({"p": x}, 2, masks=eight_bit).values()
    assert probe.label_maps is None and torch.equal(probe.masks, eight_bit > 0)
    said: list[str] = []
    ones = (torch.rand(2, 8, 8) > 0.5).long()
    (probe,) = build_probes(probe_sets({"image": x, "mask": ones}), 2, warn=said.append).values()
    assert probe.label_maps is None and torch.equal(probe.masks, ones.bool())
    assert len(said) == 1 and "only 0 and 1" in said[0] and "'label' key" in said[0]


def test_class_iou_and_captions_name_the_class_and_its_iou() -> None:
    predicted = torch.tensor([[[1, 1], [0, 0]], [[2, 2], [2, 2]]])
    labels = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]])
    iou = class_iou(predicted, labels, torch.tensor([1, 1]))
    assert iou[0].item() == 0.5 and torch.isnan(iou[1])
    upsampled = class_iou(predicted, labels.repeat_interleave(2, 1).repeat_interleave(2, 2),
                          torch.tensor([1, 2]))  # fmt: skip
    assert upsampled[0].item() == 0.5 and upsampled[1].item() == 0.0


# -- 4. the callback and the dashboard -------------------------------------------------------------


class SegmentSteps:
    """A TinySegmenter trained on source scenes with cross-entropy (either namespace)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinySegmenter(width=16)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x)["out"], y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


@pytest.mark.slow
def test_a_monitored_fit_logs_class_captions_localization_and_a_history_cli_reads(
    tmp_path: Path, lightning: Lightning, capsys: pytest.CaptureFixture[str]
) -> None:
    train = torch.utils.data.TensorDataset(*scenes(32, size=32))
    probe = {"source": scenes(4, size=32), "target": scenes(4, "target", size=32)}
    monitor = CamMonitor(
        probe=probe, target="label", output_transform="out", class_names=shapes.scene_class_names()
    )
    logger = lightning.loggers.TensorBoardLogger(tmp_path, name="", version="")
    with pytest.warns(UserWarning, match=r"no layer given, using 'net.classifier.0'"):
        fitted = fit(monitor, tmp_path, lightning, model=lightning.module(SegmentSteps),
                     train=train, val=False, logger=logger)  # fmt: skip
    events = read_events(tmp_path)
    tags = events.Tags()
    layer = "net.classifier.0"
    assert {f"cam/source/{layer}/gradcam", f"cam/target/{layer}/gradcam"} <= set(tags["images"])
    for probe_name in ("source", "target"):
        energy = events.Scalars(f"cam_loc/{probe_name}/{layer}/gradcam/energy")
        assert len(energy) == 3 and all(0 <= e.value <= 1 for e in energy)  # baseline + 2
        assert len(events.Scalars(f"cam_drift/{probe_name}/{layer}/gradcam/topk_iou_ref")) == 2
    # The captions of the trained model: the class explained, and its IoU on the image.
    (probe_set,) = build_probes({"source": probe["source"]}, 4).values()
    options = probe_options(EngineOptions(target="label", output_transform="out"), probe_set)
    result = compute_probe(fitted.model.net, probe_set, ["classifier.0"], options)
    captions = probe_captions(probe_set, result, shapes.scene_class_names())[0]
    names = [shapes.scene_class_names()[int(k)] for k in main_class(probe["source"][1])]
    assert [c.split(" IoU ")[0] for c in captions] == names
    iou = class_iou(result.predicted_maps, probe_set.label_maps, result.targets)
    assert [c.split(" IoU ")[1] for c in captions] == [
        "-" if torch.isnan(v) else f"{v:.2f}" for v in iou
    ]
    # The run's history: show and compare read it.
    assert cli(["show", str(monitor.folder)]) == 0
    shown = capsys.readouterr().out
    assert layer in shown and "source" in shown and "target" in shown
    other = CamMonitor(probe=probe, target="label", output_transform="out")
    logger = lightning.loggers.TensorBoardLogger(tmp_path / "b", name="", version="")
    with pytest.warns(UserWarning, match=r"no layer given"):
        fit(other, tmp_path / "b", lightning, model=lightning.module(SegmentSteps), train=train,
            val=False, logger=logger, seed=1)  # fmt: skip
    report = tmp_path / "report.html"
    assert cli(["compare", str(monitor.folder), str(other.folder), "--out", str(report)]) == 0
    compared = capsys.readouterr().out
    assert "energy" in compared and layer in compared
    assert report.stat().st_size > 1000 and "<img" in report.read_text()
    last = read_history(monitor.folder)[-1]  # the class each map explained, per image
    assert np.array_equal(last.targets["target"], main_class(probe["target"][1]).numpy())


def test_a_fit_records_each_images_predicted_class_and_show_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The mean logits over the image predict the background on every scene; the history
    records each image's main predicted class (target="predicted"'s rule), which `show`
    prints, beside the class each map explains (the main labelled one) and its IoU; probe.npz
    keeps the label maps, and the report outlines the explained class's pixels."""
    train = torch.utils.data.TensorDataset(*shapes.make_scenes(64, size=32, seed=5))
    x, label_maps = shapes.make_scenes(4, size=32, seed=7)
    names = shapes.scene_class_names()
    monitor = CamMonitor(
        probe={"source": (x, label_maps)}, target="label", output_transform="out",
        class_names=names, save_dir=tmp_path / "h",
    )  # fmt: skip
    model = Lightning("pytorch_lightning").module(SegmentSteps)
    with pytest.warns(UserWarning, match=r"no layer given"):
        fitted = fit(monitor, tmp_path, model=model, train=train, val=False, max_epochs=8)
    with torch.no_grad():
        logits = fitted.model.net.eval()(x)["out"]
    predicted = main_class(logits.argmax(dim=1), len(names))
    explained = main_class(label_maps)
    means = logits.mean(dim=(2, 3)).argmax(dim=1)  # what `show` counted before
    assert not torch.equal(predicted, means)  # the fit this test needs

    iou = class_iou(logits.argmax(dim=1), label_maps, explained)
    assert cli(["show", str(tmp_path / "h")]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("  source: predicted ")))

    def counted(text: str) -> dict[str, int]:
        pairs = (item.rsplit(" x", 1) for item in text.split(", "))
        return {name: int(count) for name, count in pairs}

    def expected(classes: Tensor) -> dict[str, int]:
        return {names[k]: classes.tolist().count(k) for k in set(classes.tolist())}

    assert counted(lines[at].removeprefix("  source: predicted ")) == expected(predicted)
    assert counted(lines[at + 2].removeprefix("    explained ")) == expected(explained)
    mean_iou = f"IoU {np.nanmean(iou.numpy()):.4f}"
    assert lines[at + 3].startswith(f"    explained class, mean of 4 images: {mean_iou}")

    last = read_history(tmp_path / "h")[-1]
    record = last.segmentation["source"]
    assert np.array_equal(record.predicted, predicted.numpy())
    assert np.array_equal(last.targets["source"], explained.numpy())
    np.testing.assert_allclose(record.iou, iou.numpy(), rtol=1e-6)
    run = load_run(tmp_path / "h")
    assert run.probe is not None and np.array_equal(run.probe.label_maps["source"], label_maps)
    regions = _regions(last, "source", run.probe, 4)
    assert regions is not None and torch.equal(regions, label_maps == explained[:, None, None])
    captions = _captions(last, "source", None, 32, 32)
    assert captions is not None
    assert [c.split(" ")[0] for c in captions] == [names[k] for k in explained.tolist()]


def test_a_class_and_pixel_mask_target_is_recorded_by_content_for_resumes() -> None:
    from cam_monitor.lightning.resume import settings
    from cam_monitor.options import DriftOptions

    region = torch.zeros(8, 8, dtype=torch.bool)
    region[2:5] = True

    def described(mask: Tensor) -> str:
        return settings(EngineOptions(target=(1, mask)), DriftOptions(), None)["target"]

    assert described(region) == described(region.clone())
    assert described(region).startswith("(1, tensor ") and described(region) != described(~region)


def test_a_pixel_target_on_a_classifier_names_the_mismatch(tiny_cnn: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    everywhere = torch.ones(32, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\(class, pixel_mask\).*\(2, 5\).*output_transform"):
        compute_cams(tiny_cnn, x, "features.5", target=(1, everywhere))


def test_without_label_maps_captions_give_the_share_of_pixels_predicted_as_the_class() -> None:
    torch.manual_seed(0)
    x, _ = scenes(4, size=32)
    (probe,) = build_probes({"p": x}, 4).values()
    model = TinySegmenter(num_classes=5).eval()
    result = compute_probe(model, probe, ["backbone"], EngineOptions(output_transform="out"))
    names = shapes.scene_class_names()
    full, compact, numbers = probe_captions(probe, result, names)
    assert result.predicted_maps is not None
    for i, k in enumerate(result.targets.tolist()):
        share = float((result.predicted_maps[i] == k).float().mean())
        assert full[i] == f"{names[k]} {share:.0%} px" and compact[i] == f"{names[k]} {share:.0%}"
        assert numbers[i] == f"{k} {share:.0%}"


def test_a_segmentation_evaluation_in_chunks_gives_the_whole_probes() -> None:
    """With `batch_size`, a segmentation model's CAMs, its localization against label maps, the
    drawn grids and the history's per-image entries (predicted class, share, IoU, pixel
    accuracy, measured chunk by chunk) are those of the whole probe at once."""
    x, labels = scenes(6, size=32)
    (probe,) = build_probes(probe_sets({"image": x, "label": labels}), 6).values()
    torch.manual_seed(0)
    model = TinySegmenter(num_classes=5).eval()
    found = []
    for batch_size in (None, 4):
        options = EngineOptions(target="label", output_transform="out", batch_size=batch_size)
        output = run_evaluation(
            model, {"probe": probe}, ["backbone"], options, RenderOptions(max_tiles=3)
        )
        scalars, _ = AttentionTracker().score(output.results, {"probe": probe}, batch_size)
        record = evaluation_record(
            0, 0, 0, {"probe": probe}, output.results, scalar_tags(scalars), batch_size=batch_size
        )
        found.append((output, scalars, record))
    (whole, scores, record), (chunked, chunked_scores, chunked_record) = found
    for key, maps in whole.results["probe"].maps.items():
        torch.testing.assert_close(chunked.results["probe"].maps[key], maps)
    assert any(key.kind == LOCALIZATION for key in scores)
    assert chunked_scores == pytest.approx(scores, rel=1e-5, nan_ok=True)
    assert whole.images.keys() == chunked.images.keys()
    for key, grid in whole.images.items():  # at most the colormap's next colour, rarely
        assert (grid.int() - chunked.images[key].int()).abs().max() <= 2, key
    entry, chunked_entry = record.segmentation["probe"], chunked_record.segmentation["probe"]
    np.testing.assert_array_equal(chunked_entry.predicted, entry.predicted)
    for field in ("share", "iou", "accuracy"):
        np.testing.assert_allclose(getattr(chunked_entry, field), getattr(entry, field))
