"""CamMonitor against a real Trainer, real TensorBoard event files, W&B offline and CSVLogger."""

from __future__ import annotations

import csv
import inspect
import json
import re
import time
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cam_monitor.callback import CamMonitor
from cam_monitor.history import read_history, read_probe
from tests.conftest import LitClassifier, loader, quiet_trainer, shapes_dataset

LAYERS = ["net.features.3", "net.features.5"]


def events(log_dir: str | Path) -> EventAccumulator:
    files = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    assert files, f"no event file in {log_dir}"
    acc = EventAccumulator(str(files[-1]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def wandb_history(path: Path) -> tuple[list[dict[str, object]], bool]:
    """The `history` rows of an offline `.wandb` file (a LevelDB-style log of protobuf records),
    and whether the writer's final `exit` record is there yet."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, offset, pending, rows, finished = 32768, 7, b"", [], False
    while offset + 7 <= len(data):
        room = block - offset % block
        if room < 7:  # the tail of a block too small for a header is padding
            offset += room
            continue
        length = int.from_bytes(data[offset + 4 : offset + 6], "little")
        kind = data[offset + 6]
        if offset + 7 + length > len(data):  # a record still being written
            break
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            finished = finished or record.WhichOneof("record_type") == "exit"
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
                )  # fmt: skip
    return rows, finished


def fit(monitor: CamMonitor | None, tmp_path: Path, **trainer_kwargs: object) -> LitClassifier:
    pl.seed_everything(0, verbose=False)
    model = LitClassifier()
    options: dict[str, object] = {
        "default_root_dir": tmp_path,
        "logger": False,
        "callbacks": [monitor] if monitor else [],
    }
    options.update(trainer_kwargs)
    trainer = quiet_trainer(**options)
    trainer.fit(model, loader(shapes_dataset(), shuffle=True), loader(shapes_dataset(16, seed=1)))
    return model


def test_tensorboard_gets_grids_for_baseline_and_each_epoch(tmp_path: Path) -> None:
    monitor = CamMonitor(LAYERS, methods=["gradcam", "layercam"], num_probe=6, nrow=3)
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(monitor, tmp_path, logger=logger, max_epochs=2)
    acc = events(logger.log_dir)
    image_tags = sorted(acc.Tags()["images"])
    expected = sorted(f"cam/val/{layer}/{m}" for layer in LAYERS for m in ["gradcam", "layercam"])
    assert image_tags == expected
    for tag in image_tags:
        shots = acc.Images(tag)
        assert [s.step for s in shots] == [0, 3, 6]  # baseline, then 3 steps per epoch
        # 32 px tiles are drawn at 96 px; 3 per row with 2 px padding; 2 rows plus captions
        assert all(s.width == 3 * (96 + 2) + 2 for s in shots)
        assert all(s.height > 2 * (96 + 2) for s in shots)
    scalars = acc.Tags()["scalars"]
    assert [s.step for s in acc.Scalars("cam_monitor/seconds")] == [0, 3, 6]
    drift_tag = "cam_drift/val/net.features.5/gradcam/spearman_ref"
    assert [s.step for s in acc.Scalars(drift_tag)] == [3, 6]
    assert "cam_stats/val/net.features.3/layercam/entropy" in scalars
    assert any("probe_hash/val" in tag for tag in acc.Tags()["tensors"])


@pytest.mark.slow
def test_wandb_offline_run_holds_the_grids_and_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monitor = CamMonitor("net.features.5", num_probe=4)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="cam-monitor-test")
    fit(monitor, tmp_path, logger=logger, max_epochs=2)
    run_dir = Path(logger.experiment.dir)
    import wandb

    wandb.finish()
    pngs = sorted(run_dir.glob("media/images/cam/val/net.features.5/gradcam*.png"))
    assert len(pngs) == 3  # baseline and two epochs
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    record_log = next(run_dir.parent.glob("run-*.wandb"))
    deadline = time.monotonic() + 60  # wandb's writer may still be flushing after finish()
    rows, finished = wandb_history(record_log)
    while not finished and time.monotonic() < deadline:
        time.sleep(0.5)
        rows, finished = wandb_history(record_log)
    logged = [row for row in rows if "cam_monitor/seconds" in row]
    assert [row["trainer/global_step"] for row in logged] == [0, 3, 6]
    assert all(row["cam_monitor/seconds"] > 0 for row in logged)
    assert all(
        0 <= row["cam_drift/val/net.features.5/gradcam/topk_iou_ref"] <= 1 for row in logged[1:]
    )
    image = "cam/val/net.features.5/gradcam"
    assert logged[0][f"{image}/_type"] == "image-file"
    assert (run_dir / str(logged[0][f"{image}/path"])).is_file()
    history = read_history(run_dir.parent / "cam_monitor")
    assert [e.epoch for e in history] == [0, 1, 2]


def test_csv_logger_gets_scalars_and_png_files(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    fit(CamMonitor("net.features.5", num_probe=4), tmp_path, logger=logger, max_epochs=2)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    seconds = [r for r in rows if r.get("cam_monitor/seconds")]
    assert [int(r["step"]) for r in seconds] == [0, 3, 6]
    folder = Path(logger.log_dir) / "cam_monitor" / "images" / "val" / "net.features.5" / "gradcam"
    assert sorted(p.name for p in folder.glob("*.png")) == [
        "step-00000000.png",
        "step-00000003.png",
        "step-00000006.png",
    ]


def test_without_a_logger_pngs_and_scalars_go_to_the_root_dir(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"no logger; PNG grids and scalars go to .*cam_monitor"):
        fit(CamMonitor("net.features.5", num_probe=4), tmp_path, logger=False, max_epochs=1)
    folder = tmp_path / "cam_monitor"
    assert len(list((folder / "images").rglob("*.png"))) == 2
    rows = list(csv.DictReader(open(folder / "scalars.csv")))
    assert {r["tag"] for r in rows} >= {
        "cam_monitor/seconds",
        "cam_stats/val/net.features.5/gradcam/entropy",
    }
    assert [e.index for e in read_history(folder)] == [0, 1]


def test_probe_selection_leaves_the_training_trajectory_unchanged(tmp_path: Path) -> None:
    plain = fit(None, tmp_path / "a", max_epochs=2)
    monitored = fit(
        CamMonitor(LAYERS, methods=["gradcam", "gradcam++"], num_probe=8), tmp_path / "b"
    )
    for (name, a), b in zip(
        plain.state_dict().items(), monitored.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_named_probe_sets_with_masks_log_localization(tmp_path: Path) -> None:
    data = shapes_dataset(8, seed=3)
    images, labels = data.tensors
    masks = images.mean(1) > 0.75  # the bright square
    monitor = CamMonitor(
        "net.features.5",
        probe={"source": (images, labels), "target": images + 0.5},
        masks={"source": masks},
        target="predicted",
    )
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(monitor, tmp_path, logger=logger, max_epochs=1)
    acc = events(logger.log_dir)
    assert set(acc.Tags()["images"]) == {
        "cam/source/net.features.5/gradcam",
        "cam/target/net.features.5/gradcam",
    }
    scalars = set(acc.Tags()["scalars"])
    for score in ("energy", "pointing", "mask_iou"):
        assert f"cam_loc/source/net.features.5/gradcam/{score}" in scalars
        assert f"cam_loc/target/net.features.5/gradcam/{score}" not in scalars
    energy = acc.Scalars("cam_loc/source/net.features.5/gradcam/energy")
    assert all(0 <= e.value <= 1 for e in energy)


def test_every_n_steps_and_two_monitors_in_one_trainer(tmp_path: Path) -> None:
    by_steps = CamMonitor("net.features.5", every_n_steps=2, num_probe=4)
    by_epochs = CamMonitor("net.features.3", every_n_epochs=2, num_probe=4)
    assert by_steps.state_key != by_epochs.state_key
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(None, tmp_path, logger=logger, max_epochs=2, callbacks=[by_steps, by_epochs])
    acc = events(logger.log_dir)
    assert [s.step for s in acc.Images("cam/val/net.features.5/gradcam")] == [0, 2, 4, 6]
    assert [s.step for s in acc.Images("cam/val/net.features.3/gradcam")] == [0, 6]


def test_target_label_uses_the_probe_labels(tmp_path: Path) -> None:
    monitor = CamMonitor("net.features.5", target="label", num_probe=5, save_dir=tmp_path / "h")
    fit(monitor, tmp_path, max_epochs=1)
    first = read_history(tmp_path / "h")[0]
    assert (first.targets["val"] == first.labels["val"]).all()


def test_runtime_failure_warns_and_skips_unless_strict(tmp_path: Path) -> None:
    calls = {"n": 0}

    def flaky(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:  # the first scheduled evaluation after the baseline
            raise RuntimeError("probe forward exploded")
        return module(x)

    monitor = CamMonitor("net.features.5", forward=flaky, num_probe=4, save_dir=tmp_path / "h")
    with pytest.warns(
        UserWarning, match="skipped its evaluation at epoch 0.*probe forward exploded"
    ):
        model = fit(monitor, tmp_path, max_epochs=2)
    assert model.steps_run == 6
    assert [e.epoch for e in read_history(tmp_path / "h")] == [0, 2]
    calls["n"] = 0
    strict = CamMonitor("net.features.5", forward=flaky, num_probe=4, strict=True)
    with pytest.raises(RuntimeError, match="probe forward exploded"):
        fit(strict, tmp_path / "strict", max_epochs=2)


def test_resume_continues_schedule_history_and_drift(tmp_path: Path) -> None:
    def run(root: Path, epochs: int, ckpt: str | None = None) -> pl.Trainer:
        pl.seed_everything(0, verbose=False)
        monitor = CamMonitor("net.features.5", num_probe=6, save_dir=root / "hist")
        trainer = quiet_trainer(
            default_root_dir=root, logger=False, max_epochs=epochs, callbacks=[monitor],
            enable_checkpointing=True,
        )  # fmt: skip
        model = LitClassifier()
        model.net.dropout.p = 0.0  # Lightning does not restore the RNG: keep training RNG-free
        trainer.fit(model, loader(shapes_dataset()), ckpt_path=ckpt)
        return trainer

    run(tmp_path / "straight", 4)
    first = run(tmp_path / "resumed", 2)
    ckpt = first.checkpoint_callback.best_model_path
    assert ckpt
    run(tmp_path / "resumed", 4, ckpt=ckpt)
    straight = read_history(tmp_path / "straight" / "hist")
    resumed = read_history(tmp_path / "resumed" / "hist")
    assert [e.index for e in resumed] == [0, 1, 2, 3, 4]
    assert [e.epoch for e in resumed] == [e.epoch for e in straight] == [0, 1, 2, 3, 4]
    for a, b in zip(straight[3:], resumed[3:], strict=True):
        drift = {k: v for k, v in a.scalars.items() if k.startswith("cam_drift/")}
        assert drift and drift == {k: b.scalars[k] for k in drift}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"every_n_epochs": 0}, ValueError, r"`every_n_epochs` must be an int >= 1, got 0"),
        ({"every_n_epochs": 1.0}, TypeError, r"`every_n_epochs` must be an int >= 1, got float"),
        ({"methods": "gradcamm"}, ValueError, r"`methods` got unknown name\(s\) 'gradcamm'"),
        ({"alpha": 1.5}, ValueError, r"`alpha` must be a finite number in \[0, 1\], got 1.5"),
        ({"alpha": float("inf")}, ValueError, r"`alpha` must be a finite number .*, got inf"),
        ({"noise": float("nan")}, ValueError, r"`noise` must be a finite number >= 0 .*got nan"),
        ({"topk": "0.2"}, TypeError, r"`topk` must be a finite number in \(0, 1\] .*got str"),
        ({"colormap": "rainbowz"}, ValueError, r"`colormap` got unknown name 'rainbowz'"),
        ({"target": "biggest"}, ValueError, r"`target` can be 'predicted', 'label'"),
        ({"num_probe": 0}, ValueError, r"`num_probe` must be an int >= 1, got 0"),
        ({"every_n_steps": -3}, ValueError, r"`every_n_steps` must be an int >= 1 or None, got -3"),
        ({"mean": [0.5, 0.5, 0.5]}, ValueError, r"`mean` and `std` go together"),
        ({"drift_measures": ["kendall"]}, ValueError, r"`drift_measures` got unknown name\(s\)"),
        ({"layer": 3}, TypeError, r"`layer` must be a name like 'features.29'.*got int 3"),
        ({"probe": 3.5}, TypeError, r"`probe` must be None, a Tensor.*got float"),
        ({"probe": {"a/b": torch.zeros(2, 3, 8, 8)}}, ValueError, r"probe set name 'a/b' cannot"),
        ({"masks": [1, 2]}, TypeError, r"`masks` must be a Tensor.*got list"),
        ({"filters": {"net.features.2": []}}, ValueError, r"`filters` maps layer names"),
        ({"history": "yes"}, TypeError, r"`history` must be True or False, got 'yes'"),
    ],
)
def test_bad_arguments_fail_in_the_constructor(
    kwargs: dict, error: type[Exception], message: str
) -> None:
    args = {"layer": "net.features.5", **kwargs}
    with pytest.raises(error, match=message):
        CamMonitor(**args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer": "net.featurs.5"}, r"No layer named 'net\.featurs\.5'.*'net\.features\.5'"),
        ({"layer": "net.fc"}, r"'net\.fc' outputs shape \(\d+, 5\)"),
        ({"layer": "net.features.5", "target": 7}, r"Target index 7 is outside the logits' 5"),
        (
            {"layer": "net.features.5", "target": "label", "probe": torch.randn(4, 3, 32, 32)},
            r'target="label" needs labels',
        ),
    ],
)
def test_bad_configuration_fails_before_the_first_training_step(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    model = LitClassifier()
    trainer = quiet_trainer(
        default_root_dir=tmp_path, logger=False, callbacks=[CamMonitor(**kwargs)]
    )
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, loader(shapes_dataset(16)))
    assert model.steps_run == 0


def test_default_layer_is_chosen_with_a_warning(tmp_path: Path) -> None:
    monitor = CamMonitor(num_probe=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(monitor, tmp_path, max_epochs=1)
    assert monitor.layers == ["net.features.5"]
    assert any("no layer given, using 'net.features.5'" in str(w.message) for w in caught)


def test_pixel_methods_filters_and_boxes_reach_the_dashboard(tmp_path: Path) -> None:
    images, labels = shapes_dataset(6, seed=4).tensors
    boxes = torch.tensor([[0, 0, 16, 16]] * 6)
    monitor = CamMonitor(
        "net.features.5",
        methods=["gradcam++", "saliency", "integrated_gradients", "guided_gradcam"],
        probe=(images, labels), masks=boxes, smooth=3, ig_steps=8,
        filters={"net.features.2": [0, 3]},
    )  # fmt: skip
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(monitor, tmp_path, logger=logger, max_epochs=1)
    acc = events(logger.log_dir)
    assert set(acc.Tags()["images"]) == {
        "cam/probe/net.features.5/gradcam++",
        "cam/probe/input/saliency",
        "cam/probe/input/integrated_gradients",
        "cam/probe/net.features.5/guided_gradcam",
        "filters/probe/net.features.2/channel_0",
        "filters/probe/net.features.2/channel_3",
        "filters/net.features.2/maximised",
    }
    scalars = set(acc.Tags()["scalars"])
    assert "cam_loc/probe/input/integrated_gradients/energy" in scalars
    assert "cam_loc/probe/net.features.5/gradcam++/pointing" in scalars
    stored = read_probe(Path(logger.log_dir) / "cam_monitor")
    assert stored is not None and stored.hashes["probe"] == monitor._probes["probe"].digest
    assert stored.masks["probe"][:, :16, :16].all() and not stored.masks["probe"][:, 16:].any()


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        ({"sauce": torch.zeros(4, 32, 32)}, r"names probe set\(s\) \['sauce'\].*\['probe'\]"),
        (torch.zeros(4, 16, 16), r"masks for probe 'probe' have shape \(4, 16, 16\); expected"),
    ],
)
def test_masks_that_do_not_fit_fail_before_training(
    tmp_path: Path, masks: object, message: str
) -> None:
    model = LitClassifier()
    monitor = CamMonitor("net.features.5", probe=torch.randn(4, 3, 32, 32), masks=masks)
    trainer = quiet_trainer(default_root_dir=tmp_path, logger=False, callbacks=[monitor])
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, loader(shapes_dataset(16)))
    assert model.steps_run == 0


def test_reference_run_sets_the_drift_reference_and_must_share_the_probe(tmp_path: Path) -> None:
    probe = shapes_dataset(6, seed=8).tensors
    fit(
        CamMonitor("net.features.5", probe=probe, save_dir=tmp_path / "a"),
        tmp_path / "ra",
        max_epochs=1,
    )
    first_of_a = read_history(tmp_path / "a")[0].maps["probe", "net.features.5", "gradcam"]
    with_ref = CamMonitor(
        "net.features.5", probe=probe, reference=tmp_path / "a", save_dir=tmp_path / "b"
    )
    fit(with_ref, tmp_path / "rb", max_epochs=1)
    assert torch.equal(
        with_ref.tracker.reference["probe", "net.features.5", "gradcam"].cpu(),
        torch.from_numpy(first_of_a),
    )
    baseline_b = read_history(tmp_path / "b")[0]
    assert "cam_drift/probe/net.features.5/gradcam/spearman_ref" in baseline_b.scalars
    other = CamMonitor("net.features.5", probe=probe[0] + 1, reference=tmp_path / "a")
    with pytest.raises(ValueError, match=r"used a different probe 'probe'"):
        fit(other, tmp_path / "rc", max_epochs=1)


def test_every_argument_is_documented_in_help_and_in_the_readme() -> None:
    params = set(inspect.signature(CamMonitor.__init__).parameters) - {"self"}
    doc = inspect.getdoc(CamMonitor) or ""
    assert "Raises:" in doc and "Example::" in doc
    args = doc.split("Args:", 1)[1].split("Raises:", 1)[0]
    documented = set(re.findall(r"^    (\w+): ", args, flags=re.MULTILINE))
    assert documented == params, (params - documented, documented - params)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Arguments", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    in_readme = {name for row in rows for name in re.findall(r"`(\w+)`", row)}
    assert in_readme == params, (params - in_readme, in_readme - params)
