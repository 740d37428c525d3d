"""Synthetic two-domain shapes: a tiny, deterministic stand-in for a domain-adaptation benchmark.

`make_shapes(n, domain)` draws one shape per image (square, circle, triangle or plus, at a
random place, scale and small rotation) and returns normalised images, labels and the shape's
pixel masks. Everything is generated in batched torch from a seed; nothing is downloaded.

* ``"source"``: a plain dark background with faint pixel noise, shapes in light warm colours.
* ``"target"``: a coloured texture background (smooth random colour blobs and pixel noise),
  shapes in light cool colours. A model trained on the source alone has only ever seen shapes
  as the bright part of a dark image; on target images its attention drifts to bright blobs of
  background. A domain-adapted model (DANN) keeps looking at the shape.

Images are normalised with `MEAN` and `STD` (per channel, the pixel statistics of an even mix of
both domains, rounded), so ``image * STD + MEAN`` gives back RGB in ``[0, 1]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

CLASSES: tuple[str, ...] = ("square", "circle", "triangle", "plus")
DOMAINS: tuple[str, ...] = ("source", "target")

#: Per-channel mean and std used to normalise the images (an even mix of both domains).
MEAN: tuple[float, float, float] = (0.31, 0.31, 0.31)
STD: tuple[float, float, float] = (0.29, 0.29, 0.29)

# Shape colours (RGB in [0, 1]); colour never depends on the class.
# Light tints in both domains, so a shape stays bright in every channel.
_WARM = ((1.0, 0.85, 0.7), (1.0, 0.75, 0.55), (0.95, 0.95, 0.7), (1.0, 0.7, 0.8))
_COOL = ((0.55, 0.9, 1.0), (0.6, 0.7, 1.0), (0.6, 1.0, 0.7), (0.8, 0.65, 1.0))


def class_names() -> list[str]:
    """The class names, indexed by label."""
    return list(CLASSES)


def _shape_masks(labels: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """Bool masks [n, size, size]: one shape per image at a random centre, scale and rotation."""
    n = labels.shape[0]
    radius = size * (0.18 + 0.16 * torch.rand(n, generator=gen))
    margin = radius * 1.05 + 1.0
    cx = margin + (size - 2 * margin) * torch.rand(n, generator=gen)
    cy = margin + (size - 2 * margin) * torch.rand(n, generator=gen)
    angle = (torch.rand(n, generator=gen) - 0.5) * (math.pi / 3.5)  # about +-25 degrees

    coords = torch.arange(size, dtype=torch.float32) + 0.5
    x = coords.view(1, 1, size) - cx.view(n, 1, 1)
    y = coords.view(1, size, 1) - cy.view(n, 1, 1)
    cos, sin = angle.cos().view(n, 1, 1), angle.sin().view(n, 1, 1)
    u, v = cos * x + sin * y, -sin * x + cos * y  # rotated frame: v points down
    r = radius.view(n, 1, 1)

    shapes = (
        (u.abs() <= 0.8 * r) & (v.abs() <= 0.8 * r),  # square
        u.square() + v.square() <= r.square(),  # circle
        (v >= -r) & (v <= 0.8 * r) & (u.abs() <= 0.6 * (v + r)),  # triangle, apex up
        ((u.abs() <= r / 3) & (v.abs() <= r)) | ((v.abs() <= r / 3) & (u.abs() <= r)),  # plus
    )
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    for index, shape in enumerate(shapes):
        mask |= (labels == index).view(n, 1, 1) & shape
    return mask


def _colours(
    palette: tuple[tuple[float, float, float], ...], n: int, gen: torch.Generator
) -> Tensor:
    """One jittered palette colour per image, [n, 3, 1, 1]."""
    table = torch.tensor(palette)
    picked = table[torch.randint(len(palette), (n,), generator=gen)]
    jitter = 0.08 * (2 * torch.rand(n, 3, generator=gen) - 1)
    return (picked + jitter).clamp(0, 1).view(n, 3, 1, 1)


def _source_background(n: int, size: int, gen: torch.Generator) -> Tensor:
    """Plain dark grey with faint pixel noise, [n, 3, size, size]."""
    level = 0.12 * torch.rand(n, 1, 1, 1, generator=gen)
    noise = 0.02 * torch.randn(n, 3, size, size, generator=gen)
    return (level + noise).clamp(0, 1)


def _target_background(n: int, size: int, gen: torch.Generator) -> Tensor:
    """Coloured texture: smooth random colour blobs plus pixel noise, [n, 3, size, size]."""
    blobs = torch.rand(n, 3, 4, 4, generator=gen)
    blobs = F.interpolate(blobs, size=(size, size), mode="bicubic", align_corners=False)
    noise = 0.03 * torch.randn(n, 3, size, size, generator=gen)
    return (0.05 + 0.6 * blobs + noise).clamp(0, 1)


def make_shapes(
    n: int, domain: str = "source", size: int = 32, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Generate `n` images of one domain, deterministically from `seed`.

    Returns ``(images, labels, masks)``: float32 ``[n, 3, size, size]`` normalised with
    `MEAN`/`STD`, int64 ``[n]`` with every class equally often (shuffled), and bool
    ``[n, size, size]`` marking the shape's pixels. The same seed gives different images in
    the two domains.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}.")
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}.")
    gen = torch.Generator().manual_seed(2 * seed + DOMAINS.index(domain))
    labels = (torch.arange(n) % len(CLASSES))[torch.randperm(n, generator=gen)]
    masks = _shape_masks(labels, size, gen)
    if domain == "source":
        background = _source_background(n, size, gen)
        colour = _colours(_WARM, n, gen)
    else:
        background = _target_background(n, size, gen)
        colour = _colours(_COOL, n, gen)
    rgb = torch.where(masks.unsqueeze(1), colour.expand(-1, -1, size, size), background)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((rgb - mean) / std).float(), labels.long(), masks


def denormalise(images: Tensor) -> Tensor:
    """Undo the normalisation: RGB in ``[0, 1]``."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def make_scenes(
    n: int, domain: str = "source", size: int = 48, seed: int = 0, per_image: int = 2
) -> tuple[Tensor, Tensor]:
    """Generate `n` segmentation scenes of one domain, deterministically from `seed`.

    Each image holds `per_image` shapes of random classes at random places (a later shape
    covers an earlier one where they overlap), each in its own colour, on the domain's
    background. Returns ``(images, label_maps)``: float32 ``[n, 3, size, size]`` normalised
    with `MEAN`/`STD`, and int64 ``[n, size, size]`` class-index maps, 0 for the background and
    ``1 + index`` in `CLASSES` for a shape (`scene_class_names`).
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}.")
    if n < 1 or size < 8 or per_image < 1:
        raise ValueError(f"need n, per_image >= 1 and size >= 8, got {n}, {per_image}, {size}.")
    gen = torch.Generator().manual_seed(1000 + 2 * seed + DOMAINS.index(domain))
    if domain == "source":
        rgb, palette = _source_background(n, size, gen), _WARM
    else:
        rgb, palette = _target_background(n, size, gen), _COOL
    label_maps = torch.zeros(n, size, size, dtype=torch.long)
    for _ in range(per_image):
        labels = torch.randint(len(CLASSES), (n,), generator=gen)
        # Smaller shapes than `make_shapes`: a mask of a shape scaled by 0.6 around its centre.
        masks = _shape_masks(labels, size, gen)
        masks = F.interpolate(masks[:, None].float(), scale_factor=0.6, mode="nearest")[:, 0]
        placed = torch.zeros(n, size, size)
        small = masks.shape[-1]
        offset = torch.randint(size - small + 1, (n, 2), generator=gen)
        for i in range(n):
            y, x = int(offset[i, 0]), int(offset[i, 1])
            placed[i, y : y + small, x : x + small] = masks[i]
        inside = placed.bool()
        colour = _colours(palette, n, gen).expand(-1, -1, size, size)
        rgb = torch.where(inside.unsqueeze(1), colour, rgb)
        label_maps = torch.where(inside, (labels + 1).view(n, 1, 1), label_maps)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((rgb - mean) / std).float(), label_maps


def scene_class_names() -> list[str]:
    """The class names of `make_scenes`' label maps: the background, then `CLASSES`."""
    return ["background", *CLASSES]
