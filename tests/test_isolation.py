from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cam_monitor import compute_cams, isolation
from cam_monitor.batch import Batch
from cam_monitor.isolation import RawStates, isolated, preserved_rng


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


class Bookkeeping(nn.Module):
    """Updates its buffers in every forward whatever the mode, three ways: in place (a step
    counter, a running mean without BatchNorm), through `.data` (which the version counter
    misses), and by reassignment; draws from numpy's and Python's streams in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(8))
        self.register_buffer("peak", torch.zeros(8))
        self.register_buffer("last", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.steps += 1
            self.mean.mul_(0.9).add_(0.1 * x.mean(dim=(0, 2, 3)))
            self.peak.data = torch.maximum(self.peak, x.amax(dim=(0, 2, 3)))
            self.last = x.mean(dim=(0, 2, 3)).detach()
        jitter = float(np.random.rand()) + random.random()
        return x + 0 * jitter


def bookkeeping_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Bookkeeping(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5),
    )  # fmt: skip


def test_buffers_the_forward_updates_in_eval_mode_come_back_exactly() -> None:
    net = bookkeeping_net().train()
    net(torch.randn(4, 3, 16, 16))  # some history in the buffers
    before = {name: value.clone() for name, value in net.state_dict().items()}
    tensors = {name: value for name, value in net.state_dict(keep_vars=True).items()}
    versions = {name: value._version for name, value in tensors.items()}
    for call in range(3):  # the first call of a model, and the later ones
        compute_cams(net, torch.randn(2, 3, 16, 16), "4")
        after = net.state_dict(keep_vars=True)
        for name, value in before.items():
            assert torch.equal(after[name], value), (call, name)
            assert after[name] is tensors[name], (call, name)  # the user's own tensor objects
    # Nothing that the forward left alone was written to (a graph the user keeps may need it).
    unchanged = [n for n in tensors if not n.startswith("3.")]
    assert [tensors[n]._version for n in unchanged] == [versions[n] for n in unchanged]


def test_numpy_and_python_random_draws_inside_do_not_shift_their_streams() -> None:
    net = bookkeeping_net()
    np.random.seed(5)
    random.seed(5)
    expected = (np.random.rand(3), [random.random() for _ in range(3)])
    np.random.seed(5)
    random.seed(5)
    compute_cams(net, torch.randn(2, 3, 16, 16), "4")
    assert np.array_equal(np.random.rand(3), expected[0])
    assert [random.random() for _ in range(3)] == expected[1]


def full_streams() -> tuple[object, ...]:
    """Every part of numpy's and Python's global states, comparable with ==."""
    legacy = np.random.get_state()
    return (legacy[0], legacy[1].tolist(), *legacy[2:], random.getstate())


@pytest.mark.parametrize("raw", [True, False], ids=["bytes", "tuples"])
def test_preserved_rng_puts_back_cached_gaussians_reseeds_and_a_new_bit_generator(
    raw: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both ways of keeping the states: the bytes (where checked) and the tuples.
    if raw:
        assert RawStates.get() is not None, "the byte copy should pass its check on CPython"
    else:
        monkeypatch.setitem(isolation._RAW, "raw", None)
    for odd in (False, True):  # an odd number of Gaussians leaves one cached (has_gauss)
        np.random.seed(7)
        random.seed(7)
        np.random.standard_normal(3 if odd else 2)
        if odd:
            random.gauss()
        before = full_streams()
        with preserved_rng():
            np.random.standard_normal(1)  # uses the cached Gaussian only: the key stays
            random.gauss()
        assert full_streams() == before
        with preserved_rng():
            np.random.seed(1)
            random.seed(1)
            np.random.rand(1000)  # through a twist
        assert full_streams() == before
    with preserved_rng():
        np.random.set_bit_generator(np.random.MT19937(3))
        np.random.rand(5)
    assert full_streams() == before


class EmaInForward(nn.Module):
    """A student and an EMA teacher, the teacher updated in place in every forward (no
    `self.training` check): parameters the forward changes."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.teacher = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.teacher.requires_grad_(False)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
                t.mul_(0.5).add_(s, alpha=0.5)
        return self.head(torch.cat([self.student(x), self.teacher(x)], dim=1))


def test_parameters_the_forward_updates_are_named_then_restored() -> None:
    torch.manual_seed(0)
    net = EmaInForward()
    x = torch.randn(2, 3, 8, 8)
    first = {n: p.clone() for n, p in net.named_parameters()}
    with pytest.warns(UserWarning, match=r"teacher\.0\.weight.*self\.training") as caught:
        compute_cams(net, x, "student.0")
    assert "this change stays" in str(caught[0].message)
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, first[n])}
    assert changed == {"teacher.0.weight", "teacher.0.bias"}  # the first call: said so
    second = {n: p.clone() for n, p in net.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_cams(net, x, "student.0")  # from then on copied and put back, silently
    assert all(torch.equal(p, second[n]) for n, p in net.named_parameters())


def test_lazy_modules_initialised_inside_are_not_reported() -> None:
    net = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with isolated(net):
            net(torch.randn(1, 3, 8, 8))
    assert net[0].weight.shape == (4, 3, 3, 3)


class SparseMixing(nn.Module):
    """Mixes channels through a sparse adjacency buffer (as graph models keep theirs)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("adjacency", torch.eye(4).to_sparse())
        self.register_buffer("csr", torch.eye(4).to_sparse_csr())
        self.register_buffer("meta", torch.empty(3, device="meta"))  # no `equal` kernel for
        self.register_buffer("bits", torch.zeros(3, dtype=torch.uint8).view(torch.bits8))  # these

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        mixed = torch.sparse.mm(self.adjacency, x.permute(1, 0, 2, 3).reshape(c, -1))
        return mixed.reshape(c, b, h, w).permute(1, 0, 2, 3)


def test_a_model_with_sparse_meta_or_bit_buffers_is_explained() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), SparseMixing(), nn.Conv2d(4, 4, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )  # fmt: skip
    adjacency = net[2].adjacency
    for _ in range(2):
        result = compute_cams(net, torch.randn(2, 3, 8, 8), "3")
        assert result["3", "gradcam"].shape == (2, 6, 6)
    assert net[2].adjacency is adjacency
    # Under deterministic algorithms (Trainer(deterministic=True)) new memory is filled first,
    # which bit types cannot be: their buffer is then checked by its version only.
    again = nn.Sequential(*list(net)[:2], SparseMixing(), *list(net)[3:])
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert compute_cams(again, torch.randn(2, 3, 8, 8), "3")["3", "gradcam"].shape == (2, 6, 6)
    finally:
        torch.use_deterministic_algorithms(before)


def test_buffers_come_back_when_the_forward_raises_after_updating_them() -> None:
    net = bookkeeping_net()
    before = {name: value.clone() for name, value in net.state_dict().items()}
    for _ in range(2):  # the first block of a model, and a later one
        with pytest.raises(RuntimeError, match="late failure"), isolated(net):
            net(torch.randn(2, 3, 16, 16))
            raise RuntimeError("late failure")
        assert all(torch.equal(net.state_dict()[n], v) for n, v in before.items())
