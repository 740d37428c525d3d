from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import TensorDataset

from cam_monitor import CamMonitor, filter_activations, visualize_filter
from tests.conftest import ClassifierSteps, Lightning, TinyCNN, loader


class Exploding(nn.Module):
    """Fails if it runs: proves the forward stops at the requested layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the forward went past the layer")


def snapshot(model: nn.Module) -> dict:
    return {
        "state": copy.deepcopy(model.state_dict()),
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "rng": torch.get_rng_state(),
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), name
    for old, new in zip(before["grads"], after["grads"], strict=True):
        assert (new is None) if old is None else torch.equal(new, old)
    for key in ("requires_grad", "training", "hooks"):
        assert after[key] == before[key], key
    assert torch.equal(after["rng"], before["rng"])


def test_filter_activations_are_the_layers_channels(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    tiny_cnn.train()
    tiny_cnn.fc = nn.Sequential(Exploding())
    before = snapshot(tiny_cnn)
    maps = filter_activations(tiny_cnn, images, "features.5", [6, 1, 6])
    assert_untouched(tiny_cnn, before)
    twin = copy.deepcopy(tiny_cnn).eval()
    with torch.no_grad():
        expected = twin.features(images)[:, [6, 1, 6]]
    assert maps.shape == (4, 3, 16, 16) and not maps.requires_grad
    assert torch.allclose(maps, expected) and maps.abs().sum() > 0
    single = filter_activations(tiny_cnn, images, tiny_cnn.features[2], 3)
    assert single.shape == (4, 1, 32, 32) and (single >= 0).all()


def test_filter_activations_errors(tiny_cnn: TinyCNN, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"Channel 8 is outside layer 'features\.3''s 8 channels"):
        filter_activations(tiny_cnn, images, "features.3", [0, 8])
    with pytest.raises(ValueError, match="exactly one layer"):
        filter_activations(tiny_cnn, images, "features.*", 0)
    with pytest.raises(ValueError, match=r"'fc' outputs shape \(4, 5\)"):
        filter_activations(tiny_cnn, images, "fc", 0)


def test_visualize_filter_raises_the_channel_and_leaves_the_model_bit_identical(
    tiny_cnn: TinyCNN, images: torch.Tensor
) -> None:
    tiny_cnn.train()
    tiny_cnn(images).sum().backward()  # existing grads must survive untouched
    tiny_cnn.features[0].requires_grad_(False)
    tiny_cnn.features[0].weight.grad = None
    before = snapshot(tiny_cnn)

    start = visualize_filter(tiny_cnn, "features.3", [2, 5], steps=0, size=(32, 32), seed=1)
    tuned = visualize_filter(
        tiny_cnn, "features.3", [2, 5], steps=16, lr=0.1, size=(32, 32), seed=1
    )
    assert_untouched(tiny_cnn, before)
    assert tuned.shape == (2, 3, 32, 32) and not tuned.requires_grad

    def mean_activation(pictures: torch.Tensor) -> torch.Tensor:
        maps = filter_activations(tiny_cnn, pictures, "features.3", [2, 5])
        return maps[[0, 1], [0, 1]].mean(dim=(1, 2))  # image k, its own channel

    assert (mean_activation(tuned) > mean_activation(start) + 0.5).all()
    again = visualize_filter(
        tiny_cnn, "features.3", [2, 5], steps=16, lr=0.1, size=(32, 32), seed=1
    )
    assert torch.equal(again, tuned)
    one = visualize_filter(tiny_cnn, "features.3", 2, steps=2, size=(16, 24))
    assert one.shape == (1, 3, 16, 24)


def test_filter_views_clean_up_when_the_forward_raises(tiny_cnn: TinyCNN) -> None:
    tiny_cnn.train()

    def failing(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        model.features[0](x)
        raise RuntimeError("forward broke")

    x = torch.randn(2, 3, 32, 32)
    before = snapshot(tiny_cnn)
    with pytest.raises(RuntimeError, match="forward broke"):
        filter_activations(tiny_cnn, x, "features.3", 0, forward=failing)
    with pytest.raises(RuntimeError, match="forward broke"):
        visualize_filter(tiny_cnn, "features.3", 0, steps=3, size=(32, 32), forward=failing)
    assert_untouched(tiny_cnn, before)
    with pytest.raises(ValueError, match="steps must be"):
        visualize_filter(tiny_cnn, "features.3", 0, steps=-1)
    with pytest.raises(ValueError, match=r"Channel 9 is outside"):
        visualize_filter(tiny_cnn, "features.3", 9, steps=1)


def test_channels_last_and_token_layers_give_their_channels() -> None:
    import torchvision

    torch.manual_seed(0)
    swin = torchvision.models.swin_t(weights=None).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        stage = swin.features(x)  # [B, h, w, C]: channels last
    assert stage.shape == (2, 2, 3, 768)
    acts = filter_activations(swin, x, "features.7", [0, 5])
    assert torch.equal(acts, stage.permute(0, 3, 1, 2)[:, [0, 5]])
    images = visualize_filter(swin, "features.7", [5, 700], steps=1, size=(64, 96))
    assert images.shape == (2, 3, 64, 96)

    class Tokens(nn.Module):  # a class token and a 3 x 4 grid of patches: a wide input
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.block = nn.Conv2d(3, 6, 16, 16), nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            patches = self.embed(x).flatten(2).transpose(1, 2)
            return self.block(torch.cat([patches.mean(1, keepdim=True), patches], dim=1))

    model, wide = Tokens(), torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        grid = model.embed(wide)
    torch.testing.assert_close(filter_activations(model, wide, "block", [1, 4]), grid[:, [1, 4]])


class GraySteps(ClassifierSteps):
    """`ClassifierSteps` on one-channel (grayscale) images, like MNIST."""

    def __init__(self) -> None:
        super().__init__()
        self.net.features[0] = nn.Conv2d(1, 8, 3, padding=1)


@pytest.mark.slow
def test_filter_views_of_a_grayscale_model_log_under_the_full_layer_name(
    tmp_path: Path, lightning: Lightning
) -> None:
    images = torch.randn(4, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4) % 5
    monitor = CamMonitor(
        "net.features.5", probe=(images, labels), filters={"features.2": [1, 4]}, history=False
    )
    logger = lightning.loggers.TensorBoardLogger(tmp_path, name="tb")
    trainer = lightning.trainer(
        callbacks=[monitor], logger=logger, max_epochs=1, default_root_dir=tmp_path
    )
    trainer.fit(lightning.module(GraySteps)(), loader(TensorDataset(images, labels)))
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert {t for t in acc.Tags()["images"] if t.startswith("filters/")} == {
        "filters/probe/net.features.2/channel_1",
        "filters/probe/net.features.2/channel_4",
        "filters/net.features.2/maximised",
    }
    maximised = acc.Images("filters/net.features.2/maximised")
    assert [event.step for event in maximised] == [0, trainer.global_step]
    assert (maximised[-1].height, maximised[-1].width) == (28, 54)  # 2 tiles of 24 px, padded


def test_maximised_inputs_are_drawn_in_the_colours_of_the_data() -> None:
    """With `mean`/`std`, the optimised inputs are de-normalised before they are drawn, like
    the probe images: a channel's offset is a colour, not noise to scale away."""
    from cam_monitor.evaluation import filter_grids
    from cam_monitor.options import EngineOptions, FilterOptions, RenderOptions
    from cam_monitor.probe import ProbeSet
    from cam_monitor.render import make_map_grid, to_uint8_images

    torch.manual_seed(0)
    model = TinyCNN().eval()
    probe = ProbeSet("probe", torch.randn(2, 3, 16, 16), None)
    mean, std = (0.8, 0.1, 0.1), (0.1, 0.3, 0.3)
    filters = FilterOptions({"features.2": (1, 4)}, steps=3)
    render = RenderOptions(mean=mean, std=std, colormap="viridis")
    grid = filter_grids(model, {"probe": probe}, filters, EngineOptions(), render)
    images = visualize_filter(model, "features.2", [1, 4], steps=3, size=(16, 16))
    rgb = images * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    expected = to_uint8_images(rgb)  # min-max per image of the de-normalised inputs
    maximised = grid["filters/features.2/maximised"]
    assert torch.equal(maximised[:, 2:18, 2:18], expected[0])
    assert torch.equal(maximised[:, 2:18, 20:36], expected[1])
    assert not torch.equal(expected, to_uint8_images(images))  # the colours differ here
    acts = filter_activations(model, probe.inputs, "features.2", [4])[:, 0]
    channel = make_map_grid(acts, signed=False, colormap="viridis")  # the chosen colormap
    assert torch.equal(grid["filters/probe/features.2/channel_4"], channel)
