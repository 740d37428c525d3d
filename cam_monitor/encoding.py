"""The grids of an evaluation encoded once each, off the training thread, while drift is scored:
JPEG overlays drawn on a GPU by nvJPEG there (TorchCodec, else torchvision), so only their bytes
cross to the host; the rest by OpenCV on a few threads (it releases the GIL)."""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, Generic, TypeVar

import cv2
import numpy as np
import torch
from torch import Tensor

from .render import (
    IMAGE_SUFFIXES,
    JPEG_QUALITY,
    check_grid,
    encode_grid,
    grid_format,
    to_jpeg_bytes,
)

__all__ = [
    "CPU_ENCODER",
    "GPU_JPEG_TOLERANCE",
    "MAX_ENCODERS",
    "TORCHCODEC",
    "TORCHVISION",
    "EncodedGrid",
    "GridEncoder",
    "JpegBackend",
    "PendingGrids",
    "chroma_subsampling",
    "decoded_difference",
    "encode_grids",
    "encode_jpegs",
    "gpu_jpeg_backend",
]

K = TypeVar("K", bound=Hashable)

#: At most this many encoding threads: an evaluation holds a few grids, and each thread takes a
#: core from training while it encodes.
MAX_ENCODERS = 4
#: `EncodedGrid.encoder` of the grids OpenCV encoded on the CPU.
CPU_ENCODER = "opencv"


@dataclass(frozen=True)
class EncodedGrid:
    """One grid as it is logged: the grid as drawn (`drawn`, uint8 RGB `[3, H, W]`, on the device
    it was drawn on), those pixels encoded as `image_format` ("jpeg" or "png"), and which
    encoder made the bytes (`encoder`: "opencv", "torchcodec" or "torchvision").

    Sinks read `data` for the bytes and `grid` for the pixels, always on the CPU: a grid drawn
    on a GPU is copied once, the first time a sink asks (MLflow takes pixels), so no sink ever
    sees a device. ``encoded`` is None where no sink needs bytes: `data` then encodes on first
    use, with OpenCV."""

    drawn: Tensor
    encoded: bytes | None
    image_format: str
    encoder: str | None = None

    @property
    def grid(self) -> Tensor:
        """The pixels on the CPU: `drawn` itself, or its copy made here once."""
        pixels = self.__dict__.get("_pixels")
        if pixels is None:
            pixels = self.drawn if self.drawn.device.type == "cpu" else self.drawn.cpu()
            object.__setattr__(self, "_pixels", pixels)
        return pixels

    @property
    def data(self) -> bytes:
        """The encoded bytes (encoded here, once, by OpenCV, if they were not)."""
        encoded = self.encoded
        if encoded is None:
            encoded = encode_grid(self.grid, self.image_format)
            object.__setattr__(self, "encoder", CPU_ENCODER)
            object.__setattr__(self, "encoded", encoded)
        return encoded

    @property
    def height(self) -> int:
        return int(self.drawn.shape[1])

    @property
    def width(self) -> int:
        return int(self.drawn.shape[2])

    @property
    def suffix(self) -> str:
        """The file suffix of `image_format` (".jpg", ".png")."""
        return IMAGE_SUFFIXES[self.image_format]


# -- JPEG encoders for grids on a GPU --------------------------------------------------------


@dataclass(frozen=True)
class JpegBackend:
    """A JPEG encoder for grids on a GPU: `encode(grids, quality)` gives each uint8 RGB
    `[3, H, W]` grid's JPEG bytes as a 1-D uint8 tensor on the grid's device, every grid in one
    call where `takes_list`, else one grid a call. It is used for grids on `device_types`
    (CUDA; both also encode CPU tensors, with libjpeg-turbo, which tests use). `requires` is
    what must import for it to run ("module:name")."""

    name: str
    encode: Callable[[list[Tensor], int], list[Tensor]]
    takes_list: bool
    requires: str
    device_types: frozenset[str] = frozenset({"cuda"})


def _torchcodec_jpegs(grids: list[Tensor], quality: int) -> list[Tensor]:
    from torchcodec.encoders import JpegEncoder

    return [JpegEncoder(grid).to_tensor(quality=quality) for grid in grids]


def _torchvision_jpegs(grids: list[Tensor], quality: int) -> list[Tensor]:
    from torchvision.io import encode_jpeg  # also loads the image ops it calls

    # torchvision 0.29 deprecated its codecs for TorchCodec's (here the fallback where that is
    # not installed), and `encode_jpeg` warns at every call. The ops it calls are called here
    # directly: silencing the warning with `warnings.catch_warnings` on the encoder's threads
    # would swap the process's warning filters under the other threads (not thread-safe
    # before Python 3.14). A torchvision without those ops gets `encode_jpeg` itself.
    cuda = grids[0].device.type == "cuda"
    op = getattr(torch.ops.image, "encode_jpegs_cuda" if cuda else "encode_jpeg", None)
    if op is None:
        return list(encode_jpeg(list(grids), quality=quality))
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}.")
    return list(op(list(grids), quality)) if cuda else [op(grid, quality) for grid in grids]


#: TorchCodec's `JpegEncoder` (0.16+): nvJPEG on a CUDA tensor, one grid per encoder; chroma at
#: full resolution (4:4:4) on CUDA, 4:2:0 on the CPU.
TORCHCODEC = JpegBackend("torchcodec", _torchcodec_jpegs, False, "torchcodec.encoders:JpegEncoder")
#: torchvision's `encode_jpeg` (0.19+): nvJPEG on a list of CUDA tensors in one call; 4:4:4 on
#: CUDA, 4:2:0 on the CPU. Deprecated in 0.29.
TORCHVISION = JpegBackend("torchvision", _torchvision_jpegs, True, "torchvision.io:encode_jpeg")

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, message: str) -> None:
    """`message` as a RuntimeWarning, once per process for each `key`."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(f"cam-monitor: {message}", RuntimeWarning, stacklevel=3)


def _load(backend: JpegBackend) -> None:
    """Import what `backend` needs; ModuleNotFoundError or AttributeError where it is absent."""
    module, name = backend.requires.split(":")
    getattr(importlib.import_module(module), name)


@cache
def gpu_jpeg_backend() -> JpegBackend | None:
    """The encoder for JPEG grids on a GPU: TorchCodec where it imports, else torchvision's
    `encode_jpeg`, else None (OpenCV encodes them on the CPU). Looked up once per process, at
    the first such grid; one that is installed but fails to import warns, naming the error.

    Example:
        >>> gpu_jpeg_backend().name in ("torchcodec", "torchvision")
        True
    """
    absent: list[str] = []
    for index, backend in enumerate((TORCHCODEC, TORCHVISION)):
        try:
            _load(backend)
            return backend
        except (ModuleNotFoundError, AttributeError) as err:
            if isinstance(err, ModuleNotFoundError) and not _names_package(err, backend):
                _warn_unloadable(backend, err, index)  # a module *it* needs is missing
            absent.append(f"{backend.name}: {type(err).__name__}: {err}")
        except Exception as err:  # a broken install: a library that does not load
            _warn_unloadable(backend, err, index)
            absent.append(f"{backend.name}: {type(err).__name__}: {err}")
    _warn_once(
        "no-gpu-jpeg",
        f"no JPEG encoder for grids on a GPU could be imported ({'; '.join(absent)}); the CPU "
        "(OpenCV) encodes them instead. `pip install 'cam-monitor[gpu]'` installs TorchCodec.",
    )
    return None


def _names_package(err: ModuleNotFoundError, backend: JpegBackend) -> bool:
    """Whether `err` says the backend's own package is not installed."""
    package = backend.requires.split(":")[0].split(".")[0]
    return (err.name or "").split(".")[0] == package


def _warn_unloadable(backend: JpegBackend, err: Exception, index: int) -> None:
    instead = "torchvision" if index == 0 else "the CPU (OpenCV)"
    _warn_once(
        f"import-{backend.name}",
        f"{backend.name} is installed but cannot be imported ({type(err).__name__}: {err}); "
        f"{instead} encodes JPEG grids drawn on a GPU instead.",
    )


def encode_jpegs(
    grids: Sequence[Tensor], backend: JpegBackend, quality: int = JPEG_QUALITY
) -> list[tuple[bytes, str]]:
    """Each grid's JPEG bytes and the name of the encoder that made them: `backend`, all grids
    in one call where it takes a list (else one a call), and their bytes brought to the host in
    one transfer a call. Where it fails (not importable, nvJPEG missing, any error), OpenCV
    encodes that call's grids on the CPU and one warning per process names the backend and the
    error: no grid is lost. The GPU path of `GridEncoder`, run on one of its threads.

    Example:
        >>> grid = torch.zeros(3, 16, 16, dtype=torch.uint8)  # a CPU tensor: libjpeg-turbo
        >>> [(data[:3], name) for data, name in encode_jpegs([grid, grid], TORCHVISION)]
        [(b'\\xff\\xd8\\xff', 'torchvision'), (b'\\xff\\xd8\\xff', 'torchvision')]
    """
    grids = [check_grid(grid) for grid in grids]
    if not grids:
        return []
    calls = [grids] if backend.takes_list else [[grid] for grid in grids]
    out: list[tuple[bytes, str]] = []
    for call in calls:
        try:
            encoded = backend.encode(call, quality)
            if len(encoded) != len(call):
                raise RuntimeError(f"{len(encoded)} JPEG images back for {len(call)} grids")
            out += [(data, backend.name) for data in _host_bytes(encoded)]
        except Exception as err:
            _warn_once(
                f"failed-{backend.name}",
                f"JPEG encoding with {backend.name} failed ({type(err).__name__}: {err}); the CPU "
                "(OpenCV) encodes the grids it cannot, as it does without a GPU.",
            )
            out += [(to_jpeg_bytes(grid, quality), CPU_ENCODER) for grid in call]
    return out


def _host_bytes(encoded: Sequence[Tensor]) -> list[bytes]:
    """Encoded 1-D uint8 tensors as bytes, copied to the host in one transfer."""
    flat = torch.cat([tensor.reshape(-1) for tensor in encoded]).cpu().numpy()
    out, start = [], 0
    for tensor in encoded:
        out.append(flat[start : start + tensor.numel()].tobytes())
        start += tensor.numel()
    return out


#: How far a JPEG grid from a GPU encoder may decode from OpenCV's (mean absolute difference over
#: its pixels, in levels of 0-255; `decoded_difference`). TorchCodec's and torchvision's CPU paths
#: (libjpeg-turbo, chroma 4:2:0) measured 3.4-3.5 on 614 x 522 overlay grids, where OpenCV's
#: (4:4:4) is 2.1 from the drawn pixels; quality 75 measured 5.4, swapped channels 55. Their
#: nvJPEG paths ask for 4:4:4, as OpenCV here (their sources; not yet measured on a GPU).
GPU_JPEG_TOLERANCE = 5.0


def decoded_difference(a: bytes | Tensor, b: bytes | Tensor) -> tuple[float, int]:
    """The mean and the largest absolute difference between two images, each encoded bytes
    (decoded by OpenCV) or uint8 RGB `[3, H, W]` pixels: how far two encodings of a grid are.

    Example:
        >>> grid = torch.full((3, 16, 16), 128, dtype=torch.uint8)
        >>> decoded_difference(to_jpeg_bytes(grid), grid)
        (0.0, 0)
    """
    first, second = _pixels(a), _pixels(b)
    if first.shape != second.shape:
        raise ValueError(f"the images differ in size: {tuple(first.shape)}, {tuple(second.shape)}")
    difference = (first.short() - second.short()).abs()
    return float(difference.float().mean()), int(difference.max())


def _pixels(image: bytes | Tensor) -> Tensor:
    if isinstance(image, Tensor):
        return check_grid(image).cpu()
    bgr = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("OpenCV could not decode these bytes")
    return torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1])).permute(2, 0, 1)


def chroma_subsampling(data: bytes) -> str:
    """The chroma subsampling of JPEG `data`: "4:4:4", "4:2:2", "4:2:0", or "gray" (from its
    frame header), to tell what an encoder did.

    Example:
        >>> chroma_subsampling(to_jpeg_bytes(torch.zeros(3, 8, 8, dtype=torch.uint8)))
        '4:4:4'
    """
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker, length = data[at + 1], int.from_bytes(data[at + 2 : at + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            components = data[at + 9]
            if components == 1:
                return "gray"
            factors = [data[at + 11 + 3 * c] for c in range(components)]
            h, v = factors[0] >> 4, factors[0] & 0x0F
            if any(f != 0x11 for f in factors[1:]):
                return f"other ({', '.join(hex(f) for f in factors)})"
            return {(1, 1): "4:4:4", (2, 1): "4:2:2", (2, 2): "4:2:0"}.get((h, v), f"{h}x{v}")
        at += 2 + length
    raise ValueError("no JPEG frame header found in the data")


# -- the encoder the monitor runs -------------------------------------------------------------


#: A piece of an evaluation's encoding: the keys it encodes and the call that does it.
_Task = tuple[list[Any], Callable[[], list[EncodedGrid]]]


def _tasks(
    grids: Mapping[Any, Tensor], image_format: str, backend: JpegBackend | None
) -> list[_Task]:
    """How an evaluation's grids are encoded: the JPEG grids on a GPU in one task per device
    (first, so nvJPEG starts at once), every other grid by OpenCV in a task of its own. Each
    task waits for the drawing of its grids first (an event recorded here, on the drawing
    thread's stream): the encoders read them on other threads and streams."""
    ready: dict[torch.device, Callable[[], None]] = {}
    on_gpu: dict[tuple[torch.device, JpegBackend], list[Any]] = {}
    tasks: list[_Task] = []
    for key, grid in grids.items():
        image_format_of_key = grid_format(key, image_format)
        device = grid.device
        if device not in ready:
            ready[device] = _drawn(device)
        chosen = _backend_for(device, backend) if image_format_of_key == "jpeg" else None
        if chosen is not None:
            on_gpu.setdefault((device, chosen), []).append(key)
        else:
            encode = partial(_encode_on_cpu, grid, image_format_of_key, ready[device])
            tasks.append(([key], encode))
    batches: list[_Task] = [
        (keys, partial(_encode_on_gpu, [grids[key] for key in keys], chosen, ready[device]))
        for (device, chosen), keys in on_gpu.items()
    ]
    return batches + tasks


def _backend_for(device: torch.device, backend: JpegBackend | None) -> JpegBackend | None:
    """The JPEG encoder for a grid on `device`: `backend` where given and it serves that
    device type, else the GPU encoder for a CUDA grid (`gpu_jpeg_backend`), else None."""
    if backend is not None:
        return backend if device.type in backend.device_types else None
    return gpu_jpeg_backend() if device.type == "cuda" else None


def _drawn(device: torch.device) -> Callable[[], None]:
    """A call that waits until the work queued so far on `device`'s current stream is done."""
    if device.type != "cuda":
        return _nothing
    event = torch.cuda.Event(blocking=True)  # the waiting thread sleeps: no core spun
    event.record(torch.cuda.current_stream(device))
    return event.synchronize


def _nothing() -> None:
    return None


def _encode_on_gpu(
    grids: list[Tensor], backend: JpegBackend, ready: Callable[[], None]
) -> list[EncodedGrid]:
    ready()
    encoded = encode_jpegs(grids, backend)
    return [
        EncodedGrid(grid, data, "jpeg", name)
        for grid, (data, name) in zip(grids, encoded, strict=True)
    ]


def _encode_on_cpu(grid: Tensor, image_format: str, ready: Callable[[], None]) -> list[EncodedGrid]:
    ready()
    pixels = grid if grid.device.type == "cpu" else grid.cpu()
    image = EncodedGrid(grid, encode_grid(pixels, image_format), image_format, CPU_ENCODER)
    object.__setattr__(image, "_pixels", pixels)  # a pixel sink finds the copy made
    return [image]


def encode_grids(
    grids: Mapping[K, Tensor], image_format: str, *, backend: JpegBackend | None = None
) -> dict[K, EncodedGrid]:
    """Every grid encoded on this thread: overlays as `image_format`, the rest as PNG
    (`render.grid_format`); JPEG grids on a GPU by `backend` (default: `gpu_jpeg_backend`).
    What `GridEncoder` does on its threads.

    Example:
        >>> from cam_monitor.schema import MapKey
        >>> key = MapKey("val", "layer4", "gradcam")
        >>> encoded = encode_grids({key: torch.zeros(3, 4, 4, dtype=torch.uint8)}, "jpeg")
        >>> encoded[key].image_format, encoded[key].encoder, encoded[key].data[:3]
        ('jpeg', 'opencv', b'\\xff\\xd8\\xff')
    """
    found: dict[Any, EncodedGrid] = {}
    for keys, encode in _tasks(grids, image_format, backend):
        found.update(zip(keys, encode(), strict=True))
    return {key: found[key] for key in grids}


def _done(grid: Tensor, image_format: str) -> Future[list[EncodedGrid]]:
    """A finished future holding ``grid`` not encoded (`EncodedGrid.data` encodes on use)."""
    future: Future[list[EncodedGrid]] = Future()
    future.set_result([EncodedGrid(grid, None, image_format)])
    return future


class PendingGrids(Generic[K]):
    """Grids being encoded: `result()` waits for them, `cancel()` drops those not started."""

    def __init__(
        self, keys: Sequence[K], batches: Sequence[tuple[list[K], Future[list[EncodedGrid]]]]
    ) -> None:
        self._keys = list(keys)
        self._batches = list(batches)

    def result(self) -> dict[K, EncodedGrid]:
        """The encoded grids by key, in the order given; the first encoding error is raised
        once every grid is done (no thread is left busy with this evaluation)."""
        for _, future in self._batches:
            future.exception()  # waits
        found: dict[K, EncodedGrid] = {}
        for keys, future in self._batches:
            found.update(zip(keys, future.result(), strict=True))
        return {key: found[key] for key in self._keys}

    def cancel(self) -> None:
        for _, future in self._batches:
            future.cancel()


class GridEncoder:
    """Encodes grids on up to `max_workers` threads (default: `MAX_ENCODERS`, at most one per
    CPU core), started as grids arrive and stopped by `close`; the next `submit` starts them
    again, and a pickled or copied encoder (``ddp_spawn``) starts with none.

    JPEG grids on a CUDA device are encoded there, all of an evaluation's in one task, by
    `jpeg_backend` (default: `gpu_jpeg_backend`, looked up at the first such grid): only their
    bytes come to the host (`EncodedGrid.grid` copies the pixels if a sink asks). PNG grids
    and grids on the CPU go to OpenCV, one thread each; a GPU encoder that fails hands its
    grids to OpenCV too, with one warning (`encode_jpegs`).

    Example:
        >>> encoder = GridEncoder()
        >>> pending = encoder.submit({"a": torch.zeros(3, 4, 4, dtype=torch.uint8)}, "png")
        >>> pending.result()["a"].data[:4]
        b'\\x89PNG'
        >>> encoder.close()
    """

    def __init__(
        self, max_workers: int | None = None, jpeg_backend: JpegBackend | None = None
    ) -> None:
        if max_workers is None:
            max_workers = min(MAX_ENCODERS, os.cpu_count() or 1)
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"`max_workers` must be an int >= 1, got {max_workers!r}.")
        self.max_workers = max_workers
        self.jpeg_backend = jpeg_backend
        self._pool: ThreadPoolExecutor | None = None

    def submit(
        self, grids: Mapping[K, Tensor], image_format: str, *, encode: bool = True
    ) -> PendingGrids[K]:
        """Start encoding every grid (overlays as `image_format`, the rest as PNG) and return
        at once. With ``encode=False`` (no sink needs bytes) nothing is encoded and no thread
        starts: the grids come back as pixels, where they were drawn."""
        if not encode:
            return PendingGrids(list(grids), [([key], _done(grid, grid_format(key, image_format)))
                                              for key, grid in grids.items()])  # fmt: skip
        tasks = _tasks(grids, image_format, self.jpeg_backend)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix=THREAD_PREFIX)
        pool = self._pool
        return PendingGrids(list(grids), [(keys, pool.submit(task)) for keys, task in tasks])

    def close(self) -> None:
        """Drop queued grids, wait for those being encoded and stop the threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def __getstate__(self) -> dict[str, Any]:
        return {"max_workers": self.max_workers, "jpeg_backend": self.jpeg_backend}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.max_workers = state["max_workers"]
        self.jpeg_backend = state.get("jpeg_backend")
        self._pool = None


#: The names of the encoding threads start with this.
THREAD_PREFIX = "cam-monitor-encode"
