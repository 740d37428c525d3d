"""The automatic layer choice (`default_layer.first_spatial_layer`)."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

from cam_monitor.default_layer import first_spatial_layer


class Named(NamedTuple):
    pixels: torch.Tensor
    ids: torch.Tensor


def test_first_spatial_layer_takes_any_nested_batch_and_restores_the_model(
    tiny_cnn: nn.Module,
) -> None:
    x = torch.randn(2, 3, 32, 32)
    tiny_cnn.train()
    assert first_spatial_layer(tiny_cnn, x, None) == "features.5"
    as_dict = first_spatial_layer(tiny_cnn, {"x": x}, lambda model, batch: model(batch["x"]))
    as_tuple = first_spatial_layer(
        tiny_cnn, Named(x, torch.arange(2)), lambda model, batch: model(batch.pixels)
    )
    assert as_dict == as_tuple == "features.5"
    assert all(m.training for m in tiny_cnn.modules())
    assert all(not (m._forward_hooks or m._forward_pre_hooks) for m in tiny_cnn.modules())
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    assert first_spatial_layer(flat, x, None) == "1", "pooling layers are skipped"


def test_first_spatial_layer_skips_shared_modules_and_refuses_flat_models() -> None:
    shared = nn.Conv2d(3, 3, 3, padding=1)
    twice = nn.Sequential(nn.Conv2d(3, 3, 1), shared, shared, nn.Flatten())
    assert first_spatial_layer(twice, torch.randn(1, 3, 8, 8), None) == "0"
    with pytest.raises(ValueError, match=r"Linear has no layer with a spatial \[B, C, H, W\]"):
        first_spatial_layer(nn.Linear(3, 2), torch.randn(4, 3), None)
