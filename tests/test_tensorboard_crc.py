"""The fast CRC32C for TensorBoard's writer: same event files, idempotent, declines when wrong."""

from __future__ import annotations

import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.summary.writer import record_writer
from torch.utils.tensorboard import SummaryWriter

from cam_monitor import tensorboard_crc
from cam_monitor.tensorboard_crc import install_fast_crc, masked_from, uninstall_fast_crc
from tests.helpers import read_events

ORIGINAL = record_writer.masked_crc32c
REFERENCE = pywrap_tensorflow.masked_crc32c  # pure Python, what TensorBoard's reader checks with
SCALARS = {"loss": [(0, 2.5), (7, 1.25), (12, -0.0)], "cam_drift/p/l/m": [(3, 0.125)]}


@pytest.fixture(autouse=True)
def restored() -> Iterator[None]:
    """Every test starts and ends with TensorBoard's own writer function."""
    uninstall_fast_crc()
    assert record_writer.masked_crc32c is ORIGINAL
    yield
    uninstall_fast_crc()
    assert record_writer.masked_crc32c is ORIGINAL


def write_run(folder: Path, image: torch.Tensor) -> Path:
    """Scalars and one image through torch's SummaryWriter; returns the event file."""
    writer = SummaryWriter(str(folder))
    for tag, points in SCALARS.items():
        for step, value in points:
            writer.add_scalar(tag, value, global_step=step)
    writer.add_image("cam/probe/layer4/gradcam", image, global_step=5, dataformats="CHW")
    writer.close()
    (event_file,) = folder.glob("events.out.tfevents.*")
    return event_file


def read_run(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, bytes]]]:
    """What TensorBoard shows: scalars per tag and the image records, via EventAccumulator."""
    accumulator = read_events(folder)
    scalars = {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }
    images = [
        (e.step, e.encoded_image_string)
        for tag in accumulator.Tags()["images"]
        for e in accumulator.Images(tag)
    ]
    return scalars, images


def record_crcs_ok(path: Path, masked: Callable[[bytes], int] = REFERENCE) -> list[bool]:
    """Walk the TFRecord framing by hand; per record, whether both stored CRCs match `masked`."""
    data, offset, verdicts = path.read_bytes(), 0, []
    while offset < len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        body = data[offset + 12 : offset + 12 + length]
        (body_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
        verdicts.append(masked(header) == header_crc and masked(body) == body_crc)
        offset += 16 + length
    assert offset == len(data), "the file does not end on a record boundary"
    return verdicts


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """Noise compresses badly, so the image record is a few hundred KB: a real CRC workload."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 200, 300), dtype=torch.uint8, generator=generator)


def test_the_real_crc32c_package_is_installed_and_agrees_with_tensorboard() -> None:
    assert install_fast_crc() is True
    fast = record_writer.masked_crc32c
    assert fast is not ORIGINAL
    for data in [*tensorboard_crc.check_vectors(), b"\x00" * 4096, bytes(range(256)) * 3]:
        assert fast(data) == REFERENCE(bytes(data))
    assert uninstall_fast_crc() is True
    assert record_writer.masked_crc32c is ORIGINAL


def test_event_files_written_after_install_read_back_identically(
    tmp_path: Path, image: torch.Tensor
) -> None:
    slow_file = write_run(tmp_path / "slow", image)
    assert install_fast_crc()
    fast_file = write_run(tmp_path / "fast", image)

    slow_scalars, slow_images = read_run(tmp_path / "slow")
    fast_scalars, fast_images = read_run(tmp_path / "fast")
    assert fast_scalars == slow_scalars == SCALARS
    assert len(fast_images) == 1 and fast_images == slow_images
    assert len(fast_images[0][1]) > 100_000  # the image record really was checksummed fast

    fast_verdicts = record_crcs_ok(fast_file)  # recomputed with TensorBoard's pure-Python CRC
    assert len(fast_verdicts) == len(record_crcs_ok(slow_file)) >= 6 and all(fast_verdicts)


def test_the_checks_above_catch_a_wrong_checksum(tmp_path: Path, image: torch.Tensor) -> None:
    """Fault injection: a writer CRC that is off by one fails both TensorBoard's reader (which
    stops at the first bad record) and the hand-made check."""
    record_writer.masked_crc32c = lambda data: (REFERENCE(data) + 1) & 0xFFFFFFFF
    try:
        event_file = write_run(tmp_path / "bad", image)
    finally:
        record_writer.masked_crc32c = ORIGINAL
    assert not any(record_crcs_ok(event_file))
    scalars, images = read_run(tmp_path / "bad")
    assert scalars == {} and images == []


def test_install_is_idempotent_and_thread_safe() -> None:
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def race() -> None:
        barrier.wait()
        results.append(install_fast_crc())

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 8
    fast = record_writer.masked_crc32c
    assert install_fast_crc() is True and record_writer.masked_crc32c is fast
    assert uninstall_fast_crc() is True and record_writer.masked_crc32c is ORIGINAL
    assert uninstall_fast_crc() is False and record_writer.masked_crc32c is ORIGINAL


def right_only_when_short(data: bytes) -> int:
    return pywrap_tensorflow.crc32c(bytes(data)) if len(data) < 1000 else 0


def fails_on_memoryview(data: bytes) -> int:
    if isinstance(data, memoryview):
        raise TypeError("a buffer this build cannot read")
    return pywrap_tensorflow.crc32c(data)


@pytest.mark.parametrize("candidate", [zlib.crc32, right_only_when_short, fails_on_memoryview])
def test_install_declines_a_candidate_that_disagrees(
    monkeypatch: pytest.MonkeyPatch, candidate: Callable[[bytes], int]
) -> None:
    """Fault injection in place of the package: CRC-32 (not -32C), a CRC wrong on long input, and
    one that cannot read an unaligned buffer are all refused, with a warning."""
    monkeypatch.setattr(tensorboard_crc, "_candidate", lambda: candidate)
    with pytest.warns(RuntimeWarning, match="other checksums than TensorBoard"):
        assert install_fast_crc() is False
    assert record_writer.masked_crc32c is ORIGINAL


def test_install_declines_without_the_package_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "crc32c", None)  # import crc32c -> ImportError
    monkeypatch.setattr(tensorboard_crc, "_missing_reported", False)
    with pytest.warns(RuntimeWarning, match="pip install crc32c"):
        assert install_fast_crc() is False
    assert record_writer.masked_crc32c is ORIGINAL
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        assert install_fast_crc() is False


def test_masked_from_applies_tensorboards_mask() -> None:
    raw = pywrap_tensorflow.crc32c
    masked = masked_from(raw)
    for data in (b"", b"x", b"123456789", bytes(range(256))):
        assert masked(data) == REFERENCE(data)
