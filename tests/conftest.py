"""Tiny models shared by the tests: a few conv layers, 32-64 px inputs; one torch thread."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# The tensors here are tiny: torch's thread pool only adds contention, and on a shared two-core
# machine made fits 3-10x slower. One thread, here and in the subprocesses tests start, unless
# OMP_NUM_THREADS says otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


class TinyCNN(nn.Module):
    """Conv-BN-ReLU x2, global average pooling, a linear head: the CAM textbook shape."""

    def __init__(self, num_classes: int = 5, channels: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, stride=2),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.3)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(self.features(x)).flatten(1)))


class TwoHeadCNN(TinyCNN):
    """Returns (class_logits, domain_logits), like a DANN model."""

    def __init__(self) -> None:
        super().__init__()
        self.domain = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        z = self.pool(self.features(x)).flatten(1)
        return self.fc(z), self.domain(z)


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


class ClassifierSteps:
    """A TinyCNN trained with SGD; counts its training steps so tests can see what ran. Mixed
    into either namespace's LightningModule (`LitClassifier`, `Lightning.module`)."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = TinyCNN()
        self.lr = lr
        self.steps_run = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        self.steps_run += 1
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class LitClassifier(ClassifierSteps, pl.LightningModule):
    """`ClassifierSteps` on `pytorch_lightning`."""


def shapes_dataset(n: int = 48, size: int = 32, seed: int = 0) -> TensorDataset:
    """Noise images with a bright square whose position decides the class (5 classes)."""
    gen = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.randn(n, 3, size, size, generator=gen)
    labels = torch.arange(n) % 5
    half = size // 2
    corners = [(0, 0), (0, half), (half, 0), (half, half), (half // 2, half // 2)]
    for i in range(n):
        r, c = corners[int(labels[i])]
        images[i, :, r : r + half, c : c + half] += 1.5
    return TensorDataset(images, labels)


def quiet_trainer(**kwargs: object) -> pl.Trainer:
    """A CPU Trainer without progress bars, summaries or checkpoints unless asked."""
    return Lightning("pytorch_lightning").trainer(**kwargs)


class Lightning:
    """One Lightning namespace (`pytorch_lightning` or `lightning.pytorch`): the package, its
    loggers, callbacks and strategies, and tests' modules and Trainers built on it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pl: ModuleType = importlib.import_module(name)
        self.loggers = importlib.import_module(f"{name}.loggers")
        self.callbacks = importlib.import_module(f"{name}.callbacks")
        self.strategies = importlib.import_module(f"{name}.strategies")

    def __repr__(self) -> str:
        return self.name

    def module(self, steps: type = ClassifierSteps) -> type:
        """`steps` (a mixin such as `ClassifierSteps`) on this namespace's LightningModule."""
        return lightning_module(steps, self.name)

    def trainer(self, **kwargs: object) -> pl.Trainer:
        """A CPU Trainer without progress bars, summaries or checkpoints unless asked."""
        options: dict[str, object] = {
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "log_every_n_steps": 1,
            "max_epochs": 2,
        }
        options.update(kwargs)
        return self.pl.Trainer(**options)  # type: ignore[no-any-return]


@cache
def lightning_module(steps: type, namespace: str) -> type:
    base = importlib.import_module(namespace).LightningModule
    return type(steps.__name__, (steps, base), {"__module__": steps.__module__})


NAMESPACES = ["pytorch_lightning", "lightning.pytorch"]


@pytest.fixture(params=NAMESPACES)
def lightning(request: pytest.FixtureRequest) -> Lightning:
    """Each Lightning namespace in turn: tests taking it run against both Trainers."""
    return Lightning(request.param)


def loader(dataset: TensorDataset, shuffle: bool = False, batch_size: int = 16) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def wandb_records(path: Path) -> tuple[list[object], bool]:
    """Every record of an offline `.wandb` file (a LevelDB-style log of protobuf records), and
    whether the writer's final `exit` record is there yet."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, offset, pending, records = 32768, 7, b"", []
    while offset + 7 <= len(data):
        room = block - offset % block
        if room < 7:  # the tail of a block too small for a header is padding
            offset += room
            continue
        length = int.from_bytes(data[offset + 4 : offset + 6], "little")
        kind = data[offset + 6]
        if offset + 7 + length > len(data):  # a record still being written
            break
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            records.append(record)
    finished = any(r.WhichOneof("record_type") == "exit" for r in records)
    return records, finished


@pytest.fixture(autouse=True)
def _deterministic_mode_restored() -> Iterator[None]:
    """`Trainer(deterministic=True)` switches torch's deterministic algorithms on for the rest of
    the process: each test starts from the mode the session had, whatever ran before it."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)
