"""Attention under a real domain shift: handwritten digits, source-only vs DANN, with CamMonitor.

Source domain: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans from the UCI
optical-recognition set, shipped inside the package), upsampled to 24 px and placed at a random
offset in a 32 px dark frame. Target domain: held-out digits of the same set blended into
crops of the two colour photographs scikit-learn also ships (``|background - digit|`` per
channel, as MNIST-M blends MNIST into photo patches). Nothing is downloaded.

The masks are the stroke pixels, so the localization scores ask: does the model look at the
digit or at the background? A small CNN trains on labelled source digits; with ``--adapt`` it
trains as a domain-adversarial network (DANN: gradient reversal, unlabelled target digits).
`CamMonitor` watches the same 20 held-out digits drawn in both domains at two layers.

    python examples/dann_digits.py --log-dir runs/digits/source_only
    python examples/dann_digits.py --adapt --log-dir runs/digits/dann
    cam-monitor compare runs/digits/source_only runs/digits/dann --out report.html

The data split, the probe and the backgrounds do not depend on ``--seed`` (it sets the model's
initialisation and the batch order), so runs with different seeds can be grouped and compared.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dann_shapes import ShapesDANN, SourceTargetPairs, fit_run, make_logger, parse_run_args

from cam_monitor import CamMonitor

CLASSES: tuple[str, ...] = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
DOMAINS: tuple[str, ...] = ("source", "target")
#: The layers the monitor watches: the last conv (8x8 maps) and an earlier one (16x16 maps).
CAM_LAYERS: tuple[str, str] = ("features.conv4", "features.conv2")
CAM_METHODS: tuple[str, ...] = ("gradcam",)

IMAGE_SIZE = 32
DIGIT_SIZE = 24  # the 8x8 scan is upsampled to this and placed at a random offset
STROKE = 0.4  # stroke intensity (0-1) above which a pixel belongs to the mask
PER_CLASS = 2  # probe digits per class: 20 in all
NUM_VAL = 400  # held-out digits, drawn in both domains for val/source_acc and val/target_acc
#: Per-channel mean and std of an even mix of both domains (rounded), for normalisation.
MEAN: tuple[float, float, float] = (0.29, 0.28, 0.27)
STD: tuple[float, float, float] = (0.33, 0.3, 0.3)

# Fixed seeds: the split, the digit placements and the background crops are the same in every
# run, whatever --seed says.
_SPLIT_SEED, _PLACE_SEED, _CROP_SEED = 0, 1, 2


def class_names() -> list[str]:
    """The class names, indexed by label."""
    return list(CLASSES)


def load_scans() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 digit scans as float ``[N, 8, 8]`` in [0, 1], and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "dann_digits.py needs scikit-learn for its bundled digits: "
            "pip install 'cam-monitor[demo]'"
        ) from exc
    digits = load_digits()
    scans = torch.from_numpy(digits.images.astype(np.float32) / 16.0)
    return scans, torch.from_numpy(digits.target.astype(np.int64))


def load_backgrounds(scale: float = 0.5) -> Tensor:
    """The two colour photographs bundled with scikit-learn, shrunk by ``scale``: RGB
    ``[2, 3, h, w]`` in [0, 1]; crops of them are the target domain's backgrounds."""
    from sklearn.datasets import load_sample_images

    photos = torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2)
    photos = photos.float() / 255.0
    return F.interpolate(photos, scale_factor=scale, mode="area")


def place_digits(scans: Tensor, seed: int) -> Tensor:
    """Stroke intensity ``[N, 32, 32]`` in [0, 1]: each scan upsampled (bilinear) to 24 px at a
    random offset, the same offsets for the same ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    n = scans.shape[0]
    big = F.interpolate(scans.unsqueeze(1), size=(DIGIT_SIZE, DIGIT_SIZE), mode="bilinear")
    big = big.squeeze(1).clamp(0, 1)
    room = IMAGE_SIZE - DIGIT_SIZE
    offsets = torch.randint(0, room + 1, (n, 2), generator=gen)
    canvas = torch.zeros(n, IMAGE_SIZE, IMAGE_SIZE)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        canvas[i, dy : dy + DIGIT_SIZE, dx : dx + DIGIT_SIZE] = big[i]
    return canvas


def render(strokes: Tensor, domain: str, seed: int, photos: Tensor | None = None) -> Tensor:
    """RGB ``[N, 3, 32, 32]`` in [0, 1]: light strokes on a dark frame (source), or the strokes
    blended into random photo crops, ``|crop - stroke|`` (target)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}.")
    gen = torch.Generator().manual_seed(seed)
    n = strokes.shape[0]
    ink = strokes.unsqueeze(1).expand(n, 3, IMAGE_SIZE, IMAGE_SIZE)
    if domain == "source":
        level = 0.9 + 0.1 * torch.rand(n, 1, 1, 1, generator=gen)
        noise = 0.02 * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        return (level * ink + noise).clamp(0, 1)
    photos = load_backgrounds() if photos is None else photos
    which = torch.randint(0, photos.shape[0], (n,), generator=gen)
    height, width = photos.shape[-2:]
    top = torch.randint(0, height - IMAGE_SIZE + 1, (n,), generator=gen)
    left = torch.randint(0, width - IMAGE_SIZE + 1, (n,), generator=gen)
    crops = torch.stack(
        [
            photos[w, :, t : t + IMAGE_SIZE, s : s + IMAGE_SIZE]
            for w, t, s in zip(which.tolist(), top.tolist(), left.tolist(), strict=True)
        ]
    )
    return (crops - ink).abs()


def normalise(rgb: Tensor) -> Tensor:
    """RGB in [0, 1] to the model's input: ``(rgb - MEAN) / STD`` per channel."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((rgb - mean) / std).float()


def make_digits() -> dict[str, Any]:
    """The fixed split, as normalised images ``[N, 3, 32, 32]``, labels and stroke masks.

    Keys: ``train_source`` (x, y), ``train_target`` (x; labels never used), ``val`` (x, y,
    domain: 0 source, 1 target), ``probe`` {domain: (x, y)} and ``masks`` {domain: bool
    ``[20, 32, 32]``}. The probe is the same 20 held-out digits (two per class) drawn in both
    domains, sorted by class; no probe or validation digit is trained on, in either domain.
    """
    scans, labels = load_scans()
    photos = load_backgrounds()
    order = torch.randperm(len(scans), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    shuffled = labels[order]
    picks = [order[shuffled == c][:PER_CLASS] for c in range(len(CLASSES))]
    probe_idx = torch.cat(picks)  # sorted by class
    rest = order[~torch.isin(order, probe_idx)]
    val_idx, train_idx = rest[:NUM_VAL], rest[NUM_VAL:]
    source_idx, target_idx = train_idx[0::2], train_idx[1::2]

    def draw(index: Tensor, domain: str, part: int) -> tuple[Tensor, Tensor]:
        strokes = place_digits(scans[index], 10 * _PLACE_SEED + part)
        rgb = render(strokes, domain, 10 * _CROP_SEED + part, photos)
        return normalise(rgb), strokes > STROKE

    xs, _ = draw(source_idx, "source", 0)
    xt, _ = draw(target_idx, "target", 1)
    vs, _ = draw(val_idx, "source", 2)
    vt, _ = draw(val_idx, "target", 3)
    probe: dict[str, tuple[Tensor, Tensor]] = {}
    masks: dict[str, Tensor] = {}
    for domain in ("target", "source"):  # target first: the report's summary opens with it
        x, m = draw(probe_idx, domain, 4)  # same placement in both domains
        probe[domain] = (x, labels[probe_idx])
        masks[domain] = m
    domain_ids = torch.cat([torch.zeros(len(val_idx)), torch.ones(len(val_idx))]).long()
    return {
        "train_source": (xs, labels[source_idx]),
        "train_target": xt,
        "val": (torch.cat([vs, vt]), torch.cat([labels[val_idx], labels[val_idx]]), domain_ids),
        "probe": probe,
        "masks": masks,
    }


def build_loaders(
    data: dict[str, Any], batch_size: int = 64, steps_per_epoch: int = 50, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, val_loader)``: train batches ``(source x, source y, target x)``,
    `steps_per_epoch` of them per epoch in a `seed`-dependent order; val ``(x, y, domain)``."""
    xs, ys = data["train_source"]
    train = SourceTargetPairs(xs, ys, data["train_target"])
    sampler = RandomSampler(
        train,
        num_samples=batch_size * steps_per_epoch,
        generator=torch.Generator().manual_seed(seed),
    )
    train_loader = DataLoader(train, batch_size=batch_size, sampler=sampler, drop_last=True)
    val_loader = DataLoader(TensorDataset(*data["val"]), batch_size=400, shuffle=False)
    return train_loader, val_loader


def build_module(adapt: bool, seed: int = 0, lr: float = 0.03) -> ShapesDANN:
    """The shapes demo's four-block CNN with ten classes, initialised from `seed` without
    touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ShapesDANN(adapt=adapt, num_classes=len(CLASSES), lr=lr)


def build_monitor(data: dict[str, Any], **overrides: Any) -> CamMonitor:
    """The demo's `CamMonitor`: both domains' probes with stroke masks; `overrides` replace
    any of its keyword arguments."""
    kwargs: dict[str, Any] = {
        "methods": list(CAM_METHODS),
        "output_transform": 0,  # forward returns (class_logits, domain_logits)
        "probe": data["probe"],
        "masks": data["masks"],
        "mean": MEAN,
        "std": STD,
        "class_names": class_names(),
        "every_n_epochs": 1,
        "nrow": 5,  # 20 probe digits: 5 x 4 tiles, near square in TensorBoard's card
    }
    kwargs.update(overrides)
    layer = kwargs.pop("layer", list(CAM_LAYERS))
    return CamMonitor(layer=layer, **kwargs)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="dann_digits.py",
        description="Source-only vs DANN on real handwritten digits (dark frame -> photo "
        "backgrounds), with Grad-CAM monitoring and stroke masks.",
    )
    return parse_run_args(parser, argv, steps=50, lr=0.03, log_dir="runs/digits/<dann|source_only>")


def train(args: argparse.Namespace, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one run; returns its final accuracies, wall and CPU seconds, and folders."""
    name = "dann" if args.adapt else "source_only"
    log_dir = args.log_dir if args.log_dir is not None else Path("runs") / "digits" / name
    data = make_digits() if data is None else data
    pl.seed_everything(args.seed, workers=True, verbose=False)
    module = build_module(args.adapt, args.seed, args.lr)
    train_loader, val_loader = build_loaders(data, args.batch_size, args.steps_per_epoch, args.seed)
    monitor = build_monitor(data)
    logger = make_logger(args.logger, log_dir, name)
    return fit_run(args, module, monitor, logger, (train_loader, val_loader), name, log_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example from the command line; prints accuracies, times and where the logs are."""
    args = parse_args(argv)
    result = train(args)
    print(
        f"\n{result['run']} (seed {args.seed}): target accuracy {result['target_acc']:.3f}, "
        f"source accuracy {result['source_acc']:.3f} ({result['seconds']:.0f} s wall, "
        f"{result['cpu_seconds']:.0f} s CPU)"
    )
    print(f"logs: {result['log_dir']}  (monitor files: {result['monitor_dir']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
