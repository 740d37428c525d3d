"""What the monitor reads from the Trainer and LightningModule, and writes into them, through
their public attributes: the val loaders at the start of training, `callback_metrics`, and
the module's `self.log` switched off while the probe runs."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..isolation import preserved_rng

if TYPE_CHECKING:
    import pytorch_lightning as pl


def val_dataloaders(trainer: pl.Trainer) -> Any:
    """The fit's val dataloaders, also where Lightning has not loaded them yet at the start of
    training (epoch 0 does not validate and there is no sanity check): then asked from their
    source (the datamodule, the module's hook or the loaders given to `fit`), leaving the
    random streams as they were and Lightning's own loading to Lightning."""
    if trainer.val_dataloaders is not None or not trainer.enable_validation:
        return trainer.val_dataloaders
    source = getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)
    if source is None:  # a Lightning without it: the train set, as before
        return None
    with preserved_rng():
        return source.dataloader()


def publish_metrics(trainer: pl.Trainer, scalars: Mapping[str, float]) -> None:
    """Every finite scalar the monitor logs into `trainer.callback_metrics` (Lightning keeps that
    dict between steps), so ModelCheckpoint and EarlyStopping can monitor it. An undefined one
    (NaN: every map of the probe set all zero or constant) keeps the last value there, since
    EarlyStopping stops the run on a non-finite value; the loggers and history get the NaN."""
    trainer.callback_metrics.update(
        {tag: torch.tensor(v) for tag, v in scalars.items() if math.isfinite(v)}
    )


@contextmanager
def logging_off(module: nn.Module) -> Iterator[None]:
    """`self.log` / `self.log_dict` calls do nothing inside the block: a model that logs from
    `forward` would otherwise log the probe's values in place of the training batch's, under
    the same names. Shadowed on the instance, and removed after."""
    names = [name for name in ("log", "log_dict") if callable(getattr(module, name, None))]
    found = {name: vars(module)[name] for name in names if name in vars(module)}
    for name in names:
        object.__setattr__(module, name, _ignore)
    try:
        yield
    finally:
        for name in names:
            if name in found:
                object.__setattr__(module, name, found[name])
            else:
                vars(module).pop(name, None)


def _ignore(*args: Any, **kwargs: Any) -> None:
    """Takes a `log` call and does nothing."""
