from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from cam_monitor import compute_cams
from cam_monitor.batch import Batch, map_tensors, move_to, tensors
from tests.helpers import TinyCNN

FIELDS = ("pixels", "ids", "table", "tag")
Sample = namedtuple("Sample", FIELDS)

# Each kind builds a batch from (pixels, ids, table, tag) and reads the four fields back.
KINDS: dict[str, tuple[Callable[..., Any], Callable[[Any], tuple[Any, ...]]]] = {
    "tuple": (lambda *f: tuple(f), tuple),
    "list": (lambda *f: list(f), tuple),
    "namedtuple": (lambda *f: Sample(*f), tuple),
    "dict": (lambda *f: dict(zip(FIELDS, f, strict=True)), lambda d: tuple(d.values())),
}


def parts(rows: int = 5) -> tuple[Tensor, Tensor, Tensor, str]:
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(rows, 3, 6, 8, generator=gen)
    ids = torch.arange(rows) * 10
    table = torch.arange(7.0)  # not batched: leading size differs from the batch
    return pixels, ids, table, "probe"


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def build(kind: str, *fields: Any) -> Any:
    return KINDS[kind][0](*fields)


def fields(kind: str, data: Any) -> tuple[Any, ...]:
    return KINDS[kind][1](data)


def test_length_image_and_image_size(kind: str) -> None:
    pixels, ids, table, tag = parts()
    batch = Batch.of(build(kind, pixels, ids, table, tag))
    assert batch.length == 5
    assert batch.image is pixels
    assert batch.image_size == (6, 8)
    assert batch.require_image() is pixels
    assert Batch.of(batch) is batch


def test_slice_keeps_the_container_and_passes_unbatched_values_through(kind: str) -> None:
    pixels, ids, table, tag = parts()
    sliced = Batch.of(build(kind, pixels, ids, table, tag)).slice(1, 4)
    assert type(sliced.data) is type(build(kind, pixels, ids, table, tag))
    got_pixels, got_ids, got_table, got_tag = fields(kind, sliced.data)
    assert torch.equal(got_pixels, pixels[1:4]) and got_ids.tolist() == [10, 20, 30]
    assert got_table is table and got_tag == tag
    assert sliced.length == 3 and sliced.image is got_pixels


def test_select_by_index_tensor(kind: str) -> None:
    pixels, ids, table, tag = parts()
    picked = Batch.of(build(kind, pixels, ids, table, tag)).select(torch.tensor([4, 0, 4]))
    got_pixels, got_ids, got_table, _ = fields(kind, picked.data)
    assert got_ids.tolist() == [40, 0, 40]
    assert torch.equal(got_pixels[1], pixels[0]) and got_table is table
    assert picked.length == 3


def test_with_image_replaces_the_image_and_indexes_the_rest(kind: str) -> None:
    pixels, ids, table, tag = parts()
    batch = Batch.of(build(kind, pixels, ids, table, tag))
    rows = torch.tensor([2, 2, 3, 0])
    noisy = torch.zeros(4, 3, 6, 8)
    replaced = batch.with_image(noisy, rows)
    got_pixels, got_ids, got_table, got_tag = fields(kind, replaced.data)
    assert got_pixels is noisy and replaced.image is noisy
    assert got_ids.tolist() == [20, 20, 30, 0]
    assert got_table is table and got_tag == tag
    whole = batch.with_image(torch.ones_like(pixels))
    assert fields(kind, whole.data)[1] is ids  # rows=None keeps the other tensors whole


def test_to_moves_every_tensor_and_keeps_the_container(kind: str) -> None:
    pixels, ids, table, tag = parts()
    moved = Batch.of(build(kind, pixels, ids, table, tag)).to("meta")
    assert type(moved.data) is type(build(kind, pixels, ids, table, tag))
    got = fields(kind, moved.data)
    assert all(t.device.type == "meta" for t in got[:3]) and got[3] == tag
    assert moved.length == 5 and moved.image_size == (6, 8)
    assert fields(kind, move_to(build(kind, pixels, ids, table, tag), "meta"))[0].is_meta


def test_usable_clones_only_inference_tensors(kind: str) -> None:
    pixels, ids, table, tag = parts()
    with torch.inference_mode():
        frozen = pixels.clone()
    usable = Batch.of(build(kind, frozen, ids, table, tag)).usable()
    got_pixels, got_ids, got_table, _ = fields(kind, usable.data)
    assert not got_pixels.is_inference() and torch.equal(got_pixels, pixels)
    assert got_ids is ids and got_table is table
    assert usable.image is got_pixels
    got_pixels.requires_grad_(True)  # refused on an inference tensor


def test_without_an_image_or_a_batched_tensor() -> None:
    tokens = Batch.of({"ids": torch.arange(6).view(2, 3), "mask": torch.ones(2, 3)})
    assert tokens.length == 2 and tokens.image is None and tokens.image_size is None
    with pytest.raises(ValueError, match=r"Noisy copies need a floating-point image tensor"):
        tokens.require_image("Noisy copies")
    with pytest.raises(ValueError, match="floating-point image"):
        tokens.with_image(torch.zeros(2, 3, 4, 4))
    nothing = Batch.of(("text", 3))
    assert nothing.length is None and nothing.slice(0, 1).data == ("text", 3)
    scalar = torch.tensor(2.0)
    assert Batch.of(scalar).length is None and Batch.of(scalar).slice(0, 1).data is scalar


def test_a_bare_tensor_and_nested_containers() -> None:
    pixels, ids, _, _ = parts()
    bare = Batch.of(pixels)
    assert bare.length == 5 and bare.image is pixels
    assert torch.equal(bare.slice(3, 5).data, pixels[3:5])
    nested = Batch.of((Sample(pixels, ids, None, "x"), {"extra": [ids]}))
    sliced = nested.slice(0, 2).data
    assert isinstance(sliced[0], Sample) and sliced[0].ids.tolist() == [0, 10]
    assert sliced[1]["extra"][0].tolist() == [0, 10]
    assert len(list(tensors(nested.data))) == 3
    assert map_tensors(nested.data, lambda t: 0)[0] == Sample(0, 0, None, "x")


def test_a_float_mask_listed_before_the_images_is_not_the_image() -> None:
    # Pixel methods differentiate and perturb `Batch.image`: in a dict it is the image key's.
    torch.manual_seed(0)
    model = TinyCNN()
    x = torch.randn(3, 3, 32, 32)
    batch = {"mask": torch.rand(3, 1, 32, 32), "image": x, "y": torch.tensor([0, 1, 2])}
    assert Batch.of(batch).image is x
    methods = ["saliency", "integrated_gradients"]
    plain = compute_cams(model, x, None, methods, ig_steps=8)
    nested = compute_cams(
        model, batch, None, methods, ig_steps=8, forward=lambda m, b: m(b["image"])
    )
    for method in methods:
        torch.testing.assert_close(nested["input", method], plain["input", method])


def test_uint8_images_are_found_for_drawing_only_where_no_float_image_is() -> None:
    pixels = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    mask = torch.zeros(2, 1, 8, 8)
    assert Batch.of(pixels).image is pixels
    assert Batch.of((pixels, torch.arange(2))).image is pixels
    assert Batch.of({"meta": torch.ones(2), "image": pixels}).image is pixels
    assert Batch.of((pixels, mask)).image is mask  # a float [B, C, H, W] still comes first
    assert Batch.of(torch.zeros(2, 3, 8, 8, dtype=torch.int64)).image is None
    with pytest.raises(ValueError, match=r"torch\.uint8.*or do without noisy copies"):
        Batch.of(pixels).require_image("Noisy copies")


def test_pixel_methods_on_a_uint8_probe_name_the_dtype() -> None:
    """A uint8 image is found, but cannot be differentiated: the message says it is uint8."""
    batch = Batch.of({"image": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "meta": torch.ones(2)})
    with pytest.raises(ValueError, match=r"torch\.uint8 \(shape \(2, 3, 8, 8\)\).*float\(\) / 255"):
        batch.require_image()
