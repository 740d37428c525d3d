from __future__ import annotations

import pytest
import torch
from torch import nn

from cam_monitor.batch import Batch
from cam_monitor.isolation import isolated


def test_mixed_training_flags_come_back_exactly(tiny_cnn: nn.Module) -> None:
    tiny_cnn.train()
    tiny_cnn.features[1].eval()
    before = [m.training for m in tiny_cnn.modules()]
    with isolated(tiny_cnn):
        assert not any(m.training for m in tiny_cnn.modules())
    assert [m.training for m in tiny_cnn.modules()] == before


def test_flags_come_back_after_an_exception(tiny_cnn: nn.Module) -> None:
    tiny_cnn.train()
    with pytest.raises(KeyError), isolated(tiny_cnn):
        raise KeyError("boom")
    assert all(m.training for m in tiny_cnn.modules())


def test_random_draws_inside_do_not_shift_the_stream(tiny_cnn: nn.Module) -> None:
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    with isolated(tiny_cnn):
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected)


def test_grad_is_enabled_under_no_grad_and_inference_mode(tiny_cnn: nn.Module) -> None:
    with torch.no_grad(), isolated(tiny_cnn):
        assert torch.is_grad_enabled()
    with torch.inference_mode():
        x = torch.ones(2)
        with isolated(tiny_cnn):
            y = Batch.of({"x": [x]}).usable().data["x"][0]
            assert not torch.is_inference_mode_enabled()
            assert not y.is_inference()
            assert torch.equal(y, torch.ones(2))


class FrozenNorm(nn.Module):
    """A block whose own `train()` keeps its BatchNorm in eval mode (a common fine-tuning
    idiom), and that counts the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(2)
        self.calls: list[bool] = []

    def train(self, mode: bool = True) -> FrozenNorm:
        self.calls.append(mode)
        super().train(mode)
        self.norm.eval()
        return self


class Watched(nn.Linear):
    """A module with its own `__setattr__`, which must see every write."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "training":
            self.__dict__.setdefault("writes", []).append(value)
        super().__setattr__(name, value)


def test_eval_mode_honours_a_custom_train_and_setattr_then_restores_every_flag() -> None:
    net = nn.Sequential(FrozenNorm(), Watched(2, 2), nn.Dropout())
    net.train()
    net[0].calls.clear()
    net[1].writes.clear()
    before = [m.training for m in net.modules()]
    assert before == [True, True, False, True, True]
    with isolated(net):
        assert not any(m.training for m in net.modules())
        assert net[0].calls == [False]  # its own train() ran, not a bypass
        assert net[1].writes == [False]
    assert [m.training for m in net.modules()] == before
    assert net[1].writes == [False, True]
