"""The grids of an evaluation encoded once each, on a few threads, while drift is scored.

OpenCV's `imencode` releases the GIL, so a small thread pool encodes the grids side by side
and alongside the training thread, which goes on to score drift (`AttentionTracker.score`);
every sink then gets the same bytes and none encodes again.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from torch import Tensor

from .render import IMAGE_SUFFIXES, encode_grid, grid_format

__all__ = ["MAX_ENCODERS", "EncodedGrid", "GridEncoder", "PendingGrids", "encode_grids"]

K = TypeVar("K", bound=Hashable)

#: At most this many encoding threads: an evaluation holds a few grids, and each thread takes a
#: core from training while it encodes.
MAX_ENCODERS = 4


@dataclass(frozen=True)
class EncodedGrid:
    """One grid as it is logged: its pixels (uint8 RGB `[3, H, W]`, CPU) and those encoded as
    `image_format` ("jpeg" or "png"). ``encoded`` is None where no sink needs bytes (MLflow
    takes pixels): `data` then encodes on first use."""

    grid: Tensor
    encoded: bytes | None
    image_format: str

    @property
    def data(self) -> bytes:
        """The encoded bytes (encoded here, once, if they were not)."""
        encoded = self.encoded
        if encoded is None:
            encoded = encode_grid(self.grid, self.image_format)
            object.__setattr__(self, "encoded", encoded)
        return encoded

    @property
    def height(self) -> int:
        return int(self.grid.shape[1])

    @property
    def width(self) -> int:
        return int(self.grid.shape[2])

    @property
    def suffix(self) -> str:
        """The file suffix of `image_format` (".jpg", ".png")."""
        return IMAGE_SUFFIXES[self.image_format]


def encode_grids(grids: Mapping[K, Tensor], image_format: str) -> dict[K, EncodedGrid]:
    """Every grid encoded on this thread: overlays as `image_format`, the rest as PNG
    (`render.grid_format`). What `GridEncoder` does on its threads.

    Example:
        >>> import torch
        >>> from cam_monitor.schema import MapKey
        >>> key = MapKey("val", "layer4", "gradcam")
        >>> encoded = encode_grids({key: torch.zeros(3, 4, 4, dtype=torch.uint8)}, "jpeg")
        >>> encoded[key].image_format, encoded[key].data[:3]
        ('jpeg', b'\\xff\\xd8\\xff')
    """
    return {key: _encode(grid, grid_format(key, image_format)) for key, grid in grids.items()}


def _encode(grid: Tensor, image_format: str) -> EncodedGrid:
    return EncodedGrid(grid, encode_grid(grid, image_format), image_format)


def _done(grid: Tensor, image_format: str) -> Future[EncodedGrid]:
    """A finished future holding ``grid`` not encoded (`EncodedGrid.data` encodes on use)."""
    future: Future[EncodedGrid] = Future()
    future.set_result(EncodedGrid(grid, None, image_format))
    return future


class PendingGrids(Generic[K]):
    """Grids being encoded: `result()` waits for them, `cancel()` drops those not started."""

    def __init__(self, futures: Mapping[K, Future[EncodedGrid]]) -> None:
        self._futures = dict(futures)

    def result(self) -> dict[K, EncodedGrid]:
        """The encoded grids by key, in the order given; the first encoding error is raised
        once every grid is done (no thread is left busy with this evaluation)."""
        for future in self._futures.values():
            future.exception()  # waits
        return {key: future.result() for key, future in self._futures.items()}

    def cancel(self) -> None:
        for future in self._futures.values():
            future.cancel()


class GridEncoder:
    """Encodes grids on up to `max_workers` threads (default: `MAX_ENCODERS`, at most one per
    CPU core), started as grids arrive and stopped by `close`; the next `submit` starts them
    again, and a pickled or copied encoder (``ddp_spawn``) starts with none.

    Example:
        >>> import torch
        >>> encoder = GridEncoder()
        >>> pending = encoder.submit({"a": torch.zeros(3, 4, 4, dtype=torch.uint8)}, "png")
        >>> pending.result()["a"].data[:4]
        b'\\x89PNG'
        >>> encoder.close()
    """

    def __init__(self, max_workers: int | None = None) -> None:
        if max_workers is None:
            max_workers = min(MAX_ENCODERS, os.cpu_count() or 1)
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"`max_workers` must be an int >= 1, got {max_workers!r}.")
        self.max_workers = max_workers
        self._pool: ThreadPoolExecutor | None = None

    def submit(
        self, grids: Mapping[K, Tensor], image_format: str, *, encode: bool = True
    ) -> PendingGrids[K]:
        """Start encoding every grid (overlays as `image_format`, the rest as PNG) and return
        at once; a thread per grid, up to `max_workers`. With ``encode=False`` (no sink needs
        bytes) nothing is encoded and no thread starts: the grids come back as pixels."""
        if not encode:
            return PendingGrids({key: _done(grid, grid_format(key, image_format))
                                 for key, grid in grids.items()})  # fmt: skip
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix=THREAD_PREFIX)
        pool = self._pool
        return PendingGrids(
            {
                key: pool.submit(_encode, grid, grid_format(key, image_format))
                for key, grid in grids.items()
            }
        )

    def close(self) -> None:
        """Drop queued grids, wait for those being encoded and stop the threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def __getstate__(self) -> dict[str, Any]:
        return {"max_workers": self.max_workers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.max_workers = state["max_workers"]
        self._pool = None


#: The names of the encoding threads start with this.
THREAD_PREFIX = "cam-monitor-encode"
