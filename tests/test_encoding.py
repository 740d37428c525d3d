"""Grids encoded once per evaluation: CPU grids by OpenCV on a few threads (the same bytes as
`render.encode_grid`), JPEG grids on a GPU by TorchCodec or torchvision in one batch (their CPU
paths stand in here), a failing encoder replaced by OpenCV, and no thread left after `close`."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cam_monitor import encoding
from cam_monitor.encoding import (
    CPU_ENCODER,
    GPU_JPEG_TOLERANCE,
    THREAD_PREFIX,
    TORCHCODEC,
    TORCHVISION,
    EncodedGrid,
    GridEncoder,
    JpegBackend,
    chroma_subsampling,
    decoded_difference,
    encode_grids,
    encode_jpegs,
    gpu_jpeg_backend,
)
from cam_monitor.render import (
    JPEG_QUALITY,
    encode_grid,
    make_overlay_grid,
    to_jpeg_bytes,
    to_png_bytes,
)
from cam_monitor.schema import MapKey, filter_maximised_tag
from tests.helpers import catch_warnings_entries

GPU_BACKENDS = [TORCHCODEC, TORCHVISION]


def encoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def grids() -> dict[MapKey | str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=generator)

    def overlay() -> torch.Tensor:
        return make_overlay_grid(images, torch.rand(4, 4, 4, generator=generator), nrow=2)

    return {
        MapKey("val", "layer3", "gradcam"): overlay(),
        MapKey("val", "layer4", "gradcam++"): overlay(),
        MapKey("val", "input", "saliency"): overlay(),  # a pixel-level map: always PNG
        filter_maximised_tag("layer4"): overlay(),  # a filter view: always PNG
    }


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_threads_give_the_bytes_of_one_encode_grid_per_grid(image_format: str) -> None:
    drawn = grids()
    encoder = GridEncoder(max_workers=3)
    encoded = encoder.submit(drawn, image_format).result()
    assert list(encoded) == list(drawn)  # in the order drawn
    formats = [image_format, image_format, "png", "png"]
    for (key, grid), expected in zip(drawn.items(), formats, strict=True):
        image = encoded[key]
        assert image.image_format == expected and image.suffix == (
            ".jpg" if expected == "jpeg" else ".png"
        )
        assert image.data == encode_grid(grid, expected)  # byte for byte, as the sinks wrote
        assert image.encoder == CPU_ENCODER  # CPU grids never go to a GPU encoder
        assert (image.height, image.width) == tuple(grid.shape[1:]) and image.grid is grid
    assert encode_grids(drawn, image_format) == encoded  # the same on the calling thread
    assert 1 <= len(encoder_threads()) <= 3
    encoder.close()
    assert encoder_threads() == []
    again = encoder.submit(drawn, image_format).result()  # a closed encoder starts again
    assert again == encoded
    encoder.close()
    assert encoder_threads() == []


def test_threads_are_bounded_by_the_grids_and_the_cpus() -> None:
    encoder = GridEncoder()
    assert 1 <= encoder.max_workers <= 4
    one = {MapKey("val", "layer4", "gradcam"): next(iter(grids().values()))}
    encoder.submit(one, "jpeg").result()
    assert len(encoder_threads()) == 1  # one grid, one thread
    encoder.close()
    with pytest.raises(ValueError, match="`max_workers` must be an int >= 1, got 0"):
        GridEncoder(max_workers=0)


def test_an_encoding_error_comes_from_result_once_every_grid_is_done() -> None:
    too_tall = torch.zeros(3, 65600, 8, dtype=torch.uint8)  # JPEG stops at 65500 pixels
    drawn = {MapKey("val", "l", "gradcam"): too_tall, **grids()}
    encoder = GridEncoder(max_workers=2)
    pending = encoder.submit(drawn, "jpeg")
    with pytest.raises(RuntimeError, match=r"could not encode a grid of shape \(3, 65600, 8\)"):
        pending.result()
    assert all(future.done() for _, future in pending._batches)
    encoder.close()


def test_a_copied_or_pickled_encoder_starts_without_threads() -> None:
    encoder = GridEncoder(max_workers=2)
    encoder.submit(grids(), "jpeg").result()
    for clone in (copy.deepcopy(encoder), pickle.loads(pickle.dumps(encoder))):
        assert clone.max_workers == 2 and clone._pool is None
        assert isinstance(next(iter(clone.submit(grids(), "png").result().values())), EncodedGrid)
        clone.close()
    encoder.close()
    assert encoder_threads() == []


def test_without_encoding_no_thread_starts_and_bytes_come_on_demand() -> None:
    """Where no sink needs bytes (MLflow takes pixels) nothing is encoded; a sink that reads
    `data` anyway gets the bytes `encode_grid` gives, overlays in the chosen format."""
    drawn = grids()
    encoder = GridEncoder()
    plain = encoder.submit(drawn, "jpeg", encode=False).result()
    assert encoder._pool is None and not encoder_threads()
    assert all(image.encoded is None for image in plain.values())
    assert all(plain[key].grid is grid for key, grid in drawn.items())
    eager = encoder.submit(drawn, "jpeg").result()
    assert {k: v.data for k, v in plain.items()} == {k: v.data for k, v in eager.items()}
    assert plain[MapKey("val", "layer3", "gradcam")].data[:3] == b"\xff\xd8\xff"
    encoder.close()


# -- JPEG on the GPU: TorchCodec and torchvision, each called on CPU tensors through the same
# function the CUDA path calls (there they run libjpeg-turbo, 4:2:0; on CUDA, nvJPEG, 4:4:4).


def overlay_grid(seed: int = 0) -> torch.Tensor:
    """A grid as the monitor draws one: 16 smooth 64 px images (tiles of 128 px), captions, a
    white outline per region and a 7 x 7 CAM each: 614 x 522 px."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(16, 3, 8, 8, generator=generator)
    images = F.interpolate(coarse, size=64, mode="bilinear", align_corners=False)
    regions = torch.zeros(16, 64, 64, dtype=torch.bool)
    regions[:, 16:48, 20:44] = True
    captions = [f"ok pred {i % 5} / true {i % 5}" for i in range(16)]
    cams = torch.rand(16, 7, 7, generator=generator)
    return make_overlay_grid(images, cams, captions=captions, regions=regions)


@pytest.fixture
def fresh_backends(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[warnings.WarningMessage]]:
    """Backends looked up afresh, no warning given yet in this process, every warning caught."""
    monkeypatch.setattr(encoding, "_warned", set())
    gpu_jpeg_backend.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    gpu_jpeg_backend.cache_clear()


def runtime_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def on_cpu(backend: JpegBackend) -> JpegBackend:
    """`backend` used for CPU grids too, so the encoder's GPU path runs on this machine."""
    return dataclasses.replace(backend, device_types=frozenset({"cpu", "cuda"}))


@pytest.mark.parametrize("backend", GPU_BACKENDS, ids=lambda b: b.name)
def test_gpu_backends_decode_like_opencv_within_jpeg_error(backend: JpegBackend) -> None:
    """Measured on three such grids (seeds 0-2): OpenCV (4:4:4, quality 90) decodes 2.1 from
    the drawn pixels (mean; 47 at most). TorchCodec's and torchvision's CPU paths give the same
    4:2:0 bytes as each other: 3.7 from the pixels (118 at most, at caption and outline edges),
    3.4-3.5 from OpenCV's decoding (110 at most). Quality 75 would be 5.4, swapped channels 55."""
    grid = overlay_grid()
    opencv = to_jpeg_bytes(grid, 90)
    [(data, name)] = encode_jpegs([grid], backend)
    assert name == backend.name and data[:3] == b"\xff\xd8\xff"
    mean, largest = decoded_difference(data, opencv)
    assert mean <= GPU_JPEG_TOLERANCE and largest < 128, (mean, largest)
    ours, theirs = decoded_difference(opencv, grid)[0], decoded_difference(data, grid)[0]
    assert ours < 2.5 and theirs <= 2 * ours, (ours, theirs)
    assert chroma_subsampling(opencv) == "4:4:4" and chroma_subsampling(data) == "4:2:0"
    swapped = encode_jpegs([grid.flip(0)], backend)[0][0]  # what the bound must reject
    assert decoded_difference(swapped, opencv)[0] > 10 * GPU_JPEG_TOLERANCE


def test_torchvision_is_called_without_its_deprecation_warning_leaking() -> None:
    from torchvision.io import encode_jpeg

    grid = overlay_grid()
    with pytest.warns(DeprecationWarning, match="TorchCodec"):  # torchvision 0.29 warns...
        encode_jpeg(grid, quality=90)
    filters = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ...and ours would raise here if it leaked
        with catch_warnings_entries() as entered:
            [(data, name)] = encode_jpegs([grid], TORCHVISION)
    # Not silenced by swapping the process's filters, which other threads share (the encoder
    # runs on its own threads): nothing changed, globally or for a moment.
    assert name == "torchvision" and entered == [] and warnings.filters == filters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert data == bytes(encode_jpeg(grid, quality=JPEG_QUALITY).numpy())  # its very op
    with pytest.raises(ValueError, match=r"JPEG quality must be in 1\.\.100, got 0"):
        TORCHVISION.encode([grid], 0)


def test_the_gpu_encoder_takes_every_jpeg_grid_of_an_evaluation_in_one_call() -> None:
    """TorchVision takes a list: one call for both JPEG overlays; PNG grids go to OpenCV."""
    calls: list[int] = []

    def counted(grids: list[torch.Tensor], quality: int) -> list[torch.Tensor]:
        calls.append(len(grids))
        return TORCHVISION.encode(grids, quality)

    backend = on_cpu(dataclasses.replace(TORCHVISION, encode=counted))
    drawn = grids()
    encoder = GridEncoder(max_workers=2, jpeg_backend=backend)
    encoded = encoder.submit(drawn, "jpeg").result()
    encoder.close()
    assert calls == [2] and list(encoded) == list(drawn)
    names = [image.encoder for image in encoded.values()]
    assert names == ["torchvision", "torchvision", CPU_ENCODER, CPU_ENCODER]
    for key, grid in drawn.items():
        image = encoded[key]
        if image.encoder == CPU_ENCODER:
            assert image.image_format == "png" and image.data == to_png_bytes(grid)
        else:
            assert image.image_format == "jpeg"
            assert decoded_difference(image.data, encode_grid(grid, "jpeg"))[0] <= 20  # noise
    # TorchCodec takes one grid per encoder: one call each, in the same task
    calls.clear()
    one_each = on_cpu(dataclasses.replace(TORCHCODEC, encode=counted))
    assert encode_grids(drawn, "jpeg", backend=one_each) and calls == [1, 1]


def test_the_backend_order_torchcodec_then_torchvision_then_the_cpu(
    fresh_backends: list[warnings.WarningMessage], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert gpu_jpeg_backend() is TORCHCODEC  # installed with the dev extra
    gpu_jpeg_backend.cache_clear()
    monkeypatch.setitem(sys.modules, "torchcodec", None)  # not installed: `import` fails
    monkeypatch.setitem(sys.modules, "torchcodec.encoders", None)
    assert gpu_jpeg_backend() is TORCHVISION
    assert runtime_warnings(fresh_backends) == []  # an optional package missing is no news
    gpu_jpeg_backend.cache_clear()
    import torchvision.io

    monkeypatch.delattr(torchvision.io, "encode_jpeg")  # as a torchvision without codecs
    assert gpu_jpeg_backend() is None
    assert gpu_jpeg_backend() is None  # looked up once
    [message] = runtime_warnings(fresh_backends)
    assert "no JPEG encoder for grids on a GPU" in message and "the CPU (OpenCV)" in message
    assert "torchcodec: ModuleNotFoundError" in message and "cam-monitor[gpu]" in message


def test_an_installed_torchcodec_that_does_not_load_hands_over_to_torchvision(
    fresh_backends: list[warnings.WarningMessage], monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = types.ModuleType("torchcodec.encoders")

    def missing_library(name: str) -> object:
        raise OSError("libnvjpeg.so.13: cannot open shared object file")

    broken.__getattr__ = missing_library  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "torchcodec.encoders", broken)
    assert gpu_jpeg_backend() is TORCHVISION
    [message] = runtime_warnings(fresh_backends)
    assert "torchcodec is installed but cannot be imported (OSError: libnvjpeg.so.13" in message
    assert "torchvision encodes JPEG grids drawn on a GPU instead" in message


@pytest.mark.parametrize("takes_list", [True, False])
def test_a_failing_gpu_encoder_hands_its_grids_to_opencv_with_one_warning(
    fresh_backends: list[warnings.WarningMessage], takes_list: bool
) -> None:
    def nvjpeg_missing(grids: list[torch.Tensor], quality: int) -> list[torch.Tensor]:
        raise RuntimeError("encode_jpegs_cuda: torchvision not compiled with nvJPEG support")

    backend = on_cpu(JpegBackend("torchvision", nvjpeg_missing, takes_list, "torch:Tensor"))
    drawn = grids()
    encoder = GridEncoder(max_workers=2, jpeg_backend=backend)
    for _ in range(2):  # two evaluations: the warning comes once
        encoded = encoder.submit(drawn, "jpeg").result()
        assert {key: image.data for key, image in encoded.items()} == {
            key: encode_grid(grid, grid_format) for (key, grid), grid_format
            in zip(drawn.items(), ["jpeg", "jpeg", "png", "png"], strict=True)
        }  # fmt: skip
        assert {image.encoder for image in encoded.values()} == {CPU_ENCODER}
    encoder.close()
    [message] = runtime_warnings(fresh_backends)
    assert "JPEG encoding with torchvision failed (RuntimeError: encode_jpegs_cuda:" in message
    assert "the CPU (OpenCV) encodes the grids it cannot" in message


def test_a_backend_whose_import_fails_at_run_time_loses_no_grid(
    fresh_backends: list[warnings.WarningMessage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TorchCodec chosen, then gone when it encodes (its import fails for real): OpenCV
    encodes the grid, byte for byte what it encodes without a GPU; one warning."""
    monkeypatch.setitem(sys.modules, "torchcodec.encoders", None)
    grid = overlay_grid()
    key = MapKey("val", "layer4", "gradcam")
    for _ in range(2):
        image = encode_grids({key: grid}, "jpeg", backend=on_cpu(TORCHCODEC))[key]
        assert image.encoder == CPU_ENCODER and image.data == to_jpeg_bytes(grid, 90)
    [message] = runtime_warnings(fresh_backends)
    assert message.startswith("cam-monitor: JPEG encoding with torchcodec failed")
    assert "ModuleNotFoundError" in message


def test_chroma_subsampling_reads_the_frame_header() -> None:
    import cv2
    import numpy as np

    grid = overlay_grid()
    assert chroma_subsampling(to_jpeg_bytes(grid)) == "4:4:4"
    bgr = np.ascontiguousarray(grid.permute(1, 2, 0).numpy()[:, :, ::-1])
    default = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    assert chroma_subsampling(default) == "4:2:0"  # OpenCV's default, and libjpeg's
    gray = cv2.imencode(".jpg", bgr[:, :, 0])[1].tobytes()
    assert chroma_subsampling(gray) == "gray"
    with pytest.raises(ValueError, match="no JPEG frame header"):
        chroma_subsampling(to_png_bytes(grid))


#: The CUDA-only test of this file; benchmarks/gpu_check.py runs it on a GPU.
CUDA_TEST = "test_cuda_grids_are_drawn_and_encoded_on_the_gpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only; gpu_check.py runs it")
def test_cuda_grids_are_drawn_and_encoded_on_the_gpu() -> None:
    """Overlays drawn on the device stay there until encoded; every JPEG grid is encoded by the
    GPU encoder, at 4:4:4, within the tolerance of OpenCV's bytes; the pixels come to
    the CPU when a sink asks. Each backend alone does the same on the device."""
    from cam_monitor.options import RenderOptions
    from cam_monitor.render import draw_overlays

    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(16, 3, 8, 8, generator=generator)
    images = F.interpolate(coarse, size=64, mode="bilinear", align_corners=False).cuda()
    maps = {MapKey("p", layer, "gradcam"): torch.rand(16, 7, 7, generator=generator).cuda()
            for layer in ("a", "b")}  # fmt: skip
    captions = [f"ok pred {i % 5} / true {i % 5}" for i in range(16)]
    drawn = draw_overlays(images, maps, captions, RenderOptions())
    assert {grid.device.type for grid in drawn.values()} == {"cuda"}
    backend = gpu_jpeg_backend()
    assert backend is not None
    encoder = GridEncoder()
    encoded = encoder.submit(drawn, "jpeg").result()
    encoder.close()
    for key, grid in drawn.items():
        image = encoded[key]
        assert image.encoder == backend.name and image.drawn is grid
        assert chroma_subsampling(image.data) == "4:4:4"
        pixels = image.grid
        assert pixels.device.type == "cpu" and torch.equal(pixels, grid.cpu())
        mean, _ = decoded_difference(image.data, to_jpeg_bytes(pixels, 90))
        assert mean <= GPU_JPEG_TOLERANCE, mean
    grid = next(iter(drawn.values()))
    for other in GPU_BACKENDS:
        [(data, name)] = encode_jpegs([grid], other)
        assert name == other.name and chroma_subsampling(data) == "4:4:4"
        assert decoded_difference(data, to_jpeg_bytes(grid, 90))[0] <= GPU_JPEG_TOLERANCE


def test_gpu_check_runs_the_cuda_test() -> None:
    """Skipped on a machine without CUDA, the test above must run where a GPU session runs."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    assert f"tests/test_encoding.py::{CUDA_TEST}" in script.read_text()
