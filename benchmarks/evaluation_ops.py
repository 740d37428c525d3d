"""How many ATen ops each piece of one evaluation dispatches: on a GPU most are a kernel launch
each, and launching them is host work a GPU evaluation waits on (issue 28, target 3).

Counted on any device, the CPU included, so the launches an evaluation costs can be followed
where no GPU is lent. Issue 14's monitor (a 16-image probe, `layer3` + `layer4` x gradcam +
gradcam++, drift against the previous and the reference maps) and a wide one (every block of
resnet18, three methods), grids drawn as on a GPU. Counts, not times: nothing here depends
on the machine's load.

    python benchmarks/evaluation_ops.py            # both monitors, resnet18 at 64 px
    python benchmarks/evaluation_ops.py --quick    # smoke check
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluation_cost
import harness

from cam_monitor import compute_cams, render
from cam_monitor.drift import AttentionTracker
from cam_monitor.options import DriftOptions
from cam_monitor.probe import ProbeSet, content_hash

#: The monitors counted: layers (inside the LightningModule's `net`) and methods.
MONITORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "issue 14": (("layer3", "layer4"), ("gradcam", "gradcam++")),
    "wide": (
        tuple(f"layer{i}.{j}" for i in range(1, 5) for j in range(2)),
        ("gradcam", "gradcam++", "layercam"),
    ),
}


class _Ops(TorchDispatchMode):
    """Counts the ATen ops dispatched on this thread inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops(run: Callable[[], Any]) -> int:
    """The ops `run()` dispatches, run once before so first-call caches do not count."""
    run()
    with _Ops() as counted:
        run()
    return counted.count


def count(name: str, image_size: int, device: torch.device) -> dict[str, Any]:
    """The ops of each piece of one evaluation of monitor `name` (its third: drift has a
    previous and a reference)."""
    layers, methods = MONITORS[name]
    setup = replace(
        evaluation_cost.CPU_SETUP, image_size=image_size, layers=layers, methods=methods
    )
    module = evaluation_cost.Classifier(setup).to(device).eval()
    inputs = evaluation_cost.probe_images(setup).to(device)
    probe = ProbeSet("probe", inputs, digest=content_hash(inputs))
    names = list(setup.monitor_layers)
    result = compute_cams(module, inputs, names, list(methods))
    tracker = AttentionTracker(DriftOptions())
    for _ in range(2):
        tracker.score({"probe": result}, {"probe": probe})
    pieces = {
        "drawing the grids": lambda: evaluation_cost.draw_grids(probe, result, setup),
        "drift, localization, entropy": lambda: tracker.score({"probe": result}, {"probe": probe}),
    }
    row: dict[str, Any] = {"monitor": name, "maps": len(result.maps)}
    row.update({piece: ops(run) for piece, run in pieces.items()})
    return row


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_arguments(parser, reps=1)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size = 32
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = harness.setup_torch(args.device, args.threads)
    machine = harness.print_header(
        "ATen ops per evaluation piece (issue 28: kernel launches on a GPU)",
        device,
        {"setup": f"resnet18 (weights=None), {args.image_size} px, 16-image probe"},
    )
    # Overlay grids are drawn several at a pass as the device's memory budget allows: count
    # them as a GPU draws them (on the CPU, large grids are drawn one by one).
    render._DRAW_BYTES["cpu"] = render._DRAW_BYTES["cuda"]
    rows = [count(name, args.image_size, device) for name in MONITORS]
    headers = ["monitor", "maps", "drawing the grids", "drift, localization, entropy"]
    print(harness.markdown_table(headers, [[row[h] for h in headers] for row in rows]))
    harness.write_json(args.json, {"machine": machine, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
