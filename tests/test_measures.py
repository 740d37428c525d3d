from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import pearsonr, spearmanr

from cam_monitor.measures import (
    MEASURES,
    boxes_to_masks,
    class_accuracy,
    class_iou,
    class_share,
    com_shift,
    drift,
    energy_inside,
    entropy,
    js_divergence,
    mask_iou,
    pearson,
    pointing_game,
    segment_measures,
    spearman,
    summarize,
    topk_iou,
)

LN2 = math.log(2.0)
Measure = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def blob(
    size: tuple[int, int], top: int, left: int, height: int = 2, width: int = 2
) -> torch.Tensor:
    """A `[1, H, W]` map of zeros with a block of ones at (top, left)."""
    out = torch.zeros(1, *size)
    out[0, top : top + height, left : left + width] = 1.0
    return out


def relu_noise(batch: int, h: int, w: int, seed: int, quantize: bool = False) -> torch.Tensor:
    """ReLU'd gaussian noise: about half the pixels are tied zeros; optionally more ties."""
    x = torch.relu(torch.randn(batch, h, w, generator=torch.Generator().manual_seed(seed)))
    return torch.round(x * 2) / 2 if quantize else x


# --------------------------------------------------------------------------- correlations


def test_spearman_uses_average_ranks_for_ties() -> None:
    # ranks a = [1.5, 1.5, 3, 4], b = [1.5, 3, 1.5, 4]: cov 2.25 / var 4.5 = 0.5
    # (plain argsort ranks would give 0.8)
    a = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    b = torch.tensor([[[0.0, 1.0], [0.0, 2.0]]])
    assert spearman(a, b).item() == pytest.approx(0.5, abs=1e-6)


def test_spearman_is_rank_based_and_pearson_is_not() -> None:
    a = torch.tensor([[[0.0, 1.0], [2.0, 10.0]]])
    assert spearman(a, a**3).item() == pytest.approx(1.0, abs=1e-6)
    assert pearson(a, a**3).item() < 0.99
    reversed_map = torch.tensor([[[10.0, 2.0], [1.0, 0.0]]])
    assert spearman(a, reversed_map).item() == pytest.approx(-1.0, abs=1e-6)


def test_pearson_linear_maps_by_hand() -> None:
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert pearson(a, 3 * a + 2).item() == pytest.approx(1.0, abs=1e-6)
    assert pearson(a, 5 - a).item() == pytest.approx(-1.0, abs=1e-6)
    # centred a = [-1.5, -.5, .5, 1.5], b = [1, -1, -1, 1]: cov 0 -> r = 0
    assert pearson(a, torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])).item() == pytest.approx(
        0.0, abs=1e-6
    )


@pytest.mark.parametrize("quantize", [False, True])
def test_correlations_match_scipy_on_relu_noise(quantize: bool) -> None:
    a = relu_noise(12, 7, 9, seed=0, quantize=quantize)
    b = torch.relu(a + 0.7 * relu_noise(12, 7, 9, seed=1, quantize=quantize) - 0.3)
    assert (a == 0).float().mean() > 0.3  # many tied zeros in every batch
    got_s, got_p = spearman(a, b), pearson(a, b)
    for i in range(a.shape[0]):
        x, y = a[i].flatten().double().numpy(), b[i].flatten().double().numpy()
        assert got_s[i].item() == pytest.approx(spearmanr(x, y)[0], abs=1e-5)
        assert got_p[i].item() == pytest.approx(pearsonr(x, y)[0], abs=1e-5)


def test_spearman_large_batch_matches_scipy() -> None:
    # The realistic size (B=64, 56x56): must not build an N x N matrix, and must stay exact.
    a = relu_noise(64, 56, 56, seed=2)
    b = relu_noise(64, 56, 56, seed=3) + 0.5 * a
    got = spearman(a, b)
    assert got.shape == (64,) and got.dtype == torch.float32
    for i in (0, 31, 63):
        x, y = a[i].flatten().double().numpy(), b[i].flatten().double().numpy()
        assert got[i].item() == pytest.approx(spearmanr(x, y)[0], abs=1e-5)


@pytest.mark.parametrize("fn", [spearman, pearson])
def test_correlations_nan_for_constant_or_zero_maps(fn: Measure) -> None:
    good = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    a = torch.stack([good, torch.zeros(2, 2), torch.full((2, 2), 3.0), good])
    b = torch.stack([good, good, good, torch.zeros(2, 2)])
    out = fn(a, b)
    assert out[0].item() == pytest.approx(1.0, abs=1e-6)
    assert torch.isnan(out[1:]).all()


def test_correlations_nan_for_non_finite_input() -> None:
    a = torch.tensor([[[0.0, 1.0], [2.0, float("nan")]]])
    b = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    assert torch.isnan(spearman(a, b)).all() and torch.isnan(pearson(a, b)).all()


# --------------------------------------------------------------------------- top-k IoU


def test_topk_iou_blobs_by_hand() -> None:
    a = blob((4, 4), 0, 0)
    assert topk_iou(a, a, k=0.25).item() == 1.0
    # shifted one column: overlap 2 of 6 pixels
    assert topk_iou(a, blob((4, 4), 0, 1), k=0.25).item() == pytest.approx(1 / 3)
    assert topk_iou(a, blob((4, 4), 2, 2), k=0.25).item() == 0.0


def test_topk_iou_ties_at_threshold_all_join() -> None:
    a = blob((4, 4), 0, 0)  # four tied ones
    b = a.clone()
    b[0, 0, 0] = 2.0  # a single maximum inside the same block
    # k = 1/16 asks for one pixel: a's set is the four ties, b's the single max -> 1/4
    assert topk_iou(a, b, k=1 / 16).item() == pytest.approx(0.25)


def test_topk_iou_excludes_background_zeros() -> None:
    # Only two non-zero pixels each; k = 0.5 would reach into the zeros, which never count.
    a = torch.zeros(1, 4, 4)
    b = torch.zeros(1, 4, 4)
    a[0, 0, 0], a[0, 0, 1] = 1.0, 2.0
    b[0, 0, 1], b[0, 0, 2] = 3.0, 1.0
    assert topk_iou(a, b, k=0.5).item() == pytest.approx(1 / 3)
    assert topk_iou(a, b, k=1.0).item() == pytest.approx(1 / 3)


def test_topk_iou_nan_for_constant_maps() -> None:
    a = torch.stack([torch.zeros(3, 3), torch.ones(3, 3), blob((3, 3), 0, 0)[0]])
    b = torch.stack([blob((3, 3), 0, 0)[0]] * 3)
    out = topk_iou(a, b, k=0.3)
    assert torch.isnan(out[:2]).all() and out[2].item() == 1.0


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5, float("nan")])
def test_topk_iou_rejects_bad_k(k: float) -> None:
    a = blob((4, 4), 0, 0)
    with pytest.raises(ValueError, match=r"k must be a fraction in \(0, 1\]"):
        topk_iou(a, a, k=k)
    with pytest.raises(ValueError, match="k must be"):
        mask_iou(a, a > 0, k=k)


# --------------------------------------------------------------------------- distributions


def test_js_by_hand() -> None:
    a = blob((4, 4), 0, 0)
    assert js_divergence(a, 7 * a).item() == pytest.approx(0.0, abs=1e-7)  # scale-free
    assert js_divergence(a, blob((4, 4), 2, 2)).item() == pytest.approx(LN2, abs=1e-6)
    # p = [1, 0], q = [.5, .5], m = [.75, .25]: JS = .75 ln(4/3)
    p = torch.tensor([[[2.0, 0.0]]])
    q = torch.tensor([[[3.0, 3.0]]])
    assert js_divergence(p, q).item() == pytest.approx(0.75 * math.log(4 / 3), abs=1e-6)
    assert js_divergence(q, p).item() == pytest.approx(0.75 * math.log(4 / 3), abs=1e-6)


def test_js_bounded_and_matches_scipy() -> None:
    a = relu_noise(16, 6, 6, seed=4)
    b = relu_noise(16, 6, 6, seed=5)
    out = js_divergence(a, b)
    assert torch.isfinite(out).all()
    assert (out >= 0).all() and (out <= LN2 + 1e-6).all()
    for i in range(16):
        x, y = a[i].flatten().double().numpy(), b[i].flatten().double().numpy()
        assert out[i].item() == pytest.approx(jensenshannon(x, y) ** 2, abs=1e-5)


def test_js_nan_for_zero_map_and_no_nan_from_zero_log_zero() -> None:
    a = torch.stack([torch.zeros(3, 3), blob((3, 3), 0, 0)[0]])
    b = torch.stack([blob((3, 3), 0, 0)[0], blob((3, 3), 1, 1)[0]])
    out = js_divergence(a, b)
    assert math.isnan(out[0].item())
    assert math.isfinite(out[1].item()) and 0 < out[1].item() < LN2


def test_com_shift_of_shifted_blob() -> None:
    a = blob((9, 9), 1, 1, 3, 3)
    b = blob((9, 9), 3, 2, 3, 3)  # shifted by (2, 1) pixels
    assert com_shift(a, b).item() == pytest.approx(math.sqrt(5) / math.sqrt(8**2 + 8**2))
    assert com_shift(a, 5 * a).item() == pytest.approx(0.0, abs=1e-7)
    corner_a, corner_b = torch.zeros(1, 4, 6), torch.zeros(1, 4, 6)
    corner_a[0, 0, 0], corner_b[0, 3, 5] = 1.0, 1.0
    assert com_shift(corner_a, corner_b).item() == pytest.approx(1.0)


def test_com_shift_nan_for_zero_map() -> None:
    a = torch.stack([torch.zeros(4, 4), blob((4, 4), 0, 0)[0]])
    out = com_shift(a, blob((4, 4), 1, 1).expand(2, 4, 4))
    assert math.isnan(out[0].item()) and math.isfinite(out[1].item())


def test_entropy_by_hand() -> None:
    maps = torch.stack(
        [
            torch.full((4, 4), 2.0),  # uniform -> 1
            blob((4, 4), 0, 0, 1, 1)[0],  # one hot pixel -> 0
            blob((4, 4), 0, 0, 1, 4)[0],  # 4 equal pixels of 16 -> ln 4 / ln 16 = 0.5
            torch.zeros(4, 4),  # undefined
        ]
    )
    out = entropy(maps)
    assert out[:3].tolist() == pytest.approx([1.0, 0.0, 0.5], abs=1e-6)
    assert math.isnan(out[3].item())


# --------------------------------------------------------------------------- drift naming


def test_drift_is_the_measure_as_a_distance() -> None:
    a = relu_noise(5, 6, 6, seed=6)
    b = relu_noise(5, 6, 6, seed=7)
    torch.testing.assert_close(drift(a, b, "spearman"), 1 - spearman(a, b))
    torch.testing.assert_close(drift(a, b, "pearson"), 1 - pearson(a, b))
    torch.testing.assert_close(drift(a, b, "topk_iou", k=0.3), 1 - topk_iou(a, b, k=0.3))
    torch.testing.assert_close(drift(a, b, "js"), js_divergence(a, b))
    torch.testing.assert_close(drift(a, b, "com_shift"), com_shift(a, b))
    assert MEASURES == ("spearman", "pearson", "topk_iou", "js", "com_shift")
    for measure in MEASURES:
        same = drift(a, a, measure)
        assert same.dtype == torch.float32 and same.shape == (5,)
        assert torch.allclose(same, torch.zeros(5), atol=1e-6), measure


def test_drift_unknown_measure_lists_valid_names() -> None:
    a = blob((4, 4), 0, 0)
    with pytest.raises(ValueError, match=r"'ssim'.*spearman, pearson, topk_iou, js, com_shift"):
        drift(a, a, "ssim")


@pytest.mark.parametrize("fn", [spearman, pearson, topk_iou, js_divergence, com_shift])
def test_shape_mismatch_names_both_shapes(fn: Measure) -> None:
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        fn(torch.rand(2, 4, 4), torch.rand(2, 4, 5))


def test_non_3d_maps_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[B, h, w\].*\(4, 4\)"):
        spearman(torch.rand(4, 4), torch.rand(4, 4))
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        entropy(torch.rand(2, 1, 4, 4))


def test_empty_batch_gives_empty_results() -> None:
    empty = torch.zeros(0, 4, 4)
    for measure in MEASURES:
        assert drift(empty, empty, measure).shape == (0,)
    assert entropy(empty).shape == (0,)


# --------------------------------------------------------------------------- localization


def test_energy_inside_upsamples_to_mask_resolution() -> None:
    # Left half of a 4x4 map is 1. Bilinear x2 (align_corners=False) gives each output row
    # [1, 1, 1, .75, .25, 0, 0, 0]: the left-half mask holds 3.75 of 4.
    maps = torch.zeros(1, 4, 4)
    maps[0, :, :2] = 1.0
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, :, :4] = True
    assert energy_inside(maps, masks).item() == pytest.approx(0.9375)
    assert energy_inside(maps, ~masks).item() == pytest.approx(0.0625)
    assert energy_inside(maps, masks.float()).item() == pytest.approx(0.9375)  # float masks


def test_energy_inside_blob_in_and_out_and_degenerate() -> None:
    maps = torch.cat([blob((6, 6), 1, 1), blob((6, 6), 4, 4), torch.zeros(1, 6, 6)])
    mask = boxes_to_masks(torch.tensor([[0, 0, 3, 3]] * 3), (6, 6))
    out = energy_inside(maps, mask)
    assert out[0].item() == 1.0 and out[1].item() == 0.0 and math.isnan(out[2].item())
    assert math.isnan(energy_inside(maps[:1], torch.zeros(1, 6, 6)).item())  # empty mask


def test_pointing_game_with_tolerance() -> None:
    maps = torch.zeros(1, 8, 8)
    maps[0, 2, 2] = 1.0
    maps[0, 5, 5] = 0.5  # a lower peak inside the mask does not count
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 4:7, 4:7] = True  # nearest mask pixel to (2, 2) is (4, 4): 2 px away
    assert [pointing_game(maps, mask, t).item() for t in (0, 1, 2)] == [0.0, 0.0, 1.0]
    assert pointing_game(maps, boxes_to_masks(torch.tensor([[2, 2, 3, 3]]), (8, 8))).item() == 1.0


def test_pointing_game_upsamples_and_handles_degenerate() -> None:
    # 4x4 map peaked at (0, 0): after x2 bilinear the peak is output pixel (0, 0) only.
    maps = torch.tensor([[[4.0, 1.0, 0.0, 0.0]] + [[1.0, 0.0, 0.0, 0.0]] + [[0.0] * 4] * 2])
    inside = boxes_to_masks(torch.tensor([[0, 0, 1, 1]]), (8, 8))
    outside = boxes_to_masks(torch.tensor([[1, 1, 8, 8]]), (8, 8))
    assert pointing_game(maps, inside).item() == 1.0
    assert pointing_game(maps, outside).item() == 0.0
    assert math.isnan(pointing_game(torch.ones(1, 4, 4), inside).item())  # constant map
    assert math.isnan(pointing_game(maps, torch.zeros(1, 8, 8)).item())  # empty mask
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(maps, inside, tolerance=-1)


def test_mask_iou_by_hand() -> None:
    maps = blob((4, 4), 0, 0)
    same = blob((4, 4), 0, 0) > 0
    shifted = blob((4, 4), 0, 1) > 0
    assert mask_iou(maps, same, k=0.25).item() == 1.0
    assert mask_iou(maps, shifted, k=0.25).item() == pytest.approx(1 / 3)
    assert math.isnan(mask_iou(maps, torch.zeros(1, 4, 4), k=0.25).item())
    assert math.isnan(mask_iou(torch.zeros(1, 4, 4), same, k=0.25).item())


def test_localization_shape_errors_name_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(3, 8, 8\)"):
        energy_inside(torch.rand(2, 4, 4), torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 8\)"):
        mask_iou(torch.rand(2, 4, 4), torch.ones(2, 8))


def test_boxes_to_masks_matches_slicing() -> None:
    boxes = torch.tensor([[1, 2, 3, 5], [0, 0, 4, 6], [2, 2, 2, 4], [-3, 4, 9, 99]])
    masks = boxes_to_masks(boxes, (6, 4))
    assert masks.shape == (4, 6, 4) and masks.dtype == torch.bool
    expected = np.zeros((4, 6, 4), dtype=bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        expected[i, max(y0, 0) : y1, max(x0, 0) : x1] = True
    assert np.array_equal(masks.numpy(), expected)
    assert masks[2].sum() == 0  # zero-width box
    # fractional coordinates: a pixel is inside when its centre is
    frac = boxes_to_masks(torch.tensor([[0.6, 0.0, 2.6, 1.0]]), (1, 4))
    assert frac.int().tolist() == [[[0, 1, 1, 0]]]
    with pytest.raises(ValueError, match=r"\[B, 4\].*\(4,\)"):
        boxes_to_masks(torch.tensor([0, 0, 1, 1]), (4, 4))


# --------------------------------------------------------------------------- summarize


def test_summarize_excludes_non_finite() -> None:
    mean, excluded = summarize(torch.tensor([1.0, float("nan"), 2.0, float("inf"), 6.0]))
    assert mean == pytest.approx(3.0) and excluded == 2
    mean, excluded = summarize(torch.full((3,), float("nan")))
    assert math.isnan(mean) and excluded == 3
    assert summarize(torch.tensor([0.0, 0.0])) == (0.0, 0)


def test_scores_from_validated_options_match_the_public_functions_without_checking_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cam_monitor.measures as measures
    from cam_monitor.options import DriftOptions

    gen = torch.Generator().manual_seed(3)
    a, b = torch.rand(4, 6, 6, generator=gen), torch.rand(4, 6, 6, generator=gen)
    masks = torch.rand(4, 12, 12, generator=gen) > 0.7
    options = DriftOptions(measures=MEASURES, topk=0.3, pointing_tolerance=1)
    expected_drift = {m: drift(a, b, m, k=0.3) for m in MEASURES}
    expected_scores = {
        "energy": energy_inside(a, masks),
        "pointing": pointing_game(a, masks, 1),
        "mask_iou": mask_iou(a, masks, 0.3),
    }

    def checked_again(*args: object) -> None:
        raise AssertionError("an option DriftOptions validated was checked again")

    monkeypatch.setattr(measures, "_check_k", checked_again)
    got_drift = measures.drift_scores(a, b, options)
    got_scores = measures.localization_scores(a, masks, options)
    assert list(got_drift) == list(MEASURES)
    for name, values in [*expected_drift.items(), *expected_scores.items()]:
        got = got_drift.get(name, got_scores.get(name))
        assert got is not None and torch.equal(got.isnan(), values.isnan())
        assert torch.equal(got.nan_to_num(), values.nan_to_num()), name
    with pytest.raises(ValueError, match="maps must have the same shape"):
        measures.drift_scores(a, b[:, :3], options)


def test_segment_measures_of_the_explained_class_by_hand() -> None:
    """Per image, for the class its map explains: the share of the image predicted as it, its
    IoU and its pixel accuracy (recall of its labelled pixels); NaN where undefined."""
    predicted = torch.tensor([[[1, 1], [0, 0]], [[2, 2], [2, 2]], [[0, 0], [0, 0]]])
    labels = torch.tensor([[[1, 0], [1, 0]], [[0, 0], [0, 1]], [[0, 0], [0, 0]]])
    classes = torch.tensor([1, 1, -1])  # -1: a target callable gave scores, no class
    assert class_share(predicted, classes).tolist()[:2] == [0.5, 0.0]
    assert class_iou(predicted, labels, classes)[:2].tolist() == pytest.approx([1 / 3, 0.0])
    assert class_accuracy(predicted, labels, classes)[:2].tolist() == [0.5, 0.0]
    measured = segment_measures(predicted, classes, labels)
    assert all(bool(torch.isnan(values[2])) for values in measured)
    assert segment_measures(predicted, classes).iou is None
    # Unlabelled pixels (255, -100) count for neither side: predicting the class there is no
    # error, so the first image's IoU and accuracy stay those of its labelled pixels.
    unlabelled = labels.clone()
    unlabelled[0, 0, 1] = 255  # predicted 1, labelled "ignore"
    assert class_iou(predicted, unlabelled, classes)[0].item() == pytest.approx(1 / 2)
    unlabelled[0, 0, 1] = -100
    assert class_accuracy(predicted, unlabelled, classes)[0].item() == 0.5
    # The prediction is resized (nearest) to the labels' size.
    big = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(class_accuracy(predicted, big, classes).nan_to_num(),
                       class_accuracy(predicted, labels, classes).nan_to_num())  # fmt: skip
