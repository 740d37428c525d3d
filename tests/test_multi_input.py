"""Integration: a model of two inputs (`forward(self, image, meta)`) fed dict batches
`{"image", "meta", "label"}`, monitored in a real fit of each Lightning namespace (issue 26)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cam_monitor import CamMonitor
from cam_monitor.history import find_history, read_history
from tests.helpers import Lightning, fit, read_events, shapes

METHODS = ["gradcam", "integrated_gradients", "smoothgrad"]


class ImageAndMeta(Dataset):
    """The shapes with a 4-number side input per image: items are dicts, as many loaders give."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.images, self.labels, _ = shapes(n, seed)
        self.meta = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed + 100))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "meta": self.meta[i], "label": self.labels[i]}


class TwoInputSteps:
    """A CNN whose class scores also read a side vector; it keeps every `meta` and image it is
    called with, so a test can see what the monitor fed it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.meta_head = nn.Linear(4, 5)
        self.fc = nn.Linear(8, 5)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        self.seen.append((image.detach().clone(), meta.detach().clone()))
        pooled = self.features(image).mean(dim=(2, 3))
        return self.fc(pooled) + self.meta_head(meta)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"], batch["meta"])
        return nn.functional.cross_entropy(logits, batch["label"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self(batch["image"], batch["meta"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def image_and_meta(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`forward=`: the whole batch in, both inputs to the model (module level: it pickles)."""
    return module(batch["image"], batch["meta"])


def rows_of(seen: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """For each row of `seen`, whether it is exactly one of the rows of `known`."""
    return (seen.flatten(1)[:, None] == known.flatten(1)[None]).all(dim=2).any(dim=1)


def monitored_fit(lightning: Lightning, root: Path, probe: Any) -> Any:
    monitor = CamMonitor(
        "features.2", methods=METHODS, probe=probe, forward=image_and_meta, num_probe=6,
        batch_size=4, smooth=2, ig_steps=16, save_dir=root / "history",
    )  # fmt: skip
    logger = lightning.loggers.TensorBoardLogger(root, name="tb")
    fitted = fit(
        monitor, root, lightning, model=lightning.module(TwoInputSteps), logger=logger,
        train=DataLoader(ImageAndMeta(24), batch_size=8), val=DataLoader(ImageAndMeta(12, 1),
        batch_size=6), max_epochs=1,
    )  # fmt: skip
    return fitted


@pytest.mark.parametrize("given", [False, True], ids=["probe=None", "dict-probe"])
def test_a_two_input_model_is_monitored_with_pixel_methods_perturbing_only_the_image(
    lightning: Lightning, tmp_path: Path, given: bool
) -> None:
    val = ImageAndMeta(12, 1)
    probe = None
    if given:  # an explicit dict batch: every key reaches forward=
        probe = {"image": val.images[:6], "meta": val.meta[:6], "label": val.labels[:6]}
    model, trainer = monitored_fit(lightning, tmp_path, probe)

    # Every grid is logged, at the baseline and the end of the epoch.
    events = read_events(trainer.logger.log_dir)
    name = "val" if probe is None else "probe"
    for method in METHODS:
        layer = "features.2" if method == "gradcam" else "input"
        assert len(events.Images(f"cam/{name}/{layer}/{method}")) == 2
    # The maps explain something: none is all zero.
    evaluations = read_history(find_history(tmp_path / "history"))
    assert len(evaluations) == 2
    for maps in evaluations[-1].maps.values():
        assert maps.shape[0] == 6 and (maps.reshape(6, -1).max(axis=1) > 0).all()
    # The probe drawn from the loader kept every key: every `meta` the model saw is rows of the
    # data, never perturbed (also in SmoothGrad's and IG's passes), while some images are new.
    known_meta = torch.cat([ImageAndMeta(24).meta, val.meta])
    known_images = torch.cat([ImageAndMeta(24).images, val.images])
    images = torch.cat([x for x, _ in model.seen])
    metas = torch.cat([m for _, m in model.seen])
    assert rows_of(metas, known_meta).all()
    assert not rows_of(images, known_images).all()  # noisy and interpolated images were fed
    picked = [0, 2, 4, 7, 9, 11] if probe is None else list(range(6))  # num_probe=6 of 12
    chunk = val.meta[picked][:4]  # batch_size=4: the first chunk of the probe, with its meta
    assert any(torch.equal(m, chunk) for _, m in model.seen)


def test_a_nested_tuple_probe_reaches_forward_as_the_inputs(tmp_path: Path) -> None:
    """`probe=((x, meta), y)`: the inputs `(x, meta)` go to `forward=`, labels stay labels."""
    val = ImageAndMeta(6)
    seen: list[Any] = []

    def both(module: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seen.append(inputs)
        return module(*inputs)

    monitor = CamMonitor(
        "features.2", probe=((val.images, val.meta), val.labels), forward=both,
        target="label", save_dir=tmp_path / "h",
    )  # fmt: skip
    lightning = Lightning("pytorch_lightning")
    fit(
        monitor, tmp_path, lightning, model=lightning.module(TwoInputSteps),
        train=DataLoader(ImageAndMeta(8), batch_size=8), val=False, max_epochs=1,
    )  # fmt: skip
    assert seen and all(isinstance(inputs, tuple) and len(inputs) == 2 for inputs in seen)
    assert torch.equal(seen[0][1], val.meta)
    assert read_history(find_history(tmp_path / "h"))[0].labels["probe"].tolist() == (
        val.labels.tolist()
    )


def test_a_two_input_model_without_forward_fails_before_training_naming_the_fix(
    tmp_path: Path,
) -> None:
    lightning = Lightning("pytorch_lightning")
    model = lightning.module(TwoInputSteps)()
    with pytest.raises(ValueError, match=r"'meta'.*forward= receives it whole") as raised:
        fit(
            CamMonitor(num_probe=4, save_dir=tmp_path / "h"), tmp_path, lightning, model=model,
            train=DataLoader(ImageAndMeta(8), batch_size=8), val=False, max_epochs=1,
        )  # fmt: skip
    assert "missing 1 required positional argument" in str(raised.value)
