"""Views of signed maps (whole, positive part, negative part; colour or gray): drawing, tags,
options, and the grids a real Trainer writes to TensorBoard."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from cam_monitor import ALL_METHODS, CamMonitor
from cam_monitor.evaluation import view_grids
from cam_monitor.history import read_history
from cam_monitor.options import RenderOptions
from cam_monitor.render import colorize_signed, colorize_view, make_map_grid, make_view_grid
from cam_monitor.schema import (
    VIEWS,
    MapKey,
    image_tag,
    parse_view_method,
    view_method,
)
from tests.helpers import Lightning, fit, loader, read_events, shapes_dataset

WHITE, RED, BLUE = [247, 247, 247], [178, 24, 43], [33, 102, 172]


def pixels(colours: torch.Tensor) -> list[list[int]]:
    """The RGB triples of a [1, 3, 1, W] picture, left to right."""
    return colours[0, :, 0].T.tolist()


def test_each_view_is_rescaled_to_its_own_max() -> None:
    maps = torch.tensor([[[-4.0, 0.0, 1.0]]])  # the negative part dominates
    whole = pixels(colorize_view(maps, "all"))
    assert whole == pixels(colorize_signed(maps))
    assert whole[0] == BLUE and whole[1] == WHITE and whole[2] not in (WHITE, RED)  # 1/4: pale
    assert pixels(colorize_view(maps, "pos")) == [WHITE, WHITE, RED]  # 1 is the positive max
    assert pixels(colorize_view(maps, "neg")) == [BLUE, WHITE, WHITE]
    gray = [p[0] for p in pixels(colorize_view(maps, "all", gray=True))]
    assert gray == [0, 128, 159]  # -max black, 0 mid-gray, (1/4 + 1) / 2 * 255
    assert [p[0] for p in pixels(colorize_view(maps, "pos", gray=True))] == [0, 0, 255]
    assert [p[0] for p in pixels(colorize_view(maps, "neg", gray=True))] == [255, 0, 0]


def test_an_empty_view_is_blank_not_nan() -> None:
    positive = torch.tensor([[[0.0, 2.0, 3.0]]])
    assert pixels(colorize_view(positive, "neg")) == [WHITE] * 3
    assert pixels(colorize_view(positive, "neg", gray=True)) == [[0, 0, 0]] * 3
    assert pixels(colorize_view(torch.zeros(1, 1, 3), "all", gray=True)) == [[128] * 3] * 3


def test_the_whole_view_in_colour_is_the_signed_grid_drawn_before() -> None:
    maps = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(0))
    captions = [f"p:{i}" for i in range(5)]
    assert torch.equal(
        make_view_grid(maps, "all", captions=captions, nrow=3),
        make_map_grid(maps, signed=True, captions=captions, nrow=3),
    )
    with pytest.raises(ValueError, match=r"`view` must be one of all, pos, neg, got 'both'"):
        make_view_grid(maps, "both")


def test_view_tags_round_trip_for_every_method() -> None:
    for method in ALL_METHODS:
        for view in VIEWS:
            name = view_method(method, view)
            assert parse_view_method(name) == (method, view)
            key = MapKey("target", "input", name)
            assert image_tag(key) == f"cam/target/input/{name}"
            assert MapKey.parse(key.encoded) == key
    assert view_method("deconvnet", "all") == "deconvnet"  # the whole map keeps its old tag
    with pytest.raises(ValueError, match="view must be one of all, pos, neg, got 'Pos'"):
        view_method("deconvnet", "Pos")


def test_view_options_are_checked_where_they_are_given() -> None:
    assert RenderOptions().views == ("all",)
    assert RenderOptions(views="neg").views == ("neg",)
    assert RenderOptions(views=["pos", "all", "pos"]).views == ("pos", "all")
    with pytest.raises(ValueError, match=r"`views` got unknown name\(s\) 'positive'; choose"):
        RenderOptions(views=("all", "positive"))
    with pytest.raises(TypeError, match="`views` must be a name or a list of names"):
        RenderOptions(views=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`gray_views` must be True or False, got 'yes'"):
        CamMonitor("net.features.5", gray_views="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`views` needs at least one of all, pos, neg"):
        CamMonitor("net.features.5", views=[])


def test_gray_views_are_gray_and_keyed_by_view() -> None:
    maps = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(2))
    options = RenderOptions(views=("neg", "all"), gray_views=True, nrow=2)
    grids = view_grids("probe", "input", "deconvnet", maps, ["a", "b", "c"], options)
    assert list(grids) == [
        MapKey("probe", "input", "deconvnet_neg"),
        MapKey("probe", "input", "deconvnet"),
    ]
    for grid in grids.values():
        assert grid.dtype == torch.uint8 and (grid == grid[:1]).all()  # R = G = B
    colour = view_grids("probe", "input", "deconvnet", maps, None, RenderOptions(views="neg"))
    grid = colour[MapKey("probe", "input", "deconvnet_neg")]
    assert not (grid == grid[:1]).all()


def decode(event_image: object) -> np.ndarray:
    """An image summary's PNG as an [H, W, 3] RGB int array."""
    data = np.frombuffer(event_image.encoded_image_string, dtype=np.uint8)  # type: ignore[attr-defined]
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1].astype(int)


def test_a_trainer_logs_one_grid_per_view_of_each_signed_method(tmp_path: Path) -> None:
    probe = shapes_dataset(4, seed=3).tensors
    monitor = CamMonitor(
        "net.features.5", methods=["gradcam", "guided_backprop", "deconvnet"], probe=probe,
        views=("all", "pos", "neg"), history=False,
    )  # fmt: skip
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(monitor, tmp_path, logger=logger, max_epochs=1)
    acc = read_events(logger.log_dir, newest=True)
    signed = [f"cam/probe/input/{m}{s}" for m in ("guided_backprop", "deconvnet")
              for s in ("", "_pos", "_neg")]  # fmt: skip
    assert set(acc.Tags()["images"]) == {"cam/probe/net.features.5/gradcam", *signed}
    for method in ("guided_backprop", "deconvnet"):
        grids = {view: decode(acc.Images(f"cam/probe/input/{view_method(method, view)}")[-1])
                 for view in VIEWS}  # fmt: skip
        for view, grid in grids.items():
            red, blue = grid[..., 0], grid[..., 2]
            if view == "pos":  # white to red only (captions and padding are gray)
                assert (red >= blue).all() and (red > blue).any(), method
            elif view == "neg":  # white to blue only
                assert (blue >= red).all() and (blue > red).any(), method
            else:  # both signs, and the same tiles as the parts
                assert (red > blue).any() and (blue > red).any(), method
                assert grid.shape == grids["pos"].shape == grids["neg"].shape


def test_every_pixel_of_a_logged_signed_grid_is_its_stored_map_in_colour(
    tmp_path: Path, lightning: Lightning
) -> None:
    """The chain from the engine to TensorBoard keeps each signed map's pixels where they are and
    colours them by sign: decoded tiles of a wide probe equal the history's maps coloured."""
    images, labels = shapes_dataset(3, size=40, seed=4).tensors
    images = images[:, :, 8:32]  # 24 x 40: rows and columns cannot be swapped unseen
    monitor = CamMonitor(
        "net.features.5", methods=["integrated_gradients", "guided_gradcam"], ig_steps=8,
        probe=(images, labels), views=VIEWS, nrow=2,
    )  # fmt: skip
    logger = lightning.loggers.TensorBoardLogger(tmp_path, name="tb")
    train = loader(shapes_dataset(16, size=40))
    fit(
        monitor, tmp_path, lightning, train=train, val=False, seed=None, logger=logger, max_epochs=1
    )
    acc = read_events(logger.log_dir, newest=True)
    last = read_history(Path(logger.log_dir) / "cam_monitor")[-1]
    for layer, method in (("input", "integrated_gradients"), ("net.features.5", "guided_gradcam")):
        maps = torch.from_numpy(last.maps[MapKey("probe", layer, method)])
        assert (maps > 0).any() and (maps < 0).any(), method  # both signs to draw
        for view in VIEWS:
            event = acc.Images(image_tag(MapKey("probe", layer, view_method(method, view))))[-1]
            assert event.step == last.step
            grid, expected = decode(event), colorize_view(maps, view).numpy()
            for index in range(3):  # 96 x 160 tiles (4x enlarged), captions below, 2 per row
                row, column = divmod(index, 2)
                top, left = 2 + row * (grid.shape[0] - 2) // 2, 2 + column * 162
                tile = grid[top : top + 96 : 4, left : left + 160 : 4]
                assert (tile == expected[index].transpose(1, 2, 0)).all(), (method, view, index)
