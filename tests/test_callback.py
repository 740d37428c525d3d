"""CamMonitor against a real Trainer, real TensorBoard event files, W&B offline and CSVLogger."""

from __future__ import annotations

import copy
import csv
import logging
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from cam_monitor.callback import CamMonitor
from cam_monitor.cli import main as cli_main
from cam_monitor.history import history_runs, read_history, read_probe
from tests.helpers import (
    ClassifierSteps,
    Lightning,
    LitClassifier,
    fit,
    loader,
    quiet_trainer,
    read_events,
    shapes,
    shapes_dataset,
    wandb_items,
    wandb_run_records,
)

LAYERS = ["net.features.3", "net.features.5"]


def test_tensorboard_gets_grids_for_baseline_and_each_epoch(
    tmp_path: Path, lightning: Lightning
) -> None:
    monitor = CamMonitor(LAYERS, methods=["gradcam", "layercam"], num_probe=6, nrow=3)
    logger = lightning.loggers.TensorBoardLogger(tmp_path, name="tb")
    fit(monitor, tmp_path, lightning, logger=logger, max_epochs=2)
    acc = read_events(logger.log_dir, newest=True)
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
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lightning: Lightning
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monitor = CamMonitor("net.features.5", num_probe=4)
    logger = lightning.loggers.WandbLogger(
        save_dir=str(tmp_path), offline=True, project="cam-monitor-test"
    )
    table = lightning.loggers.CSVLogger(tmp_path, name="csv")  # image files beside W&B
    with pytest.warns(UserWarning, match="CSVLogger has no image API"):
        fit(monitor, tmp_path, lightning, logger=[logger, table], max_epochs=2)
    run_dir = Path(logger.experiment.dir)
    import wandb

    wandb.finish()
    jpegs = sorted(run_dir.glob("media/images/cam/val/net.features.5/gradcam*.jpg"))
    assert len(jpegs) == 3  # baseline and two epochs, as JPEG (image_format's default)
    assert all(p.read_bytes()[:3] == b"\xff\xd8\xff" for p in jpegs)
    files = sorted((run_dir / "cam_monitor" / "images").rglob("step-*.jpg"))
    assert len(files) == 3  # W&B copied the very bytes the file sink wrote: one encoding
    assert {p.read_bytes() for p in jpegs} == {p.read_bytes() for p in files}
    records, _ = wandb_run_records(run_dir)
    rows = [
        wandb_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"
    ]
    logged = [row for row in rows if "cam_monitor/seconds" in row]
    assert [row["trainer/global_step"] for row in logged] == [0, 3, 6]
    assert all(row["cam_monitor/seconds"] > 0 for row in logged)
    assert all(
        0 <= row["cam_drift/val/net.features.5/gradcam/topk_iou_ref"] <= 1 for row in logged[1:]
    )
    image = "cam/val/net.features.5/gradcam"
    assert logged[0][f"{image}/_type"] == "image-file"
    assert (run_dir / str(logged[0][f"{image}/path"])).is_file()
    history = read_history(run_dir / "cam_monitor")  # in files/, so `wandb sync` uploads it
    assert [e.epoch for e in history] == [0, 1, 2]


def test_csv_logger_gets_scalars_and_image_files(tmp_path: Path, lightning: Lightning) -> None:
    logger = lightning.loggers.CSVLogger(tmp_path, name="csv")
    folder = Path(logger.log_dir) / "cam_monitor"
    with pytest.warns(
        UserWarning, match=f"CSVLogger has no image API; .* under {re.escape(str(folder))}"
    ):
        fit(
            CamMonitor("net.features.5", num_probe=4),
            tmp_path,
            lightning,
            logger=logger,
            max_epochs=2,
        )
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    seconds = [r for r in rows if r.get("cam_monitor/seconds")]
    assert [int(r["step"]) for r in seconds] == [0, 3, 6]
    folder = Path(logger.log_dir) / "cam_monitor" / "images" / "val" / "net.features.5" / "gradcam"
    assert sorted(p.name for p in folder.glob("*")) == [
        "step-00000000.jpg",
        "step-00000003.jpg",
        "step-00000006.jpg",
    ]
    assert all(p.read_bytes()[:3] == b"\xff\xd8\xff" for p in folder.glob("*"))


def test_without_a_logger_pngs_and_scalars_go_to_the_root_dir(tmp_path: Path) -> None:
    monitor = CamMonitor("net.features.5", num_probe=4, image_format="png")
    with pytest.warns(UserWarning, match=r"no logger; grids and scalars go to .*cam_monitor"):
        fit(monitor, tmp_path, logger=False, max_epochs=1)
    folder = tmp_path / "cam_monitor"
    assert len(list((folder / "images").rglob("*.png"))) == 2
    rows = list(csv.DictReader(open(folder / "scalars.csv")))
    assert {r["tag"] for r in rows} >= {
        "cam_monitor/seconds",
        "cam_stats/val/net.features.5/gradcam/entropy",
    }
    assert [e.index for e in read_history(folder)] == [0, 1]


def test_probe_selection_leaves_the_training_trajectory_unchanged(tmp_path: Path) -> None:
    plain = fit(None, tmp_path / "a", max_epochs=2).model
    monitored = fit(
        CamMonitor(LAYERS, methods=["gradcam", "gradcam++"], num_probe=8), tmp_path / "b"
    ).model
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
    acc = read_events(logger.log_dir, newest=True)
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
    fit([by_steps, by_epochs], tmp_path, logger=logger, max_epochs=2)
    acc = read_events(logger.log_dir, newest=True)
    assert [s.step for s in acc.Images("cam/val/net.features.5/gradcam")] == [0, 2, 4, 6]
    assert [s.step for s in acc.Images("cam/val/net.features.3/gradcam")] == [0, 6]


def test_target_label_uses_the_probe_labels(tmp_path: Path) -> None:
    monitor = CamMonitor("net.features.5", target="label", num_probe=5, save_dir=tmp_path / "h")
    fit(monitor, tmp_path, max_epochs=1)
    first = read_history(tmp_path / "h")[0]
    assert (first.targets["val"] == first.labels["val"]).all()


def test_a_zero_dimensional_target_tensor_explains_that_class_for_every_image(
    tmp_path: Path,
) -> None:
    monitor = CamMonitor("net.features.5", target=torch.tensor(2), num_probe=5,
                         save_dir=tmp_path / "h")  # fmt: skip
    fit(monitor, tmp_path, max_epochs=1)
    assert all((e.targets["val"] == 2).all() for e in read_history(tmp_path / "h"))


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
        model = fit(monitor, tmp_path, max_epochs=2).model
    assert model.steps_run == 6
    assert [e.epoch for e in read_history(tmp_path / "h")] == [0, 2]
    calls["n"] = 0
    strict = CamMonitor("net.features.5", forward=flaky, num_probe=4, strict=True)
    with pytest.raises(RuntimeError, match="probe forward exploded"):
        fit(strict, tmp_path / "strict", max_epochs=2)


def test_resume_continues_schedule_history_and_drift(tmp_path: Path, lightning: Lightning) -> None:
    def run(root: Path, epochs: int, ckpt: str | None = None) -> pl.Trainer:
        lightning.pl.seed_everything(0, verbose=False)
        monitor = CamMonitor("net.features.5", num_probe=6, save_dir=root / "hist")
        trainer = lightning.trainer(
            default_root_dir=root, logger=False, max_epochs=epochs, callbacks=[monitor],
            enable_checkpointing=True,
        )  # fmt: skip
        model = lightning.module()()
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
    assert resumed[0].run and {e.run for e in resumed} == {resumed[0].run}  # one run, resumed
    for a, b in zip(straight[3:], resumed[3:], strict=True):
        drift = {k: v for k, v in a.scalars.items() if k.startswith("cam_drift/")}
        assert drift and drift == {k: b.scalars[k] for k in drift}


def checkpointing_trainer(lightning: Lightning, root: Path) -> Callable[[CamMonitor, int], Any]:
    """A factory of Trainers in `root` that save checkpoints: (monitor, epochs) -> Trainer."""

    def trainer(monitor: CamMonitor, epochs: int) -> Any:
        return lightning.trainer(
            default_root_dir=root, logger=False, max_epochs=epochs, callbacks=[monitor],
            enable_checkpointing=True,
        )  # fmt: skip

    return trainer


def test_resuming_with_other_layers_says_the_checkpointed_run_is_not_continued(
    tmp_path: Path, lightning: Lightning
) -> None:
    trainer = checkpointing_trainer(lightning, tmp_path)
    first = trainer(CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "a"), 1)
    first.fit(lightning.module()(), loader(shapes_dataset(16)))
    ckpt = first.checkpoint_callback.best_model_path
    changed = CamMonitor("net.features.2", num_probe=4, save_dir=tmp_path / "b")
    old_key = r"saved under CamMonitor\{'layers': \['net.features.5'\]"
    with pytest.warns(UserWarning, match=rf"(?s){old_key}.*starts a new run at step 1"):
        trainer(changed, 2).fit(lightning.module()(), loader(shapes_dataset(16)), ckpt_path=ckpt)
    assert [e.step for e in read_history(tmp_path / "b")] == [1, 2]  # its own baseline, at step 1
    other = CamMonitor("net.features.2", num_probe=4, target=1, save_dir=tmp_path / "c")
    with warnings.catch_warnings():  # validating a checkpoint continues no run: nothing to say
        warnings.filterwarnings("error", message="CamMonitor: (the checkpoint|resumed)")
        trainer(other, 1).validate(lightning.module()(), loader(shapes_dataset(16)), ckpt_path=ckpt)
    same_folder = CamMonitor("net.features.2", num_probe=4, save_dir=tmp_path / "a")
    with pytest.raises(ValueError, match=rf"(?s)another run.*CamMonitor state was {old_key}"):
        trainer(same_folder, 2).fit(
            lightning.module()(), loader(shapes_dataset(16)), ckpt_path=ckpt
        )


def test_resuming_with_another_layer_into_the_same_save_dir_says_one_thing(
    tmp_path: Path, lightning: Lightning
) -> None:
    """A resume whose monitor changed cannot continue the run, and its explicit save_dir holds
    that run: one error says both, before any step, and no warning first says it goes on."""
    trainer = checkpointing_trainer(lightning, tmp_path)
    first = trainer(CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "a"), 1)
    first.fit(lightning.module()(), loader(shapes_dataset(16)))
    ckpt = first.checkpoint_callback.best_model_path
    module = lightning.module()()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError) as raised:
        warnings.simplefilter("always")
        monitor = CamMonitor("net.features.2", num_probe=4, save_dir=tmp_path / "a")
        trainer(monitor, 2).fit(module, loader(shapes_dataset(16)), ckpt_path=ckpt)
    said = [str(w.message) for w in caught if str(w.message).startswith("CamMonitor")]
    assert said == []  # not "it starts a new run", then an error that it cannot
    assert re.search(
        r"(?s)save_dir=.*already holds.*another run.*cannot continue that run and starts a new "
        r"one, which needs a folder of its own",
        str(raised.value),
    )
    assert module.steps_run == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"every_n_epochs": 0}, ValueError, r"`every_n_epochs` must be an int >= 1 or None, got 0"),
        (
            {"every_n_epochs": 1.0},
            TypeError,
            r"`every_n_epochs` must be an int >= 1 or None, got float",
        ),
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
        (
            {"history_maps": "pixels"},
            ValueError,
            r"`history_maps` must be one of 'all', 'cams', 'none', got 'pixels'",
        ),
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
        (
            {
                "layer": "net.features.5",
                "target": "label",
                "probe": {"pixels": torch.randn(4, 3, 32, 32), "cls": torch.arange(4)},
                "input_key": "pixels",
            },
            r'target="label" needs labels.*label_key=',
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
    acc = read_events(logger.log_dir, newest=True)
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
    assert stored is not None and stored.hashes["probe"] == monitor.run.probes["probe"].digest
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


@pytest.mark.parametrize(
    ("box", "why"),
    [
        ([40.0, 40, 50, 50], "outside the image"),
        ([20.0, 20, 10, 10], "x1 < x0, y1 < y0"),
        ([8.0, 8, 8, 16], "no width"),
        ([0.1, 0.1, 0.5, 0.5], "normalised coordinates"),
    ],
)
def test_boxes_that_select_no_pixel_fail_before_training_naming_the_row(
    tmp_path: Path, lightning: Lightning, box: list[float], why: str
) -> None:
    images, labels = shapes_dataset(4, seed=2).tensors
    boxes = torch.tensor([[-4.0, -4, 16, 16]] * 4)  # partly outside the image: its pixels count
    boxes[2] = torch.tensor(box)
    model = lightning.module()()
    monitor = CamMonitor("net.features.5", probe={"objects": (images, labels)}, masks=boxes)
    trainer = lightning.trainer(default_root_dir=tmp_path, logger=False, callbacks=[monitor])
    shown = re.escape(", ".join(f"{v:g}" for v in box))
    message = rf"probe 'objects': the box of row 2, \({shown}\), selects no pixel.*\(x0, y0, x1"
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, loader(shapes_dataset(16)))
    assert model.steps_run == 0, why


@pytest.mark.parametrize("box", [[0.1, 0.2, 0.9, 0.8], [0.0, 0.0, 1.0, 1.0]])
def test_normalised_boxes_are_refused_before_training(
    tmp_path: Path, lightning: Lightning, box: list[float]
) -> None:
    # Each would hold pixel (0, 0)'s centre and score localization against that one pixel.
    images, labels = shapes_dataset(4, seed=2).tensors
    boxes = torch.tensor([box] * 4)
    model = lightning.module()()
    monitor = CamMonitor("net.features.5", probe={"objects": (images, labels)}, masks=boxes)
    trainer = lightning.trainer(default_root_dir=tmp_path, logger=False, callbacks=[monitor])
    with pytest.raises(ValueError, match=r"'objects': every box lies within \[0, 1\].*in pixels"):
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


# -- issue 12: setups that were silently wrong ---------------------------------------------------


class ExtrasClassifier(LitClassifier):
    """Takes `(x, y, extra...)` batches, as datasets returning an index or a weight do."""

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return super().training_step(tuple(batch[:2]), batch_idx)  # type: ignore[arg-type]

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        super().validation_step(tuple(batch[:2]), batch_idx)  # type: ignore[arg-type]


def with_extras(third: torch.Tensor) -> DataLoader:
    """16 shapes batched as `(x, y, third)`."""
    images, labels = shapes_dataset(16).tensors
    return loader(TensorDataset(images, labels, third))


@pytest.mark.parametrize(
    "third",
    [
        torch.arange(16),  # (x, y, index)
        torch.rand(16),  # (x, y, weight)
        shapes_dataset(16, seed=5).tensors[0],  # (x, y, second_view)
        torch.softmax(torch.randn(16, 4), 1),  # soft labels [B, 4]: never boxes
    ],
    ids=["index", "weight", "second_view", "soft_labels"],
)
def test_a_third_batch_element_is_masks_only_when_shaped_like_masks(
    tmp_path: Path, third: torch.Tensor
) -> None:
    monitor = CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "h")
    data = with_extras(third)
    fit(monitor, tmp_path, model=ExtrasClassifier(), train=data, val=data, seed=None, max_epochs=1)
    history = read_history(tmp_path / "h")
    assert len(history) == 2
    assert not any(tag.startswith("cam_loc/") for ev in history for tag in ev.scalars)
    stored = read_probe(tmp_path / "h")
    assert stored is not None and not stored.masks


def test_a_third_batch_element_shaped_like_masks_gives_localization(tmp_path: Path) -> None:
    images = shapes_dataset(16).tensors[0]
    monitor = CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "h")
    data = with_extras(images.mean(1, keepdim=True) > 0.75)  # [B, 1, H, W]
    fit(monitor, tmp_path, model=ExtrasClassifier(), train=data, val=data, seed=None, max_epochs=1)
    assert "cam_loc/val/net.features.5/gradcam/energy" in read_history(tmp_path / "h")[0].scalars


@pytest.mark.parametrize(
    "probe",
    [None, shapes_dataset(16), loader(shapes_dataset(16)), {"a": shapes_dataset(16)}],
    ids=["none", "dataset", "loader", "named_dataset"],
)
def test_masks_for_a_sampled_probe_are_refused(probe: object) -> None:
    masks = torch.zeros(16, 32, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"`masks` cannot be aligned.*inside the dataset's items"):
        named = isinstance(probe, dict)
        CamMonitor("net.features.5", probe=probe, masks={"a": masks} if named else masks)


def test_an_explicit_save_dir_holding_another_run_is_refused(tmp_path: Path) -> None:
    fit(CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "h"), tmp_path / "a")
    (first_run,) = history_runs(tmp_path / "h")
    assert first_run and history_runs(tmp_path / "h")[first_run] == [0, 1, 2]
    model = LitClassifier()
    monitor = CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "h")
    trainer = quiet_trainer(default_root_dir=tmp_path / "b", logger=False, callbacks=[monitor])
    with pytest.raises(
        ValueError, match=rf"save_dir='{tmp_path / 'h'}' already holds .*{first_run}"
    ):
        trainer.fit(model, loader(shapes_dataset(16)))
    assert model.steps_run == 0
    assert history_runs(tmp_path / "h") == {first_run: [0, 1, 2]}


def test_two_monitors_of_one_trainer_with_one_save_dir_are_refused_naming_both(
    tmp_path: Path,
) -> None:
    """Not "another run's history": the message says two monitors share the folder, before
    the first training step."""
    model = LitClassifier()
    monitors = [CamMonitor(layer, num_probe=4, save_dir=tmp_path / "h") for layer in LAYERS]
    trainer = quiet_trainer(default_root_dir=tmp_path, logger=False, callbacks=monitors)
    with pytest.raises(ValueError, match=r"Two CamMonitors in this Trainer have save_dir=.*own"):
        trainer.fit(model, loader(shapes_dataset(16)))
    assert model.steps_run == 0


def test_a_fixed_logger_version_gives_each_run_its_own_history(tmp_path: Path) -> None:
    folders = []
    for epochs in (3, 1):
        logger = TensorBoardLogger(tmp_path, name="tb", version=0)
        monitor = CamMonitor("net.features.5", num_probe=4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(monitor, tmp_path, logger=logger, max_epochs=epochs)
        folders.append(monitor.folder)
    assert folders[0] == Path(logger.log_dir) / "cam_monitor"
    assert folders[1] == Path(logger.log_dir) / f"cam_monitor-{monitor.run_id}"
    assert any("already holds another run's history" in str(w.message) for w in caught)
    assert [len(read_history(folder)) for folder in folders] == [4, 2]  # first run intact
    assert [len(history_runs(folder)) for folder in folders] == [1, 1]


@pytest.mark.parametrize(
    ("kwargs", "epochs", "steps"),
    [
        ({"every_n_epochs": 2, "max_epochs": 3}, [0, 2, 3], [0, 6, 9]),
        ({"every_n_epochs": 3, "max_epochs": 5, "max_steps": 4}, [0, 2], [0, 4]),
        ({"every_n_epochs": 4, "max_epochs": 8, "early_stop": True}, [0, 1], [0, 3]),
    ],
    ids=["every_n_epochs", "max_steps", "early_stopping"],
)
def test_the_final_model_is_evaluated_once_marked_final(
    tmp_path: Path, kwargs: dict, epochs: list[int], steps: list[int]
) -> None:
    every = kwargs.pop("every_n_epochs", None)
    if kwargs.pop("early_stop", False):  # stops after the first validation
        kwargs["callbacks"] = [EarlyStopping("val_loss", stopping_threshold=1e9)]
    monitor = CamMonitor("net.features.5", num_probe=4, every_n_epochs=every, save_dir=tmp_path)
    callbacks = [monitor, *kwargs.pop("callbacks", [])]
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(callbacks, tmp_path, logger=logger, **kwargs)
    history = read_history(tmp_path)
    assert [e.epoch for e in history] == epochs and [e.step for e in history] == steps
    assert [e.final for e in history] == [False] * (len(history) - 1) + [True]
    grids = read_events(logger.log_dir, newest=True).Images("cam/val/net.features.5/gradcam")
    assert [s.step for s in grids] == steps  # the same step axis on the dashboard


def test_a_schedule_that_ends_on_an_evaluation_adds_no_final_one(tmp_path: Path) -> None:
    monitor = CamMonitor("net.features.5", num_probe=4, every_n_steps=3, save_dir=tmp_path / "h")
    fit(monitor, tmp_path, max_epochs=2)
    assert [(e.step, e.final) for e in read_history(tmp_path / "h")] == [
        (0, False), (3, False), (6, False),
    ]  # fmt: skip


def test_monitors_that_differ_in_probe_share_a_trainer(tmp_path: Path) -> None:
    a, b = (shapes_dataset(4, seed=s).tensors for s in (6, 7))
    monitors = [CamMonitor("net.features.5", probe={n: p}) for n, p in (("a", a), ("b", b))]
    assert monitors[0].state_key != monitors[1].state_key
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(monitors, tmp_path, logger=logger, max_epochs=1)
    tags = set(read_events(logger.log_dir, newest=True).Tags()["images"])
    assert tags == {"cam/a/net.features.5/gradcam", "cam/b/net.features.5/gradcam"}
    first, second = (read_history(m.folder) for m in monitors)
    assert monitors[0].folder != monitors[1].folder
    assert [e.probes for e in first + second] == [("a",), ("a",), ("b",), ("b",)]


def test_resuming_with_another_target_or_topk_says_the_history_mixes_both(tmp_path: Path) -> None:
    def run(monitor: CamMonitor, epochs: int, ckpt: str | None = None) -> pl.Trainer:
        trainer = quiet_trainer(
            default_root_dir=tmp_path, logger=False, max_epochs=epochs, callbacks=[monitor],
            enable_checkpointing=True,
        )  # fmt: skip
        trainer.fit(LitClassifier(), loader(shapes_dataset(16)), ckpt_path=ckpt)
        return trainer

    first = run(CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "h"), 1)
    ckpt = first.checkpoint_callback.best_model_path
    changed = CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "h", target=1, topk=0.5)
    with pytest.warns(UserWarning, match=r"(?s)resumed with other target \('predicted' -> 1\), "
                      r"topk \(0.2 -> 0.5\).*history mixes both"):  # fmt: skip
        second = run(changed, 2, ckpt)
    assert changed.run_id == read_history(tmp_path / "h")[0].run  # still the same run
    same = CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "h", target=1, topk=0.5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CamMonitor: resumed")
        run(same, 3, second.checkpoint_callback.best_model_path)
    assert same.run_id == changed.run_id


ARGMAX = lambda logits: logits.argmax(1)  # noqa: E731 (module-level lambdas: one qualname)
ARGMIN = lambda logits: logits.argmin(1)  # noqa: E731


def test_resuming_with_another_function_of_one_name_warns_and_the_same_elsewhere_does_not(
    tmp_path: Path, lightning: Lightning
) -> None:
    def run(target: Callable, epochs: int, ckpt: str | None = None) -> tuple[Any, CamMonitor]:
        monitor = CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path, target=target)
        trainer = lightning.trainer(
            default_root_dir=tmp_path, logger=False, max_epochs=epochs, callbacks=[monitor],
            enable_checkpointing=True,
        )  # fmt: skip
        trainer.fit(lightning.module()(), loader(shapes_dataset(16)), ckpt_path=ckpt)
        return trainer.checkpoint_callback.best_model_path, monitor

    ckpt, first = run(ARGMAX, 1)
    assert ARGMAX.__qualname__ == ARGMIN.__qualname__  # told apart by their code
    with pytest.warns(UserWarning, match=r"resumed with other target \(\S+<lambda> #"):
        ckpt, changed = run(ARGMIN, 2, ckpt)
    assert changed.run_id == first.run_id

    def elsewhere() -> Callable:
        return lambda logits: logits.argmin(1)  # ARGMIN's code, under another qualified name

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CamMonitor: resumed")
        _, same = run(elsewhere(), 3, ckpt)
    assert same.run_id == first.run_id


def test_monitors_on_different_modules_of_one_type_share_a_trainer_and_resume(
    tmp_path: Path, lightning: Lightning
) -> None:
    model = lightning.module()()
    layers = (model.net.features[0], model.net.features[3])  # two Conv2d
    monitors = [CamMonitor(layer, num_probe=4) for layer in layers]
    assert monitors[0].state_key != monitors[1].state_key
    trainer = lightning.trainer(
        default_root_dir=tmp_path, logger=False, max_epochs=1, callbacks=list(monitors),
        enable_checkpointing=True,
    )  # fmt: skip
    trainer.fit(model, loader(shapes_dataset(16)))
    assert [read_history(m.folder)[-1].layers for m in monitors] == [
        ("net.features.0",), ("net.features.3",)
    ]  # fmt: skip
    states = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)
    assert [m.state_key in states["callbacks"] for m in monitors] == [True, True]
    # a monitor given the layer by name, or the same module of a new model, resumes that state
    model = lightning.module()()
    again = [CamMonitor("net.features.3", num_probe=4), CamMonitor(model.net.features[0])]
    resumed = lightning.trainer(default_root_dir=tmp_path, logger=False, callbacks=list(again))
    resumed.fit(
        model, loader(shapes_dataset(16)), ckpt_path=trainer.checkpoint_callback.best_model_path
    )
    assert [m.run_id for m in again] == [monitors[1].run_id, monitors[0].run_id]


def test_a_checkpoint_keying_a_module_layer_by_its_type_still_resumes(tmp_path: Path) -> None:
    model = LitClassifier()
    first = CamMonitor(model.net.features[3], num_probe=4)
    trainer = quiet_trainer(
        default_root_dir=tmp_path, logger=False, max_epochs=1, callbacks=[first],
        enable_checkpointing=True,
    )  # fmt: skip
    trainer.fit(model, loader(shapes_dataset(16)))
    path = Path(trainer.checkpoint_callback.best_model_path)
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["callbacks"].pop(first.state_key)
    checkpoint["callbacks"]["CamMonitor{'layers': ['Conv2d'], 'methods': ['gradcam']}"] = state
    torch.save(checkpoint, path)  # as written before module layers were keyed by name
    model = LitClassifier()
    again = CamMonitor(model.net.features[3], num_probe=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CamMonitor: the checkpoint")
        quiet_trainer(default_root_dir=tmp_path, logger=False, callbacks=[again]).fit(
            model, loader(shapes_dataset(16)), ckpt_path=path
        )
    assert again.run_id == first.run_id and again.evaluations == 3


def test_probe_labels_of_another_length_than_its_images_are_refused_before_training(
    tmp_path: Path,
) -> None:
    images, labels = shapes_dataset(8).tensors  # labels[:7]: captions lost their truth silently
    monitor = CamMonitor("net.features.5", probe=(images, labels[:7]))
    with pytest.raises(ValueError, match=r"probe 'probe' has 8 images but 7 labels.*one label"):
        fit(monitor, tmp_path)
    assert monitor.evaluations == 0


def first_logits(output: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return output[0]


def test_a_monitor_holding_a_lambda_says_which_argument_cannot_be_pickled(tmp_path: Path) -> None:
    """ddp_spawn pickles callbacks: a lambda failed in multiprocessing with "Can't pickle
    <lambda>: attribute lookup on __main__ failed", naming neither the monitor nor the fix."""
    monitor = CamMonitor("net.features.5", forward=lambda module, x: module(x), num_probe=4)
    with pytest.raises(pickle.PicklingError, match=r"CamMonitor\(forward=.*module level"):
        pickle.dumps(monitor)
    twin = copy.deepcopy(monitor)  # copying needs no pickling: it keeps working
    assert twin.engine.forward is monitor.engine.forward
    fit(twin, tmp_path)
    assert twin.evaluations == 3
    named = pickle.loads(pickle.dumps(CamMonitor("net.features.5", output_transform=first_logits)))
    assert named.engine.output_transform is first_logits


def test_fewer_class_names_than_classes_are_refused_before_training(tmp_path: Path) -> None:
    """Two names for five classes drew while the model predicted 0 or 1, then skipped every
    evaluation once it predicted another class, deep into the run."""
    images, labels = shapes_dataset(8).tensors
    probe = (images, labels % 2)  # the truth is named: only predictions can fall outside
    monitor = CamMonitor("net.features.5", probe=probe, class_names=["circle", "square"])
    with pytest.raises(ValueError, match=r"class_names` has 2 names but the logits have 5 classes"):
        fit(monitor, tmp_path)
    assert monitor.evaluations == 0


@pytest.mark.parametrize(
    ("shift", "names", "bad"),
    [
        (5, list("abcde"), 5),  # with class_names: said to be a class_names problem before
        (5, None, 5),  # without: the run trained, captions and `show` compared labels 5-9
        (-1, None, -1),  # "unlabelled" -1: no class of the output either
    ],
)
def test_probe_labels_outside_the_logits_classes_fail_before_training_naming_the_probe(
    tmp_path: Path, lightning: Lightning, shift: int, names: list[str] | None, bad: int
) -> None:
    images, labels = shapes_dataset(5, seed=3).tensors  # labels 0..4, the model's 5 classes
    model = lightning.module()()
    monitor = CamMonitor(
        "net.features.5", probe={"held_out": (images, labels + shift)}, class_names=names
    )
    trainer = lightning.trainer(default_root_dir=tmp_path, logger=False, callbacks=[monitor])
    message = (
        rf"Probe 'held_out' has label {bad} at row 0.*output has 5 classes \(labels 0..4\)"
        r".*Remap the labels to 0..4"
    )
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, loader(shapes_dataset(16)))
    assert model.steps_run == 0 and monitor.evaluations == 0


def test_a_save_dir_that_is_a_file_is_refused_before_training(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a folder")
    monitor = CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r"save_dir=.*notes.txt' is a file, not a folder"):
        fit(monitor, tmp_path)
    assert monitor.evaluations == 0


def test_two_identical_monitors_are_refused_at_setup(tmp_path: Path) -> None:
    class WithMonitors(LitClassifier):
        def configure_callbacks(self) -> list[CamMonitor]:
            return [CamMonitor("net.features.5"), CamMonitor("net.features.5")]

    model = WithMonitors()
    trainer = quiet_trainer(default_root_dir=tmp_path, logger=False)
    with pytest.raises(ValueError, match="Two identical CamMonitors"):
        trainer.fit(model, loader(shapes_dataset(16)))
    assert model.steps_run == 0
    same_tags = [
        CamMonitor("net.features.5", probe=shapes_dataset(4, seed=s).tensors) for s in (1, 2)
    ]
    model = LitClassifier()
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = quiet_trainer(default_root_dir=tmp_path, logger=logger, callbacks=same_tags)
    with pytest.raises(ValueError, match=r"would both log cam/probe/net.features.5/gradcam"):
        trainer.fit(model, loader(shapes_dataset(16)))
    assert model.steps_run == 0


def test_the_state_key_stays_the_same_when_the_layer_is_chosen_for_you(tmp_path: Path) -> None:
    monitor = CamMonitor(num_probe=4)
    before = monitor.state_key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(monitor, tmp_path, max_epochs=1)
    assert monitor.layers == ["net.features.5"] and monitor.state_key == before


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"every_n_epochs": 2, "every_n_steps": 5}, ValueError, r"mutually exclusive"),
        ({"every_n_epochs": 1, "every_n_steps": 1}, ValueError, r"mutually exclusive"),
        ({"every_n_steps": float("nan")}, TypeError, r"`every_n_steps` must be an int"),
        ({"num_probe": "16"}, TypeError, r"`num_probe` must be an int >= 1, got str"),
        ({"nrow": float("nan")}, TypeError, r"`nrow` must be an int"),
        ({"batch_size": "8"}, TypeError, r"`batch_size` must be an int"),
        ({"smooth": float("nan")}, TypeError, r"`smooth` must be an int"),
        ({"ig_steps": "32"}, TypeError, r"`ig_steps` must be an int"),
        ({"alpha": float("nan")}, ValueError, r"`alpha` must be a finite number.*got nan"),
        ({"alpha": "0.5"}, TypeError, r"`alpha` must be a finite number.*got str"),
        ({"noise": "0.1"}, TypeError, r"`noise` must be a finite number.*got str"),
        ({"topk": float("nan")}, ValueError, r"`topk` must be a finite number.*got nan"),
        ({"pointing_tolerance": 1.5}, TypeError, r"`pointing_tolerance` must be an int"),
        ({"mean": [0.5, "a"], "std": [1, 1]}, TypeError, r"`mean\[1\]` must be a finite number"),
        ({"mean": [0, 0], "std": [1, float("nan")]}, ValueError, r"`std\[1\]` must be a finite"),
        ({"target": float("nan")}, TypeError, r"`target` can be 'predicted'"),
        ({"probe": {"..": torch.zeros(2, 3, 8, 8)}}, ValueError, r"probe set name '\.\.' cannot"),
        ({"probe": {"a\tb": torch.zeros(2, 3, 8, 8)}}, ValueError, r"probe set name 'a\\tb'"),
    ],
)
def test_constructor_gaps_are_closed(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        CamMonitor("net.features.5", **kwargs)


def test_every_n_epochs_defaults_to_one_unless_steps_are_given() -> None:
    assert CamMonitor().every_n_epochs == 1
    by_steps = CamMonitor(every_n_steps=4)
    assert (by_steps.every_n_epochs, by_steps.every_n_steps) == (None, 4)


def test_several_val_loaders_take_the_probe_from_the_first_and_say_so(tmp_path: Path) -> None:
    class TwoValLoaders(LitClassifier):
        def validation_step(self, batch: tuple, batch_idx: int, dataloader_idx: int = 0) -> None:
            super().validation_step(batch, batch_idx)

    first, second = shapes_dataset(16, seed=1), shapes_dataset(16, seed=2)
    monitor = CamMonitor("net.features.5", num_probe=4)
    trainer = quiet_trainer(default_root_dir=tmp_path, logger=False, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TwoValLoaders(), loader(shapes_dataset()), [loader(first), loader(second)])
    said = [str(w.message) for w in caught if "dataloaders" in str(w.message)]
    assert len(said) == 1 and "has 2 val dataloaders; the probe comes from the first" in said[0]
    first_named = "from the first, val_dataloaders[0] (a DataLoader of TensorDataset, 16 items)"
    assert first_named in said[0]
    assert "probe=" in said[0]
    assert torch.equal(monitor.run.probes["val"].inputs, first.tensors[0][[0, 5, 10, 15]])


def test_fast_dev_run_evaluates_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monitor = CamMonitor("net.features.5", num_probe=4)
    trainer = quiet_trainer(callbacks=[monitor], fast_dev_run=True)
    with caplog.at_level(logging.INFO):
        trainer.fit(LitClassifier(), loader(shapes_dataset()), loader(shapes_dataset(16)))
    assert monitor.evaluations == 0 and monitor.folder is None
    assert list(tmp_path.rglob("*")) == []
    said = [r.getMessage() for r in caplog.records if "CamMonitor" in r.getMessage()]
    assert said == [
        "CamMonitor: fast_dev_run is on, so the monitor evaluates nothing and writes nothing "
        "in this run."
    ]


def test_the_history_is_complete_when_fit_returns(tmp_path: Path) -> None:
    import threading

    monitor = CamMonitor("net.features.5", num_probe=4, save_dir=tmp_path / "h")
    fit(monitor, tmp_path, logger=False, max_epochs=3)
    # written in the background, flushed at the end of fit: everything is there at once
    assert [e.epoch for e in read_history(tmp_path / "h")] == [0, 1, 2, 3]
    assert read_probe(tmp_path / "h") is not None
    assert not list((tmp_path / "h").glob(".*.tmp"))
    assert not any(t.name == "cam-monitor-history" for t in threading.enumerate())


def test_a_failed_history_write_warns_and_strict_raises(tmp_path: Path) -> None:
    for strict in (False, True):
        folder = tmp_path / f"strict-{strict}"
        (folder / "eval-00001.npz").mkdir(parents=True)  # a folder where the file must go
        monitor = CamMonitor("net.features.5", num_probe=4, save_dir=folder, strict=strict)
        if strict:
            with pytest.raises(OSError):
                fit(monitor, tmp_path, logger=False, max_epochs=2)
            continue
        with pytest.warns(UserWarning, match=r"could not write evaluation 1 to .*Training contin"):
            model = fit(monitor, tmp_path, logger=False, max_epochs=2).model
        assert model.trainer.current_epoch == 2  # training finished
        assert [e.index for e in read_history(folder)] == [0, 2]


def test_image_sinks_share_one_encoding_and_no_encoder_thread_outlives_fit(
    tmp_path: Path, lightning: Lightning
) -> None:
    """TensorBoard and the image files of a CSVLogger get the same bytes: each grid is encoded
    once (on the encoder's threads, while drift is scored) and handed to every sink."""
    import threading

    from cam_monitor.encoding import THREAD_PREFIX

    board = lightning.loggers.TensorBoardLogger(tmp_path, name="tb")
    table = lightning.loggers.CSVLogger(tmp_path, name="csv")
    monitor = CamMonitor(LAYERS, methods=["gradcam", "gradcam++"], num_probe=4)
    with pytest.warns(UserWarning, match="CSVLogger has no image API"):
        fit(monitor, tmp_path, lightning, logger=[board, table], max_epochs=1)
    assert not [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]
    acc = read_events(board.log_dir, newest=True)
    files = Path(board.log_dir) / "cam_monitor" / "images"
    compared = 0
    for tag in acc.Tags()["images"]:
        for shot in acc.Images(tag):
            _, probe, layer, method = tag.split("/")
            path = files / probe / layer / method / f"step-{shot.step:08d}.jpg"
            assert path.read_bytes() == shot.encoded_image_string, (tag, shot.step)
            compared += 1
    assert compared == 2 * 2 * 2  # 2 layers x 2 methods, at the baseline and the epoch end


def test_a_grid_that_cannot_be_encoded_warns_and_skips_unless_strict(tmp_path: Path) -> None:
    """An encoding error (a grid taller than JPEG allows) is reported like a sink error."""
    images = torch.rand(680, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    probe = (images, torch.zeros(680, dtype=torch.long))
    monitor = CamMonitor(
        "net.features.5", probe=probe, nrow=1, max_tiles=None, save_dir=tmp_path / "h"
    )
    with pytest.warns(UserWarning, match="skipped the images of its evaluation.*could not enco"):
        fit(monitor, tmp_path, max_epochs=1, limit_train_batches=1)
    assert [e.epoch for e in read_history(tmp_path / "h")] == [0, 1]  # scored and recorded
    assert not list((tmp_path / "h").rglob("step-*"))  # no image logged
    strict = CamMonitor(
        "net.features.5", probe=probe, nrow=1, max_tiles=None, strict=True, history=False
    )
    with pytest.raises(RuntimeError, match="could not encode a grid of shape"):
        fit(strict, tmp_path / "strict", max_epochs=1, limit_train_batches=1)


def test_a_grid_that_cannot_be_encoded_still_logs_the_scalars(
    tmp_path: Path, lightning: Lightning
) -> None:
    """Nothing lost: when a grid cannot be encoded, only that evaluation's images are skipped,
    with a warning; its drift and entropy reach the logger as they reach the history."""
    images = torch.rand(680, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    probe = (images, torch.zeros(680, dtype=torch.long))
    monitor = CamMonitor(
        "net.features.5", probe=probe, nrow=1, max_tiles=None, save_dir=tmp_path / "h"
    )
    logger = lightning.loggers.CSVLogger(tmp_path, name="csv")
    with pytest.warns(UserWarning, match="skipped the images of its evaluation.*scalars are lo"):
        fit(monitor, tmp_path, lightning, logger=logger, max_epochs=1, limit_train_batches=2)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    entropy = "cam_stats/probe/net.features.5/gradcam/entropy"
    logged = {int(r["step"]): float(r[entropy]) for r in rows if r.get(entropy)}
    recorded = {e.step: e.scalars[entropy] for e in read_history(tmp_path / "h")}
    assert logged == pytest.approx(recorded) and sorted(logged) == [0, 2]
    assert "cam_drift/probe/net.features.5/gradcam/spearman_prev" in rows[-1]
    assert not list((tmp_path / "h").rglob("step-*"))  # the images alone are skipped


def test_a_logger_that_fails_costs_the_other_loggers_nothing(
    tmp_path: Path, lightning: Lightning
) -> None:
    class QuotaCSVLogger(lightning.loggers.CSVLogger):  # type: ignore[name-defined,misc]
        """A user's logger whose store refuses the monitor's metrics (training's go through)."""

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            if any(tag.startswith("cam") for tag in metrics):
                raise OSError("disk quota exceeded")
            super().log_metrics(metrics, step)

    broken = QuotaCSVLogger(tmp_path, name="csv")  # first: the history goes to its folder
    board = lightning.loggers.TensorBoardLogger(tmp_path, name="tb")
    monitor = CamMonitor("net.features.5", num_probe=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(monitor, tmp_path, lightning, logger=[broken, board], max_epochs=2)
    said = [str(w.message) for w in caught if "could not log its evaluation" in str(w.message)]
    assert len(said) == 3 and all("QuotaCSVLogger" in s and "quota" in s for s in said)
    acc = read_events(board.log_dir, newest=True)
    assert [s.step for s in acc.Images("cam/val/net.features.5/gradcam")] == [0, 3, 6]
    assert [s.step for s in acc.Scalars("cam_monitor/seconds")] == [0, 3, 6]
    assert len(read_history(monitor.folder)) == 3
    assert len(list(Path(monitor.folder).glob("images/val/*/gradcam/*"))) == 3  # its image files
    strict = CamMonitor("net.features.5", num_probe=4, strict=True)
    again = [QuotaCSVLogger(tmp_path / "s", name="csv")]
    with pytest.raises(OSError, match="disk quota exceeded"):
        fit(strict, tmp_path / "s", lightning, logger=again, max_epochs=1)


def test_print_shows_layers_methods_probe_sets_and_schedule(tmp_path: Path) -> None:
    """`print(monitor)` says what the monitor watches, before and after a fit."""
    x, y = torch.zeros(3, 3, 32, 32), torch.zeros(3, dtype=torch.long)
    monitor = CamMonitor(
        ["net.features.2", "net.features.5"], methods=["gradcam", "layercam"],
        probe={"source": (x, y), "target": DataLoader(TensorDataset(x, y))}, every_n_steps=5,
    )  # fmt: skip
    assert repr(monitor) == (
        "CamMonitor(layer=['net.features.2', 'net.features.5'], methods=['gradcam', "
        "'layercam'], probe={'source': tuple, 'target': DataLoader}, every_n_steps=5)"
    )
    auto = CamMonitor(num_probe=4, save_dir=tmp_path / "h")
    assert repr(auto) == (
        "CamMonitor(layer=None (chosen at fit), methods=['gradcam'], probe=val/train loader x 4, "
        "every_n_epochs=1)"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the automatic layer's warning
        fit(auto, tmp_path, max_epochs=1)
    assert repr(auto) == (
        "CamMonitor(layer=['net.features.5'], methods=['gradcam'], probe={'val': 4}, "
        "every_n_epochs=1)"
    )


@pytest.mark.slow
def test_a_512_image_probe_logs_bounded_grids_scores_every_image_and_warns_once(
    tmp_path: Path,
) -> None:
    """Grids draw 32 evenly spaced images of a 512-image probe (4 x 8 tiles), the history keeps
    every image's map, and one warning after the baseline says what an evaluation costs."""
    x, y, masks = shapes(512, seed=3)
    monitor = CamMonitor(
        "net.features.5", methods=["gradcam", "saliency"], probe=(x, y), masks=masks,
        save_dir=tmp_path / "h",
    )  # fmt: skip
    logger = TensorBoardLogger(tmp_path, name="tb")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(monitor, tmp_path, logger=logger, max_epochs=2, train=shapes_dataset(16), val=False)
    said = [str(w.message) for w in caught if "above 256" in str(w.message)]
    assert len(said) == 1 and re.search(r"'probe' holds 512 images.*s and [\d.]+ MiB", said[0])
    events = read_events(logger.log_dir)
    for tag in ("cam/probe/net.features.5/gradcam", "cam/probe/input/saliency"):
        for image in events.Images(tag):
            # 4 x 8 tiles of 96 px with their caption bands: 394 x 978 px, not 394 x 15618.
            assert image.width == 4 * 98 + 2 and image.height < 1000, (tag, image.height)
    last = read_history(tmp_path / "h")[-1]
    assert last.maps["probe", "net.features.5", "gradcam"].shape[0] == 512  # all scored
    assert "cam_loc/probe/net.features.5/gradcam/energy" in last.scalars  # of all 512 images


def test_history_maps_keeps_the_maps_asked_for_and_show_reads_every_choice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`history_maps=` shrinks each evaluation's file: "cams" drops the pixel-level maps (at the
    input's resolution), "none" every map; scalars and logits stay, and `show` reads them."""
    sizes = {}
    for choice in ("all", "cams", "none"):
        monitor = CamMonitor(
            "net.features.5", methods=["gradcam", "saliency"], num_probe=4,
            history_maps=choice, save_dir=tmp_path / choice,
        )  # fmt: skip
        fit(monitor, tmp_path / f"fit-{choice}", max_epochs=1, val=False)
        last = read_history(tmp_path / choice)[-1]
        sizes[choice] = last.nbytes
        kept = {"all": {"gradcam", "saliency"}, "cams": {"gradcam"}, "none": set()}
        assert {key.method for key in last.maps} == kept[choice]
        assert "cam_stats/train/net.features.5/gradcam/entropy" in last.scalars
        assert last.logits["train"].shape == (4, 5)
        capsys.readouterr()
        assert cli_main(["show", str(tmp_path / choice)]) == 0
        assert "2 evaluations" in capsys.readouterr().out
    assert sizes["all"] > sizes["cams"] > sizes["none"] > 0


class Uint8Steps(ClassifierSteps):
    """`ClassifierSteps` whose forward converts uint8 pixels itself, as many pipelines do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255)


def test_a_uint8_probe_of_a_model_that_converts_it_is_drawn_as_its_pixels(
    tmp_path: Path, lightning: Lightning
) -> None:
    """The images are display pixels already: with alpha=0 each tile is the probe's image."""
    images, labels, _ = shapes(20)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    monitor = CamMonitor(
        "net.features.5", probe=(pixels[:4], labels[:4]), alpha=0.0, image_format="png",
        save_dir=tmp_path / "h",
    )  # fmt: skip
    with pytest.warns(UserWarning, match="no logger"):
        fit(monitor, tmp_path, lightning, model=lightning.module(Uint8Steps),
            train=TensorDataset(pixels, labels), val=False, max_epochs=1)  # fmt: skip
    (drawn,) = sorted((tmp_path / "h" / "images").rglob("step-00000000.png"))
    grid = cv2.imread(str(drawn), cv2.IMREAD_COLOR)[:, :, ::-1]
    for index in range(4):  # 32 px tiles enlarged 3x, 2 px apart
        left = 2 + index * (96 + 2)
        tile = grid[2 : 2 + 96 : 3, left : left + 96 : 3]
        assert np.array_equal(tile, pixels[index].permute(1, 2, 0).numpy()), index


@pytest.mark.parametrize("channels", [4, 2])
def test_images_of_other_than_1_or_3_channels_are_drawn_with_one_warning_saying_what(
    tmp_path: Path, lightning: Lightning, channels: int
) -> None:
    """RGBA draws its first 3 channels, 2 channels the first as grey: alpha=0 shows them."""
    images, labels, _ = shapes(20)
    images = torch.cat([images, images[:, :1]], 1)[:, :channels].clamp(0, 1)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = 0.0, 1.0  # min-max scaling is then the identity
    model = lightning.module()()  # its first layer takes `channels` channels
    model.net.features[0] = torch.nn.Conv2d(channels, 8, 3, padding=1)
    monitor = CamMonitor(
        "net.features.5", probe=(images[:4], labels[:4]), alpha=0.0, image_format="png",
        save_dir=tmp_path / "h",
    )  # fmt: skip
    what = "channels 0, 1 and 2 as RGB" if channels == 4 else "channel 0 as grey"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fit(monitor, tmp_path, lightning, model=model, train=TensorDataset(images, labels),
            val=False, max_epochs=1)  # fmt: skip
    said = [str(w.message) for w in seen if f"{channels}-channel images" in str(w.message)]
    assert len(said) == 1 and what in said[0], said
    (drawn,) = sorted((tmp_path / "h" / "images").rglob("step-00000000.png"))
    grid = cv2.imread(str(drawn), cv2.IMREAD_COLOR)[:, :, ::-1]
    shown = images[:4, :3] if channels == 4 else images[:4, :1].expand(-1, 3, -1, -1)
    for index in range(4):
        left = 2 + index * (96 + 2)
        tile = grid[2 : 2 + 96 : 3, left : left + 96 : 3].astype(int)
        expected = (shown[index] * 255).round().permute(1, 2, 0).numpy()
        assert np.abs(tile - expected).max() <= 1, index


def test_a_uint8_probe_with_pixel_methods_fails_before_training_naming_the_dtype(
    tmp_path: Path,
) -> None:
    images = (shapes(4)[0].clamp(0, 1) * 255).to(torch.uint8)
    monitor = CamMonitor(
        "net.features.5", methods=["saliency"], probe=images, save_dir=tmp_path / "h"
    )
    named = r"found is torch\.uint8 \(shape \(4, 3, 32, 32\)\)"
    with pytest.raises(ValueError, match=named) as err:
        fit(monitor, tmp_path, max_epochs=1, val=False)
    assert "float() / 255" in str(err.value)
