"""A C CRC32C for TensorBoard's event writer, swapped in only where it gives the same checksums.

Without TensorFlow, TensorBoard's `RecordWriter` checksums every event record with a pure-Python
CRC32C (about 200 ms per MB, holding the GIL). It looks the function up at each write as the
module attribute `tensorboard.summary.writer.record_writer.masked_crc32c`; `install_fast_crc`
replaces that one attribute with the `crc32c` package's (hardware) CRC, after checking it
against TensorBoard's own function. TensorBoard's reader keeps its own pure-Python check.
"""

from __future__ import annotations

import random
import threading
import warnings
from collections.abc import Callable
from types import ModuleType

__all__ = ["install_fast_crc", "uninstall_fast_crc"]

#: The module whose `masked_crc32c` attribute every TensorBoard event record goes through.
WRITER_MODULE = "tensorboard.summary.writer.record_writer"
#: TensorBoard's reference implementation (pure Python), never replaced.
REFERENCE_MODULE = "tensorboard.compat.tensorflow_stub.pywrap_tensorflow"
ATTRIBUTE = "masked_crc32c"

_LOCK = threading.Lock()
#: The writer's function before `install_fast_crc` replaced it (None: not installed).
_original: Callable[[bytes], int] | None = None
#: Whether the missing `crc32c` package has been reported (once per process).
_missing_reported = False


def _mask(crc: int) -> int:
    """TFRecord's masking of a CRC32C: rotate right by 15 bits, add a constant, mod 2**32."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_from(crc32c: Callable[[bytes], int]) -> Callable[[bytes], int]:
    """A `masked_crc32c(data)` like TensorBoard's, built on the raw CRC32C function `crc32c`.

    Example:
        >>> from zlib import crc32  # not CRC32C: only shows the masking
        >>> masked_from(crc32)(b"") == 0xA282EAD8
        True
    """

    def masked_crc32c(data: bytes) -> int:
        return _mask(crc32c(data))

    masked_crc32c.__qualname__ = masked_crc32c.__name__ = "masked_crc32c"
    masked_crc32c.__doc__ = f"Masked CRC32C of `data`, computed by {crc32c!r}."
    return masked_crc32c


def check_vectors() -> list[bytes | memoryview]:
    """Inputs the fast CRC must agree on: empty, short, header-like, 128 KiB random, unaligned
    (checking them with TensorBoard's pure-Python CRC takes about 25 ms, once per process)."""
    generator = random.Random(20240614)
    big = generator.randbytes(1 << 17)
    return [
        b"",
        b"a",
        b"123456789",
        (1234567).to_bytes(8, "little"),  # what every record header is: a uint64 length
        big,
        memoryview(big)[3 : 3 + 4099],  # starts off an 8-byte boundary, odd length
        memoryview(big)[1 : 1 + 65537],
    ]


def _modules() -> tuple[ModuleType, ModuleType] | None:
    """TensorBoard's writer and reference modules, or None where TensorBoard is not installed."""
    try:
        from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return None
    return record_writer, pywrap_tensorflow


def _candidate() -> Callable[[bytes], int] | None:
    """The `crc32c` package's raw CRC32C, or None where it is not installed."""
    try:
        import crc32c
    except ImportError:
        return None
    return getattr(crc32c, "crc32c", None)


def _disagreement(fast: Callable[[bytes], int], reference: Callable[[bytes], int]) -> str | None:
    """The first test vector on which `fast` and `reference` differ (or `fast` fails), else None."""
    for data in check_vectors():
        try:
            mine = fast(data)
        except Exception as err:  # a broken build is a decline, not a crash
            return f"{len(data)} bytes: {type(err).__name__}: {err}"
        theirs = reference(bytes(data))
        if mine != theirs:
            return f"{len(data)} bytes: {mine:#010x} != {theirs:#010x}"
    return None


def install_fast_crc() -> bool:
    """Make TensorBoard's event writer use the `crc32c` package's C CRC32C; True if it does.

    Does nothing and returns False where TensorBoard or `crc32c` is missing (a missing
    `crc32c` beside TensorBoard warns once per process, naming the fix), or where the fast
    checksums differ from TensorBoard's own on the test vectors (then it also warns). Idempotent
    and safe to call from several threads; `uninstall_fast_crc` puts the original back.
    """
    global _original, _missing_reported
    with _LOCK:
        if _original is not None:
            return True
        modules, raw = _modules(), _candidate()
        if modules is None:
            return False
        if raw is None:
            if not _missing_reported:
                _missing_reported = True
                warnings.warn(
                    "cam_monitor: the crc32c package is not installed, so TensorBoard checksums "
                    "its event records in pure Python (about 0.2 s per MB of images, on the "
                    "training thread). pip install crc32c (or cam-monitor[tensorboard]) to compute "
                    "them about 1000x faster.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return False
        writer, reference = modules
        fast = masked_from(raw)
        problem = _disagreement(fast, reference.masked_crc32c)
        if problem is not None:
            warnings.warn(
                f"cam_monitor: the crc32c package gives other checksums than TensorBoard "
                f"({problem}); TensorBoard keeps its pure-Python CRC32C. Reinstall crc32c to "
                "get the fast one.",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        _original = getattr(writer, ATTRIBUTE)
        setattr(writer, ATTRIBUTE, fast)
        return True


def uninstall_fast_crc() -> bool:
    """Give TensorBoard's writer back the function it had before; True if one was replaced."""
    global _original
    with _LOCK:
        if _original is None:
            return False
        modules = _modules()
        if modules is not None:
            setattr(modules[0], ATTRIBUTE, _original)
        _original = None
        return True
