"""compute_cams side by side with captum, pytorch-grad-cam and torchcam on torchvision models.

Two scenarios per model, every contender timed once per round (A B C A B C ...) after a
warm-up round, the median reported next to a plain no-grad forward:

- `1x1`: one layer, Grad-CAM;
- `4x5`: four layers x five methods (gradcam, gradcam++, xgradcam, layercam, hirescam); each
  peer does what it must to deliver the same 20 maps (see benchmarks/README.md).

Every peer explains the same per-image class (random, seeded) and its maps are compared with
ours after min-max normalisation (upsampled bilinearly where the peer works at input size).
Peak memory comes from a fresh subprocess per contender: RSS above the model + input on the
CPU, `torch.cuda.max_memory_allocated` on a GPU.

    python benchmarks/engine.py --threads 2            # full: resnet50 + vgg16, 224 px, batch 16
    python benchmarks/engine.py --quick                # smoke check, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

from cam_monitor import compute_cams

METHODS: tuple[str, ...] = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")

#: Layer names per model: the usual single Grad-CAM layer, and four stages for `4x5`.
#: VGG16's picks are the ReLUs before each pooling (features.29 is the classic Grad-CAM layer).
LAYERS: dict[str, dict[str, tuple[str, ...]]] = {
    "resnet50": {"1x1": ("layer4",), "4x5": ("layer1", "layer2", "layer3", "layer4")},
    "vgg16": {
        "1x1": ("features.29",),
        "4x5": ("features.8", "features.15", "features.22", "features.29"),
    },
}
SCENARIO_METHODS: dict[str, tuple[str, ...]] = {"1x1": ("gradcam",), "4x5": METHODS}
CONTENDERS: tuple[str, ...] = ("forward", "floor", "ours", "captum", "grad-cam", "torchcam")
PEERS: tuple[str, ...] = ("captum", "grad-cam", "torchcam")
PEER_DISTRIBUTIONS: tuple[str, ...] = ("captum", "grad-cam", "torchcam", "psutil")

#: What each contender does in each scenario, for the table's legend.
HOW: dict[tuple[str, str], str] = {
    ("forward", "1x1"): "model(x) in eval mode under torch.no_grad()",
    ("forward", "4x5"): "model(x) in eval mode under torch.no_grad()",
    ("floor", "1x1"): (
        "no-grad forward until the layer, autograd from there; one autograd.grad of the target "
        "scores to the activation; relu(sum_c mean(G) * A)"
    ),
    ("floor", "4x5"): (
        "the same with autograd from layer1: one autograd.grad to the 4 activations, Grad-CAM "
        "alone on each (4 of 20 maps: the least any engine must do)"
    ),
    ("ours", "1x1"): "compute_cams(model, x, layer, 'gradcam', target=t)",
    ("ours", "4x5"): "one compute_cams call: 4 layers x 5 methods",
    ("captum", "1x1"): "LayerGradCam(model, layer).attribute(x, t, relu_attributions=True)",
    ("captum", "4x5"): (
        "captum ships only Grad-CAM; its multi-layer primitives give G "
        "(LayerGradientXActivation, multiply_by_inputs=False) and A (LayerActivation) for "
        "the 4 layers, then the 5 formulas by hand"
    ),
    ("grad-cam", "1x1"): "GradCAM(model, [layer])(x, targets=[ClassifierOutputTarget(t_i)])",
    ("grad-cam", "4x5"): (
        "20 calls: a multi-layer CAM returns one fused map, so one object per layer x method "
        "(GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM)"
    ),
    ("torchcam", "1x1"): "GradCAM(model, layer); scores = model(x); extractor(t, scores)",
    ("torchcam", "4x5"): (
        "4 extractors on the 4 layers share one forward, one backward each "
        "(retain_graph=True); torchcam has no HiResCAM, so 16 of 20 maps"
    ),
}

Maps = dict[tuple[str, str], Tensor]


@dataclass
class Setup:
    """One model with its inputs, per-image targets and layers."""

    name: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    layers: dict[str, tuple[str, ...]]
    device: torch.device

    def module(self, name: str) -> nn.Module:
        """The submodule called `name`."""
        return self.model.get_submodule(name)


def build_setup(name: str, batch: int, size: int, device: torch.device, seed: int = 0) -> Setup:
    """`torchvision.models.<name>(weights=None)` in eval mode, seeded inputs and targets."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None).to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 3, size, size, generator=generator).to(device)
    # Random per-image classes: a peer that averages over the batch or ignores per-image
    # targets cannot agree with the others by accident.
    targets = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    return Setup(name, model, inputs, targets, LAYERS[name], device)


# -- contenders -------------------------------------------------------------------------------


def by_hand(method: str, activations: Tensor, gradients: Tensor) -> Tensor:
    """The five formulas from the papers, written here independently of cam_monitor.methods."""
    a, g = activations.float(), gradients.float()
    if method == "layercam":
        return torch.relu((torch.relu(g) * a).sum(1))
    if method == "hirescam":
        return torch.relu((g * a).sum(1))
    if method == "gradcam":
        weights = g.mean(dim=(2, 3))
    elif method == "gradcam++":
        g2 = g * g
        denominator = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g
        alpha = torch.where(denominator != 0, g2 / denominator.where(denominator != 0, 1.0), 0.0)
        weights = (alpha * torch.relu(g)).sum(dim=(2, 3))
    elif method == "xgradcam":
        total = a.sum(dim=(2, 3))
        weights = torch.where(total != 0, (g * a).sum(dim=(2, 3)) / total.where(total != 0, 1), 0)
    else:
        raise ValueError(f"unknown method {method!r}")
    return torch.relu((weights[:, :, None, None] * a).sum(1))


def plain_forward(s: Setup, layers: Sequence[str], methods: Sequence[str]) -> Callable[[], Maps]:
    """The yardstick: an eval forward without autograd."""

    def run() -> Maps:
        with torch.no_grad():
            s.model(s.inputs)
        return {}

    return run


def floor(s: Setup, layers: Sequence[str], methods: Sequence[str]) -> Callable[[], Maps]:
    """The least a CAM engine can do: autograd only from the first hooked layer, one
    `autograd.grad` of the target scores to the activations, the cheapest Grad-CAM arithmetic.

    Plain hooks, no clones: the first layer hit hands on a detached leaf that requires grad and
    switches autograd on, later layers are recorded as they are (fine for these models, whose
    hooked outputs are not modified in place downstream).
    """
    modules = [s.module(name) for name in layers]

    def run() -> Maps:
        captured: dict[str, Tensor] = {}

        def make_hook(name: str) -> Callable[[nn.Module, Any, Tensor], Tensor | None]:
            def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
                if torch.is_grad_enabled():
                    captured[name] = output
                    return None
                torch.set_grad_enabled(True)  # no_grad() below restores the mode on exit
                captured[name] = output.detach().requires_grad_(True)
                return captured[name]

            return hook

        handles = [
            m.register_forward_hook(make_hook(n)) for n, m in zip(layers, modules, strict=True)
        ]
        try:
            with torch.no_grad():
                logits = s.model(s.inputs)
        finally:
            for handle in handles:
                handle.remove()
        score = logits.gather(1, s.targets[:, None]).sum()
        names = list(captured)
        gradients = torch.autograd.grad(score, [captured[n] for n in names])
        with torch.no_grad():
            return {
                (name, "gradcam"): torch.relu(
                    (g.mean((2, 3), keepdim=True) * captured[name]).sum(1)
                )
                for name, g in zip(names, gradients, strict=True)
            }

    return run


def ours(s: Setup, layers: Sequence[str], methods: Sequence[str]) -> Callable[[], Maps]:
    """One `compute_cams` call for every layer and method."""

    def run() -> Maps:
        return dict(compute_cams(s.model, s.inputs, list(layers), methods, target=s.targets).maps)

    return run


def captum_contender(s: Setup, layers: Sequence[str], methods: Sequence[str]) -> Callable[[], Maps]:
    """LayerGradCam for Grad-CAM alone; otherwise G and A from its multi-layer attributions."""
    from captum.attr import LayerActivation, LayerGradCam, LayerGradientXActivation

    modules = [s.module(name) for name in layers]

    def grad_cam_only() -> Maps:
        maps = {}
        for name, module in zip(layers, modules, strict=True):
            attribution = LayerGradCam(s.model, module).attribute(
                s.inputs, target=s.targets, relu_attributions=True
            )
            maps[name, "gradcam"] = attribution[:, 0].detach()
        return maps

    def every_method() -> Maps:
        gradients = LayerGradientXActivation(s.model, modules, multiply_by_inputs=False).attribute(
            s.inputs, target=s.targets
        )
        activations = LayerActivation(s.model, modules).attribute(s.inputs)
        maps = {}
        with torch.no_grad():
            for name, a, g in zip(layers, activations, gradients, strict=True):
                for method in methods:
                    maps[name, method] = by_hand(method, a, g)
        return maps

    return grad_cam_only if tuple(methods) == ("gradcam",) else every_method


def grad_cam_contender(
    s: Setup, layers: Sequence[str], methods: Sequence[str]
) -> Callable[[], Maps]:
    """pytorch-grad-cam: one object and one call per layer and method (fused maps otherwise)."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = {
        "gradcam": pgc.GradCAM,
        "gradcam++": pgc.GradCAMPlusPlus,
        "xgradcam": pgc.XGradCAM,
        "layercam": pgc.LayerCAM,
        "hirescam": pgc.HiResCAM,
    }
    targets = [ClassifierOutputTarget(int(t)) for t in s.targets]

    def run() -> Maps:
        maps = {}
        for method in methods:
            for name in layers:
                with classes[method](model=s.model, target_layers=[s.module(name)]) as cam:
                    maps[name, method] = torch.from_numpy(
                        cam(input_tensor=s.inputs, targets=targets)
                    )
        return maps

    return run


def torchcam_contender(
    s: Setup, layers: Sequence[str], methods: Sequence[str]
) -> Callable[[], Maps]:
    """torchcam: one extractor per method on all layers, all sharing one forward."""
    from torchcam import methods as tcm

    classes = {
        "gradcam": tcm.GradCAM,
        "gradcam++": tcm.GradCAMpp,
        "xgradcam": tcm.XGradCAM,
        "layercam": tcm.LayerCAM,
    }
    available = [m for m in methods if m in classes]
    class_idx = [int(t) for t in s.targets]
    names = list(layers)

    def run() -> Maps:
        maps = {}
        with ExitStack() as stack:
            extractors = {
                m: stack.enter_context(classes[m](s.model, target_layer=names)) for m in available
            }
            scores = s.model(s.inputs)
            for i, (method, extractor) in enumerate(extractors.items()):
                cams = extractor(
                    class_idx=class_idx, scores=scores, retain_graph=i < len(extractors) - 1
                )
                for name, cam in zip(names, cams, strict=True):
                    maps[name, method] = cam
        return maps

    return run


FACTORIES: dict[str, Callable[[Setup, Sequence[str], Sequence[str]], Callable[[], Maps]]] = {
    "forward": plain_forward,
    "floor": floor,
    "ours": ours,
    "captum": captum_contender,
    "grad-cam": grad_cam_contender,
    "torchcam": torchcam_contender,
}


def train_step(s: Setup) -> Callable[[], None]:
    """One SGD step in Lightning's order (forward, zero_grad, backward, step): the yardstick.

    Lightning's automatic optimisation clears the gradients after the forward, so during a
    step the previous step's `.grad` and the activations are resident together.
    """
    optimizer = torch.optim.SGD(s.model.parameters(), lr=1e-3, momentum=0.9)

    def run() -> None:
        s.model.train()
        loss = F.cross_entropy(s.model(s.inputs), s.targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        s.model.eval()

    return run


# -- agreement --------------------------------------------------------------------------------


def min_max(maps: Tensor) -> Tensor:
    """Per-image min-max normalisation of `[B, h, w]`; a constant map becomes zeros."""
    flat = maps.detach().flatten(1).double().cpu()
    low = flat.amin(1, keepdim=True)
    span = flat.amax(1, keepdim=True) - low
    return torch.where(span > 0, (flat - low) / span.where(span > 0, 1.0), 0.0).view_as(maps)


def max_abs_diff(mine: Tensor, theirs: Tensor) -> float:
    """Largest difference after normalising both; ours is upsampled to the peer's size first."""
    theirs = theirs.detach().float().cpu()
    mine = mine.detach().float().cpu()
    if mine.shape[-2:] != theirs.shape[-2:]:
        size = tuple(int(v) for v in theirs.shape[-2:])
        mine = F.interpolate(mine[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return float((min_max(mine) - min_max(theirs)).abs().max())


def agreement(mine: Maps, theirs: Maps) -> dict[str, float]:
    """Worst normalised difference per method over the layers the peer delivered."""
    worst: dict[str, float] = {}
    for (layer, method), peer_map in theirs.items():
        diff = max_abs_diff(mine[layer, method], peer_map)
        worst[method] = max(worst.get(method, 0.0), diff)
    return worst


# -- memory subprocess ------------------------------------------------------------------------


def measure_memory(args: argparse.Namespace, device: torch.device) -> None:
    """Child process: build one model, run one contender once, print its peak extra bytes."""
    s = build_setup(args.model, args.batch_size, args.image_size, device)
    # Warm the kernels (forward, backward to inputs and weights) so their one-time workspaces
    # are in the baseline; drop the parameter gradients again.
    with torch.no_grad():
        s.model(s.inputs)
    F.cross_entropy(s.model(s.inputs), s.targets).backward()
    s.model.zero_grad(set_to_none=True)
    contender = args.measure_memory
    if contender == "train":
        fn: Callable[[], Any] = train_step(s)
        fn()  # steady state: .grad and the momentum buffers exist, as after any step
    else:
        scenario = args.scenario
        fn = FACTORIES[contender](s, s.layers[scenario], SCENARIO_METHODS[scenario])
    extra = harness.peak_extra_memory(fn, device, warmup=False)
    print(json.dumps({"bytes": extra}))


def memory_in_subprocess(
    args: argparse.Namespace, model: str, scenario: str, contender: str
) -> float:
    """Peak extra MiB of one contender, measured in a fresh process (NaN on failure)."""
    argv = [
        str(Path(__file__).resolve()),
        "--measure-memory",
        contender,
        "--model",
        model,
        "--scenario",
        scenario,
        "--batch-size",
        str(args.batch_size),
        "--image-size",
        str(args.image_size),
        "--device",
        args.device,
    ]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    result = harness.run_memory_subprocess(argv)
    if "error" in result:
        print(f"  memory of {model}/{scenario}/{contender} failed: {result['error']}")
        return float("nan")
    mib = result["bytes"] / harness.MIB
    print(f"  memory {model} {scenario} {contender}: {mib:.0f} MiB", file=sys.stderr, flush=True)
    return mib


def dispatched_ops(run: Callable[[], Maps]) -> int:
    """Top-level ATen ops one call dispatches (nested ones not counted): the host's share of a
    call, which on a GPU each costs a kernel launch and some Python, whatever the card."""
    from torch.profiler import ProfilerActivity, profile

    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(
        1
        for event in prof.events()
        if event.name.startswith("aten::")
        and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::"))
    )


def run_scenario(s: Setup, scenario: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time every contender of one model and scenario, interleaved; check maps against ours."""
    layers, methods = s.layers[scenario], SCENARIO_METHODS[scenario]
    print(f"{s.name} {scenario}: layers {layers}", file=sys.stderr, flush=True)
    contenders = {c: FACTORIES[c](s, layers, methods) for c in args.contenders}

    def cleanup(name: str) -> None:
        s.model.zero_grad(set_to_none=True)  # pytorch-grad-cam leaves param .grad filled

    seconds, outputs = harness.interleaved(
        contenders, args.reps, args.warmup, s.device, after=cleanup
    )
    forward = harness.median(seconds["forward"])
    least = harness.median(seconds["floor"]) if "floor" in seconds else float("nan")
    mine = outputs.get("ours") or ours(s, layers, methods)()
    ops = {name: dispatched_ops(fn) for name, fn in contenders.items()}
    rows = []
    for name in args.contenders:
        diffs = agreement(mine, outputs[name]) if name in (*PEERS, "floor") else {}
        median = harness.median(seconds[name])
        total = len(layers) * len(methods)
        rows.append(
            {
                "model": s.name,
                "scenario": scenario,
                "contender": name,
                "maps": "-" if name == "forward" else f"{len(outputs[name])}/{total}",
                "seconds": median,
                "spread": harness.spread(seconds[name]),
                "x_forward": median / forward,
                "x_floor": median / least,
                "aten_ops": ops[name],
                "max_abs_diff": max(diffs.values()) if diffs else None,
                "diff_per_method": diffs,
                "all_seconds": seconds[name],
            }
        )
    return rows


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; `--quick` shrinks everything for a smoke check."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_arguments(parser, reps=5)
    parser.add_argument("--models", nargs="+", choices=sorted(LAYERS), default=None)
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIO_METHODS), default=None)
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--batch-size", type=int, default=None, help="16 (quick: 2)")
    parser.add_argument("--image-size", type=int, default=None, help="224 (quick: 64)")
    parser.add_argument(
        "--memory", action=argparse.BooleanOptionalAction, default=True, help="peak memory"
    )
    parser.add_argument(
        "--timing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the contenders (--no-timing: peak memory only, one call each)",
    )
    parser.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scenario", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 5)
    args.batch_size = args.batch_size or (2 if args.quick else 16)
    args.image_size = args.image_size or (64 if args.quick else 224)
    args.models = args.models or list(LAYERS)
    args.scenarios = args.scenarios or list(SCENARIO_METHODS)
    if "forward" not in args.contenders:
        args.contenders = ["forward", *args.contenders]
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    if not (args.timing or args.memory):
        parser.error("--no-timing with --no-memory leaves nothing to measure")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Time, check and measure every contender; print the tables."""
    args = parse_args(argv)
    device = harness.setup_torch(args.device, args.threads)
    if args.measure_memory is not None:
        measure_memory(args, device)
        return 0

    versions = harness.package_versions(PEER_DISTRIBUTIONS)
    info = harness.print_header(
        "compute_cams against captum, pytorch-grad-cam and torchcam",
        device,
        {
            "peers": ", ".join(f"{k} {v}" for k, v in versions.items()),
            "batch": args.batch_size,
            "image": f"{args.image_size}x{args.image_size}",
            "reps": f"{args.reps} timed (median), {args.warmup} warm-up, interleaved",
        },
    )
    rows: list[dict[str, Any]] = []

    def save(partial: bool) -> None:  # after every step, so a killed run keeps what it measured
        payload = {"machine": info, "versions": versions, "partial": partial, "rows": rows}
        harness.write_json(args.json, payload, quiet=partial)

    for model_name in args.models if args.timing else ():
        setup = build_setup(model_name, args.batch_size, args.image_size, device)
        for scenario in args.scenarios:
            new = run_scenario(setup, scenario, args)
            for row in new:
                diff = row["max_abs_diff"]
                print(
                    f"  => {row['contender']}: {row['seconds']:.3g} s, x{row['x_forward']:.2f} "
                    f"forward, maps {row['maps']}"
                    + ("" if diff is None else f", max abs diff {diff:.2g}"),
                    file=sys.stderr,
                    flush=True,
                )
            rows += new
            save(partial=True)
        del setup
    if not args.timing:
        rows = untimed_rows(args)
    if args.memory:
        print("peak memory, one subprocess per contender ...", file=sys.stderr, flush=True)
        for model_name in args.models:
            train = memory_in_subprocess(args, model_name, args.scenarios[0], "train")
            plain = memory_in_subprocess(args, model_name, args.scenarios[0], "forward")
            for row in rows:
                if row["model"] != model_name:
                    continue
                name = row["contender"]
                row["peak_mib"] = (
                    plain
                    if name == "forward"
                    else memory_in_subprocess(args, model_name, row["scenario"], name)
                )
                row["train_step_mib"] = train
                save(partial=True)
    print_tables(rows, args)
    save(partial=False)
    return 0


def untimed_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One empty row per model, scenario and contender, for a memory-only run."""
    return [
        {
            "model": model,
            "scenario": scenario,
            "contender": name,
            "maps": None,
            "seconds": None,
            "spread": None,
            "x_forward": None,
            "x_floor": None,
            "aten_ops": None,
            "max_abs_diff": None,
            "diff_per_method": {},
            "all_seconds": [],
        }
        for model in args.models
        for scenario in args.scenarios
        for name in args.contenders
    ]


def print_tables(rows: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> None:
    """The timing/memory table, the agreement per method, and what each contender did."""
    headers = ["model", "scenario", "contender", "maps", "median s", "spread", "x forward"]
    headers += ["x floor", "aten ops"]
    if args.memory:
        headers += ["peak extra MiB", "x train step"]
    headers.append("max abs diff")
    table = []
    for row in rows:
        line = [
            row["model"],
            row["scenario"],
            row["contender"],
            row["maps"],
            row["seconds"],
            row["spread"],
            row["x_forward"],
            row["x_floor"],
            row.get("aten_ops"),
        ]
        if args.memory:
            line += [row["peak_mib"], row["peak_mib"] / row["train_step_mib"]]
        line.append(row["max_abs_diff"])
        table.append(line)
    print(harness.markdown_table(headers, table))
    train = {row["model"]: row.get("train_step_mib") for row in rows}
    if args.memory:
        print(
            "\nOne training step (train mode, SGD with momentum, Lightning's order), peak extra "
            "MiB: " + ", ".join(f"{m} {v:.0f}" for m, v in train.items() if v is not None)
        )
    if args.memory:
        print(
            "\nPeak extra MiB: one fresh process per contender, kernels warmed by one forward and "
            "backward first; baseline RSS = model + input (+ optimizer state and the previous "
            ".grad for the train step); peak = VmHWM over one call; glibc's mmap threshold is "
            "fixed so freed tensors leave RSS. pytorch-grad-cam's figure includes the parameter "
            ".grad its backward allocates."
        )
    print(
        "\nspread = (max - min) / median over the timed repetitions. aten ops: top-level ATen "
        "ops one call dispatches (torch.profiler), the host work a GPU call waits on. "
        "max abs diff: peer maps "
        "against ours, both min-max normalised per image (ours upsampled bilinearly where the "
        "peer returns input-size maps).\n"
    )
    per_method = [
        [row["model"], row["scenario"], row["contender"]]
        + [row["diff_per_method"].get(m) for m in METHODS]
        for row in rows
        if row["contender"] in PEERS
    ]
    print("## Agreement with ours, per method (max abs diff)\n")
    print(harness.markdown_table(["model", "scenario", "peer", *METHODS], per_method))
    print("\n## Targets\n")
    print(harness.markdown_table(["model", "target", "measured", "met"], target_rows(rows)))
    print("\n## What each contender does\n")
    scenarios = sorted({row["scenario"] for row in rows})
    names = list(dict.fromkeys(row["contender"] for row in rows))
    print(
        harness.markdown_table(
            ["contender", "scenario", "call"],
            [[c, sc, HOW[c, sc]] for c in names for sc in scenarios],
        )
    )


def target_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """The issue's targets against what was measured (met / not met / not measured)."""
    found = {(r["model"], r["scenario"], r["contender"]): r for r in rows}
    out: list[list[Any]] = []

    def check(model: str, target: str, value: float | None, limit: float, above: bool) -> None:
        if value is None or value != value:
            out.append([model, target, None, "not measured"])
            return
        met = value >= limit if above else value <= limit
        out.append([model, target, f"{value:.2f}", "yes" if met else "NO"])

    for model in dict.fromkeys(r["model"] for r in rows):
        one, many = found.get((model, "1x1", "ours")), found.get((model, "4x5", "ours"))
        if one is not None:
            check(model, "1x1: ours / forward <= 1.3", one["x_forward"], 1.3, False)
            check(model, "1x1: ours / floor <= 1.10", one["x_floor"], 1.10, False)
            for peer in ("captum", "torchcam"):
                other = found.get((model, "1x1", peer))
                ratio = one["seconds"] / other["seconds"] if other and one["seconds"] else None
                check(model, f"1x1: ours / {peer} <= 1.05", ratio, 1.05, False)
        if many is not None:
            check(model, "4x5: ours / forward <= 1.6", many["x_forward"], 1.6, False)
            check(model, "4x5: ours / floor <= 1.10", many["x_floor"], 1.10, False)
            peers = [found.get((model, "4x5", p)) for p in PEERS]
            peers = [p for p in peers if p is not None]
            if peers and many["seconds"]:
                fastest = min(peers, key=lambda p: p["seconds"])
                name = f"{fastest['contender']}, {fastest['maps']} maps"
                ratio = fastest["seconds"] / many["seconds"]
                check(model, f"4x5: fastest peer ({name}) / ours >= 3", ratio, 3.0, True)
        for row in (one, many):
            if row is not None and "peak_mib" in row:
                ratio = row["peak_mib"] / row["train_step_mib"]
                check(model, f"{row['scenario']}: ours peak / train step <= 1", ratio, 1.0, False)
    return out


if __name__ == "__main__":
    sys.exit(main())
