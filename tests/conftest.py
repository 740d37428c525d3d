"""The tests' fixtures; what they share besides fixtures lives in helpers.py. One torch thread."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from tests.helpers import NAMESPACES, Lightning, TinyCNN

# The tensors here are tiny: torch's thread pool only adds contention, and on a shared two-core
# machine made fits 3-10x slower. One thread, here and in the subprocesses tests start, unless
# OMP_NUM_THREADS says otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=NAMESPACES)
def lightning(request: pytest.FixtureRequest) -> Lightning:
    """Each Lightning namespace in turn: tests taking it run against both Trainers."""
    return Lightning(request.param)


@pytest.fixture(autouse=True)
def _deterministic_mode_restored() -> Iterator[None]:
    """`Trainer(deterministic=True)` switches torch's deterministic algorithms on for the rest of
    the process: each test starts from the mode the session had, whatever ran before it."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)
