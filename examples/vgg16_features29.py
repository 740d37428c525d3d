"""VGG16 with `CamMonitor(layer="features.29")`: the one-line use on a classic Grad-CAM model.

Trains torchvision's `vgg16(weights=None)` for a couple of epochs on synthetic shapes generated
in code (no downloads) and logs Grad-CAM overlays of the last conv block to TensorBoard:

    python examples/vgg16_features29.py            # then: tensorboard --logdir runs/vgg16
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import vgg16

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import MEAN, STD, class_names, make_shapes

from cam_monitor import CamMonitor


class VGGClassifier(pl.LightningModule):
    """torchvision VGG16 from scratch; `features.29` is the ReLU after the last conv layer."""

    def __init__(self, num_classes: int, lr: float = 0.01) -> None:
        super().__init__()
        self.model = vgg16(weights=None, num_classes=num_classes)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--log-dir", default="runs/vgg16")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    images, labels, _ = make_shapes(args.train_size, "source", size=args.size, seed=0)
    val_images, val_labels, val_masks = make_shapes(64, "source", size=args.size, seed=1)
    names = class_names()
    monitor = CamMonitor(
        layer="features.29",
        probe=(val_images[:16], val_labels[:16]),
        masks=val_masks[:16],
        mean=MEAN,
        std=STD,
        class_names=names,
    )
    logger = TensorBoardLogger(args.log_dir, name="", version="")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        log_every_n_steps=5,
    )
    start = time.perf_counter()
    trainer.fit(
        VGGClassifier(len(names)),
        DataLoader(TensorDataset(images, labels), batch_size=32, shuffle=True),
        DataLoader(TensorDataset(val_images, val_labels), batch_size=64),
    )
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.0f} s")
    print(f"grids and curves: tensorboard --logdir {logger.log_dir}")


if __name__ == "__main__":
    main()
