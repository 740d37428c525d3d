from __future__ import annotations

import pytest
import torch
from torch import nn

from cam_monitor.capture import LayerCaptureError, capture_outputs


def hook_state(model: nn.Module) -> list[tuple[str, list[int], list[int], list[int]]]:
    return [
        (name, list(m._forward_hooks), list(m._forward_pre_hooks), list(m._backward_hooks))
        for name, m in model.named_modules()
    ]


def test_records_outputs_and_removes_hooks(tiny_cnn: nn.Module, images: torch.Tensor) -> None:
    tiny_cnn.features[0].register_forward_hook(lambda *a: None)  # the user's own hook stays
    before = hook_state(tiny_cnn)
    with capture_outputs({"features.3": tiny_cnn.features[3]}) as outs:
        tiny_cnn(images)
    assert outs["features.3"].shape == (4, 8, 16, 16)
    assert outs["features.3"].requires_grad
    assert hook_state(tiny_cnn) == before


def test_hooks_removed_when_the_forward_raises(tiny_cnn: nn.Module) -> None:
    before = hook_state(tiny_cnn)
    with pytest.raises(RuntimeError), capture_outputs({"features.0": tiny_cnn.features[0]}):
        tiny_cnn(torch.randn(2, 4, 32, 32))  # wrong channel count raises inside conv
    assert hook_state(tiny_cnn) == before


def test_inplace_op_after_the_layer_does_not_touch_the_record() -> None:
    conv = nn.Conv2d(3, 4, 3)
    net = nn.Sequential(conv, nn.ReLU(inplace=True))
    x = torch.randn(2, 3, 8, 8)
    with capture_outputs({"0": conv}) as outs:
        y = net(x)
    assert (outs["0"] < 0).any(), "the recorded conv output must keep its negative values"
    assert torch.equal(torch.relu(outs["0"]), y)


def test_frozen_layer_output_becomes_a_grad_leaf() -> None:
    conv = nn.Conv2d(3, 4, 3).requires_grad_(False)
    net = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(2))
    with capture_outputs({"0": conv}) as outs:
        score = net(torch.randn(1, 3, 6, 6)).sum()
    (grad,) = torch.autograd.grad(score, [outs["0"]])
    assert grad.shape == (1, 4, 4, 4)


def test_a_layer_used_twice_is_an_error() -> None:
    shared = nn.Conv2d(3, 3, 1)
    net = nn.Sequential(shared, shared)
    with pytest.raises(LayerCaptureError, match="more than once"):
        with capture_outputs({"0": shared}):
            net(torch.randn(1, 3, 4, 4))
    assert not shared._forward_hooks


def test_a_layer_returning_a_tuple_is_an_error() -> None:
    lstm = nn.LSTM(4, 4, batch_first=True)
    with pytest.raises(LayerCaptureError, match="returned tuple"):
        with capture_outputs({"lstm": lstm}):
            lstm(torch.randn(1, 3, 4))
    assert not lstm._forward_hooks
