from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from cam_monitor import ALL_METHODS, compute_cams
from cam_monitor.options import (
    DriftOptions,
    EngineOptions,
    FaithfulnessOptions,
    FilterOptions,
    OutputOptions,
    ProbeOptions,
    RenderOptions,
    check_methods,
    engine_options,
)
from cam_monitor.schema import DEFAULT_MEASURES

NAN, INF = float("nan"), math.inf

# (options class, keyword, argument name in messages, a value of the wrong type)
WRONG_TYPES = [
    (EngineOptions, "methods", "methods", 5),
    (EngineOptions, "methods", "methods", ["gradcam", 3]),
    (EngineOptions, "target", "target", 1.5),
    (EngineOptions, "target", "target", True),
    (EngineOptions, "forward", "forward", 3),
    (EngineOptions, "output_transform", "output_transform", 1.5),
    (EngineOptions, "output_transform", "output_transform", True),  # not index 1
    (FaithfulnessOptions, "measures", "faithfulness", False),
    (FaithfulnessOptions, "measures", "faithfulness", 0),
    (EngineOptions, "reshape", "reshape", "flat"),
    (EngineOptions, "batch_size", "batch_size", "8"),
    (EngineOptions, "batch_size", "batch_size", 2.0),
    (EngineOptions, "smooth", "smooth", 1.5),
    (EngineOptions, "noise", "noise", "0.1"),
    (EngineOptions, "noise", "noise", True),
    (EngineOptions, "seed", "seed", 1.5),
    (EngineOptions, "cam_head", "cam_head", 3),
    (EngineOptions, "ig_steps", "ig_steps", 2.0),
    (RenderOptions, "colormap", "colormap", 3),
    (RenderOptions, "alpha", "alpha", "0.5"),
    (RenderOptions, "mean", "mean", "rgb"),  # with a valid std
    (RenderOptions, "class_names", "class_names", "cat"),
    (RenderOptions, "nrow", "nrow", 2.0),
    (DriftOptions, "measures", "drift_measures", 5),
    (DriftOptions, "topk", "topk", "0.2"),
    (DriftOptions, "pointing_tolerance", "pointing_tolerance", 1.5),
    (FilterOptions, "channels", "filters", [0, 1]),
    (FilterOptions, "steps", "filter_steps", 1.5),
]

# (options class, keywords, argument name in messages, the bad value as the message shows it)
BAD_VALUES: list[tuple[type, dict[str, Any], str, str]] = [
    (EngineOptions, {"methods": "gradcamm"}, "methods", "'gradcamm'"),
    (EngineOptions, {"methods": ["gradcam", "scorecam", "ablation"]}, "methods", "'ablation'"),
    (EngineOptions, {"target": "labels"}, "target", "'labels'"),
    (EngineOptions, {"target": -1}, "target", "-1"),
    (EngineOptions, {"target": torch.tensor([0.5, 1.0])}, "target", "torch.float32"),
    (EngineOptions, {"target": torch.zeros(2, 2, dtype=torch.long)}, "target", "(2, 2)"),
    (EngineOptions, {"batch_size": 0}, "batch_size", "0"),
    (EngineOptions, {"smooth": -1}, "smooth", "-1"),
    (EngineOptions, {"noise": -0.1}, "noise", "-0.1"),
    (EngineOptions, {"noise": NAN}, "noise", "nan"),
    (EngineOptions, {"noise": INF}, "noise", "inf"),
    (EngineOptions, {"ig_steps": 0}, "ig_steps", "0"),
    (RenderOptions, {"colormap": "jett"}, "colormap", "'jett'"),
    (RenderOptions, {"alpha": 1.5}, "alpha", "1.5"),
    (RenderOptions, {"alpha": NAN}, "alpha", "nan"),
    (RenderOptions, {"alpha": -INF}, "alpha", "-inf"),
    (RenderOptions, {"mean": (0.5, 0.5)}, "mean", "(0.5, 0.5)"),
    (RenderOptions, {"mean": (0.5, NAN), "std": (1.0, 1.0)}, "mean", "nan"),
    (RenderOptions, {"mean": (0.5,), "std": (INF,)}, "std", "inf"),
    (RenderOptions, {"mean": (0.5, 0.5), "std": (1.0, 0.0)}, "std", "(1.0, 0.0)"),
    (RenderOptions, {"mean": (0.5, 0.5), "std": (1.0,)}, "mean", "(0.5, 0.5)"),
    (RenderOptions, {"mean": (), "std": ()}, "mean", "empty"),
    (RenderOptions, {"nrow": 0}, "nrow", "0"),
    (DriftOptions, {"measures": ["js", "kl"]}, "drift_measures", "'kl'"),
    (DriftOptions, {"measures": []}, "drift_measures", "js"),
    (DriftOptions, {"topk": 0}, "topk", "0"),
    (DriftOptions, {"topk": 1.5}, "topk", "1.5"),
    (DriftOptions, {"topk": NAN}, "topk", "nan"),
    (DriftOptions, {"topk": INF}, "topk", "inf"),
    (DriftOptions, {"pointing_tolerance": -1}, "pointing_tolerance", "-1"),
    (FilterOptions, {"channels": {"features.3": [-1]}}, "filters", "[-1]"),
    (FilterOptions, {"channels": {"features.3": []}}, "filters", "[]"),
    (FilterOptions, {"steps": 0}, "filter_steps", "0"),
    (RenderOptions, {"class_names": ["cat", None]}, "class_names[1]", "None"),
    (FaithfulnessOptions, {"measures": ""}, "faithfulness", "''"),
    (OutputOptions, {"save_dir": ""}, "save_dir", "''"),
    (OutputOptions, {"reference": " "}, "reference", "' '"),
    (ProbeOptions, {"input_key": ""}, "input_key", "''"),
]


@pytest.mark.parametrize(("cls", "keyword", "name", "value"), WRONG_TYPES)
def test_a_wrong_type_is_a_type_error_naming_the_argument(
    cls: type, keyword: str, name: str, value: object
) -> None:
    extra = {"std": (1.0, 1.0, 1.0)} if keyword == "mean" else {}
    with pytest.raises(TypeError, match=f"`{name}`"):
        cls(**{keyword: value}, **extra)


@pytest.mark.parametrize(("cls", "keywords", "name", "shown"), BAD_VALUES)
def test_a_bad_value_is_a_value_error_naming_argument_and_value(
    cls: type, keywords: dict[str, Any], name: str, shown: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(f"`{name}")) as info:
        cls(**keywords)
    assert shown in str(info.value)


def test_defaults_are_valid_and_values_are_normalised() -> None:
    engine = EngineOptions(methods=["gradcam", "layercam", "gradcam"], noise=1, batch_size=None)
    assert engine.methods == ("gradcam", "layercam") and engine.noise == 1.0
    assert isinstance(engine.noise, float)
    assert EngineOptions(target=torch.tensor([1, 2])).target is not None
    assert EngineOptions(target="label").target == "label"  # the callback resolves it
    render = RenderOptions(mean=torch.tensor([0.5, 0.25]), std=[1, 2], class_names=["a", 3])
    assert render.mean == (0.5, 0.25) and render.std == (1.0, 2.0)
    assert render.class_names == ("a", "3")
    assert DriftOptions().measures == DEFAULT_MEASURES
    assert DriftOptions(measures="js").measures == ("js",)
    assert FilterOptions({"a": [2, 0]}).channels == {"a": (2, 0)}
    with pytest.raises(AttributeError):
        engine.noise = 0.3  # type: ignore[misc]


def test_check_methods_lists_the_unknown_names_and_every_choice() -> None:
    assert check_methods(["gradcam", "layercam", "gradcam"]) == ("gradcam", "layercam")
    assert check_methods(list(ALL_METHODS)) == ALL_METHODS
    assert check_methods("saliency") == ("saliency",)
    with pytest.raises(ValueError, match="'gradcamm', 'guided-gradcam'") as info:
        check_methods(["gradcam", "gradcamm", "guided-gradcam"])
    assert ", ".join(ALL_METHODS) in str(info.value)
    with pytest.raises(ValueError, match="at least one"):
        check_methods([])


def test_an_unknown_name_suggests_the_closest_choice() -> None:
    for typo, meant in [
        ("GradCAM", "gradcam"), ("grad-cam++", "gradcam++"), ("gradcamm", "gradcam"),
        ("integrated_gradient", "integrated_gradients"), ("Guided_GradCAM", "guided_gradcam"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=f"Did you mean {re.escape(repr(meant))}"):
            check_methods(["layercam", typo])
    with pytest.raises(ValueError, match=r"Did you mean 'topk_iou'\?"):
        DriftOptions(measures=["topk-iou"])
    with pytest.raises(ValueError, match=r"Did you mean 'viridis'\?"):
        RenderOptions(colormap="Viridis")
    with pytest.raises(ValueError) as info:
        check_methods("occlusion")  # nothing close: the list of choices only
    assert "Did you mean" not in str(info.value)


def test_compute_cams_reports_bad_options_in_the_same_words() -> None:
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    x = torch.randn(2, 3, 8, 8)
    for keywords in (
        {"noise": NAN}, {"smooth": -1}, {"batch_size": 0}, {"methods": "gradcamm"},
        {"seed": 2**64},
    ):  # fmt: skip
        with pytest.raises(ValueError) as direct:
            EngineOptions(**keywords)
        with pytest.raises(ValueError, match=re.escape(str(direct.value))):
            compute_cams(net, x, "0", **keywords)
    with pytest.raises(TypeError, match="`seed`"):
        compute_cams(net, x, "0", seed=1.5)  # type: ignore[arg-type]


def test_image_format_is_jpeg_or_png() -> None:
    from cam_monitor.options import RenderOptions

    assert RenderOptions().image_format == "jpeg"
    assert RenderOptions(image_format="png").image_format == "png"
    with pytest.raises(ValueError, match="`image_format` must be one of 'jpeg', 'png', got 'jpg'"):
        RenderOptions(image_format="jpg")
    with pytest.raises(TypeError, match="`image_format` must be 'jpeg' or 'png', got int"):
        RenderOptions(image_format=1)  # type: ignore[arg-type]


# -- issue 23: one list per idea ----------------------------------------------------------------


def _normalised(kind: type, name: str, value: object) -> object:
    """The value of field `name` once `kind` has checked and normalised `value`."""
    return getattr(kind(**{name: value}), name)


def test_compute_cams_and_cam_monitor_take_exactly_the_engine_options_fields() -> None:
    # EngineOptions is the one list of the engine's arguments; the two explicit signatures
    # (read by help() and LightningCLI) must name its fields, with its defaults.
    from cam_monitor import CamMonitor
    from cam_monitor.options import CALLBACK, engine_fields

    fields = {f.name: f.default for f in engine_fields()}
    not_options = {"model", "inputs", "layers", "ig_baseline"}  # what each call explains
    compute = {
        name: p.default
        for name, p in inspect.signature(compute_cams).parameters.items()
        if name not in not_options
    }
    assert list(compute) == list(fields)
    in_callback = [f.name for f in engine_fields(CALLBACK)]
    monitor = inspect.signature(CamMonitor).parameters
    assert sorted(name for name in monitor if name in fields) == sorted(in_callback)
    for name, default in fields.items():
        assert _normalised(EngineOptions, name, compute[name]) == default, name
        if name in in_callback:
            assert _normalised(EngineOptions, name, monitor[name].default) == default, name


def test_every_cam_monitor_argument_belongs_to_one_options_object() -> None:
    from cam_monitor import CamMonitor
    from cam_monitor.options import (
        CALLBACK,
        FaithfulnessOptions,
        OutputOptions,
        ProbeOptions,
        ScheduleOptions,
        engine_fields,
    )

    owners: dict[str, list[str]] = {"layer": ["CamMonitor"], "filters": ["FilterOptions"]}
    for f in engine_fields(CALLBACK):
        owners.setdefault(f.name, []).append("EngineOptions")
    kinds = (
        ScheduleOptions, ProbeOptions, RenderOptions, DriftOptions, FaithfulnessOptions,
        OutputOptions,
    )  # fmt: skip
    for kind in kinds:
        for f in dataclasses.fields(kind):
            if f.init:
                owners.setdefault(f.metadata.get("argument", f.name), []).append(kind.__name__)
    monitor = inspect.signature(CamMonitor).parameters
    assert set(owners) == set(monitor), set(owners) ^ set(monitor)
    assert all(len(kinds) == 1 for kinds in owners.values()), owners
    for kind in kinds:
        default = kind()
        for f in dataclasses.fields(kind):
            if f.init:
                given = monitor[f.metadata.get("argument", f.name)].default
                assert _normalised(kind, f.name, given) == getattr(default, f.name), f.name


def test_schedule_probe_and_output_options_check_their_arguments() -> None:
    from cam_monitor.options import OutputOptions, ProbeOptions, ScheduleOptions

    assert (ScheduleOptions().every_n_epochs, ScheduleOptions(every_n_steps=3).every_n_epochs) == (
        1,
        None,
    )
    with pytest.raises(ValueError, match=r"`every_n_epochs=2` and `every_n_steps=3` are mutually"):
        ScheduleOptions(every_n_epochs=2, every_n_steps=3)
    with pytest.raises(ValueError, match=r"`every_n_steps` must be an int >= 1"):
        ScheduleOptions(every_n_steps=0)
    with pytest.raises(TypeError, match=r"`label_key` must be a dict key"):
        ProbeOptions(label_key=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`num_probe` must be an int >= 1"):
        ProbeOptions(num_probe=0)
    probe = ProbeOptions(probe={"a": torch.zeros(2, 3, 4, 4), "b": torch.ones(2, 3, 4, 4)})
    assert probe.sets is not None and sorted(probe.sets) == ["a", "b"]
    assert probe.ids is not None and probe.ids["a"] != probe.ids["b"]
    assert ProbeOptions().sets is None and ProbeOptions().ids is None
    with pytest.raises(TypeError, match=r"`save_dir` must be a folder path or None"):
        OutputOptions(save_dir=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`strict` must be True or False"):
        OutputOptions(strict="yes")  # type: ignore[arg-type]


def test_engine_options_built_once_are_those_built_afresh_with_each_target() -> None:
    methods = ["gradcam", "layercam"]
    arguments: dict[str, Any] = {"methods": methods, "smooth": 0, "noise": 0.15}
    for target in ("predicted", 3, torch.tensor([1, 2]), lambda logits: logits[:, 0]):
        for _ in range(2):  # built, then remembered
            got = engine_options({**arguments, "target": target})
            assert got == dataclasses.replace(EngineOptions(**arguments), target=target)
            assert got.target is target or got.target == target
    with pytest.raises(ValueError, match=r"`target` must be an int >= 0 \(a class index\)"):
        engine_options({**arguments, "target": -1})
    with pytest.raises(ValueError, match="`target` as a tensor must hold integer class indices"):
        engine_options({**arguments, "target": torch.tensor([0.5])})
    methods.append("hirescam")  # a list changed in place is read again
    assert engine_options({**arguments, "methods": methods}).methods[-1] == "hirescam"
    # Equal values of other types are other keys: False is no int, -0.0 is kept as given.
    with pytest.raises(TypeError, match="`smooth` must be an int"):
        engine_options({**arguments, "smooth": False})
    assert math.copysign(1, engine_options({**arguments, "noise": 0.0}).noise) == 1
    assert math.copysign(1, engine_options({**arguments, "noise": -0.0}).noise) == -1


def test_engine_options_of_a_loop_are_built_once_and_read_again_when_they_change() -> None:
    arguments: dict[str, Any] = {"methods": ["gradcam"], "smooth": 0, "noise": 0.15}
    first = engine_options(arguments)
    assert engine_options(arguments) is first  # the same values: nothing built again
    assert engine_options({**arguments, "methods": ["layercam"]}).methods == ("layercam",)
    assert engine_options({**arguments, "noise": 0.25}).noise == 0.25
    with pytest.raises(TypeError, match="`smooth` must be an int"):
        engine_options({**arguments, "smooth": False})  # equal to 0, but not the same value
    with pytest.raises((TypeError, ValueError), match="methods"):
        engine_options({**arguments, "methods": np.array(["gradcam"])})
