from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import Deconvolution, GuidedBackprop, GuidedGradCam, IntegratedGradients
from torch import nn

from cam_monitor import (
    ALL_METHODS,
    CAM_METHODS,
    INPUT_METHODS,
    PIXEL_METHODS,
    SIGNED_METHODS,
    compute_cams,
)
from cam_monitor.attribution import RELU_RULES, ReluRule, ruled_relus
from cam_monitor.methods import gradcam, gradcam_plus_plus
from tests.helpers import TinyCNN


def close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal up to `rel` of the reference's largest magnitude, which must not be zero."""
    scale = ref.abs().max()
    return bool(scale > 0) and bool((ours - ref).abs().max() <= rel * scale)


def smooth_net() -> nn.Sequential:
    """Softplus/tanh CNN: smooth, so Riemann sums converge; weights large enough to bend."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.Softplus(),
        nn.Conv2d(6, 6, 3, padding=1, stride=2), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )  # fmt: skip
    with torch.no_grad():
        for param in net.parameters():
            param.mul_(4.0)
    return net


def relu_net(inplace: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=inplace),
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


TARGETS = torch.tensor([0, 3, 1, 2])


def test_method_families_partition_every_name() -> None:
    assert set(ALL_METHODS) == CAM_METHODS | PIXEL_METHODS
    assert not CAM_METHODS & PIXEL_METHODS
    assert INPUT_METHODS == PIXEL_METHODS - {"guided_gradcam"}
    assert SIGNED_METHODS <= PIXEL_METHODS and "saliency" not in SIGNED_METHODS


def test_saliency_is_the_input_gradient_of_the_score(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    result = compute_cams(tiny_cnn, images, "features.3", ["gradcam", "saliency"], target=TARGETS)
    twin = copy.deepcopy(tiny_cnn).eval()
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(twin(x).gather(1, TARGETS[:, None]).sum(), x)
    assert result["input", "saliency"].shape == (4, 32, 32)
    assert close(result["input", "saliency"], grad.abs().amax(dim=1), 1e-5)
    alone = compute_cams(tiny_cnn, images, None, "saliency", target=TARGETS)
    assert torch.allclose(alone["input", "saliency"], result["input", "saliency"])
    assert torch.equal(
        result["features.3", "gradcam"],
        compute_cams(tiny_cnn, images, "features.3", target=TARGETS)["features.3", "gradcam"],
    )


def test_integrated_gradients_completeness_and_captum_agreement() -> None:
    net, x = smooth_net(), torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    result = compute_cams(net, x, None, "integrated_gradients", target=TARGETS, ig_steps=64)
    attributions = result["input", "integrated_gradients"]
    with torch.no_grad():
        delta = (net(x) - net(torch.zeros_like(x))).gather(1, TARGETS[:, None])[:, 0]
    assert torch.allclose(result.extras["integrated_gradients.score_delta"], delta, atol=1e-5)
    gap = result.extras["integrated_gradients.completeness_gap"]
    assert torch.allclose(gap, attributions.flatten(1).sum(1) - delta, atol=1e-5)
    assert delta.abs().min() > 0.05 and (gap.abs() <= 0.01 * delta.abs()).all()
    assert (attributions < 0).any() and (attributions > 0).any()  # signed

    ref = IntegratedGradients(net).attribute(
        x, baselines=torch.zeros_like(x), target=TARGETS, n_steps=64, method="riemann_middle"
    )
    assert close(attributions, ref.sum(dim=1))
    coarse = compute_cams(net, x, None, "integrated_gradients", target=TARGETS, ig_steps=2)
    assert (coarse.extras["integrated_gradients.completeness_gap"].abs() > gap.abs()).any()


def test_integrated_gradients_with_a_grey_baseline_in_chunked_passes() -> None:
    net, x = smooth_net(), torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    grey = torch.tensor([0.5, 0.4, 0.3])[:, None, None]
    targets = torch.tensor([0, 1, 2, 3, 0])
    whole = compute_cams(
        net, x, None, "integrated_gradients", target=targets, ig_steps=8, ig_baseline=grey
    )
    chunked = compute_cams(
        net, x, None, "integrated_gradients", target=targets, ig_steps=8, ig_baseline=grey,
        batch_size=2,
    )  # fmt: skip
    ref = IntegratedGradients(net).attribute(
        x, baselines=grey.expand_as(x), target=targets, n_steps=8, method="riemann_middle"
    )
    assert close(whole["input", "integrated_gradients"], ref.sum(dim=1))
    assert torch.allclose(
        chunked["input", "integrated_gradients"], whole["input", "integrated_gradients"], atol=1e-6
    )
    # One baseline per image: each chunk takes its own rows (resolved chunk by chunk, never
    # materialised for the whole probe at once).
    own = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    options = dict(target=targets, ig_steps=8, ig_baseline=own)
    chunked = compute_cams(net, x, None, "integrated_gradients", **options, batch_size=2)
    ref = IntegratedGradients(net).attribute(
        x, baselines=own, target=targets, n_steps=8, method="riemann_middle"
    )
    assert close(chunked["input", "integrated_gradients"], ref.sum(dim=1))
    with pytest.raises(ValueError, match="does not broadcast"):
        compute_cams(net, x, None, "integrated_gradients", ig_baseline=torch.zeros(2, 3, 3))
    for baseline in (math.nan, math.inf, torch.full((3, 1, 1), math.nan)):
        with pytest.raises(ValueError, match="ig_baseline holds NaN or infinity"):
            compute_cams(net, x, None, "integrated_gradients", ig_baseline=baseline)


def test_guided_backprop_matches_captum_and_leaves_relus_alone(images: torch.Tensor) -> None:
    plain = relu_net(inplace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum announces its own backward hooks
        ref = GuidedBackprop(plain).attribute(images, target=TARGETS)
    assert ref.shape == images.shape

    inplace = relu_net(inplace=True)
    relus = [(m, m.inplace) for m in inplace.modules() if isinstance(m, nn.ReLU)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nn.ReLU modules only: no functional-ReLU warning
        ours = compute_cams(inplace, images, None, "guided_backprop", target=TARGETS)
    assert close(ours["input", "guided_backprop"], ref.sum(dim=1))
    assert [(m, m.inplace) for m in inplace.modules() if isinstance(m, nn.ReLU)] == relus
    assert [m.inplace for m, _ in relus] == [True, True, False]
    assert all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)
        for m in inplace.modules()
    )
    # guidance changes the answer: plain input gradients differ
    saliency = compute_cams(plain, images, None, "saliency", target=TARGETS)
    assert not torch.allclose(ours["input", "guided_backprop"].abs(), saliency["input", "saliency"])


def test_guided_gradcam_matches_captum(images: torch.Tensor) -> None:
    net = relu_net()
    ours = compute_cams(net, images, ["5", "2"], "guided_gradcam", target=TARGETS)
    for name in ("5", "2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = GuidedGradCam(net, net.get_submodule(name)).attribute(
                images, target=TARGETS, interpolate_mode="bilinear"
            )
        assert ours[name, "guided_gradcam"].shape == (4, 32, 32)
        assert close(ours[name, "guided_gradcam"], ref.sum(dim=1)), name


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_a_relu_module_used_twice_is_ruled_at_both_calls(images: torch.Tensor, method: str) -> None:
    class Shared(nn.Module):
        def __init__(self, separate: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
            self.relu = nn.ReLU(inplace=True)
            self.relu2 = nn.ReLU(inplace=True) if separate else self.relu
            self.fc = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu2(self.conv2(self.relu(self.conv1(x))))
            return self.fc(x.mean(dim=(2, 3)))

    shared = compute_cams(Shared(False), images, None, method, target=TARGETS)
    separate = compute_cams(Shared(True), images, None, method, target=TARGETS)
    key = ("input", method)
    assert close(shared[key], separate[key], 1e-6)


class FunctionalRelus(nn.Module):
    """`relu_net`'s layers with every kind of functional ReLU instead of nn.ReLU modules."""

    def __init__(self) -> None:
        super().__init__()
        net = relu_net()
        self.c1, self.c2, self.c3, self.fc = net[0], net[2], net[5], net[9]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x), inplace=True)
        x = F.max_pool2d(torch.relu(self.c2(x)), 2)
        x = self.c3(x).relu_()
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_functional_relus_get_the_same_rule_as_relu_modules(
    images: torch.Tensor, method: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        functional = compute_cams(FunctionalRelus(), images, None, method, target=TARGETS)
        modules = compute_cams(relu_net(inplace=True), images, None, method, target=TARGETS)
    assert close(functional["input", method], modules["input", method], 1e-6)
    assert torch._C._len_torch_function_stack() == 0


def two_layer_net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(inplace=True), nn.Linear(10, 3))


def test_each_relu_rule_against_its_formula() -> None:
    net, x = two_layer_net(), torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    targets = torch.tensor([0, 1, 2, 0, 1])
    w1, w2 = net[1].weight.detach(), net[3].weight.detach()[targets]  # [10, 12], [5, 10]
    active = (x.flatten(1) @ w1.T + net[1].bias.detach()) > 0  # [5, 10]
    formulas = {  # the gradient each ReLU passes back, then through the first Linear
        "saliency": w2 * active,
        "guided_backprop": w2.clamp_min(0) * active,
        "deconvnet": w2.clamp_min(0),
    }
    methods = ["saliency", "guided_backprop", "deconvnet"]
    result = compute_cams(net, x, None, methods, target=targets)
    for method, passed in formulas.items():
        expected = (passed @ w1).view(5, 3, 2, 2)
        expected = expected.abs().amax(1) if method == "saliency" else expected.sum(1)
        assert torch.allclose(result["input", method], expected, atol=1e-6), method
    # the rules differ on this net: deconvnet ignores the forward sign, guided backprop not
    assert not torch.allclose(formulas["deconvnet"], formulas["guided_backprop"])
    assert (~active).any() and (w2 > 0).any() and (w2 < 0).any()


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_deconvnet_matches_captum_on_torchvision_models(name: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=5).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    targets = torch.tensor([1, 4])
    flags = [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)]
    assert all(flags)  # torchvision's ReLUs run in place (resnet18 calls each one twice)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum announces its own backward hooks
        ref = Deconvolution(model).attribute(x, target=targets).sum(dim=1)
        guided = GuidedBackprop(model).attribute(x, target=targets).sum(dim=1)
    ours = compute_cams(model, x, None, ["deconvnet", "guided_backprop"], target=targets)
    assert close(ours["input", "deconvnet"], ref)
    assert close(ours["input", "guided_backprop"], guided)
    assert not close(ref, guided, 0.1)  # the two rules give different maps here
    assert [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)] == flags
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class InplaceSideEffects(nn.Module):
    """ReLUs used for their in-place side effect (`self.relu(x)`, `F.relu_(y)`), or assigned."""

    def __init__(self, assign: bool = False, fail: bool = False) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)
        self.relu, self.fc = nn.ReLU(inplace=True), nn.Linear(4, 2)
        self.assign, self.fail = assign, fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.assign:
            x = self.relu(x)
        else:
            self.relu(x)
        y = self.conv2(x)
        if self.assign:
            y = F.relu(y)
        else:
            F.relu_(y)
        if self.fail:
            raise RuntimeError("forward broke")
        return self.fc(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("rule", RELU_RULES)
def test_ruled_relus_keep_in_place_semantics_and_leave_no_trace(
    images: torch.Tensor, rule: ReluRule
) -> None:
    model = InplaceSideEffects()
    model.relu.register_forward_hook(lambda *a: None)  # the user's own hook stays
    before = (dict(model.relu._forward_hooks), dict(model.relu._forward_pre_hooks))
    x = images.clone().requires_grad_(True)
    with ruled_relus(model, rule):
        ruled = model(x)
        (grad,) = torch.autograd.grad(ruled[:, 0].sum(), x)
    assert torch.equal(ruled, model(x))  # the same values, side effects included
    model.assign = True  # ... and the same gradients as with assigned ReLUs
    with ruled_relus(model, rule):
        (assigned,) = torch.autograd.grad(model(x)[:, 0].sum(), x)
    assert close(grad, assigned, 1e-6)
    model.fail = True
    with pytest.raises(RuntimeError, match="forward broke"), ruled_relus(model, rule):
        model(x)
    assert (dict(model.relu._forward_hooks), dict(model.relu._forward_pre_hooks)) == before
    assert model.relu.inplace and torch._C._len_torch_function_stack() == 0
    with pytest.raises(ValueError, match="rule must be one of guided, deconvnet, got 'plain'"):
        with ruled_relus(model, "plain"):  # type: ignore[arg-type]
            pass


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_a_model_without_relu_gets_a_warning(images: torch.Tensor, method: str) -> None:
    gelu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.LazyLinear(2))
    gelu(images)
    with pytest.warns(
        UserWarning, match=r"Sequential ran no ReLU .*\(it ran gelu x1\).*plain input"
    ):
        compute_cams(gelu, images, None, method)


class ReluThenSilu(nn.Module):
    """An nn.ReLU, then a functional SiLU: guided backprop can rule only the first."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)
        self.relu, self.fc = nn.ReLU(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv2(self.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "guided_gradcam"])
def test_relus_mixed_with_other_activations_warn_naming_them(method: str) -> None:
    torch.manual_seed(0)
    mobilenet = torchvision.models.mobilenet_v3_small(weights=None, num_classes=4).eval()
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(4))
    layer = ["features.8"] if method == "guided_gradcam" else None  # guided backprop inside
    rule = "deconvnet" if method == "deconvnet" else "guided backprop"
    with pytest.warns(UserWarning, match=rf"MobileNetV3 ran \d+ ReLUs under the {rule} rule "
                      r"and \d+ other activations \(hardswish x\d+\).*plain gradient"):  # fmt: skip
        compute_cams(mobilenet, x, layer, method)
    with pytest.warns(UserWarning, match=r"ReluThenSilu ran 1 ReLU .* 1 other activation \(silu"):
        compute_cams(ReluThenSilu(), x, layer and ["conv2"], method)


def test_smoothgrad_is_reproducible_and_leaves_the_global_rng_alone(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    first = compute_cams(tiny_cnn, images, None, "smoothgrad", smooth=4, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)
    torch.rand(10)  # move the global stream: the result must not care
    again = compute_cams(tiny_cnn, images, None, "smoothgrad", smooth=4, seed=5)
    other = compute_cams(tiny_cnn, images, None, "smoothgrad", smooth=4, seed=6)
    key = ("input", "smoothgrad")
    assert torch.equal(first[key], again[key]) and not torch.allclose(first[key], other[key])
    assert (first[key] >= 0).all() and first[key].shape == (4, 32, 32)
    exact = compute_cams(tiny_cnn, images, None, ["smoothgrad", "saliency"], smooth=3, noise=0.0)
    assert close(exact[key], exact["input", "saliency"], 1e-5)


class HalfSquare(nn.Module):
    """Class 0 scores sum(x^2) / 2, so the input gradient is x itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = 0.5 * x.pow(2).flatten(1).sum(1)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def test_smoothgrad_noise_is_a_fraction_of_each_images_value_range() -> None:
    """At a zero pixel, SmoothGrad of sum(x^2)/2 is the mean of |sigma * z|, which tends to
    sigma * sqrt(2 / pi): sigma must be `noise` times that image's own max - min."""
    x = torch.zeros(2, 1, 8, 8)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 1.0, 4.0  # value ranges 1 and 4
    result = compute_cams(HalfSquare(), x, None, "smoothgrad", target=0, smooth=256, noise=0.5)
    at_zero = result["input", "smoothgrad"].flatten(1)[:, 1:].mean(dim=1)
    sigma = 0.5 * torch.tensor([1.0, 4.0])
    assert torch.allclose(at_zero, sigma * math.sqrt(2 / math.pi), rtol=0.03)


def test_smooth_gradcam_plus_plus_averages_gradient_moments(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    copies, sigma = 3, 0.2
    result = compute_cams(
        tiny_cnn, images, "features.3", ["gradcam++", "gradcam"], target=TARGETS,
        smooth=copies, noise=sigma, seed=7,
    )  # fmt: skip
    # by hand: the documented noise (std = sigma * value range, image-major copies) ...
    net = copy.deepcopy(tiny_cnn).eval()
    span = images.flatten(1).amax(1) - images.flatten(1).amin(1)
    draw = torch.randn((4 * copies, 3, 32, 32), generator=torch.Generator().manual_seed(7))
    noisy = (
        images.repeat_interleave(copies, 0)
        + draw * (sigma * span).repeat_interleave(copies)[:, None, None, None]
    )
    # ... then gradients at features.3 of each copy, averaged per image with G^2 and G^3
    acts = net.features[:4](noisy).detach().requires_grad_(True)
    logits = net.fc(net.pool(net.features[4:](acts)).flatten(1))
    score = logits.gather(1, TARGETS.repeat_interleave(copies)[:, None]).sum()
    (grads,) = torch.autograd.grad(score, acts)
    grads = grads.view(4, copies, *grads.shape[1:])
    moments = [grads.pow(k).mean(dim=1) for k in (1, 2, 3)]
    with torch.no_grad():
        clean = net.features[:4](images)
    expected = gradcam_plus_plus(clean, *moments)
    assert close(result["features.3", "gradcam++"], expected, 1e-4)
    assert close(result["features.3", "gradcam"], gradcam(clean, moments[0]), 1e-4)
    unsmoothed = compute_cams(tiny_cnn, images, "features.3", "gradcam++", target=TARGETS)
    assert not torch.allclose(unsmoothed["features.3", "gradcam++"], expected, rtol=1e-2)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_smoothing_without_noise_changes_no_cam(
    tiny_cnn: TinyCNN, images: torch.Tensor, batch_size: int | None
) -> None:
    methods = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "guided_gradcam"]
    plain = compute_cams(tiny_cnn, images, ["features.0", "features.5"], methods)
    smoothed = compute_cams(
        tiny_cnn, images, ["features.0", "features.5"], methods, smooth=3, noise=0.0,
        batch_size=batch_size,
    )  # fmt: skip
    for key, value in plain.maps.items():
        assert torch.allclose(smoothed[key], value, rtol=1e-4, atol=1e-6), key


def test_keys_shapes_and_signs_of_a_mixed_request(tiny_cnn: TinyCNN, images: torch.Tensor) -> None:
    methods = tuple(m for m in ALL_METHODS if m != "cam")  # cam needs the GAP layer
    layers = ("features.3", "features.0")
    result = compute_cams(tiny_cnn, images, list(layers), methods, smooth=2, ig_steps=4)
    layer_keys = [(n, m) for n in layers for m in methods if m not in INPUT_METHODS]
    input_keys = [("input", m) for m in methods if m in INPUT_METHODS]
    assert list(result.maps) == layer_keys + input_keys
    assert result.methods == methods and result.layers == layers
    for (layer, method), value in result.maps.items():
        size = 32 if method in PIXEL_METHODS or layer == "features.0" else 16
        assert value.shape == (4, size, size), (layer, method)
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
        if method not in SIGNED_METHODS:
            assert (value >= 0).all(), method
    assert set(result.extras) == {
        "integrated_gradients.score_delta",
        "integrated_gradients.completeness_gap",
    }
    assert result.extras["integrated_gradients.completeness_gap"].shape == (4,)


def test_pixel_maps_of_a_chunked_probe_equal_one_batch(tiny_cnn: TinyCNN) -> None:
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    methods = ["saliency", "integrated_gradients", "guided_backprop", "guided_gradcam", "deconvnet"]
    whole = compute_cams(tiny_cnn, x, "features.3", methods, ig_steps=6)
    chunked = compute_cams(tiny_cnn, x, "features.3", methods, ig_steps=6, batch_size=3)
    for key, value in whole.maps.items():
        assert torch.allclose(chunked[key], value, atol=1e-7), key
    for key, value in whole.extras.items():
        assert torch.allclose(chunked.extras[key], value, atol=1e-6), key


def test_layers_may_be_omitted_only_for_input_level_methods(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    result = compute_cams(tiny_cnn, images, [], ["saliency", "guided_backprop"])
    assert result.layers == () and set(result.maps) == {
        ("input", "saliency"),
        ("input", "guided_backprop"),
    }
    with pytest.raises(ValueError, match=r"\['gradcam', 'guided_gradcam'\] need at least one"):
        compute_cams(tiny_cnn, images, None, ["gradcam", "saliency", "guided_gradcam"])
    with pytest.raises(ValueError, match=r"`smooth` must be an int >= 0.*got -1"):
        compute_cams(tiny_cnn, images, "features.3", smooth=-1)
    with pytest.raises(ValueError, match=r"`ig_steps` must be an int >= 1.*got 0"):
        compute_cams(tiny_cnn, images, None, "integrated_gradients", ig_steps=0)
    with pytest.raises(ValueError, match=r"floating-point image tensor \[B, C, H, W\]"):
        compute_cams(nn.Linear(3, 2), torch.randn(4, 3), None, "saliency")


def test_no_trace_left_by_any_method(tiny_cnn: TinyCNN, images: torch.Tensor) -> None:
    tiny_cnn.train()
    tiny_cnn(images).sum().backward()
    tiny_cnn.features[0].weight.grad = None
    state = copy.deepcopy(tiny_cnn.state_dict())
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in tiny_cnn.named_parameters()}
    rng = torch.get_rng_state()

    compute_cams(tiny_cnn, images, "features.5", ALL_METHODS, smooth=2, ig_steps=4, batch_size=3)

    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in tiny_cnn.modules())
    assert all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)
        for m in tiny_cnn.modules()
    )
    for name, value in tiny_cnn.state_dict().items():
        assert torch.equal(value, state[name]), name
    for name, param in tiny_cnn.named_parameters():
        expected = grads[name]
        assert (param.grad is None) if expected is None else torch.equal(param.grad, expected)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_cleans_up_when_its_last_forward_raises(method: str) -> None:
    torch.manual_seed(0)
    model = TinyCNN().train()
    x = torch.randn(2, 3, 32, 32)
    calls = {"n": 0, "fail_at": 0}

    def forward(net: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            net.features(inputs)  # hooks have fired, graph hooks are in place
            raise RuntimeError("forward broke")
        return net(inputs)

    options = dict(forward=forward, smooth=2, ig_steps=3, batch_size=2)
    compute_cams(model, x, "features.5", method, **options)
    assert calls["n"] >= 1
    calls["fail_at"], calls["n"] = calls["n"], 0
    with pytest.raises(RuntimeError, match="forward broke"):
        compute_cams(model, x, "features.5", method, **options)
    assert all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules()
    )
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert torch._C._len_torch_function_stack() == 0


def test_normalized_signed_maps_read_zero_attribution_as_zero() -> None:
    """A signed map's strongest pixel, of either sign, is 1 and no attribution is 0, as drift
    and localization read it; min-max would turn 0 into a mid heat."""
    weights = torch.zeros(2, 1, 2, 3)
    weights[1, 0] = torch.tensor([[-4.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(weights.flatten(1))
    x = torch.ones(1, 1, 2, 3)
    result = compute_cams(net, x, None, "integrated_gradients", target=1, ig_steps=4)
    raw = result["input", "integrated_gradients"]
    assert torch.allclose(raw, weights[1], atol=1e-6)  # a linear model: IG = w * (x - 0)
    expected = torch.tensor([[[1.0, 0.0, 0.25], [0.0, 0.5, 0.0]]])
    assert torch.allclose(result.normalized("input", "integrated_gradients"), expected)


def test_extra_passes_are_bounded_without_batch_size() -> None:
    """IG's steps and SmoothGrad's copies of a whole probe in one forward (256 steps x 16
    images at 224 px: 4112 rows) would exhaust memory: without `batch_size`, a pass holds at
    most the probe's rows or 16 images of 224 x 224 pixels, and the maps stay the same."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 2, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2, 3),
    )  # fmt: skip
    x, rows = torch.rand(3, 3, 112, 112), []
    net[0].register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    methods, budget = ["integrated_gradients", "smoothgrad"], 16 * 224 * 224 // (112 * 112)
    bounded = compute_cams(net, x, None, methods, ig_steps=32, smooth=40)
    assert max(rows) == budget and sum(rows) == 3 + 3 * 40 + 3 * 33  # clean, SmoothGrad, IG
    explicit = compute_cams(net, x, None, methods, ig_steps=32, smooth=40, batch_size=3)
    for method in methods:
        assert close(bounded["input", method], explicit["input", method], 1e-5), method
    rows.clear()
    compute_cams(net, x[:1].expand(80, -1, -1, -1), None, "smoothgrad", smooth=2)
    assert max(rows) == 80  # never fewer rows than the probe holds
