"""The TensorBoard image path: OpenCV-encoded PNG summaries read back by TensorBoard itself."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from cam_monitor.render import make_overlay_grid
from cam_monitor.sinks import add_png_image


def decode(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def test_png_summary_reads_back_like_add_image(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    grid = make_overlay_grid(torch.rand(6, 3, 32, 32, generator=gen), torch.rand(6, 4, 4), nrow=3)
    writer = SummaryWriter(str(tmp_path))
    add_png_image(writer, "cam/ours", grid, 7)
    writer.add_image("cam/theirs", grid, global_step=7, dataformats="CHW")
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
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
    add_png_image(writer, "cam/x", torch.zeros(3, 4, 4, dtype=torch.uint8), 3)
    assert writer.calls == [("cam/x", 3, "CHW")]
