"""What the tests share (pytest fixtures live in conftest.py): tiny models, synthetic shapes, one
real `Trainer.fit`, one history writer and one TensorBoard event reader."""

from __future__ import annotations

import importlib
import json
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cam_monitor.history import Evaluation, write_evaluation, write_probe

# -- tiny models ----------------------------------------------------------------------------------


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


# -- synthetic shapes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    """How a domain draws its images: background level, noise scale, brightness of the shape."""

    background: float
    noise: float
    fill: float


# "target" draws the shapes darker on a brighter, noisier background: the domain shift a DANN
# run is meant to bridge.
DOMAINS = {"source": Domain(0.0, 0.3, 1.5), "target": Domain(0.4, 0.5, 0.8)}
PLACES = 5  # classes of `shapes(classes="place")`: four quadrants and the centre
KINDS = ("square", "disc", "diamond")  # classes of `shapes(classes="kind")`


def shapes(
    n: int, seed: int = 0, domain: str = "source", *, size: int = 32, classes: str = "place"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` noise images with one bright shape each: images [n, 3, size, size], labels [n] and the
    shapes' masks [n, size, size]. ``classes="place"``: a square of half the side whose place
    (4 quadrants, the centre) is the class; ``"kind"``: a square, disc or diamond (the class) of
    random size at a random place. Deterministic per seed, the global RNG untouched."""
    gen = torch.Generator().manual_seed(seed)
    if classes == "place":
        labels = torch.arange(n) % PLACES
        masks = _placed_squares(labels, size)
    elif classes == "kind":
        labels = torch.arange(n) % len(KINDS)
        masks = _random_kinds(labels, size, gen)
    else:
        raise ValueError(f"classes can be 'place' or 'kind', got {classes!r}")
    look = DOMAINS[domain]
    images = look.background + look.noise * torch.randn(n, 3, size, size, generator=gen)
    return images + look.fill * masks[:, None].float(), labels, masks


def _placed_squares(labels: torch.Tensor, size: int) -> torch.Tensor:
    half = size // 2
    corners = [(0, 0), (0, half), (half, 0), (half, half), (half // 2, half // 2)]
    masks = torch.zeros(len(labels), size, size, dtype=torch.bool)
    for i, label in enumerate(labels.tolist()):
        r, c = corners[label]
        masks[i, r : r + half, c : c + half] = True
    return masks


def _random_kinds(labels: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(len(labels), size, size, dtype=torch.bool)
    for i, label in enumerate(labels.tolist()):
        radius = int(torch.randint(5, 9, (1,), generator=gen))
        r, c = (int(v) for v in torch.randint(radius, size - radius, (2,), generator=gen))
        dr, dc = (rows - r).abs(), (cols - c).abs()
        if KINDS[label] == "square":
            masks[i] = (dr <= radius) & (dc <= radius)
        elif KINDS[label] == "disc":
            masks[i] = dr**2 + dc**2 <= radius**2
        else:
            masks[i] = dr + dc <= radius
    return masks


def shapes_dataset(n: int = 48, size: int = 32, seed: int = 0) -> TensorDataset:
    """`shapes` of the source domain as a dataset of (image, label): 5 classes by place."""
    images, labels, _ = shapes(n, seed, size=size)
    return TensorDataset(images, labels)


def loader(dataset: Dataset, shuffle: bool = False, batch_size: int = 16) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


# -- Lightning: either namespace, one real fit ---------------------------------------------------


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


def quiet_trainer(**kwargs: object) -> pl.Trainer:
    """A CPU Trainer without progress bars, summaries or checkpoints unless asked."""
    return Lightning("pytorch_lightning").trainer(**kwargs)


class Fitted(NamedTuple):
    model: Any  # a LightningModule of either namespace
    trainer: Any


def fit(
    callbacks: object | Sequence[object] | None,
    root: Path,
    lightning: Lightning | None = None,
    *,
    model: Any = None,
    train: Dataset | DataLoader | None = None,
    val: Dataset | DataLoader | bool = True,
    seed: int | None = 0,
    **trainer_options: Any,
) -> Fitted:
    """One real `Trainer.fit` on `lightning`'s namespace (default `pytorch_lightning`).

    Seeds everything with `seed` (None: not at all), then builds `model` where it is a class or
    a factory (default: `ClassifierSteps` on that namespace); an instance is used as it is.
    Trains on `train` (default: 48 shapes, shuffled) and validates on `val` (True: 16 other
    shapes; False: no validation); a dataset is batched by 16, a DataLoader used as it is.
    `callbacks` is one callback, a list or None; `trainer_options` go to `Lightning.trainer`,
    with `default_root_dir=root` and `logger=False` unless given.
    """
    lightning = lightning or Lightning("pytorch_lightning")
    if seed is not None:
        lightning.pl.seed_everything(seed, verbose=False)
    if model is None:
        model = lightning.module()
    if not isinstance(model, nn.Module):
        model = model()
    if callbacks is None:
        callbacks = []
    elif not isinstance(callbacks, (list, tuple)):
        callbacks = [callbacks]
    if train is None:
        train = shapes_dataset()
    if not isinstance(train, DataLoader):
        train = loader(train, shuffle=True)
    if val is True:
        val = shapes_dataset(16, seed=1)
    if val is False:
        val = None
    elif not isinstance(val, DataLoader):
        val = loader(val)
    options: dict[str, Any] = {"default_root_dir": root, "logger": False}
    options.update(trainer_options)
    trainer = lightning.trainer(callbacks=list(callbacks), **options)
    trainer.fit(model, train, val)
    return Fitted(model, trainer)


# -- what a run wrote -----------------------------------------------------------------------------

# Every image, scalar and tensor kept (0 = no limit): TensorBoard samples them down otherwise.
KEEP_ALL = {"images": 0, "scalars": 0, "tensors": 0}


def read_events(path: str | Path, *, newest: bool = False) -> EventAccumulator:
    """TensorBoard's own reader, loaded, over an event file or a log folder (every event file in
    it, as TensorBoard reads a run; ``newest=True``: the newest file alone)."""
    path = Path(path)
    if newest:
        files = sorted(path.glob("events.out.tfevents.*"))
        assert files, f"no event file in {path}"
        path = files[-1]
    events = EventAccumulator(str(path), size_guidance=KEEP_ALL)
    events.Reload()
    return events


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


def wandb_run_records(run_dir: Path, timeout: float = 60) -> tuple[list[Any], bool]:
    """The records of the offline W&B run whose files are in `run_dir` (`experiment.dir`), read
    again until its `exit` record is there (wandb's writer may still be flushing after
    `wandb.finish()`) or `timeout` seconds have passed; and whether it is."""
    record_log = next(Path(run_dir).parent.glob("run-*.wandb"))
    deadline = time.monotonic() + timeout
    records, finished = wandb_records(record_log)
    while not finished and time.monotonic() < deadline:
        time.sleep(0.5)
        records, finished = wandb_records(record_log)
    return records, finished


def wandb_items(items: Iterable[Any]) -> dict[str, object]:
    """A W&B history row or summary update as {key: value}."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


# -- histories written by hand ---------------------------------------------------------------------


def evaluation(
    index: int,
    epoch: int,
    maps: dict[Any, np.ndarray] | None = None,
    *,
    step: int | None = None,
    hashes: dict[str, str] | None = None,
    classes: int = 2,
    **fields: Any,
) -> Evaluation:
    """An `Evaluation` of `maps` (keyed by `MapKey` or (probe, layer, method)), the rest filled
    in: step 10 x index, hash "a" x 12 for each probe, targets 0 and logits 0 over `classes`.
    `fields` (targets, logits, labels, scalars, final, ...) replace or add any other field."""
    maps = maps or {}
    probes = {key[0]: array.shape[0] for key, array in maps.items()}
    filled: dict[str, Any] = {
        "targets": {p: np.zeros(n, np.int64) for p, n in probes.items()},
        "logits": {p: np.zeros((n, classes), np.float32) for p, n in probes.items()},
    }
    filled.update(fields)
    return Evaluation(
        index=index,
        epoch=epoch,
        step=10 * index if step is None else step,
        probe_hashes=hashes if hashes is not None else {p: "a" * 12 for p in probes},
        maps=maps,
        **filled,
    )


def write_history(
    folder: Path,
    evaluations: Iterable[Evaluation],
    probe: tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, str]] | None = None,
) -> Path:
    """Writes `evaluations` to the history `folder`, then its probe file where `probe` is given
    as (inputs, labels, masks, hashes); returns `folder`."""
    for each in evaluations:
        write_evaluation(folder, each)
    if probe is not None:
        write_probe(folder, *probe)
    return folder


# -- counting what a GPU would launch -------------------------------------------------------------


class DispatchedOps(TorchDispatchMode):
    """Counts the ATen ops run inside the block (on this thread): on a GPU most are a kernel
    launch each, so a count that grows with the images or the maps is a per-item loop."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.names: Counter[str] = Counter()  # by op, e.g. "sort" for aten.sort.default

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        self.count += 1
        self.names[func._opname] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(run: Any) -> int:
    """How many ATen ops `run()` dispatches."""
    with DispatchedOps() as ops:
        run()
    return ops.count


@contextmanager
def catch_warnings_entries() -> Iterator[list[str]]:
    """Inside the block, `warnings.catch_warnings` is itself with its entries recorded (the name
    of each thread that entered it): code that swaps the process-wide warning filters, which
    other threads share, shows up there."""
    entered: list[str] = []
    real = warnings.catch_warnings

    class Watched(real):  # type: ignore[valid-type, misc]
        def __enter__(self) -> Any:
            entered.append(threading.current_thread().name)
            return super().__enter__()

    warnings.catch_warnings = Watched  # type: ignore[misc]
    try:
        yield entered
    finally:
        warnings.catch_warnings = real  # type: ignore[misc]
