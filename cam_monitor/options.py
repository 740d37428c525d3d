"""Frozen option objects, one per concern (engine, rendering, drift, schedule, probe, outputs),
each validated once.

`CamMonitor` and `compute_cams` build the same objects, so a bad value gets the same message
wherever it is passed: `TypeError` for a value of the wrong type, `ValueError` for a value out of
range, each naming the argument, the value and what is allowed. NaN and infinity are refused
wherever a number is taken.

Example:
    >>> EngineOptions(methods=("gradcam", "layercam")).methods
    ('gradcam', 'layercam')
    >>> EngineOptions(noise=float("nan"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: `noise` must be a finite number >= 0 (...), got nan.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from torch import Tensor, nn

from .methods import ALL_METHODS
from .probe import check_masks, content_hash, probe_sets
from .render import COLORMAPS, GRID_COLUMNS, IMAGE_FORMATS, MAX_TILES
from .schema import (
    DEFAULT_FAITHFULNESS,
    DEFAULT_MEASURES,
    FAITHFULNESS_CHOICES,
    FAITHFULNESS_MEASURES,
    MEASURES,
    SANITY,
    VIEWS,
)
from .types import ForwardFn, OutputTransform, ProbeSpec, Reshape, Target

OptionsT = TypeVar("OptionsT")


def check_layers(layer: object) -> list[Any] | None:
    """`layer=` as a list of names, globs or modules (None: chosen automatically).

    Example:
        >>> check_layers("features.29"), check_layers(None)
        (['features.29'], None)
    """
    if layer is None:
        return None
    layers = [layer] if isinstance(layer, (str, nn.Module)) else layer
    if isinstance(layers, Sequence) and all(isinstance(i, (str, nn.Module)) for i in layers):
        if not layers:
            raise ValueError("`layer` is an empty list; give at least one layer, or None.")
        return list(layers)
    raise TypeError(
        "`layer` must be a name like 'features.29', a glob, an nn.Module, a list of those, "
        f"or None, got {type(layer).__name__} {layer!r}."
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(
    name: str, value: object, minimum: int, *, optional: bool = False, why: str = ""
) -> Any:
    """`value` as an int >= `minimum` (or None when `optional`); errors name `name`.

    Example:
        >>> check_int("nrow", 8, 1)
        8
        >>> check_int("nrow", 0, 1)
        Traceback (most recent call last):
        ...
        ValueError: `nrow` must be an int >= 1, got 0.
    """
    if optional and value is None:
        return None
    wanted = (
        f"an int >= {minimum}" + (" or None" if optional else "") + (f" ({why})" if why else "")
    )
    if not _is_int(value):
        raise TypeError(f"`{name}` must be {wanted}, got {type(value).__name__} {value!r}.")
    if value < minimum:  # type: ignore[operator]
        raise ValueError(f"`{name}` must be {wanted}, got {value!r}.")
    return value


def check_number(
    name: str,
    value: object,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    why: str = "",
) -> float:
    """`value` as a finite float in [low, high] (or (low, high] with `low_open`).

    Example:
        >>> check_number("alpha", 0.5, 0, 1)
        0.5
        >>> check_number("topk", "0.2", 0, 1, low_open=True)
        Traceback (most recent call last):
        ...
        TypeError: `topk` must be a finite number in (0, 1], got str '0.2'.
    """
    if math.isinf(high):
        wanted = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        wanted = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}]"
    wanted += f" ({why})" if why else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be {wanted}, got {type(value).__name__} {value!r}.")
    number = float(value)
    if not math.isfinite(number) or number > high or number < low or (low_open and number == low):
        raise ValueError(f"`{name}` must be {wanted}, got {value!r}.")
    return number


def check_callable(name: str, value: object, optional: bool = True) -> Any:
    """`value` if it is callable (or None when `optional`), else a TypeError naming `name`."""
    if (optional and value is None) or callable(value):
        return value
    raise TypeError(f"`{name}` must be a callable or None, got {type(value).__name__}.")


def check_choices(name: str, value: object, choices: Sequence[str]) -> tuple[str, ...]:
    """One name or a non-empty sequence of names from `choices`, as a tuple without repeats.

    Example:
        >>> check_choices("methods", "gradcam", ("gradcam", "layercam"))
        ('gradcam',)
    """
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"`{name}` must be a name or a list of names from {', '.join(choices)}, got "
            f"{type(value).__name__} {value!r}."
        )
    if not names:
        raise ValueError(f"`{name}` needs at least one of {', '.join(choices)}.")
    unknown = [n for n in names if n not in choices]
    if unknown:
        close = [_closest(n, choices) for n in unknown]
        hint = ", ".join(repr(c) for c in close if c is not None)
        raise ValueError(
            f"`{name}` got unknown name(s) {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(choices)}." + (f" Did you mean {hint}?" if hint else "")
        )
    return tuple(dict.fromkeys(names))


def _closest(name: str, choices: Sequence[str]) -> str | None:
    """The choice `name` most likely meant: case, `-` and spaces aside, or a near spelling."""
    plain = {c.replace("_", "").replace("-", ""): c for c in choices}
    key = name.lower().replace("_", "").replace("-", "").replace(" ", "")
    if key in plain:
        return plain[key]
    near = difflib.get_close_matches(key, list(plain), n=1, cutoff=0.75)
    return plain[near[0]] if near else None


def check_methods(methods: object) -> tuple[str, ...]:
    """Validated method names (see `cam_monitor.ALL_METHODS`), without repeats."""
    return check_choices("methods", methods, ALL_METHODS)


def _check_target(target: object) -> None:
    named = ("predicted", "label")
    if isinstance(target, str):
        if target not in named:
            raise ValueError(
                f"`target` can be 'predicted', 'label', an int, a LongTensor or a callable, "
                f"got {target!r}."
            )
    elif _is_int(target):
        check_int("target", target, 0, why="a class index")
    elif isinstance(target, Tensor):
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dim() > 1:
            raise ValueError(
                "`target` as a tensor must hold integer class indices, one per image ([B]) or "
                f"one for all ([]), got {target.dtype} of shape {tuple(target.shape)}."
            )
    elif isinstance(target, tuple):
        _check_segment_target(target)
    elif not callable(target):
        raise TypeError(
            "`target` can be 'predicted', 'label', an int, a LongTensor, a callable or (class, "
            f"pixel_mask), got {type(target).__name__}."
        )


def _check_segment_target(target: tuple[Any, ...]) -> None:
    """`(class, pixel_mask)`: a class index or LongTensor [B], and a mask [H, W] or [B, H, W]."""
    if len(target) != 2 or isinstance(target[0], (str, tuple)) or callable(target[0]):
        raise ValueError(
            "`target` as a tuple is (class, pixel_mask) for segmentation logits: a class index "
            f"or LongTensor [B], and a mask [H, W] or [B, H, W]; got {len(target)} elements."
        )
    _check_target(target[0])
    mask = target[1]
    if not isinstance(mask, Tensor) or mask.dim() not in (2, 3, 4) or mask.is_complex():
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            "The pixel mask of target=(class, pixel_mask) must be a bool or float tensor [H, W] "
            f"or [B, H, W], got {shape}."
        )


# Flags in the metadata of an `EngineOptions` field: what derives its lists from the fields.
#: The argument changes the maps a run records: a resume with another value warns.
RECORDED = "recorded"
#: The argument may be a callable: pickling the callback guards it.
CALLABLE = "callable"
#: The argument is also one of `CamMonitor`'s (False: `compute_cams` only).
CALLBACK = "callback"


_SETTING = {RECORDED: True}  # a number or name that changes the maps
_FUNCTION = {RECORDED: True, CALLABLE: True}  # that, and it may be a function
_ENGINE_ONLY = {CALLBACK: False}


@dataclass(frozen=True)
class EngineOptions:
    """What `compute_cams` computes and how (every argument but the model, inputs and layers).

    - `methods`: names from `ALL_METHODS`; `target`: 'predicted', 'label' (callback only), an
      int, a LongTensor [B] or a callable; `output_transform`: index, key or callable.
    - `batch_size`: rows per pass (None: the whole probe at once); `smooth`, `noise`, `seed`:
      noisy copies for Smooth Grad-CAM++ and SmoothGrad; `cam_head`, `ig_steps`: see the README.

    This is the one list of the engine's arguments: `compute_cams` and `CamMonitor` take these
    fields (a test holds their signatures to it), and what else enumerates them reads the
    fields' flags (`engine_fields`).
    """

    methods: tuple[str, ...] = ("gradcam",)
    target: Target = field(default="predicted", metadata=_FUNCTION)
    forward: ForwardFn | None = field(default=None, metadata=_FUNCTION)
    output_transform: OutputTransform = field(default=None, metadata=_FUNCTION)
    reshape: Reshape | None = field(default=None, metadata=_FUNCTION)
    batch_size: int | None = None
    smooth: int = field(default=0, metadata=_SETTING)
    noise: float = field(default=0.15, metadata=_SETTING)
    seed: int = field(default=0, metadata=_ENGINE_ONLY)
    cam_head: Any = field(default=None, metadata=_SETTING)
    ig_steps: int = field(default=256, metadata=_SETTING)

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", check_methods(self.methods))
        _check_target(self.target)
        check_callable("forward", self.forward)
        check_callable("reshape", self.reshape)
        transform = self.output_transform
        if transform is not None and (
            isinstance(transform, bool)
            or not (callable(transform) or isinstance(transform, (int, str)))
        ):
            raise TypeError(
                "`output_transform` must be a callable, a tuple index or a dict key, got "
                f"{type(transform).__name__}."
            )
        check_int("batch_size", self.batch_size, 1, optional=True)
        check_int("smooth", self.smooth, 0, why="the number of noisy copies")
        noise = check_number(
            "noise", self.noise, 0, why="std as a fraction of each image's value range"
        )
        object.__setattr__(self, "noise", noise)
        if not _is_int(self.seed):
            raise TypeError(f"`seed` must be an int, got {type(self.seed).__name__} {self.seed!r}.")
        if not -(2**63) <= self.seed < 2**64:
            raise ValueError(
                f"`seed` must be an int in [-2**63, 2**64), what torch.Generator takes, got "
                f"{self.seed}."
            )
        if self.cam_head is not None and not isinstance(self.cam_head, (str, nn.Module)):
            raise TypeError(
                "`cam_head` must be the name of an nn.Linear, the module itself, or None, got "
                f"{type(self.cam_head).__name__}."
            )
        check_int("ig_steps", self.ig_steps, 1, why="Riemann steps of integrated_gradients")


def options_from(kind: type[OptionsT], arguments: Mapping[str, Any]) -> OptionsT:
    """The options object `kind` of a function's `arguments` (its `locals()`): each field takes
    the argument of its name (or of its `argument` metadata); one not among them its default.

    Example:
        >>> options_from(DriftOptions, {"drift_measures": ["js"], "topk": 0.1, "layer": "fc"})
        DriftOptions(measures=('js',), topk=0.1, pointing_tolerance=0)
    """
    names = {f.name: f.metadata.get("argument", f.name) for f in fields(kind) if f.init}
    return kind(**{name: arguments[arg] for name, arg in names.items() if arg in arguments})


class MonitorOptions(NamedTuple):
    """`CamMonitor`'s arguments as its option objects, one per concern."""

    schedule: ScheduleOptions
    probe: ProbeOptions
    engine: EngineOptions
    render: RenderOptions
    filters: FilterOptions
    drift: DriftOptions
    trust: FaithfulnessOptions
    outputs: OutputOptions


def monitor_options(arguments: Mapping[str, Any]) -> MonitorOptions:
    """`CamMonitor`'s `arguments` (its `locals()`) split into its option objects, each checked
    as it is built (`options_from`).

    Example:
        >>> options = monitor_options({"every_n_steps": 50, "methods": "layercam", "filters": None})
        >>> options.schedule.every_n_steps, options.engine.methods, dict(options.filters.channels)
        (50, ('layercam',), {})
    """
    filters = arguments.get("filters")
    return MonitorOptions(
        options_from(ScheduleOptions, arguments),
        options_from(ProbeOptions, arguments),
        options_from(EngineOptions, arguments),
        options_from(RenderOptions, arguments),
        FilterOptions({} if filters is None else filters),
        options_from(DriftOptions, arguments),
        options_from(FaithfulnessOptions, arguments),
        options_from(OutputOptions, arguments),
    )


def engine_options(arguments: Mapping[str, Any]) -> EngineOptions:
    """`options_from(EngineOptions, arguments)`, built once for each set of plain values.

    Where every argument but `target` is None, a bool, a number, a name or a sequence of names
    (`compute_cams` called again with the same keywords), the options validated before are
    used again with this call's `target`, checked as `EngineOptions` checks it: a call with
    callables, modules or tensors elsewhere builds its options afresh.

    Example:
        >>> engine_options({"methods": ["gradcam"], "target": 3}).target
        3
    """
    key = _plain_key(arguments)
    if key is None:
        return options_from(EngineOptions, arguments)
    known = _ENGINE_OPTIONS.get(key)
    if known is None:
        known = options_from(EngineOptions, {**arguments, "target": "predicted"})
        if len(_ENGINE_OPTIONS) >= _KNOWN_OPTIONS:
            _ENGINE_OPTIONS.clear()
        _ENGINE_OPTIONS[key] = known
    target = arguments.get("target", "predicted")
    if isinstance(target, str) and target == "predicted":
        return known
    _check_target(target)
    options = object.__new__(EngineOptions)
    options.__dict__.update(known.__dict__)
    object.__setattr__(options, "target", target)
    return options


#: Options built from plain values, by `_plain_key`; at most `_KNOWN_OPTIONS` of them.
_ENGINE_OPTIONS: dict[tuple[Any, ...], EngineOptions] = {}
_KNOWN_OPTIONS = 64
_PLAIN = frozenset({type(None), bool, int, float, str})


def _plain_key(arguments: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """The engine arguments but `target` as a hashable key, each value with its type (so that
    1, 1.0 and True differ) and floats by `repr` (0.0 and -0.0 differ); None where one is not
    a plain value."""
    key: list[Any] = []
    append = key.append
    for name in _ENGINE_NAMES:
        value = arguments.get(name, key)  # `key` itself marks an absent argument
        kind = type(value)
        if kind in _PLAIN:
            append(kind)
            append(repr(value) if kind is float else value)
        elif (kind is list or kind is tuple) and all(type(item) is str for item in value):
            append(kind)
            append(tuple(value))
        elif value is key:
            append(None)
        else:
            return None
    return tuple(key)


def engine_fields(flag: str | None = None) -> tuple[Field[Any], ...]:
    """`EngineOptions`' fields, in order; with `flag` (`RECORDED`, `CALLABLE`, `CALLBACK`), those
    whose metadata sets it (a field without metadata is a callback argument and nothing else).

    Example:
        >>> [f.name for f in engine_fields(CALLABLE)]
        ['target', 'forward', 'output_transform', 'reshape']
    """
    found = fields(EngineOptions)
    if flag is None:
        return found
    return tuple(f for f in found if f.metadata.get(flag, flag == CALLBACK))


@dataclass(frozen=True)
class RenderOptions:
    """How grids are drawn: colormap, heat-map opacity, de-normalisation, captions, columns.

    `views` of signed maps (`SIGNED_METHODS`), one grid each: "all" (the whole map), "pos" (its
    positive part), "neg" (its negative part), each rescaled to its own max; `gray_views` draws
    them in grays instead of blue-white-red. `image_format`: how overlay grids are encoded for
    the loggers and files, "jpeg" (quality 90) or "png"; pixel-level maps are always PNG.
    """

    colormap: str = "jet"
    alpha: float = 0.5
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    nrow: int = GRID_COLUMNS
    views: tuple[str, ...] = ("all",)
    gray_views: bool = False
    image_format: str = "jpeg"
    max_tiles: int | None = MAX_TILES

    def __post_init__(self) -> None:
        if not isinstance(self.colormap, str):
            raise TypeError(f"`colormap` must be a name, got {type(self.colormap).__name__}.")
        if self.colormap not in COLORMAPS:
            close = _closest(self.colormap, COLORMAPS)
            raise ValueError(
                f"`colormap` got unknown name {self.colormap!r}; choose from "
                f"{', '.join(COLORMAPS)}." + (f" Did you mean {close!r}?" if close else "")
            )
        object.__setattr__(self, "alpha", check_number("alpha", self.alpha, 0, 1))
        if (self.mean is None) != (self.std is None):
            raise ValueError(
                f"`mean` and `std` go together; got mean={self.mean!r}, std={self.std!r}."
            )
        if self.mean is not None and self.std is not None:
            mean = _number_tuple("mean", self.mean)
            std = _number_tuple("std", self.std)
            if len(mean) != len(std):
                raise ValueError(
                    f"`mean` and `std` need one value per channel each; got mean={self.mean!r}, "
                    f"std={self.std!r}."
                )
            if any(value <= 0 for value in std):
                raise ValueError(f"`std` values must be > 0, got {self.std!r}.")
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "std", std)
        if self.class_names is not None:
            names = self.class_names
            if isinstance(names, str) or not isinstance(names, Sequence):
                raise TypeError(
                    f"`class_names` must be a list of names, got {type(names).__name__}."
                )
            missing = [index for index, name in enumerate(names) if name is None]
            if missing:
                raise ValueError(
                    f"`class_names[{missing[0]}]` is None; give every class a name (its index, "
                    "as a string, where it has none)."
                )
            object.__setattr__(self, "class_names", tuple(str(name) for name in names))
        check_int("nrow", self.nrow, 1, why="tiles per grid row")
        check_int("max_tiles", self.max_tiles, 1, optional=True, why="tiles per grid")
        object.__setattr__(self, "views", check_choices("views", self.views, VIEWS))
        if not isinstance(self.gray_views, bool):
            raise TypeError(f"`gray_views` must be True or False, got {self.gray_views!r}.")
        if not isinstance(self.image_format, str):
            raise TypeError(
                f"`image_format` must be 'jpeg' or 'png', got {type(self.image_format).__name__}."
            )
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(
                f"`image_format` must be one of {', '.join(map(repr, IMAGE_FORMATS))}, got "
                f"{self.image_format!r}; 'png' is lossless, 'jpeg' (quality 90) several times "
                "smaller and faster to encode."
            )


def _number_tuple(name: str, values: object) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, Tensor)):
        raise TypeError(f"`{name}` must be a sequence of numbers, got {type(values).__name__}.")
    items = values.tolist() if isinstance(values, Tensor) else list(values)
    if not items:
        raise ValueError(f"`{name}` needs one value per channel, got an empty sequence.")
    return tuple(check_number(f"{name}[{i}]", v, -math.inf) for i, v in enumerate(items))


@dataclass(frozen=True)
class DriftOptions:
    """How attention is scored: drift measures, top-k fraction, pointing-game tolerance.

    `measures` defaults to `DEFAULT_MEASURES` (Spearman and top-k IoU); any of `MEASURES` can be
    chosen.
    """

    measures: tuple[str, ...] = field(
        default=DEFAULT_MEASURES, metadata={"argument": "drift_measures"}
    )
    topk: float = 0.2
    pointing_tolerance: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "measures", check_choices("drift_measures", self.measures, MEASURES)
        )
        object.__setattr__(
            self,
            "topk",
            check_number("topk", self.topk, 0, 1, low_open=True, why="a fraction of pixels"),
        )
        check_int("pointing_tolerance", self.pointing_tolerance, 0, why="pixels")


@dataclass(frozen=True)
class FaithfulnessOptions:
    """Can the maps be trusted: which faithfulness measures and whether the sanity check run at
    every evaluation (`cam_monitor.faithfulness`); None or ``()``: none.

    Example:
        >>> FaithfulnessOptions(("drop", "sanity")).scores, FaithfulnessOptions(("sanity",)).sanity
        (('drop',), True)
    """

    measures: tuple[str, ...] = field(
        default=DEFAULT_FAITHFULNESS, metadata={"argument": "faithfulness"}
    )

    def __post_init__(self) -> None:
        empty = self.measures is None or (
            isinstance(self.measures, (tuple, list)) and not self.measures
        )
        chosen = () if empty else check_choices("faithfulness", self.measures, FAITHFULNESS_CHOICES)
        object.__setattr__(self, "measures", tuple(chosen))

    @property
    def scores(self) -> tuple[str, ...]:
        """The faithfulness measures chosen, the sanity check aside."""
        return tuple(m for m in self.measures if m in FAITHFULNESS_MEASURES)

    @property
    def sanity(self) -> bool:
        """Whether the randomisation sanity check runs."""
        return SANITY in self.measures


@dataclass(frozen=True)
class FilterOptions:
    """Filter views: channel indices per layer name, and optimisation steps."""

    channels: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    steps: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.channels, Mapping):
            raise TypeError(
                "`filters` maps layer names to channel indices, e.g. {'features.28': [0, 5]}; got "
                f"{type(self.channels).__name__}."
            )
        checked: dict[str, tuple[int, ...]] = {}
        for name, channels in self.channels.items():
            if (
                not isinstance(name, str)
                or isinstance(channels, (str, bytes))
                or not isinstance(channels, Sequence)
                or not channels
                or not all(_is_int(c) and c >= 0 for c in channels)
            ):
                raise ValueError(
                    "`filters` maps layer names to channel indices, e.g. "
                    f"{{'features.28': [0, 5]}}; got {name!r}: {channels!r}."
                )
            checked[name] = tuple(channels)
        object.__setattr__(self, "channels", checked)
        check_int("filter_steps", self.steps, 1)


@dataclass(frozen=True)
class ScheduleOptions:
    """When the callback evaluates: every N training epochs, or every N optimizer steps.

    Example:
        >>> ScheduleOptions().every_n_epochs, ScheduleOptions(every_n_steps=50).every_n_epochs
        (1, None)
    """

    every_n_epochs: int | None = None
    every_n_steps: int | None = None

    def __post_init__(self) -> None:
        steps = check_int("every_n_steps", self.every_n_steps, 1, optional=True)
        every = check_int("every_n_epochs", self.every_n_epochs, 1, optional=True)
        if every is not None and steps is not None:
            raise ValueError(
                f"`every_n_epochs={every}` and `every_n_steps={steps}` are mutually "
                "exclusive: pass one of them (evaluate by epoch, or every N optimizer steps)."
            )
        object.__setattr__(self, "every_n_epochs", 1 if every is None and steps is None else every)

    def due_at_step(self, step: int, last: int) -> bool:
        """Whether the optimizer step `step` is the first at or past a multiple of
        `every_n_steps` since the evaluation at step `last`: the global step can jump by more
        than one (each optimizer of a manual-optimization step counts) and skip a multiple.

        Example:
            >>> ScheduleOptions(every_n_steps=4).due_at_step(9, last=7)  # 8 was jumped over
            True
        """
        every = self.every_n_steps
        return every is not None and step > last and step // every > last // every

    def due_at_epoch(self, epoch: int) -> bool:
        """Whether the end of training epoch `epoch` (0-based) is due for an evaluation."""
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def describe(self) -> str:
        """The schedule as an argument: ``every_n_epochs=1`` or ``every_n_steps=50``."""
        if self.every_n_steps is not None:
            return f"every_n_steps={self.every_n_steps}"
        return f"every_n_epochs={self.every_n_epochs}"


@dataclass(frozen=True, eq=False)
class ProbeOptions:
    """What the callback explains: the probe (None: samples of the Trainer's loaders), how many
    samples a Dataset or DataLoader gives, masks for localization, and the keys of dict batches.

    `sets` are the named probe specifications (`probe.probe_sets`), `ids` their identities in a
    `state_key` (a batch by content hash, a dataset by type and length).
    """

    probe: ProbeSpec = None
    num_probe: int = 16
    masks: Tensor | Mapping[str, Tensor] | None = None
    input_key: str | None = None
    label_key: str | None = None
    sets: dict[str, ProbeSpec] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name, key in (("input_key", self.input_key), ("label_key", self.label_key)):
            if key is not None and not isinstance(key, str):
                raise TypeError(f"`{name}` must be a dict key (str) or None, got {key!r}.")
            if key == "":
                raise ValueError(f"`{name}` must be a dict key or None, got ''.")
        object.__setattr__(self, "sets", probe_sets(self.probe, self.input_key))
        check_masks(self.masks, self.sets)
        check_int("num_probe", self.num_probe, 1)

    def describe(self) -> str:
        """The probe sets by name and kind, before a fit gives them rows: ``{'source': Tensor,
        'target': DataLoader}``, or where a fit takes them from."""
        if self.sets is None:
            return f"val/train loader x {self.num_probe}"
        kinds = ", ".join(f"{name!r}: {type(spec).__name__}" for name, spec in self.sets.items())
        return "{" + kinds + "}"

    @cached_property
    def ids(self) -> dict[str, str] | None:
        """Each probe set's identity, hashed once (a `state_key` is read at every checkpoint)."""
        if self.sets is None:
            return None
        return {name: _spec_id(spec) for name, spec in self.sets.items()}


def _spec_id(spec: Any) -> str:
    """A probe set in `CamMonitor.state_key`: the content hash of a batch, else its type."""
    if isinstance(spec, (Tensor, tuple, list, Mapping)):
        return content_hash(spec)
    try:
        size = str(len(spec))
    except TypeError:  # an IterableDataset
        size = "?"
    return f"{type(spec).__name__}[{size}]"


#: What the history stores of each evaluation's maps: "all" of them, "cams" (the layer-resolution
#: maps; pixel-level maps, at the input's resolution, are dropped), or "none" (scalars, logits,
#: targets and labels only).
HISTORY_MAPS = ("all", "cams", "none")


@dataclass(frozen=True)
class OutputOptions:
    """Where a run's results go besides the loggers, and what a failure inside a run does.

    `reference`: a run directory whose first evaluation is the drift reference; `history`:
    write every evaluation's raw maps; `history_maps`: which (`HISTORY_MAPS`); `save_dir`: the
    run's folder (None: beside the first logger's files); `strict`: raise errors inside later
    evaluations instead of warning.
    """

    reference: str | Path | None = None
    history: bool = True
    history_maps: str = "all"
    save_dir: str | Path | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        for name, folder in (("reference", self.reference), ("save_dir", self.save_dir)):
            if folder is not None and not isinstance(folder, (str, os.PathLike)):
                raise TypeError(f"`{name}` must be a folder path or None, got {folder!r}.")
            if isinstance(folder, str) and not folder.strip():
                raise ValueError(
                    f"`{name}` must be a folder path or None, got {folder!r} (use '.' for the "
                    "current folder)."
                )
        for name, flag in (("history", self.history), ("strict", self.strict)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be True or False, got {flag!r}.")
        if not isinstance(self.history_maps, str):
            raise TypeError(
                f"`history_maps` must be one of {', '.join(HISTORY_MAPS)}, got "
                f"{type(self.history_maps).__name__} {self.history_maps!r}."
            )
        if self.history_maps not in HISTORY_MAPS:
            raise ValueError(
                f"`history_maps` must be one of {', '.join(map(repr, HISTORY_MAPS))}, got "
                f"{self.history_maps!r}."
            )


#: `EngineOptions`' arguments but `target` (which `engine_options` checks at every call).
_ENGINE_NAMES = tuple(f.name for f in fields(EngineOptions) if f.name != "target")
