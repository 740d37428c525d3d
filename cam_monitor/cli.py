"""The `cam-monitor` command line: the text view of one run's CAM history or of runs compared.

  cam-monitor show RUN_DIR... [--probe P] [--layer L] [--method M] [--strict]
  cam-monitor compare RUN [RUN ...] [--group NAME=RUN,RUN ...]... [--out report.html]
                      [--epochs 0,5,10] [filters, --strict]

Exit status: 0 on success; 2 for a usage error or input that cannot be used (a missing, empty
or unreadable history, runs whose probes differ), with a one-line "cam-monitor: error:" message.
An unreadable eval-*.npz file (truncated, corrupt) is skipped with a warning that names it;
--strict turns that into an error.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from .compare import (
    SIMILARITIES,
    EpochComparison,
    Group,
    ReportError,
    Run,
    RunGroup,
    check_probes,
    common,
    common_epochs,
    compare_group,
    format_number,
    later_epochs_note,
    load_run,
    predictions,
    run_labels,
    summarize_groups,
)
from .history import Evaluation, HistoryError, Segmentation
from .report import require_matplotlib, write_report
from .schema import (
    DRIFT,
    EXCLUDED_SUFFIX,
    FAITHFULNESS,
    FAITHFULNESS_CHOICES,
    LOCALIZATION,
    LOCALIZATION_SCORES,
    MEASURES,
    PREVIOUS,
    REF,
    SECONDS_TAG,
    STATISTICS,
    STATS,
    ScalarKey,
    drift_stat,
    parse_scalar_tag,
    stat_label,
)

__all__ = ["build_parser", "format_table", "main"]

WIDTH = 100
_LIBRARY_HINT = " Delete the file, or pass strict=False to read_history to skip it."
_CLI_HINT = " Delete or restore the file to silence this warning; --strict makes it an error."
_STRICT_HINT = " Delete or restore the file, or leave out --strict to skip it with a warning."


class CliError(Exception):
    """A request the data cannot answer (no such probe, no common epoch): exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already explained
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    handler: Callable[[argparse.Namespace], int] = args.handler
    threads = torch.get_num_threads()
    # The tensors here are small (probe-sized maps): one thread is faster than torch's pool, and
    # leaves the other cores to the training runs this command is often used next to.
    torch.set_num_threads(1)
    try:
        return handler(args)
    except BrokenPipeError:  # `cam-monitor show run | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (HistoryError, ReportError, CliError, OSError) as exc:
        text = _one_line(str(exc)).replace(_LIBRARY_HINT, _STRICT_HINT)
        print(f"cam-monitor: error: {text}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors reported as "cam-monitor: error: ..." by subcommands too."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"cam-monitor: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with the `show` and `compare` subcommands."""
    parser = _Parser(
        prog="cam-monitor",
        description="Look at the Grad-CAM history CamMonitor wrote during training, or compare "
        "runs and groups of runs (seeds).",
    )
    commands = parser.add_subparsers(
        title="commands", metavar="COMMAND", required=True, parser_class=_Parser
    )
    show = commands.add_parser(
        "show",
        help="print every evaluation of a run: drift, localization and timing",
        description="Print every evaluation of a run: index, epoch, step, seconds, then per "
        "(probe, layer, method) the drift against the first (_ref) and previous (_prev) "
        "evaluation as distances (0 = unchanged), localization scores and entropy. 'nan' = "
        "undefined measure, '-' = not recorded, '*' = some images left out of the mean.",
    )
    show.add_argument(
        "run_dir",
        nargs="+",
        metavar="RUN_DIR",
        help="run directory or its history folder; a run resumed into a new logger version: "
        "their parent, or each version's folder, read as one history",
    )
    _add_filters(show)
    show.set_defaults(handler=_show)
    compare = commands.add_parser(
        "compare",
        help="compare runs, or groups of runs (seeds), optionally as an HTML report",
        description="Two runs: for every epoch evaluated in both, print the similarity between "
        "the runs' maps (spearman and topk_iou: 1 = same attention; js: 0 = same) and both "
        "runs' localization scores. More runs, or --group: print a summary at the last common "
        "epoch, each group's mean and min-max over its runs. The runs must have used the same "
        "probe data.",
    )
    compare.add_argument(
        "runs",
        nargs="*",
        metavar="RUN",
        help="run directories, each compared as a group of its own",
    )
    compare.add_argument(
        "--group",
        action="append",
        default=[],
        type=_group_spec,
        metavar="NAME=RUN,RUN",
        help="runs of one recipe (seeds) compared as one group named NAME; repeat per group",
    )
    compare.add_argument(
        "--out",
        metavar="REPORT.html",
        type=Path,
        help="also write a self-contained HTML report with curves and overlays (needs "
        "matplotlib: pip install cam-monitor[report])",
    )
    compare.add_argument(
        "--epochs",
        type=_epoch_list,
        metavar="E1,E2,...",
        help="the report's overlays at these common epochs (default: the first and the last); "
        "with two runs, also the only epochs in the printed table (default: every common epoch)",
    )
    _add_filters(compare)
    compare.set_defaults(handler=_compare)
    return parser


def _add_filters(parser: argparse.ArgumentParser) -> None:
    for name, example in (("probe", "target"), ("layer", "features.*"), ("method", "gradcam*")):
        parser.add_argument(
            f"--{name}",
            metavar=name[0].upper(),
            help=f"only this {name}; shell-style wildcards allowed, e.g. '{example}'",
        )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="fail on an unreadable eval-*.npz file instead of skipping it with a warning",
    )


def _group_spec(text: str) -> tuple[str, list[str]]:
    """Parse "dann=runs/s0,runs/s1" into ("dann", ["runs/s0", "runs/s1"]) (argparse `type`)."""
    name, sep, runs = text.partition("=")
    paths = [part for part in runs.split(",") if part.strip()]
    if not sep or not name.strip() or not paths:
        raise argparse.ArgumentTypeError(
            f"expected NAME=RUN,RUN such as dann=runs/dann_s0,runs/dann_s1, got {text!r}"
        )
    return name.strip(), paths


def _epoch_list(text: str) -> list[int]:
    """Parse "0,5,10" into [0, 5, 10] (argparse `type`)."""
    try:
        epochs = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated epoch numbers such as 0,5,10, got {text!r}"
        ) from None
    if not epochs or any(e < 0 for e in epochs):
        raise argparse.ArgumentTypeError(f"expected epoch numbers >= 0, got {text!r}")
    return list(dict.fromkeys(epochs))


# --------------------------------------------------------------------------- formatting


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], keep: int = 1, width: int = WIDTH
) -> list[str]:
    """Right-aligned text columns; tables wider than ``width`` are split into several, each
    repeating the first ``keep`` columns.

    Example:
        >>> print("\\n".join(format_table(["epoch", "a", "b"], [["0", "1.5", "x"]], width=12)))
        epoch    a
            0  1.5
        <BLANKLINE>
        epoch  b
            0  x
    """
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    chunks: list[list[int]] = []
    fixed = sum(widths[:keep]) + 2 * keep
    current: list[int] = []
    for column in range(keep, len(headers)):
        used = fixed + sum(widths[c] + 2 for c in current)
        if current and used + widths[column] > width:
            chunks.append(current)
            current = []
        current.append(column)
    if current or not chunks:
        chunks.append(current)
    lines: list[str] = []
    for number, chunk in enumerate(chunks):
        if number:
            lines.append("")
        columns = [*range(min(keep, len(headers))), *chunk]
        for cells in (headers, *rows):
            lines.append("  ".join(cells[c].rjust(widths[c]) for c in columns).rstrip())
    return lines


def format_bytes(count: int) -> str:
    """A size in KiB, MiB or GiB, 3 significant digits, in one word (a table cell).

    Example:
        >>> format_bytes(3 * 2**10), format_bytes(int(8.25 * 2**20)), format_bytes(500)
        ('3.00KiB', '8.25MiB', '0.49KiB')
    """
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if count >= size:
            digits = ".3g" if count / size >= 10 else ".2f"
            return f"{count / size:{digits}}{unit}"
    return f"{count / 2**10:.2f}KiB"


def _one_line(message: str) -> str:
    """Error messages on one line: a listing after a colon becomes comma-separated."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message
    return f"{lines[0]} {', '.join(lines[1:])}"


def _print(lines: Sequence[str] = ("",)) -> None:
    print("\n".join(lines))


# --------------------------------------------------------------------------- loading


def _load(run_dir: str | Sequence[str], strict: bool, name: str | None = None) -> Run:
    """Read a run; warnings about skipped files go to stderr as one line each, at once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = load_run(run_dir, strict=strict, name=name)
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            text = _one_line(str(warning.message)).replace(_LIBRARY_HINT, _CLI_HINT)
            print(f"cam-monitor: warning: {text}", file=sys.stderr)
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return run


def _matching(groups: Sequence[Group], args: argparse.Namespace) -> list[Group]:
    """Groups matching --probe/--layer/--method."""
    patterns = (args.probe, args.layer, args.method)
    return [
        g
        for g in groups
        if all(p is None or fnmatch.fnmatchcase(n, p) for n, p in zip(g, patterns, strict=True))
    ]


def _select(groups: Sequence[Group], args: argparse.Namespace, where: str) -> list[Group]:
    """Groups matching --probe/--layer/--method; none matching is a `CliError` listing choices."""
    chosen = _matching(groups, args)
    if groups and not chosen:
        available = "; ".join(
            f"{kind}s: {', '.join(dict.fromkeys(g[i] for g in groups))}"
            for i, kind in enumerate(("probe", "layer", "method"))
        )
        raise CliError(f"no (probe, layer, method) in {where} matches the filters; {available}")
    return chosen


# --------------------------------------------------------------------------- show


def _show(args: argparse.Namespace) -> int:
    run = _load(args.run_dir, args.strict)
    groups = _select(run.groups, args, str(run.folder))
    evaluations = run.evaluations
    # Every scalar tag recorded, parsed once: group scalars by key, the rest by name.
    tags = list(dict.fromkeys(name for ev in evaluations for name in ev.scalars))
    keys = {tag: parse_scalar_tag(tag) for tag in tags}
    present = {key: tag for tag, key in keys.items() if key is not None}
    probes = ", ".join(dict.fromkeys(g.probe for g in run.groups)) or "-"
    layers = ", ".join(dict.fromkeys(g.layer for g in run.groups)) or "-"
    methods = ", ".join(dict.fromkeys(g.method for g in run.groups)) or "-"
    _print(
        [
            f"cam-monitor history: {' + '.join(map(str, run.folders or [run.folder]))}",
            f"{len(evaluations)} evaluations; probes: {probes}; layers: {layers}; "
            f"methods: {methods}",
            "drift columns are distances (0 = unchanged): _ref to the first evaluation",
            "(or to the run given as reference=), _prev to the last one.",
            "'nan' = undefined, '-' = not recorded, '*' = some images left out of the mean.",
            "",
        ]
    )
    other = [tag for tag in tags if tag != SECONDS_TAG and keys[tag] is None]
    final = any(ev.final for ev in evaluations)  # the one added at the end of fit
    headers = ["index", "epoch", "step", "seconds", "history", *other, "time"]
    headers += ["final"] if final else []
    rows = [
        [
            str(ev.index),
            str(ev.epoch),
            str(ev.step),
            format_number(ev.scalars.get(SECONDS_TAG)),
            format_bytes(ev.nbytes),  # what its history file holds
            *(format_number(ev.scalars.get(name)) for name in other),
            ev.time or "-",
            *([("yes" if ev.final else "")] if final else []),
        ]
        for ev in evaluations
    ]
    _print(format_table(headers, rows, keep=2))
    _print(_predictions(run, list(dict.fromkeys(g.probe for g in groups))))
    for group in groups:
        columns = _group_columns(group, present)
        _print(["", " / ".join(group)])
        if not columns:
            _print(["(no scalars recorded)"])
            continue
        rows = []
        for ev in evaluations:
            cells = [str(ev.index), str(ev.epoch)]
            for key in columns:
                cell = format_number(ev.scalars.get(present[key]))
                excluded = present.get(key.excluded)
                if excluded is not None and ev.scalars.get(excluded, 0) > 0:
                    cell += "*"
                cells.append(cell)
            rows.append(cells)
        _print(format_table(["index", "epoch", *(key.stat for key in columns)], rows, keep=2))
    return 0


def _predictions(run: Run, probes: Sequence[str]) -> list[str]:
    """What the model predicted on each probe at the last evaluation, by class name where the
    history stores the names (CamMonitor's ``class_names``). A segmentation probe's prediction
    is each image's main predicted class (``target="predicted"``'s rule), beside the class its
    maps explain and how well that class is segmented."""
    if not run.evaluations:
        return []
    last = run.evaluations[-1]
    names = last.class_names
    lines = ["", f"predictions at the last evaluation (index {last.index}, epoch {last.epoch})"]
    if names is None:
        lines[-1] += ", classes by index (no names stored)"
    for probe in probes:
        predicted = predictions(last, probe)
        if predicted is None:
            continue
        segmentation = last.segmentation.get(probe)
        unknown = "no class" if segmentation is not None else "NaN or inf logits"
        text = f"  {probe}: predicted {_counts(predicted, names, unknown)}"
        labels = last.labels.get(probe)
        if labels is not None and len(labels) == len(predicted):
            text += f"; {int((labels == predicted).sum())}/{len(labels)} correct"
        lines.append(text)
        if segmentation is not None:
            lines.extend(_segmentation_lines(last, probe, segmentation, names))
    return lines


def _segmentation_lines(
    evaluation: Evaluation, probe: str, segmentation: Segmentation, names: Sequence[str] | None
) -> list[str]:
    """What `show` adds for a segmentation probe: the rule of its prediction, the classes its
    maps explain, and that class's IoU, pixel accuracy and share of the pixels."""
    lines = [
        "    (per image: its most frequent predicted class other than the background, class 0)"
    ]
    explained = evaluation.targets.get(probe)
    if explained is not None:
        counted = _counts(explained, names, "a target callable's scores")
        lines.append(f"    explained {counted}")
    texts = [
        f"{what} {_mean(values)}"
        for what, values in (("IoU", segmentation.iou), ("pixel accuracy", segmentation.accuracy))
        if values is not None
    ]
    if segmentation.share is not None:
        texts.append(f"{_mean(segmentation.share, percent=True)} of the pixels")
    if texts:
        count = len(segmentation.predicted)
        lines.append(f"    explained class, mean of {count} images: {', '.join(texts)}")
    return lines


def _counts(classes: np.ndarray, names: Sequence[str] | None, unknown: str) -> str:
    """Classes by how many images have them, the most frequent first (8 at most), and the
    images with none (index -1: ``unknown`` says why)."""
    classes = np.asarray(classes, dtype=np.int64)
    known = classes[classes >= 0]
    counts = np.bincount(known) if known.size else np.zeros(0, np.int64)
    order = sorted(np.flatnonzero(counts).tolist(), key=lambda c: (-counts[c], c))
    shown = [f"{_class(c, names)} x{counts[c]}" for c in order[:8]]
    if len(order) > 8:
        shown.append(f"... ({len(order)} classes)")
    if len(known) < len(classes):
        shown.append(f"none x{len(classes) - len(known)} ({unknown})")
    return ", ".join(shown)


def _mean(values: np.ndarray, percent: bool = False) -> str:
    """The mean of the finite values (as a percentage with `percent`), with how many images it
    covers when some are undefined."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return "nan"
    mean = float(finite.mean())
    text = f"{mean:.1%}" if percent else format_number(mean)
    return text if finite.size == len(values) else f"{text} ({finite.size} of {len(values)})"


def _class(index: int, names: Sequence[str] | None) -> str:
    """A class by name when known, else by index."""
    return names[index] if names is not None and 0 <= index < len(names) else str(index)


def _group_columns(group: Group, present: dict[ScalarKey, str]) -> list[ScalarKey]:
    """The recorded scalars of one group: drift, localization, stats, then any others."""
    wanted = [
        *(ScalarKey(DRIFT, group, drift_stat(m, a)) for m in MEASURES for a in (REF, PREVIOUS)),
        *(ScalarKey(LOCALIZATION, group, score) for score in LOCALIZATION_SCORES),
        *(ScalarKey(STATISTICS, group, stat) for stat in STATS),
        *(ScalarKey(FAITHFULNESS, group, stat) for stat in FAITHFULNESS_CHOICES),
    ]
    columns = [key for key in wanted if key in present]
    taken = set(columns)
    for key in sorted(present, key=present.__getitem__):
        if key.maps == group and key not in taken and not key.stat.endswith(EXCLUDED_SUFFIX):
            columns.append(key)
    return columns


# --------------------------------------------------------------------------- compare


def _compare(args: argparse.Namespace) -> int:
    if args.out is not None:
        if args.out.is_dir():
            raise CliError(f"--out {args.out} is a folder; give a file name such as report.html")
        folder = args.out.absolute().parent
        try:  # the report would make it anyway: made first, so a bad path fails before the work
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CliError(
                f"--out {args.out}: cannot make its folder {folder} ({err.strerror}); give "
                "another path"
            ) from err
        if not os.access(folder, os.W_OK):
            raise CliError(f"--out {args.out}: {folder} is not writable; give another path")
        require_matplotlib()  # fail before the work, not after it
    if not args.group and len(args.runs) == 2:
        return _compare_two(args)
    groups = _load_groups(args)
    every = [run for group in groups for run in group.runs]
    notes = check_probes(*every)
    notes.extend(_repeated(every))
    for note in notes:
        print(f"cam-monitor: warning: {note}", file=sys.stderr)
    keys = groups[0].keys
    for group in groups[1:]:
        keys = common(keys, group.keys)
    shared = set(keys)
    left_out = [  # what is not compared, as `only in` says for two runs
        f"only in {run.name}, not in every run (not compared): {_names(alone)}"
        for run in every
        if (alone := [g for g in _matching(run.groups, args) if g not in shared])
    ]
    keys = _select(keys, args, "every run")
    if not keys:
        raise CliError(
            "the runs have no (probe, layer, method) in common: "
            + "; ".join(f"{run.name} has {_names(run.groups)}" for run in every)
        )
    epochs = common_epochs(*every)
    if not epochs:
        raise CliError(
            "the runs have no evaluated epoch in common: "
            + "; ".join(f"{run.name} has {_span(list(run.by_epoch))}" for run in every)
        )
    overlays = _chosen_epochs(args, epochs, "every run")
    _note_later_epochs(every, epochs[-1], notes)
    lines = ["Groups (each number: the mean over a group's runs, [min, max] when they differ):"]
    for group in groups:
        lines.append(f"  {group.name}: {', '.join(run.name for run in group.runs)}")
    last = epochs[-1]
    lines += [
        f"common epochs: {_span(epochs)}",
        f"Summary at epoch {last} (the last common epoch): localization (1 = all on the mask)",
        "and drift from each run's reference (its first evaluation, or its reference= run;",
        "0 = unchanged); difference = each group's mean minus the first group's;",
        "higher = the group with the higher mean ('overlap': ranges overlap).",
        "'nan' = undefined, '-' = not recorded (e.g. drift at the baseline);",
        "'(k of n runs)': only k of the group's runs have a defined value.",
    ]
    _print(lines)
    rows = summarize_groups(groups, keys, last)
    headers = ["probe / layer / method", "measure", *(g.name for g in groups)]
    headers += [f"{g.name}-{groups[0].name}" for g in groups[1:]]
    headers.append("higher")
    table = []
    for row in rows:
        best = row.highest
        higher = "-" if best is None else groups[best].name
        if best is not None and row.overlaps and any(len(g.runs) > 1 for g in groups):
            higher += " (overlap)"
        table.append(
            [
                " / ".join(row.key.maps),
                stat_label(row.key.stat) if row.key.kind == FAITHFULNESS else row.key.stat,
                *(value.text() for value in row.values),
                *(format_number(d) for d in row.differences),
                higher,
            ]
        )
    _print([""])
    _print(format_table(headers, table, keep=2))
    for note in left_out:
        _print(["", *textwrap.wrap(note, WIDTH, subsequent_indent="  ")])
    if args.out is not None:
        path = write_report(args.out, groups, keys=keys, epochs=epochs, overlays=overlays,
                            notes=[*notes, *left_out])  # fmt: skip
        _print(["", f"report written to {path}"])
    return 0


def _note_later_epochs(runs: Sequence[Run], last: int, notes: list[str]) -> None:
    """Say (and add to the report's `notes`) which runs end the common epochs at `last`."""
    later = later_epochs_note(runs, last)
    if later:
        notes.append(later)
        print(f"cam-monitor: note: {later}", file=sys.stderr)


def _load_groups(args: argparse.Namespace) -> list[RunGroup]:
    """The runs of ``--group`` options and the lone positional runs, as `RunGroup`s."""
    specs: list[tuple[str | None, list[str]]] = [(None, [path]) for path in args.runs]
    specs += [(name, paths) for name, paths in args.group]
    paths = [path for _, group in specs for path in group]
    if len(paths) < 2 or len(specs) < 2:
        raise CliError(
            "compare needs at least two runs, or two groups (--group NAME=RUN,RUN), got "
            f"{len(paths)} run(s) in {len(specs)} group(s)"
        )
    resolved = [Path(path).resolve() for path in paths]
    twice = [str(p) for p in dict.fromkeys(resolved) if resolved.count(p) > 1]
    if twice:
        raise CliError(f"run {twice[0]} is given twice; name each run once")
    labels = iter(run_labels(*resolved))
    groups: list[RunGroup] = []
    for name, group in specs:
        runs = tuple(_load(path, args.strict, name=next(labels)) for path in group)
        groups.append(RunGroup(runs[0].name if name is None else name, runs))
    _check_distinct([run for group in groups for run in group.runs])
    names = [group.name for group in groups]
    clash = [name for name in dict.fromkeys(names) if names.count(name) > 1]
    if clash:
        raise CliError(f"group name {clash[0]!r} is used twice; give each group its own name")
    return groups


def _check_distinct(runs: Sequence[Run]) -> None:
    """Two paths to one history (a run folder and its cam_monitor/ folder) are one run: counted
    twice, it would be a seed of its own, or a run compared with itself."""
    seen: dict[Path, Run] = {}
    for run in runs:
        first = seen.setdefault(run.folder.resolve(), run)
        if first is not run:
            raise CliError(
                f"{first.name} and {run.name} are the same run (history {run.folder}); name "
                "each run once"
            )


def _repeated(runs: Sequence[Run]) -> list[str]:
    return [
        f"{run.name} has several evaluations at epoch(s) {_span(run.repeated_epochs)}; "
        "the first of each epoch is compared"
        for run in runs
        if run.repeated_epochs
    ]


def _chosen_epochs(args: argparse.Namespace, epochs: list[int], where: str) -> list[int] | None:
    """The --epochs list, checked against the common epochs; None without it."""
    if args.epochs is None:
        return None
    missing = [e for e in args.epochs if e not in epochs]
    if missing:
        raise CliError(
            f"--epochs {','.join(map(str, missing))} not evaluated in {where}; common "
            f"epochs: {_span(epochs)}"
        )
    return sorted(args.epochs)


def _compare_two(args: argparse.Namespace) -> int:
    """Two runs: the epoch-by-epoch comparison of their maps, as before groups existed."""
    label_a, label_b = run_labels(*(Path(path).resolve() for path in args.runs))
    a = _load(args.runs[0], args.strict, name=label_a)
    b = _load(args.runs[1], args.strict, name=label_b)
    _check_distinct([a, b])
    notes = check_probes(a, b)
    notes.extend(_repeated([a, b]))
    for note in notes:
        print(f"cam-monitor: warning: {note}", file=sys.stderr)
    groups = _select(common(a.groups, b.groups), args, "both runs")
    if not groups:
        raise CliError(
            f"runs {a.name} and {b.name} have no (probe, layer, method) in common: "
            f"A has {_names(a.groups)}; B has {_names(b.groups)}"
        )
    epochs = common_epochs(a, b)
    if not epochs:
        raise CliError(
            f"runs {a.name} and {b.name} have no evaluated epoch in common: A has epochs "
            f"{_span(list(a.by_epoch))}, B has {_span(list(b.by_epoch))}"
        )
    chosen = _chosen_epochs(args, epochs, "both runs")
    shown = epochs if chosen is None else chosen
    _note_later_epochs([a, b], epochs[-1], notes)
    _print(
        [
            f"A: {a.name}  ({a.folder}, {len(a.evaluations)} evaluations)",
            f"B: {b.name}  ({b.folder}, {len(b.evaluations)} evaluations)",
            f"common epochs: {_span(epochs)}",
            "Similarity of the runs' maps at the same epoch, mean over the probe images: "
            "spearman, topk_iou:",
            "1 = same attention; js (Jensen-Shannon divergence): 0 = same. <score>_A, <score>_B: "
            "each run's",
            "localization score. 'nan' = undefined, '-' = not recorded, '*' = see the notes "
            "below a table.",
        ]
    )
    for group in groups:
        _print_comparison(group, compare_group(a, b, group, shown), (a, b))
    for run, other in ((a, set(b.groups)), (b, set(a.groups))):
        alone = [g for g in run.groups if g not in other]
        if alone:
            _print(["", f"only in {run.name} (not compared): {_names(alone)}"])
    if args.out is not None:
        path = write_report(args.out, [a, b], keys=groups, epochs=epochs, overlays=chosen,
                            notes=notes)  # fmt: skip
        _print(["", f"report written to {path}"])
    return 0


def _print_comparison(group: Group, rows: Sequence[EpochComparison], runs: tuple[Run, Run]) -> None:
    images = max((r.images for r in rows), default=0)
    scores = [
        s
        for s in LOCALIZATION_SCORES
        if any(s in r.localization_a or s in r.localization_b for r in rows)
    ]
    headers = ["epoch", *SIMILARITIES]
    for score in scores:
        headers += [f"{score}_A", f"{score}_B"]
    table, notes = [], []
    for row in rows:
        cells = [str(row.epoch)]
        for measure in SIMILARITIES:
            mean, left_out = row.similarity.get(measure, (None, 0))
            cells.append(format_number(mean) + ("*" if left_out else ""))
        excluded = {}  # localization means over fewer images, as `show` marks them
        for score in scores:
            for side, run, values in (("A", runs[0], row.localization_a),
                                      ("B", runs[1], row.localization_b)):  # fmt: skip
                tag = ScalarKey(LOCALIZATION, group, score).excluded.tag
                count = run.by_epoch[row.epoch].scalars.get(tag, 0)
                cells.append(format_number(values.get(score)) + ("*" if count > 0 else ""))
                if count > 0:
                    excluded[f"{score}_{side}"] = int(count)
        table.append(cells)
        left = {m: n for m, (_, n) in row.similarity.items() if n}
        if row.note:
            notes.append(f"epoch {row.epoch}: {row.note}")
        elif left:
            counts = ", ".join(f"{m} {n}" for m, n in left.items())
            notes.append(
                f"epoch {row.epoch}: images left out (measure undefined, e.g. a constant map): "
                f"{counts} of {row.images}"
            )
        if excluded:
            counts = ", ".join(f"{name} {n}" for name, n in excluded.items())
            notes.append(f"epoch {row.epoch}: images left out of a run's localization: {counts}")
    _print(["", f"{' / '.join(group)}  ({images} images)"])
    _print(format_table(headers, table, keep=1))
    if notes:
        _print([f"  * {note}" for note in notes])


def _names(groups: Sequence[Group]) -> str:
    return ", ".join(" / ".join(g) for g in groups) or "nothing"


def _span(epochs: Sequence[int]) -> str:
    """Epochs as text, long lists shortened.

    Example:
        >>> _span([0, 1, 2]), _span(list(range(20)))
        ('0, 1, 2', '0, 1, 2, 3, 4, ..., 15, 16, 17, 18, 19 (20 epochs)')
    """
    if len(epochs) <= 12:
        return ", ".join(map(str, epochs)) or "none"
    head, tail = ", ".join(map(str, epochs[:5])), ", ".join(map(str, epochs[-5:]))
    return f"{head}, ..., {tail} ({len(epochs)} epochs)"


if __name__ == "__main__":
    sys.exit(main())
