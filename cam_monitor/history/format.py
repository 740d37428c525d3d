"""The history's on-disk format (version 1): the records, their arrays and their key encoding.

A history is one folder (the run's ``cam_monitor/`` folder) holding one file per evaluation,
``eval-{index:05d}.npz`` (``eval-00000.npz``, ``eval-00001.npz``, ...; an index above 99999
simply gets more digits), written with ``np.savez`` (uncompressed; files written compressed by
earlier versions read the same), and readable with numpy and the
standard library alone. Any other file in the folder is ignored by the readers, in particular
the hidden temporary files ``.eval-*.npz.*.tmp`` that a write killed half-way leaves behind
(files are written to a temporary name, fsynced, then renamed with ``os.replace``, so a file
with the final name is always complete; see `cam_monitor.history.store`).

Arrays in each file, keyed by name (``np.load(path)[key]``):

- ``maps/{probe}/{layer}/{method}``: float32 ``[B, h, w]``, the raw CAM at layer resolution
  (not normalised), NaN and +-inf kept. Raw Grad-CAM values are often 1e-4 or smaller, where
  float16 would lose most of its precision, so maps stay float32 (they are small at layer
  resolution).
- ``targets/{probe}``: int64 ``[B]``, the class each CAM explains.
- ``logits/{probe}``: float32 ``[B, C]``, the model's logits on the probe.
- ``labels/{probe}``: int64 ``[B]``, the ground-truth labels, only for probes that have them.
- For a segmentation probe (per-pixel logits ``[B, C, H, W]``; ``logits`` then holds each
  class's mean logit over the image, whose argmax is no prediction of the model), per image:

  - ``predicted/{probe}``: int64 ``[B]``, the image's predicted class by the rule of
    ``target="predicted"``: its most frequent predicted class other than the background
    (class 0), the background only where nothing else is predicted
    (`cam_monitor.targets.main_class` of the argmax map);
  - ``class_share/{probe}``: float32 ``[B]``, the share of the image's pixels predicted as the
    class its maps explain (``targets``);
  - ``class_iou/{probe}`` and ``class_accuracy/{probe}``: float32 ``[B]``, only for probes with
    label maps: that class's IoU on the image and its pixel accuracy (the share of the pixels
    labelled with it that are predicted as it). Grid captions give the IoU, else the share.

  NaN marks an undefined value (a class neither predicted nor labelled; a class of -1). These
  entries are optional additions to format 1: files of classifiers, and files written before
  they existed, have none (a reader that does not know them ignores them, as every reader of
  format 1 ignores entries it does not know).
- ``meta``: a 0-d numpy unicode string holding JSON (``json.loads(str(f["meta"]))``)::

      {"format": 1, "index": int, "epoch": int, "step": int,
       "probe_hashes": {probe: str}, "probes": [...], "layers": [...], "methods": [...],
       "scalars": {name: float | null | "inf" | "-inf"}, "time": ISO-8601 UTC string,
       "run": str, "final": true, "class_names": [str, ...]}

  ``class_names`` (the names of the logits' classes, for captions) is optional: files written
  without class names, or by an earlier cam-monitor, leave it out and read back as None.

  ``probes``, ``layers`` and ``methods`` are in first-appearance order (the order the caller
  inserted the maps). Non-finite scalars are not valid JSON numbers, so NaN is written as
  ``null`` and +-inf as the strings ``"inf"`` / ``"-inf"`` (``float(x)`` reads both back).
  Scalar names are the tags the monitor logs (`cam_monitor.schema`). ``probe_hashes`` are
  `cam_monitor.probe.content_hash` digests of each probe's inputs. ``run`` identifies the
  training run that wrote the file (one folder holds one run's history; files without it, as
  written before run ids existed, count as one run). ``final`` is true for the evaluation the
  monitor adds at the end of ``fit`` when the schedule left the end unevaluated. Both keys are
  optional: absent, the run is unnamed (``""``) and the evaluation not final.

Key encoding (`cam_monitor.schema.encode`): each name component (probe, layer, method) is stored
verbatim, except that the characters ``%``, ``/``, ``\\`` and ASCII control characters are
written as ``%XX`` (their hex code), so a ``/`` inside a name cannot be mistaken for a
separator; ``urllib.parse.unquote`` decodes a component. Names such as ``source``,
``features.29``, ``layer4.1.conv2`` and ``gradcam++`` therefore appear unchanged:
``maps/source/features.29/gradcam++``.

The probe (format 1), stored once per run as ``probe.npz`` in the same folder so reports can
draw overlays, written atomically in the same way (`write_probe`, `read_probe`):

- ``inputs/{probe}``: float32 ``[B, C, H, W]``, the images as the model saw them (the whole
  inputs of a one-tensor probe; of a nested batch, its image tensor alone, while the hash
  covers every tensor of it).
- ``labels/{probe}``: int64 ``[B]``, only for probes that have labels.
- ``masks/{probe}``: bool ``[B, H, W]``, only for probes that have localization masks.
- ``label_maps/{probe}``: integer ``[B, H, W]``, only for probes that have class-index maps
  (segmentation labels; int16 where every value fits, as class indices, 255 and -100 do, else
  int64; read back as int64). Optional like the segmentation entries above: probe files
  written before them have none.
- ``meta``: JSON ``{"format": 1, "kind": "probe", "probes": [...], "hashes": {probe: str},
  "time": ISO-8601 UTC string, "run": str}``; ``hashes`` are the `Evaluation.probe_hashes` of
  the run, ``run`` its run id (optional, as in the evaluations).

Example (reading with numpy alone):
    >>> import json, tempfile
    >>> import numpy as np
    >>> from cam_monitor.history import write_evaluation
    >>> ev = Evaluation(index=3, epoch=6, step=120, probe_hashes={"source": "0123456789ab"},
    ...     maps={("source", "features.29", "gradcam"): np.full((2, 7, 7), 0.5, np.float32)},
    ...     targets={"source": np.array([4, 1])}, logits={"source": np.zeros((2, 10))},
    ...     scalars={"drift/first": float("nan")})
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = write_evaluation(folder, ev)
    ...     with np.load(path) as f:
    ...         meta = json.loads(str(f["meta"]))
    ...         cam = f["maps/source/features.29/gradcam"]
    >>> path.name, meta["epoch"], meta["layers"], meta["scalars"]
    ('eval-00003.npz', 6, ['features.29'], {'drift/first': None})
    >>> cam.dtype, cam.shape, float(cam.max())
    (dtype('float32'), (2, 7, 7), 0.5)
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from ..schema import (
    CLASS_ACCURACY_ARRAY,
    CLASS_IOU_ARRAY,
    CLASS_SHARE_ARRAY,
    LABEL_MAPS_ARRAY,
    MAPS_ARRAY,
    META_ARRAY,
    PREDICTED_ARRAY,
    PROBE_FILE,
    SEGMENTATION_ARRAYS,
    MapKey,
    map_array,
    parse_array,
    probe_array,
)

__all__ = [
    "FORMAT_VERSION",
    "PROBE_FILE",
    "Evaluation",
    "HistoryError",
    "NewerFormatError",
    "ProbeRecord",
    "Segmentation",
    "evaluation_from_arrays",
    "evaluation_to_arrays",
    "probe_from_arrays",
    "probe_to_arrays",
    "read_meta",
    "run_of",
]

FORMAT_VERSION = 1
_KINDS = ("targets", "logits", "labels")
#: `Segmentation`'s field of each of its arrays in a history file.
_SEGMENTATION_FIELDS = {
    PREDICTED_ARRAY: "predicted",
    CLASS_SHARE_ARRAY: "share",
    CLASS_IOU_ARRAY: "iou",
    CLASS_ACCURACY_ARRAY: "accuracy",
}


class HistoryError(ValueError):
    """A cam-monitor history is missing, ambiguous, or holds an unreadable evaluation file."""


class NewerFormatError(Exception):
    """The file was written by a newer cam-monitor than this one (the store names the file)."""


@dataclass(frozen=True, eq=False)
class Segmentation:
    """One segmentation probe at one evaluation, per image: ``predicted``, the class the model
    predicts by the rule of ``target="predicted"`` (int64 ``[B]``), and how it predicts the class
    each map explains (float32 ``[B]``, NaN where undefined): the ``share`` of the image's pixels,
    and where the probe has label maps (else None) its ``iou`` and pixel ``accuracy``. Compared
    by identity (``eq=False``): its fields hold numpy arrays.
    """

    predicted: np.ndarray
    share: np.ndarray | None = None
    iou: np.ndarray | None = None
    accuracy: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays it holds, by their kind in a history file (`SEGMENTATION_ARRAYS`)."""
        found = {kind: getattr(self, name) for kind, name in _SEGMENTATION_FIELDS.items()}
        return {kind: array for kind, array in found.items() if array is not None}


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Everything one evaluation produced: raw maps keyed by `MapKey` (probe, layer, method),
    targets, logits, optional labels and scalar curves. ``time`` (ISO-8601) is stamped at write
    if None. ``run`` is the id of the run that wrote it (``""``: unknown, an older file);
    ``final`` marks the evaluation added at the end of ``fit``. ``segmentation`` holds the
    per-image record of each segmentation probe (`Segmentation`; empty for classifiers and
    older files). Compared by identity (``eq=False``): its fields hold numpy arrays.
    """

    index: int
    epoch: int
    step: int
    probe_hashes: dict[str, str]
    maps: dict[MapKey, np.ndarray]
    targets: dict[str, np.ndarray]
    logits: dict[str, np.ndarray]
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    time: str | None = None
    run: str = ""
    final: bool = False
    class_names: tuple[str, ...] | None = None
    segmentation: dict[str, Segmentation] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Plain (probe, layer, method) tuples become MapKeys; anything else is left for the
        # writer to refuse with a message that names it.
        maps = {_map_key(key): array for key, array in self.maps.items()}
        object.__setattr__(self, "maps", maps)
        if self.class_names is not None and not isinstance(self.class_names, tuple):
            object.__setattr__(self, "class_names", tuple(self.class_names))

    @property
    def probes(self) -> tuple[str, ...]:
        """Probe names in first-appearance order: maps, then targets, logits, labels,
        segmentation."""
        names = [key.probe for key in self.maps]
        for kind in (self.targets, self.logits, self.labels, self.segmentation):
            names.extend(kind)
        return _unique(names)

    @property
    def nbytes(self) -> int:
        """The arrays' bytes, about the size of its (uncompressed) file."""
        tables = (self.maps, self.targets, self.logits, self.labels)
        arrays = [array for table in tables for array in table.values()]
        arrays += [a for record in self.segmentation.values() for a in record.arrays().values()]
        return sum(int(np.asarray(array).nbytes) for array in arrays)

    @property
    def layers(self) -> tuple[str, ...]:
        """Layer names in the order their first map was inserted."""
        return _unique(key.layer for key in self.maps)

    @property
    def methods(self) -> tuple[str, ...]:
        """Method names in the order their first map was inserted."""
        return _unique(key.method for key in self.maps)

    def __repr__(self) -> str:
        return (
            f"Evaluation(index={self.index}, epoch={self.epoch}, step={self.step}, "
            f"probes={self.probes}, layers={self.layers}, methods={self.methods}, "
            f"scalars={self.scalars})"
        )


@dataclass(frozen=True, eq=False)
class ProbeRecord:
    """A run's probe as stored in ``probe.npz``: inputs, labels, masks and class-index maps
    (``label_maps``, segmentation labels) per probe name, the probe hashes, and the id of the run
    that wrote it (``""``: unknown). Compared by identity (``eq=False``): its fields hold numpy
    arrays.
    """

    inputs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    run: str = ""
    label_maps: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def probes(self) -> tuple[str, ...]:
        """Probe names in first-appearance order: inputs, then labels, masks, label maps,
        hashes."""
        return _unique([*self.inputs, *self.labels, *self.masks, *self.label_maps, *self.hashes])


# ----------------------------------------------------------------------------- evaluations


def evaluation_to_arrays(ev: Evaluation) -> dict[str, np.ndarray]:
    """Validate ``ev`` and turn it into the named arrays of one file (``meta`` last).

    Raises ValueError naming the field at fault, so nothing reaches the disk.
    """
    index = _as_int(ev.index, "index")
    if index < 0:
        raise ValueError(f"Evaluation.index must be >= 0, got {index}")
    epoch, step = _as_int(ev.epoch, "epoch"), _as_int(ev.step, "step")
    arrays: dict[str, np.ndarray] = {}
    batch: dict[str, tuple[int, str]] = {}

    def check_batch(probe: str, size: int, what: str) -> None:
        first = batch.setdefault(probe, (size, what))
        if first[0] != size:
            raise ValueError(
                f"Probe {probe!r}: {what} has batch size {size} but {first[1]} has {first[0]}"
            )

    for key, array in ev.maps.items():
        if not isinstance(key, MapKey):
            raise ValueError(f"Evaluation.maps keys must be (probe, layer, method), got {key!r}")
        for name, what in zip(key, ("Probe", "Layer", "Method"), strict=True):
            _check_name(name, what)
        what = f"maps[{tuple(key)!r}]"
        array = _batch_array(array, 3, what, integer=False)
        check_batch(key.probe, array.shape[0], what)
        arrays[map_array(key)] = np.asarray(array, dtype=np.float32)
    for kind in ("targets", "logits"):
        table: Mapping[str, np.ndarray] = getattr(ev, kind)
        missing = [p for p in _unique(key.probe for key in ev.maps) if p not in table]
        if missing:
            raise ValueError(f"Evaluation.{kind} has no entry for probe(s) {missing}")
    for kind, ndim, dtype in (
        ("targets", 1, np.int64),
        ("logits", 2, np.float32),
        ("labels", 1, np.int64),
    ):
        for probe, array in getattr(ev, kind).items():
            what = f"{kind}[{probe!r}]"
            _check_name(probe, "Probe")
            array = _batch_array(array, ndim, what, integer=dtype is np.int64)
            check_batch(probe, array.shape[0], what)
            arrays[probe_array(kind, probe)] = array.astype(dtype)
    for probe, record in ev.segmentation.items():
        _check_name(probe, "Probe")
        if not isinstance(record, Segmentation):
            raise ValueError(
                f"Evaluation.segmentation[{probe!r}] must be a Segmentation, got "
                f"{type(record).__name__}"
            )
        for kind, array in record.arrays().items():
            what = f"segmentation[{probe!r}].{_SEGMENTATION_FIELDS[kind]}"
            integer = kind == PREDICTED_ARRAY
            array = _batch_array(array, 1, what, integer=integer)
            check_batch(probe, array.shape[0], what)
            arrays[probe_array(kind, probe)] = array.astype(np.int64 if integer else np.float32)
    hashes = {_check_name(p, "Probe"): str(h) for p, h in ev.probe_hashes.items()}
    scalars = {_check_name(k, "Scalar"): _scalar_to_json(v, k) for k, v in ev.scalars.items()}
    meta = {
        "format": FORMAT_VERSION,
        "index": index,
        "epoch": epoch,
        "step": step,
        "probe_hashes": hashes,
        "probes": list(ev.probes),
        "layers": list(ev.layers),
        "methods": list(ev.methods),
        "scalars": scalars,
        "time": ev.time or _now(),
    }
    if ev.run:
        meta["run"] = str(ev.run)
    if ev.final:
        meta["final"] = True
    if ev.class_names is not None:
        meta["class_names"] = [str(name) for name in ev.class_names]
    arrays[META_ARRAY] = np.array(json.dumps(meta, allow_nan=False))
    return arrays


def evaluation_from_arrays(contents: Mapping[str, np.ndarray]) -> Evaluation:
    """Rebuild an Evaluation from a file's arrays; malformed content raises ValueError."""
    meta = read_meta(contents)
    maps: dict[MapKey, np.ndarray] = {}
    tables: dict[str, dict[str, np.ndarray]] = {
        kind: {} for kind in (*_KINDS, *SEGMENTATION_ARRAYS)
    }
    for key, array in contents.items():
        parts = parse_array(key)
        if parts[0] == MAPS_ARRAY:
            if len(parts) != 4 or array.ndim != 3:
                raise ValueError(f"malformed map entry {key!r} with shape {array.shape}")
            maps[MapKey(*parts[1:])] = array.astype(np.float32)
        elif parts[0] in tables:
            if len(parts) != 2 or (parts[0] in SEGMENTATION_ARRAYS and array.ndim != 1):
                raise ValueError(f"malformed entry {key!r} with shape {array.shape}")
            tables[parts[0]][parts[1]] = array
        # Other keys ("meta", or entries added by a later minor revision) are not ours to read.
    return Evaluation(
        index=int(meta["index"]),
        epoch=int(meta["epoch"]),
        step=int(meta["step"]),
        probe_hashes={str(k): str(v) for k, v in meta["probe_hashes"].items()},
        maps=maps,
        targets=tables["targets"],
        logits=tables["logits"],
        labels=tables["labels"],
        scalars={str(k): _scalar_from_json(v) for k, v in meta["scalars"].items()},
        time=str(meta["time"]),
        run=run_of(meta),
        final=meta.get("final") is True,
        class_names=_class_names(meta.get("class_names")),
        segmentation=_segmentation(tables),
    )


def _segmentation(tables: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Segmentation]:
    """The `Segmentation` of every probe with a ``predicted`` entry (the others need it)."""
    records = {}
    for probe, predicted in tables[PREDICTED_ARRAY].items():
        values = {
            _SEGMENTATION_FIELDS[kind]: tables[kind][probe].astype(np.float32)
            for kind in SEGMENTATION_ARRAYS[1:]
            if probe in tables[kind]
        }
        records[probe] = Segmentation(predicted.astype(np.int64), **values)
    return records


def run_of(meta: Mapping[str, Any]) -> str:
    """The run id in a file's `meta` (``""`` when it has none: written before run ids)."""
    run = meta.get("run", "")
    return run if isinstance(run, str) else str(run)


# ----------------------------------------------------------------------------- the probe


def probe_to_arrays(
    inputs: Mapping[str, Any],
    labels: Mapping[str, Any],
    masks: Mapping[str, Any],
    hashes: Mapping[str, str],
    run: str = "",
    label_maps: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Validate a probe and turn it into the named arrays of ``probe.npz`` (``meta`` last).

    Inputs become float32 ``[B, C, H, W]``, labels int64 ``[B]``, masks bool ``[B, H, W]``
    (non-bool masks are thresholded at 0.5, as the localization scores do), label maps
    (class indices ``[B, H, W]``) int16 where their values fit, else int64: never binarised.
    """
    arrays: dict[str, np.ndarray] = {}
    batch: dict[str, tuple[int, str]] = {}
    label_maps = label_maps or {}
    tables = (
        ("inputs", inputs, 4),
        ("labels", labels, 1),
        ("masks", masks, 3),
        (LABEL_MAPS_ARRAY, label_maps, 3),
    )
    for kind, table, ndim in tables:
        for probe, value in table.items():
            _check_name(probe, "Probe")
            what = f"{kind}[{probe!r}]"
            integer = kind in ("labels", LABEL_MAPS_ARRAY)
            array = _batch_array(value, ndim, what, integer=integer)
            first = batch.setdefault(probe, (array.shape[0], what))
            if first[0] != array.shape[0]:
                raise ValueError(
                    f"Probe {probe!r}: {what} has batch size {array.shape[0]} but {first[1]} "
                    f"has {first[0]}"
                )
            if kind == "inputs":
                array = array.astype(np.float32)
            elif kind == "labels":
                array = array.astype(np.int64)
            elif kind == LABEL_MAPS_ARRAY:
                array = array.astype(_label_map_dtype(array))
            elif array.dtype != np.bool_:
                array = array > 0.5
            arrays[probe_array(kind, probe)] = array
    meta = {
        "format": FORMAT_VERSION,
        "kind": "probe",
        "probes": list(_unique([*inputs, *labels, *masks, *label_maps, *hashes])),
        "hashes": {_check_name(p, "Probe"): str(h) for p, h in hashes.items()},
        "time": _now(),
    }
    if run:
        meta["run"] = str(run)
    arrays[META_ARRAY] = np.array(json.dumps(meta, allow_nan=False))
    return arrays


def probe_from_arrays(contents: Mapping[str, np.ndarray]) -> ProbeRecord:
    """Rebuild a ProbeRecord from ``probe.npz`` arrays; malformed content raises ValueError."""
    meta = read_meta(contents)
    if meta.get("kind") != "probe":
        raise ValueError("'meta' is not a probe description")
    dims = {"inputs": 4, "labels": 1, "masks": 3, LABEL_MAPS_ARRAY: 3}
    tables: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in dims}
    for key, array in contents.items():
        parts = parse_array(key)
        if parts[0] in tables:
            if len(parts) != 2 or array.ndim != dims[parts[0]]:
                raise ValueError(f"malformed entry {key!r} with shape {array.shape}")
            tables[parts[0]][parts[1]] = array
    return ProbeRecord(
        inputs={p: a.astype(np.float32) for p, a in tables["inputs"].items()},
        labels={p: a.astype(np.int64) for p, a in tables["labels"].items()},
        masks={p: a.astype(bool) for p, a in tables["masks"].items()},
        hashes={str(k): str(v) for k, v in meta["hashes"].items()},
        run=run_of(meta),
        label_maps={p: a.astype(np.int64) for p, a in tables[LABEL_MAPS_ARRAY].items()},
    )


# ----------------------------------------------------------------------------- internals


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _map_key(key: object) -> object:
    """A 3-tuple as a `MapKey`; any other key unchanged (the writer refuses it)."""
    if isinstance(key, tuple) and not isinstance(key, MapKey) and len(key) == 3:
        return MapKey(*key)
    return key


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} names must be non-empty strings, got {name!r}")
    return name


def _as_int(value: object, what: str) -> int:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"Evaluation.{what} must be an int, got {value!r}") from None


def _batch_array(array: object, ndim: int, what: str, integer: bool) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got shape {array.shape}")
    kinds = "iu" if integer else "iuf" + ("b" if ndim == 3 else "")
    if array.dtype.kind not in kinds:
        kind = "an integer" if integer else "a real"
        raise ValueError(f"{what} must have {kind} dtype, got {array.dtype}")
    return array


def _label_map_dtype(array: np.ndarray) -> type[np.integer]:
    """int16 for class-index maps whose values fit it (class indices, 255, -100), else int64."""
    info = np.iinfo(np.int16)
    fits = not array.size or (int(array.min()) >= info.min and int(array.max()) <= info.max)
    return np.int16 if fits else np.int64


def _scalar_to_json(value: object, name: str) -> float | str | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"Scalar {name!r} must be a number, got {value!r}") from None
    if math.isnan(number):
        return None
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    return number


def _class_names(value: Any) -> tuple[str, ...] | None:
    """``meta["class_names"]`` as a tuple; None when absent (older files) or not a name list."""
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        return None
    return tuple(value)


def _scalar_from_json(value: Any) -> float:
    return float("nan") if value is None else float(value)


def read_meta(contents: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The JSON `meta` entry of a history file, checked for a format this version reads."""
    if META_ARRAY not in contents:
        raise ValueError(f"no {META_ARRAY!r} entry")
    meta = json.loads(str(contents[META_ARRAY]))
    if not isinstance(meta, dict):
        raise ValueError("'meta' is not a JSON object")
    version = meta.get("format")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise NewerFormatError(
            f"it uses history format {version}, this cam-monitor reads format "
            f"{FORMAT_VERSION}: upgrade cam-monitor."
        )
    if version != FORMAT_VERSION:
        raise ValueError(f"unknown format {version!r}")
    return meta
