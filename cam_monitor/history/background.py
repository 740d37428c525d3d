"""History writes off the training thread: one worker thread, a bounded queue, errors kept.

The monitor hands each file write (the probe, then one per evaluation) to a `BackgroundWriter`
and goes back to training; `flush` waits for every queued write and returns what failed, so
the monitor can warn (or raise with `strict=True`) and nothing is lost when `fit` ends.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["BackgroundWriter", "WriteError"]


@dataclass(frozen=True)
class WriteError:
    """A write that failed: what it was writing, and the exception it raised."""

    what: str
    error: Exception


class BackgroundWriter:
    """Runs submitted writes in order on one daemon thread, at most `maxsize` waiting.

    `submit` blocks while the queue is full, so a disk slower than the evaluations slows the
    monitor instead of piling up memory. The thread starts with the first write and stops in
    `close`; a pickled or copied writer (``ddp_spawn``) starts empty.

    Example:
        >>> writer, done = BackgroundWriter(), []
        >>> writer.submit(lambda: done.append(1), "a number")
        >>> writer.submit(lambda: 1 / 0, "a ratio")
        >>> [(e.what, type(e.error).__name__) for e in writer.close()], done
        ([('a ratio', 'ZeroDivisionError')], [1])
    """

    def __init__(self, maxsize: int = 4) -> None:
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"`maxsize` must be an int >= 1, got {maxsize!r}.")
        self.maxsize = maxsize
        self._start()

    def _start(self) -> None:
        self._queue: queue.Queue[tuple[Callable[[], Any], str] | None] = queue.Queue(self.maxsize)
        self._errors: list[WriteError] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, write: Callable[[], Any], what: str) -> None:
        """Queue `write` (named `what` in errors); waits while `maxsize` writes are queued."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._work, name="cam-monitor-history", daemon=True
            )
            self._thread.start()
        self._queue.put((write, what))

    def errors(self) -> list[WriteError]:
        """The writes that failed since the last call (without waiting for the queued ones)."""
        with self._lock:
            errors, self._errors = self._errors, []
        return errors

    def wait(self) -> None:
        """Wait until every queued write has run (its errors stay for `errors` / `flush`)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()

    def flush(self) -> list[WriteError]:
        """Wait until every queued write has run; the writes that failed since the last call."""
        self.wait()
        return self.errors()

    def close(self) -> list[WriteError]:
        """`flush`, then stop the thread (the next `submit` starts a new one)."""
        errors = self.flush()
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None
        return errors

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                write, what = job
                write()
            except Exception as err:  # kept for the monitor to report on its own thread
                with self._lock:
                    self._errors.append(WriteError(what, err))
            finally:
                self._queue.task_done()

    def __getstate__(self) -> dict[str, Any]:
        return {"maxsize": self.maxsize}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.maxsize = state["maxsize"]
        self._start()
