from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from torchvision.utils import make_grid

from cam_monitor import render
from cam_monitor.methods import normalize_maps, upsample_maps
from cam_monitor.render import (
    COLORMAPS,
    caption_text,
    caption_tiles,
    check_colormap,
    choose_captions,
    colorize,
    colorize_signed,
    make_map_grid,
    make_overlay_grid,
    make_overlay_grids,
    overlay,
    to_jpeg_bytes,
    to_png_bytes,
    to_uint8_images,
)
from tests.helpers import dispatched_ops

GEN = torch.Generator().manual_seed(0)


def random_u8(*shape: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=GEN, dtype=torch.uint8)


def grid_size(batch: int, nrow: int, tile_h: int, tile_w: int, padding: int) -> tuple[int, int]:
    cols = min(nrow, batch)
    rows = math.ceil(batch / cols)
    return rows * (tile_h + padding) + padding, cols * (tile_w + padding) + padding


# --- colormaps ---------------------------------------------------------------------------


def test_jet_endpoints_are_in_rgb_order() -> None:
    low, high = colorize(torch.tensor([[[0.0, 1.0]]]), "jet")[0, :, 0].T.int()
    r, _, b = low.tolist()
    assert b > 100 and r < 50  # 0 is blue
    r, _, b = high.tolist()
    assert r > 100 and b < 50  # 1 is red


@pytest.mark.parametrize("name", [n for n in COLORMAPS if n != "gray"])
def test_lut_equals_cv2_apply_colormap_on_a_ramp(name: str) -> None:
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = cv2.applyColorMap(ramp, COLORMAPS[name])[:, :, ::-1]  # BGR -> RGB
    got = colorize(torch.from_numpy(ramp).float()[None] / 255, name)[0].permute(1, 2, 0)
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), expected)


def test_expected_colormaps_exist_and_gray_is_identity() -> None:
    for name in ("jet", "turbo", "viridis", "inferno", "magma", "plasma", "hot", "bone", "gray"):
        assert check_colormap(name) == name
    ramp = torch.arange(256.0).view(1, 1, 256) / 255
    out = colorize(ramp, "gray")[0, :, 0]
    assert torch.equal(out, torch.arange(256).to(torch.uint8).expand(3, 256))


def test_colorize_clamps_and_treats_nan_as_zero() -> None:
    wild = torch.tensor([[[-3.0, 7.0, float("nan"), float("inf")]]])
    tame = torch.tensor([[[0.0, 1.0, 0.0, 1.0]]])
    assert torch.equal(colorize(wild, "viridis"), colorize(tame, "viridis"))


def test_unknown_colormap_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"Unknown colormap 'nope'; choose from .*jet"):
        check_colormap("nope")
    with pytest.raises(ValueError, match="Unknown colormap 'diverging'"):
        colorize(torch.zeros(1, 2, 2), "diverging")  # signed-only
    assert check_colormap("diverging", signed=True) == "diverging"


def test_colorize_signed_is_symmetric_around_a_neutral_zero() -> None:
    maps = torch.tensor([[[-4.0, -1.0, 0.0, 1.0, 4.0]]])
    out = colorize_signed(maps)[0, :, 0].T.int()  # [5, 3] RGB
    neg, _, zero, _, pos = out
    assert zero[0] == zero[1] == zero[2] and zero[0] > 200  # white-ish
    assert neg[2] > neg[0] and pos[0] > pos[2]  # blue for negative, red for positive
    # per-image scaling: multiplying a map by a positive constant changes nothing
    assert torch.equal(colorize_signed(maps * 10), colorize_signed(maps))
    # a map that is all zero is all neutral, not NaN-coloured
    assert torch.equal(colorize_signed(torch.zeros(1, 1, 3))[0, :, 0, 0], zero.to(torch.uint8))


def test_colorize_signed_scales_each_image_by_its_own_max() -> None:
    maps = torch.stack([torch.tensor([[1.0, -1.0]]), torch.tensor([[100.0, -100.0]])])
    out = colorize_signed(maps)
    assert torch.equal(out[0], out[1])


def test_colorize_signed_gray_shows_normalised_magnitude() -> None:
    maps = torch.tensor([[[-2.0, 0.0, 1.0]]])
    expected = colorize(torch.tensor([[[1.0, 0.0, 0.5]]]), "gray")
    assert torch.equal(colorize_signed(maps, "gray"), expected)


# --- images ------------------------------------------------------------------------------


def test_mean_std_round_trips_a_known_image() -> None:
    image = random_u8(2, 3, 8, 8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    normed = (image.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(
        3, 1, 1
    )
    assert torch.equal(to_uint8_images(normed, mean, std), image)


def test_min_max_is_per_image_and_constant_images_become_zero() -> None:
    images = torch.stack(
        [
            torch.linspace(-5, 5, 3 * 4 * 4).view(3, 4, 4),
            torch.linspace(0.2, 0.3, 3 * 4 * 4).view(3, 4, 4),
            torch.full((3, 4, 4), 0.7),
        ]
    )
    out = to_uint8_images(images)
    assert out.dtype == torch.uint8
    for i in (0, 1):
        assert out[i].min() == 0 and out[i].max() == 255
    assert torch.equal(out[2], torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_grayscale_becomes_three_equal_channels_and_uint8_passes_through() -> None:
    gray = random_u8(2, 1, 5, 5)
    out = to_uint8_images(gray)
    assert out.shape == (2, 3, 5, 5)
    for c in range(3):
        assert torch.equal(out[:, c], gray[:, 0])
    rgb = random_u8(2, 3, 5, 5)
    assert torch.equal(to_uint8_images(rgb), rgb)


def test_other_channel_counts_draw_the_first_three_or_the_first_as_grey() -> None:
    rgba, two = torch.rand(2, 4, 8, 8, generator=GEN), torch.rand(2, 2, 8, 8, generator=GEN)
    assert torch.equal(to_uint8_images(rgba), to_uint8_images(rgba[:, :3]))
    assert torch.equal(to_uint8_images(two), to_uint8_images(two[:, :1]))
    mean, std = [0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]
    assert torch.equal(
        to_uint8_images(rgba, mean, std), to_uint8_images(rgba[:, :3], mean[:3], std[:3])
    )
    with pytest.raises(ValueError, match="`mean` has 3 values but the images have 4 channels"):
        to_uint8_images(rgba, mean[:3], std[:3])


def test_bad_images_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="permute"):
        to_uint8_images(torch.rand(2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        to_uint8_images(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="`mean` has 2 values but the images have 3 channels"):
        to_uint8_images(torch.rand(1, 3, 4, 4), mean=[0.5, 0.5], std=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="`std` has 1 values"):
        to_uint8_images(torch.rand(1, 3, 4, 4), mean=[0.5] * 3, std=[1.0])


# --- overlay -----------------------------------------------------------------------------


def test_overlay_endpoints_return_the_inputs_and_blends_in_between() -> None:
    images, heat = random_u8(2, 3, 6, 6), random_u8(2, 3, 6, 6)
    assert torch.equal(overlay(images, heat, 0.0), images)
    assert torch.equal(overlay(images, heat, 1.0), heat)
    a = torch.full((1, 3, 1, 1), 100, dtype=torch.uint8)
    b = torch.full((1, 3, 1, 1), 201, dtype=torch.uint8)
    assert overlay(a, b, 0.25).flatten().tolist() == [125] * 3  # 75 + 50.25


def test_overlay_refuses_bad_alpha_and_shapes() -> None:
    images = random_u8(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\], got 1.5"):
        overlay(images, images, 1.5)
    with pytest.raises(ValueError, match="same shape"):
        overlay(images, random_u8(1, 3, 4, 5), 0.5)
    with pytest.raises(ValueError, match="uint8"):
        overlay(images.float(), images, 0.5)


# --- captions ----------------------------------------------------------------------------


def test_captions_change_pixels_in_the_band_only() -> None:
    tiles = random_u8(2, 3, 96, 96)
    out = caption_tiles(tiles, ["ok pred cat / true cat", ""])
    assert out.shape[:2] == (2, 3) and out.shape[3] == 96 and out.shape[2] > 96
    assert torch.equal(out[:, :, :96], tiles)
    band_with_text, empty_band = out[0, :, 96:], out[1, :, 96:]
    assert empty_band.unique().numel() == 1  # a plain dark band
    assert empty_band.max() < 64
    assert band_with_text.max() > 200  # white text drawn


def test_long_captions_are_truncated_and_keep_one_band_height() -> None:
    tiles = random_u8(2, 3, 32, 40)
    out = caption_tiles(tiles, ["x", "a very long caption that cannot fit " * 3])
    assert out.shape[2] > 32 and out.shape[3] == 40
    # the truncated caption stays inside its tile: the right margin column is untouched
    assert out[1, :, 32:, -1].unique().numel() == 1


def test_choose_captions_takes_the_first_list_that_fits_whole() -> None:
    long = ["ok pred square / true square", "x pred triangle / true square"]
    short = ["ok p:square t:square", "x p:triangle t:square"]
    assert choose_captions([long, short], 256, 256) == long
    assert choose_captions([long, short], 32, 32) == short  # tiles enlarged to 96 px
    assert choose_captions([long, short], 32, 32, min_tile=0) == short  # none fits: the last
    with pytest.raises(ValueError, match="at least one"):
        choose_captions([], 32, 32)


def test_probe_grids_use_compact_class_names_on_small_tiles() -> None:
    from cam_monitor.engine import CamResult
    from cam_monitor.evaluation import render_probe
    from cam_monitor.options import RenderOptions
    from cam_monitor.probe import ProbeSet
    from cam_monitor.schema import MapKey

    names = ["square", "triangle", "circle", "plus", "star"]
    logits = torch.tensor([[5.0, 0, 0, 0, 0], [0, 1, 3, 0, 0]])  # predicts square, circle
    maps = torch.rand(2, 4, 4, generator=GEN)
    result = CamResult(
        maps={("features.3", "gradcam"): maps}, targets=torch.zeros(2), logits=logits
    )
    expected = {  # written out: small tiles get the compact form, large ones the long one
        32: ["ok square", "x p:circle t:triangle"],
        192: ["ok pred square / true square", "x pred circle / true triangle"],
    }
    for size, captions in expected.items():
        images = torch.rand(2, 3, size, size, generator=GEN)
        probe = ProbeSet("val", images, labels=torch.tensor([0, 1]))
        grids = render_probe(probe, result, RenderOptions(class_names=names))
        grid = grids[MapKey("val", "features.3", "gradcam")]
        assert torch.equal(grid, make_overlay_grid(images, maps, captions=captions))
        other = expected[224 - size]  # the other form draws different pixels
        assert not torch.equal(grid, make_overlay_grid(images, maps, captions=other))


# What the glyph atlas promises, in terms any OpenCV release keeps: each character is OpenCV's
# own glyph, the pen advances by OpenCV's own advance width, and the text starts at the margin
# and stays inside the tile. A single cv2.putText call of the whole text is not the reference:
# it places glyphs at fractional advances that change between releases (measured against the
# atlas, up to 8 px apart at a caption's end on OpenCV 4.10-4.14 and 5.1, 0 px on 5.0).
CAPTION_TEXTS = ["ok pred cat / true cat", "x p:3 t:5", "Ag_j/|}{~ il1 WMW", "x pred 7 / true 1"]
PRINTABLE = [chr(code) for code in range(33, 127)]


def caption_bands(texts: list[str], width: int) -> np.ndarray:
    """The gray caption bands [B, band, W] that caption_tiles adds under 8-pixel-high tiles."""
    bands = caption_tiles(random_u8(len(texts), 3, 8, width), texts)[:, :, 8:]
    assert torch.equal(bands[:, 0], bands[:, 1]) and torch.equal(bands[:, 0], bands[:, 2])
    return bands[:, 0].numpy()


def caption_scale(texts: list[str], width: int) -> float:
    """The font scale caption_tiles promises: the tile width over 192 (scale 1 on a 192-pixel
    tile), in [0.35, 1], shrunk until every caption fits between the margins whole (not below
    0.35)."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    widest = max(cv2.getTextSize(t, font, 1.0, 1)[0][0] for t in texts if t)
    scale = max(min(width / render._CAPTION_WIDTH, 1.0, (width - 6) / widest), 0.35)
    while scale > 0.35 and any(cv2.getTextSize(t, font, scale, 1)[0][0] > width - 6 for t in texts):
        scale = max(scale * 0.98, 0.35)  # text width is not proportional to the scale
    return scale


def test_class_names_too_long_for_the_tiles_give_class_numbers_not_a_cut_off_true_class() -> None:
    from cam_monitor.engine import CamResult
    from cam_monitor.evaluation import render_probe
    from cam_monitor.options import RenderOptions
    from cam_monitor.probe import ProbeSet
    from cam_monitor.schema import MapKey

    names = [f"very_long_class_name_number_{i:02d}" for i in range(20)]
    logits = torch.zeros(3, 20)
    logits[torch.arange(3), torch.tensor([4, 11, 7])] = 1.0  # right, wrong, wrong
    maps = torch.rand(3, 2, 2, generator=GEN)
    result = CamResult(
        maps={("features.3", "gradcam"): maps}, targets=torch.zeros(3), logits=logits
    )
    images = torch.rand(3, 3, 8, 8, generator=GEN)
    probe = ProbeSet("val", images, labels=torch.tensor([4, 12, 19]))
    grid = render_probe(probe, result, RenderOptions(class_names=names))[
        MapKey("val", "features.3", "gradcam")
    ]
    captions = ["ok 4", "x p:11 t:12", "x p:7 t:19"]
    assert torch.equal(grid, make_overlay_grid(images, maps, captions=captions))


@pytest.mark.parametrize("width", [40, 96, 224])
def test_each_caption_character_is_opencvs_own_glyph_at_the_left_margin(width: int) -> None:
    # Drawn alone, every printable character is exactly what cv2.putText draws at the left
    # margin (3 px) on the band's gray, whole (no stroke cut by the band's edges), on one
    # baseline shared by all characters.
    bands = caption_bands(PRINTABLE, width)
    scale = caption_scale(PRINTABLE, width)
    height = bands.shape[1]
    baselines = set()
    for band, char in zip(bands, PRINTABLE, strict=True):
        found = []
        for y in range(height + 1):
            reference = np.full_like(band, 24)
            cv2.putText(reference, char, (3, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, 1,
                        cv2.LINE_AA)  # fmt: skip
            if np.array_equal(band, reference) and (reference != 24).any():
                found.append(y)
        assert found, f"{char!r} is not OpenCV's glyph at the margin"
        baselines.add(found[0])
        # and the band holds the whole glyph: drawn with room all round, nothing lies outside
        roomy = np.full((height + 40, width), 24, np.uint8)
        cv2.putText(roomy, char, (3, found[0] + 20), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, 1,
                    cv2.LINE_AA)  # fmt: skip
        assert np.array_equal(roomy[20 : 20 + height], band), f"{char!r} is clipped"
        assert (roomy[:20] == 24).all() and (roomy[20 + height :] == 24).all(), char
    assert len(baselines) == 1  # one baseline: glyphs of a caption line up


@pytest.mark.parametrize("width", [40, 96, 224])
def test_caption_text_is_its_glyphs_side_by_side_at_opencvs_advances(width: int) -> None:
    # A caption is its characters drawn alone (previous test), each moved right by the advance
    # widths OpenCV gives the characters before it, brighter pixel kept where edges overlap.
    texts = [*CAPTION_TEXTS, *PRINTABLE]
    bands = caption_bands(texts, width)
    scale = caption_scale(texts, width)
    font = cv2.FONT_HERSHEY_SIMPLEX
    glyph = {char: band for char, band in zip(PRINTABLE, bands[len(CAPTION_TEXTS) :], strict=True)}
    blank = np.full_like(bands[0], 24)

    def advance(char: str) -> int:  # getTextSize adds the same constant to every width
        return (
            cv2.getTextSize(char * 2, font, scale, 1)[0][0]
            - cv2.getTextSize(char, font, scale, 1)[0][0]
        )

    for band, text in zip(bands[: len(CAPTION_TEXTS)], CAPTION_TEXTS, strict=True):
        expected, pen = blank.copy(), 0
        fitted = render._fit(text, scale, width - 6)
        for char in fitted:
            if char != " ":
                shifted = np.full_like(blank, 24)
                shifted[:, pen:] = (
                    glyph[char][:, : width - pen] if pen < width else shifted[:, pen:]
                )
                np.maximum(expected, shifted, out=expected)
            pen += advance(char)
        assert np.array_equal(band, expected), fitted
        ink = np.flatnonzero((band > 128).any(axis=0))
        assert ink[0] >= 2 and ink[-1] <= width - 2, fitted  # inside the tile, margins kept


@pytest.mark.parametrize("width", range(40, 200, 4))
def test_captions_that_fit_at_the_smallest_scale_are_drawn_whole(width: int) -> None:
    # choose_captions promises a list that fits at the smallest legible scale is drawn whole;
    # the scale chosen from the tile width must keep that promise (no '..' for a pixel).
    texts = ["triangle IoU 0.91", "x p:circle t:square", "ok square"]
    room = width - 6
    fits = all(cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, 0.35, 1)[0][0] <= room for t in texts)
    scale = render._caption_scale(texts, room, width)
    assert scale == caption_scale(texts, width)
    if fits:
        assert [render._fit(t, scale, room) for t in texts] == texts


def test_caption_count_must_match_tiles() -> None:
    with pytest.raises(ValueError, match="Got 1 captions for 2 tiles"):
        caption_tiles(random_u8(2, 3, 8, 8), ["only one"])


def test_caption_text_marks_right_and_wrong_and_unknown() -> None:
    names = ["cat", "dog"]
    assert caption_text([0, 1, -1], [0, 0, 1], names) == [
        "ok pred cat / true cat",
        "x pred dog / true cat",
        "pred - / true dog",
    ]
    assert caption_text(torch.tensor([3, 4]), torch.tensor([5, 4]), compact=True) == [
        "x p:3 t:5",
        "ok 4",
    ]
    assert caption_text([2]) == ["pred 2"]
    assert all(text.isascii() for text in caption_text([0, 1], [1, 1], names))
    with pytest.raises(ValueError, match="2 predicted but 1 true"):
        caption_text([0, 1], [0])
    with pytest.raises(ValueError, match="Class index 5 is out of range for 2"):
        caption_text([5], None, names)


# --- grids -------------------------------------------------------------------------------


def test_overlay_grid_shape_by_hand() -> None:
    images, maps = torch.rand(5, 3, 32, 32, generator=GEN), torch.rand(5, 4, 4, generator=GEN)
    grid = make_overlay_grid(images, maps, nrow=2, min_tile=0, padding=3)
    assert grid.dtype == torch.uint8 and grid.device.type == "cpu"
    assert tuple(grid.shape) == (3, *grid_size(5, 2, 32, 32, 3))
    # small tiles are enlarged by an integer factor: 32 -> 96
    grid = make_overlay_grid(images, maps, nrow=8, min_tile=96, padding=2)
    assert tuple(grid.shape) == (3, *grid_size(5, 8, 96, 96, 2))


def test_single_tile_grid_keeps_its_padding() -> None:
    grid = make_overlay_grid(torch.rand(1, 3, 10, 12), torch.rand(1, 3, 3), min_tile=0, padding=2)
    assert tuple(grid.shape) == (3, 14, 16)


@pytest.mark.parametrize("count", [2, 3, 8, 9, 17])
@pytest.mark.parametrize(("nrow", "padding"), [(1, 0), (3, 2), (8, 1), (20, 4)])
def test_tile_grid_lays_tiles_out_as_torchvisions_make_grid(
    count: int, nrow: int, padding: int
) -> None:
    tiles = random_u8(count, 3, 5, 7)
    expected = make_grid(tiles, nrow=nrow, padding=padding, pad_value=0)
    assert torch.equal(render.tile_grid(tiles, nrow, padding), expected)
    floats = torch.rand(count, 3, 4, 4, generator=GEN)
    expected = make_grid(floats, nrow=nrow, padding=padding, pad_value=0.5)
    assert torch.equal(render.tile_grid(floats, nrow, padding, pad_value=0.5), expected)


def test_drawing_more_tiles_dispatches_no_more_ops() -> None:
    # make_grid copied tile by tile: one kernel per tile and grid on a GPU
    def drawn(count: int) -> int:
        images, maps = torch.rand(count, 3, 8, 8, generator=GEN), torch.rand(count, 2, 2)
        captions = caption_text(list(range(count)), None, compact=True)

        def draw() -> None:
            make_overlay_grid(images, maps, captions=captions, min_tile=16, nrow=4)

        draw()  # the caption bands of these captions are drawn and cached
        return dispatched_ops(draw)

    assert drawn(16) == drawn(4)


def test_overlay_grids_drawn_together_equal_those_drawn_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = torch.rand(5, 3, 12, 12, generator=GEN)
    maps = {i: torch.rand(5, 3 + i % 3, 4, generator=GEN) * i for i in range(7)}  # one all zero
    captions = caption_text(list(range(5)), [0, 1, 2, 3, 0], compact=True)
    regions = torch.rand(5, 12, 12, generator=GEN) > 0.5

    def draw() -> dict[int, torch.Tensor]:
        return make_overlay_grids(
            images, maps, captions=captions, regions=regions, min_tile=24, nrow=2, alpha=0.4
        )

    together = draw()
    monkeypatch.setitem(render._DRAW_BYTES, "cpu", 1)  # one grid per pass
    one_by_one = draw()
    assert list(together) == list(one_by_one) == list(maps)
    for key, grid in together.items():
        assert grid.dtype == torch.uint8 and torch.equal(grid, one_by_one[key]), key
    monkeypatch.setitem(render._DRAW_BYTES, "cpu", 3 * 5 * 3 * 24 * 24 * 12)  # 3 a pass
    assert all(torch.equal(g, together[k]) for k, g in draw().items())


def test_more_overlay_grids_of_a_probe_cost_only_their_upsampling_in_ops() -> None:
    # one pass draws them all: a grid costs its map's upsampling, not a colour lookup, a blend,
    # captions, a layout and a host copy of its own (42 ops a grid before)
    images, regions = torch.rand(8, 3, 16, 16, generator=GEN), torch.rand(8, 16, 16) > 0.5
    captions = caption_text(list(range(8)), None, compact=True)

    def ops(count: int) -> int:
        maps = {i: torch.rand(8, 4 + i % 2, 4, generator=GEN) for i in range(count)}

        def draw() -> None:
            make_overlay_grids(images, maps, captions=captions, regions=regions, min_tile=32)

        draw()
        return dispatched_ops(draw)

    assert ops(8) - ops(2) <= 5 * 6


def test_overlay_grid_with_captions_adds_the_band_height() -> None:
    images, maps = torch.rand(3, 1, 20, 20, generator=GEN), torch.rand(3, 5, 5, generator=GEN)
    caps = caption_text([0, 1, 2], [0, 1, 1], compact=True)
    band = caption_tiles(random_u8(1, 3, 100, 100), caps[:1]).shape[2] - 100
    grid = make_overlay_grid(images, maps, captions=caps, nrow=3, min_tile=96, padding=1)
    assert tuple(grid.shape) == (3, *grid_size(3, 3, 100 + band, 100, 1))


def test_overlay_grid_content_alpha_zero_is_the_image_alpha_one_is_the_heat() -> None:
    image = random_u8(1, 3, 16, 16)
    cam = torch.zeros(1, 4, 4)
    cam[0, 0, 0] = 5.0  # hot top-left corner at layer resolution
    plain = make_overlay_grid(image, cam, alpha=0.0, min_tile=0, padding=0)
    assert torch.equal(plain, image[0])
    heat = make_overlay_grid(image, cam, alpha=1.0, min_tile=0, padding=0).int()
    assert heat[0, 0, 0] > heat[2, 0, 0]  # red where the CAM is hot
    assert heat[2, -1, -1] > heat[0, -1, -1]  # blue where it is cold


def test_overlay_grids_of_one_probe_equal_the_step_by_step_overlay() -> None:
    images = torch.randn(3, 3, 20, 20, generator=GEN)
    maps = {"a": torch.rand(3, 5, 5, generator=GEN), "b": torch.rand(3, 2, 2, generator=GEN) * 9}
    grids = make_overlay_grids(images, maps, colormap="turbo", alpha=0.3, min_tile=40, nrow=3)
    assert list(grids) == ["a", "b"]
    pictures = to_uint8_images(images).repeat_interleave(2, 2).repeat_interleave(2, 3)
    for key, cams in maps.items():
        one = make_overlay_grid(images, cams, colormap="turbo", alpha=0.3, min_tile=40, nrow=3)
        assert torch.equal(grids[key], one)
        heat = colorize(normalize_maps(upsample_maps(cams, (40, 40))), "turbo")
        by_steps = overlay(pictures, heat, 0.3)
        assert torch.equal(grids[key][:, 2:42, 2:42], by_steps[0])  # the first tile, exactly


def test_overlay_grid_denormalises_with_mean_and_std() -> None:
    image = random_u8(1, 3, 8, 8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    normed = (image.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(
        3, 1, 1
    )
    grid = make_overlay_grid(
        normed, torch.rand(1, 2, 2), alpha=0.0, mean=mean, std=std, min_tile=0, padding=0
    )
    assert torch.equal(grid, image[0])


def test_overlay_grid_refuses_mismatched_batches() -> None:
    with pytest.raises(ValueError, match="same size"):
        make_overlay_grid(torch.rand(2, 3, 8, 8), torch.rand(3, 2, 2))
    with pytest.raises(ValueError, match="Unknown colormap"):
        make_overlay_grid(torch.rand(2, 3, 8, 8), torch.rand(2, 2, 2), colormap="rainbowz")


def test_overlay_grid_outlines_each_region_one_screen_pixel_wide() -> None:
    """A region (a mask, the pixels labelled with the explained class) is drawn as its inner
    border in white, after enlarging: one screen pixel wide, nothing else changed."""
    regions = torch.zeros(2, 8, 8, dtype=torch.bool)
    regions[0, 2:6, 3:7] = True  # image 1 has no region: drawn as without
    images, maps = torch.rand(2, 3, 8, 8, generator=GEN), torch.rand(2, 2, 2, generator=GEN)
    plain = make_overlay_grid(images, maps, nrow=2, min_tile=16, padding=0)
    drawn = make_overlay_grid(images, maps, nrow=2, min_tile=16, padding=0, regions=regions)
    inside = torch.zeros(16, 32, dtype=torch.bool)
    inside[4:12, 6:14] = True
    border = inside.clone()
    border[5:11, 7:13] = False
    assert bool((drawn[:, border] == 255).all())
    assert torch.equal(drawn[:, ~border], plain[:, ~border])
    with pytest.raises(ValueError, match=r"regions must be \[B, H, W\] like the images"):
        make_overlay_grid(images, maps, regions=regions[:, :4])


def test_map_grid_enlarges_with_crisp_pixels() -> None:
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    grid = make_map_grid(maps, signed=False, colormap="gray", min_tile=8, padding=0)
    assert tuple(grid.shape) == (3, 8, 8)
    expected = torch.tensor([[0, 85], [170, 255]]).repeat_interleave(4, 0).repeat_interleave(4, 1)
    for c in range(3):
        assert torch.equal(grid[c].int(), expected)


def test_signed_map_grid_shape_and_neutral_zero() -> None:
    maps = torch.randn(3, 6, 6, generator=GEN)
    maps[:, 0, 0] = 0.0
    grid = make_map_grid(maps, signed=True, nrow=2, min_tile=0, padding=1)
    assert tuple(grid.shape) == (3, *grid_size(3, 2, 6, 6, 1))
    corner = grid[:, 1, 1]  # first tile's (0, 0) pixel, past the padding
    assert torch.equal(corner, colorize_signed(torch.zeros(1, 1, 1))[0, :, 0, 0])


# --- PNG ---------------------------------------------------------------------------------


def test_png_round_trip_gives_back_the_pixels() -> None:
    grid = random_u8(3, 21, 34)
    decoded = cv2.imdecode(np.frombuffer(to_png_bytes(grid), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decoded[:, :, ::-1], grid.permute(1, 2, 0).numpy())


def test_png_refuses_non_grids() -> None:
    with pytest.raises(ValueError, match=r"uint8 \[3, H, W\]"):
        to_png_bytes(torch.rand(3, 4, 4))


def test_jpeg_keeps_the_colours_of_a_smooth_overlay_and_refuses_bad_quality() -> None:
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8)
    grid = torch.stack(
        [
            ramp[None].expand(48, 64),
            ramp[:, None].expand(64, 48).T,
            torch.full((48, 64), 90, dtype=torch.uint8),
        ]
    )
    data = to_jpeg_bytes(grid, quality=90)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    error = np.abs(decoded.astype(int) - grid.permute(1, 2, 0).numpy().astype(int))
    assert decoded.shape == (48, 64, 3) and error.mean() < 3
    smooth = (torch.linspace(0, 1, 64)[:, None] * torch.linspace(0, 1, 64)).expand(4, 3, 64, 64)
    photo_like = make_overlay_grid(smooth.contiguous(), torch.rand(4, 4, 4, generator=GEN))
    assert len(to_jpeg_bytes(photo_like)) < len(to_png_bytes(photo_like))
    with pytest.raises(ValueError, match="quality"):
        to_jpeg_bytes(grid, quality=0)
    with pytest.raises(ValueError, match=r"uint8 \[3, H, W\]"):
        to_jpeg_bytes(torch.rand(3, 4, 4))


def test_unsigned_pixel_maps_use_the_chosen_colormap() -> None:
    """`colormap=` colours every heat map: saliency grids too, not jet regardless."""
    from cam_monitor.engine import CamResult
    from cam_monitor.evaluation import render_probe
    from cam_monitor.options import RenderOptions
    from cam_monitor.probe import ProbeSet
    from cam_monitor.schema import MapKey

    maps = torch.rand(2, 8, 8, generator=GEN)
    result = CamResult(
        maps={("input", "saliency"): maps, ("input", "smoothgrad"): maps},
        targets=torch.zeros(2),
        logits=torch.zeros(2, 3),
    )
    probe = ProbeSet("val", torch.rand(2, 3, 8, 8, generator=GEN))
    grids = render_probe(probe, result, RenderOptions(colormap="viridis"))
    drawn = {name: make_map_grid(maps, signed=False, colormap=name) for name in ("viridis", "jet")}
    for method in ("saliency", "smoothgrad"):
        tiles = grids[MapKey("val", "input", method)][:, :98]  # the first row, above its captions
        assert torch.equal(tiles, drawn["viridis"][:, :98])
        assert not torch.equal(tiles, drawn["jet"][:, :98])


def test_a_probe_above_max_tiles_draws_its_evenly_spaced_images_with_their_captions() -> None:
    """`max_tiles=3` of 7 images draws rows 0, 3 and 6, each with its own map and caption: the
    grids equal those of a probe made of those rows alone."""
    from cam_monitor import compute_cams
    from cam_monitor.evaluation import render_probe
    from cam_monitor.options import RenderOptions
    from cam_monitor.probe import ProbeSet
    from tests.helpers import TinyCNN, shapes

    torch.manual_seed(0)
    model, (x, y, _) = TinyCNN().eval(), shapes(7, seed=2)
    methods = ["gradcam", "saliency"]
    result = compute_cams(model, x, "features.5", methods)
    bounded = render_probe(ProbeSet("p", x, y), result, RenderOptions(max_tiles=3))
    rows = torch.tensor([0, 3, 6])
    alone = compute_cams(model, x[rows], "features.5", methods)
    expected = render_probe(ProbeSet("p", x[rows], y[rows]), alone, RenderOptions())
    assert bounded.keys() == expected.keys()
    for key, grid in bounded.items():
        assert torch.equal(grid, expected[key]), key


def test_the_display_warning_is_for_other_channel_counts_not_for_channels_last() -> None:
    from cam_monitor.evaluation import display_warning
    from cam_monitor.probe import ProbeSet

    four = ProbeSet("rgba", torch.rand(2, 4, 8, 8))
    assert "4-channel images" in str(display_warning(four))
    assert display_warning(ProbeSet("rgb", torch.rand(2, 3, 8, 8))) is None
    # [B, H, W, 3] is no 8-channel image: drawing refuses it, naming the permute
    assert display_warning(ProbeSet("last", torch.rand(2, 8, 8, 3))) is None
