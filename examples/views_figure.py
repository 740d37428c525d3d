"""The views figure of docs/methods.md: guided backprop and deconvnet, whole / positive / negative.

Trains a small ReLU CNN on synthetic shapes with a `CamMonitor` logging to TensorBoard, reads
the last evaluation's grids back from the event file with TensorBoard's `EventAccumulator`, and
stacks them, labelled, into one PNG:

    python examples/views_figure.py                # writes docs/deconvnet_views.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import MEAN, STD, class_names, make_shapes

from cam_monitor import CamMonitor

ROWS = (
    ("gradcam", "features.10", "Grad-CAM, last ReLU"),
    ("guided_backprop", "input", "guided backprop"),
    ("guided_backprop_pos", "input", "guided, positive"),
    ("guided_backprop_neg", "input", "guided, negative"),
    ("deconvnet", "input", "deconvnet"),
    ("deconvnet_pos", "input", "deconvnet, positive"),
    ("deconvnet_neg", "input", "deconvnet, negative"),
)


class ShapesNet(pl.LightningModule):
    """Three conv-ReLU-pool blocks (in-place ReLUs), global average pooling, a linear head."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate([(3, 16), (16, 32), (32, 64)], start=1):  # 11 modules
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out)]
            blocks += [nn.ReLU(inplace=True)] + ([nn.MaxPool2d(2)] if index < 3 else [])
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(64, len(class_names()))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def read_grids(log_dir: Path) -> dict[str, np.ndarray]:
    """The last grid of every image tag in the run's event file, as RGB arrays."""
    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    accumulator.Reload()
    grids = {}
    for tag in accumulator.Tags()["images"]:
        data = np.frombuffer(accumulator.Images(tag)[-1].encoded_image_string, dtype=np.uint8)
        grids[tag] = cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1]
    return grids


def labelled_stack(rows: list[tuple[str, np.ndarray]], label_width: int = 190) -> np.ndarray:
    """Grids stacked top to bottom, each with its label in a dark column on the left."""
    width = max(grid.shape[1] for _, grid in rows)
    parts = []
    for label, grid in rows:
        band = np.full((grid.shape[0], label_width + width, 3), 24, dtype=np.uint8)
        band[:, label_width : label_width + grid.shape[1]] = grid
        origin = (8, grid.shape[0] // 2 + 6)
        cv2.putText(band, label, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1,
                    cv2.LINE_AA)  # fmt: skip
        parts.append(band)
    return np.concatenate(parts, axis=0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/deconvnet_views.png"))
    parser.add_argument("--log-dir", type=Path, default=Path("runs/views"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=48)
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    images, labels, _ = make_shapes(1600, "source", size=args.size, seed=0)
    probe_images, probe_labels, _ = make_shapes(6, "source", size=args.size, seed=1)
    monitor = CamMonitor(
        "features.10", methods=["gradcam", "guided_backprop", "deconvnet"],
        probe=(probe_images, probe_labels), views=("all", "pos", "neg"),
        mean=MEAN, std=STD, class_names=class_names(), nrow=6, history=False,
        every_n_epochs=args.epochs,
    )  # fmt: skip
    logger = TensorBoardLogger(args.log_dir, name="", version="")
    trainer = pl.Trainer(
        max_epochs=args.epochs, logger=logger, callbacks=[monitor], enable_checkpointing=False,
        enable_model_summary=False, accelerator="cpu", deterministic=True,
    )  # fmt: skip
    loader = DataLoader(TensorDataset(images, labels), batch_size=32, shuffle=True)
    trainer.fit(ShapesNet(), loader)

    grids = read_grids(Path(logger.log_dir))
    rows = [(label, grids[f"cam/probe/{layer}/{name}"]) for name, layer, label in ROWS]
    picture = labelled_stack(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), np.ascontiguousarray(picture[:, :, ::-1]))
    print(f"wrote {args.out} ({picture.shape[1]}x{picture.shape[0]}) from {logger.log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
