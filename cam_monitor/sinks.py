"""Where evaluations go: TensorBoard, W&B, MLflow, Comet, Neptune, any Lightning logger, or PNGs.

This is the boundary where the structured keys of an evaluation (`schema.MapKey`,
`schema.ScalarKey`) become the string tags of the README's "What it logs". Loggers of both
Lightning namespaces are recognised by `lightning.compat`.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .lightning.compat import is_logger
from .schema import (
    DRIFT,
    FAITHFULNESS,
    FILTER_PREFIX,
    HISTORY_FOLDER,
    IMAGE_PREFIX,
    LOCALIZATION,
    SECONDS_TAG,
    STATISTICS,
    Chart,
    MapKey,
    ScalarKey,
    describe,
    image_tag,
    probe_hash_tag,
)
from .tensorboard_crc import install_fast_crc

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import Logger

    from .encoding import EncodedGrid
    from .evaluation import ImageKey, ScalarName

T = TypeVar("T")


def image_tags(images: Mapping[ImageKey, T]) -> dict[str, T]:
    """Grids by tag: `cam/<probe>/<layer>/<method>` for a `MapKey`; filter tags as they are."""
    return {image_tag(k) if isinstance(k, MapKey) else k: grid for k, grid in images.items()}


def scalar_tags(scalars: Mapping[ScalarName, float]) -> dict[str, float]:
    """Scalars by tag: `ScalarKey.tag` (`cam_drift/...`), fixed tags such as
    `cam_monitor/seconds` as they are."""
    return {k.tag if isinstance(k, ScalarKey) else k: value for k, value in scalars.items()}


class Sink:
    """Receives the grids and scalars of one evaluation at a global step, by the evaluation's
    keys (`image_tags` and `scalar_tags` turn them into the logged tags). Each grid comes
    encoded once for every sink (`encoding.EncodedGrid`: the bytes, their format and the
    pixels); a sink writes those bytes and never encodes again. Grids are encoded only when
    some sink `needs_bytes`."""

    #: Whether this sink writes the encoded bytes (False: it logs pixels, or no images at all).
    needs_bytes: bool = True

    def log(
        self, images: Mapping[ImageKey, EncodedGrid], scalars: Mapping[ScalarName, float], step: int
    ) -> None:
        raise NotImplementedError

    def __str__(self) -> str:
        """What a warning names: the logger's class, or where the files go."""
        logger = getattr(self, "logger", None)
        return type(logger).__name__ if logger is not None else type(self).__name__

    def record_probe(self, hashes: Mapping[str, str]) -> None:
        """Note each probe set's content hash once, so runs can be checked to share a probe."""

    def record_dashboard(self, charts: Sequence[Chart]) -> None:
        """Lay out the dashboard once per run (`schema.dashboard_charts`), where the logger can."""


def png_path(folder: Path, key: ImageKey, step: int, suffix: str = ".png") -> Path:
    """`<folder>/images/<probe>/<layer>/<method>/step-00000120.png` for an overlay grid's
    `MapKey` (each name encoded as in its tag, so a '/' in a name stays in one folder);
    `<folder>/images/filters/.../step-...png` for a filter tag; `suffix` for other formats."""
    parts = key.encoded.split("/") if isinstance(key, MapKey) else key.split("/")
    return folder.joinpath("images", *parts, f"step-{step:08d}{suffix}")


class TensorBoardSink(Sink):
    """An image summary per grid (`add_encoded_image`) and `add_scalar` per number, on the logger's
    SummaryWriter; each scalar tag's first value carries its `schema.describe` text, and the
    custom-scalars page gets one chart per question (`record_dashboard`). Creating one installs
    the C CRC32C in TensorBoard's writer where it checks out (`tensorboard_crc`)."""

    def __init__(self, logger: Logger) -> None:
        self.logger = logger
        self.described: set[str] = set()  # tags whose description is written
        install_fast_crc()

    def log(
        self, images: Mapping[ImageKey, EncodedGrid], scalars: Mapping[ScalarName, float], step: int
    ) -> None:
        writer = self.logger.experiment
        for tag, image in image_tags(images).items():
            add_encoded_image(writer, tag, image, step)
        add_described_scalars(writer, scalar_tags(scalars), step, self.described)

    def record_probe(self, hashes: Mapping[str, str]) -> None:
        for name, digest in hashes.items():
            self.logger.experiment.add_text(probe_hash_tag(name), digest, 0)

    def record_dashboard(self, charts: Sequence[Chart]) -> None:
        """The custom-scalars layout: a section per probe set, a multi-line chart per question."""
        self.logger.experiment.add_custom_scalars(custom_scalars_layout(charts))


def custom_scalars_layout(charts: Sequence[Chart]) -> dict[str, dict[str, list[Any]]]:
    """`{section: {title: ["Multiline", [tag regex]]}}`, as `SummaryWriter.add_custom_scalars`
    takes it.

    Example:
        >>> from cam_monitor.schema import dashboard_charts
        >>> layout = custom_scalars_layout(dashboard_charts({"target": False}, ["js"]))
        >>> section = layout["cam-monitor: target"]
        >>> section["drift from previous: Jensen-Shannon divergence (distance, 0 = same)"]
        ['Multiline', ['^cam_drift/target/[^/]+/[^/]+/js_prev$']]
    """
    layout: dict[str, dict[str, list[Any]]] = {}
    for chart in charts:
        layout.setdefault(chart.category, {})[chart.title] = ["Multiline", [chart.pattern]]
    return layout


def add_described_scalars(
    writer: Any, scalars: Mapping[str, float], step: int, described: set[str]
) -> None:
    """`writer.add_scalar(tag, value, step)` for each scalar, as one event of a summary of them
    all (`add_scalar` built, serialised and queued an event per scalar: 0.04 ms each on our
    CPU, and an evaluation with many layers has hundreds). A tag's first value (`described`
    keeps the tags seen) carries `schema.describe(tag)` in TensorBoard's description field,
    shown beside its chart."""
    try:
        from tensorboard.compat.proto.summary_pb2 import DataClass, Summary, SummaryMetadata
        from tensorboard.plugins.scalar.metadata import PLUGIN_NAME
        from torch.utils.tensorboard import SummaryWriter

        native = isinstance(writer, SummaryWriter)
    except ImportError:  # tensorboardX alone
        native = False
    if not native:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, global_step=step)
        described.update(scalars)
        return
    values = []
    for tag, value in scalars.items():
        description = "" if tag in described else describe(tag)
        described.add(tag)
        if not description:  # what `add_scalar` writes
            values.append(Summary.Value(tag=tag, simple_value=float(value)))
            continue
        metadata = SummaryMetadata(  # a data class, so TensorBoard's Rust loader keeps the text
            plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME),
            summary_description=description,
            data_class=DataClass.DATA_CLASS_SCALAR,
        )
        values.append(Summary.Value(tag=tag, simple_value=float(value), metadata=metadata))
    if values:
        writer._get_file_writer().add_summary(Summary(value=values), step)


def add_encoded_image(writer: Any, tag: str, image: EncodedGrid, step: int) -> None:
    """What `writer.add_image(tag, grid, step)` records, with the bytes already encoded (PNG or
    JPEG, by `encoding`: OpenCV, or nvJPEG for grids drawn on a GPU).

    TensorBoard's own encoder (PIL, zlib level 6) took 32 ms for a 16-tile demo grid, OpenCV
    9 ms for a file 27% larger. Writers other than torch's `SummaryWriter` get `add_image` of
    the pixels.
    """
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        native = isinstance(writer, SummaryWriter)
    except ImportError:  # tensorboardX alone
        native = False
    if not native:
        writer.add_image(tag, image.grid, global_step=step, dataformats="CHW")
        return
    summary = Summary.Image(
        height=image.height, width=image.width, colorspace=3, encoded_image_string=image.data
    )
    writer._get_file_writer().add_summary(
        Summary(value=[Summary.Value(tag=tag, image=summary)]), step
    )


class WandbSink(Sink):
    """One `wandb.log` call per evaluation: images with captions, scalars, `trainer/global_step`."""

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def log(
        self, images: Mapping[ImageKey, EncodedGrid], scalars: Mapping[ScalarName, float], step: int
    ) -> None:
        import wandb

        with tempfile.TemporaryDirectory(prefix="cam-monitor-") as folder:
            payload: dict[str, Any] = {}
            for index, (tag, image) in enumerate(image_tags(images).items()):
                path = Path(folder, f"{index}{image.suffix}")  # a file W&B copies as it is
                path.write_bytes(image.data)
                payload[tag] = wandb.Image(str(path), caption=f"{tag} @ step {step}")
            payload.update({k: v for k, v in scalar_tags(scalars).items() if not math.isnan(v)})
            payload[WANDB_STEP] = step
            self.logger.experiment.log(payload)

    def record_probe(self, hashes: Mapping[str, str]) -> None:
        config = {probe_hash_tag(name): digest for name, digest in hashes.items()}
        self.logger.experiment.config.update(config, allow_val_change=True)

    def record_dashboard(self, charts: Sequence[Chart]) -> None:
        """`define_metric`: every monitor key is charted against `trainer/global_step`; the run
        summary keeps W&B's default, the last value (``summary="last"`` would nest it as
        ``{"last": value}``)."""
        run = self.logger.experiment
        run.define_metric(WANDB_STEP)
        for prefix in WANDB_GLOBS:
            run.define_metric(prefix, step_metric=WANDB_STEP)


#: The step key of every `wandb.log` call, and the keys charted against it.
WANDB_STEP = "trainer/global_step"
WANDB_GLOBS: tuple[str, ...] = (
    *(f"{prefix}/*" for prefix in (DRIFT, LOCALIZATION, STATISTICS, FAITHFULNESS)),
    *(f"{prefix}/*" for prefix in (IMAGE_PREFIX, FILTER_PREFIX)),
    SECONDS_TAG,
)


class FileSink(Sink):
    """Grids as image files (PNG, or JPEG for overlays with `image_format="jpeg"`) under
    `folder/images/`; scalars into `folder/scalars.csv` if asked."""

    def __init__(self, folder: Path, write_scalars: bool) -> None:
        self.folder = folder
        self.write_scalars = write_scalars

    def __str__(self) -> str:
        return f"the image files under {self.folder / 'images'}"

    def log(
        self, images: Mapping[ImageKey, EncodedGrid], scalars: Mapping[ScalarName, float], step: int
    ) -> None:
        for key, image in images.items():  # paths from the keys, not from parsed tags
            path = png_path(self.folder, key, step, image.suffix)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image.data)
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

    needs_bytes = False

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def log(
        self, images: Mapping[ImageKey, EncodedGrid], scalars: Mapping[ScalarName, float], step: int
    ) -> None:
        if scalars:
            self.logger.log_metrics(scalar_tags(scalars), step=step)

    def record_probe(self, hashes: Mapping[str, str]) -> None:
        self.logger.log_hyperparams({probe_hash_tag(n): d for n, d in hashes.items()})


class MlflowSink(MetricsSink):
    """Grids through `MlflowClient.log_image(run_id, image, key=tag, step=step)` (the MLflow UI
    shows a step slider per key); scalars and the probe hash as `MetricsSink`.

    `log_image` takes pixels (an array or a PIL image), never encoded bytes, and writes its own
    PNG: this sink passes the pixels, so it needs no encoded bytes."""

    needs_bytes = False

    def log(
        self, images: Mapping[ImageKey, EncodedGrid], scalars: Mapping[ScalarName, float], step: int
    ) -> None:
        client, run_id = self.logger.experiment, self.logger.run_id
        for tag, image in image_tags(images).items():
            client.log_image(run_id, image.grid.permute(1, 2, 0).numpy(), key=tag, step=step)
        super().log(images, scalars, step)


class CometSink(MetricsSink):
    """Grids through Comet's `experiment.log_image(file, name=tag, step=step)` (encoded bytes,
    so Comet does not re-encode them); scalars and the probe hash as `MetricsSink`."""

    needs_bytes = True

    def log(
        self, images: Mapping[ImageKey, EncodedGrid], scalars: Mapping[ScalarName, float], step: int
    ) -> None:
        experiment = self.logger.experiment
        for tag, image in image_tags(images).items():
            experiment.log_image(io.BytesIO(image.data), name=tag, step=step)
        super().log(images, scalars, step)


class NeptuneSink(MetricsSink):
    """Grids appended to a Neptune file series per tag (`run[tag].append(File, step=step)`);
    scalars and the probe hash as `MetricsSink`."""

    needs_bytes = True

    def log(
        self, images: Mapping[ImageKey, EncodedGrid], scalars: Mapping[ScalarName, float], step: int
    ) -> None:
        from neptune.types import File

        run = self.logger.experiment
        for tag, image in image_tags(images).items():
            encoded = File.from_content(image.data, extension=image.image_format)
            run[tag].append(encoded, step=step)
        super().log(images, scalars, step)


def logger_dir(logger: Logger, fallback: str | Path) -> Path:
    """The folder of this logger's run (no collective calls): TensorBoard's and CSV's version
    folder, W&B's `files/` (so `wandb sync` uploads what goes there), else
    `<save_dir>/<name>/<version>` (MLflow: `mlruns/<experiment id>/<run id>`)."""
    if is_logger(logger, "WandbLogger"):
        return Path(logger.experiment.dir)  # wandb/<run>/files/
    if getattr(logger, "log_dir", None):
        return Path(logger.log_dir)
    parts = [str(part) for part in (logger.name, logger.version) if part not in (None, "")]
    return Path(logger.save_dir or fallback).joinpath(*parts)


def run_folder(trainer: pl.Trainer, save_dir: str | Path | None) -> Path:
    """The monitor's own folder: `save_dir`, else `<first logger's log_dir>/cam_monitor`."""
    if save_dir is not None:
        return Path(save_dir)
    if trainer.loggers:
        return logger_dir(trainer.loggers[0], trainer.default_root_dir) / HISTORY_FOLDER
    return Path(trainer.default_root_dir) / HISTORY_FOLDER


# Lightning's logger classes with an image API, in either namespace, and the sink that uses it.
IMAGE_SINKS: dict[str, type[Sink]] = {
    "TensorBoardLogger": TensorBoardSink,
    "WandbLogger": WandbSink,
    "MLFlowLogger": MlflowSink,
    "CometLogger": CometSink,
    "NeptuneLogger": NeptuneSink,
}


def sinks_for(trainer: pl.Trainer, folder: Path) -> list[Sink]:
    """A sink for every logger on the Trainer; image files on disk, with a warning saying where,
    for loggers without an image API."""
    sinks: list[Sink] = []
    without_images = []
    for logger in trainer.loggers:
        sink = next((s for n, s in IMAGE_SINKS.items() if is_logger(logger, n)), None)
        if sink is None:
            sinks.append(MetricsSink(logger))
            without_images.append(type(logger).__name__)
        else:
            sinks.append(sink(logger))  # type: ignore[call-arg]
    if without_images or not trainer.loggers:
        sinks.append(FileSink(folder, write_scalars=not trainer.loggers))
    if without_images:
        from lightning_utilities.core.rank_zero import rank_zero_warn

        rank_zero_warn(
            f"CamMonitor: {', '.join(without_images)} has no image API; the grids go to image "
            f"files under {folder / 'images'} (its scalars go to the logger)."
        )
    return sinks
