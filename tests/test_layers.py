from __future__ import annotations

import pytest
import torch
from torch import nn

from cam_monitor.layers import as_spatial, resolve_layers, unwrap_model


def test_dotted_names_resolve_in_the_order_asked(tiny_cnn: nn.Module) -> None:
    found = resolve_layers(tiny_cnn, ["features.3", "features.0"])
    assert [name for name, _ in found] == ["features.3", "features.0"]
    assert found[0][1] is tiny_cnn.features[3]


def test_glob_stays_inside_one_segment_and_double_star_crosses(tiny_cnn: nn.Module) -> None:
    names = [name for name, _ in resolve_layers(tiny_cnn, "features.*")]
    assert names == [f"features.{i}" for i in range(6)]
    assert [n for n, _ in resolve_layers(tiny_cnn, "f*")] == ["features", "fc"]
    assert "features.3" in [n for n, _ in resolve_layers(tiny_cnn, "**3")]


def test_module_objects_and_duplicates(tiny_cnn: nn.Module) -> None:
    found = resolve_layers(tiny_cnn, [tiny_cnn.features[3], "features.3", "features.0"])
    assert [name for name, _ in found] == ["features.3", "features.0"]


def test_unknown_name_lists_the_closest_names(tiny_cnn: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"'featurs\.3'.*Closest names: 'features\.3'"):
        resolve_layers(tiny_cnn, "featurs.3")


def test_glob_without_match_and_foreign_module(tiny_cnn: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"No layer named 'blocks\.\*'"):
        resolve_layers(tiny_cnn, "blocks.*")
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layers(tiny_cnn, nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="got int"):
        resolve_layers(tiny_cnn, [3])  # type: ignore[list-item]


def test_wrappers_are_unwrapped(tiny_cnn: nn.Module) -> None:
    compiled = torch.compile(tiny_cnn)
    assert unwrap_model(compiled) is tiny_cnn
    assert unwrap_model(nn.DataParallel(compiled)) is tiny_cnn
    assert resolve_layers(compiled, "features.0")[0][1] is tiny_cnn.features[0]


def test_token_outputs_become_square_grids() -> None:
    tokens = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    grid = as_spatial("blocks", tokens)
    assert grid.shape == (2, 3, 4, 4)
    assert torch.equal(grid[1, 2, 1, 3], tokens[1, 1 * 4 + 3, 2])
    with_cls = torch.cat([torch.full((2, 1, 3), -1.0), tokens], dim=1)
    assert torch.equal(as_spatial("blocks", with_cls), grid)


def test_non_spatial_outputs_are_refused_with_the_shape() -> None:
    with pytest.raises(ValueError, match=r"'fc' outputs shape \(2, 10\)"):
        as_spatial("fc", torch.zeros(2, 10))
    with pytest.raises(ValueError, match=r"\(2, 7, 3\)"):
        as_spatial("blocks", torch.zeros(2, 7, 3))


def test_reshape_callable_is_used_and_checked() -> None:
    out = as_spatial("x", torch.zeros(2, 12), reshape=lambda t: t.view(2, 3, 2, 2))
    assert out.shape == (2, 3, 2, 2)
    with pytest.raises(ValueError, match="reshape"):
        as_spatial("x", torch.zeros(2, 12), reshape=lambda t: t.view(2, 3, 4))


def test_a_unique_dotted_suffix_finds_a_wrapped_network(tiny_cnn: nn.Module) -> None:
    wrapper = nn.Module()
    wrapper.model = tiny_cnn
    assert resolve_layers(wrapper, "features.3")[0] == ("model.features.3", tiny_cnn.features[3])
    wrapper.twin = nn.Module()
    wrapper.twin.features = nn.Sequential(*[nn.Identity() for _ in range(4)])
    with pytest.raises(ValueError, match=r"'features\.3' is ambiguous.*'model\.features\.3'"):
        resolve_layers(wrapper, "features.3")
    with pytest.raises(ValueError, match=r"No layer named 'atures\.3'"):
        resolve_layers(wrapper, "atures.3")


def test_a_glob_finds_a_wrapped_network_as_a_plain_name_does(tiny_cnn: nn.Module) -> None:
    wrapper = nn.Module()
    wrapper.model = tiny_cnn
    found = [name for name, _ in resolve_layers(wrapper, "features.*")]
    assert found == [f"model.features.{i}" for i in range(len(tiny_cnn.features))]
    assert [n for n, _ in resolve_layers(wrapper, "model.features.*")] == found  # full: as ever
    wrapper.twin = nn.Module()
    wrapper.twin.features = nn.Sequential(nn.Identity())
    with pytest.raises(ValueError, match=r"'features\.\*' is ambiguous.*'model\.features\.\*'"):
        resolve_layers(wrapper, "features.*")
    with pytest.raises(ValueError, match=r"No layer named 'blocks\.\*'"):
        resolve_layers(wrapper, "blocks.*")


def test_channels_last_outputs_are_permuted_where_the_input_says_so() -> None:
    nhwc = torch.randn(2, 4, 6, 96)  # a Swin stage on a 32x48 input: 4x6 cells, 96 channels
    grid = as_spatial("stage", nhwc, input_size=(32, 48))
    assert grid.shape == (2, 96, 4, 6)
    assert torch.equal(grid[1, 5, 3, 2], nhwc[1, 3, 2, 5])
    assert as_spatial("stage", nhwc).shape == (2, 4, 6, 96), "no input size: read as it comes"
    conv = torch.randn(2, 96, 4, 6)
    assert as_spatial("conv", conv, input_size=(32, 48)) is conv
    valid = torch.randn(2, 6, 28, 44)  # LeNet-style valid convolutions on 32x48
    assert as_spatial("conv", valid, input_size=(32, 48)) is valid


def test_a_shape_that_reads_both_ways_is_decided_by_the_module_or_refused() -> None:
    cube = torch.randn(2, 8, 8, 8)  # 8 channels on an 8x8 grid of a 32 px input, or the reverse
    conv = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8), nn.ReLU())
    assert as_spatial("conv", cube, input_size=(32, 32), module=conv) is cube
    norm = as_spatial("norm", cube, input_size=(32, 32), module=nn.LayerNorm(8))
    assert torch.equal(norm, cube.permute(0, 3, 1, 2))
    block = nn.Sequential(nn.Conv2d(8, 8, 1), nn.LayerNorm(8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"'block'.*\(2, 8, 8, 8\).*32x32.*reshape="):
        as_spatial("block", cube, input_size=(32, 32), module=block)


def test_tokens_follow_the_input_aspect() -> None:
    tokens = torch.randn(2, 1 + 4 * 6, 3)  # class token + patches of a 64x96 input
    grid = as_spatial("blocks", tokens, input_size=(64, 96))
    assert grid.shape == (2, 3, 4, 6)
    assert torch.equal(grid[0, 1, 2, 5], tokens[0, 1 + 2 * 6 + 5, 1])


def test_tokens_with_more_leading_tokens_than_a_class_token_ask_for_reshape() -> None:
    # A class token and 4 registers (DINOv2-style) before a 4x4 grid of a 64 px input: the 20
    # tokens after the class token fit a 4x5 grid within a cell, which would misplace them all.
    tokens = torch.randn(2, 1 + 4 + 16, 8)
    with pytest.raises(ValueError, match=r"\(2, 21, 8\).*reshape="):
        as_spatial("blocks.1", tokens, input_size=(64, 64))
    grid = as_spatial("blocks.1", tokens[:, 4:], input_size=(64, 64))  # registers dropped
    assert grid.shape == (2, 8, 4, 4)
    wide = as_spatial("blocks.1", torch.randn(2, 1 + 3 * 4, 8), input_size=(48, 64))
    assert wide.shape == (2, 8, 3, 4)
    nearly_square = as_spatial("blocks.1", torch.randn(2, 1 + 4 * 4, 8), input_size=(60, 64))
    assert nearly_square.shape == (2, 8, 4, 4)  # 60 / 16 rounds up
