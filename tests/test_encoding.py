"""Grids encoded once per evaluation on a few threads: the same bytes as `render.encode_grid`,
errors raised where the monitor handles them, and no thread left after `close`."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

from cam_monitor.encoding import THREAD_PREFIX, EncodedGrid, GridEncoder, encode_grids
from cam_monitor.render import encode_grid, make_overlay_grid
from cam_monitor.schema import MapKey, filter_maximised_tag


def encoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def grids() -> dict[MapKey | str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=generator)

    def overlay() -> torch.Tensor:
        return make_overlay_grid(images, torch.rand(4, 4, 4, generator=generator), nrow=2)

    return {
        MapKey("val", "layer3", "gradcam"): overlay(),
        MapKey("val", "layer4", "gradcam++"): overlay(),
        MapKey("val", "input", "saliency"): overlay(),  # a pixel-level map: always PNG
        filter_maximised_tag("layer4"): overlay(),  # a filter view: always PNG
    }


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_threads_give_the_bytes_of_one_encode_grid_per_grid(image_format: str) -> None:
    drawn = grids()
    encoder = GridEncoder(max_workers=3)
    encoded = encoder.submit(drawn, image_format).result()
    assert list(encoded) == list(drawn)  # in the order drawn
    formats = [image_format, image_format, "png", "png"]
    for (key, grid), expected in zip(drawn.items(), formats, strict=True):
        image = encoded[key]
        assert image.image_format == expected and image.suffix == (
            ".jpg" if expected == "jpeg" else ".png"
        )
        assert image.data == encode_grid(grid, expected)  # byte for byte, as the sinks wrote
        assert (image.height, image.width) == tuple(grid.shape[1:]) and image.grid is grid
    assert encode_grids(drawn, image_format) == encoded  # the same on the calling thread
    assert 1 <= len(encoder_threads()) <= 3
    encoder.close()
    assert encoder_threads() == []
    again = encoder.submit(drawn, image_format).result()  # a closed encoder starts again
    assert again == encoded
    encoder.close()
    assert encoder_threads() == []


def test_threads_are_bounded_by_the_grids_and_the_cpus() -> None:
    encoder = GridEncoder()
    assert 1 <= encoder.max_workers <= 4
    one = {MapKey("val", "layer4", "gradcam"): next(iter(grids().values()))}
    encoder.submit(one, "jpeg").result()
    assert len(encoder_threads()) == 1  # one grid, one thread
    encoder.close()
    with pytest.raises(ValueError, match="`max_workers` must be an int >= 1, got 0"):
        GridEncoder(max_workers=0)


def test_an_encoding_error_comes_from_result_once_every_grid_is_done() -> None:
    too_tall = torch.zeros(3, 65600, 8, dtype=torch.uint8)  # JPEG stops at 65500 pixels
    drawn = {MapKey("val", "l", "gradcam"): too_tall, **grids()}
    encoder = GridEncoder(max_workers=2)
    pending = encoder.submit(drawn, "jpeg")
    with pytest.raises(RuntimeError, match=r"could not encode a grid of shape \(3, 65600, 8\)"):
        pending.result()
    assert all(future.done() for future in pending._futures.values())
    encoder.close()


def test_a_copied_or_pickled_encoder_starts_without_threads() -> None:
    encoder = GridEncoder(max_workers=2)
    encoder.submit(grids(), "jpeg").result()
    for clone in (copy.deepcopy(encoder), pickle.loads(pickle.dumps(encoder))):
        assert clone.max_workers == 2 and clone._pool is None
        assert isinstance(next(iter(clone.submit(grids(), "png").result().values())), EncodedGrid)
        clone.close()
    encoder.close()
    assert encoder_threads() == []


def test_without_encoding_no_thread_starts_and_bytes_come_on_demand() -> None:
    """Where no sink needs bytes (MLflow takes pixels) nothing is encoded; a sink that reads
    `data` anyway gets the bytes `encode_grid` gives, overlays in the chosen format."""
    drawn = grids()
    encoder = GridEncoder()
    plain = encoder.submit(drawn, "jpeg", encode=False).result()
    assert encoder._pool is None and not encoder_threads()
    assert all(image.encoded is None for image in plain.values())
    assert all(plain[key].grid is grid for key, grid in drawn.items())
    eager = encoder.submit(drawn, "jpeg").result()
    assert {k: v.data for k, v in plain.items()} == {k: v.data for k, v in eager.items()}
    assert plain[MapKey("val", "layer3", "gradcam")].data[:3] == b"\xff\xd8\xff"
    encoder.close()
