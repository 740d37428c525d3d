"""Where evaluations go: TensorBoard, Weights & Biases, any Lightning logger, or PNGs on disk.

This is the boundary where the structured keys of an evaluation (`schema.MapKey`,
`schema.ScalarKey`) become the string tags of the README's "What it logs".
"""

from __future__ import annotations

import csv
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger
from torch import Tensor

from .render import IMAGE_SUFFIXES, encode_grid, grid_format, save_grid
from .schema import MapKey, ScalarKey, image_tag, probe_hash_tag
from .tensorboard_crc import install_fast_crc

if TYPE_CHECKING:
    from .evaluation import ImageKey, ScalarName


def image_tags(images: Mapping[ImageKey, Tensor]) -> dict[str, Tensor]:
    """Grids by tag: `cam/<probe>/<layer>/<method>` for a `MapKey`; filter tags as they are."""
    return {image_tag(k) if isinstance(k, MapKey) else k: grid for k, grid in images.items()}


def scalar_tags(scalars: Mapping[ScalarName, float]) -> dict[str, float]:
    """Scalars by tag: `ScalarKey.tag` (`cam_drift/...`), fixed tags such as
    `cam_monitor/seconds` as they are."""
    return {k.tag if isinstance(k, ScalarKey) else k: value for k, value in scalars.items()}


class Sink:
    """Receives the grids (uint8 CHW, CPU) and scalars of one evaluation at a global step, by
    the evaluation's keys (`image_tags` and `scalar_tags` turn them into the logged tags)."""

    def log(
        self, images: Mapping[ImageKey, Tensor], scalars: Mapping[ScalarName, float], step: int
    ) -> None:
        raise NotImplementedError

    def record_probe(self, hashes: Mapping[str, str]) -> None:
        """Note each probe set's content hash once, so runs can be checked to share a probe."""


def png_path(folder: Path, key: ImageKey, step: int, suffix: str = ".png") -> Path:
    """`<folder>/images/<probe>/<layer>/<method>/step-00000120.png` for an overlay grid's
    `MapKey` (each name encoded as in its tag, so a '/' in a name stays in one folder);
    `<folder>/images/filters/.../step-...png` for a filter tag; `suffix` for other formats."""
    parts = key.encoded.split("/") if isinstance(key, MapKey) else key.split("/")
    return folder.joinpath("images", *parts, f"step-{step:08d}{suffix}")


class TensorBoardSink(Sink):
    """An image summary per grid (`add_png_image`) and `add_scalar` per number, on the logger's
    SummaryWriter. Creating one installs the C CRC32C in TensorBoard's writer where it checks
    out (`tensorboard_crc.install_fast_crc`)."""

    def __init__(self, logger: TensorBoardLogger, image_format: str = "png") -> None:
        self.logger = logger
        self.image_format = image_format
        install_fast_crc()

    def log(
        self, images: Mapping[ImageKey, Tensor], scalars: Mapping[ScalarName, float], step: int
    ) -> None:
        writer = self.logger.experiment
        for key, (tag, grid) in zip(images, image_tags(images).items(), strict=True):
            add_png_image(writer, tag, grid, step, grid_format(key, self.image_format))
        for tag, value in scalar_tags(scalars).items():
            writer.add_scalar(tag, value, global_step=step)

    def record_probe(self, hashes: Mapping[str, str]) -> None:
        for name, digest in hashes.items():
            self.logger.experiment.add_text(probe_hash_tag(name), digest, 0)


def add_png_image(
    writer: Any, tag: str, grid: Tensor, step: int, image_format: str = "png"
) -> None:
    """What `writer.add_image(tag, grid, step)` records, with the PNG (or JPEG: `image_format`)
    encoded by OpenCV.

    TensorBoard's own encoder (PIL, zlib level 6) took 32 ms for a 16-tile demo grid, OpenCV
    9 ms for a file 27% larger. Writers other than torch's `SummaryWriter` get `add_image`.
    """
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        native = isinstance(writer, SummaryWriter)
    except ImportError:  # tensorboardX alone
        native = False
    if not native:
        writer.add_image(tag, grid, global_step=step, dataformats="CHW")
        return
    image = Summary.Image(
        height=grid.shape[1],
        width=grid.shape[2],
        colorspace=3,
        encoded_image_string=encode_grid(grid, image_format),
    )
    writer._get_file_writer().add_summary(
        Summary(value=[Summary.Value(tag=tag, image=image)]), step
    )


class WandbSink(Sink):
    """One `wandb.log` call per evaluation: images with captions, scalars, `trainer/global_step`."""

    def __init__(self, logger: WandbLogger, image_format: str = "png") -> None:
        self.logger = logger
        self.image_format = image_format

    def log(
        self, images: Mapping[ImageKey, Tensor], scalars: Mapping[ScalarName, float], step: int
    ) -> None:
        import wandb

        with tempfile.TemporaryDirectory(prefix="cam-monitor-") as folder:
            payload: dict[str, Any] = {}
            tagged = zip(images, image_tags(images).items(), strict=True)
            for index, (key, (tag, grid)) in enumerate(tagged):
                # Encoded here (OpenCV; JPEG at quality 90), passed to W&B as a file it copies.
                image_format = grid_format(key, self.image_format)
                name = f"{index}{IMAGE_SUFFIXES[image_format]}"
                path = save_grid(grid, Path(folder, name), image_format)
                payload[tag] = wandb.Image(str(path), caption=f"{tag} @ step {step}")
            payload.update({k: v for k, v in scalar_tags(scalars).items() if not math.isnan(v)})
            payload["trainer/global_step"] = step
            self.logger.experiment.log(payload)

    def record_probe(self, hashes: Mapping[str, str]) -> None:
        config = {probe_hash_tag(name): digest for name, digest in hashes.items()}
        self.logger.experiment.config.update(config, allow_val_change=True)


class FileSink(Sink):
    """Grids as image files (PNG, or JPEG for overlays: `image_format`) under `folder/images/`;
    scalars into `folder/scalars.csv` if asked."""

    def __init__(self, folder: Path, write_scalars: bool, image_format: str = "png") -> None:
        self.folder = folder
        self.write_scalars = write_scalars
        self.image_format = image_format

    def log(
        self, images: Mapping[ImageKey, Tensor], scalars: Mapping[ScalarName, float], step: int
    ) -> None:
        for key, grid in images.items():  # paths from the keys, not from parsed tags
            image_format = grid_format(key, self.image_format)
            path = png_path(self.folder, key, step, IMAGE_SUFFIXES[image_format])
            save_grid(grid, path, image_format)
        if self.write_scalars and scalars:
            path = self.folder / "scalars.csv"
            new = not path.exists()
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", newline="") as handle:
                writer = csv.writer(handle)
                if new:
                    writer.writerow(["step", "tag", "value"])
                rows = scalar_tags(scalars).items()
                writer.writerows([step, tag, value] for tag, value in rows)


class MetricsSink(Sink):
    """Scalars through any Lightning logger's `log_metrics` (CSVLogger, MLflow, ...)."""

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def log(
        self, images: Mapping[ImageKey, Tensor], scalars: Mapping[ScalarName, float], step: int
    ) -> None:
        if scalars:
            self.logger.log_metrics(scalar_tags(scalars), step=step)

    def record_probe(self, hashes: Mapping[str, str]) -> None:
        self.logger.log_hyperparams({probe_hash_tag(n): d for n, d in hashes.items()})


def logger_dir(logger: Logger, fallback: str | Path) -> Path:
    """The folder a logger writes its run into (no collective calls)."""
    if isinstance(logger, WandbLogger):
        return Path(logger.experiment.dir).parent  # wandb/<run>/: one folder per run
    folder = getattr(logger, "log_dir", None) or logger.save_dir
    return Path(folder) if folder else Path(fallback)


def run_folder(trainer: pl.Trainer, save_dir: str | Path | None) -> Path:
    """The monitor's own folder: `save_dir`, else `<first logger's log_dir>/cam_monitor`."""
    if save_dir is not None:
        return Path(save_dir)
    if trainer.loggers:
        return logger_dir(trainer.loggers[0], trainer.default_root_dir) / "cam_monitor"
    return Path(trainer.default_root_dir) / "cam_monitor"


def sinks_for(trainer: pl.Trainer, folder: Path, image_format: str = "png") -> list[Sink]:
    """A sink for every logger on the Trainer; image files for loggers that cannot show images.
    Overlay grids are encoded as `image_format` ("jpeg" or "png")."""
    sinks: list[Sink] = []
    needs_files = not trainer.loggers
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            sinks.append(TensorBoardSink(logger, image_format))
        elif isinstance(logger, WandbLogger):
            sinks.append(WandbSink(logger, image_format))
        else:
            sinks.append(MetricsSink(logger))
            needs_files = True
    if needs_files:
        sinks.append(FileSink(folder, write_scalars=not trainer.loggers, image_format=image_format))
    return sinks
