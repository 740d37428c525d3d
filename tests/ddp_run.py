"""Run a 2-process CPU DDP fit with CamMonitor; tests/test_guarantees.py drives it in a subprocess.

Each rank writes `rank<N>.json` with how many evaluations it ran; rank zero saves final weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cam_monitor import CamMonitor
from tests.helpers import LitClassifier, loader, shapes_dataset


def probe_images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))


class RankReport(pl.Callback):
    def __init__(self, out: Path, monitor: CamMonitor) -> None:
        self.out, self.monitor = out, monitor

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = {"evaluations": self.monitor.evaluations, "rank": trainer.global_rank}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "ddp_spawn"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    monitor = CamMonitor(
        "net.features.5", methods=["gradcam", "layercam"], probe=probe_images(),
        save_dir=args.out / "hist",
    )  # fmt: skip
    trainer = pl.Trainer(
        strategy=args.strategy, accelerator="cpu", devices=2, max_epochs=2, logger=False,
        callbacks=[monitor, RankReport(args.out, monitor)], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.out,
    )  # fmt: skip
    model = LitClassifier()
    trainer.fit(model, loader(shapes_dataset(32)))
    if trainer.is_global_zero:
        torch.save(model.state_dict(), args.out / "final.pt")


if __name__ == "__main__":
    main()
