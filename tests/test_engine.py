from __future__ import annotations

import copy
import warnings
from collections import namedtuple
from typing import Any

import pytest
import torch
from captum.attr import LayerGradCam
from torch import nn
from torchvision.models import resnet18

from cam_monitor import CamResult, compute_cams
from cam_monitor.batch import Batch
from cam_monitor.engine import compute
from cam_monitor.options import EngineOptions
from cam_monitor.plan import Plan, plan_for
from tests.helpers import DispatchedOps, TinyCNN, TwoHeadCNN

ALL_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")


def captum_gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: list[int]):
    model.eval()
    return LayerGradCam(model, layer).attribute(x, target=targets, relu_attributions=True)[:, 0]


def test_gradcam_matches_captum_on_a_tiny_cnn(tiny_cnn: TinyCNN, images: torch.Tensor) -> None:
    targets = torch.tensor([0, 3, 1, 4])
    ours = compute_cams(tiny_cnn, images, "features.3", target=targets)
    twin = copy.deepcopy(tiny_cnn)
    ref = captum_gradcam(twin, twin.features[3], images, targets.tolist())
    assert ours["features.3", "gradcam"].shape == ref.shape
    assert (ours["features.3", "gradcam"] - ref).abs().max() < 1e-5
    assert torch.equal(ours.targets, targets)


def test_gradcam_matches_captum_on_resnet18_at_two_layers() -> None:
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=7)
    x = torch.randn(3, 3, 64, 64)
    targets = [6, 0, 2]
    ours = compute_cams(model, x, ["layer3", "layer4.1.conv2"], target=torch.tensor(targets))
    for name, layer in [("layer3", model.layer3), ("layer4.1.conv2", model.layer4[1].conv2)]:
        ref = captum_gradcam(model, layer, x, targets)
        assert (ours[name, "gradcam"] - ref).abs().max() < 1e-5, name
        assert ref.abs().max() > 0


def test_gradcam_equals_the_original_cam_on_gap_linear(tiny_cnn: TinyCNN) -> None:
    x = torch.randn(3, 3, 32, 32)
    result = compute_cams(tiny_cnn, x, "features.5", target=torch.tensor([1, 2, 4]))
    with torch.no_grad():
        tiny_cnn.eval()
        feats = tiny_cnn.features(x)
        weights = tiny_cnn.fc.weight[result.targets]  # [B, C]
        cam = torch.relu(torch.einsum("bc,bchw->bhw", weights, feats))
    ratio = result["features.5", "gradcam"] / cam.clamp_min(1e-12)
    on = cam > 1e-6
    per_image = [ratio[i][on[i]] for i in range(3)]
    for r in per_image:
        assert r.numel() > 0 and torch.allclose(r, r[0].expand_as(r), rtol=1e-4)
        assert r[0] > 0


def test_one_forward_and_one_grad_call_for_all_layers_and_methods(
    tiny_cnn: TinyCNN, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"forward": 0, "grad": 0}
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return real_grad(*args, **kwargs)

    def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls["forward"] += 1
        return model(x)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    result = compute_cams(tiny_cnn, images, "features.*", ALL_METHODS, forward=forward)
    assert calls == {"forward": 1, "grad": 1}
    assert len(result.maps) == 6 * 5
    assert result.layers == tuple(f"features.{i}" for i in range(6))
    assert result.methods == ALL_METHODS


def test_no_trace_left_on_model_grads_bn_rng_or_hooks(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    tiny_cnn.train()
    tiny_cnn.features[4].eval()
    tiny_cnn(images).sum().backward()  # fills .grad and moves BN stats once
    tiny_cnn.features[0].weight.grad = None
    state = copy.deepcopy(tiny_cnn.state_dict())
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in tiny_cnn.named_parameters()}
    flags = [m.training for m in tiny_cnn.modules()]
    hooks = [(len(m._forward_hooks), len(m._backward_hooks)) for m in tiny_cnn.modules()]
    rng = torch.get_rng_state()

    compute_cams(tiny_cnn, images, ["features.0", "features.3"], ALL_METHODS)

    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in tiny_cnn.modules()] == flags
    assert [(len(m._forward_hooks), len(m._backward_hooks)) for m in tiny_cnn.modules()] == hooks
    for name, value in tiny_cnn.state_dict().items():
        assert torch.equal(value, state[name]), name
    for name, param in tiny_cnn.named_parameters():
        if grads[name] is None:
            assert param.grad is None, name
        else:
            assert torch.equal(param.grad, grads[name]), name


def test_hooks_and_flags_restored_when_the_forward_raises(tiny_cnn: TinyCNN) -> None:
    tiny_cnn.train()

    def failing(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        model.features(x)
        raise RuntimeError("forward broke")

    with pytest.raises(RuntimeError, match="forward broke"):
        compute_cams(tiny_cnn, torch.randn(2, 3, 32, 32), "features.3", forward=failing)
    assert all(not m._forward_hooks for m in tiny_cnn.modules())
    assert all(m.training for m in tiny_cnn.modules())


def vgg_like(inplace: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=inplace),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16 * 16, 4),
    )  # fmt: skip


def test_inplace_relu_after_the_captured_conv(images: torch.Tensor) -> None:
    inplace = compute_cams(vgg_like(True), images, ["2", "3"], ALL_METHODS)
    plain = compute_cams(vgg_like(False), images, ["2", "3"], ALL_METHODS)
    for key, value in inplace.maps.items():
        assert torch.isfinite(value).all()
        assert torch.allclose(value, plain[key], atol=1e-6), key


def test_frozen_backbone_still_gets_maps(tiny_cnn: TinyCNN, images: torch.Tensor) -> None:
    expected = compute_cams(tiny_cnn, images, "features.3")["features.3", "gradcam"]
    tiny_cnn.features.requires_grad_(False)
    frozen = compute_cams(tiny_cnn, images, "features.3")["features.3", "gradcam"]
    assert torch.allclose(frozen, expected, atol=1e-6) and frozen.sum() > 0
    tiny_cnn.requires_grad_(False)
    all_frozen = compute_cams(tiny_cnn, images, "features.3")["features.3", "gradcam"]
    assert torch.allclose(all_frozen, expected, atol=1e-6)
    assert all(p.grad is None for p in tiny_cnn.parameters())


def test_called_inside_inference_mode(tiny_cnn: TinyCNN, images: torch.Tensor) -> None:
    expected = compute_cams(tiny_cnn, images, "features.3", ALL_METHODS)
    with torch.inference_mode():
        x = images.clone()
        result = compute_cams(tiny_cnn, x, "features.3", ALL_METHODS)
    for key in expected.maps:
        assert torch.allclose(result[key], expected[key], atol=1e-6)
        assert result[key].sum() > 0


def test_output_transform_picks_a_head_by_index_key_or_callable(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = TwoHeadCNN()
    by_index = compute_cams(model, images, "features.3", output_transform=0)
    by_call = compute_cams(model, images, "features.3", output_transform=lambda out: out[0])
    assert torch.equal(by_index["features.3", "gradcam"], by_call["features.3", "gradcam"])

    def as_dict(m: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cls, dom = m(x)
        return {"class": cls, "domain": dom}

    by_key = compute_cams(model, images, "features.3", forward=as_dict, output_transform="class")
    assert torch.allclose(by_key["features.3", "gradcam"], by_index["features.3", "gradcam"])
    assert by_index.logits.shape == (4, 5)


def test_an_index_into_a_logits_tensor_is_refused(tiny_cnn: TinyCNN) -> None:
    """output_transform=0 on a model that returns logits [B, C] took the first image's row as
    one logit per image: with as many images as classes, binary maps of the wrong score."""
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"output_transform=0 picks .* but the model returned a "
                       r"Tensor of shape \(5, 5\).*output_transform=None"):  # fmt: skip
        compute_cams(tiny_cnn, images, "features.3", output_transform=0)


def test_chunked_probe_equals_one_batch(tiny_cnn: TinyCNN) -> None:
    x = torch.randn(7, 3, 32, 32)
    targets = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    whole = compute_cams(tiny_cnn, x, "features.3", ALL_METHODS, target=targets)
    chunked = compute_cams(tiny_cnn, x, "features.3", ALL_METHODS, target=targets, batch_size=3)
    for key in whole.maps:
        assert torch.allclose(whole[key], chunked[key], atol=1e-6)
    assert torch.equal(whole.targets, chunked.targets)
    assert torch.allclose(whole.logits, chunked.logits, atol=1e-6)


def test_target_forms(tiny_cnn: TinyCNN, images: torch.Tensor) -> None:
    predicted = compute_cams(tiny_cnn, images, "features.3")
    assert torch.equal(predicted.targets, predicted.logits.argmax(1))
    by_int = compute_cams(tiny_cnn, images, "features.3", target=2)
    assert torch.equal(by_int.targets, torch.full((4,), 2))
    by_idx = compute_cams(tiny_cnn, images, "features.3", target=lambda lg: lg.argmin(1))
    assert torch.equal(by_idx.targets, by_idx.logits.argmin(1))
    by_score = compute_cams(tiny_cnn, images, "features.3", target=lambda lg: lg[:, 2])
    assert torch.equal(by_score.targets, torch.full((4,), -1))
    assert torch.allclose(by_score["features.3", "gradcam"], by_int["features.3", "gradcam"])


def test_result_helpers_upsample_and_normalise(tiny_cnn: TinyCNN, images: torch.Tensor) -> None:
    result: CamResult = compute_cams(tiny_cnn, images, "features.3")
    assert result.input_size == (32, 32)
    up = result.upsampled("features.3", "gradcam")
    assert up.shape == (4, 32, 32) and (up >= 0).all()
    norm = result.normalized("features.3", "gradcam", size=(20, 20))
    assert norm.shape == (4, 20, 20)
    assert torch.allclose(norm.flatten(1).amax(1), torch.ones(4))
    with pytest.raises(KeyError, match="available"):
        result["features.0", "gradcam"]


def test_token_layers_are_reshaped_to_grids() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 6, 4, stride=4)
            self.block = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.embed(x).flatten(2).transpose(1, 2)  # [B, 64, 6]
            return self.head(torch.relu(self.block(tokens)).mean(1))

    result = compute_cams(Tokens(), torch.randn(2, 3, 32, 32), "block", ALL_METHODS)
    assert result["block", "gradcam"].shape == (2, 8, 8)


def test_probability_outputs_warn_once(images: torch.Tensor) -> None:
    model = nn.Sequential(TinyCNN(), nn.Softmax(dim=1))
    with pytest.warns(UserWarning, match="looks like probabilities"):
        compute_cams(model, images, "0.features.3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_cams(model, images, "0.features.3")


def test_bad_inputs_raise_helpful_errors(tiny_cnn: TinyCNN, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"No layer named 'feature\.3'.*'features\.3'"):
        compute_cams(tiny_cnn, images, "feature.3")
    with pytest.raises(ValueError, match=r"'fc' outputs shape \(4, 5\).*convolutional"):
        compute_cams(tiny_cnn, images, "fc")
    with pytest.raises(ValueError, match=r"returned a tuple of 2.*output_transform=0"):
        compute_cams(TwoHeadCNN(), images, "features.3")
    with pytest.raises(ValueError, match=r"Target index 9 is outside the logits' 5 classes"):
        compute_cams(tiny_cnn, images, "features.3", target=9)
    with pytest.raises(ValueError, match=r"Target index 5 is outside"):
        compute_cams(tiny_cnn, images, "features.3", target=torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="`target` holds 3 indices for a batch of 4"):
        compute_cams(tiny_cnn, images, "features.3", target=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"`target`='label'.*needs class indices"):
        compute_cams(tiny_cnn, images, "features.3", target="label")
    with pytest.raises(ValueError, match=r"`methods` got unknown name\(s\) 'scorecam2'"):
        compute_cams(tiny_cnn, images, "features.3", "scorecam2")
    with pytest.raises(ValueError, match=r"`batch_size`.*got 0"):
        compute_cams(tiny_cnn, images, "features.3", batch_size=0)
    with pytest.raises(ValueError, match="empty batch"):
        compute_cams(tiny_cnn, images[:0], "features.3")
    tiny_cnn.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match=r"\['unused'\] did not run"):
        compute_cams(tiny_cnn, images, "unused")


def test_cam_equals_gradcam_up_to_a_positive_constant(tiny_cnn: TinyCNN) -> None:
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    targets = torch.tensor([1, 2, 4])
    named = compute_cams(
        tiny_cnn, x, "features.5", ["cam", "gradcam"], target=targets, cam_head="fc"
    )
    found = compute_cams(tiny_cnn, x, "features.5", "cam", target=targets)  # last Linear
    cam, grad = named["features.5", "cam"], named["features.5", "gradcam"]
    assert torch.equal(found["features.5", "cam"], cam)
    on = grad > 1e-7
    assert on.any(dim=(1, 2)).all() and torch.equal(cam > 1e-7 * 256, on)
    assert torch.allclose(cam[on], 256 * grad[on], rtol=1e-4)  # 16 x 16 positions pooled


def test_cam_refuses_layers_and_models_without_a_gap_linear_head(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    with pytest.raises(ValueError, match=r"'features\.3'.*not the global average pool"):
        compute_cams(tiny_cnn, images, "features.3", "cam")
    with pytest.raises(ValueError, match=r"cam_head='features\.3' is a Conv2d, not an nn\.Linear"):
        compute_cams(tiny_cnn, images, "features.5", "cam", cam_head="features.3")
    with pytest.raises(ValueError, match="target= returned scores"):
        compute_cams(tiny_cnn, images, "features.5", "cam", target=lambda lg: lg[:, 0])
    wide = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"'6' takes 6 features but the layer has 4 channels"):
        compute_cams(wide, images, "1", "cam")
    assert compute_cams(wide, images, "3", "cam")["3", "cam"].shape == (4, 28, 28)
    conv_head = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=r"has no nn\.Linear\. Use 'gradcam'"):
        compute_cams(conv_head, images, "0", ["gradcam", "cam"])
    two_heads = TwoHeadCNN()  # the last Linear is the 2-way domain head
    with pytest.raises(ValueError, match=r"'domain' has 2 outputs but the logits have 5"):
        compute_cams(two_heads, images, "features.5", "cam", output_transform=0)
    ok = compute_cams(two_heads, images, "features.5", "cam", output_transform=0, cam_head="fc")
    assert ok["features.5", "cam"].sum() > 0
    assert all(not (m._forward_hooks or m._forward_pre_hooks) for m in two_heads.modules())


class GradModeProbe(nn.Module):
    """Identity that records whether autograd was on when it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.is_grad_enabled())
        return x


def test_autograd_starts_at_the_first_layer_unless_the_input_gradient_is_needed(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    stem = GradModeProbe()
    model = nn.Sequential(stem, tiny_cnn)
    compute_cams(model, images, "1.features.3", methods=["gradcam", "gradcam++"])
    assert stem.seen == [False], "the stem before the first CAM layer needs no graph"
    stem.seen.clear()
    compute_cams(model, images, "1.features.3", methods=["gradcam", "saliency"])
    assert stem.seen == [True], "saliency needs the graph back to the input"


class EnableGradInside(nn.Module):
    """Runs its body under `torch.enable_grad()`, which restores the outer grad mode after."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = self.body.features(x)
        return self.body.fc(self.body.pool(x).flatten(1))


def test_a_model_that_switches_autograd_itself_still_gets_exact_maps(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    targets = torch.tensor([0, 3, 1, 4])
    expected = compute_cams(tiny_cnn, images, "features.3", target=targets)
    wrapped = EnableGradInside(tiny_cnn)
    got = compute_cams(wrapped, images, "body.features.3", target=targets)
    assert torch.allclose(got["body.features.3", "gradcam"], expected["features.3", "gradcam"])
    assert got["body.features.3", "gradcam"].abs().max() > 0


class ViewChangedAfterTheLayer(nn.Module):
    """Takes a view of the stem's output before the CAM layer and adds to it in place after:
    legal in a plain forward, forbidden to a view made without grad."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.stem(x)
        view = stem[:, :8]
        view.add_(self.layer(stem + 0))
        return self.head(view.mean((2, 3)))


@pytest.mark.parametrize("smooth", [0, 2])
def test_a_view_changed_in_place_after_the_layer_gets_the_whole_graph(smooth: int) -> None:
    model = ViewChangedAfterTheLayer().eval()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    options = dict(target=torch.tensor([0, 2]), smooth=smooth, seed=0)
    got = compute_cams(model, images, "layer", ["gradcam", "layercam"], **options)
    # Saliency needs the input's gradient, so that call never starts autograd at the layer.
    whole = compute_cams(model, images, "layer", ["gradcam", "layercam", "saliency"], **options)
    for method in ("gradcam", "layercam"):
        assert got["layer", method].abs().max() > 0
        assert torch.equal(got["layer", method], whole["layer", method])


class GainNet(nn.Module):
    """TinyCNN on `pixels * gain[:, None, None, None]`: the gain is a batched non-image tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyCNN()

    def forward(self, pixels: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return self.net(pixels * gain[:, None, None, None])


Probe = namedtuple("Probe", "pixels gain name")
CONTAINERS = {
    "tuple": (lambda p, g: (p, g, "probe"), lambda b: (b[0], b[1])),
    "list": (lambda p, g: [p, g, "probe"], lambda b: (b[0], b[1])),
    "namedtuple": (lambda p, g: Probe(p, g, "probe"), lambda b: (b.pixels, b.gain)),
    "dict": (
        lambda p, g: {"name": "probe", "gain": g, "pixels": p},
        lambda b: (b["pixels"], b["gain"]),
    ),
}
EXACT = ("gradcam", "saliency", "integrated_gradients", "guided_backprop", "guided_gradcam")


@pytest.mark.parametrize("kind", list(CONTAINERS))
def test_nested_batches_of_every_container_match_image_by_image_runs(kind: str) -> None:
    model = GainNet()
    build, unpack = CONTAINERS[kind]
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    gain = torch.tensor([1.0, 0.5, 2.0, -1.0, 3.0])
    targets = torch.tensor([0, 3, 1, 4, 2])
    options = dict(target=targets, ig_steps=4, batch_size=2)
    got = compute_cams(
        model, build(pixels, gain), "net.features.3", EXACT,
        forward=lambda m, b: m(*unpack(b)), **options,
    )  # fmt: skip
    assert got.input_size == (32, 32) and torch.equal(got.targets, targets)
    for i in range(5):
        alone = compute_cams(
            model, pixels[i : i + 1], "net.features.3", EXACT, target=targets[i : i + 1],
            ig_steps=4, forward=lambda m, x, g=gain[i : i + 1]: m(x, g),
        )  # fmt: skip
        for key, value in alone.maps.items():
            assert value.abs().max() > 0, key
            assert torch.allclose(got[key][i : i + 1], value, atol=1e-6), (kind, key, i)
        for key, value in alone.extras.items():
            assert torch.allclose(got.extras[key][i : i + 1], value, atol=1e-5), (kind, key, i)


def test_noisy_passes_see_the_same_rows_in_every_container() -> None:
    model = GainNet()
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    gain = torch.tensor([1.0, 0.5, 2.0, -1.0, 3.0])
    results = {}
    for kind, (build, unpack) in CONTAINERS.items():
        results[kind] = compute_cams(
            model, build(pixels, gain), "net.features.3", ["smoothgrad", "gradcam++"],
            forward=lambda m, b, unpack=unpack: m(*unpack(b)), smooth=3, batch_size=2,
        )  # fmt: skip
    first = results.pop("tuple")
    for kind, result in results.items():
        for key, value in first.maps.items():
            assert torch.equal(result[key], value), (kind, key)


def test_compute_takes_engine_options_and_a_batch(tiny_cnn: TinyCNN, images: torch.Tensor) -> None:
    options = EngineOptions(methods=("gradcam", "saliency"), target=2, batch_size=3)
    direct = compute(tiny_cnn, Batch.of(images), "features.3", options)
    public = compute_cams(tiny_cnn, images, "features.3", ["gradcam", "saliency"], 2, batch_size=3)
    assert direct.methods == public.methods and direct.layers == ("features.3",)
    for key, value in public.maps.items():
        assert torch.equal(direct[key], value), key
    labelled = EngineOptions(target="label")
    with pytest.raises(ValueError, match=r"`target`='label'.*needs class indices"):
        compute(tiny_cnn, images, "features.3", labelled)
    assert all(not m._forward_hooks for m in tiny_cnn.modules())


def test_target_type_aliases_still_come_from_the_engine() -> None:
    from cam_monitor import engine, options

    assert engine.Target is options.Target and engine.ForwardFn is options.ForwardFn
    assert engine.OutputTransform is options.OutputTransform


def test_a_target_tensor_is_checked_once_but_again_after_an_in_place_change(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    # The check reads the labels back (a host sync on a GPU), so it is remembered per tensor;
    # the memory must not let a changed or different tensor through.
    labels = torch.tensor([0, 1, 2, 3])
    compute_cams(tiny_cnn, images, "features.3", target=labels)
    labels[2] = 7  # in place: the tensor's version moves on
    with pytest.raises(ValueError, match=r"Target index 7 is outside the logits' 5 classes"):
        compute_cams(tiny_cnn, images, "features.3", target=labels)
    with pytest.raises(ValueError, match=r"Target index -1 is outside"):
        compute_cams(tiny_cnn, images, "features.3", target=torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match=r"Target index 6 is outside"):
        compute_cams(tiny_cnn, images, "features.3", target=torch.tensor(6))
    five = nn.Sequential(tiny_cnn, nn.Linear(5, 3))  # the same labels, fewer classes
    labels[2] = 4
    compute_cams(tiny_cnn, images, "features.3", target=labels)
    with pytest.raises(ValueError, match=r"Target index 4 is outside the logits' 3 classes"):
        compute_cams(five, images, "0.features.3", target=labels)


def test_chunked_labels_are_checked_whole_and_a_failed_check_is_not_remembered(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    labels = torch.tensor([0, 1, 2, 9])
    with pytest.raises(ValueError, match=r"Target index 9 is outside"):
        compute_cams(tiny_cnn, images, "features.3", target=labels, batch_size=2)
    labels[3] = 4
    chunked = compute_cams(tiny_cnn, images, "features.3", target=labels, batch_size=2)
    assert torch.equal(chunked.targets, labels)


#: The op of a value read back to Python (`bool()`, `.item()`): on a GPU each is a host sync.
READ_BACK = "_local_scalar_dense"


@pytest.mark.parametrize(
    ("target", "batch_size"),
    [("predicted", None), ("labels", None), ("labels", 2), (3, None)],
)
def test_a_repeated_call_reads_nothing_back_to_the_host(
    tiny_cnn: TinyCNN, images: torch.Tensor, target: object, batch_size: int | None
) -> None:
    # The callback calls the engine with the same probe labels at every evaluation; a read-back
    # there would stall a GPU between the forward and the backward each time.
    labels = torch.tensor([0, 1, 2, 3])
    chosen = labels if target == "labels" else target
    methods = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"]
    compute_cams(tiny_cnn, images, "features.3", methods, target=chosen, batch_size=batch_size)
    with DispatchedOps() as ops:
        result = compute_cams(
            tiny_cnn, images, "features.3", methods, target=chosen, batch_size=batch_size
        )
    assert ops.names[READ_BACK] == 0
    assert len(result.maps) == 5
    fresh = torch.tensor([0, 1, 2, 3])  # another tensor is checked: one read-back
    with DispatchedOps() as ops:
        compute_cams(tiny_cnn, images, "features.3", methods, target=fresh)
    assert ops.names[READ_BACK] == 1


def test_labels_made_under_inference_mode_work_and_are_checked_at_every_call(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    # Such tensors have no version counter to tell an in-place change by.
    with torch.inference_mode():
        labels = torch.tensor([0, 1, 2, 3])
    first = compute_cams(tiny_cnn, images, "features.3", target=labels)
    assert torch.equal(first.targets, labels)
    with torch.inference_mode():  # as from a validation step, on its own batch's labels
        inside = compute_cams(tiny_cnn, images, "features.3", target=labels)
        labels[1] = 8
    assert torch.allclose(inside["features.3", "gradcam"], first["features.3", "gradcam"])
    with pytest.raises(ValueError, match=r"Target index 8 is outside"):
        compute_cams(tiny_cnn, images, "features.3", target=labels)


def test_the_result_never_aliases_the_callers_labels(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    labels = torch.tensor([0, 1, 2, 3])
    result = compute_cams(tiny_cnn, images, "features.3", target=labels)
    labels[0] = 4
    assert result.targets.tolist() == [0, 1, 2, 3]
    one = compute_cams(tiny_cnn, images, "features.3", target=torch.tensor(2))
    one.targets[0] = 1  # one index for all images, yet each row its own
    assert one.targets.tolist() == [1, 2, 2, 2]


# -- the plan cache: a layer look-up done once per model, never stale -------------------------


def test_a_layer_replaced_after_a_call_is_the_one_hooked_next(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    first = compute_cams(tiny_cnn, images, "features.3", target=1)
    torch.manual_seed(5)
    tiny_cnn.features[3] = nn.Conv2d(8, 8, 3, padding=1, stride=2)  # same shape, new weights
    again = compute_cams(tiny_cnn, images, "features.3", target=1)
    fresh = compute_cams(copy.deepcopy(tiny_cnn), images, "features.3", target=1)  # no cache
    assert torch.equal(again["features.3", "gradcam"], fresh["features.3", "gradcam"])
    assert not torch.equal(again["features.3", "gradcam"], first["features.3", "gradcam"])
    assert all(not m._forward_hooks for m in tiny_cnn.modules())


def test_a_renamed_layer_is_looked_up_again(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    )  # fmt: skip
    before = compute_cams(net, images, "2")
    # A Sequential runs its modules in order whatever their names: rename "2" to "conv".
    net._modules = dict((("conv" if k == "2" else k), v) for k, v in net._modules.items())
    with pytest.raises(ValueError, match=r"No layer named '2'.*'conv'"):
        compute_cams(net, images, "2")
    after = compute_cams(net, images, "conv")
    assert torch.equal(after["conv", "gradcam"], before["2", "gradcam"])


def test_other_options_on_the_same_layer_get_their_own_plan(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    one = compute_cams(tiny_cnn, images, "features.5", "gradcam")
    two = compute_cams(tiny_cnn, images, ["features.5"], ["gradcam", "layercam", "cam"])
    assert set(two.maps) == {("features.5", m) for m in ("gradcam", "layercam", "cam")}
    assert torch.equal(one["features.5", "gradcam"], two["features.5", "gradcam"])
    # At features.5 (pooled into the head) the gradient is the same for any input: not there.
    clean = compute_cams(tiny_cnn, images, "features.3", "gradcam")
    smooth = compute_cams(tiny_cnn, images, "features.3", "gradcam", smooth=2)
    assert not torch.equal(smooth["features.3", "gradcam"], clean["features.3", "gradcam"])
    tiny_cnn.fc = nn.Linear(8, 5)  # the CAM head replaced: its new weights are read
    cam = compute_cams(tiny_cnn, images, "features.5", "cam", target=0)
    fresh = compute_cams(copy.deepcopy(tiny_cnn), images, "features.5", "cam", target=0)
    assert torch.equal(cam["features.5", "cam"], fresh["features.5", "cam"])


@pytest.mark.parametrize(
    ("layers", "arguments"),
    [
        ("features.3", {}),
        (["features.3", "features.5"], {"methods": ("gradcam++", "layercam", "saliency")}),
        ("features.5", {"methods": ("cam", "guided_gradcam"), "cam_head": "fc"}),
        ("features.3", {"methods": ("xgradcam", "smoothgrad"), "smooth": 2}),
    ],
)
def test_a_cached_plan_is_the_plan_made_afresh(
    tiny_cnn: TinyCNN, layers: str | list[str], arguments: dict[str, Any]
) -> None:
    options = EngineOptions(**arguments)
    made = Plan.make(tiny_cnn, layers, options)
    plan_for(tiny_cnn, layers, options)  # cached here
    cached = plan_for(tiny_cnn, layers, options)
    assert cached is not made and vars(cached).keys() == vars(made).keys()
    for name, value in vars(made).items():
        if name != "kept":  # shared by the calls of a cached plan, filled as they meet outputs
            assert getattr(cached, name) == value, name
    assert cached.layouts is not plan_for(tiny_cnn, layers, options).layouts  # one per call


def test_wrappers_share_the_plan_of_the_model_they_wrap(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    plain = compute_cams(tiny_cnn, images, "features.3")
    wrapped = compute_cams(nn.DataParallel(tiny_cnn), images, "features.3")
    tiny_cnn.features[3] = nn.Conv2d(8, 8, 3, padding=1, stride=2)
    replaced = compute_cams(nn.DataParallel(tiny_cnn), images, "features.3")
    assert torch.equal(plain["features.3", "gradcam"], wrapped["features.3", "gradcam"])
    assert not torch.equal(plain["features.3", "gradcam"], replaced["features.3", "gradcam"])


def test_the_plan_cache_keeps_no_model_alive(images: torch.Tensor) -> None:
    import gc
    import weakref

    torch.manual_seed(0)
    model = TinyCNN()
    model.features.owner = [model]  # a submodule that refers back to its model (a list: no child)
    compute_cams(model, images, ["features.3", "features.5"], "layercam")
    compute_cams(model, images, "features.5", ["gradcam", "cam"], cam_head="fc")
    compute_cams(model, images, "features.*")  # a glob: looked up at every call
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
