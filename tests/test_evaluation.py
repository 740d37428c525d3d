"""One evaluation without Lightning, as the monitor runs it (`run_evaluation`, the tracker's
scores, the history record): with `batch_size`, it gives what the whole probe at once gives, and
it holds one chunk of the probe at a time."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import cam_monitor.evaluation as evaluation
from cam_monitor.batch import tensors
from cam_monitor.drift import AttentionTracker
from cam_monitor.evaluation import EvaluationOutput, run_evaluation
from cam_monitor.history import evaluation_path, evaluation_record, read_evaluation
from cam_monitor.history import write_evaluation as write
from cam_monitor.options import (
    DriftOptions,
    EngineOptions,
    FaithfulnessOptions,
    FilterOptions,
    RenderOptions,
)
from cam_monitor.probe import ProbeSet, content_hash
from cam_monitor.schema import MEASURES
from cam_monitor.sinks import scalar_tags
from tests.helpers import TinyCNN

CHUNK = 4
LAYERS = ["features.2", "features.5"]  # maps of 32 x 32 and 16 x 16
# A CAM of two layers, a pixel map, and a signed one (drawn as views, measured by magnitude).
METHODS = ("gradcam", "gradcam++", "saliency", "integrated_gradients")
TRUST = FaithfulnessOptions(("drop", "increase", "deletion", "insertion", "sanity"))
FILTERS = FilterOptions({"features.5": (0, 2)}, steps=2)


def probe_set(size: int) -> ProbeSet:
    """`size` images with labels and masks (localization is scored too)."""
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(size, 3, 32, 32, generator=generator)
    masks = torch.rand(size, 32, 32, generator=generator) > 0.7
    return ProbeSet("probe", x, torch.arange(size) % 5, masks, content_hash(x))


def model() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


def evaluate(
    module: TinyCNN,
    probe: ProbeSet,
    batch_size: int | None,
    folder: Path,
    count: int = 2,
) -> list[EvaluationOutput]:
    """`count` evaluations as the monitor's evaluator runs them (the weights move in between,
    so the second scores drift), each written to `folder`'s history."""
    engine = EngineOptions(methods=METHODS, batch_size=batch_size, ig_steps=16)
    render = RenderOptions(max_tiles=CHUNK - 1)  # evenly spaced rows, from several chunks
    tracker = AttentionTracker(DriftOptions(measures=MEASURES))
    outputs = []
    for index in range(count):
        output = run_evaluation(
            module, {"probe": probe}, LAYERS, engine, render, FILTERS, trust=TRUST
        )
        scalars, _ = tracker.score(output.results, {"probe": probe}, batch_size)
        output.scalars.update(scalars)
        record = evaluation_record(
            index, 0, index, {"probe": probe}, output.results, scalar_tags(output.scalars)
        )
        write(folder, record)
        outputs.append(output)
        with torch.no_grad():  # the same step for every run: a seeded nudge of every weight
            generator = torch.Generator().manual_seed(index)
            for parameter in module.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return outputs


def test_a_chunked_evaluation_gives_what_the_whole_probe_gives(tmp_path: Path) -> None:
    """Maps, scalars (drift, localization, entropy, faithfulness, sanity), grids and the history
    files of a probe evaluated `CHUNK` images at a time equal those of the probe at once (to
    float tolerance: a chunk's convolutions may sum in another order)."""
    probe = probe_set(3 * CHUNK + 1)  # a last chunk of one image
    whole = evaluate(model(), probe, None, tmp_path / "whole")
    chunked = evaluate(model(), probe, CHUNK, tmp_path / "chunked")
    for index, (one, other) in enumerate(zip(whole, chunked, strict=True)):
        result, other_result = one.results["probe"], other.results["probe"]
        assert result.maps.keys() == other_result.maps.keys()
        for key, maps in result.maps.items():
            torch.testing.assert_close(other_result.maps[key], maps, rtol=1e-5, atol=1e-6)
        assert torch.equal(result.targets, other_result.targets)
        assert list(one.scalars) == list(other.scalars)  # the same keys, in the same order
        assert any(key.stat.endswith("_prev") for key in other.scalars) == (index == 1)
        for key, value in one.scalars.items():
            assert other.scalars[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True)
        assert one.images.keys() == other.images.keys()
        for key, grid in one.images.items():
            # A map value on a colour boundary may take the colormap's next colour: at alpha
            # 0.5, 2 levels at most (jet moves by 4 a step), on a few pixels.
            difference = (grid.int() - other.images[key].int()).abs()
            assert difference.max() <= 2 and (difference > 0).float().mean() < 1e-3, key
        stored = read_evaluation(evaluation_path(tmp_path / "whole", index))
        again = read_evaluation(evaluation_path(tmp_path / "chunked", index))
        assert stored.maps.keys() == again.maps.keys()
        for key, maps in stored.maps.items():
            np.testing.assert_allclose(again.maps[key], maps, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(again.logits["probe"], stored.logits["probe"], atol=1e-6)
        assert stored.scalars.keys() == again.scalars.keys()


class TensorBytes(TorchFunctionMode):
    """The bytes of the storages torch functions allocate, while a tensor returned on them lives
    (a view or a `.detach()` of one keeps it counted; one of a tensor made elsewhere, or `.float()`
    of a float tensor, allocates nothing), and per phase (`phase(name, fn)`, nested or not) the
    most it held at once above what lived when it began. Nothing is counted while `paused`."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.paused = 0, False
        self.held: dict[str, int] = {}
        self._phases: list[tuple[str, int]] = []  # the phases running, and what lived before
        self._storages: dict[int, list[int]] = {}  # data pointer: [bytes, tensors using it]
        self._seen: set[int] = set()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        given = {t.untyped_storage().data_ptr() for t in tensors((args, kwargs))}
        for tensor in tensors(out):
            pointer = tensor.untyped_storage().data_ptr()
            entry = self._storages.get(pointer)
            if id(tensor) in self._seen or pointer == 0 or (entry is None and pointer in given):
                continue
            if entry is None:  # a new storage
                entry = self._storages[pointer] = [tensor.untyped_storage().nbytes(), 0]
                self.live += entry[0]
            entry[1] += 1
            self._seen.add(id(tensor))
            weakref.finalize(tensor, self._freed, id(tensor), pointer)
        for name, start in self._phases:
            self.held[name] = max(self.held.get(name, 0), self.live - start)
        return out

    def _freed(self, identity: int, pointer: int) -> None:
        self._seen.discard(identity)
        entry = self._storages[pointer]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[pointer]

    def phase(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn`, its calls measured as phase `name`."""

        def measured(*args: Any, **kwargs: Any) -> Any:
            self._phases.append((name, self.live))
            try:
                return fn(*args, **kwargs)
            finally:
                self._phases.pop()

        return measured

    def paused_in(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn`, what it allocates not counted."""

        def unmeasured(*args: Any, **kwargs: Any) -> Any:
            self.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused = False

        return unmeasured


@contextmanager
def rows_per_forward(module: torch.nn.Module) -> Iterator[list[int]]:
    """The images of every call of `module`, also of its deep copies (the sanity check's)."""
    seen: list[int] = []

    def hook(_: torch.nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(next(tensors(args)).shape[0])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_an_evaluation_holds_one_chunk_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `batch_size`, the model never runs on more images at once (CAMs, faithfulness,
    sanity check, filter views), and no phase of the evaluation (the CAMs, drawing, filter
    views, faithfulness, drift scoring, the history record) holds more tensor memory at once for
    a probe of 4 chunks than for a probe of one, but for what it keeps: the maps at the layers'
    resolution (the CAMs' result) and a few numbers per image."""
    held, kept = {}, {}
    phases = {
        (evaluation, "compute_probe"): "CAMs",
        (evaluation, "render_probe"): "drawing",
        (evaluation, "filter_grids"): "filter views",
        (evaluation, "trust_scores"): "faithfulness",
        (AttentionTracker, "score"): "drift scoring",
        (sys.modules[__name__], "evaluation_record"): "history record",
    }
    faithfulness = sys.modules["cam_monitor.faithfulness"]  # the package exports a function
    sanity = (faithfulness, "compute")  # its CAMs of a randomised copy: its forwards are counted
    originals = {place: getattr(*place) for place in [*phases, sanity]}
    for size in (CHUNK, 4 * CHUNK):
        counter = TensorBytes()
        for place, name in phases.items():
            monkeypatch.setattr(*place, counter.phase(name, originals[place]))
        monkeypatch.setattr(*sanity, counter.paused_in(originals[sanity]))
        module = model()
        with counter, rows_per_forward(module) as seen:
            outputs = evaluate(module, probe_set(size), CHUNK, tmp_path / str(size))
        assert seen and max(seen) <= CHUNK  # the sanity check's copy of the model included
        held[size] = counter.held
        result = outputs[-1].results["probe"]
        kept[size] = sum(t.nbytes for t in tensors([result.maps, result.targets, result.logits]))
    assert held[CHUNK].keys() == set(phases.values())
    for name, most in held[CHUNK].items():
        allowed = 1.05 * most + (kept[4 * CHUNK] if name == "CAMs" else 0)
        assert held[4 * CHUNK][name] <= allowed, (name, held, kept)
