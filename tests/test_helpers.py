"""The tests' shared toolkit: test modules share through helpers.py and conftest.py only, event
files are read through one reader, and the synthetic shapes are what they say."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tests.helpers import KINDS, PLACES, fit, read_events, shapes, shapes_dataset

TESTS = Path(__file__).resolve().parent


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_modules(tree: ast.Module) -> list[str]:
    """Every module an `import` or `from ... import` names, relative ones with their dots, and
    for `from . import x` / `from tests import x` the names imported too."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            found.append(module)
            if module in (".", "tests"):
                found += [f"{module.rstrip('.')}.{alias.name}" for alias in node.names]
    return found


def test_no_test_module_imports_another() -> None:
    """Shared things live in helpers.py (or conftest.py for fixtures), not in a test module that
    others import: each test file can be renamed, run or deleted on its own."""
    crossings = []
    for path in sorted(TESTS.glob("*.py")):
        for module in imported_modules(parsed(path)):
            last = module.rpartition(".")[2]
            if last.startswith("test_"):
                crossings.append(f"{path.name} imports {module}")
    assert crossings == []


def test_the_check_sees_each_way_of_importing_a_test_module() -> None:
    sources = [
        "from tests.test_callback import fit",
        "from .test_callback import fit",
        "import test_callback",
        "import tests.test_callback as tc",
        "from tests import test_callback",
        "from . import test_callback",
    ]
    for source in sources:
        modules = imported_modules(ast.parse(source))
        assert any(m.rpartition(".")[2] == "test_callback" for m in modules), source
    assert imported_modules(ast.parse("from tests.helpers import fit")) == ["tests.helpers"]


def test_event_files_are_read_by_the_one_reader() -> None:
    """Only helpers.py sets up TensorBoard's `EventAccumulator` (with the size guidance that
    keeps every image, scalar and tensor); test modules call `read_events`."""
    builders = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name == "helpers.py":
            continue
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name == "EventAccumulator":
                    builders.append(f"{path.name}:{node.lineno}")
    assert builders == []


@pytest.mark.parametrize("classes", ["place", "kind"])
@pytest.mark.parametrize("domain", ["source", "target"])
def test_shapes_are_deterministic_and_their_masks_mark_the_bright_shape(
    classes: str, domain: str
) -> None:
    state = torch.get_rng_state()
    images, labels, masks = shapes(12, 3, domain, size=32, classes=classes)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    again = shapes(12, 3, domain, size=32, classes=classes)
    assert all(torch.equal(a, b) for a, b in zip((images, labels, masks), again, strict=True))
    assert not torch.equal(images, shapes(12, 4, domain, size=32, classes=classes)[0])
    assert images.shape == (12, 3, 32, 32) and masks.shape == (12, 32, 32)
    assert masks.dtype == torch.bool and masks.flatten(1).any(1).all()
    count = PLACES if classes == "place" else len(KINDS)
    assert labels.tolist() == [i % count for i in range(12)]
    inside = images.mean(1)[masks].mean()
    outside = images.mean(1)[~masks].mean()
    assert inside > outside + 0.3  # the shape is brighter than its background


def test_place_classes_put_the_square_where_the_label_says() -> None:
    _, labels, masks = shapes(10, 0, size=32)
    corners = [(0, 0), (0, 16), (16, 0), (16, 16), (8, 8)]
    for label, mask in zip(labels.tolist(), masks, strict=True):
        r, c = corners[label]
        assert mask[r : r + 16, c : c + 16].all() and mask.sum() == 16 * 16
    dataset = shapes_dataset(10, seed=0)
    assert torch.equal(dataset.tensors[1], labels)
    with pytest.raises(ValueError, match="classes can be 'place' or 'kind', got 'colour'"):
        shapes(2, classes="colour")


def test_fit_trains_seeded_and_read_events_reads_what_the_logger_wrote(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="tb")
    first = fit(None, tmp_path / "a", logger=logger, max_epochs=1)
    second = fit([], tmp_path / "b", max_epochs=1)
    assert first.model.steps_run == second.model.steps_run == 3  # 48 shapes in batches of 16
    assert first.trainer.current_epoch == 1
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)  # seeded: the same run twice
    events = read_events(logger.log_dir)
    assert [e.step for e in events.Scalars("val_loss")] == [2]
    assert read_events(logger.log_dir, newest=True).Scalars("val_loss")[0].value == pytest.approx(
        events.Scalars("val_loss")[0].value
    )
