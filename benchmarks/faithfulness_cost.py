"""Issue 27's measurement: what each faithfulness measure and the sanity check cost per
evaluation, against `compute_cams` and against a whole Lightning-free evaluation (compute and
draw, `run_evaluation`) on the same probe; torchcam 0.5's metric classes on the same model.

The monitor turns drop and increase on by default only if they cost less than 25% of an
evaluation: the last table checks that. Drop and increase reuse the evaluation's logits
(`logits=result.logits`), as the monitor would: one forward of the probe. torchcam's metrics
compute their own Grad-CAM inside `update` (a forward and a backward), then perturb; their
rows include that. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

from cam_monitor import compute_cams, faithfulness, sanity_check
from cam_monitor.evaluation import run_evaluation
from cam_monitor.options import EngineOptions, RenderOptions
from cam_monitor.probe import ProbeSet

#: The cheap measures go on by default only below this share of an evaluation.
DEFAULT_ON_LIMIT = 0.25


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    harness.add_common_arguments(parser, reps=5)
    parser.add_argument("--model", default="resnet18", help="a torchvision classifier")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--images", type=int, default=16, help="probe images")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="deletion / insertion steps")
    parser.add_argument("--no-torchcam", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.image_size, args.reps, args.warmup = 4, 64, 1, 0
        args.steps = min(args.steps, 5)
    device = harness.setup_torch(args.device, args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None, num_classes=10).to(device).eval()
    images = torch.randn(args.images, 3, args.image_size, args.image_size, device=device)
    details = {
        "model": args.model,
        "layer": args.layer,
        "probe": f"{args.images} x 3 x {args.image_size} x {args.image_size}",
        "steps": args.steps,
    }
    info = harness.print_header("Faithfulness: cost per evaluation", device, details)

    result = compute_cams(model, images, args.layer)
    maps, logits = result[args.layer, "gradcam"], result.logits
    probe = ProbeSet("val", images)
    contenders = {
        "compute_cams (gradcam)": lambda: compute_cams(model, images, args.layer),
        "evaluation (compute + draw)": lambda: run_evaluation(
            model, {"val": probe}, [args.layer], EngineOptions(), RenderOptions()
        ),
        "drop + increase": lambda: faithfulness(
            model, images, maps, measures=("drop", "increase"), logits=logits
        ),
        "deletion + insertion": lambda: faithfulness(
            model,
            images,
            maps,
            measures=("deletion", "insertion"),
            steps=args.steps,
            logits=logits,
        ),
        "sanity check (gradcam)": lambda: sanity_check(model, images, args.layer, real=result),
    }
    if not args.no_torchcam:
        contenders.update(_torchcam(model, images, args.layer, args.steps))
    reps = args.reps if args.reps is not None else 5
    times, _ = harness.interleaved(contenders, reps=reps, warmup=args.warmup, device=device)
    report(times, info, args)


def _torchcam(model: torch.nn.Module, images: torch.Tensor, layer: str, steps: int) -> dict:
    """torchcam's two metric classes on the same model and probe (their own Grad-CAM included)."""
    from torchcam.methods import GradCAM
    from torchcam.metrics import ClassificationMetric, DeletionInsertionMetric

    softmax = partial(torch.softmax, dim=-1)

    def classification() -> Any:
        with GradCAM(model, layer) as extractor:
            metric = ClassificationMetric(extractor, softmax)
            metric.update(images)
            return metric.summary()

    def curves() -> Any:
        with GradCAM(model, layer) as extractor:
            metric = DeletionInsertionMetric(extractor, softmax, steps=steps, batch_size=64)
            metric.update(images)
            return metric.summary()

    return {"torchcam ClassificationMetric": classification, "torchcam DeletionInsertion": curves}


def report(times: dict[str, list[float]], info: dict[str, Any], args: argparse.Namespace) -> None:
    engine = harness.median(times["compute_cams (gradcam)"])
    evaluation = harness.median(times["evaluation (compute + draw)"])
    rows = []
    for name, values in times.items():
        seconds = harness.median(values)
        rows.append(
            {
                "contender": name,
                "seconds": seconds,
                "vs_compute_cams": seconds / engine,
                "vs_evaluation": seconds / evaluation,
                "spread": harness.spread(values),
                "all_seconds": values,
            }
        )
    table = [
        (r["contender"], f"{r['seconds'] * 1e3:.1f} ms", f"{r['vs_compute_cams']:.2f}",
         f"{r['vs_evaluation']:.2f}", f"{r['spread']:.0%}")
        for r in rows
    ]  # fmt: skip
    headers = ("contender", "median", "/ compute_cams", "/ evaluation", "spread")
    print(harness.markdown_table(headers, table))
    cheap = next(r for r in rows if r["contender"] == "drop + increase")
    verdict = "on by default" if cheap["vs_evaluation"] < DEFAULT_ON_LIMIT else "opt-in"
    print("\n## Default\n")
    print(
        f"- drop + increase: {cheap['vs_evaluation']:.0%} of an evaluation (limit "
        f"{DEFAULT_ON_LIMIT:.0%}): {verdict}"
    )
    harness.write_json(args.json, {"machine": info, "rows": rows, "default": verdict})


if __name__ == "__main__":
    main()
