"""Raw CAMs written to disk once per evaluation, read back later to compare runs.

On-disk format (version 1), readable with numpy and the standard library alone:

A history is one folder (the run's ``cam_monitor/`` folder) holding one file per evaluation,
``eval-{index:05d}.npz`` (``eval-00000.npz``, ``eval-00001.npz``, ...; an index above 99999
simply gets more digits), written with ``np.savez_compressed``. Any other file in the folder is
ignored by the readers, in particular the hidden temporary files ``.eval-*.npz.*.tmp`` that a
write killed half-way leaves behind (files are written to a temporary name, fsynced, then
renamed with ``os.replace``, so a file with the final name is always complete).

Arrays in each file, keyed by name (``np.load(path)[key]``):

- ``maps/{probe}/{layer}/{method}``: float32 ``[B, h, w]``, the raw CAM at layer resolution
  (not normalised), NaN and +-inf kept. Raw Grad-CAM values are often 1e-4 or smaller, where
  float16 would lose most of its precision, so maps stay float32 (they are small at layer
  resolution, and compressed).
- ``targets/{probe}``: int64 ``[B]``, the class each CAM explains.
- ``logits/{probe}``: float32 ``[B, C]``, the model's logits on the probe.
- ``labels/{probe}``: int64 ``[B]``, the ground-truth labels, only for probes that have them.
- ``meta``: a 0-d numpy unicode string holding JSON (``json.loads(str(f["meta"]))``)::

      {"format": 1, "index": int, "epoch": int, "step": int,
       "probe_hashes": {probe: str}, "probes": [...], "layers": [...], "methods": [...],
       "scalars": {name: float | null | "inf" | "-inf"}, "time": ISO-8601 UTC string}

  ``probes``, ``layers`` and ``methods`` are in first-appearance order (the order the caller
  inserted the maps). Non-finite scalars are not valid JSON numbers, so NaN is written as
  ``null`` and +-inf as the strings ``"inf"`` / ``"-inf"`` (``float(x)`` reads both back).

Key encoding: each name component (probe, layer, method) is stored verbatim, except that the
characters ``%``, ``/``, ``\\`` and ASCII control characters are written as ``%XX`` (their hex
code), so a ``/`` inside a name cannot be mistaken for a separator; ``urllib.parse.unquote``
decodes a component. Names such as ``source``, ``features.29``, ``layer4.1.conv2`` and
``gradcam++`` therefore appear unchanged: ``maps/source/features.29/gradcam++``.

The probe (format 1), stored once per run as ``probe.npz`` in the same folder so reports can
draw overlays, written atomically in the same way (`write_probe`, `read_probe`):

- ``inputs/{probe}``: float32 ``[B, C, H, W]``, the model inputs as the model saw them.
- ``labels/{probe}``: int64 ``[B]``, only for probes that have labels.
- ``masks/{probe}``: bool ``[B, H, W]``, only for probes that have localization masks.
- ``meta``: JSON ``{"format": 1, "kind": "probe", "probes": [...], "hashes": {probe: str},
  "time": ISO-8601 UTC string}``; ``hashes`` are the `Evaluation.probe_hashes` of the run.

Example (reading with numpy alone):
    >>> import json, tempfile
    >>> import numpy as np
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

import contextlib
import hashlib
import json
import math
import operator
import os
import re
import secrets
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "PROBE_FILE",
    "Evaluation",
    "HistoryError",
    "ProbeRecord",
    "evaluation_path",
    "find_history",
    "probe_hash",
    "prune_from",
    "read_evaluation",
    "read_history",
    "read_probe",
    "write_evaluation",
    "write_probe",
]

FORMAT_VERSION = 1
#: Name of the file holding a run's probe, next to its ``eval-*.npz`` files.
PROBE_FILE = "probe.npz"
_EVAL_RE = re.compile(r"eval-(\d{5,})\.npz")
_TEMP_RE = re.compile(r"\.eval-(\d{5,})\.npz\.[0-9a-f]+\.tmp")
_KINDS = ("targets", "logits", "labels")
# Folders find_history never descends into: they cannot hold a run's history and can be huge.
_SKIP_DIRS = frozenset({"__pycache__", "node_modules", "site-packages"})
_MAX_DEPTH = 8


class HistoryError(ValueError):
    """A cam-monitor history is missing, ambiguous, or holds an unreadable evaluation file."""


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Everything one evaluation produced: raw maps keyed (probe, layer, method), targets,
    logits, optional labels and scalar curves. ``time`` (ISO-8601) is stamped at write if None.

    Compared by identity (``eq=False``): its fields hold numpy arrays.
    """

    index: int
    epoch: int
    step: int
    probe_hashes: dict[str, str]
    maps: dict[tuple[str, str, str], np.ndarray]
    targets: dict[str, np.ndarray]
    logits: dict[str, np.ndarray]
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    time: str | None = None

    @property
    def probes(self) -> tuple[str, ...]:
        """Probe names in first-appearance order: maps, then targets, logits, labels."""
        names = [p for p, _, _ in self.maps]
        for kind in (self.targets, self.logits, self.labels):
            names.extend(kind)
        return _unique(names)

    @property
    def layers(self) -> tuple[str, ...]:
        """Layer names in the order their first map was inserted."""
        return _unique(layer for _, layer, _ in self.maps)

    @property
    def methods(self) -> tuple[str, ...]:
        """Method names in the order their first map was inserted."""
        return _unique(method for _, _, method in self.maps)

    def __repr__(self) -> str:
        return (
            f"Evaluation(index={self.index}, epoch={self.epoch}, step={self.step}, "
            f"probes={self.probes}, layers={self.layers}, methods={self.methods}, "
            f"scalars={self.scalars})"
        )


def evaluation_path(folder: str | os.PathLike[str], index: int) -> Path:
    """The file that holds evaluation ``index`` in ``folder`` (it need not exist).

    Example:
        >>> evaluation_path("runs/a/cam_monitor", 7).as_posix()
        'runs/a/cam_monitor/eval-00007.npz'
    """
    index = operator.index(index)
    if index < 0:
        raise ValueError(f"Evaluation index must be >= 0, got {index}")
    return Path(folder) / f"eval-{index:05d}.npz"


def write_evaluation(folder: str | os.PathLike[str], evaluation: Evaluation) -> Path:
    """Write ``evaluation`` atomically to ``folder/eval-{index:05d}.npz`` and return the path.

    Creates the folder; replaces an existing file with the same index. The data goes to a hidden
    temporary file in the same folder, is fsynced, then renamed, so a crash never leaves a
    partial file under the final name.
    """
    arrays = _to_arrays(evaluation)
    return _write_npz_atomically(evaluation_path(Path(folder), evaluation.index), arrays)


def read_evaluation(path: str | os.PathLike[str]) -> Evaluation:
    """Read one evaluation file; maps come back as float32, targets and labels as int64.

    Raises `HistoryError` naming the file if it is missing, truncated, corrupt or too new.
    """
    path = Path(path)
    if not path.is_file():
        raise HistoryError(f"cam-monitor evaluation file {path} does not exist")
    return _load_npz(
        path,
        _from_arrays,
        "evaluation",
        ", e.g. the run was killed while the disk was full. Delete the file, or pass "
        "strict=False to read_history to skip it.",
    )


def read_history(folder: str | os.PathLike[str], strict: bool = True) -> list[Evaluation]:
    """Read every ``eval-*.npz`` in ``folder``, sorted by index.

    An unreadable file raises `HistoryError`; with ``strict=False`` it is skipped with a warning.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise HistoryError(
            f"No cam-monitor history in {folder}: the folder {what}. Pass the folder CamMonitor "
            "wrote its eval-*.npz files to, or a run directory to find_history()."
        )
    files = _eval_files(folder)
    if not files:
        raise HistoryError(
            f"No cam-monitor history in {folder}: expected eval-*.npz files written by "
            "CamMonitor. If they are in a subfolder, find_history(run_dir) locates it."
        )
    history: list[Evaluation] = []
    for index, path in files:
        try:
            evaluation = read_evaluation(path)
            if evaluation.index != index:
                raise HistoryError(
                    f"Cannot use {path}: its name says evaluation {index} but its metadata "
                    f"says {evaluation.index} (was it renamed or copied?). Rename it to "
                    f"{evaluation_path(folder, evaluation.index).name} or delete it, or pass "
                    "strict=False to skip it."
                )
        except HistoryError as exc:
            if strict:
                raise
            warnings.warn(f"Skipping unreadable {path} (strict=False): {exc}", stacklevel=2)
            continue
        history.append(evaluation)
    if not history:
        raise HistoryError(
            f"No readable cam-monitor evaluation in {folder}: all {len(files)} eval-*.npz "
            "files are unreadable (see the warnings above)."
        )
    return history


def find_history(run_dir: str | os.PathLike[str]) -> Path:
    """Return the folder holding ``eval-*.npz`` files: ``run_dir`` itself or one folder below it.

    Searches up to 8 levels down, skipping hidden folders and not following symlinks (so W&B's
    ``latest-run`` link is not counted twice). Zero or several matches raise `HistoryError`.
    """
    root = Path(run_dir)
    if not root.exists():
        raise HistoryError(f"No cam-monitor history: {root} does not exist")
    if root.is_file():
        if _EVAL_RE.fullmatch(root.name):
            return root.parent
        raise HistoryError(f"{root} is a file, not a run directory or a cam-monitor history folder")
    if _eval_files(root):
        return root
    found, looked = _search(root)
    if len(found) == 1:
        return found[0]
    if found:
        listing = "\n".join(f"  {path}" for path in found)
        raise HistoryError(
            f"Found {len(found)} cam-monitor histories below {root}; pass one of these "
            f"folders instead:\n{listing}"
        )
    shown = [str(root)] + [str(p.relative_to(root)) for p in looked[:20]]
    more = f", ... ({len(looked) - 20} more)" if len(looked) > 20 else ""
    raise HistoryError(
        f"No cam-monitor history (eval-*.npz files written by CamMonitor) in {root} or the "
        f"{len(looked)} folders below it (up to {_MAX_DEPTH} levels, hidden folders and "
        f"symlinks skipped). Looked in: {', '.join(shown)}{more}"
    )


def prune_from(folder: str | os.PathLike[str], index: int) -> list[Path]:
    """Delete the evaluations numbered ``index`` and above, and their leftover temporary files.

    Used when a run resumes from a checkpoint, so the history holds no stale evaluations.
    Returns the deleted paths, sorted; a missing folder deletes nothing.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     for i in range(3):
        ...         _ = evaluation_path(folder, i).write_bytes(b"")
        ...     [p.name for p in prune_from(folder, 1)]
        ['eval-00001.npz', 'eval-00002.npz']
    """
    index = operator.index(index)
    if index < 0:
        raise ValueError(f"prune_from needs an index >= 0, got {index}")
    folder = Path(folder)
    if not folder.is_dir():
        return []
    deleted: list[Path] = []
    for path in sorted(folder.iterdir()):
        match = _EVAL_RE.fullmatch(path.name) or _TEMP_RE.fullmatch(path.name)
        if match and int(match.group(1)) >= index and path.is_file():
            path.unlink()
            deleted.append(path)
    return deleted


def probe_hash(arrays: Sequence[np.ndarray] | np.ndarray) -> str:
    """A 12-hex-digit SHA-256 of the probe's arrays (dtype, shape and bytes, in order).

    Byte order is normalised to little-endian, so equal data hashes equally on any machine.
    A single array is hashed as a one-element sequence.

    Example:
        >>> x = np.arange(6, dtype=np.float32).reshape(2, 3)
        >>> probe_hash([x]) == probe_hash([x.copy()]) != probe_hash([x.astype(np.float64)])
        True
        >>> len(probe_hash([x]))
        12
    """
    if isinstance(arrays, np.ndarray):
        arrays = [arrays]
    digest = hashlib.sha256(b"cam-monitor probe v1\n")
    for item in arrays:
        array = np.asarray(item)
        if array.dtype.hasobject:
            raise TypeError(f"probe_hash needs numeric arrays, got dtype {array.dtype}")
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        header = f"{array.dtype.str}|{list(array.shape)}|{array.nbytes}\n"
        digest.update(header.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:12]


@dataclass(frozen=True, eq=False)
class ProbeRecord:
    """A run's probe as stored in ``probe.npz``: inputs, labels and masks per probe name, and
    the probe hashes. Compared by identity (``eq=False``): its fields hold numpy arrays.
    """

    inputs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def probes(self) -> tuple[str, ...]:
        """Probe names in first-appearance order: inputs, then labels, masks, hashes."""
        return _unique([*self.inputs, *self.labels, *self.masks, *self.hashes])


def write_probe(
    folder: str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    masks: Mapping[str, np.ndarray],
    hashes: Mapping[str, str],
) -> Path:
    """Write the probe atomically to ``folder/probe.npz`` (replacing it) and return the path.

    Inputs become float32 ``[B, C, H, W]``, labels int64 ``[B]``, masks bool ``[B, H, W]``
    (non-bool masks are thresholded at 0.5, as the localization scores do).

    Example:
        >>> import tempfile
        >>> x = np.zeros((2, 3, 4, 4), np.float64)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = write_probe(folder, {"val": x}, {"val": np.array([1, 0])}, {}, {"val": "ab"})
        ...     record = read_probe(folder)
        >>> path.name, record.inputs["val"].dtype, record.labels["val"].tolist(), record.hashes
        ('probe.npz', dtype('float32'), [1, 0], {'val': 'ab'})
    """
    arrays: dict[str, np.ndarray] = {}
    batch: dict[str, tuple[int, str]] = {}
    tables = (("inputs", inputs, 4), ("labels", labels, 1), ("masks", masks, 3))
    for kind, table, ndim in tables:
        for probe, value in table.items():
            _check_name(probe, "Probe")
            what = f"{kind}[{probe!r}]"
            array = _batch_array(value, ndim, what, integer=kind == "labels")
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
            elif array.dtype != np.bool_:
                array = array > 0.5
            arrays[f"{kind}/{_encode(probe)}"] = array
    names = _unique([*inputs, *labels, *masks, *hashes])
    meta = {
        "format": FORMAT_VERSION,
        "kind": "probe",
        "probes": list(names),
        "hashes": {_check_name(p, "Probe"): str(h) for p, h in hashes.items()},
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    arrays["meta"] = np.array(json.dumps(meta, allow_nan=False))
    return _write_npz_atomically(Path(folder) / PROBE_FILE, arrays)


def read_probe(folder: str | os.PathLike[str]) -> ProbeRecord | None:
    """Read ``folder/probe.npz``; None when the file does not exist.

    Raises `HistoryError` naming the file if it is truncated, corrupt or too new.
    """
    path = Path(folder) / PROBE_FILE
    if not path.is_file():
        return None
    return _load_npz(
        path,
        _probe_from_arrays,
        "probe file",
        ". Delete it: reports then show the maps without images.",
    )


# ----------------------------------------------------------------------------- internals

T = TypeVar("T")
_CORRUPT = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error)


def _load_npz(path: Path, parse: Callable[[dict[str, np.ndarray]], T], what: str, advice: str) -> T:
    """Load every array of an npz file and parse it; a damaged file becomes a HistoryError."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            contents = {key: npz[key] for key in npz.files}
        return parse(contents)
    except _NewerFormat as exc:
        raise HistoryError(f"Cannot read {path}: {exc}") from exc
    except _CORRUPT as e:
        raise HistoryError(
            f"Cannot read cam-monitor {what} {path}: it is truncated or corrupt "
            f"({type(e).__name__}: {e}){advice}"
        ) from e


def _write_npz_atomically(final: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``arrays`` compressed to a hidden temporary file, fsync, then rename to ``final``."""
    folder = final.parent
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{final.name}.{secrets.token_hex(6)}.tmp"
    # os.open with 0o666 (not mkstemp's 0o600) so the file gets the user's usual permissions.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_folder(folder)
    return final


def _probe_from_arrays(contents: dict[str, np.ndarray]) -> ProbeRecord:
    """Rebuild a ProbeRecord from ``probe.npz`` arrays; malformed content raises ValueError."""
    meta = _read_meta(contents)
    if meta.get("kind") != "probe":
        raise ValueError("'meta' is not a probe description")
    tables: dict[str, dict[str, np.ndarray]] = {"inputs": {}, "labels": {}, "masks": {}}
    dims = {"inputs": 4, "labels": 1, "masks": 3}
    for key, array in contents.items():
        parts = [unquote(part) for part in key.split("/")]
        if parts[0] in tables:
            if len(parts) != 2 or array.ndim != dims[parts[0]]:
                raise ValueError(f"malformed entry {key!r} with shape {array.shape}")
            tables[parts[0]][parts[1]] = array
    return ProbeRecord(
        inputs={p: a.astype(np.float32) for p, a in tables["inputs"].items()},
        labels={p: a.astype(np.int64) for p, a in tables["labels"].items()},
        masks={p: a.astype(bool) for p, a in tables["masks"].items()},
        hashes={str(k): str(v) for k, v in meta["hashes"].items()},
    )


class _NewerFormat(Exception):
    """The file was written by a newer cam-monitor than this one."""


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _encode(name: str) -> str:
    return "".join(
        f"%{ord(ch):02X}" if ch in "%/\\" or ord(ch) < 32 or ord(ch) == 127 else ch for ch in name
    )


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


def _to_arrays(ev: Evaluation) -> dict[str, np.ndarray]:
    """Validate ``ev`` and turn it into the named arrays of one file (``meta`` last)."""
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
        if not (isinstance(key, tuple) and len(key) == 3):
            raise ValueError(f"Evaluation.maps keys must be (probe, layer, method), got {key!r}")
        probe, layer, method = (
            _check_name(n, w) for n, w in zip(key, ("Probe", "Layer", "Method"), strict=True)
        )
        what = f"maps[{key!r}]"
        array = _batch_array(array, 3, what, integer=False)
        check_batch(probe, array.shape[0], what)
        arrays[f"maps/{_encode(probe)}/{_encode(layer)}/{_encode(method)}"] = np.asarray(
            array, dtype=np.float32
        )
    for kind in ("targets", "logits"):
        table: Mapping[str, np.ndarray] = getattr(ev, kind)
        missing = [p for p in _unique(p for p, _, _ in ev.maps) if p not in table]
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
            arrays[f"{kind}/{_encode(probe)}"] = array.astype(dtype)
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
        "time": ev.time or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    arrays["meta"] = np.array(json.dumps(meta, allow_nan=False))
    return arrays


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


def _scalar_from_json(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _read_meta(contents: dict[str, np.ndarray]) -> dict[str, Any]:
    """The JSON `meta` entry of a history file, checked for a format this version reads."""
    if "meta" not in contents:
        raise ValueError("no 'meta' entry")
    meta = json.loads(str(contents["meta"]))
    if not isinstance(meta, dict):
        raise ValueError("'meta' is not a JSON object")
    version = meta.get("format")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise _NewerFormat(
            f"it uses history format {version}, this cam-monitor reads format "
            f"{FORMAT_VERSION}: upgrade cam-monitor."
        )
    if version != FORMAT_VERSION:
        raise ValueError(f"unknown format {version!r}")
    return meta


def _from_arrays(contents: dict[str, np.ndarray]) -> Evaluation:
    """Rebuild an Evaluation from a file's arrays; malformed content raises ValueError."""
    meta = _read_meta(contents)
    maps: dict[tuple[str, str, str], np.ndarray] = {}
    tables: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in _KINDS}
    for key, array in contents.items():
        parts = [unquote(part) for part in key.split("/")]
        if parts[0] == "maps":
            if len(parts) != 4 or array.ndim != 3:
                raise ValueError(f"malformed map entry {key!r} with shape {array.shape}")
            maps[parts[1], parts[2], parts[3]] = array.astype(np.float32)
        elif parts[0] in tables:
            if len(parts) != 2:
                raise ValueError(f"malformed entry {key!r}")
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
    )


def _eval_files(folder: Path) -> list[tuple[int, Path]]:
    """The canonical ``eval-{index:05d}.npz`` files of ``folder``, sorted by index."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = _EVAL_RE.fullmatch(entry.name)
            if match and entry.is_file():
                index = int(match.group(1))
                if entry.name == f"eval-{index:05d}.npz":  # not e.g. "eval-000003.npz"
                    found.append((index, Path(entry.path)))
    return sorted(found)


def _search(root: Path) -> tuple[list[Path], list[Path]]:
    """Folders below ``root`` that hold eval files, and every folder looked at."""
    found: list[Path] = []
    looked: list[Path] = []
    base_depth = len(root.parts)
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if here != root:
            looked.append(here)
            if _eval_files(here):
                found.append(here)
                dirnames[:] = []
                continue
        keep = len(here.parts) - base_depth < _MAX_DEPTH
        dirnames[:] = sorted(
            d for d in dirnames if keep and not d.startswith(".") and d not in _SKIP_DIRS
        )
    return sorted(found), looked


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
