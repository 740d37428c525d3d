"""Probe sets: specs from probe= and from loaders, sampling without randomness, masks, moving."""

from __future__ import annotations

import random
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler, TensorDataset

from cam_monitor.probe import (
    ProbeSet,
    attach_masks,
    build_probes,
    first_loader,
    loader_probe,
    looks_like_masks,
    make_probe,
    probe_sets,
)
from tests.helpers import shapes_dataset


class DrawingDataset(Dataset):
    """A dataset whose items draw from every global RNG, like a random augmentation."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        noise = random.random() + np.random.rand() + torch.rand(()).item()
        return torch.full((3, 8, 8), float(index)) + 0 * noise, index % 3


def test_build_probes_leaves_every_random_stream_where_it_was() -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    probes = build_probes({"val": DrawingDataset()}, num_probe=4)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected
    (val,) = probes.values()
    assert val.inputs[:, 0, 0, 0].tolist() == [0.0, 3.0, 6.0, 9.0]  # evenly spaced, by index
    assert val.labels.tolist() == [0, 0, 0, 0]


def test_probe_sets_split_named_sets_from_one_batch() -> None:
    x = torch.zeros(2, 3, 8, 8)
    assert probe_sets(None) is None
    assert list(probe_sets(x)) == ["probe"]
    assert list(probe_sets({"pixels": x, "y": x}, input_key="pixels")) == ["probe"]
    assert list(probe_sets({"source": x, "target": (x, torch.ones(2))})) == ["source", "target"]
    with pytest.raises(ValueError, match="empty dict"):
        probe_sets({})
    with pytest.raises(ValueError, match=r"probe set name ' source' cannot be used"):
        probe_sets({" source": x})
    with pytest.raises(TypeError, match="got str"):
        probe_sets("val")


def test_first_loader_looks_inside_lists_and_dicts() -> None:
    a = DataLoader(TensorDataset(torch.zeros(4, 1)))
    b = DataLoader(TensorDataset(torch.ones(4, 1)))
    assert first_loader([{"x": None, "y": [b, a]}]) is b
    assert first_loader(None) is None and first_loader([]) is None
    assert loader_probe([("val", None), ("train", {"t": a})]) == {"train": a}
    with pytest.raises(ValueError, match="found no DataLoader on the Trainer"):
        loader_probe([("val", None), ("train", [])])


def test_masks_from_boxes_per_set_and_unknown_names() -> None:
    images = torch.zeros(2, 3, 8, 8)
    boxes = torch.tensor([[0, 0, 4, 4], [4, 4, 8, 8]])
    probes = build_probes({"a": images, "b": images}, 2, masks={"a": boxes})
    assert probes["b"].masks is None
    assert probes["a"].masks.dtype == torch.bool and probes["a"].masks.shape == (2, 8, 8)
    assert probes["a"].masks[0, :4, :4].all() and probes["a"].masks[0].sum() == 16
    assert probes["a"].masks[1, 4:, 4:].all() and probes["a"].masks[1].sum() == 16
    with pytest.raises(ValueError, match=r"`masks` names probe set\(s\) \['c'\]"):
        build_probes({"a": images}, 2, masks={"c": boxes})
    soft = attach_masks(ProbeSet("p", images), torch.full((2, 1, 8, 8), 0.7))
    assert soft.masks.shape == (2, 8, 8) and soft.masks.all()
    with pytest.raises(ValueError, match=r"masks for probe 'p' have shape \(2, 4, 4\)"):
        attach_masks(ProbeSet("p", images), torch.zeros(2, 4, 4))


def test_a_masks_key_in_a_dict_batch_is_picked_up() -> None:
    batch = {"image": torch.zeros(2, 3, 8, 8), "label": torch.tensor([1, 2])}
    batch["mask"] = torch.zeros(2, 8, 8)
    batch["mask"][:, 2:4, 2:4] = 1
    (probe,) = build_probes(probe_sets(batch), 2).values()
    assert probe.labels.tolist() == [1, 2] and probe.masks.sum() == 8


def test_probe_set_to_moves_nested_inputs_and_keeps_their_type() -> None:
    Pair = namedtuple("Pair", "pixels ids")
    moved = ProbeSet("p", Pair(torch.zeros(2, 3), torch.arange(2)), torch.ones(2)).to("meta")
    assert type(moved.inputs) is Pair
    assert moved.inputs.pixels.is_meta and moved.inputs.ids.is_meta and moved.labels.is_meta


def test_only_mask_keys_hold_masks_and_a_batch_never_holds_boxes() -> None:
    images = torch.zeros(2, 3, 8, 8)
    segmentation = {"image": images, "segmentation": torch.ones(2, 8, 8)}
    (probe,) = build_probes(probe_sets(segmentation), 2).values()
    assert probe.masks is None
    (probe,) = build_probes({"p": (images, torch.tensor([0, 1]), torch.rand(2, 4))}, 2).values()
    assert probe.masks is None  # soft labels [B, 4], not boxes
    with pytest.raises(ValueError, match=r"shape \(2, 4\).*boxes \[B, 4\] \(through masks= only"):
        build_probes(probe_sets({"image": images, "mask": torch.tensor([[0, 0, 4, 4]] * 2)}), 2)
    assert looks_like_masks(torch.zeros(2, 1, 8, 8), images)
    assert not looks_like_masks(torch.zeros(2, 8, 4), images)


def test_several_loaders_say_the_first_is_used() -> None:
    a = DataLoader(TensorDataset(torch.zeros(4, 1)))
    b = DataLoader(TensorDataset(torch.ones(4, 1)))
    said: list[str] = []
    assert loader_probe([("val", [a, b])], said.append) == {"val": a}
    assert loader_probe([("val", a)], said.append) == {"val": a}
    assert len(said) == 1 and "2 val dataloaders; the probe comes from the first" in said[0]
    said.clear()
    named = {"digits": a, "letters": DataLoader(TensorDataset(torch.ones(6, 1)))}
    loader_probe([("val", named)], said.append)
    first_named = "the first, val_dataloaders['digits'] (a DataLoader of TensorDataset, 4 items)"
    assert first_named in said[0]


def test_float_labels_of_a_binary_classifier_are_class_indices() -> None:
    x = torch.zeros(4, 3, 8, 8)
    bce = torch.tensor([0.0, 1.0, 1.0, 0.0])  # what BCEWithLogitsLoss trains on
    for labels in (bce, bce[:, None]):
        probe = make_probe("p", (x, labels), 4)
        assert probe.labels is not None and probe.labels.dtype == torch.long
        assert probe.labels.tolist() == [0, 1, 1, 0]
    soft = torch.eye(4) * 0.9 + 0.025  # label smoothing
    multi_hot = torch.eye(4) + torch.eye(4).roll(1, dims=1)
    for not_classes in (torch.rand(4), soft, multi_hot, -bce):  # regression, soft, multi, negative
        assert make_probe("p", (x, not_classes), 4).labels is None


def test_a_loader_over_a_subset_of_the_dataset_gives_probe_items_of_that_subset() -> None:
    # One dataset, split by samplers (train 0-31, val 32-47): the val probe must hold val items.
    data = shapes_dataset(48)
    for sampler in (SubsetRandomSampler(list(range(32, 48))), range(32, 48)):
        val = DataLoader(data, batch_size=8, sampler=sampler)  # type: ignore[arg-type]
        probe = make_probe("val", val, 4)
        assert torch.equal(probe.inputs, data.tensors[0][[32, 37, 42, 47]])
        assert probe.labels is not None and torch.equal(
            probe.labels, data.tensors[1][[32, 37, 42, 47]]
        )
    whole = make_probe("val", DataLoader(data, shuffle=True), 4)  # RandomSampler: every item
    assert torch.equal(whole.inputs, data.tensors[0][[0, 16, 31, 47]])


def test_labels_that_are_not_class_indices_are_left_out_of_a_dict_batch() -> None:
    images = torch.zeros(2, 3, 8, 8)
    for labels in (["cat", "dog"], [[1, 2], [3]], torch.tensor([0.5, 1.5]), torch.ones(2, 2)):
        probe = make_probe("p", {"image": images, "label": labels}, 4)
        assert probe.labels is None and probe.inputs is images
    kept = make_probe("p", {"image": images, "label": [1, 0]}, 4).labels
    assert kept is not None and kept.tolist() == [1, 0]


def test_one_hot_labels_are_class_indices() -> None:
    x = torch.zeros(4, 3, 8, 8)
    classes = torch.tensor([2, 0, 3, 2])
    for one_hot in (torch.nn.functional.one_hot(classes, 5), torch.eye(5)[classes]):  # long, float
        probe = make_probe("p", (x, one_hot), 4)
        assert probe.labels is not None and probe.labels.dtype == torch.long
        assert probe.labels.tolist() == [2, 0, 3, 2]
    dict_probe = make_probe("p", {"image": x, "label": torch.eye(5)[classes]}, 4)
    assert dict_probe.labels is not None and dict_probe.labels.tolist() == [2, 0, 3, 2]


def test_a_dict_batch_reaches_forward_whole_with_its_image_found_by_input_key() -> None:
    """With `whole` (a `forward=` is given), every key stays, `input_key`'s image is the one
    drawn even when another float [B, C, H, W] tensor comes first; labels and masks are read
    as before, and a tuple's nested inputs are kept as they are."""
    pixels, depth = torch.rand(3, 3, 8, 8), torch.rand(3, 1, 8, 8)
    batch = {"depth": depth, "pixels": pixels, "meta": torch.ones(3, 2), "y": torch.arange(3)}
    probe = make_probe("p", batch, 3, input_key="pixels", whole=True)
    assert list(probe.inputs) == ["pixels", "depth", "meta", "y"]  # every key, the image first
    assert probe.image is pixels and probe.labels.tolist() == [0, 1, 2] and probe.length == 3
    alone = make_probe("p", batch, 3, input_key="pixels")  # no forward=: the image alone
    assert alone.inputs is pixels
    nested = make_probe("p", ((pixels, torch.ones(3, 2)), torch.arange(3), depth[:, 0] > 0.5), 3)
    assert isinstance(nested.inputs, tuple) and nested.image is pixels
    assert nested.masks is not None and nested.masks.shape == (3, 8, 8)
    with pytest.raises(TypeError, match=r"probe 'p': its inputs hold no batched tensor"):
        make_probe("p", ((1, 2), torch.arange(3)), 3)
