from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from cam_monitor import compute_cams, filter_activations
from cam_monitor.attribution import ruled_relus
from cam_monitor.capture import (
    LayerCaptureError,
    capture_outputs,
    scoped_hooks,
    users_hooks,
    users_hooks_warning,
)
from cam_monitor.default_layer import first_spatial_layer


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


def all_hook_dicts(model: nn.Module) -> list[tuple[str, str, list[tuple[int, object]]]]:
    """Every hook dictionary of every module, with the hooks themselves (compared by identity)."""
    return [
        (name, attr, list(value.items()))
        for name, module in model.named_modules()
        for attr, value in sorted(vars(module).items())
        if "hooks" in attr and isinstance(value, dict)
    ]


def _forward(failing: bool, reach: str) -> Any:
    """A forward that runs the model, or runs `reach` (a path into TinyCNN) and raises."""

    def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if failing:
            model.get_submodule(reach)(x) if reach != "" else model(x)
            raise RuntimeError("forward broke")
        return model(x)

    return forward


def _capture_site(model: nn.Module, x: torch.Tensor, failing: bool) -> None:
    with capture_outputs({"features.3": model.features[3], "fc": model.fc}):
        _forward(failing, "")(model, x)


def _record_inputs_site(model: nn.Module, x: torch.Tensor, failing: bool) -> None:
    compute_cams(model, x, "features.5", "cam", forward=_forward(failing, ""))


def _guided_relus_site(model: nn.Module, x: torch.Tensor, failing: bool) -> None:
    with ruled_relus(model, "guided"):
        _forward(failing, "")(model, x)


def _filter_site(model: nn.Module, x: torch.Tensor, failing: bool) -> None:
    filter_activations(model, x, "features.3", [0, 1], forward=_forward(failing, "features.0"))


def _first_spatial_site(model: nn.Module, x: torch.Tensor, failing: bool) -> None:
    assert first_spatial_layer(model, x, _forward(failing, "")) == "features.5"


HOOK_SITES = {
    "capture_outputs": _capture_site,
    "engine._record_inputs": _record_inputs_site,
    "attribution.ruled_relus": _guided_relus_site,
    "channels._layer_output": _filter_site,
    "default_layer.first_spatial_layer": _first_spatial_site,
}


@pytest.mark.parametrize("failing", [False, True], ids=["success", "exception"])
@pytest.mark.parametrize("site", list(HOOK_SITES))
def test_every_hook_site_leaves_exactly_the_hooks_it_found(
    tiny_cnn: nn.Module, images: torch.Tensor, site: str, failing: bool
) -> None:
    # The user's own hooks on modules every site hooks too: they must stay, and stay alone.
    tiny_cnn.features[3].register_forward_hook(lambda *a: None)
    tiny_cnn.features[2].register_forward_pre_hook(lambda *a: None)
    tiny_cnn.fc.register_forward_pre_hook(lambda *a: None)
    before = all_hook_dicts(tiny_cnn)
    assert sum(len(hooks) for *_, hooks in before) == 3
    if failing:
        with pytest.raises(RuntimeError, match="forward broke"):
            HOOK_SITES[site](tiny_cnn, images, True)
    else:
        HOOK_SITES[site](tiny_cnn, images, False)
    assert all_hook_dicts(tiny_cnn) == before


def test_scoped_hooks_removes_what_it_registered_when_registration_fails() -> None:
    conv, relu = nn.Conv2d(3, 3, 1), nn.ReLU()
    with pytest.raises(ValueError, match="hook kind must be"):
        with scoped_hooks([(conv, "forward", print), (relu, "backward", print)]):  # type: ignore[list-item]
            pass
    assert not conv._forward_hooks and not relu._forward_hooks


def test_scoped_hooks_removal_is_idempotent() -> None:
    conv = nn.Conv2d(3, 3, 1)
    with scoped_hooks([(conv, "forward", print), (conv, "forward_pre", print)]) as handles:
        assert len(conv._forward_hooks) == len(conv._forward_pre_hooks) == 1
        handles[0].remove()  # removed early by its owner: the exit must not mind
        assert not conv._forward_hooks
    assert not conv._forward_hooks and not conv._forward_pre_hooks


def test_one_error_type_for_a_layer_that_cannot_be_captured(
    tiny_cnn: nn.Module, images: torch.Tensor
) -> None:
    recurrent = nn.Sequential(nn.LSTM(4, 4, batch_first=True))
    with pytest.raises(LayerCaptureError, match="'0' returned tuple, not a tensor"):
        filter_activations(recurrent, torch.randn(1, 3, 4), "0", 0)
    with pytest.raises(LayerCaptureError, match="'0' returned tuple, not a tensor"):
        compute_cams(recurrent, torch.randn(1, 3, 4), "0", forward=lambda m, x: m(x)[0])
    tiny_cnn.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(LayerCaptureError, match=r"\['unused'\] did not run"):
        filter_activations(tiny_cnn, images, "unused", 0)
    with pytest.raises(LayerCaptureError, match=r"\['unused'\] did not run"):
        compute_cams(tiny_cnn, images, "unused")
    assert issubclass(LayerCaptureError, ValueError)


def test_users_hooks_lists_the_users_hooks_not_torchs() -> None:
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    quantized = nn.Sequential(nn.Conv2d(3, 3, 1))
    quantized.qconfig = tq.get_default_qat_qconfig("fbgemm")
    quantized = tq.prepare_qat(quantized.train())  # observer hooks
    net = nn.Sequential(quantized, nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    nn.utils.spectral_norm(net[1])  # torch's pre-hooks: how the model computes
    nn.utils.prune.l1_unstructured(net[4], "weight", 0.2)
    assert users_hooks(net) == []
    assert users_hooks_warning(net) is None
    net[2].register_forward_hook(lambda module, args, output: None)
    net[4].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    handle = nn.modules.module.register_module_forward_pre_hook(lambda module, args: None)
    try:
        found = users_hooks(net)
    finally:
        handle.remove()
    assert found == [
        "'2' (forward hook)", "'4' (backward hook)", "every module (global forward pre-hook)",
    ]  # fmt: skip
    assert "not module.training" in str(users_hooks_warning(net))


def test_a_pre_hook_with_kwargs_sees_inputs_passed_by_keyword() -> None:
    attention = nn.MultiheadAttention(4, 1, batch_first=True)
    tokens, seen = torch.randn(1, 3, 4), []
    hook = (attention, "forward_pre_kwargs", lambda m, args, kwargs: seen.append(kwargs["query"]))
    with scoped_hooks([hook]):
        attention(query=tokens, key=tokens, value=tokens)
    assert seen == [tokens] and seen[0] is tokens
    assert not attention._forward_pre_hooks and not attention._forward_pre_hooks_with_kwargs
