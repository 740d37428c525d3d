"""How exact the maps are (issue 12, items 13 and 14): numbers quoted in docs/guarantees.md.

    python benchmarks/fidelity.py --device cuda --json fidelity.json    # both tables
    python benchmarks/fidelity.py --quick                                # smoke test (CPU)

1. Integrated gradients: |completeness gap| / |score difference to the black baseline| per
   image, for torchvision resnet18 and vgg11_bn (`weights=None`, seed 0), several image sizes
   and `ig_steps`: the default should keep it under 10% (the threshold of the engine's
   warning). As built, these models have no biases (zero-initialised, BatchNorm at mean 0 and
   variance 1), so they are positively homogeneous and IG is exact at any step count; the
   "calibrated" rows first set the BatchNorm statistics from 32 noise images (one train-mode
   forward), which gives them biases as training would. On CUDA, TF32 is switched off.
2. bf16: per-image Pearson correlation of maps computed under CPU bf16 autocast against
   float32 maps, on resnet18 `layer3` and `layer4` (gradient CAMs) and `saliency`, as built
   and calibrated. Always on the CPU (CPU autocast is what was claimed).

Nothing here is timed; the images are uniform noise in [0, 1] from a seeded generator.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import markdown_table, print_header, setup_torch, write_json

from cam_monitor import compute_cams

GAP_KEY = "integrated_gradients.completeness_gap"
DELTA_KEY = "integrated_gradients.score_delta"
CAMS = ["gradcam", "gradcam++", "layercam", "hirescam"]


def build(name: str, device: torch.device, calibrated: bool, size: int) -> torch.nn.Module:
    """The torchvision model, seeded; `calibrated`: BatchNorm statistics from noise images."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).to(device)
    if calibrated:
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # a plain average over what it sees
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            model.train()(torch.rand(32, 3, size, size, generator=generator).to(device))
    return model.eval()


def images(count: int, size: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(count, 3, size, size, generator=generator).to(device)


def ig_rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for model_name in args.models:
        for size, state, steps in [
            *((size, "as built", args.steps[0]) for size in args.sizes),
            *((size, "calibrated", steps) for size in args.sizes for steps in args.steps),
        ]:
            model = build(model_name, device, state == "calibrated", size)
            x = images(args.images, size, device)
            result = compute_cams(
                model, x, None, "integrated_gradients", ig_steps=steps, batch_size=args.rows
            )
            relative = (result.extras[GAP_KEY].abs() / result.extras[DELTA_KEY].abs()).tolist()
            rows.append(
                {
                    "model": model_name,
                    "state": state,
                    "size": size,
                    "steps": steps,
                    "relative_gaps": relative,
                    "median": statistics.median(relative),
                    "max": max(relative),
                    "within_10pct": sum(r <= 0.1 for r in relative),
                }
            )
            print(f"  {model_name} {state} {size}px {steps}: max {max(relative):.1%}", flush=True)
    return rows


def pearson(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1).div(a.norm(dim=1) * b.norm(dim=1)).tolist()


def bf16_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    cpu = torch.device("cpu")
    rows = []
    for size, state in [
        (size, state) for state in ("as built", "calibrated") for size in args.sizes
    ]:
        model = build("resnet18", cpu, state == "calibrated", size)
        x = images(args.images, size, cpu)
        kwargs: dict[str, Any] = {"target": "predicted"}
        fp32 = compute_cams(model, x, args.layers, [*CAMS, "saliency"], **kwargs)
        kwargs["target"] = fp32.targets  # the same classes under bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = compute_cams(model, x, args.layers, [*CAMS, "saliency"], **kwargs)
        for key in fp32.maps:
            values = pearson(bf16[key], fp32[key])
            rows.append(
                {
                    "state": state,
                    "size": size,
                    "layer": key[0],
                    "method": key[1],
                    "pearson": values,
                    "min": min(values),
                    "median": statistics.median(values),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="for IG only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg11_bn"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128, 224])
    parser.add_argument("--steps", nargs="+", type=int, default=[16, 32, 64, 128, 256])
    parser.add_argument("--layers", nargs="+", default=["layer3", "layer4"])
    parser.add_argument("--images", type=int, default=8, help="probe images per setting")
    parser.add_argument("--rows", type=int, default=64, help="rows per IG pass (batch_size)")
    parser.add_argument("--skip", choices=("ig", "bf16"), default=None, help="skip one table")
    args = parser.parse_args()
    if args.quick:
        args.models, args.sizes, args.steps, args.images = ["resnet18"], [32], [4, 8], 2
    device = setup_torch(args.device, args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    info = print_header("Map fidelity: IG completeness and bf16 vs float32", device, vars(args))
    payload: dict[str, Any] = {"machine": info, "ig": [], "bf16": []}
    if args.skip != "ig":
        payload["ig"] = ig_rows(args, device)
        print("\n## Integrated gradients: |completeness gap| / |score difference|\n")
        print(
            markdown_table(
                ["model", "weights", "px", "ig_steps", "median", "max", "images <= 10%"],
                [
                    (
                        r["model"],
                        r["state"],
                        r["size"],
                        r["steps"],
                        f"{r['median']:.1%}",
                        f"{r['max']:.1%}",
                        f"{r['within_10pct']}/{len(r['relative_gaps'])}",
                    )
                    for r in payload["ig"]
                ],
            )
        )
        write_json(args.json, payload, quiet=True)
    if args.skip != "bf16":
        payload["bf16"] = bf16_rows(args)
        print("\n## CPU bf16 autocast vs float32: per-image Pearson, resnet18\n")
        print(
            markdown_table(
                ["weights", "px", "layer", "method", "min", "median"],
                [
                    (
                        r["state"],
                        r["size"],
                        r["layer"],
                        r["method"],
                        f"{r['min']:.3f}",
                        f"{r['median']:.3f}",
                    )
                    for r in payload["bf16"]
                ],
            )
        )
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
