"""The sinks write the bytes encoded once per evaluation: TensorBoard summaries read back by
TensorBoard itself, and files on disk, byte for byte what `render.encode_grid` gives."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from cam_monitor.encoding import EncodedGrid, encode_grids
from cam_monitor.render import encode_grid, make_overlay_grid
from cam_monitor.schema import (
    SECONDS_TAG,
    MapKey,
    ScalarKey,
    filter_maximised_tag,
    parse_scalar_tag,
)
from cam_monitor.sinks import FileSink, add_encoded_image, image_tags, png_path, scalar_tags
from tests.helpers import read_events


def decode(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def test_png_summary_reads_back_like_add_image(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    grid = make_overlay_grid(torch.rand(6, 3, 32, 32, generator=gen), torch.rand(6, 4, 4), nrow=3)
    writer = SummaryWriter(str(tmp_path))
    add_encoded_image(writer, "cam/ours", EncodedGrid(grid, encode_grid(grid, "png"), "png"), 7)
    writer.add_image("cam/theirs", grid, global_step=7, dataformats="CHW")
    writer.close()
    events = read_events(tmp_path)
    (ours,), (theirs,) = events.Images("cam/ours"), events.Images("cam/theirs")
    assert ours.step == theirs.step == 7
    assert (ours.height, ours.width) == (theirs.height, theirs.width) == tuple(grid.shape[1:])
    np.testing.assert_array_equal(decode(ours.encoded_image_string), grid.permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(
        decode(ours.encoded_image_string), decode(theirs.encoded_image_string)
    )


class OtherWriter:
    """A writer with only `add_image`, like tensorboardX's."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []

    def add_image(self, tag: str, grid: torch.Tensor, global_step: int, dataformats: str) -> None:
        self.calls.append((tag, global_step, dataformats))


def test_other_writers_get_add_image() -> None:
    writer = OtherWriter()
    add_encoded_image(
        writer, "cam/x", EncodedGrid(torch.zeros(3, 4, 4, dtype=torch.uint8), b"", "png"), 3
    )
    assert writer.calls == [("cam/x", 3, "CHW")]


def test_keys_become_the_documented_tags_at_the_boundary() -> None:
    grid = torch.zeros(3, 4, 4, dtype=torch.uint8)
    key = MapKey("source", "layer4.1.conv2", "gradcam++")
    images = {key: grid, filter_maximised_tag("features.28"): grid}
    assert list(image_tags(images)) == [
        "cam/source/layer4.1.conv2/gradcam++",
        "filters/features.28/maximised",
    ]
    drift = ScalarKey("cam_drift", key, "js_ref")
    tags = scalar_tags({drift: 0.1, drift.excluded: 2.0, SECONDS_TAG: 0.5})
    assert tags == {
        "cam_drift/source/layer4.1.conv2/gradcam++/js_ref": 0.1,
        "cam_drift/source/layer4.1.conv2/gradcam++/js_ref_excluded": 2.0,
        "cam_monitor/seconds": 0.5,
    }
    odd = ScalarKey("cam_loc", MapKey("domain/a", "blocks/0", "m"), "energy")
    (tag,) = scalar_tags({odd: 1.0})
    assert tag == "cam_loc/domain%2Fa/blocks%2F0/m/energy" and parse_scalar_tag(tag) == odd


def test_png_files_go_one_folder_per_name(tmp_path: Path) -> None:
    grid = torch.full((3, 4, 4), 200, dtype=torch.uint8)
    assert png_path(tmp_path, MapKey("val", "features.5", "gradcam"), 3) == (
        tmp_path / "images" / "val" / "features.5" / "gradcam" / "step-00000003.png"
    )
    key = MapKey("domain/a", "features.5", "gradcam")
    FileSink(tmp_path, write_scalars=True).log(
        encode_grids({key: grid}, "png"), {SECONDS_TAG: 0.25}, 7
    )
    (png,) = (tmp_path / "images").rglob("*.png")
    assert png.relative_to(tmp_path).parts == (
        "images", "domain%2Fa", "features.5", "gradcam", "step-00000007.png"
    )  # fmt: skip
    np.testing.assert_array_equal(decode(png.read_bytes()), grid.permute(1, 2, 0).numpy())
    assert (tmp_path / "scalars.csv").read_text().splitlines() == [
        "step,tag,value",
        "7,cam_monitor/seconds,0.25",
    ]


def smooth_overlay_grid() -> torch.Tensor:
    """A photo-like overlay grid: smooth images under smooth maps (what JPEG is made for)."""
    ramp = torch.linspace(0, 1, 48)
    images = (ramp[None, None, :, None] * ramp[None, None, None, :]).expand(4, 3, 48, 48)
    return make_overlay_grid(images.contiguous(), torch.rand(4, 3, 3), nrow=2, min_tile=0)


def test_tensorboard_sink_logs_overlays_as_jpeg_and_pixel_maps_as_png(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.summary.writer import record_writer

    from cam_monitor import tensorboard_crc
    from cam_monitor.sinks import TensorBoardSink

    grid = smooth_overlay_grid()
    overlay_key, pixel_key = MapKey("val", "l4", "gradcam"), MapKey("val", "input", "saliency")
    images = {overlay_key: grid, pixel_key: grid, filter_maximised_tag("l4"): grid}
    logger = TensorBoardLogger(tmp_path, name="", version="")
    tensorboard_crc.uninstall_fast_crc()
    original = record_writer.masked_crc32c
    try:
        sink = TensorBoardSink(logger)
        if tensorboard_crc._candidate() is not None:  # crc32c installed: the sink swaps it in
            assert record_writer.masked_crc32c is not original
        sink.log(encode_grids(images, "jpeg"), {SECONDS_TAG: 0.5}, 4)
        logger.finalize("success")
    finally:
        tensorboard_crc.uninstall_fast_crc()
    events = read_events(logger.log_dir)  # TensorBoard's reader checks every record's CRC
    by_tag = {tag: events.Images(tag)[0].encoded_image_string for tag in image_tags(images)}
    jpeg = by_tag["cam/val/l4/gradcam"]
    assert jpeg[:3] == b"\xff\xd8\xff"
    error = np.abs(decode(jpeg).astype(int) - grid.permute(1, 2, 0).numpy()).mean()
    assert error < 3  # quality 90: close to the pixels
    for tag in ("cam/val/input/saliency", "filters/l4/maximised"):  # lossless where it matters
        np.testing.assert_array_equal(decode(by_tag[tag]), grid.permute(1, 2, 0).numpy())
    assert [s.value for s in events.Scalars(SECONDS_TAG)] == [0.5]
    for key, tag in zip(images, by_tag, strict=True):  # the bytes each grid was encoded to
        assert by_tag[tag] == encode_grid(grid, "jpeg" if key == overlay_key else "png")


def test_an_evaluations_scalars_are_one_event_read_back_tag_by_tag(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from cam_monitor.sinks import TensorBoardSink

    key = MapKey("val", "l4", "gradcam")
    names = [ScalarKey("cam_drift", key, f"{m}_prev") for m in ("spearman", "js", "topk_iou")]
    logger = TensorBoardLogger(tmp_path, name="", version="")
    sink = TensorBoardSink(logger)
    for step in (3, 7):
        sink.log({}, {name: step / (i + 1) for i, name in enumerate(names)}, step)
    logger.finalize("success")
    (path,) = Path(logger.log_dir).glob("events.out.tfevents.*")
    summaries = [e.summary for e in EventFileLoader(str(path)).Load() if e.HasField("summary")]
    assert [len(summary.value) for summary in summaries] == [3, 3]  # an event per evaluation
    firsts, seconds = ([v.metadata.summary_description for v in s.value] for s in summaries)
    assert all(firsts) and not any(seconds)  # described once, on the first value
    events = read_events(logger.log_dir)
    for i, name in enumerate(scalar_tags(dict.fromkeys(names, 0.0))):
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert got == [(3, pytest.approx(3 / (i + 1))), (7, pytest.approx(7 / (i + 1)))]


def test_file_sink_writes_jpeg_overlays_and_png_pixel_maps(tmp_path: Path) -> None:
    grid = smooth_overlay_grid()
    overlay_key, pixel_key = MapKey("val", "l4", "gradcam"), MapKey("val", "input", "saliency")
    FileSink(tmp_path, write_scalars=False).log(
        encode_grids({overlay_key: grid, pixel_key: grid}, "jpeg"), {}, 2
    )
    jpeg = png_path(tmp_path, overlay_key, 2, ".jpg")
    assert jpeg.read_bytes() == encode_grid(grid, "jpeg")
    png = png_path(tmp_path, pixel_key, 2)
    np.testing.assert_array_equal(decode(png.read_bytes()), grid.permute(1, 2, 0).numpy())
    assert sorted(p.name for p in tmp_path.rglob("step-*")) == [jpeg.name, png.name]
