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


def test_graph_from_first_keeps_nothing_upstream_and_the_same_gradients() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.Flatten(),
        nn.LazyLinear(2),
    )
    x = torch.randn(2, 3, 10, 10)
    layers = {"2": net[2], "4": net[4]}
    grads, stem = {}, {}
    for prune in (False, True):
        with capture_outputs(layers, graph_from_first=prune) as outs:
            score = net(x)[:, 1].sum()
        assert torch.is_grad_enabled(), "the caller's grad mode is restored"
        *grads[prune], stem[prune] = torch.autograd.grad(
            score, [outs["2"], outs["4"], net[0].weight], allow_unused=True
        )
        assert (outs["2"].grad_fn is None) == prune, "pruned: the graph starts at layer 2"
    assert stem[False] is not None and stem[True] is None, "pruned: no path back to the stem"
    for full, pruned in zip(grads[False], grads[True], strict=True):
        assert torch.equal(full, pruned)


def test_graph_from_first_restores_no_grad_of_the_caller() -> None:
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad(), capture_outputs({"0": conv}, graph_from_first=True) as outs:
        conv(torch.randn(1, 3, 2, 2))
        assert torch.is_grad_enabled()  # switched on by the hook for the rest of the forward
    assert outs["0"].requires_grad
    assert torch.is_grad_enabled()  # outside both blocks
    with torch.no_grad():
        with capture_outputs({"0": conv}, graph_from_first=True):
            conv(torch.randn(1, 3, 2, 2))
        assert not torch.is_grad_enabled()
