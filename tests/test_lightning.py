"""CamMonitor in the Lightning ecosystem: either namespace alone, both LightningCLIs, the MLflow,
Comet and Neptune image APIs, and metrics that ModelCheckpoint and EarlyStopping can monitor."""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import threading
import types
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from cam_monitor.callback import CamMonitor, check_consumer_layers, check_metric_consumers
from cam_monitor.cli import main as cli_main
from cam_monitor.compare import load_run
from cam_monitor.encoding import THREAD_PREFIX, encode_grids
from cam_monitor.history import read_history, read_probe
from cam_monitor.lightning.compat import lightning_classes
from cam_monitor.schema import SECONDS_TAG, MapKey
from cam_monitor.sinks import NeptuneSink
from tests.helpers import ClassifierSteps, Lightning, fit, loader, read_events, shapes_dataset

REPO = Path(__file__).resolve().parents[1]
ENERGY = "cam_loc/target/net.features.5/gradcam/energy"


class ShapesSteps(ClassifierSteps):
    """`ClassifierSteps` with its own loaders, so a LightningCLI needs only the model class."""

    def train_dataloader(self) -> DataLoader:
        return loader(shapes_dataset(), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return loader(shapes_dataset(16, seed=1))


def call_model(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A `forward=` for the YAML test, named by its import path."""
    return module(inputs)


# -- either namespace alone, or neither ----------------------------------------------------------

ALONE = """
import sys
for blocked in {blocked!r}:
    sys.modules[blocked] = None  # as if not installed: `import` raises ImportError
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from cam_monitor import compute_cams
net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                    nn.Linear(4, 3))
assert compute_cams(net, torch.randn(2, 3, 16, 16), "1")  # the engine needs no Lightning
try:
    from cam_monitor import CamMonitor
except ImportError as err:
    print("IMPORT ERROR", err)
    raise SystemExit(0)
import {namespace} as L
lightning_bases = [b for b in CamMonitor.__bases__ if not b.__module__.startswith("cam_monitor")]
assert [b.__module__.split(".")[0] for b in lightning_bases] == [{namespace!r}.split(".")[0]]

class Lit(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = net
    def forward(self, x):
        return self.net(x)
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

monitor = CamMonitor("net.1", num_probe=4)
logger = L.loggers.TensorBoardLogger(sys.argv[1], name="tb")
trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=logger, callbacks=[monitor],
                    enable_progress_bar=False, enable_checkpointing=False)
data = TensorDataset(torch.randn(8, 3, 16, 16), torch.arange(8) % 3)
trainer.fit(Lit(), DataLoader(data, batch_size=4))
print("SINKS", [type(s).__name__ for s in monitor.run.sinks], "EVALUATIONS", monitor.evaluations)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("namespace", "blocked"),
    [
        ("lightning.pytorch", ["pytorch_lightning"]),
        ("pytorch_lightning", ["lightning", "lightning.pytorch"]),
        (None, ["lightning", "lightning.pytorch", "pytorch_lightning"]),
    ],
    ids=["lightning-alone", "pytorch_lightning-alone", "neither"],
)
def test_one_namespace_installed_or_none(
    namespace: str | None, blocked: list[str], tmp_path: Path
) -> None:
    script = ALONE.format(blocked=blocked, namespace=namespace or "pytorch_lightning")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
        env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    if namespace is None:
        assert "IMPORT ERROR" in done.stdout
        assert "pip install 'cam-monitor[lightning]'" in done.stdout
        assert "'cam-monitor[pytorch-lightning]'" in done.stdout
    else:
        assert "SINKS ['TensorBoardSink'] EVALUATIONS 2" in done.stdout, done.stdout


def test_one_class_is_a_callback_of_both_namespaces() -> None:
    import lightning.pytorch
    import pytorch_lightning

    monitor = CamMonitor("net.features.5")
    assert isinstance(monitor, pytorch_lightning.Callback)
    assert isinstance(monitor, lightning.pytorch.Callback)


# -- LightningCLI --------------------------------------------------------------------------------


def run_cli(lightning: Lightning, args: list[str]) -> Any:
    """`LightningCLI(model, args=args)` of `lightning`'s namespace, as if run as `prog args`."""
    cli = importlib.import_module(f"{lightning.name}.cli").LightningCLI
    argv, sys.argv = sys.argv, ["prog"]  # the CLI warns when pytest's own arguments are there
    try:
        return cli(lightning.module(ShapesSteps), args=args)
    finally:
        sys.argv = argv


def test_print_config_lists_every_argument_with_its_default(
    lightning: Lightning, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fit", "--trainer.callbacks+=cam_monitor.CamMonitor", "--print_config"]
    with pytest.raises(SystemExit):
        run_cli(lightning, args)
    config = yaml.safe_load(capsys.readouterr().out)
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"] == "cam_monitor.CamMonitor"
    listed = callback["init_args"]
    parameters = inspect.signature(CamMonitor).parameters
    assert list(listed) == list(parameters)
    for name, parameter in parameters.items():
        default = parameter.default
        assert listed[name] == (list(default) if isinstance(default, tuple) else default), name


@pytest.mark.parametrize("argument", ["methods", "views", "drift_measures", "faithfulness"])
def test_a_single_name_is_taken_wherever_a_list_of_names_is(
    lightning: Lightning, argument: str, capsys: pytest.CaptureFixture[str]
) -> None:
    value = {"methods": "layercam", "views": "pos", "drift_measures": "js"}.get(argument, "drop")
    args = ["fit", "--trainer.callbacks+=cam_monitor.CamMonitor",
            f"--trainer.callbacks.init_args.{argument}={value}", "--print_config"]  # fmt: skip
    with pytest.raises(SystemExit):
        run_cli(lightning, args)
    (callback,) = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    assert callback["init_args"][argument] == value


def test_yaml_sets_every_argument_and_fits(lightning: Lightning, tmp_path: Path) -> None:
    init_args: dict[str, Any] = {
        "layer": ["net.features.3", "net.features.5"],
        "methods": ["gradcam", "layercam"],
        "every_n_epochs": 2,
        "every_n_steps": None,
        "probe": {
            "class_path": "torchvision.datasets.FakeData",
            "init_args": {
                "size": 6,
                "image_size": [3, 32, 32],
                "num_classes": 5,
                "transform": {"class_path": "torchvision.transforms.ToTensor"},
            },
        },
        "num_probe": 4,
        "target": "label",
        "output_transform": None,
        "forward": "tests.test_lightning.call_model",
        "reshape": None,
        "masks": None,
        "input_key": "image",
        "label_key": "label",
        "colormap": "turbo",
        "alpha": 0.3,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "class_names": ["a", "b", "c", "d", "e"],
        "nrow": 2,
        "views": ["pos", "neg"],
        "gray_views": True,
        "image_format": "png",
        "max_tiles": 3,
        "batch_size": 2,
        "smooth": 0,
        "noise": 0.1,
        "cam_head": "net.fc",
        "ig_steps": 8,
        "filters": {"net.features.3": [0, 1]},
        "drift_measures": ["spearman", "js"],
        "topk": 0.1,
        "pointing_tolerance": 1,
        "faithfulness": ["drop", "increase"],
        "reference": None,
        "history": True,
        "history_maps": "cams",
        "save_dir": str(tmp_path / "history"),
        "strict": True,
    }
    assert set(init_args) == set(inspect.signature(CamMonitor).parameters)  # every one is here
    config = {
        "trainer": {
            "max_epochs": 2, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
            "enable_checkpointing": False, "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "cam_monitor.CamMonitor", "init_args": init_args}],
        }
    }  # fmt: skip
    path = tmp_path / "in" / "config.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(config))
    cli = run_cli(lightning, ["fit", "--config", str(path)])
    parsed = cli.config["fit"]["trainer"]["callbacks"][0]["init_args"]
    for name, value in init_args.items():
        if name not in ("probe", "forward"):  # a class with its defaults; the function itself
            assert parsed[name] == value, name
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, CamMonitor)]
    assert monitor.methods == ("gradcam", "layercam")
    forward = monitor.engine.forward
    assert (forward.__module__, forward.__name__) == ("tests.test_lightning", "call_model")
    assert monitor.render.colormap == "turbo"
    history = read_history(tmp_path / "history")
    assert [e.epoch for e in history] == [0, 2]  # baseline, then every 2nd epoch
    assert set(history[0].maps) >= {
        ("probe", layer, method)  # a Dataset probe is the set "probe"
        for layer in ("net.features.3", "net.features.5")
        for method in ("gradcam", "layercam")
    }
    assert (history[0].targets["probe"] == history[0].labels["probe"]).all()
    assert "cam_faith/probe/net.features.5/layercam/increase" in history[-1].scalars


# -- image APIs: MLflow, Comet, Neptune ----------------------------------------------------------


def test_mlflow_gets_images_with_steps_and_a_history_per_run(
    lightning: Lightning, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path}/mlruns"
    runs = []
    seen: set[str] = set()  # threads alive after each epoch-end evaluation

    class Watch(lightning.pl.Callback):  # type: ignore[name-defined, misc]
        def on_train_epoch_end(self, trainer: object, pl_module: object) -> None:
            seen.update(t.name for t in threading.enumerate())

    for _ in range(2):
        logger = lightning.loggers.MLFlowLogger(experiment_name="cam", tracking_uri=uri)
        monitor = CamMonitor("net.features.5", num_probe=4)
        fit([monitor, Watch()], tmp_path, lightning, logger=logger)
        runs.append(logger)
    # MLflow's log_image takes pixels: nothing is encoded, no encoding thread ever starts.
    assert seen and not [name for name in seen if name.startswith(THREAD_PREFIX)]
    client = MlflowClient(uri)
    run_id = runs[0].run_id
    images = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    steps = sorted(
        int(name.split("+")[2]) for name in images if "cam~val~net.features.5~gradcam+" in name
    )
    assert steps == [0, 3, 6]
    seconds = client.get_metric_history(run_id, SECONDS_TAG)
    assert sorted(m.step for m in seconds) == [0, 3, 6]
    folders = [tmp_path / "mlruns" / r.experiment_id / r.run_id / "cam_monitor" for r in runs]
    assert folders[0] != folders[1]
    assert all([e.index for e in read_history(folder)] == [0, 1, 2] for folder in folders)
    assert not list(tmp_path.rglob("step-*.png"))  # no PNG fallback: MLflow shows the images


@pytest.mark.slow
def test_comet_offline_experiment_gets_images_with_steps(
    lightning: Lightning, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMET_START_ONLINE", "false")  # an OfflineExperiment, written to a zip
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(tmp_path / "comet"))
    monkeypatch.setenv("COMET_ERROR_TRACKING_ENABLE", "false")  # no network here
    logger = lightning.loggers.CometLogger(project="cam-monitor-test")
    monitor = CamMonitor("net.features.5", num_probe=4)
    fit(monitor, tmp_path, lightning, logger=logger)
    key = logger.version
    logger.experiment.end()
    (archive,) = (tmp_path / "comet").glob("*.zip")
    messages = [
        json.loads(line) for line in zipfile.ZipFile(archive).read("messages.json").splitlines()
    ]
    figures = [
        m["payload"]["additional_params"] for m in messages
        if m.get("type") == "file_upload" and m["payload"].get("upload_type") == "visualization"
    ]  # fmt: skip
    grid = [f["step"] for f in figures if f["figName"] == "cam/val/net.features.5/gradcam"]
    assert grid == [0, 3, 6]
    metrics = [m["payload"]["metric"] for m in messages if m.get("type") == "metric_msg"]
    assert [m["step"] for m in metrics if m["metricName"] == SECONDS_TAG] == [0, 3, 6]
    history = read_history(tmp_path / "comet" / "cam-monitor-test" / key / "cam_monitor")
    assert len(history) == 3


@pytest.mark.slow
def test_neptune_offline_run_gets_image_series_with_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning 2.6 no longer builds a NeptuneLogger (Neptune was sunset): the sink is checked
    against a real offline Neptune run, behind the two members it uses of the logger."""
    import neptune

    monkeypatch.chdir(tmp_path)  # offline runs go to ./.neptune
    run = neptune.init_run(mode="offline", project="cam/monitor")

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            run[tag].append(value, step=step)

    sink = NeptuneSink(types.SimpleNamespace(experiment=run, log_metrics=log_metrics))  # type: ignore[arg-type]
    grid = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    for step in (0, 3):
        images = encode_grids({MapKey("val", "features.5", "gradcam"): grid}, "jpeg")
        sink.log(images, {SECONDS_TAG: 0.5}, step)
    run.stop()
    (log,) = (tmp_path / ".neptune").rglob("data-1.log")
    ops = [json.loads(line)["obj"] for line in log.read_text().splitlines()]
    images = [o for o in ops if o["path"] == ["cam", "val", "features.5", "gradcam"]]
    assert [o["type"] for o in images] == ["LogImages", "LogImages"]
    assert [o["values"][0]["step"] for o in images] == [0, 3]


# -- metrics for ModelCheckpoint and EarlyStopping -----------------------------------------------


def localization_monitor() -> CamMonitor:
    data = shapes_dataset(8, seed=3)
    images, labels = data.tensors
    return CamMonitor(
        "net.features.5",
        probe={"target": (images, labels)},
        masks={"target": images.mean(1) > 0.75},
    )


def test_model_checkpoint_keeps_the_epoch_with_the_highest_energy(
    lightning: Lightning, tmp_path: Path
) -> None:
    monitor = localization_monitor()
    checkpoint = lightning.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor=ENERGY, mode="max", filename="{epoch}"
    )
    trainer = fit(
        [monitor, checkpoint], tmp_path, lightning, enable_checkpointing=True, max_epochs=4
    ).trainer
    energies = [e.scalars[ENERGY] for e in read_history(tmp_path / "cam_monitor")][1:]
    assert len(set(energies)) > 1  # the choice means something
    best = max(range(4), key=lambda epoch: energies[epoch])
    assert float(checkpoint.best_model_score) == pytest.approx(energies[best], rel=1e-6)
    assert Path(checkpoint.best_model_path).name == f"epoch={best}.ckpt"
    assert float(trainer.callback_metrics[ENERGY]) == pytest.approx(energies[-1], rel=1e-6)


def test_early_stopping_watches_a_monitor_tag(lightning: Lightning, tmp_path: Path) -> None:
    stop = lightning.callbacks.EarlyStopping(monitor=ENERGY, mode="max", min_delta=1.0, patience=1)
    trainer = fit([localization_monitor(), stop], tmp_path, lightning, max_epochs=6).trainer
    assert trainer.current_epoch == 2 and stop.stopped_epoch == 1  # no gain of 1.0 after epoch 0


ENTROPY = "cam_stats/probe/net.features.5/gradcam/entropy"


def entropy_monitor() -> CamMonitor:
    images, labels = shapes_dataset(4, seed=3).tensors
    return CamMonitor("net.features.5", probe=(images, labels), faithfulness=None)


class RecordingEarlyStopping:
    """An EarlyStopping (of the namespace it is made for) that records each value it checks."""

    @staticmethod
    def of(lightning: Lightning) -> Any:
        class Recording(lightning.callbacks.EarlyStopping):  # type: ignore[misc,name-defined]
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                self.seen: list[tuple[int, float]] = []

            def _run_early_stopping_check(self, trainer: Any) -> None:
                self.seen.append((trainer.global_step, float(trainer.callback_metrics[ENTROPY])))
                super()._run_early_stopping_check(trainer)

        return Recording(monitor=ENTROPY, mode="max", patience=100)


@pytest.mark.parametrize(
    "validation",
    [{}, {"check_val_every_n_epoch": 2}, {"val_check_interval": 0.5}],
    ids=["default", "every-2nd-epoch", "twice-an-epoch"],
)
def test_consumers_read_the_evaluation_of_the_weights_they_check(
    lightning: Lightning, tmp_path: Path, validation: dict[str, Any]
) -> None:
    # ModelCheckpoint and EarlyStopping check at validation end when validation is not once per
    # epoch, which comes before `on_train_epoch_end`: the epoch's evaluation runs in its closing
    # validation then, so no checkpoint is named after, and no check sees, an older evaluation.
    checkpoint = lightning.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor=ENTROPY, mode="max", save_top_k=-1,
        filename="{step}-{" + ENTROPY + ":.6f}", auto_insert_metric_name=False,
    )  # fmt: skip
    stop = RecordingEarlyStopping.of(lightning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(
            [stop, entropy_monitor(), checkpoint], tmp_path, lightning,
            enable_checkpointing=True, max_epochs=4, **validation,
        )  # fmt: skip
    history = {e.step: e.scalars[ENTROPY] for e in read_history(tmp_path / "cam_monitor")}
    assert sorted(history) == [0, 3, 6, 9, 12]  # the baseline, then each epoch's end
    saved = {}
    for path in (tmp_path / "ckpt").iterdir():
        step, value = path.stem.split("-")
        saved[int(step)] = float(value)
    epoch_ends = [step for step in history if step and step in saved]
    every = validation.get("check_val_every_n_epoch", 1)
    assert epoch_ends == [3 * e for e in range(1, 5) if e % every == 0]
    for step in epoch_ends:
        assert saved[step] == pytest.approx(history[step], abs=1e-6)
    checked = [(step, value) for step, value in stop.seen if step in history]
    assert [step for step, _ in checked] == epoch_ends
    assert all(value == pytest.approx(history[step], rel=1e-6) for step, value in checked)
    stale = [str(w.message) for w in caught if "has not evaluated" in str(w.message)]
    if "val_check_interval" in validation:  # the checks inside an epoch: said before training
        assert len(stale) == 2 and all("val_check_interval=0.5" in m for m in stale)
        assert sorted(set(saved) - set(history)) == [1, 2, 4, 5, 7, 8, 10, 11]
    else:
        assert not stale and set(saved) == set(epoch_ends)


def test_a_resume_from_a_checkpoint_saved_in_validation_evaluates_that_step_once(
    lightning: Lightning, tmp_path: Path
) -> None:
    # Saved at the end of epoch 1's validation, after the evaluation of step 6; Lightning runs
    # that epoch's `on_train_epoch_end` again on resume, which must not evaluate step 6 again.
    checkpoint = lightning.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor=ENTROPY, mode="max", filename="last"
    )
    options = {"enable_checkpointing": True, "check_val_every_n_epoch": 2}
    monitor = entropy_monitor()
    fit([monitor, checkpoint], tmp_path, lightning, max_epochs=2, **options)
    again = CamMonitor("net.features.5", probe=monitor.probe_options.probe, faithfulness=None)
    trainer = lightning.trainer(
        default_root_dir=tmp_path, logger=False, callbacks=[again], max_epochs=4, **options
    )
    val = loader(shapes_dataset(16, seed=1))
    trainer.fit(lightning.module()(), loader(shapes_dataset(), shuffle=True), val,
                ckpt_path=tmp_path / "ckpt" / "last.ckpt")  # fmt: skip
    steps = [e.step for e in read_history(tmp_path / "cam_monitor")]
    assert steps == [0, 3, 6, 9, 12]


def test_checks_where_the_monitor_does_not_evaluate_warn_before_training(
    lightning: Lightning, tmp_path: Path
) -> None:
    checkpoint = lightning.callbacks.ModelCheckpoint(monitor=ENTROPY, every_n_train_steps=2)
    stop = lightning.callbacks.EarlyStopping(monitor=ENTROPY, mode="max")
    monitor = CamMonitor(
        "net.features.5", probe=shapes_dataset(4, seed=3).tensors, every_n_epochs=2,
        faithfulness=None,
    )  # fmt: skip
    with pytest.warns(UserWarning) as caught:
        fit([monitor, checkpoint, stop], tmp_path, lightning, enable_checkpointing=True,
            max_steps=1)  # fmt: skip
    said = sorted(str(w.message) for w in caught if "has not evaluated" in str(w.message))
    assert len(said) == 2 and said[0].startswith("CamMonitor: EarlyStopping")
    assert "every 1st epoch" in said[0] and "every 2nd only" in said[0]
    assert said[0].endswith("Fix: CamMonitor(every_n_epochs=1).")
    assert "saves every 2 training steps" in said[1] and "every_n_steps=2" in said[1]
    # aligned: the checkpoint every 2nd epoch with a monitor every 2nd epoch says nothing
    aligned = lightning.callbacks.ModelCheckpoint(monitor=ENTROPY, every_n_epochs=2)
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        fit([monitor, aligned], tmp_path / "b", lightning, enable_checkpointing=True, max_steps=1)
    assert not [w for w in quiet if "has not evaluated" in str(w.message)]


class Watcher(lightning_classes("callbacks", "Callback")[0]):  # type: ignore[misc]
    """A callback of its own that reads `monitor` in its own hooks."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor


def test_a_consumer_listed_first_warns_and_ddp_is_refused(lightning: Lightning) -> None:
    monitor = localization_monitor()
    watcher = Watcher(ENERGY)
    trainer = lightning.trainer(logger=False, callbacks=[watcher, monitor])
    with pytest.warns(UserWarning, match="comes before the monitor in `callbacks`.*CamMonitor fi"):
        check_metric_consumers(trainer, monitor)
    # Lightning runs EarlyStopping and ModelCheckpoint after the others at an epoch's end
    stop = lightning.callbacks.EarlyStopping(monitor=ENERGY, mode="max")
    trainer = lightning.trainer(logger=False, callbacks=[stop, monitor])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_metric_consumers(trainer, monitor)
    ddp = lightning.trainer(
        logger=False, callbacks=[monitor, stop], strategy="ddp", devices=2
    )  # built, never launched
    with pytest.raises(ValueError, match=r"EarlyStopping\(monitor='cam_loc/.*2 processes"):
        check_metric_consumers(ddp, monitor)


def test_a_consumer_of_a_tag_no_monitor_logs_fails_before_training_naming_the_tag(
    lightning: Lightning, tmp_path: Path
) -> None:
    # `CamMonitor("features.5")` finds `net.features.5`, and its tags name that full path: a
    # ModelCheckpoint or EarlyStopping written with the short name would only fail after the
    # first epoch (Lightning's "metric not available"), so it fails at setup with the right tag.
    data = shapes_dataset(8, seed=3)
    monitor = CamMonitor(
        "features.5", probe={"target": data.tensors}, masks={"target": data.tensors[0][:, 0] > 0}
    )
    short = "cam_loc/target/features.5/gradcam/energy"
    stop = lightning.callbacks.EarlyStopping(monitor=short, mode="max")
    module = lightning.module(ShapesSteps)()
    trainer = lightning.trainer(default_root_dir=tmp_path, logger=False, callbacks=[monitor, stop])
    with pytest.raises(ValueError, match=re.escape(f"monitor {ENERGY!r}")) as err:
        trainer.fit(module)
    assert "'features.5'" in str(err.value) and "EarlyStopping" in str(err.value)
    assert module.steps_run == 0
    # the full name, or a pixel method's `input`, passes the check
    for tag in (ENERGY, "cam_drift/target/input/saliency/spearman_ref"):
        check = lightning.callbacks.EarlyStopping(monitor=tag, mode="max")
        trainer = lightning.trainer(logger=False, callbacks=[monitor, check])
        check_consumer_layers(trainer, module)


# -- training setups: several optimizers, several fits, a forward that is not the classifier -----


class TwoOptimizerSteps(ClassifierSteps):
    """Manual optimization with two optimizers (GAN-style): each `step()` is a global step."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        for optimizer in self.optimizers():
            optimizer.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(x), y))
            optimizer.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.net.features.parameters(), lr=0.05),
            torch.optim.SGD(self.net.fc.parameters(), lr=0.05),
        ]


def test_every_n_steps_counts_optimizer_steps_even_when_they_jump(
    lightning: Lightning, tmp_path: Path
) -> None:
    # Two optimizers: global_step goes 2, 4, 6...; an evaluation at the first step at or past each
    # multiple of 3, not only at the multiples of 6 that the global step happens to hit.
    monitor = CamMonitor("net.features.5", every_n_steps=3, num_probe=4, save_dir=tmp_path / "a")
    trainer = lightning.trainer(
        default_root_dir=tmp_path, logger=False, max_epochs=1, callbacks=[monitor]
    )
    trainer.fit(lightning.module(TwoOptimizerSteps)(), loader(shapes_dataset(), batch_size=8))
    assert trainer.global_step == 12
    assert [e.step for e in read_history(tmp_path / "a")] == [0, 4, 6, 10, 12]
    # Accumulated batches: one optimizer step per 4 batches, evaluations every 2 of those.
    monitor = CamMonitor("net.features.5", every_n_steps=2, num_probe=4, save_dir=tmp_path / "b")
    trainer = lightning.trainer(
        default_root_dir=tmp_path,
        logger=False,
        max_epochs=1,
        accumulate_grad_batches=4,
        callbacks=[monitor],
    )
    trainer.fit(lightning.module()(), loader(shapes_dataset(64), batch_size=4))
    assert trainer.global_step == 4
    assert [e.step for e in read_history(tmp_path / "b")] == [0, 2, 4]


def test_a_second_trainer_starts_a_new_run_and_the_same_trainer_continues(
    lightning: Lightning, tmp_path: Path
) -> None:
    def tensorboard(version: int) -> Any:
        return lightning.loggers.TensorBoardLogger(tmp_path, name="tb", version=version)

    def grid_steps(logger: Any) -> list[int]:
        acc = read_events(logger.log_dir)
        return [s.step for s in acc.Images("cam/train/net.features.5/gradcam")]

    data = loader(shapes_dataset())
    monitor = CamMonitor("net.features.5", num_probe=4)
    first = lightning.trainer(logger=tensorboard(0), max_epochs=1, callbacks=[monitor])
    lightning.pl.seed_everything(0, verbose=False)
    first.fit(lightning.module()(), data)
    first.fit_loop.max_epochs = 2  # the same Trainer, fit again: the run goes on
    first.fit(first.lightning_module, data)
    history = read_history(tmp_path / "tb" / "version_0" / "cam_monitor")
    assert [(e.index, e.step) for e in history] == [(0, 0), (1, 3), (2, 6)]
    assert len({e.run for e in history}) == 1

    # A new Trainer from step 0 without a checkpoint is a new run: a baseline of its own model,
    # drift against it, a new run id; as a fresh monitor would log it.
    lightning.pl.seed_everything(1, verbose=False)
    second = lightning.trainer(logger=tensorboard(1), max_epochs=1, callbacks=[monitor])
    second.fit(lightning.module()(), data)
    fresh = CamMonitor("net.features.5", num_probe=4)
    lightning.pl.seed_everything(1, verbose=False)
    lightning.trainer(logger=tensorboard(2), max_epochs=1, callbacks=[fresh]).fit(
        lightning.module()(), data
    )
    reused, expected = (
        read_history(tmp_path / "tb" / v / "cam_monitor") for v in ("version_1", "version_2")
    )
    assert [(e.index, e.step) for e in reused] == [(0, 0), (1, 3)]
    assert reused[0].run not in (history[0].run, expected[0].run)
    scores = [
        [{k: v for k, v in e.scalars.items() if k != SECONDS_TAG} for e in h]
        for h in (reused, expected)
    ]
    assert scores[0] == scores[1] and "cam_drift" in str(scores[0])
    assert grid_steps(second.logger) == [0, 3]

    # The same monitor with one save_dir for two runs: refused before training, as documented.
    kept = CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "kept")
    lightning.trainer(logger=False, max_epochs=1, callbacks=[kept]).fit(lightning.module()(), data)
    again = lightning.trainer(logger=False, max_epochs=1, callbacks=[kept])
    with pytest.raises(ValueError, match="already holds the cam-monitor history of another run"):
        again.fit(lightning.module()(), data)


class EmbeddingSteps(ClassifierSteps):
    """A common pattern: `forward` returns embeddings, `training_step` calls the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.net.fc = nn.Identity()
        self.head = nn.Linear(8, 5)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self(x)), y)


def classify(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A `forward=` that calls the classifier on the embeddings."""
    return module.head(module(inputs))


def test_a_forward_returning_embeddings_is_refused_before_training(
    lightning: Lightning, tmp_path: Path
) -> None:
    model = lightning.module(EmbeddingSteps)()
    monitor = CamMonitor("net.features.5", num_probe=4, target="label")
    trainer = lightning.trainer(default_root_dir=tmp_path, logger=False, callbacks=[monitor])
    with pytest.raises(ValueError, match=r"\[4, 8\].*'head' \(Linear 8 -> 5\).*forward="):
        trainer.fit(model, loader(shapes_dataset()))
    assert model.steps_run == 0
    # The way out the message names: forward= calls the classifier, and the maps explain classes.
    monitor = CamMonitor("net.features.5", num_probe=4, forward=classify, save_dir=tmp_path / "h")
    trainer = lightning.trainer(default_root_dir=tmp_path, logger=False, callbacks=[monitor])
    trainer.fit(model, loader(shapes_dataset()))
    assert {e.logits["train"].shape for e in read_history(tmp_path / "h")} == {(4, 5)}


class DiscriminatorSteps(ClassifierSteps):
    """GAN-like: `forward` returns the 5 class logits, and a discriminator `disc` (Linear 5 -> 1,
    which takes inputs of the logits' width) scores them, detached, in `training_step`."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.disc = nn.Linear(5, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.steps_run += 1
        x, y = batch
        classifier, discriminator = self.optimizers()
        classifier.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        classifier.step()
        discriminator.zero_grad()
        self.manual_backward(self.disc(self(x).detach()).mean())
        discriminator.step()

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.SGD(self.net.parameters(), lr=self.lr),
            torch.optim.SGD(self.disc.parameters(), lr=self.lr),
        )


def test_a_head_on_the_logits_is_no_embeddings_when_labels_or_class_names_say_so(
    lightning: Lightning, tmp_path: Path
) -> None:
    data = loader(shapes_dataset(16))
    # The probe's labels (0..4, from the val set) fit the output but not the discriminator's two
    # classes: the output is the class scores, and the maps explain them.
    model = lightning.module(DiscriminatorSteps)()
    monitor = CamMonitor("net.features.5", num_probe=5, save_dir=tmp_path / "labels")
    trainer = lightning.trainer(
        default_root_dir=tmp_path, logger=False, max_epochs=1, callbacks=[monitor]
    )
    trainer.fit(model, data, data)
    assert model.steps_run == 1 and monitor.evaluations == 2
    assert {e.logits["val"].shape for e in read_history(tmp_path / "labels")} == {(5, 5)}
    # Without labels the two readings are said side by side, each with its forward=.
    images = shapes_dataset(5).tensors[0]
    model = lightning.module(DiscriminatorSteps)()
    monitor = CamMonitor("net.features.5", probe=images)
    trainer = lightning.trainer(
        default_root_dir=tmp_path, logger=False, max_epochs=1, callbacks=[monitor]
    )
    message = (
        r"\[5, 5\], and 'disc' \(Linear 5 -> 1\).*Either the output is embeddings.*"
        r"module\.disc\(module\(x\)\).*Or the output already is the class scores and 'disc' "
        r"is another head.*forward=lambda module, x: module\(x\).*class_names="
    )
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, data)
    assert model.steps_run == 0
    # One class name per output column says the same.
    names = ["tl", "tr", "bl", "br", "centre"]
    monitor = CamMonitor("net.features.5", probe=images, class_names=names)
    trainer = lightning.trainer(
        default_root_dir=tmp_path, logger=False, max_epochs=1, callbacks=[monitor]
    )
    trainer.fit(model, data)
    assert model.steps_run == 1 and monitor.evaluations == 2


def test_evaluate_in_the_sanity_check_of_a_later_fit_touches_no_earlier_run(
    lightning: Lightning, tmp_path: Path
) -> None:
    class EvaluateAtValidationEnd(lightning.pl.Callback):  # type: ignore[name-defined,misc]
        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            monitor.evaluate(trainer, pl_module)  # the sanity check included, as users write it

    monitor = CamMonitor("net.features.5", num_probe=4, every_n_epochs=100)
    for version in (0, 1):
        lightning.pl.seed_everything(version, verbose=False)
        logger = lightning.loggers.TensorBoardLogger(tmp_path, name="tb", version=version)
        trainer = lightning.trainer(
            logger=logger, max_epochs=1, num_sanity_val_steps=1,
            callbacks=[monitor, EvaluateAtValidationEnd()],
        )  # fmt: skip
        trainer.fit(lightning.module()(), loader(shapes_dataset()), loader(shapes_dataset(8)))
    runs = [read_history(tmp_path / "tb" / f"version_{v}" / "cam_monitor") for v in (0, 1)]
    for history in runs:  # the baseline, the validation at the end of epoch 0, no more
        assert [(e.index, e.step) for e in history] == [(0, 0), (1, 3)]
        assert len({e.run for e in history}) == 1


def test_the_probe_comes_from_the_val_set_even_when_epoch_0_does_not_validate(
    lightning: Lightning, tmp_path: Path
) -> None:
    # Lightning loads the val loaders at the start of training only when epoch 0 validates (or
    # for the sanity check): the probe must not fall back to the train set otherwise.
    class Shapes(lightning.pl.LightningDataModule):  # type: ignore[name-defined,misc]
        def train_dataloader(self) -> DataLoader:
            return loader(shapes_dataset())

        def val_dataloader(self) -> DataLoader:
            return loader(shapes_dataset(16, seed=1))

    val_images = shapes_dataset(16, seed=1).tensors[0]
    for name, data in (("datamodule", {"datamodule": Shapes()}), ("loaders", {
        "train_dataloaders": loader(shapes_dataset()),
        "val_dataloaders": loader(shapes_dataset(16, seed=1)),
    })):  # fmt: skip
        monitor = CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / name)
        trainer = lightning.trainer(
            logger=False, max_epochs=2, num_sanity_val_steps=0, check_val_every_n_epoch=2,
            callbacks=[monitor],
        )  # fmt: skip
        trainer.fit(lightning.module()(), **data)
        probe = read_probe(tmp_path / name)
        assert probe is not None and probe.probes == ("val",)
        assert torch.equal(torch.from_numpy(probe.inputs["val"]), val_images[[0, 5, 10, 15]])


IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def test_mean_and_std_that_do_not_fit_the_probe_warn_before_the_overlays_wash_out(
    lightning: Lightning, tmp_path: Path
) -> None:
    pictures = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # ToTensor
    mean, std = (torch.tensor(IMAGENET[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    cases = {
        "unnormalised": (pictures, "no negative value"),
        "bytes": (pictures * 255, "outside \\[0, 1\\]"),
        "normalised": ((pictures - mean) / std, None),
    }
    for name, (images, message) in cases.items():
        monitor = CamMonitor("net.features.5", probe=images, save_dir=tmp_path / name, **IMAGENET)
        trainer = lightning.trainer(logger=False, max_epochs=1, callbacks=[monitor])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(lightning.module()(), loader(shapes_dataset(16)))
        said = [str(w.message) for w in caught if "`mean`/`std`" in str(w.message)]
        if message is None:
            assert said == []
        else:
            assert len(said) == 1 and re.search(message, said[0]), said


def test_a_resume_into_a_new_logger_version_says_where_the_earlier_history_is(
    lightning: Lightning, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(epochs: int, ckpt: str | None = None) -> Any:
        lightning.pl.seed_everything(0, verbose=False)
        monitor = CamMonitor("net.features.5", num_probe=4)
        trainer = lightning.trainer(
            default_root_dir=tmp_path, logger=True, enable_checkpointing=True, max_epochs=epochs,
            callbacks=[monitor],
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(lightning.module()(), loader(shapes_dataset()), ckpt_path=ckpt)
        return trainer, [str(w.message) for w in caught if "earlier evaluations" in str(w.message)]

    first, said = run(1)
    assert said == []
    _, said = run(2, first.checkpoint_callback.best_model_path)  # Lightning's next version
    old, new = (tmp_path / "lightning_logs" / v / "cam_monitor" for v in ("version_0", "version_1"))
    assert [e.index for e in read_history(old)] == [0, 1]
    assert [e.index for e in read_history(new)] == [2]
    assert len(said) == 1 and str(old) in said[0] and str(new) in said[0] and "save_dir=" in said[0]
    # Both folders read as one history: given their parent, or given each.
    logs = tmp_path / "lightning_logs"
    assert f"given their parent ({logs})" in said[0]
    for given in (logs, [old, new]):
        run = load_run(given)
        assert [e.index for e in run.evaluations] == [0, 1, 2] and run.folders == (old, new)
    for args in ([str(old), str(new)], [str(logs)]):
        capsys.readouterr()
        assert cli_main(["show", *args]) == 0
        assert f"history: {old} + {new}\n3 evaluations" in capsys.readouterr().out


def test_an_undefined_score_does_not_stop_early_stopping_on_a_monitor_tag(
    lightning: Lightning, tmp_path: Path
) -> None:
    calls = {"n": 0}

    def flat_at_epoch_1(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1  # baseline, epoch 0, epoch 1 (all maps zero: energy undefined), ...
        return module(x) * (0.0 if calls["n"] == 3 else 1.0)

    images, labels = shapes_dataset(8, seed=3).tensors
    monitor = CamMonitor(
        "net.features.5", probe={"target": (images, labels)},
        masks={"target": images.mean(1) > 0.75}, forward=flat_at_epoch_1,
    )  # fmt: skip
    stop = lightning.callbacks.EarlyStopping(monitor=ENERGY, mode="max", patience=10)
    trainer = fit([monitor, stop], tmp_path, lightning, max_epochs=3).trainer
    history = [e.scalars.get(ENERGY) for e in read_history(tmp_path / "cam_monitor")]
    assert len(history) == 4 and math.isnan(history[2])  # the undefined score is on record
    assert trainer.current_epoch == 3 and stop.stopped_epoch == 0  # but stopped nothing
    assert float(trainer.callback_metrics[ENERGY]) == pytest.approx(history[3], rel=1e-6)
