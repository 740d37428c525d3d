"""The examples: the synthetic shapes domains, the real-digits domains, the DANN pieces, and tiny
real demo runs."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import read_events

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import dann_digits
import dann_shapes
import demo_figure
import segmentation
import shapes


def _rgb(images: torch.Tensor) -> torch.Tensor:
    return shapes.denormalise(images)


# -- shapes -----------------------------------------------------------------------------------


def test_make_shapes_is_deterministic_per_seed_and_domain() -> None:
    a = shapes.make_shapes(12, "target", seed=3)
    b = shapes.make_shapes(12, "target", seed=3)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    other_seed = shapes.make_shapes(12, "target", seed=4)
    other_domain = shapes.make_shapes(12, "source", seed=3)
    assert not torch.equal(a[0], other_seed[0])
    assert not torch.equal(a[2], other_domain[2])


@pytest.mark.parametrize("domain", ["source", "target"])
@pytest.mark.parametrize("size", [24, 32])
def test_make_shapes_shapes_and_dtypes(domain: str, size: int) -> None:
    images, labels, masks = shapes.make_shapes(10, domain, size=size, seed=0)
    assert images.shape == (10, 3, size, size) and images.dtype == torch.float32
    assert labels.shape == (10,) and labels.dtype == torch.int64
    assert masks.shape == (10, size, size) and masks.dtype == torch.bool
    assert torch.isfinite(images).all()


def test_labels_cover_every_class_evenly() -> None:
    names = shapes.class_names()
    assert len(names) == 4 and len(set(names)) == 4
    _, labels, _ = shapes.make_shapes(40, "source", seed=1)
    assert torch.bincount(labels, minlength=len(names)).tolist() == [10] * len(names)


@pytest.mark.parametrize("domain", ["source", "target"])
def test_masks_mark_the_drawn_shape(domain: str) -> None:
    images, _, masks = shapes.make_shapes(64, domain, seed=2)
    rgb = _rgb(images)
    area = masks.flatten(1).float().mean(1)
    assert (area > 0.03).all() and (area < 0.5).all()  # non-empty, not the whole image
    inside = masks.unsqueeze(1).expand_as(rgb)
    for image, mask in zip(rgb, inside, strict=True):
        shape_pixels = image[mask].view(3, -1)
        background = image[~mask].view(3, -1)
        # The shape is one solid colour, unlike the background around it.
        assert shape_pixels.std(dim=1).max() < 1e-5
        colour = shape_pixels[:, :1]
        assert (background - colour).abs().amax(dim=0).mean() > 0.15
    # The mask sits on the shape: its border pixels change colour across the mask edge.
    if domain == "source":
        brightness = rgb.mean(1)
        assert (brightness[masks].mean() - brightness[~masks].mean()) > 0.3


def test_domains_differ_in_appearance() -> None:
    xs, _, ms = shapes.make_shapes(64, "source", seed=0)
    xt, _, mt = shapes.make_shapes(64, "target", seed=0)
    src, tgt = _rgb(xs), _rgb(xt)
    src_bg = src.permute(1, 0, 2, 3)[:, ~ms]
    tgt_bg = tgt.permute(1, 0, 2, 3)[:, ~mt]
    assert tgt_bg.mean() > src_bg.mean() + 0.2  # bright coloured vs dark background
    assert tgt_bg.std(dim=1).mean() > 3 * src_bg.std(dim=1).mean()  # texture vs plain
    # Warm shapes (red >= blue) on the source, cool shapes (blue > red) on the target.
    src_fg = src.permute(1, 0, 2, 3)[:, ms]
    tgt_fg = tgt.permute(1, 0, 2, 3)[:, mt]
    assert src_fg[0].mean() > src_fg[2].mean() and tgt_fg[2].mean() > tgt_fg[0].mean()


def test_normalisation_is_roughly_standard_on_a_mix_of_domains() -> None:
    xs, _, _ = shapes.make_shapes(128, "source", seed=5)
    xt, _, _ = shapes.make_shapes(128, "target", seed=5)
    mixed = torch.cat([xs, xt])
    mean, std = mixed.mean(dim=(0, 2, 3)), mixed.std(dim=(0, 2, 3))
    assert mean.abs().max() < 0.2 and (std - 1).abs().max() < 0.2
    assert len(shapes.MEAN) == len(shapes.STD) == 3
    back = shapes.denormalise(mixed)
    assert back.min() >= 0 and back.max() <= 1


def test_make_shapes_rejects_an_unknown_domain() -> None:
    with pytest.raises(ValueError, match="domain"):
        shapes.make_shapes(4, "mnist")


# -- DANN pieces ------------------------------------------------------------------------------


def test_gradient_reversal_negates_and_scales_the_gradient() -> None:
    layer = dann_shapes.GradientReversal(0.3)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 7, dtype=torch.float64)
    y = layer(x)
    assert torch.equal(y, x)  # identity forward
    (grad,) = torch.autograd.grad((y * weight).sum(), x)
    torch.testing.assert_close(grad, -0.3 * weight)
    layer.coeff = 0.0
    (grad,) = torch.autograd.grad((layer(x) * weight).sum(), x)
    assert torch.count_nonzero(grad) == 0


def test_grl_schedule() -> None:
    values = [dann_shapes.grl_coefficient(p / 10) for p in range(11)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(1.0, abs=1e-4)
    assert all(a < b for a, b in itertools.pairwise(values))
    assert dann_shapes.grl_coefficient(0.5) == pytest.approx(2 / (1 + torch.e**-5) - 1)


def test_module_has_two_heads_and_the_monitored_layers() -> None:
    module = dann_shapes.build_module(adapt=True, seed=0)
    again = dann_shapes.build_module(adapt=False, seed=0)
    for a, b in zip(module.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)  # same initialisation for both runs
    class_logits, domain_logits = module(torch.randn(3, 3, 32, 32))
    assert class_logits.shape == (3, 4) and domain_logits.shape == (3, 2)
    names = dict(module.named_modules())
    assert all(isinstance(names[layer], torch.nn.Conv2d) for layer in dann_shapes.CAM_LAYERS)


def test_loaders_and_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dann_shapes, "TRAIN_SIZE", 64)
    monkeypatch.setattr(dann_shapes, "VAL_SIZE", 16)
    train, val = dann_shapes.build_loaders(batch_size=8, steps_per_epoch=3, seed=0)
    assert len(train) == 3
    xs, ys, xt = next(iter(train))
    assert xs.shape == xt.shape == (8, 3, 32, 32) and ys.shape == (8,)
    x, y, domain = next(iter(val))
    assert x.shape[0] == y.shape[0] == domain.shape[0] == 32
    assert set(domain.tolist()) == {0, 1}

    probes, masks = dann_shapes.build_probes(16, seed=0)
    assert set(probes) == set(masks) == {"source", "target"}
    for name, (images, labels) in probes.items():
        assert images.shape == (16, 3, 32, 32) and masks[name].shape == (16, 32, 32)
        assert labels.tolist() == sorted(labels.tolist())
        assert torch.bincount(labels).tolist() == [4, 4, 4, 4]
    again, _ = dann_shapes.build_probes(16, seed=0)
    assert torch.equal(again["target"][0], probes["target"][0])


# -- a real, tiny run of the demo -------------------------------------------------------------


@pytest.mark.slow
def test_demo_main_runs_and_logs_cam_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(dann_shapes, "TRAIN_SIZE", 64)
    monkeypatch.setattr(dann_shapes, "VAL_SIZE", 32)
    log_dir = tmp_path / "dann"
    argv = ["--adapt", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8"]
    argv += ["--log-dir", str(log_dir), "--logger", "tensorboard", "--no-progress-bar"]
    assert dann_shapes.main(argv) == 0
    out = capsys.readouterr().out
    assert "target accuracy" in out and str(log_dir) in out

    events = list(log_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1  # written straight into --log-dir, no version folder
    accumulator = read_events(log_dir)
    tags = accumulator.Tags()
    for domain in ("source", "target"):
        for layer in dann_shapes.CAM_LAYERS:
            for method in dann_shapes.CAM_METHODS:
                tag = f"cam/{domain}/{layer}/{method}"
                assert tag in tags["images"]
                # The baseline at the start and one evaluation after the epoch.
                assert len(accumulator.Images(tag)) == 2
    assert {"val/target_acc", "val/source_acc", "train/domain_loss"} <= set(tags["scalars"])

    # The README figure script reads the run's history back and draws one chart per panel.
    import cv2

    figure = tmp_path / "figure.png"
    assert demo_figure.main([str(log_dir), "--out", str(figure)]) == 0
    image = cv2.imread(str(figure))
    assert image is not None and image.shape[1] == 400 * len(demo_figure.PANELS)
    energy = demo_figure.series(demo_figure.load_run(log_dir), "target", *demo_figure.PANELS[0][:3])
    assert energy[0] == [0, 1] and all(0 <= v <= 1 for v in energy[1])


# -- real digits ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> dict:
    return dann_digits.make_digits()


def _digits_rgb(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(dann_digits.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(dann_digits.STD).view(1, 3, 1, 1)
    return images * std + mean


def test_digits_split_is_disjoint_and_covers_the_bundled_set(digits: dict) -> None:
    scans, _ = dann_digits.load_scans()
    assert scans.shape == (1797, 8, 8) and 0 <= scans.min() and scans.max() <= 1
    xs, _ = digits["train_source"]
    xt = digits["train_target"]
    vx, _, domain = digits["val"]
    probe_x, probe_y = digits["probe"]["source"]
    assert len(xs) + len(xt) + len(vx) // 2 + len(probe_x) == 1797
    assert len(vx) == 2 * dann_digits.NUM_VAL and domain.tolist().count(1) == dann_digits.NUM_VAL
    assert probe_y.tolist() == sorted(probe_y.tolist())
    assert torch.bincount(probe_y).tolist() == [dann_digits.PER_CLASS] * 10
    assert list(digits["probe"]) == ["target", "source"]  # the report's summary opens on target
    # Same digits, same places, in both domains: one mask set fits both.
    assert torch.equal(digits["probe"]["target"][1], probe_y)
    assert torch.equal(digits["masks"]["target"], digits["masks"]["source"])
    for x in (xs, xt, vx, probe_x):
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
    again = dann_digits.make_digits()
    assert torch.equal(again["probe"]["target"][0], digits["probe"]["target"][0])


def test_digit_masks_are_the_strokes_and_the_domains_differ(digits: dict) -> None:
    masks = digits["masks"]["source"]
    source = _digits_rgb(digits["probe"]["source"][0])
    target = _digits_rgb(digits["probe"]["target"][0])
    area = masks.flatten(1).float().mean(1)
    assert (area > 0.05).all() and (area < 0.5).all()  # strokes, not the frame
    brightness = source.mean(1)
    assert brightness[masks].mean() > 0.6 and brightness[~masks].mean() < 0.1  # light on dark
    # The target background is a textured colour photo, not a dark plain frame.
    background = target.permute(1, 0, 2, 3)[:, ~masks]
    assert background.mean() > 0.2 and background.std(dim=1).mean() > 0.1
    # |photo - stroke|: at the strokes, the target differs from its own background pattern.
    inside = target.permute(1, 0, 2, 3)[:, masks]
    assert (inside.mean(1) - background.mean(1)).abs().max() > 0.05
    mixed = _digits_rgb(torch.cat([digits["train_source"][0], digits["train_target"]]))
    assert (mixed.mean(dim=(0, 2, 3)) - torch.tensor(dann_digits.MEAN)).abs().max() < 0.05


def test_digits_render_rejects_an_unknown_domain() -> None:
    with pytest.raises(ValueError, match="domain"):
        dann_digits.render(torch.zeros(1, 32, 32), "mnist", seed=0)


@pytest.mark.slow
def test_digits_demo_runs_and_stores_class_names_and_stroke_masks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cam_monitor.compare import load_run

    log_dir = tmp_path / "dann"
    argv = ["--adapt", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8"]
    argv += ["--log-dir", str(log_dir), "--logger", "csv", "--no-progress-bar"]
    assert dann_digits.main(argv) == 0
    out = capsys.readouterr().out
    assert "dann (seed 0): target accuracy" in out and "s CPU" in out
    run = load_run(log_dir)
    assert [ev.epoch for ev in run.evaluations] == [0, 1]
    assert run.evaluations[-1].class_names == dann_digits.CLASSES
    assert run.probe is not None and set(run.probe.masks) == {"target", "source"}
    assert [tuple(g) for g in run.groups] == [
        (p, layer, "gradcam") for p in ("target", "source") for layer in dann_digits.CAM_LAYERS
    ]


def test_the_digits_demo_grids_are_near_square(digits: dict) -> None:
    """TensorBoard scales a grid to its card's width: a 10 x 2 grid (5:1) shrank the 20 tiles
    and their captions below legibility; the demo's grids are within 4:3 of square."""
    from cam_monitor.engine import compute_cams
    from cam_monitor.evaluation import render_probe
    from cam_monitor.probe import ProbeSet

    monitor = dann_digits.build_monitor(digits)
    x, y = digits["probe"]["source"]
    model = dann_digits.build_module(adapt=True).eval()
    result = compute_cams(model, x, list(dann_digits.CAM_LAYERS), output_transform=0)
    grids = render_probe(ProbeSet("source", x, y), result, monitor.render)
    for grid in grids.values():
        height, width = grid.shape[-2:]
        assert 3 / 4 <= width / height <= 4 / 3, (width, height)


# -- segmentation scenes and a tiny run of the segmentation example --------------------------------


def test_make_scenes_gives_label_maps_of_the_drawn_shapes() -> None:
    images, label_maps = shapes.make_scenes(16, "target", size=32, seed=3)
    again, same = shapes.make_scenes(16, "target", size=32, seed=3)
    assert torch.equal(images, again) and torch.equal(label_maps, same)
    assert images.shape == (16, 3, 32, 32) and label_maps.shape == (16, 32, 32)
    assert label_maps.dtype == torch.int64
    names = shapes.scene_class_names()
    assert names[0] == "background" and len(names) == len(shapes.CLASSES) + 1
    counts = torch.bincount(label_maps.flatten(), minlength=len(names))
    assert counts[0] > counts[1:].sum() and (counts[1:] > 0).all()  # every class, mostly ground
    # A shape's pixels differ from the background around it: the labels mark what is drawn.
    rgb = _rgb(images)
    inside, outside = (
        rgb.permute(1, 0, 2, 3)[:, label_maps > 0],
        rgb.permute(1, 0, 2, 3)[:, label_maps == 0],
    )
    assert inside.mean() > outside.mean() + 0.1


@pytest.mark.slow
def test_segmentation_example_runs_and_logs_class_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(segmentation, "VAL_SIZE", 8)
    log_dir = tmp_path / "segmentation"
    argv = ["--epochs", "1", "--train-size", "16", "--batch-size", "8", "--num-probe", "2"]
    assert segmentation.main([*argv, "--log-dir", str(log_dir)]) == 0
    out = capsys.readouterr().out
    assert "source: mean IoU" in out and "target: mean IoU" in out and str(log_dir) in out
    tags = read_events(log_dir).Tags()
    layer = "net.classifier.0"  # the automatic layer: the features before the 1x1 classifier
    for domain in ("source", "target"):
        assert f"cam/{domain}/{layer}/gradcam" in tags["images"]
        assert f"cam_loc/{domain}/{layer}/gradcam/energy" in tags["scalars"]
    assert {"val/source_miou", "val/target_miou"} <= set(tags["scalars"])
