"""GPU checks CI cannot run (it has no GPU): device placement, autocast, host syncs, a real fit.

    python benchmarks/gpu_check.py            # exits non-zero if a check fails

Prints one line per check and a small timing table (resnet50, 224 px, batch 16).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18, resnet50

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cam_monitor import CamMonitor, compute_cams
from cam_monitor.history import read_history

CAMS = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"]
FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}")
    if not ok:
        FAILURES.append(name)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).min())


def engine_checks() -> None:
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10).cuda()
    x = torch.randn(16, 3, 64, 64, device="cuda")
    layers = ["layer3", "layer4"]
    ref = compute_cams(model, x, layers, CAMS)
    devices = {m.device.type for m in ref.maps.values()}
    finite = all(bool(torch.isfinite(m).all()) for m in ref.maps.values())
    check("maps stay on the model's device", devices == {"cuda"}, str(devices))
    check("maps finite", finite)

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        compute_cams(model, x, layers, CAMS)
        check("no host sync inside compute_cams (second call, target='predicted')", True)
    except RuntimeError as err:
        check("no host sync inside compute_cams", False, str(err).splitlines()[0])
    finally:
        torch.cuda.set_sync_debug_mode(0)

    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            mixed = compute_cams(model, x, layers, CAMS)
        worst = min(pearson(mixed[k], ref[k]) for k in ref.maps)
        dtypes = {m.dtype for m in mixed.maps.values()}
        ok = worst > 0.99 and dtypes == {torch.float32}
        check(f"autocast {dtype}: float32 maps, min per-image pearson vs fp32", ok, f"{worst:.4f}")


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


def fit_checks() -> None:
    data = TensorDataset(torch.randn(64, 3, 64, 64), torch.randint(0, 5, (64,)))
    for precision in ("32-true", "16-mixed", "bf16-mixed"):
        with tempfile.TemporaryDirectory() as tmp:
            monitor = CamMonitor(["net.layer3", "net.layer4"], methods=CAMS, num_probe=8,
                                 save_dir=Path(tmp) / "hist")  # fmt: skip
            trainer = pl.Trainer(
                accelerator="gpu", devices=1, max_epochs=2, precision=precision, logger=False,
                callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False,
            )  # fmt: skip
            trainer.fit(Lit(), DataLoader(data, batch_size=16, shuffle=True))
            history = read_history(Path(tmp) / "hist")
            probe_device = next(iter(monitor._probes.values())).inputs.device.type
            finite = all(bool(torch.isfinite(torch.from_numpy(m)).all())
                         for e in history for m in e.maps.values())  # fmt: skip
            ok = len(history) == 3 and probe_device == "cuda" and finite
            check(f"fit on GPU, precision={precision}", ok,
                  f"{len(history)} evaluations, probe on {probe_device}, "
                  f"{history[-1].scalars['cam_monitor/seconds']:.3f} s/evaluation")  # fmt: skip

    monitor = CamMonitor("net.layer4")
    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy="fsdp", max_epochs=1,
                         logger=False, callbacks=[monitor], enable_progress_bar=False)  # fmt: skip
    try:
        trainer.fit(Lit(), DataLoader(data, batch_size=16))
        check("FSDP refused at setup", False, "fit ran")
    except ValueError as err:
        check("FSDP refused at setup", "sharded strategy" in str(err), str(err)[:80])


def timed(fn: Callable[[], object], reps: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def timings() -> None:
    torch.manual_seed(0)
    model = resnet50(weights=None).cuda().eval()
    x = torch.randn(16, 3, 224, 224, device="cuda")
    four = ["layer1", "layer2", "layer3", "layer4"]

    def plain() -> object:
        with torch.no_grad():
            return model(x)

    rows = [
        ("plain forward, no_grad", timed(plain)),
        ("compute_cams 1 layer x gradcam", timed(lambda: compute_cams(model, x, "layer4"))),
        ("compute_cams 4 layers x 5 methods", timed(lambda: compute_cams(model, x, four, CAMS))),
    ]
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, resnet50, 16x3x224x224")
    print("| contender | median ms | x plain forward |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / rows[0][1]:.2f} |")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device")
    engine_checks()
    fit_checks()
    timings()
    print(f"\n{len(FAILURES)} failed: {FAILURES}" if FAILURES else "\nall GPU checks passed")
    sys.exit(1 if FAILURES else 0)
