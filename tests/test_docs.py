"""The README and the pages in docs/: what they name exists, every relative link resolves, and the
argument reference matches `CamMonitor`'s signature and docstring."""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from cam_monitor import CamMonitor

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
PAGE_IDS = [page.relative_to(REPO).as_posix() for page in PAGES]
ARGUMENTS = REPO / "docs" / "arguments.md"
FENCED = re.compile(r"^```.*?^```[^\n]*$", flags=re.MULTILINE | re.DOTALL)


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code: where Markdown finds links."""
    return re.sub(r"`[^`\n]*`", "", FENCED.sub("", text))


def anchors(text: str) -> set[str]:
    """The ids GitHub gives a page's headings: lower case, punctuation dropped, spaces to `-`,
    a repeated heading numbered `-1`, `-2`, ..."""
    seen: dict[str, int] = {}
    ids = set()
    for line in FENCED.sub("", text).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def relative_links(text: str) -> Iterator[str]:
    """Targets of `[text](target)` and `![alt](target)` that point inside the repository."""
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        if not re.match(r"[a-z]+:", target):  # https:, mailto:
            yield target


def argument_rows(text: str) -> list[tuple[list[str], list[object]]]:
    """(names, defaults) of each row of every `| argument | default | ... |` table in `text`."""
    rows: list[tuple[list[str], list[object]]] = []
    in_table = False
    for line in text.splitlines():
        if line.startswith("| argument | default |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and line.startswith("| `"):
            names_cell, default_cell = line.split("|")[1:3]
            names = re.findall(r"`(\w+)`", names_cell)
            defaults = [ast.literal_eval(d) for d in re.findall(r"`([^`]*)`", default_cell)]
            defaults = defaults * len(names) if len(defaults) == 1 else defaults  # `mean`, `std`
            rows.append((names, defaults))
    return rows


def test_every_page_in_docs_is_linked_from_the_readme() -> None:
    targets = relative_links(README.read_text())
    linked = {(REPO / target.partition("#")[0]).resolve() for target in targets}
    assert ARGUMENTS in PAGES
    unlinked = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert not unlinked, unlinked


def test_every_argument_is_documented_in_help_and_in_docs_arguments() -> None:
    params = set(inspect.signature(CamMonitor.__init__).parameters) - {"self"}
    doc = inspect.getdoc(CamMonitor) or ""
    assert "Raises:" in doc and "Example::" in doc
    args = doc.split("Args:", 1)[1].split("Raises:", 1)[0]
    documented = set(re.findall(r"^    (\w+): ", args, flags=re.MULTILINE))
    assert documented == params, (params - documented, documented - params)
    rows = argument_rows(ARGUMENTS.read_text())
    in_reference = {name for names, _ in rows for name in names}
    assert in_reference == params, (params - in_reference, in_reference - params)
    signature = inspect.signature(CamMonitor.__init__).parameters
    for page in PAGES:  # the reference, and any other argument table a page holds
        for names, defaults in argument_rows(page.read_text()):
            for name, default in zip(names, defaults, strict=True):
                assert name in signature, (page.name, name)
                assert signature[name].default == default, (page.name, name, default)


@cache
def functions_of(path: Path) -> dict[str, ast.FunctionDef]:
    """The functions a test file defines, by name (parsed once per file)."""
    tree = ast.parse(path.read_text())
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_test_and_file_a_page_names_exists(page: Path) -> None:
    # `tests/test_x.py::name`, `test_x.py::name` and `::name` (the file named last in that row)
    # must each resolve to a test function, marked "(both)" exactly where it runs against both
    # Lightning namespaces; every repository path the page names must exist.
    text = page.read_text()
    missing = []
    for row in (line for line in text.splitlines() if line.startswith("|")):
        current = None
        for match in re.finditer(r"`((?:tests/)?test_\w+\.py(?:::\w+)?|::\w+)`( \(both\))?", row):
            ref, both = match.group(1), match.group(2) is not None
            if ref.startswith("::"):
                assert current is not None, f"{ref} follows no file in: {row[:80]}"
                name = ref[2:]
            else:
                current, _, name = ref.removeprefix("tests/").partition("::")
            path = REPO / "tests" / current
            if not path.is_file():
                missing.append(current)
            elif name:
                tests = functions_of(path)
                if name not in tests:
                    missing.append(f"{current}::{name}")
                elif both != ("lightning" in [a.arg for a in tests[name].args.args]):
                    missing.append(f"{current}::{name} {'(both)' if both else 'without (both)'}")
    repo_paths = r"(?<![\w/>.-])((?:docs|benchmarks|examples|cam_monitor|tests)/[\w./*-]+\.\w+)"
    for path in re.findall(repo_paths, text):  # not `<log_dir>/cam_monitor/...` outputs
        if not any(REPO.glob(path)):
            missing.append(path)
    assert not missing, missing


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_relative_link_resolves_to_a_file_and_anchor(page: Path) -> None:
    broken = []
    for target in relative_links(page.read_text()):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or REPO.resolve() not in linked.parents:
            broken.append(target)
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked.read_text())):
            broken.append(target)
    assert not broken, broken


def test_the_link_checker_sees_links_and_anchors() -> None:
    text = "# A `B` c's\n\n## A B cs\n\n```bash\n# no heading [x](no.md)\n```\n"
    text += "[y](z.md#a-b-cs-1) `[w](v.md)`"
    assert anchors(text) == {"a-b-cs", "a-b-cs-1"}
    assert list(relative_links(text)) == ["z.md#a-b-cs-1"]
