"""The fit's batch-transfer hooks (`on_before_batch_transfer`, `transfer_batch_to_device`,
`on_after_batch_transfer`) and the probe: a probe the monitor collates goes through them once,
as a validation batch, leaving training bit-identical; an explicit probe is warned about."""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cam_monitor import CamMonitor
from cam_monitor.history import read_probe
from cam_monitor.probe import make_probe
from tests.helpers import ClassifierSteps, Lightning, fit, loader, shapes_dataset

Batch = tuple[torch.Tensor, torch.Tensor]


def normalised(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.25


class NormalisingSteps(ClassifierSteps):
    """Normalises every batch on the device (Lightning's pattern for device-side transforms) and
    adds noise to training batches only, checking `self.trainer.training` as Lightning's docs
    advise; counts its calls by stage."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {"training": 0, "validating": 0}

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        x, y = batch
        x = normalised(x)
        if self.trainer.training:
            self.calls["training"] += 1
            x = x + 0.1 * torch.randn_like(x)
        elif self.trainer.validating:
            self.calls["validating"] += 1
        return x, y


class DrawingSteps(NormalisingSteps):
    """Also draws from torch's, numpy's and Python's streams on every batch, whatever the
    stage, and in eval mode too (a random crop's offset, say)."""

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        torch.rand(())
        np.random.rand()
        random.random()
        return super().on_after_batch_transfer(batch, dataloader_idx)


def test_a_probe_from_the_loaders_is_the_batch_after_the_hooks(
    tmp_path: Path, lightning: Lightning
) -> None:
    val = shapes_dataset(16, seed=1)
    monitor = CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "h")
    model, _ = fit(monitor, tmp_path, lightning, model=lightning.module(NormalisingSteps),
                   val=val, max_epochs=1)  # fmt: skip
    raw = make_probe("val", loader(val), 4).inputs
    stored = read_probe(tmp_path / "h")
    assert stored is not None
    # normalised as the model sees it, without the training-only noise (a validation batch)
    np.testing.assert_array_equal(stored.inputs["val"], normalised(raw).numpy())
    assert torch.equal(monitor.run.probes["val"].inputs, normalised(raw))
    assert model.calls["validating"] >= 1  # the probe's pass, as a validation batch


def test_a_hook_that_draws_leaves_training_bit_identical(
    tmp_path: Path, lightning: Lightning
) -> None:
    def run(callbacks: list[Any], root: Path) -> tuple[Any, Any, tuple[Any, ...]]:
        model, trainer = fit(callbacks, root, lightning, model=lightning.module(DrawingSteps),
                             val=False, max_epochs=2)  # fmt: skip
        streams = (torch.get_rng_state(), np.random.get_state()[1].tolist(), random.getstate())
        return model, trainer, streams

    monitor = CamMonitor("net.features.5", num_probe=4, every_n_steps=1, save_dir=tmp_path / "h")
    plain, plain_trainer, plain_streams = run([], tmp_path / "plain")
    watched, watched_trainer, watched_streams = run([monitor], tmp_path / "watched")
    assert watched.calls["validating"] == plain.calls["validating"] + 1  # the probe, once
    assert watched.calls["training"] == plain.calls["training"] == 6
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # weights and BatchNorm buffers
    assert torch.equal(plain_streams[0], watched_streams[0])
    assert plain_streams[1:] == watched_streams[1:]
    assert watched.training and all(m.training for m in watched.modules())
    assert watched_trainer.state.stage == plain_trainer.state.stage


class AttributeHookSteps(ClassifierSteps):
    """Its hook is a function set as an attribute (no `__self__`), which Lightning calls too."""

    def __init__(self) -> None:
        super().__init__()
        self.on_after_batch_transfer = lambda batch, dataloader_idx: (
            normalised(batch[0]),
            batch[1],
        )


@pytest.mark.parametrize("steps", [NormalisingSteps, AttributeHookSteps])
def test_an_explicit_probe_on_a_module_with_hooks_warns_that_it_is_fed_as_given(
    tmp_path: Path, lightning: Lightning, steps: type
) -> None:
    images, labels = shapes_dataset(4, seed=2).tensors
    monitor = CamMonitor("net.features.5", probe=(images, labels), save_dir=tmp_path / "h")
    with pytest.warns(UserWarning, match="on_after_batch_transfer") as caught:
        fit(monitor, tmp_path, lightning, model=lightning.module(steps), max_epochs=1)
    message = next(str(w.message) for w in caught if "batch_transfer" in str(w.message))
    # named by the module it belongs to, also where it is a function set as an attribute
    assert f"{steps.__name__}.on_after_batch_transfer" in message and "probe 'probe'" in message
    assert "as the model sees it after the hooks" in message and "probe=None" in message
    assert torch.equal(monitor.run.probes["probe"].inputs, images)  # as given, untransformed
    plain = CamMonitor("net.features.5", probe=(images, labels), save_dir=tmp_path / "p")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fit(plain, tmp_path / "p", lightning, max_epochs=1)
    assert not any("batch_transfer" in str(w.message) for w in records)


def test_a_datamodules_hook_is_the_one_the_probe_goes_through(
    tmp_path: Path, lightning: Lightning
) -> None:
    train, val = shapes_dataset(), shapes_dataset(16, seed=1)

    class Shapes(lightning.pl.LightningDataModule):  # type: ignore[name-defined, misc]
        def train_dataloader(self) -> Any:
            return loader(train, shuffle=True)

        def val_dataloader(self) -> Any:
            return loader(val)

        def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
            return normalised(batch[0]), batch[1]

    monitor = CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "h")
    trainer = lightning.trainer(callbacks=[monitor], default_root_dir=tmp_path, logger=False,
                                max_epochs=1)  # fmt: skip
    trainer.fit(lightning.module()(), datamodule=Shapes())
    stored = read_probe(tmp_path / "h")
    assert stored is not None
    raw = make_probe("val", loader(val), 4).inputs
    np.testing.assert_array_equal(stored.inputs["val"], normalised(raw).numpy())
