"""The promises in docs/guarantees.md, each against a real Lightning Trainer."""

from __future__ import annotations

import gc
import json
import random
import resource
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cam_monitor.evaluation as evaluation_module
from cam_monitor import CamMonitor, compute_cams
from cam_monitor.callback import check_strategy
from cam_monitor.drift import AttentionTracker
from cam_monitor.evaluation import run_evaluation
from cam_monitor.history import read_history
from cam_monitor.options import EngineOptions, RenderOptions
from cam_monitor.probe import make_probe
from tests.helpers import (
    ClassifierSteps,
    Lightning,
    LitClassifier,
    TinyCNN,
    fit,
    loader,
    quiet_trainer,
    shapes_dataset,
)

REPO = Path(__file__).resolve().parents[1]


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return -0.5 * grad


class BackwardFault(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("backward fault injected")


class FaultyLayer(nn.Module):
    """Identity whose backward raises in eval mode (the monitor) from the `arm_at`-th call."""

    def __init__(self, arm_at: int) -> None:
        super().__init__()
        self.arm_at, self.eval_calls = arm_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x
        self.eval_calls += 1
        return BackwardFault.apply(x) if self.eval_calls == self.arm_at else x


class DannSteps:
    """BatchNorm, Dropout, a label head and a domain head behind gradient reversal; AdamW+StepLR.
    Mixed into either namespace's LightningModule (`DannLit`, `Lightning.module`)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.5)
        self.label_head = nn.Linear(8, 5)
        self.domain_head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.dropout(self.pool(self.features(x)).flatten(1))
        return self.label_head(z), self.domain_head(GradReverse.apply(z))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        logits, domain = self(x)
        fake_domain = (torch.arange(len(x)) >= len(x) // 2).long()
        return nn.functional.cross_entropy(logits, y) + nn.functional.cross_entropy(
            domain, fake_domain
        )

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


class DannLit(DannSteps, pl.LightningModule):
    """`DannSteps` on `pytorch_lightning`."""


def hook_counts(model: nn.Module) -> list[int]:
    return [
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    ]


# -- no trace on training ------------------------------------------------------------------------


def dann_fit(
    tmp_path: Path, callbacks: list[pl.Callback], lightning: Lightning, accumulate: int = 2
) -> tuple[DannLit, pl.Trainer, torch.Tensor]:
    train = loader(shapes_dataset(64), shuffle=True, batch_size=8)
    model, trainer = fit(
        callbacks, tmp_path, lightning, model=lightning.module(DannSteps), train=train, val=False,
        max_epochs=2, accumulate_grad_batches=accumulate,
    )  # fmt: skip
    return model, trainer, torch.get_rng_state()


def test_no_trace_on_weights_buffers_optimizer_or_rng(tmp_path: Path, lightning: Lightning) -> None:
    monitors = [
        CamMonitor(
            ["features.2", "features.5"], methods=["gradcam", "gradcam++", "hirescam"],
            output_transform=0, num_probe=8, save_dir=tmp_path / "epochs",
        ),
        CamMonitor("features.3", every_n_steps=1, output_transform=0, num_probe=4,
                   save_dir=tmp_path / "steps"),
    ]  # fmt: skip
    plain, plain_trainer, plain_rng = dann_fit(tmp_path / "plain", [], lightning)
    watched, watched_trainer, watched_rng = dann_fit(tmp_path / "watched", monitors, lightning)
    assert monitors[0].evaluations == 3 and monitors[1].evaluations == 9  # 8 steps + baseline
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # weights and BatchNorm buffers
    opt_a = plain_trainer.optimizers[0].state_dict()
    opt_b = watched_trainer.optimizers[0].state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for key, state in opt_a["state"].items():
        for field, value in state.items():
            assert torch.equal(value, opt_b["state"][key][field]), (key, field)
    assert torch.equal(plain_rng, watched_rng)
    assert sum(hook_counts(watched)) == 0


class ValidatedDannSteps(DannSteps):
    """`DannSteps` with a validation step (its loss logged, as users do)."""

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x)[0], y))


def test_an_evaluation_in_the_closing_validation_leaves_no_trace(
    tmp_path: Path, lightning: Lightning
) -> None:
    # With validation every 2nd epoch, EarlyStopping reads at validation end, so the monitor
    # evaluates inside that validation (under inference mode, the model in eval mode).
    tag = "cam_stats/probe/features.3/gradcam/entropy"
    probe = shapes_dataset(4, seed=3).tensors
    monitor = CamMonitor("features.3", output_transform=0, probe=probe, faithfulness=None)
    stop = lightning.callbacks.EarlyStopping(monitor=tag, mode="max", patience=100)
    val = loader(shapes_dataset(16, seed=1), batch_size=8)
    runs = {}
    for name, callbacks in (("plain", []), ("watched", [monitor, stop])):
        model, trainer = fit(
            callbacks, tmp_path / name, lightning, model=lightning.module(ValidatedDannSteps),
            val=val, max_epochs=4, check_val_every_n_epoch=2,
        )  # fmt: skip
        runs[name] = (model.state_dict(), trainer.optimizers[0].state_dict(), torch.get_rng_state())
    assert monitor.evaluations == 5 and torch.isfinite(stop.best_score)
    assert monitor.run.early_readers, "the evaluations ran in the closing validations"
    (weights_a, opt_a, rng_a), (weights_b, opt_b, rng_b) = runs["plain"], runs["watched"]
    for (name, a), b in zip(weights_a.items(), weights_b.values(), strict=True):
        assert torch.equal(a, b), name
    for key, state in opt_a["state"].items():
        for field, value in state.items():
            assert torch.equal(value, opt_b["state"][key][field]), (key, field)
    assert torch.equal(rng_a, rng_b)


class EvaluateWithGradients:
    """Evaluates between the backward and the optimizer step, and after every batch: in the
    middle of gradient accumulation, with parameter `.grad` filled. A mixin for either
    namespace's `Callback`."""

    def __init__(self, monitor: CamMonitor) -> None:
        self.monitor = monitor
        self.grads_seen = 0

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.grads_seen += any(p.grad is not None for p in pl_module.parameters())
        self.monitor.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           *args: Any) -> None:  # fmt: skip
        self.monitor.evaluate(trainer, pl_module)


def test_evaluations_in_the_middle_of_gradient_accumulation_leave_it_alone(
    tmp_path: Path, lightning: Lightning
) -> None:
    results = []
    for watched in (False, True):
        monitor = CamMonitor("features.3", output_transform=0, num_probe=4, save_dir=tmp_path)
        mid = type("Mid", (EvaluateWithGradients, lightning.pl.Callback), {})(monitor)
        callbacks = [monitor, mid] if watched else []
        results.append(dann_fit(tmp_path / str(watched), callbacks, lightning, accumulate=3))
    (plain, plain_trainer, plain_rng), (model, trainer, rng) = results
    assert mid.grads_seen == 16
    assert monitor.evaluations == 35  # and the baseline, and one after each epoch
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(plain.parameters(), model.parameters(), strict=True):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    state = trainer.optimizers[0].state_dict()["state"]
    for key, fields in plain_trainer.optimizers[0].state_dict()["state"].items():
        assert all(torch.equal(value, state[key][f]) for f, value in fields.items()), key
    assert torch.equal(plain_rng, rng)


class Bookkeeper(nn.Module):
    """Counts its calls in a buffer and draws from numpy's and Python's streams in every mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * (1 + 1e-3 * (float(np.random.rand()) + random.random()))


class QuantizationAwareSteps:
    """A CNN prepared for quantization-aware training: its fake-quantize observers update their
    statistics in every forward, eval mode included; plus a `Bookkeeper`. Logs its loss."""

    def __init__(self) -> None:
        super().__init__()
        import torch.ao.quantization as tq

        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Bookkeeper(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
        )  # fmt: skip
        net.qconfig = tq.get_default_qat_qconfig("fbgemm")
        self.net = tq.prepare_qat(net.train())
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def awkward_fit(
    tmp_path: Path, callbacks: list[pl.Callback], lightning: Lightning
) -> tuple[pl.LightningModule, pl.Trainer, tuple[Any, ...]]:
    train = loader(shapes_dataset(32), shuffle=True, batch_size=8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(reduce_range|exactly zero)")
        steps = lightning.module(QuantizationAwareSteps)
        model, trainer = fit(callbacks, tmp_path, lightning, model=steps, train=train, val=False)
    streams = (torch.get_rng_state(), np.random.get_state()[1].tolist(), random.getstate())
    return model, trainer, streams


def test_no_trace_on_a_model_whose_forward_updates_state_in_eval_mode(
    tmp_path: Path, lightning: Lightning
) -> None:
    """Quantization observers, a counter buffer, numpy and Python draws: bit-identical fits."""
    monitor = CamMonitor("net.3", every_n_steps=1, num_probe=4, save_dir=tmp_path / "cams")
    plain, plain_trainer, plain_streams = awkward_fit(tmp_path / "plain", [], lightning)
    watched, watched_trainer, watched_streams = awkward_fit(
        tmp_path / "watched", [monitor], lightning
    )
    assert monitor.evaluations == 9  # 8 steps + baseline
    assert watched.losses == plain.losses
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # weights, observer statistics, the counter
    assert int(plain.net[2].calls) == 8
    momentum = [s["momentum_buffer"] for s in plain_trainer.optimizers[0].state.values()]
    watched_momentum = [s["momentum_buffer"] for s in watched_trainer.optimizers[0].state.values()]
    assert all(map(torch.equal, momentum, watched_momentum))
    assert torch.equal(plain_streams[0], watched_streams[0])
    assert plain_streams[1:] == watched_streams[1:]


def test_the_users_hooks_stay_run_in_eval_mode_and_are_named_once(
    tmp_path: Path, lightning: Lightning
) -> None:
    model = lightning.module(ClassifierSteps)()
    calls = {True: 0, False: 0}  # by `module.training`: the guard the warning recommends

    def count(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        calls[module.training] += 1

    model.net.features[3].register_forward_hook(count)
    model.net.fc.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    nn.utils.spectral_norm(model.net.features[0])  # torch's own pre-hook: not named
    monitor = CamMonitor("net.features.3", num_probe=4, save_dir=tmp_path / "cams")
    trainer = lightning.trainer(
        default_root_dir=tmp_path, logger=False, callbacks=[monitor], max_epochs=1,
        limit_train_batches=2,
    )  # fmt: skip
    with pytest.warns(UserWarning) as caught:
        trainer.fit(model, loader(shapes_dataset(32), batch_size=8))
    named = [str(w.message) for w in caught if "hooks of yours" in str(w.message)]
    assert len(named) == 1
    assert "('net.features.3' (forward hook), 'net.fc' (backward hook))" in named[0]
    assert calls[True] == 2 and calls[False] >= monitor.evaluations == 2
    assert len(model.net.features[3]._forward_hooks) == len(model.net.fc._backward_hooks) == 1


class LoggingInForward(ClassifierSteps):
    """Logs from `forward` (an auxiliary quantity, as some models log their side losses)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.net(x)
        self.log("output_mean", output.mean())
        self.log_dict({"output_max": output.amax()})
        return output


def test_what_the_forward_logs_is_the_training_batches_not_the_probes(
    tmp_path: Path, lightning: Lightning
) -> None:
    logged = []
    for monitor in (None, CamMonitor(every_n_steps=1, num_probe=4, save_dir=tmp_path / "cams")):
        lightning.pl.seed_everything(0, verbose=False)
        model = lightning.module(LoggingInForward)()
        logger = lightning.loggers.CSVLogger(tmp_path / f"csv{len(logged)}")
        trainer = lightning.trainer(
            default_root_dir=tmp_path, logger=logger, callbacks=[monitor] if monitor else [],
            max_epochs=1, limit_train_batches=3,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no layer given")
            trainer.fit(model, loader(shapes_dataset(32), shuffle=True, batch_size=8))
        rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        values = [dict(zip(header, row.split(","), strict=True)) for row in rows[1:]]
        logged.append([(v["step"], v["output_mean"], v["output_max"]) for v in values
                       if v["output_mean"]])  # fmt: skip
        assert "log" not in vars(model) and "log_dict" not in vars(model)
    assert len(logged[0]) == 3
    assert logged[1] == logged[0]


@pytest.mark.slow
def test_two_hundred_evaluations_leave_no_growth() -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    probe = make_probe("probe", (torch.randn(8, 3, 32, 32), torch.arange(8) % 5), 8)
    layers, render = ["features.3", "features.5"], RenderOptions()
    engine = EngineOptions(methods=("gradcam", "layercam"))
    tracker = AttentionTracker()

    def evaluate() -> None:
        output = run_evaluation(model, {"probe": probe}, layers, engine, render)
        tracker.score(output.results, {"probe": probe})

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))

    for _ in range(10):
        evaluate()
    tensors_before = live_tensors()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(200):
        evaluate()
    assert live_tensors() == tensors_before
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 64 * 1024, f"peak RSS grew by {grown_kib} KiB over 200 evaluations"
    assert sum(hook_counts(model)) == 0


# -- fault injection ---------------------------------------------------------------------------


class FlagRecorder(pl.Callback):
    """Records every module's `training` flag at the end of each epoch, after the monitor ran."""

    def __init__(self) -> None:
        self.flags: list[list[bool]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flags.append([m.training for m in pl_module.modules()])


def faulty_setup(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A model, monitor arguments and logger with one fault at the first scheduled evaluation."""
    model = LitClassifier()
    kwargs: dict[str, Any] = {"num_probe": 4}
    logger: Any = False
    if kind == "forward":
        calls = {"n": 0}

        def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("forward fault injected")
            return module(x)

        kwargs["forward"] = forward
    elif kind == "backward":
        model.net.features.append(FaultyLayer(arm_at=2))
    elif kind == "render":
        real = evaluation_module.draw_overlays
        calls = {"n": 0}

        def render(*args: Any, **kw: Any) -> dict[Any, torch.Tensor]:
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("render fault injected")
            return real(*args, **kw)

        monkeypatch.setattr(evaluation_module, "draw_overlays", render)
    elif kind == "sink":
        logger = TensorBoardLogger(tmp_path, name="tb")
        file_writer = logger.experiment._get_file_writer()
        real_add = file_writer.add_summary
        calls = {"n": 0}

        def add_summary(summary: Any, *args: Any, **kw: Any) -> None:
            if any(v.tag.startswith("cam_") and v.HasField("simple_value") for v in summary.value):
                calls["n"] += 1  # an evaluation's scalars
                if calls["n"] == 2:
                    raise OSError("sink fault injected")
            real_add(summary, *args, **kw)

        monkeypatch.setattr(file_writer, "add_summary", add_summary)
    return {"model": model, "kwargs": kwargs, "logger": logger}


@pytest.mark.parametrize("kind", ["forward", "backward", "render", "sink"])
def test_a_fault_skips_one_evaluation_and_training_finishes(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = faulty_setup(kind, tmp_path, monkeypatch)
    model: LitClassifier = setup["model"]
    hooks_before = hook_counts(model)
    monitor = CamMonitor("net.features.5", **setup["kwargs"], save_dir=tmp_path / "hist")
    flags = FlagRecorder()
    trainer = quiet_trainer(
        default_root_dir=tmp_path, logger=setup["logger"], callbacks=[monitor, flags]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader(shapes_dataset()))
    # A logger's fault skips that evaluation for that logger only.
    said = "could not log its evaluation" if kind == "sink" else "skipped its evaluation"
    skipped = [w for w in caught if said in str(w.message)]
    assert len(skipped) == 1 and f"{kind} fault injected" in str(skipped[0].message)
    assert model.steps_run == 6
    assert hook_counts(model) == hooks_before
    assert flags.flags and all(all(epoch) for epoch in flags.flags)


@pytest.mark.parametrize("kind", ["forward", "backward", "render", "sink"])
def test_strict_lets_the_fault_reach_the_caller(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = faulty_setup(kind, tmp_path, monkeypatch)
    monitor = CamMonitor("net.features.5", **setup["kwargs"], strict=True, save_dir=tmp_path / "h")
    trainer = quiet_trainer(default_root_dir=tmp_path, logger=setup["logger"], callbacks=[monitor])
    with pytest.raises((RuntimeError, OSError), match=f"{kind} fault injected"):
        trainer.fit(setup["model"], loader(shapes_dataset()))
    assert sum(hook_counts(setup["model"])) == 0


# -- DDP, mixed precision, inference mode, compile, sharded strategies ------------------------


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp"])
def test_ddp_runs_on_rank_zero_only_and_matches_one_process(strategy: str, tmp_path: Path) -> None:
    script = REPO / "tests" / "ddp_run.py"
    done = subprocess.run(
        [sys.executable, str(script), "--strategy", strategy, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    reports = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    assert reports["rank0.json"]["evaluations"] == 3
    assert reports["rank1.json"]["evaluations"] == 0
    history = read_history(tmp_path / "hist")
    assert [e.epoch for e in history] == [0, 1, 2]
    sys.path.insert(0, str(REPO / "tests"))
    from ddp_run import probe_images

    model = LitClassifier()
    model.load_state_dict(torch.load(tmp_path / "final.pt"))
    single = compute_cams(model, probe_images(), "net.features.5", ["gradcam", "layercam"])
    for method in ("gradcam", "layercam"):
        stored = torch.from_numpy(history[-1].maps["probe", "net.features.5", method])
        expected = single["net.features.5", method]
        assert torch.allclose(stored, expected, rtol=1e-3, atol=1e-3 * float(expected.max()))


def per_image_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = (
        a.flatten(1) - a.flatten(1).mean(1, keepdim=True),
        b.flatten(1) - b.flatten(1).mean(1, keepdim=True),
    )
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_bf16_mixed_training_and_autocast_maps(tmp_path: Path) -> None:
    monitor = CamMonitor("net.features.5", num_probe=8, save_dir=tmp_path / "hist")
    model = LitClassifier()
    trainer = quiet_trainer(default_root_dir=tmp_path, logger=False, callbacks=[monitor],
                            precision="bf16-mixed")  # fmt: skip
    trainer.fit(model, loader(shapes_dataset()))
    last = read_history(tmp_path / "hist")[-1]
    assert np.isfinite(last.maps["train", "net.features.5", "gradcam"]).all()
    images = shapes_dataset(8, seed=5).tensors[0]
    fp32 = compute_cams(model, images, "net.features.5", ["gradcam", "gradcam++"], target=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = compute_cams(model, images, "net.features.5", ["gradcam", "gradcam++"], target=1)
    for key, maps in bf16.maps.items():
        assert maps.dtype == torch.float32 and torch.isfinite(maps).all()
        assert per_image_pearson(maps, fp32[key]).min() > 0.99, key


class EvaluateInValidation(pl.Callback):
    """Triggers the monitor from the validation loop, under Lightning's no-grad context and
    under an explicit inference mode (what `trainer.validate` uses)."""

    def __init__(self, monitor: CamMonitor) -> None:
        self.monitor, self.grad_enabled = monitor, []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.grad_enabled.append(torch.is_grad_enabled())
        self.monitor.evaluate(trainer, pl_module)
        with torch.inference_mode():
            self.monitor.evaluate(trainer, pl_module)


def test_evaluation_inside_the_validation_loop_and_validate_alone(tmp_path: Path) -> None:
    monitor = CamMonitor("net.features.5", num_probe=4, every_n_epochs=100, save_dir=tmp_path / "h")
    trigger = EvaluateInValidation(monitor)
    trainer = quiet_trainer(default_root_dir=tmp_path, logger=False, callbacks=[monitor, trigger])
    model = LitClassifier()
    trainer.fit(model, loader(shapes_dataset()), loader(shapes_dataset(16, seed=2)))
    assert trigger.grad_enabled == [False, False]
    history = read_history(tmp_path / "h")
    assert len(history) == 5  # the baseline, then two per validation epoch
    assert all(maps.max() > 0 for ev in history[1:] for maps in ev.maps.values())

    idle = CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "idle")
    other = quiet_trainer(default_root_dir=tmp_path, logger=False, callbacks=[idle])
    other.validate(model, loader(shapes_dataset(16)))
    other.test(model, loader(shapes_dataset(16)))
    assert idle.evaluations == 0 and not (tmp_path / "idle").exists()


@pytest.mark.slow
def test_a_compiled_module_is_monitored_in_eager_mode(tmp_path: Path) -> None:
    monitor = CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "h")
    model = LitClassifier()
    trainer = quiet_trainer(default_root_dir=tmp_path, logger=False, callbacks=[monitor])
    trainer.fit(torch.compile(model, backend="eager"), loader(shapes_dataset()))
    last = read_history(tmp_path / "h")[-1].maps["train", "net.features.5", "gradcam"]
    probe = make_probe("train", shapes_dataset(), 4).inputs
    expected = compute_cams(model, probe, "net.features.5")["net.features.5", "gradcam"]
    assert torch.allclose(torch.from_numpy(last), expected, atol=1e-3 * float(expected.max()))


def test_sharded_strategies_are_refused_with_a_clear_message(lightning: Lightning) -> None:
    for sharded in (lightning.strategies.FSDPStrategy, lightning.strategies.ModelParallelStrategy):
        with pytest.raises(
            ValueError, match=f"does not support the sharded strategy {sharded.__name__}"
        ):
            check_strategy(sharded())
    check_strategy(lightning.strategies.DDPStrategy())  # plain data parallel is fine


# -- bad input ---------------------------------------------------------------------------------


def fit_expecting(monitor: CamMonitor, tmp_path: Path, model: pl.LightningModule | None = None,
                  data: TensorDataset | None = None) -> pl.LightningModule:  # fmt: skip
    train = loader(data or shapes_dataset())
    model = model or LitClassifier()
    return fit(monitor, tmp_path, model=model, train=train, val=False, seed=None).model


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        (torch.randn(4, 1, 32, 32), r"could not compute its first CAMs.*probe: \(4, 1, 32, 32\)"),
        # one image without its batch dimension: BatchNorm's own ValueError, explained as well
        (torch.randn(3, 32, 32), r"(?s)first CAMs \(ValueError: expected 4D.*probe: \(3, 32, 32\)"),
        ((torch.rand(4, 3, 32, 32) * 255).to(torch.uint8), r"uint8 images.*x\.float\(\) / 255"),
        (TensorDataset(torch.zeros(0, 3, 32, 32)), r"probe dataset TensorDataset is empty"),
    ],
)
def test_a_probe_the_model_cannot_take_fails_before_training(
    probe: Any, message: str, tmp_path: Path
) -> None:
    model = LitClassifier()
    with pytest.raises(ValueError, match=message):
        fit_expecting(CamMonitor("net.features.5", probe=probe), tmp_path, model)
    assert model.steps_run == 0


def test_tuple_output_without_transform_fails_before_training(tmp_path: Path) -> None:
    model = DannLit()
    with pytest.raises(ValueError, match=r"returned a tuple of 2.*output_transform=0"):
        fit_expecting(CamMonitor("features.5", num_probe=4), tmp_path, model)


def test_num_probe_larger_than_the_dataset_uses_all_with_a_warning(tmp_path: Path) -> None:
    monitor = CamMonitor("net.features.5", num_probe=100, save_dir=tmp_path / "h")
    with pytest.warns(UserWarning, match="num_probe=100 but the dataset holds 48; using all"):
        fit_expecting(monitor, tmp_path)
    assert read_history(tmp_path / "h")[0].targets["train"].shape == (48,)


def test_non_finite_probe_warns_and_logs_nothing_broken(tmp_path: Path) -> None:
    images = torch.randn(4, 3, 32, 32)
    images[1, 0, 3, 3] = float("nan")
    monitor = CamMonitor("net.features.5", probe=images, save_dir=tmp_path / "h")
    with pytest.warns(UserWarning, match="hold NaN or Inf"):
        model = fit_expecting(monitor, tmp_path)
    assert model.steps_run == 6
    last = read_history(tmp_path / "h")[-1]
    assert last.scalars["cam_drift/probe/net.features.5/gradcam/spearman_ref_excluded"] == 1
    assert np.isfinite(last.scalars["cam_drift/probe/net.features.5/gradcam/spearman_ref"])
    assert len(list((tmp_path / "h" / "images").rglob("step-*.jpg"))) == 3


def test_all_zero_maps_are_excluded_not_fatal(tmp_path: Path) -> None:
    monitor = CamMonitor("net.features.5", num_probe=4, target=lambda lg: lg[:, 0] * 0,
                         save_dir=tmp_path / "h")  # fmt: skip
    fit_expecting(monitor, tmp_path)
    last = read_history(tmp_path / "h")[-1]
    entropy = "cam_stats/train/net.features.5/gradcam/entropy"
    assert np.isnan(last.scalars[entropy]) and last.scalars[f"{entropy}_excluded"] == 4
    assert np.isnan(last.scalars["cam_drift/train/net.features.5/gradcam/spearman_prev"])


def test_an_unwritable_log_folder_warns_and_training_continues(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monitor = CamMonitor("net.features.5", num_probe=4, save_dir=blocker / "cam")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fit_expecting(monitor, tmp_path)
    assert model.steps_run == 6
    skipped = [w for w in caught if "could not log its evaluation" in str(w.message)]
    assert len(skipped) == 3 and "a_file" in str(skipped[0].message)


def test_dataloader_probe_reads_samples_without_iterating(tmp_path: Path) -> None:
    class Counting(TensorDataset):
        reads: ClassVar[list[int]] = []

        def __getitem__(self, index: int) -> Any:
            self.reads.append(index)
            return super().__getitem__(index)

    data = Counting(*shapes_dataset(40).tensors)
    probe = make_probe("p", DataLoader(data, batch_size=8, shuffle=True), 5)
    assert data.reads == [0, 10, 20, 29, 39]
    assert torch.equal(probe.labels, torch.tensor([0, 0, 0, 4, 4]))
