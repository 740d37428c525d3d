from __future__ import annotations

import pytest
import torch

from cam_monitor.methods import (
    GRADIENT_METHODS,
    apply_method,
    class_activation_map,
    gradcam_plus_plus,
    gradient_maps,
    normalize_maps,
)

A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]  # [1, 1, 2, 2], spatial sum 10


def test_gradcam_weights_channels_by_mean_gradient() -> None:
    acts = torch.stack([torch.ones(2, 2), 2 * torch.ones(2, 2)])[None]
    grads = torch.stack([torch.full((2, 2), 3.0), torch.full((2, 2), -1.0)])[None]
    # 3 * 1 - 1 * 2 = 1 everywhere
    assert torch.equal(apply_method("gradcam", acts, grads), torch.ones(1, 2, 2))
    assert torch.equal(apply_method("gradcam", acts, -grads), torch.zeros(1, 2, 2))


def test_gradcam_plus_plus_closed_form_by_hand() -> None:
    # G = 1: alpha = 1 / (2 + 10) at every pixel, weight = 4 / 12, map = A / 3
    out = apply_method("gradcam++", A, torch.ones_like(A))
    assert torch.allclose(out, A[:, 0] / 3)
    assert torch.equal(apply_method("gradcam++", A, -torch.ones_like(A)), torch.zeros(1, 2, 2))


def test_xgradcam_uses_activation_weighted_gradients() -> None:
    grads = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, None]  # sum(G * A) = 5, sum(A) = 10
    assert torch.allclose(apply_method("xgradcam", A, grads), 0.5 * A[:, 0])


def test_layercam_and_hirescam_are_elementwise() -> None:
    grads = torch.tensor([[1.0, -1.0], [2.0, 0.0]])[None, None]
    expected = torch.tensor([[[1.0, 0.0], [6.0, 0.0]]])
    assert torch.equal(apply_method("layercam", A, grads), expected)
    assert torch.equal(apply_method("hirescam", A, grads), expected)
    two = torch.cat([A, A], dim=1)
    mixed = torch.cat([grads, -grads], dim=1)  # hirescam lets channels cancel, layercam does not
    assert torch.equal(apply_method("hirescam", two, mixed), torch.zeros(1, 2, 2))
    assert torch.equal(apply_method("layercam", two, mixed), torch.tensor([[[1.0, 2.0], [6.0, 0]]]))


@pytest.mark.parametrize("name", list(GRADIENT_METHODS))
def test_zero_inputs_give_zero_maps_never_nan(name: str) -> None:
    zeros = torch.zeros(2, 3, 4, 4)
    out = apply_method(name, zeros, zeros)
    assert torch.equal(out, torch.zeros(2, 4, 4))
    out = apply_method(name, zeros, torch.randn(2, 3, 4, 4))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(GRADIENT_METHODS))
def test_each_image_is_independent_of_the_rest_of_the_batch(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    acts, grads = torch.rand(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    batched = apply_method(name, acts, grads)
    alone = torch.cat([apply_method(name, acts[i : i + 1], grads[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, alone, atol=1e-6)
    assert (batched >= 0).all() and batched.dtype == torch.float32


def test_half_precision_inputs_are_computed_in_float32() -> None:
    out = apply_method("gradcam", A.half(), torch.ones_like(A).half())
    assert out.dtype == torch.float32


def test_gradcam_plus_plus_one_pass_form_equals_the_papers_alpha() -> None:
    gen = torch.Generator().manual_seed(1)
    acts = torch.relu(torch.randn(3, 6, 5, 5, generator=gen))
    grads = torch.randn(3, 6, 5, 5, generator=gen) * 1e-2
    grads[0, 0] = 0.0  # a dead channel
    acts[1, 1] = 0.0
    acts[1, 1, 0, 0] = -4.0  # signed activations: sum(A) = -4, so at G = 0.5 ...
    grads[1, 1, 0, 0] = 0.5  # ... 2 G^2 + sum(A) G^3 = 0: alpha's zero case
    g2, g3 = grads.pow(2), grads.pow(3)
    denominator = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(denominator != 0, g2 / denominator, 0.0)
    weights = (alpha * torch.relu(grads)).sum(dim=(2, 3))
    by_hand = torch.relu(torch.einsum("bc,bchw->bhw", weights, acts))
    assert by_hand.max() > 0
    assert torch.allclose(gradcam_plus_plus(acts, grads), by_hand, rtol=1e-5, atol=1e-7)


def test_smooth_gradcam_plus_plus_takes_the_moments_it_is_given() -> None:
    grads = torch.tensor([[1.0, -1.0], [2.0, 0.0]])[None, None]
    same = apply_method("gradcam++", A, grads, (grads.pow(2), grads.pow(3)))
    assert torch.allclose(same, apply_method("gradcam++", A, grads))
    # mean G = 1 everywhere, but G^2 = 4 and G^3 = 0 (copies of +-2 cancel in odd moments):
    # alpha = 4 / 8, weight = 4 * 0.5 * 1 = 2, map = 2 A
    ones = torch.ones_like(A)
    smoothed = apply_method("gradcam++", A, ones, (4 * ones, 0 * ones))
    assert torch.allclose(smoothed, 2 * A[:, 0])
    assert torch.equal(gradcam_plus_plus(A, ones, 4 * ones, 0 * ones), smoothed)


def test_class_activation_map_weights_channels_by_the_head_row() -> None:
    acts = torch.stack([torch.ones(2, 2), torch.eye(2)])[None].repeat(2, 1, 1, 1)
    weights = torch.tensor([[1.0, 1.0], [-1.0, 0.5]])
    out = class_activation_map(acts, weights)
    assert torch.equal(out[0], torch.ones(2, 2) + torch.eye(2))
    assert torch.equal(out[1], torch.zeros(2, 2))


def test_normalize_is_per_image_and_safe_on_constant_maps() -> None:
    maps = torch.stack([torch.arange(4.0).view(2, 2), torch.full((2, 2), 7.0)])
    out = normalize_maps(maps)
    assert torch.allclose(out[0], torch.arange(4.0).view(2, 2) / 3)
    assert torch.equal(out[1], torch.zeros(2, 2))


def subsets() -> list[tuple[str, ...]]:
    names = list(GRADIENT_METHODS)
    return [tuple(n for i, n in enumerate(names) if mask >> i & 1) for mask in range(1, 32)]


@pytest.mark.parametrize("methods", subsets())
def test_gradient_maps_of_any_subset_equal_each_formula_alone(methods: tuple[str, ...]) -> None:
    gen = torch.Generator().manual_seed(len(methods))
    acts = torch.relu(torch.randn(3, 8, 5, 6, generator=gen))
    grads = torch.randn(3, 8, 5, 6, generator=gen)
    grads[0, 1] = 0.0  # a dead channel: the safe divisions
    acts[1, 2] = 0.0
    maps = gradient_maps(methods, acts, grads)
    assert list(maps) == list(methods)
    for name in methods:
        alone = GRADIENT_METHODS[name](acts, grads)
        assert maps[name].shape == (3, 5, 6) and maps[name].is_contiguous(), name
        assert torch.allclose(maps[name], alone, rtol=1e-5, atol=1e-6), name


def test_gradient_maps_takes_smoothing_moments_half_precision_and_channels_last() -> None:
    gen = torch.Generator().manual_seed(3)
    acts = torch.relu(torch.randn(2, 4, 6, 6, generator=gen))
    grads = torch.randn(2, 4, 6, 6, generator=gen)
    moments = (grads.pow(2) * 1.5, grads.pow(3) * 0.5)
    maps = gradient_maps(["gradcam", "gradcam++"], acts, grads, moments)
    assert torch.allclose(maps["gradcam++"], gradcam_plus_plus(acts, grads, *moments), atol=1e-6)
    half = gradient_maps(list(GRADIENT_METHODS), acts.half(), grads.half())
    assert all(m.dtype == torch.float32 for m in half.values())
    last = acts.to(memory_format=torch.channels_last)
    for name, value in gradient_maps(list(GRADIENT_METHODS), last, grads).items():
        assert torch.allclose(value, GRADIENT_METHODS[name](acts, grads), atol=1e-6), name
    with pytest.raises(ValueError, match=r"Not gradient methods: \['cam'\]"):
        gradient_maps(["gradcam", "cam"], acts, grads)
