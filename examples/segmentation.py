"""Watch a segmentation model's attention under domain shift, with CamMonitor.

A small encoder-decoder learns to segment shapes (square, circle, triangle, plus) from labelled
*source* scenes (two shapes on a plain dark background) and is tested on *target* scenes (the
same shapes in other colours on a coloured, blotchy texture; see `shapes.make_scenes`). The
model returns ``{"out": logits}`` like torchvision's segmentation models. `CamMonitor` explains,
every epoch, each probe image's main labelled class over its labelled pixels
(``target="label"`` with label maps) at the automatic layer (the last features before the
classifier), logs the overlays with the class's IoU in the captions, drift, and localization
scores against the pixels of the class explained.

    python examples/segmentation.py --log-dir runs/segmentation
    tensorboard --logdir runs/segmentation
    cam-monitor show runs/segmentation/cam_monitor

Everything is generated in code; nothing is downloaded. See docs/segmentation.md for a run's
numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import MEAN, STD, make_scenes, scene_class_names

from cam_monitor import CamMonitor

IMAGE_SIZE = 48
VAL_SIZE = 128  # held-out scenes per domain for val/source_miou and val/target_miou
NUM_CLASSES = len(scene_class_names())
# Disjoint seed streams for the training pool, the validation sets and the probes.
_TRAIN, _VAL, _PROBE = 0, 1, 2


class TinySegmenter(nn.Module):
    """A backbone at 1/4 resolution, a classifier head, logits upsampled to the input: the
    layout of torchvision's FCN (``{"out": logits}``)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
            conv = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation)
            return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())

        self.backbone = nn.Sequential(
            block(3, width // 2),
            block(width // 2, width, stride=2),
            block(width, width, stride=2),
            block(width, width, dilation=2),
        )
        self.classifier = nn.Sequential(
            block(width, width), nn.Dropout(0.1), nn.Conv2d(width, num_classes, 1)
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        logits = self.classifier(self.backbone(x))
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear")}


def confusion(logits: Tensor, labels: Tensor, num_classes: int = NUM_CLASSES) -> Tensor:
    """The `[C, C]` confusion counts (rows: labelled class, columns: predicted)."""
    index = labels.flatten() * num_classes + logits.argmax(dim=1).flatten()
    return torch.bincount(index, minlength=num_classes**2).view(num_classes, num_classes)


def mean_iou(counts: Tensor) -> float:
    """Mean IoU over the classes present in the labels or the predictions."""
    inter = counts.diag().float()
    union = counts.sum(0).float() + counts.sum(1).float() - inter
    return float((inter[union > 0] / union[union > 0]).mean())


class SegmentationModule(pl.LightningModule):
    """Cross-entropy on source scenes; pixel accuracy and mean IoU on source and target."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.net = TinySegmenter()
        self.lr = lr
        self.counts: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x)["out"], y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(
        self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        x, y = batch
        domain = ("source", "target")[dataloader_idx]
        counts = confusion(self(x)["out"], y)
        self.counts[domain] = self.counts.get(domain, 0) + counts

    def on_validation_epoch_end(self) -> None:
        for domain, counts in self.counts.items():
            self.log(f"val/{domain}_miou", mean_iou(counts))
            self.log(f"val/{domain}_pixel_acc", float(counts.diag().sum() / counts.sum()))
        self.counts = {}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def build_monitor(num_probe: int, seed: int, save_dir: Path | None = None) -> CamMonitor:
    """CamMonitor on `num_probe` source and target scenes with their label maps."""
    probes = {
        domain: make_scenes(num_probe, domain, IMAGE_SIZE, seed=10 * seed + _PROBE)
        for domain in ("source", "target")
    }
    return CamMonitor(
        layer=None,  # the last features before the classifier
        methods=("gradcam",),
        probe=probes,
        target="label",  # each image's main labelled class, over its labelled pixels
        output_transform="out",
        class_names=scene_class_names(),
        mean=MEAN,
        std=STD,
        save_dir=save_dir,
    )


def build_loaders(
    train_size: int, batch_size: int, seed: int
) -> tuple[DataLoader, list[DataLoader]]:
    """Source scenes to train on; held-out source and target scenes to validate on."""
    train = TensorDataset(*make_scenes(train_size, "source", IMAGE_SIZE, seed=10 * seed + _TRAIN))
    val = [
        DataLoader(
            TensorDataset(*make_scenes(VAL_SIZE, domain, IMAGE_SIZE, seed=10 * seed + _VAL)),
            batch_size=64,
        )
        for domain in ("source", "target")
    ]
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(train, batch_size, shuffle=True, generator=generator), val


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="segmentation.py",
        description="A small segmentation model on synthetic scenes, with Grad-CAM monitoring.",
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-size", type=int, default=1024, help="source scenes to train on")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-probe", type=int, default=8, help="probe scenes per domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/segmentation"))
    args = parser.parse_args(argv)
    for name in ("epochs", "train_size", "batch_size", "num_probe"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train one run; returns its final scores, wall time and folders."""
    pl.seed_everything(args.seed, workers=True, verbose=False)
    module = SegmentationModule(args.lr)
    train_loader, val_loaders = build_loaders(args.train_size, args.batch_size, args.seed)
    monitor = build_monitor(args.num_probe, args.seed)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(args.log_dir, name="", version=""),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loaders)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {
        "metrics": metrics,
        "seconds": time.perf_counter() - start,
        "log_dir": args.log_dir,
        "monitor_dir": monitor.folder,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example from the command line; prints the scores and where the logs are."""
    result = train(parse_args(argv))
    metrics = result["metrics"]
    for domain in ("source", "target"):
        miou, acc = metrics[f"val/{domain}_miou"], metrics[f"val/{domain}_pixel_acc"]
        print(f"{domain}: mean IoU {miou:.3f}, pixel accuracy {acc:.3f}")
    for key, value in sorted(metrics.items()):
        if key.startswith("cam_loc/") and not key.endswith("_excluded"):
            print(f"{key}: {value:.3f}")
    print(f"{result['seconds']:.0f} s; logs: {result['log_dir']} ({result['monitor_dir']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
