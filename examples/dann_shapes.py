"""Watch attention under domain shift: a source-only CNN against DANN, with CamMonitor.

A small CNN learns to name four shapes from labelled *source* images (plain dark background)
and is tested on *target* images (a coloured, blotchy texture background; see `shapes.py`). With
``--adapt`` it trains as a domain-adversarial network (DANN, Ganin et al. 2016): a domain
classifier behind a gradient-reversal layer sees source and unlabelled target images (target
labels are never used for training). `CamMonitor` logs Grad-CAM and Grad-CAM++ overlays of 16
held-out source and 16 target images at two layers every epoch, with attention drift and
localization scores against the shapes' masks.

    python examples/dann_shapes.py --log-dir runs/source_only
    python examples/dann_shapes.py --adapt --log-dir runs/dann
    tensorboard --logdir runs
    cam-monitor compare runs/source_only runs/dann

Everything is generated in code; nothing is downloaded. The defaults take about a minute per
run on two idle CPU cores (35 s source-only, 54 s DANN, measured).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import CLASSES, MEAN, STD, class_names, make_shapes

from cam_monitor import CamMonitor

#: The layers the monitor watches: the last conv (8x8 maps) and an earlier one (16x16 maps).
CAM_LAYERS: tuple[str, str] = ("features.conv4", "features.conv2")
CAM_METHODS: tuple[str, str] = ("gradcam", "gradcam++")

TRAIN_SIZE = 4000  # images per domain in the training pool
VAL_SIZE = 1000  # held-out images per domain for val/source_acc and val/target_acc
IMAGE_SIZE = 32

# Disjoint seed streams for the training pool, the validation sets and the probes.
_TRAIN, _VAL, _PROBE = 0, 1, 2


def _data_seed(seed: int, split: int) -> int:
    return 10 * seed + split


# -- model ------------------------------------------------------------------------------------


class _ReverseGrad(torch.autograd.Function):
    """Identity forward; the backward pass multiplies the gradient by ``-coeff``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.coeff * grad, None


class GradientReversal(nn.Module):
    """Gradient-reversal layer: passes inputs through, reverses and scales gradients by `coeff`."""

    def __init__(self, coeff: float = 1.0) -> None:
        super().__init__()
        self.coeff = coeff

    def forward(self, x: Tensor) -> Tensor:
        return _ReverseGrad.apply(x, self.coeff)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}"


def grl_coefficient(progress: float) -> float:
    """DANN's schedule for the reversal strength: ``2 / (1 + exp(-10 p)) - 1``, p in [0, 1]."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def _block(c_in: int, c_out: int, index: int) -> list[tuple[str, nn.Module]]:
    return [
        (f"conv{index}", nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)),
        (f"bn{index}", nn.BatchNorm2d(c_out)),
        (f"relu{index}", nn.ReLU(inplace=False)),
    ]


class ShapesDANN(pl.LightningModule):
    """Four conv blocks, global pooling, a label head and a domain head behind a GRL.

    `forward(x)` returns ``(class_logits, domain_logits)``. With ``adapt=False`` only labelled
    source images are used (the domain head is idle); with ``adapt=True`` source and target
    images go through the network together and the domain loss is on.
    """

    def __init__(
        self,
        adapt: bool = True,
        num_classes: int = len(CLASSES),
        lr: float = 0.005,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.adapt = adapt
        self.features = nn.Sequential(
            OrderedDict(
                [
                    *_block(3, 16, 1),
                    ("pool1", nn.MaxPool2d(2)),  # 32 -> 16
                    *_block(16, 32, 2),
                    ("pool2", nn.MaxPool2d(2)),  # 16 -> 8
                    *_block(32, 64, 3),
                    *_block(64, 64, 4),
                ]
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)
        self.grl = GradientReversal(0.0)
        self.domain_head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
        self._val_correct = torch.zeros(2)
        self._val_count = torch.zeros(2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(class_logits [B, C], domain_logits [B, 2])``."""
        z = self.pool(self.features(x)).flatten(1)
        return self.classifier(z), self.domain_head(self.grl(z))

    def progress(self) -> float:
        """Fraction of training done, p in [0, 1]."""
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        if not total or math.isinf(total):
            return 0.0
        return min(1.0, self.global_step / total)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        xs, ys, xt = batch
        if not self.adapt:
            logits, _ = self(xs)
            loss = F.cross_entropy(logits, ys)
            self.log("train/class_loss", loss, prog_bar=True)
            self.log("train/source_acc", (logits.argmax(1) == ys).float().mean())
            return loss
        coeff = grl_coefficient(self.progress())
        self.grl.coeff = coeff
        logits, domain_logits = self(torch.cat([xs, xt]))
        class_loss = F.cross_entropy(logits[: len(xs)], ys)
        domains = torch.cat([torch.zeros(len(xs)), torch.ones(len(xt))]).long().to(xs.device)
        domain_loss = F.cross_entropy(domain_logits, domains)
        self.log("train/class_loss", class_loss, prog_bar=True)
        self.log("train/domain_loss", domain_loss, prog_bar=True)
        self.log("train/domain_acc", (domain_logits.argmax(1) == domains).float().mean())
        self.log("train/source_acc", (logits[: len(xs)].argmax(1) == ys).float().mean())
        self.log("train/grl_coeff", coeff)
        return class_loss + domain_loss  # the GRL scales and reverses the domain gradient

    def on_validation_epoch_start(self) -> None:
        self._val_correct = torch.zeros(2, device=self.device)
        self._val_count = torch.zeros(2, device=self.device)

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        x, y, domain = batch
        logits, _ = self(x)
        correct = (logits.argmax(1) == y).float()
        self._val_correct.index_add_(0, domain, correct)
        self._val_count.index_add_(0, domain, torch.ones_like(correct))

    def on_validation_epoch_end(self) -> None:
        acc = self._val_correct / self._val_count.clamp(min=1)
        self.log("val/source_acc", acc[0])
        self.log("val/target_acc", acc[1], prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )

        def anneal(step: int) -> float:  # DANN's mu_p = mu_0 / (1 + 10 p) ** 0.75
            total = self.trainer.estimated_stepping_batches
            return (1.0 + 10.0 * min(1.0, step / max(1, total))) ** -0.75

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, anneal)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def build_module(adapt: bool, seed: int = 0, lr: float = 0.005) -> ShapesDANN:
    """The model, initialised from `seed` without touching the global RNG (same init either way)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ShapesDANN(adapt=adapt, lr=lr)


# -- data -------------------------------------------------------------------------------------


class SourceTargetPairs(Dataset):
    """Item i: ``(source image, source label, target image)``; target labels are not stored."""

    def __init__(self, source: Tensor, labels: Tensor, target: Tensor) -> None:
        self.source, self.labels, self.target = source, labels, target
        # A fixed pairing that is unrelated to the source index order.
        self.partner = torch.randperm(len(target), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        j = int(self.partner[i % len(self.partner)])
        return self.source[i], self.labels[i], self.target[j]


def build_loaders(
    batch_size: int = 64, steps_per_epoch: int = 100, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, val_loader)``.

    Train batches are ``(source images, source labels, target images)``, `steps_per_epoch` of
    them per epoch, drawn from fixed pools of generated images. Validation batches are
    ``(images, labels, domain)`` with domain 0 = source and 1 = target (held-out images).
    """
    xs, ys, _ = make_shapes(TRAIN_SIZE, "source", IMAGE_SIZE, _data_seed(seed, _TRAIN))
    xt, _, _ = make_shapes(TRAIN_SIZE, "target", IMAGE_SIZE, _data_seed(seed, _TRAIN))
    train = SourceTargetPairs(xs, ys, xt)
    sampler = RandomSampler(
        train,
        num_samples=batch_size * steps_per_epoch,
        generator=torch.Generator().manual_seed(seed),
    )
    train_loader = DataLoader(train, batch_size=batch_size, sampler=sampler, drop_last=True)

    vs, vys, _ = make_shapes(VAL_SIZE, "source", IMAGE_SIZE, _data_seed(seed, _VAL))
    vt, vyt, _ = make_shapes(VAL_SIZE, "target", IMAGE_SIZE, _data_seed(seed, _VAL))
    domain = torch.cat([torch.zeros(VAL_SIZE), torch.ones(VAL_SIZE)]).long()
    val = TensorDataset(torch.cat([vs, vt]), torch.cat([vys, vyt]), domain)
    val_loader = DataLoader(val, batch_size=250, shuffle=False)
    return train_loader, val_loader


def build_probes(
    num: int = 16, seed: int = 0
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
    """``({"source": (x, y), "target": (x, y)}, {"source": masks, "target": masks})``.

    `num` held-out images per domain (never trained or validated on), sorted by class so the
    overlay grids read class by class.
    """
    probes: dict[str, tuple[Tensor, Tensor]] = {}
    masks: dict[str, Tensor] = {}
    for domain in ("source", "target"):
        x, y, m = make_shapes(num, domain, IMAGE_SIZE, _data_seed(seed, _PROBE))
        order = torch.sort(y, stable=True).indices
        probes[domain] = (x[order], y[order])
        masks[domain] = m[order]
    return probes, masks


def build_monitor(num_probe: int = 16, seed: int = 0, **overrides: Any) -> CamMonitor:
    """The demo's `CamMonitor`; `overrides` replace any of its keyword arguments."""
    probes, masks = build_probes(num_probe, seed)
    kwargs: dict[str, Any] = {
        "methods": list(CAM_METHODS),
        "output_transform": 0,  # forward returns (class_logits, domain_logits)
        "probe": probes,
        "masks": masks,
        "mean": MEAN,
        "std": STD,
        "class_names": class_names(),
        "every_n_epochs": 1,
        "num_probe": num_probe,
    }
    kwargs.update(overrides)
    layer = kwargs.pop("layer", list(CAM_LAYERS))
    return CamMonitor(layer=layer, **kwargs)


# -- command line -----------------------------------------------------------------------------


class _EpochPrinter(pl.Callback):
    """One line per validation, for logs without a progress bar."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        print(
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: "
            f"source acc {float(metrics['val/source_acc']):.3f}, "
            f"target acc {float(metrics['val/target_acc']):.3f}",
            flush=True,
        )


def make_logger(kind: str, log_dir: Path, run_name: str) -> Logger:
    """A logger writing straight into `log_dir` (no version sub-folders)."""
    if kind == "tensorboard":
        return TensorBoardLogger(
            save_dir=str(log_dir), name="", version="", default_hp_metric=False
        )
    if kind == "csv":
        return CSVLogger(save_dir=str(log_dir), name="", version="")
    if kind == "wandb":
        return WandbLogger(
            offline=True, save_dir=str(log_dir), project="cam-monitor-demo", name=run_name
        )
    raise ValueError(f"unknown logger {kind!r}; use tensorboard, wandb or csv.")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="dann_shapes.py",
        description="Source-only vs DANN on synthetic shapes, with Grad-CAM monitoring.",
    )
    return parse_run_args(
        parser, argv, steps=100, lr=0.005, log_dir="runs/dann or runs/source_only"
    )


def parse_run_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    steps: int,
    lr: float,
    log_dir: str,
) -> argparse.Namespace:
    """The options of one DANN or source-only run (shared by both DANN examples), parsed."""
    parser.add_argument("--adapt", action="store_true", help="train DANN (default: source only)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps-per-epoch", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=64, help="images per domain per step")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument("--lr", type=float, default=lr, help="initial SGD learning rate")
    parser.add_argument("--log-dir", type=Path, default=None, help=f"default: {log_dir}")
    parser.add_argument("--logger", choices=("tensorboard", "wandb", "csv"), default="tensorboard")
    parser.add_argument(
        "--progress-bar",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on when stderr is a terminal",
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "steps_per_epoch", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train one run; returns its final accuracies, wall time and folders."""
    name = "dann" if args.adapt else "source_only"
    log_dir = args.log_dir if args.log_dir is not None else Path("runs") / name
    if log_dir.is_dir() and any(log_dir.glob("events.out.tfevents.*")):
        print(f"note: {log_dir} already holds TensorBoard events; runs will be mixed there.")
    pl.seed_everything(args.seed, workers=True, verbose=False)
    module = build_module(args.adapt, args.seed, args.lr)
    train_loader, val_loader = build_loaders(args.batch_size, args.steps_per_epoch, args.seed)
    monitor = build_monitor(16, args.seed)
    logger = make_logger(args.logger, log_dir, name)
    return fit_run(args, module, monitor, logger, (train_loader, val_loader), name, log_dir)


def fit_run(
    args: argparse.Namespace,
    module: pl.LightningModule,
    monitor: CamMonitor,
    logger: Logger,
    loaders: tuple[DataLoader, DataLoader],
    name: str,
    log_dir: Path,
) -> dict[str, Any]:
    """Fit one DANN or source-only run (shared by both DANN examples); returns its results."""
    progress = sys.stderr.isatty() if args.progress_bar is None else args.progress_bar
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[monitor, _EpochPrinter()],
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=min(10, args.steps_per_epoch),
        deterministic=True,
    )
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, *loaders)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    metrics = trainer.callback_metrics
    if isinstance(logger, WandbLogger):
        import wandb

        wandb.finish()
    return {
        "run": name,
        "source_acc": float(metrics["val/source_acc"]),
        "target_acc": float(metrics["val/target_acc"]),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "log_dir": log_dir,
        "monitor_dir": monitor.folder,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example from the command line; prints accuracies and where the logs are."""
    args = parse_args(argv)
    result = train(args)
    print(
        f"\n{result['run']}: target accuracy {result['target_acc']:.3f}, "
        f"source accuracy {result['source_acc']:.3f} ({result['seconds']:.0f} s)"
    )
    print(f"logs: {result['log_dir']}  (monitor files: {result['monitor_dir']})")
    if args.logger == "tensorboard":
        print(f"view: tensorboard --logdir {result['log_dir']}")
    elif args.logger == "wandb":
        print(f"sync: wandb sync {result['log_dir']}/wandb/offline-run-*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
