"""The Python a compute_cams call adds: a model so small that the host's work is all there is.

Issue 28's first target: on two 8-channel convolutions, 2 images of 8 x 8 px and one torch
thread, `compute_cams` for one layer of Grad-CAM against the floor (a forward with a hook, one
`autograd.grad`, the Grad-CAM arithmetic), with torchcam and captum in the same table. The
kernels take microseconds here, so what each contender costs beyond the floor is per-call
Python: hooks, look-ups, checks. On a GPU that Python is what a call waits on.

    python benchmarks/host_overhead.py --threads 1     # 300 interleaved rounds
    python benchmarks/host_overhead.py --quick         # smoke check
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # the contenders, shared with the engine benchmark
import harness

CONTENDERS = ("forward", "floor", "ours", "torchcam", "captum")
#: Not run unless named: what a leaner `compute_cams` would cost (see `lean`).
PROTOTYPES = ("lean", "lean_unisolated")
TARGET = 1.3  # compute_cams / floor


def lean(
    s: engine.Setup, layers: Sequence[str], methods: Sequence[str], isolate: bool = True
) -> Callable[[], engine.Maps]:
    """A prototype of the least `compute_cams` must do on this setup, for the analysis in
    docs/performance.md: options and the cached plan looked up, `isolated` (unless `isolate` is
    False), `capture_outputs` with its clone, the labels copied and gathered, one
    `autograd.grad`, `gradient_maps` and a `CamResult`; no other check or layer of calls."""
    from cam_monitor.batch import Batch
    from cam_monitor.capture import capture_outputs
    from cam_monitor.engine import CamResult
    from cam_monitor.isolation import isolated
    from cam_monitor.layers import unwrap_model
    from cam_monitor.methods import gradient_maps
    from cam_monitor.options import engine_options
    from cam_monitor.plan import plan_for

    names, wanted = list(layers), list(methods)

    def run() -> engine.Maps:
        arguments = {"methods": wanted, "target": s.targets}
        options = engine_options(arguments)
        module = unwrap_model(s.model)
        plan = plan_for(module, names, options)
        batch = Batch.of(s.inputs)
        with isolated(module) if isolate else contextlib.nullcontext():
            with capture_outputs(plan.layers, graph_from_first=True) as recorded:
                logits = module(batch.data)
            indices = s.targets.to(logits.device, torch.long, copy=True)
            scores = logits.gather(1, indices[:, None])
            grads = torch.autograd.grad(scores.sum(), [recorded[name] for name in names])
            maps = {
                (name, method): cam
                for name, grad in zip(names, grads, strict=True)
                for method, cam in gradient_maps(
                    plan.gradient_methods, recorded[name].detach(), grad
                ).items()
            }
        result = CamResult(maps, indices, logits.detach(), batch.image_size, tuple(names))
        return dict(result.maps)

    return run


FACTORIES: dict[str, Callable[[engine.Setup, Sequence[str], Sequence[str]], Any]] = {
    **engine.FACTORIES,
    "lean": lean,
    "lean_unisolated": lambda s, layers, methods: lean(s, layers, methods, isolate=False),
}


def tiny_setup(device: torch.device, batch: int = 2, size: int = 8) -> engine.Setup:
    """Two 8-channel convolutions with ReLUs, global pooling and a 10-class head, seeded."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, 3, size, size, generator=generator)
    targets = torch.randint(0, 10, (batch,), generator=generator)
    return engine.Setup(
        "tiny", model.to(device).eval(), inputs.to(device), targets.to(device), {}, device
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_arguments(parser, reps=300)
    parser.add_argument(
        "--contenders", nargs="+", choices=CONTENDERS + PROTOTYPES, default=list(CONTENDERS)
    )
    args = parser.parse_args(argv)
    args.reps = args.reps or (5 if args.quick else 300)
    args.warmup = max(args.warmup, 1 if args.quick else 20)
    if "floor" not in args.contenders:
        args.contenders = ["floor", *args.contenders]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = harness.setup_torch(args.device, args.threads)
    s = tiny_setup(device)
    layer = ["2"]  # the second convolution
    versions = harness.package_versions(["torch", "torchcam", "captum"])
    machine = harness.print_header(
        "compute_cams' host overhead (issue 28, target 1)",
        device,
        {"setup": "2 x Conv2d(8), 2 images of 3 x 8 x 8, layer '2', Grad-CAM", **versions},
    )
    contenders = {name: FACTORIES[name](s, layer, ["gradcam"]) for name in args.contenders}
    seconds, first = harness.interleaved(contenders, args.reps, args.warmup, device, progress=False)
    floor_ms = harness.median(seconds["floor"]) * 1e3
    rows: list[dict[str, Any]] = []
    for name in args.contenders:
        ms = harness.median(seconds[name]) * 1e3
        maps = first[name]
        diff = (
            engine.agreement(first["floor"], maps).get("gradcam", float("nan"))
            if name not in ("forward", "floor") and maps
            else float("nan")
        )
        rows.append(
            {
                "contender": name,
                "ms": ms,
                "x_floor": ms / floor_ms,
                "spread": harness.spread(seconds[name]),
                "max_abs_diff": diff,
                "all_seconds": seconds[name],
            }
        )
    print(
        harness.markdown_table(
            ["contender", "median ms", "x floor", "spread", "max |diff| vs floor"],
            [[r["contender"], r["ms"], r["x_floor"], r["spread"], r["max_abs_diff"]] for r in rows],
        )
    )
    ours = next((r for r in rows if r["contender"] == "ours"), None)
    if ours is not None:
        met = "met" if ours["x_floor"] <= TARGET else "missed"
        print(f"\n## Target\n\ncompute_cams / floor <= {TARGET}: {ours['x_floor']:.2f} ({met})")
    harness.write_json(args.json, {"machine": machine, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
