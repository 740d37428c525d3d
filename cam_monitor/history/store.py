"""The history on disk: atomic writes, finding a run's history folder, pruning, reading it back.

What the files hold is `cam_monitor.history.format`'s business; this module only decides where
they go, makes every write atomic (temporary file, fsync, rename) and turns damaged files into
a `HistoryError` that names the file and the fix.
"""

from __future__ import annotations

import contextlib
import operator
import os
import secrets
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..schema import (
    META_ARRAY,
    evaluation_file,
    evaluation_index,
    temporary_file,
    temporary_index,
)
from .format import (
    PROBE_FILE,
    Evaluation,
    HistoryError,
    NewerFormatError,
    ProbeRecord,
    evaluation_from_arrays,
    evaluation_to_arrays,
    probe_from_arrays,
    probe_to_arrays,
    read_meta,
    run_of,
)

__all__ = [
    "evaluation_path",
    "find_history",
    "history_runs",
    "prune_from",
    "read_evaluation",
    "read_history",
    "read_probe",
    "write_evaluation",
    "write_probe",
]

# Folders find_history never descends into: they cannot hold a run's history and can be huge.
_SKIP_DIRS = frozenset({"__pycache__", "node_modules", "site-packages"})
_MAX_DEPTH = 8

T = TypeVar("T")
_CORRUPT = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error)


def evaluation_path(folder: str | os.PathLike[str], index: int) -> Path:
    """The file that holds evaluation ``index`` in ``folder`` (it need not exist).

    Example:
        >>> evaluation_path("runs/a/cam_monitor", 7).as_posix()
        'runs/a/cam_monitor/eval-00007.npz'
    """
    index = operator.index(index)
    if index < 0:
        raise ValueError(f"Evaluation index must be >= 0, got {index}")
    return Path(folder) / evaluation_file(index)


def write_evaluation(folder: str | os.PathLike[str], evaluation: Evaluation) -> Path:
    """Write ``evaluation`` atomically to ``folder/eval-{index:05d}.npz`` and return the path.

    Creates the folder; replaces an existing file with the same index written by the same run
    (a resumed run rewrites what came after its checkpoint). A file of another run is never
    replaced: two runs writing into one folder at once raise a `HistoryError` naming both,
    instead of one run's history silently taking the other's place. The data goes to a hidden
    temporary file in the same folder, is fsynced, then renamed, so a crash never leaves a
    partial file under the final name.
    """
    arrays = evaluation_to_arrays(evaluation)
    path = evaluation_path(Path(folder), evaluation.index)
    _check_own(path, evaluation.run)
    return _write_npz_atomically(path, arrays)


def _check_own(path: Path, run: str) -> None:
    """Raise `HistoryError` where ``path`` exists and was written by another run than ``run``."""
    other = _run_in(path)
    if other is not None and other != run:
        raise HistoryError(
            f"{path} was written by run {other or '(no id)'}, not by this run "
            f"{run or '(no id)'}: two training runs are writing into {path.parent}. "
            "Give each run its own save_dir (or logger version)."
        )


def _run_in(path: Path) -> str | None:
    """The run id of an existing, readable history file; None where there is none."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return run_of(read_meta({META_ARRAY: npz[META_ARRAY]}))
    except (NewerFormatError, *_CORRUPT):
        return None


def read_evaluation(path: str | os.PathLike[str]) -> Evaluation:
    """Read one evaluation file; maps come back as float32, targets and labels as int64.

    Raises `HistoryError` naming the file if it is missing, truncated, corrupt or too new.
    """
    path = Path(path)
    if not path.is_file():
        raise HistoryError(f"cam-monitor evaluation file {path} does not exist")
    return _load_npz(
        path,
        evaluation_from_arrays,
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
    found = find_histories(run_dir)
    if len(found) > 1:
        listing = "\n".join(f"  {path}" for path in found)
        raise HistoryError(
            f"Found {len(found)} cam-monitor histories below {run_dir}; pass one of these "
            f"folders instead:\n{listing}"
        )
    return found[0]


def find_histories(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Every folder holding ``eval-*.npz`` files: ``run_dir`` itself, else those below it (a
    run resumed into a new logger version has one per version), sorted; none is a
    `HistoryError` saying where it looked (as `find_history`)."""
    root = Path(run_dir)
    if not root.exists():
        raise HistoryError(f"No cam-monitor history: {root} does not exist")
    if root.is_file():
        if evaluation_index(root.name) is not None:
            return [root.parent]
        raise HistoryError(f"{root} is a file, not a run directory or a cam-monitor history folder")
    if _eval_files(root):
        return [root]
    found, looked = _search(root)
    if found:
        return found
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
        found = evaluation_index(path.name)
        found = temporary_index(path.name) if found is None else found
        if found is not None and found >= index and path.is_file():
            path.unlink()
            deleted.append(path)
    return deleted


def history_runs(folder: str | os.PathLike[str]) -> dict[str, list[int]]:
    """The evaluation indices in ``folder`` by the id of the run that wrote them (``""`` for
    files written before run ids existed; unreadable files are left out). Reads only each
    file's metadata. A missing folder holds no run.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     history_runs(folder)
        {}
    """
    runs: dict[str, list[int]] = {}
    for index, path in _eval_files(Path(folder)):
        run = _run_in(path)
        if run is not None:
            runs.setdefault(run, []).append(index)
    return runs


def write_probe(
    folder: str | os.PathLike[str],
    inputs: Mapping[str, Any],
    labels: Mapping[str, Any],
    masks: Mapping[str, Any],
    hashes: Mapping[str, str],
    run: str = "",
    label_maps: Mapping[str, Any] | None = None,
) -> Path:
    """Write the probe atomically to ``folder/probe.npz`` (replacing that of the same run; that
    of another run raises a `HistoryError`, as `write_evaluation` does) and return the path.

    Inputs become float32 ``[B, C, H, W]``, labels int64 ``[B]``, masks bool ``[B, H, W]``
    (non-bool masks are thresholded at 0.5, as the localization scores do), label maps (class
    indices ``[B, H, W]``) stay class indices.

    Example:
        >>> import tempfile
        >>> x = np.zeros((2, 3, 4, 4), np.float64)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = write_probe(folder, {"val": x}, {"val": np.array([1, 0])}, {}, {"val": "ab"})
        ...     record = read_probe(folder)
        >>> path.name, record.inputs["val"].dtype, record.labels["val"].tolist(), record.hashes
        ('probe.npz', dtype('float32'), [1, 0], {'val': 'ab'})
    """
    arrays = probe_to_arrays(inputs, labels, masks, hashes, run, label_maps)
    path = Path(folder) / PROBE_FILE
    _check_own(path, run)
    return _write_npz_atomically(path, arrays)


def read_probe(folder: str | os.PathLike[str]) -> ProbeRecord | None:
    """Read ``folder/probe.npz``; None when the file does not exist.

    Raises `HistoryError` naming the file if it is truncated, corrupt or too new.
    """
    path = Path(folder) / PROBE_FILE
    if not path.is_file():
        return None
    return _load_npz(
        path,
        probe_from_arrays,
        "probe file",
        ". Delete it: reports then show the maps without images.",
    )


# ----------------------------------------------------------------------------- internals


def _load_npz(path: Path, parse: Callable[[dict[str, np.ndarray]], T], what: str, advice: str) -> T:
    """Load every array of an npz file and parse it; a damaged file becomes a HistoryError."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            contents = {key: npz[key] for key in npz.files}
        return parse(contents)
    except NewerFormatError as exc:
        raise HistoryError(f"Cannot read {path}: {exc}") from exc
    except _CORRUPT as e:
        raise HistoryError(
            f"Cannot read cam-monitor {what} {path}: it is truncated or corrupt "
            f"({type(e).__name__}: {e}){advice}"
        ) from e


def _write_npz_atomically(final: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``arrays`` to a hidden temporary file, fsync, then rename to ``final``.

    Uncompressed: float32 maps and probe images shrink by only 5-20% with zlib, which took 20x
    the time of the write (1 s for a 16-image 224-px probe, on the training thread's CPU).
    """
    folder = final.parent
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / temporary_file(final.name, secrets.token_hex(6))
    # os.open with 0o666 (not mkstemp's 0o600) so the file gets the user's usual permissions.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_folder(folder)
    return final


def _eval_files(folder: Path) -> list[tuple[int, Path]]:
    """The canonical ``eval-{index:05d}.npz`` files of ``folder``, sorted by index."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            index = evaluation_index(entry.name)
            if index is not None and entry.is_file():
                if entry.name == evaluation_file(index):  # not e.g. "eval-000003.npz"
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
