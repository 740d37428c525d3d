"""GPU checks CI cannot run, and issue 14's GPU measurements, in one run.

    python benchmarks/gpu_check.py --out gpu.json             # on the GPU (about 5 minutes)
    python benchmarks/gpu_check.py --device cpu --quick       # smoke test of the script here

Checks (PASS / FAIL; the exit status is 1 if one fails): device placement, no host sync in
`compute_cams`, one host transfer for scoring an evaluation and none per overlay grid drawn,
autocast, real fits at three precisions, FSDP refused; JPEG grids encoded on the GPU (which
encoder, chroma 4:4:4, decoded within `GPU_JPEG_TOLERANCE` of the CPU path's bytes) and the
CUDA-only tests of the suite (`CUDA_TESTS`, run with pytest). Measured (printed side by
side, never asserted; the targets are shown next to them):

- the engine on resnet50, 224 px, batch 32: a plain forward, the floor (see engine.py),
  1 layer x Grad-CAM and 4 layers x 5 methods, each as a ratio to the floor;
- issue 14's GPU fit (resnet50, 224 px, batch 64, bf16-mixed, 40 steps x 3 epochs, the
  monitor on `layer3` + `layer4` with gradcam + gradcam++, TensorBoardLogger) without the
  monitor, with it, and with it and `crc32c`: whole-fit seconds, in-loop seconds per
  evaluation, the logger's `close()`; then one evaluation piece by piece (evaluation_cost.py),
  with the monitor's in-loop path: the grids encoded once on its encoder's threads while drift
  is scored;
- issue 28: that evaluation's grids JPEG-encoded on the GPU (the encoder's path, and each of
  TorchCodec and torchvision alone) against the CPU path (copied to the host, OpenCV on the
  encoder's threads). With `--device cpu` the GPU encoders run their CPU paths instead.

`--out PATH` writes every number as JSON. Without the `crc32c` package the crc32c arm is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine as engine_bench
import evaluation_cost
import harness
import overhead

from cam_monitor import CamMonitor, compute_cams
from cam_monitor.drift import AttentionTracker
from cam_monitor.encoding import (
    GPU_JPEG_TOLERANCE,
    TORCHCODEC,
    TORCHVISION,
    GridEncoder,
    chroma_subsampling,
    decoded_difference,
    encode_jpegs,
    gpu_jpeg_backend,
)
from cam_monitor.evaluation import render_probe
from cam_monitor.history import evaluation_record, read_history
from cam_monitor.options import DriftOptions, RenderOptions
from cam_monitor.probe import ProbeSet
from cam_monitor.schema import MapKey

CAMS = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"]
CHECKS: list[dict[str, Any]] = []
ROOT = Path(__file__).resolve().parents[1]
#: The suite's CUDA-only tests, skipped where there is no GPU: this script runs them.
CUDA_TESTS = ("tests/test_encoding.py::test_cuda_grids_are_drawn_and_encoded_on_the_gpu",)


def check(name: str, ok: bool | None, detail: str = "") -> None:
    """Print and record one check; `ok=None` means skipped on this device."""
    word = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    print(f"{word}  {name}  {detail}", flush=True)
    CHECKS.append({"check": name, "result": word, "detail": detail})


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).min())


def engine_checks(device: torch.device) -> None:
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10).to(device)
    x = torch.randn(16, 3, 64, 64, device=device)
    layers = ["layer3", "layer4"]
    ref = compute_cams(model, x, layers, CAMS)
    devices = {m.device.type for m in ref.maps.values()}
    finite = all(bool(torch.isfinite(m).all()) for m in ref.maps.values())
    check("maps stay on the model's device", devices == {device.type}, str(devices))
    check("maps finite", finite)
    if device.type != "cuda":
        check("no host sync inside compute_cams", None, "CUDA only")
        check("autocast float16 / bfloat16", None, "CUDA only")
        return

    labels = torch.arange(16, device=device) % 10
    # The probe's labels (the callback's target="label") are read back once, at the first call.
    for name, target, chunk in (
        ("'predicted'", "predicted", None),
        ("labels on the GPU", labels, None),
        ("labels on the GPU, batch_size=8", labels, 8),
        ("an int", 3, None),
    ):
        compute_cams(model, x, layers, CAMS, target=target, batch_size=chunk)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        what = f"no host sync inside compute_cams (second call, target={name})"
        try:
            compute_cams(model, x, layers, CAMS, target=target, batch_size=chunk)
            check(what, True)
        except RuntimeError as err:
            check(what, False, str(err).splitlines()[0])
        finally:
            torch.cuda.set_sync_debug_mode(0)

    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            mixed = compute_cams(model, x, layers, CAMS)
        worst = min(pearson(mixed[k], ref[k]) for k in ref.maps)
        dtypes = {m.dtype for m in mixed.maps.values()}
        ok = worst > 0.99 and dtypes == {torch.float32}
        check(f"autocast {dtype}: float32 maps, min per-image pearson vs fp32", ok, f"{worst:.4f}")


def host_syncs(run: Any) -> int:
    """How many synchronising CUDA operations (host transfers, `.item()`) `run()` makes."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def evaluation_sync_checks(device: torch.device) -> None:
    """Scoring (drift and localization) costs one host transfer per evaluation; drawing only
    the captions' predicted and true classes (overlay grids stay on the device: `encoding`)."""
    if device.type != "cuda":
        check("scoring: one host transfer per evaluation", None, "CUDA only")
        check("drawing: no host transfer per overlay grid", None, "CUDA only")
        check("history: the maps in one host transfer", None, "CUDA only")
        return
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10).to(device)
    x = torch.randn(16, 3, 64, 64, device=device)
    masks = torch.rand(16, 64, 64, device=device) > 0.5
    labels = torch.randint(0, 10, (16,), device=device)
    probe = ProbeSet("probe", x, labels=labels, masks=masks)
    result = compute_cams(model, x, ["layer3", "layer4"], ["gradcam", "gradcam++"])
    tracker = AttentionTracker(DriftOptions())
    tracker.score({"probe": result}, {"probe": probe})  # the first: no drift yet
    syncs = host_syncs(lambda: tracker.score({"probe": result}, {"probe": probe}))
    check("scoring: one host transfer per evaluation (drift, localization, entropy)",
          syncs == 1, f"{syncs} synchronising operations")  # fmt: skip
    grids: dict[Any, torch.Tensor] = {}
    # The first drawing uploads the colormap and the caption bands, cached per device after.
    cold = host_syncs(lambda: grids.update(render_probe(probe, result, RenderOptions())))
    syncs = host_syncs(lambda: grids.update(render_probe(probe, result, RenderOptions())))
    detail = f"{syncs} for {len(grids)} grids ({cold} the first time)"
    on_device = {grid.device.type for grid in grids.values()} == {"cuda"}
    check("drawing: no host transfer per overlay grid (2: predicted and true classes)",
          syncs <= 2 and on_device, detail)  # fmt: skip
    record: list[Any] = []
    syncs = host_syncs(lambda: record.append(evaluation_record(
        0, 0, 0, {"probe": probe}, {"probe": result}, {})))  # fmt: skip
    same = all(
        np.array_equal(record[0].maps[MapKey("probe", *key)], maps.float().cpu().numpy())
        for key, maps in result.maps.items()
    )
    detail = f"{syncs} synchronising operations for {len(result.maps)} maps"
    check("history: the maps in one host transfer (4: with targets, logits, labels), as they are",
          syncs <= 4 and same, detail)  # fmt: skip


def cuda_tests(device: torch.device) -> None:
    """The suite's CUDA-only tests (`CUDA_TESTS`), with pytest, one check each."""
    for test in CUDA_TESTS:
        name = f"pytest {test.split('::')[-1]}"
        if device.type != "cuda":
            check(name, None, "CUDA only")
            continue
        if not (ROOT / test.split("::")[0]).is_file():
            check(name, None, "no tests/ next to this script")
            continue
        command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        last = (done.stdout.strip().splitlines() or [""])[-1]
        check(name, done.returncode == 0 and "1 passed" in last, last)
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-2000:], sep="\n")


def jpeg_timings(
    device: torch.device, setup: evaluation_cost.FitSetup, reps: int, warmup: int
) -> list[dict[str, Any]]:
    """Issue 28: the evaluation's grids (issue 14's setup) JPEG-encoded on the GPU, by the
    monitor's encoder and by each backend alone, against the CPU path it replaces: the grids
    copied to the host, then OpenCV on the encoder's threads. Checks which encoder ran, its
    chroma subsampling and that its bytes decode within `GPU_JPEG_TOLERANCE` of the CPU's."""
    torch.manual_seed(0)
    module = evaluation_cost.Classifier(setup).to(device)
    inputs = evaluation_cost.probe_images(setup).to(device)
    result = compute_cams(module, inputs, list(setup.monitor_layers), list(setup.methods))
    grids = evaluation_cost.draw_grids(ProbeSet("probe", inputs), result, setup)
    gpu, where = device.type == "cuda", "on the GPU" if device.type == "cuda" else "on CPU tensors"
    encoder = GridEncoder()

    def monitor(on_host: bool) -> list[tuple[bytes, str | None]]:
        drawn = {k: g.cpu() for k, g in grids.items()} if on_host else grids
        encoded = encoder.submit(drawn, "jpeg").result().values()
        return [(image.data, image.encoder) for image in encoded]

    contenders = {"CPU path: to host, OpenCV on the encoder's threads": partial(monitor, True)}
    if gpu:
        contenders["GPU path: the monitor's encoder"] = partial(monitor, False)
    for backend in (TORCHCODEC, TORCHVISION):
        if importlib.util.find_spec(backend.name) is not None:
            contenders[f"{backend.name} alone, {where}"] = partial(
                encode_jpegs, list(grids.values()), backend
            )
    seconds, _ = harness.interleaved(contenders, reps, warmup, device, progress=False)
    cpu_bytes = [data for data, _ in monitor(True)]
    rows = []
    for name, run in contenders.items():
        pairs = run()
        encoded = [data for data, _ in pairs]
        versus_cpu = [decoded_difference(*two) for two in zip(encoded, cpu_bytes, strict=True)]
        drawn = list(grids.values())
        versus_drawn = [decoded_difference(*two)[0] for two in zip(encoded, drawn, strict=True)]
        rows.append(
            {
                "path": name,
                "encoder": ", ".join(sorted({str(encoded_by) for _, encoded_by in pairs})),
                "ms": 1e3 * harness.median(seconds[name]),
                "spread": harness.spread(seconds[name]),
                "kib_per_grid": sum(len(data) for data, _ in pairs) / len(pairs) / 1024,
                "chroma": ", ".join(sorted({chroma_subsampling(data) for data, _ in pairs})),
                "mean_vs_cpu": max(mean for mean, _ in versus_cpu),
                "max_vs_cpu": max(largest for _, largest in versus_cpu),
                "mean_vs_drawn": max(versus_drawn),
                "all_seconds": seconds[name],
            }
        )
    encoder.close()
    print_jpeg_rows(rows, next(iter(grids.values())).shape, reps)
    jpeg_checks(rows[1:], gpu)
    return rows


def print_jpeg_rows(rows: Sequence[dict[str, Any]], shape: torch.Size, reps: int) -> None:
    print(f"\n## JPEG encoding of one evaluation's grids ({shape[2]} x {shape[1]} px), "
          f"median of {reps}\n")  # fmt: skip
    keys = ["path", "encoder", "ms", "spread", "kib_per_grid", "chroma", "mean_vs_cpu",
            "max_vs_cpu", "mean_vs_drawn"]  # fmt: skip
    headers = ["path", "encoder", "median ms", "spread", "KiB / grid", "chroma",
               "mean diff vs CPU", "max diff vs CPU", "mean diff vs drawn"]  # fmt: skip
    print(harness.markdown_table(headers, [[row[k] for k in keys] for row in rows]))
    print(f"\nDifferences: of the decoded bytes, in levels of 0-255, the worst grid's; the "
          f"tolerance is {GPU_JPEG_TOLERANCE} (mean).")  # fmt: skip


def jpeg_checks(others: Sequence[dict[str, Any]], gpu: bool) -> None:
    """The GPU encoders' rows (`jpeg_timings`): within the tolerance of the CPU path's bytes;
    on a GPU, the encoder `gpu_jpeg_backend` chose ran, at chroma 4:4:4."""
    name = f"JPEG bytes of the GPU encoders decode within {GPU_JPEG_TOLERANCE} of the CPU path's"
    detail = ", ".join(f"{row['path']}: {row['mean_vs_cpu']:.2f}" for row in others)
    if not gpu:  # their CPU paths subsample chroma (4:2:0): test_encoding.py bounds those
        check(name, None, f"CUDA only ({detail or 'none installed'})")
        check("JPEG grids on the GPU: the encoder that ran", None, "CUDA only")
        check("JPEG grids on the GPU: chroma 4:4:4", None, "CUDA only")
        return
    fits = all(row["mean_vs_cpu"] <= GPU_JPEG_TOLERANCE for row in others)
    check(name, fits if others else None, detail or "none installed")
    backend = gpu_jpeg_backend()
    expected = backend.name if backend is not None else "none"
    ran = others[0]["encoder"]  # the monitor's encoder
    check("JPEG grids on the GPU: the encoder that ran", ran == expected,
          f"{ran} (gpu_jpeg_backend: {expected})")  # fmt: skip
    chroma = {row["path"]: row["chroma"] for row in others}
    check("JPEG grids on the GPU: chroma 4:4:4", set(chroma.values()) == {"4:4:4"}, str(chroma))


class Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = resnet18(weights=None, num_classes=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_checks(device: torch.device, quick: bool) -> None:
    gpu = device.type == "cuda"
    size = 32 if quick else 64
    data = TensorDataset(torch.randn(64, 3, size, size), torch.randint(0, 5, (64,)))
    precisions = ("32-true", "16-mixed", "bf16-mixed") if gpu else ("32-true",)
    for precision in precisions:
        with tempfile.TemporaryDirectory() as tmp:
            monitor = CamMonitor(["net.layer3", "net.layer4"], methods=CAMS, num_probe=8,
                                 save_dir=Path(tmp) / "hist")  # fmt: skip
            trainer = pl.Trainer(
                accelerator="gpu" if gpu else "cpu", devices=1, max_epochs=2, precision=precision,
                logger=False, callbacks=[monitor], enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False,
            )  # fmt: skip
            trainer.fit(Lit(), DataLoader(data, batch_size=16, shuffle=True))
            history = read_history(Path(tmp) / "hist")
            probe_device = next(iter(monitor.run.probes.values())).inputs.device.type
            finite = all(bool(torch.isfinite(torch.from_numpy(m)).all())
                         for e in history for m in e.maps.values())  # fmt: skip
            ok = len(history) == 3 and probe_device == device.type and finite
            check(f"fit on {device.type}, precision={precision}", ok,
                  f"{len(history)} evaluations, probe on {probe_device}, "
                  f"{history[-1].scalars['cam_monitor/seconds']:.3f} s/evaluation")  # fmt: skip
    if not gpu:
        check("FSDP refused at setup", None, "needs a GPU")
        return
    monitor = CamMonitor("net.layer4")
    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy="fsdp", max_epochs=1,
                         logger=False, callbacks=[monitor], enable_progress_bar=False)  # fmt: skip
    try:
        trainer.fit(Lit(), DataLoader(data, batch_size=16))
        check("FSDP refused at setup", False, "fit ran")
    except ValueError as err:
        check("FSDP refused at setup", "sharded strategy" in str(err), str(err)[:80])


def engine_timings(
    device: torch.device, batch: int, size: int, reps: int, warmup: int
) -> list[dict[str, Any]]:
    """Plain forward, floor, ours (and captum / torchcam where installed) on resnet50."""
    setup = engine_bench.build_setup("resnet50", batch, size, device)
    names = ["forward", "floor", "ours"]
    names += [p for p in ("captum", "torchcam") if importlib.util.find_spec(p) is not None]
    rows = []
    for scenario in ("1x1", "4x5"):
        layers = setup.layers[scenario]
        methods = engine_bench.SCENARIO_METHODS[scenario]
        contenders = {n: engine_bench.FACTORIES[n](setup, layers, methods) for n in names}
        seconds, _ = harness.interleaved(contenders, reps, warmup, device, progress=False)
        forward, floor = harness.median(seconds["forward"]), harness.median(seconds["floor"])
        for name in names:
            median = harness.median(seconds[name])
            rows.append(
                {
                    "scenario": scenario,
                    "contender": name,
                    "ms": 1e3 * median,
                    "spread": harness.spread(seconds[name]),
                    "x_forward": median / forward,
                    "x_floor": median / floor,
                    "all_seconds": seconds[name],
                }
            )
    print(f"\n## Engine: resnet50, {batch}x3x{size}x{size}, median of {reps}\n")
    keys = ["scenario", "contender", "ms", "spread", "x_forward", "x_floor"]
    print(harness.markdown_table(["scenario", "contender", "median ms", "spread", "x forward",
                                  "x floor"], [[r[k] for k in keys] for r in rows]))  # fmt: skip
    return rows


def target_rows(engine: Sequence[dict[str, Any]], fits: Sequence[dict[str, Any]]) -> list[list]:
    """Issue 14's and issue 28's GPU and engine targets next to what was measured."""
    out: list[list[Any]] = []

    def add(target: str, value: float | None, limit: float) -> None:
        if value is None:
            out.append([target, None, "not measured"])
        else:
            out.append([target, f"{value:.3g}", "yes" if value <= limit else "NO"])

    found = {(r["scenario"], r["contender"]): r for r in engine}
    for scenario in ("1x1", "4x5"):
        row = found.get((scenario, "ours"))
        add(f"engine {scenario}: ours / floor <= 1.10", row and row["x_floor"], 1.10)
    plain = next((r for r in fits if r["arm"] == "plain"), None)
    for row in fits:
        if row["arm"] == "plain" or plain is None:
            continue
        arm = row["arm"]
        add(f"fit, {arm}: in-loop s per evaluation <= 0.1", row["in_loop_per_evaluation_s"], 0.1)
        add(f"fit, {arm}: logger close() s < 0.5", row["finalize_s"], 0.5)
        add(f"fit, {arm}: fit / plain fit <= 1.10", row["x_plain"], 1.10)
        # issue 28, target 3: an evaluation near its CAMs, the fit near the plain one
        add(f"fit, {arm}: cost per evaluation / compute_cams <= 2", row["x_compute_cams"], 2.0)
        add(f"fit, {arm}: fit / plain fit <= 1.05", row["x_plain"], 1.05)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--out", type=Path, default=None, help="write every number here (JSON)")
    parser.add_argument("--reps", type=int, default=None, help="timed fit rounds (2; quick 1)")
    parser.add_argument("--engine-reps", type=int, default=None, help="engine timings (20)")
    parser.add_argument("--skip-checks", action="store_true", help="measure only")
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 2)
    args.engine_reps = args.engine_reps or (2 if args.quick else 20)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device (or --device cpu for a smoke test)")
    device = torch.device(args.device)
    overhead.quiet_lightning()
    setup = evaluation_cost.GPU_SETUP
    if args.quick:
        setup = evaluation_cost.quick(setup)
        if device.type == "cpu":  # bf16 resnet50 fits are slow on a CPU; the code path is the same
            setup = replace(setup, model="resnet18", precision="32-true")
    versions = harness.package_versions(
        ["torch", "pytorch-lightning", "tensorboard", "crc32c", "opencv-python-headless"]
    )
    info = harness.print_header(
        "GPU checks and issue 14's GPU measurements",
        device,
        {
            "packages": ", ".join(f"{k} {v}" for k, v in versions.items()),
            "fit": setup.describe(),
        },
    )
    payload: dict[str, Any] = {"machine": info, "versions": versions, "checks": CHECKS}
    if not args.skip_checks:
        engine_checks(device)
        evaluation_sync_checks(device)
        cuda_tests(device)
        fit_checks(device, args.quick)
    batch, size = (2, 64) if args.quick else (32, 224)
    warmup = 1 if args.quick else 5
    payload["engine"] = engine_timings(device, batch, size, args.engine_reps, warmup)
    payload["jpeg"] = jpeg_timings(device, setup, args.engine_reps, warmup)
    harness.write_json(args.out, payload, quiet=True)

    print(f"\n## Issue 14's GPU fit on {info['device_name']}\n")
    fit_warmup = 0 if args.quick else 1
    cost = evaluation_cost.measure(setup, device, args.reps, fit_warmup)
    payload["fit"] = cost
    targets = target_rows(payload["engine"], cost["fits"])
    print("\n## Targets (issue 14)\n")
    print(harness.markdown_table(["target", "measured", "met"], targets))
    payload["targets"] = targets

    failed = [c["check"] for c in CHECKS if c["result"] == "FAIL"]
    print(f"\n{len(failed)} checks failed: {failed}" if failed else "\nall checks passed")
    harness.write_json(args.out, payload)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
