"""The engine's warnings, and `quiet`: holding them back in one thread without touching the
process-wide warning filters that `warnings.catch_warnings` swaps (not thread-safe before
Python 3.14: the monitor encodes and writes on threads of its own)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_LOCAL = threading.local()


@contextmanager
def quiet() -> Iterator[None]:
    """Hold back the warnings `warn` gives in this thread inside the block; other threads'
    warnings, and other packages', are shown as ever.

    Example:
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     with quiet():
        ...         warn("held back")
        ...     warn("shown")
        >>> [str(w.message) for w in seen]
        ['shown']
    """
    before = getattr(_LOCAL, "quiet", False)
    _LOCAL.quiet = True
    try:
        yield
    finally:
        _LOCAL.quiet = before


def warn(message: str, category: type[Warning] = UserWarning, stacklevel: int = 1) -> None:
    """`warnings.warn(message, category, stacklevel)` (counted from the caller), unless this
    thread is inside `quiet`."""
    if getattr(_LOCAL, "quiet", False):
        return
    warnings.warn(message, category, stacklevel=stacklevel + 1)
