"""Setups real users have, where a map could be silently wrong (issue 12, engine side).

Real torchvision models (`weights=None`) at 64 px and a real Lightning Trainer: the engine is
right, or it says why it cannot be.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

from cam_monitor import CamMonitor, compute_cams
from cam_monitor.capture import NoGradientError
from cam_monitor.default_layer import first_spatial_layer
from cam_monitor.options import EngineOptions
from tests.helpers import Lightning, TinyCNN, fit, loader, shapes_dataset

# -- 1. a layer cut off from autograd ----------------------------------------------------------


class CutNet(nn.Module):
    """TinyCNN whose features are cut off from the logits in one of the ways users do it."""

    def __init__(self, cut: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.cut = TinyCNN(), cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body.features
        if self.cut == "no_grad":
            with torch.no_grad():
                z = features(x)
        elif self.cut == "checkpoint":
            z = checkpoint(features, x, use_reentrant=True)
        elif self.cut == "detach":
            z = features(x).detach()
        else:
            z = features(x)
        return self.body.fc(self.body.pool(z).flatten(1))


CUT_CAUSES = {
    "no_grad": r"torch\.no_grad\(\)",
    "checkpoint": r"use_reentrant=False",
    "detach": r"\.detach\(\)",
}


@pytest.mark.parametrize("methods", [["gradcam"], ["gradcam", "saliency"]], ids=["cam", "pixel"])
@pytest.mark.parametrize("cut", list(CUT_CAUSES))
def test_a_layer_cut_off_from_autograd_is_an_error_naming_it(cut: str, methods: list[str]) -> None:
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # checkpoint's own "None of the inputs" warning
        with pytest.raises(NoGradientError, match=rf"'body\.features\.5'.*{CUT_CAUSES[cut]}"):
            compute_cams(CutNet(cut), x, "body.features.5", methods)
    assert compute_cams(CutNet("none"), x, "body.features.5", methods).maps  # the control


def test_maps_exactly_zero_everywhere_warn_once_naming_the_layer() -> None:
    class ZeroGain(TinyCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(self.features(x) * 0.0).flatten(1))

    model, x = ZeroGain(), torch.randn(3, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"gradcam, layercam maps at layer 'features\.5' are exac"):
        result = compute_cams(model, x, "features.5", ["gradcam", "layercam"])
    assert not result["features.5", "gradcam"].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_cams(model, x, "features.5", "gradcam")  # said once per model and layer


def test_guided_gradcam_exactly_zero_everywhere_warns_naming_the_layer() -> None:
    """Negative head weights on ReLU'd features: every Grad-CAM weight is negative, so Grad-CAM,
    and guided Grad-CAM with it, is zero for every image; a blank grid says nothing by itself."""
    torch.manual_seed(0)
    model, x = TinyCNN(), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        model.fc.weight.copy_(-model.fc.weight.abs())
    with pytest.warns(UserWarning, match=r"guided_gradcam maps at layer 'features\.5' are exac"):
        result = compute_cams(model, x, "features.5", "guided_gradcam", target=0)
    assert not result["features.5", "guided_gradcam"].any()


class LitCut(pl.LightningModule):
    """Trains a TinyCNN; from `cut_from_epoch` on, its forward runs the features under no_grad."""

    def __init__(self, cut_from_epoch: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net, self.cut_from_epoch, self.steps_run = TinyCNN(), cut_from_epoch, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.current_epoch >= self.cut_from_epoch:
            with torch.no_grad():
                z = self.net.features(x)
        else:
            z = self.net.features(x)
        return self.net.fc(self.net.pool(z).flatten(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        self.steps_run += 1
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_cut(tmp_path: Path, cut_from_epoch: int, strict: bool = False) -> LitCut:
    monitor = CamMonitor("net.features.5", num_probe=4, strict=strict, save_dir=tmp_path / "h")
    train = loader(shapes_dataset(16))
    return fit(
        monitor, tmp_path, model=LitCut(cut_from_epoch), train=train, val=False, seed=None
    ).model


@pytest.mark.slow
def test_a_cut_layer_fails_at_setup_then_warns_and_skips_later_in_a_real_fit(
    tmp_path: Path,
) -> None:
    model = LitCut(0)
    with pytest.raises(ValueError, match=r"No gradient reaches 'net\.features\.5'.*no_grad"):
        fit_cut(tmp_path / "a", cut_from_epoch=0)
    with pytest.warns(UserWarning, match=r"skipped its evaluation.*NoGradientError.*no_grad"):
        model = fit_cut(tmp_path / "b", cut_from_epoch=1)
    assert model.steps_run == 2, "training finished"
    with pytest.raises(NoGradientError):
        fit_cut(tmp_path / "c", cut_from_epoch=1, strict=True)


# -- 2. channels-last outputs ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("size", [(64, 64), (64, 96)], ids=["square", "wide"])
def test_swin_and_convnext_channels_last_outputs_give_maps_of_the_input_shape(
    size: tuple[int, int],
) -> None:
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    swin = torchvision.models.swin_t(weights=None).eval()
    stages = ["features.1", "features.3", "features.5", "features.7"]
    result = compute_cams(swin, x, stages, ["gradcam", "layercam"])
    for stride, name in zip((4, 8, 16, 32), stages, strict=True):
        expected = (-(-size[0] // stride), -(-size[1] // stride))
        assert tuple(result[name, "gradcam"].shape) == (2, *expected), name
        assert result[name, "layercam"].amax(dim=(1, 2)).min() > 0, name
    convnext = torchvision.models.convnext_tiny(weights=None).eval()
    inner = "features.1.0.block.2"  # the LayerNorm between the two Permutes of a CNBlock
    maps = compute_cams(convnext, x, inner, "layercam")[inner, "layercam"]
    assert tuple(maps.shape) == (2, size[0] // 4, size[1] // 4)


def test_a_cube_output_of_a_block_with_linear_layers_asks_for_reshape() -> None:
    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
            self.head = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.block(self.embed(x).permute(0, 2, 3, 1))  # [B, 8, 8, 8], channels-last
            return self.head(z.mean(dim=(1, 2)))

    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"'block' outputs \(2, 8, 8, 8\).*reshape="):
        compute_cams(Mixer(), x, "block")
    to_nchw = compute_cams(Mixer(), x, "block", reshape=lambda t: t.permute(0, 3, 1, 2))
    assert to_nchw["block", "gradcam"].shape == (2, 8, 8)


# -- 3. automatic layer choice -----------------------------------------------------------------


def random_head_vit() -> nn.Module:
    """A torchvision ViT at 64 px; its head is zero at init, so every CAM would be zero."""
    torch.manual_seed(0)
    vit = torchvision.models.vit_b_16(weights=None, image_size=64)
    nn.init.normal_(vit.heads.head.weight, std=0.02)
    return vit


@pytest.mark.slow
@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (torchvision.models.resnet18, "layer4"),
        (torchvision.models.vgg11, "features.19"),
        (torchvision.models.mobilenet_v3_small, "features.12"),
        (torchvision.models.convnext_tiny, "features.7"),
        (random_head_vit, "encoder.layers.encoder_layer_11.ln_1"),
    ],
    ids=["resnet18", "vgg11", "mobilenet_v3_small", "convnext_tiny", "vit_b_16"],
)
def test_the_automatic_layer_is_the_one_an_expert_picks(build: object, expected: str) -> None:
    torch.manual_seed(0)
    model = build() if build is random_head_vit else build(weights=None)  # type: ignore[operator]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    chosen = first_spatial_layer(model, x, None)
    assert chosen == expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random ViT's maps may be all zero after the ReLU
        maps = compute_cams(model, x, chosen, "gradcam")[chosen, "gradcam"]
    assert build is random_head_vit or maps.amax(dim=(1, 2)).min() > 0, "the layer gives a map"


# -- 7. Grad-CAM++ and XGrad-CAM on signed activations -------------------------------------


def test_ill_posed_methods_warn_once_per_layer_and_method_with_the_negative_share() -> None:
    torch.manual_seed(0)
    model, x = TinyCNN(), torch.randn(4, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compute_cams(model, x, ["features.4", "features.5"], ["gradcam", "gradcam++", "xgradcam"])
        compute_cams(model, x, ["features.4"], ["gradcam++", "xgradcam"])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages  # BatchNorm output only; once per method; not post-ReLU
    for method, message in zip(["gradcam++", "xgradcam"], messages, strict=True):
        assert message.startswith(f"{method} at layer 'features.4': ")
        share = float(message.split(": ")[1].split("%")[0]) / 100
        measured = float((model.features[:5].eval()(x) < 0).float().mean())
        assert abs(share - measured) < 0.01
        assert "gradcam, layercam or hirescam" in message and "after a ReLU" in message


@pytest.mark.slow
def test_mobilenet_hardswish_layer_warns_for_gradcam_plus_plus() -> None:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None)
    x = torch.rand(2, 3, 64, 64)
    with pytest.warns(UserWarning, match=r"gradcam\+\+ at layer 'features\.12': \d+% of its"):
        compute_cams(model, x, "features.12", "gradcam++")


# -- 13. integrated gradients: completeness ----------------------------------------------------


def test_integrated_gradients_warn_once_when_steps_are_too_few() -> None:
    torch.manual_seed(0)
    model, x = TinyCNN(), torch.rand(3, 3, 32, 32)  # conv biases: IG is not exact at one step
    with pytest.warns(UserWarning, match=r"integrated_gradients: for \d of 3 images.*ig_steps=4"):
        coarse = compute_cams(model, x, None, "integrated_gradients", ig_steps=1)
    gap = coarse.extras["integrated_gradients.completeness_gap"].abs()
    assert (gap > 0.1 * coarse.extras["integrated_gradients.score_delta"].abs()).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_cams(model, x, None, "integrated_gradients", ig_steps=1)  # once per model
        compute_cams(TinyCNN(), x, None, "integrated_gradients")  # the default meets it here


def test_the_integrated_gradients_warning_counts_the_whole_probe_when_chunked() -> None:
    torch.manual_seed(0)
    model, x = TinyCNN(), torch.rand(5, 3, 32, 32)
    with pytest.warns(UserWarning) as caught:
        chunked = compute_cams(model, x, None, "integrated_gradients", ig_steps=1, batch_size=2)
    gap = chunked.extras["integrated_gradients.completeness_gap"].abs()
    over = int((gap > 0.1 * chunked.extras["integrated_gradients.score_delta"].abs()).sum())
    messages = [str(w.message) for w in caught if "integrated_gradients" in str(w.message)]
    assert messages == [messages[0]] and f"for {over} of 5 images" in messages[0]


def test_the_ig_steps_default_is_one_number_everywhere() -> None:
    default = EngineOptions().ig_steps
    assert default == 256
    assert inspect.signature(compute_cams).parameters["ig_steps"].default == default
    assert inspect.signature(CamMonitor).parameters["ig_steps"].default == default


# -- audit A: an independent Grad-CAM from plain module hooks -----------------------------------


def hooked_gradcam(
    model: nn.Module, x: torch.Tensor, layer: str, score: object, reshape: object = None
) -> torch.Tensor:
    """Grad-CAM written out: A from a forward hook (which hands on a copy, so in-place ops
    downstream leave A alone), dS/dA by autograd, relu(sum_c mean_hw(dS/dA_c) A_c);
    `score(output) -> [B]` is the explained score."""
    seen = {}

    def keep_output(_: nn.Module, __: object, out: torch.Tensor) -> torch.Tensor:
        seen["a"] = out
        return out.clone()

    model.eval()
    handle = model.get_submodule(layer).register_forward_hook(keep_output)
    try:
        x = x.clone().requires_grad_(True)  # a graph even through a frozen model
        (g,) = torch.autograd.grad(score(model(x)).sum(), seen["a"])  # type: ignore[operator]
    finally:
        handle.remove()
    a = seen["a"].detach()
    if reshape is not None:
        a, g = reshape(a), reshape(g)  # type: ignore[operator]
    return torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1))


def predicted_logit(out: torch.Tensor) -> torch.Tensor:
    return out.gather(1, out.argmax(dim=1, keepdim=True))[:, 0]


def tokens_4x4(t: torch.Tensor) -> torch.Tensor:
    return t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[2], 4, 4)


def small_vit() -> nn.Module:
    vit = torchvision.models.VisionTransformer(64, 16, 2, 2, 32, 64)
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts its head at zero
    return vit


def channels_first(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


#: torchvision builder (weights=None), layer, and how the reference reads its output as a grid.
ZOO = {
    "vgg11_bn": ("features.27", None),
    "densenet121": ("features.denseblock4", None),
    "efficientnet_b0": ("features.8", None),
    "regnet_y_400mf": ("trunk_output", None),
    "shufflenet_v2_x0_5": ("conv5", None),
    "squeezenet1_1": ("features.12", None),
    "googlenet": ("inception5b", None),
    "swin_t": ("features.7", channels_first),
    "vit": ("encoder.layers.encoder_layer_1.ln_1", tokens_4x4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_the_model_zoo_agrees_with_a_grad_cam_from_plain_hooks(name: str) -> None:
    layer, reshape = ZOO[name]
    torch.manual_seed(0)
    if name == "vit":
        model = small_vit()
    elif name == "googlenet":
        model = torchvision.models.googlenet(weights=None, init_weights=True)
    else:
        model = getattr(torchvision.models, name)(weights=None)
    model.train()  # the engine switches to eval (dropout, BatchNorm) and back
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # signed activations for gradcam++ at some layers
        ours = compute_cams(model, x, layer, ["gradcam", "gradcam++", "layercam"])
    assert model.training
    ref = hooked_gradcam(model, x, layer, predicted_logit, reshape)
    assert ref.amax() > 0
    got = ours[layer, "gradcam"]
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4 * float(ref.amax()))
    assert all(bool(torch.isfinite(m).all()) for m in ours.maps.values())


# -- audit A: a binary classifier with one logit ------------------------------------------------


class Squeezed(nn.Module):
    """A binary classifier returning one logit per image as `[B]` (for BCEWithLogitsLoss)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, 0]


def binary_cnn(x: torch.Tensor) -> TinyCNN:
    """A TinyCNN with one logit whose bias splits `x` into both predictions."""
    torch.manual_seed(3)
    model = TinyCNN(num_classes=1).eval()
    with torch.no_grad():
        model.fc.bias -= model(x)[:, 0].median() + 1e-3
    return model


def test_a_single_logit_binary_classifier_explains_the_class_it_predicts() -> None:
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = binary_cnn(x)  # logits [B, 1]: z > 0 is class 1
    with torch.no_grad():
        z = model(x)[:, 0]
    assert (z > 0).any() and (z < 0).any(), "the probe holds both predictions"
    result = compute_cams(model, x, "features.5", ["gradcam", "layercam"])
    assert torch.equal(result.targets, (z > 0).long())
    assert torch.equal(result.logits.argmax(dim=1), result.targets), "captions read argmax"
    sign = torch.where(z > 0, 1.0, -1.0)
    evidence = hooked_gradcam(model, x, "features.5", lambda out: sign * out[:, 0])
    torch.testing.assert_close(result["features.5", "gradcam"], evidence)
    positive = hooked_gradcam(model, x, "features.5", lambda out: out[:, 0])
    negative = hooked_gradcam(model, x, "features.5", lambda out: -out[:, 0])
    assert not torch.allclose(positive, negative)
    for label, expected in [(1, positive), (0, negative)]:
        forced = compute_cams(model, x, "features.5", "gradcam", target=label)
        torch.testing.assert_close(forced["features.5", "gradcam"], expected)
    labels = (torch.arange(8) % 2).long()
    by_label = compute_cams(model, x, "features.5", "gradcam", target=labels)
    assert torch.equal(by_label.targets, labels)
    with pytest.raises(ValueError, match=r"Target index 2 is outside the logits' 2 classes"):
        compute_cams(model, x, "features.5", "gradcam", target=2)
    # A callable gets the model's own logit, so the scores it returns keep their meaning.
    own = compute_cams(model, x, "features.5", "gradcam", target=lambda logits: logits[:, 0])
    torch.testing.assert_close(own["features.5", "gradcam"], positive)


def test_one_logit_as_b_or_b1_and_two_explicit_classes_give_the_same_maps() -> None:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    net = binary_cnn(x)
    methods = ["gradcam", "gradcam++", "cam", "saliency", "smoothgrad", "guided_gradcam"]
    kwargs = {"smooth": 2, "batch_size": 3}
    column = compute_cams(net, x, "features.5", methods, **kwargs)
    flat = compute_cams(Squeezed(net), x, "net.features.5", methods, **kwargs)
    two = compute_cams(
        net, x, "features.5", [m for m in methods if m != "cam"],
        output_transform=lambda z: torch.cat([-z, z], dim=1), **kwargs,
    )  # fmt: skip
    for (layer, method), value in two.maps.items():
        torch.testing.assert_close(column[layer, method], value)
        wrapped = layer if layer == "input" else "net." + layer
        torch.testing.assert_close(flat[wrapped, method], value)
    torch.testing.assert_close(column.logits, two.logits)
    # CAM reads the head's one row as class 1 and its negation as class 0.
    ratio = column["features.5", "cam"] / column["features.5", "gradcam"].clamp_min(1e-12)
    on = column["features.5", "gradcam"] > 1e-6
    assert torch.allclose(ratio[on], ratio[on].flatten()[0].expand(int(on.sum())), rtol=1e-3)


def test_a_sigmoid_output_warns_that_every_image_reads_as_class_one() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(TinyCNN(num_classes=1), nn.Sigmoid())
    x = torch.randn(8, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"sigmoid probabilities.*return the logit"):
        compute_cams(model, x, "0.features.5")


def test_outputs_that_are_not_class_logits_name_the_fix() -> None:
    class Segmenter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(x)))

    x = torch.randn(2, 3, 16, 16)
    # Per-pixel logits [B, C, H, W] are a segmentation model's (tests/test_segmentation.py);
    # other shapes name both layouts and the fix.
    with pytest.raises(
        ValueError, match=r"\[B, C\].*\[B, C, H, W\].*got \(2, 4, 16\).*output_transform"
    ):
        compute_cams(Segmenter(), x, "body", output_transform=lambda out: out.flatten(2)[..., :16])
    # The fix the message gives works: the mean score of each class over the image.
    fixed = compute_cams(Segmenter(), x, "body", output_transform=lambda out: out.mean(dim=(2, 3)))
    assert fixed["body", "gradcam"].shape == (2, 16, 16)
    assert fixed.pixel_masks is None and fixed.predicted_maps is None
    segments = compute_cams(Segmenter(), x, "body")
    assert segments.predicted_maps is not None and segments.predicted_maps.shape == (2, 16, 16)


def test_logits_without_one_row_per_image_are_refused() -> None:
    class Squeezing(TinyCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).squeeze()  # [C] for a batch of one

    class BatchPooled(TinyCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).mean(dim=0, keepdim=True)

    torch.manual_seed(0)
    assert compute_cams(Squeezing(), torch.randn(2, 3, 16, 16), "features.5").targets.shape == (2,)
    with pytest.raises(ValueError, match=r"5 rows for 1 input images.*squeeze\(-1\)"):
        compute_cams(Squeezing(), torch.randn(1, 3, 16, 16), "features.5")
    with pytest.raises(ValueError, match=r"1 rows for 3 input images"):
        compute_cams(BatchPooled(), torch.randn(3, 3, 16, 16), "features.5")


# -- audit A: a module called more than once ----------------------------------------------------


def test_a_relu_reused_in_a_resnet_block_is_refused_naming_the_block() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    # BasicBlock calls its one `relu` twice: which call's map would be ambiguous.
    with pytest.raises(ValueError, match=r"'layer4\.1\.relu' ran more than once.*'layer4\.1'"):
        compute_cams(model, x, "layer4.1.relu")
    assert all(not m._forward_hooks for m in model.modules())
    # The block, whose output is that ReLU's last call, is read once and is right.
    block = compute_cams(model, x, "layer4.1")["layer4.1", "gradcam"]
    torch.testing.assert_close(block, hooked_gradcam(model, x, "layer4.1", predicted_logit))


# -- audit A: CAM in low precision --------------------------------------------------------------


def test_cam_in_bf16_is_computed_and_still_refuses_a_layer_that_is_not_pooled() -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    exact = compute_cams(model, x, "features.5", "cam")["features.5", "cam"]
    low = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what precision="bf16-mixed" runs
        low["autocast"] = compute_cams(model, x, "features.5", "cam")["features.5", "cam"]
    bf16 = TinyCNN().bfloat16()
    bf16.load_state_dict(model.state_dict())
    low["bf16 model"] = compute_cams(bf16, x.bfloat16(), "features.5", "cam")["features.5", "cam"]
    for name, maps in low.items():
        assert maps.dtype == torch.float32
        r = torch.corrcoef(torch.stack([maps.flatten(), exact.flatten()]))[0, 1]
        assert r > 0.99, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match=r"'features\.4'.*not the global average pool"):
            compute_cams(model, x, "features.4", "cam")  # before the ReLU the pooling reads


class BinarySteps:
    """A one-logit binary classifier trained with BCEWithLogitsLoss on float labels `[B, 1]`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN(num_classes=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, ...], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.slow
def test_a_bce_binary_classifier_trains_with_its_float_labels_as_the_target(
    lightning: Lightning, tmp_path: Path
) -> None:
    from cam_monitor.history.store import read_history

    images, classes = shapes_dataset(32).tensors
    labels = (classes % 2).float()[:, None]  # what BCEWithLogitsLoss takes: float [B, 1]
    data = torch.utils.data.TensorDataset(images, labels)
    torch.manual_seed(0)
    monitor = CamMonitor(
        "net.features.5", probe=data, num_probe=8, target="label", save_dir=tmp_path,
        class_names=["even", "odd"],
    )  # fmt: skip
    trainer = lightning.trainer(max_epochs=1, logger=False, callbacks=[monitor])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lightning.module(BinarySteps)(), loader(data, batch_size=8))
    history = read_history(tmp_path)
    assert len(history) == 2
    last = history[-1]
    picked = (classes[torch.linspace(0, 31, 8).round().long()] % 2).numpy()
    assert (last.labels["probe"] == picked).all() and (last.targets["probe"] == picked).all()
    z = last.logits["probe"]
    assert z.shape == (8, 2) and (z[:, 0] == -z[:, 1]).all()


# -- audit A: result helpers on non-square inputs and signed maps -------------------------------


class CornerNet(nn.Module):
    """Scores the input's first channel: every map is the image itself, coarser at `pooled`."""

    def __init__(self) -> None:
        super().__init__()
        self.full, self.pooled = nn.Identity(), nn.AvgPool2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.pooled(self.full(x[:, :1])).sum(dim=(1, 2, 3))
        return torch.stack([total, -total], dim=1)


def test_maps_keep_their_orientation_on_a_wide_input_at_every_resolution() -> None:
    x = torch.zeros(1, 3, 48, 64)
    x[0, 0, 4:12, 44:60] = 1.0  # a blob in the top right corner
    result = compute_cams(CornerNet(), x, ["full", "pooled"], ["gradcam", "layercam"])
    assert result["full", "gradcam"].shape == (1, 48, 64)
    assert result["pooled", "gradcam"].shape == (1, 12, 16)
    for layer in ("full", "pooled"):
        heat = result.normalized(layer, "gradcam")
        assert heat.shape == (1, 48, 64)
        assert heat[0, :16, 40:].sum() > 0.99 * heat[0].sum(), layer
        assert heat[0, 8, 52] == 1.0


def test_upsampling_a_signed_map_keeps_its_sign() -> None:
    torch.manual_seed(0)
    result = compute_cams(TinyCNN(), torch.randn(2, 3, 32, 32), None, "integrated_gradients")
    signed = result["input", "integrated_gradients"]
    assert signed.min() < 0 < signed.max()
    smaller = result.upsampled("input", "integrated_gradients", size=(16, 16))
    expected = nn.functional.interpolate(signed[:, None], (16, 16), mode="bilinear")[:, 0]
    torch.testing.assert_close(smaller, expected)
    assert smaller.min() < 0


def test_a_one_cell_layer_warns_and_its_flat_map_is_drawn_flat() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    x = torch.randn(2, 3, 32, 32)  # CIFAR-sized: layer4 is 1 x 1
    with pytest.warns(
        UserWarning, match=r"'layer4' gives a 1x1 map for a 32x32 input.*earlier layer"
    ):
        result = compute_cams(model, x, ["layer3", "layer4"], "gradcam")
    assert result["layer4", "gradcam"].shape == (2, 1, 1)
    assert result["layer4", "gradcam"].amax() > 0
    # Upsampling one cell rounds differently across pixels; that is no structure to draw.
    assert not result.normalized("layer4", "gradcam").any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_cams(model, x, ["layer3", "layer4"], "gradcam")  # once per model and layer


def test_cam_where_a_norm_sits_between_the_pooling_and_the_head_says_so() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    convnext = torchvision.models.convnext_tiny(weights=None, num_classes=3)  # pool, norm, linear
    with pytest.raises(ValueError, match=r"'features\.7'.*not the global average pool.*norm"):
        compute_cams(convnext, x, "features.7", "cam")
    swin = torchvision.models.swin_t(weights=None, num_classes=3)  # norm, permute, pool, linear
    result = compute_cams(swin, x, "norm", ["gradcam", "cam"])
    on = result["norm", "gradcam"] > 1e-6
    ratio = result["norm", "cam"][on] / result["norm", "gradcam"][on]
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))


def test_a_multi_label_sigmoid_output_warns_like_a_softmax() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(TinyCNN(num_classes=5), nn.Sigmoid())  # rows do not sum to 1
    with pytest.warns(UserWarning, match=r"looks like probabilities.*sigmoid"):
        compute_cams(model, torch.randn(4, 3, 32, 32), "0.features.5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_cams(TinyCNN(num_classes=5), torch.randn(4, 3, 32, 32), "features.5")
        # A ReLU head (squeezenet: conv, ReLU, pool) scores in [0, 1] at initialisation, with
        # exact zeros no sigmoid gives: no probabilities, no warning.
        squeeze = torchvision.models.squeezenet1_1(weights=None, num_classes=10).eval()
        x = torch.randn(16, 3, 64, 64)
        with torch.no_grad():
            scores = squeeze(x)
        assert scores.min() == 0 and scores.max() < 1  # the case the warning must not take
        compute_cams(squeeze, x, "features.12")


def test_fresh_heads_whose_logits_all_fall_in_0_1_do_not_warn_of_probabilities() -> None:
    """The small logits of a fresh head are all in (0, 1) for some seeds (14, 15 and 27 of the
    first 40 here); they are no probabilities, and no seed warns. A sigmoid after them does."""
    squeezed = []
    for seed in range(30):
        torch.manual_seed(seed)
        model, x = TinyCNN(num_classes=5).eval(), torch.rand(4, 3, 32, 32)
        with torch.no_grad():
            squeezed.append(bool(((model(x) > 0) & (model(x) < 1)).all()))
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*probabilit")
            compute_cams(model, x, "features.5")
        if seed in (14, 15):
            with pytest.warns(UserWarning, match="looks like probabilities"):
                compute_cams(nn.Sequential(model, nn.Sigmoid()), x, "0.features.5")
    assert squeezed.count(True) >= 2  # the case the warning took before
