"""Every tag, history key and fixed name the monitor writes, built and parsed in one place.

Evaluations carry structured keys (`MapKey`, `ScalarKey`); they become strings only where they
leave the process (a logger, a history file). A name component (probe, layer, method) is written
verbatim except for ``%``, ``/``, ``\\`` and control characters, which become ``%XX``, so any name
round-trips and the usual ones (``source``, ``features.29``, ``gradcam++``) read unchanged.

Example:
    >>> key = ScalarKey(DRIFT, MapKey("val", "layer4.1.conv2", "gradcam"), drift_stat("js", REF))
    >>> key.tag
    'cam_drift/val/layer4.1.conv2/gradcam/js_ref'
    >>> parse_scalar_tag(key.tag) == key
    True
    >>> MapKey.parse(MapKey("domain/a", "l", "m").encoded)
    MapKey(probe='domain/a', layer='l', method='m')
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple
from urllib.parse import unquote

#: Drift measures, each logged as a distance (0 = the same attention).
MEASURES: tuple[str, ...] = ("spearman", "pearson", "topk_iou", "js", "com_shift")
#: The measures logged by default (`drift_measures=`): rank agreement over the whole map, and
#: whether the hot spot stayed put. The others repeat them for the question "did it move?".
DEFAULT_MEASURES: tuple[str, ...] = ("spearman", "topk_iou")
#: Localization scores against ground-truth masks (1 = all attention on the object).
LOCALIZATION_SCORES: tuple[str, ...] = ("energy", "pointing", "mask_iou")
#: Faithfulness measures (`faithfulness.faithfulness`): what perturbing the image by its map does
#: to the class score. Lower drop and deletion are better, higher increase and insertion.
FAITHFULNESS_MEASURES: tuple[str, ...] = ("drop", "increase", "deletion", "insertion")
#: The randomisation sanity check's statistic: Spearman, real vs randomised maps (lower is better).
SANITY = "sanity"
#: What `CamMonitor(faithfulness=...)` may choose.
FAITHFULNESS_CHOICES: tuple[str, ...] = (*FAITHFULNESS_MEASURES, SANITY)
#: What runs by default: measured in benchmarks/faithfulness_cost.py (docs/faithfulness.md).
DEFAULT_FAITHFULNESS: tuple[str, ...] = ()
#: The trust statistics where lower is better (the others: higher is better).
LOWER_IS_BETTER: frozenset[str] = frozenset({"drop", "deletion", SANITY})
#: Per-map statistics.
ENTROPY = "entropy"
STATS: tuple[str, ...] = (ENTROPY,)
#: What drift is measured against: the previous evaluation, or the reference (the first one).
PREVIOUS, REF = "prev", "ref"
AGAINST: tuple[str, ...] = (PREVIOUS, REF)

#: Scalar families: one tag prefix each.
DRIFT, LOCALIZATION, STATISTICS = "cam_drift", "cam_loc", "cam_stats"
#: Scalars that say whether the maps can be trusted: faithfulness and the sanity check.
FAITHFULNESS = "cam_faith"
SCALAR_KINDS: tuple[str, ...] = (DRIFT, LOCALIZATION, STATISTICS, FAITHFULNESS)
#: Prefix of overlay-grid image tags, and of filter-view image tags.
IMAGE_PREFIX, FILTER_PREFIX = "cam", "filters"
#: The layer name under which pixel-level methods (saliency, IG, ...) store their maps:
#: `result[INPUT_LAYER, "saliency"]` (exported as `cam_monitor.INPUT_LAYER`, once `INPUT_KEY`).
INPUT_LAYER = "input"
#: Prefix of the monitor's own tags: its cost per evaluation, each probe set's content hash.
MONITOR_PREFIX = "cam_monitor"
#: The monitor's own cost per evaluation, in seconds.
SECONDS_TAG = f"{MONITOR_PREFIX}/seconds"
#: Suffix of the count of images left out of a mean (all-zero, constant or non-finite maps).
EXCLUDED_SUFFIX = "_excluded"
_PROBE_HASH_PREFIX = f"{MONITOR_PREFIX}/probe_hash/"
#: The prefixes of every tag the monitor puts into the trainer's metrics (its scalar families and
#: its own tags): what another callback's `monitor=` may name.
METRIC_PREFIXES: tuple[str, ...] = (*(f"{kind}/" for kind in SCALAR_KINDS), f"{MONITOR_PREFIX}/")


def encode(name: str) -> str:
    """One name component as it appears in a tag or history key (``/`` becomes ``%2F``)."""
    if _PLAIN_NAME.fullmatch(name):  # most names: nothing to escape (an evaluation has many)
        return name
    return "".join(
        f"%{ord(ch):02X}" if ch in "%/\\" or ord(ch) < 32 or ord(ch) == 127 else ch for ch in name
    )


#: A name `encode` leaves as it is.
_PLAIN_NAME = re.compile(r"[^%/\\\x00-\x1f\x7f]*")


def decode(part: str) -> str:
    """The inverse of `encode`."""
    return unquote(part)


def join(*parts: str) -> str:
    """Encoded components joined with ``/``."""
    return "/".join(encode(part) for part in parts)


def split(text: str) -> list[str]:
    """Decoded components of a ``/``-joined string (the inverse of `join`)."""
    return [decode(part) for part in text.split("/")]


class MapKey(NamedTuple):
    """Which maps: a probe set, a layer (or `INPUT_LAYER`) and a method."""

    probe: str
    layer: str
    method: str

    @property
    def encoded(self) -> str:
        """``probe/layer/method`` with each part encoded (history keys, state dicts)."""
        return join(*self)

    @classmethod
    def parse(cls, text: str) -> MapKey:
        """Read back `encoded`; anything but three components is a ValueError."""
        parts = split(text)
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"{text!r} is not an encoded probe/layer/method key")
        return cls(*parts)


class ScalarKey(NamedTuple):
    """One logged number: its family (`SCALAR_KINDS`), maps and statistic (``js_ref``, ...)."""

    kind: str
    maps: MapKey
    stat: str

    @property
    def tag(self) -> str:
        """``cam_drift/<probe>/<layer>/<method>/<stat>``, as logged."""
        return f"{self.kind}/{self.maps.encoded}/{self.stat}"

    @property
    def excluded(self) -> ScalarKey:
        """The key of the count of images left out of this mean."""
        return self._replace(stat=self.stat + EXCLUDED_SUFFIX)


def drift_stat(measure: str, against: str) -> str:
    """``spearman_ref``: the statistic name of a drift measure against `PREVIOUS` or `REF`."""
    return f"{measure}_{against}"


def parse_drift_stat(stat: str) -> tuple[str, str] | None:
    """(measure, against) of a drift statistic, or None."""
    measure, _, against = stat.rpartition("_")
    return (measure, against) if measure in MEASURES and against in AGAINST else None


def parse_scalar_tag(tag: str) -> ScalarKey | None:
    """The key of a ``cam_drift``/``cam_loc``/``cam_stats`` tag, or None for any other tag."""
    parts = tag.split("/")
    if len(parts) != 5 or parts[0] not in SCALAR_KINDS or not all(parts):
        return None
    return ScalarKey(parts[0], MapKey(*(decode(p) for p in parts[1:4])), parts[4])


def image_tag(key: MapKey) -> str:
    """``cam/<probe>/<layer>/<method>``: the tag of an overlay grid."""
    return f"{IMAGE_PREFIX}/{key.encoded}"


#: Views of a signed map: the whole map, its positive part, its negative part.
ALL_VIEW = "all"
VIEWS: tuple[str, ...] = (ALL_VIEW, "pos", "neg")


def view_method(method: str, view: str) -> str:
    """The method part of a view's grid key: `method` for the whole map, else ``method_pos``.

    Example:
        >>> view_method("deconvnet", "all"), view_method("deconvnet", "neg")
        ('deconvnet', 'deconvnet_neg')
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {view!r}.")
    return method if view == ALL_VIEW else f"{method}_{view}"


def parse_view_method(name: str) -> tuple[str, str]:
    """(method, view) of a grid's method part: the inverse of `view_method`.

    Example:
        >>> parse_view_method("guided_backprop_pos"), parse_view_method("gradcam")
        (('guided_backprop', 'pos'), ('gradcam', 'all'))
    """
    method, _, view = name.rpartition("_")
    return (method, view) if method and view in VIEWS[1:] else (name, ALL_VIEW)


def filter_channel_tag(probe: str, layer: str, channel: int) -> str:
    """``filters/<probe>/<layer>/channel_<c>``: one channel's activations on a probe set."""
    return f"{FILTER_PREFIX}/{join(probe, layer)}/channel_{channel}"


def filter_maximised_tag(layer: str) -> str:
    """``filters/<layer>/maximised``: the inputs optimised to excite each channel of a layer."""
    return f"{FILTER_PREFIX}/{encode(layer)}/maximised"


def probe_hash_tag(probe: str) -> str:
    """``cam_monitor/probe_hash/<probe>``: where each probe set's content hash is recorded."""
    return _PROBE_HASH_PREFIX + encode(probe)


def check_probe_name(name: object) -> str:
    """A probe-set name that tags and folders can hold; anything else is a ValueError.

    Example:
        >>> check_probe_name("target")
        'target'
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"probe set names must be non-empty strings, got {name!r}.")
    if (
        name != name.strip()
        or name in (".", "..")  # a folder of PNGs named ".." would sit outside the run
        or any(ch in "/\\" or ord(ch) < 32 or ord(ch) == 127 for ch in name)
    ):
        raise ValueError(
            f"probe set name {name!r} cannot be used in a tag or a folder: use letters, digits, "
            "'.', '-' or '_' (no '/', '\\', control characters, surrounding spaces, '.' or '..')."
        )
    return name


# --------------------------------------------------------------------------- history files

#: The monitor's folder inside the first logger's folder (or the trainer's), unless `save_dir`.
HISTORY_FOLDER = "cam_monitor"
#: The file holding a run's probe, next to its evaluation files.
PROBE_FILE = "probe.npz"
#: Array names inside history files: ``maps/<probe>/<layer>/<method>``, ``<kind>/<probe>``
#: (``targets``, ``logits``, ``labels``, `SEGMENTATION_ARRAYS`; the probe's ``inputs``,
#: ``labels``, ``masks``, `LABEL_MAPS_ARRAY`), ``meta``.
MAPS_ARRAY, META_ARRAY = "maps", "meta"
#: The per-image arrays of a segmentation probe in an evaluation file, ``<kind>/<probe>``
#: (optional: a classifier's probes, and files written before they existed, have none): each
#: image's predicted class by the `target="predicted"` rule, and how the model predicts the class
#: its map explains: the share of the image's pixels, then (with label maps) IoU and accuracy.
PREDICTED_ARRAY, CLASS_SHARE_ARRAY = "predicted", "class_share"
CLASS_IOU_ARRAY, CLASS_ACCURACY_ARRAY = "class_iou", "class_accuracy"
SEGMENTATION_ARRAYS = (PREDICTED_ARRAY, CLASS_SHARE_ARRAY, CLASS_IOU_ARRAY, CLASS_ACCURACY_ARRAY)
#: The probe file's class-index maps of a segmentation probe: ``label_maps/<probe>``.
LABEL_MAPS_ARRAY = "label_maps"
_EVALUATION_FILE = re.compile(r"eval-(\d{5,})\.npz")
_TEMPORARY_FILE = re.compile(r"\.eval-(\d{5,})\.npz\.[0-9a-f]+\.tmp")


def evaluation_file(index: int) -> str:
    """The name of evaluation `index`'s file in a history folder (more digits past 99999).

    Example:
        >>> evaluation_file(7), evaluation_index("eval-00007.npz"), evaluation_index("x.npz")
        ('eval-00007.npz', 7, None)
    """
    return f"eval-{index:05d}.npz"


def evaluation_index(name: str) -> int | None:
    """The index in an evaluation file's name, also a non-canonical one (``eval-000007.npz``:
    compare with `evaluation_file`), or None for any other name."""
    match = _EVALUATION_FILE.fullmatch(name)
    return int(match.group(1)) if match else None


def temporary_file(name: str, token: str) -> str:
    """The hidden name a history file is written under before it is renamed to `name`."""
    return f".{name}.{token}.tmp"


def temporary_index(name: str) -> int | None:
    """The index of the evaluation a temporary file was written for, or None (not one)."""
    match = _TEMPORARY_FILE.fullmatch(name)
    return int(match.group(1)) if match else None


def map_array(key: MapKey) -> str:
    """``maps/<probe>/<layer>/<method>``, each part encoded: the array of one key's maps."""
    return join(MAPS_ARRAY, *key)


def probe_array(kind: str, probe: str) -> str:
    """``<kind>/<probe>``, the probe encoded: one probe set's targets, logits, labels, ...."""
    return join(kind, probe)


def parse_array(name: str) -> list[str]:
    """The decoded parts of an array name (the inverse of `map_array` and `probe_array`)."""
    return split(name)


# --------------------------------------------------------------------------- what each tag means


class Label(NamedTuple):
    """How one measure or score reads: a `short` name (report tables and panels), a chart
    `title` with its direction, and a `description` sentence (the dashboard's tooltips)."""

    short: str
    title: str
    description: str


#: Each drift measure as a distance: what it computes, and its range (0 = the same attention).
MEASURE_LABELS: dict[str, Label] = {
    "spearman": Label(
        "1 - Spearman",
        "1 - Spearman rank corr. (distance, 0 = same)",
        "1 - Spearman rank correlation of the two maps: a distance, 0 = the same ranking "
        "of pixels, 1 = unrelated, 2 = reversed",
    ),
    "pearson": Label(
        "1 - Pearson",
        "1 - Pearson corr. (distance, 0 = same)",
        "1 - Pearson correlation of the two maps: a distance, 0 = the same up to scale, "
        "1 = unrelated, 2 = inverted",
    ),
    "topk_iou": Label(
        "1 - top-k IoU",
        "1 - top-k IoU (distance, 0 = same hot spot)",
        "1 - IoU of the two maps' hottest pixels (the top `topk` fraction): a distance, "
        "0 = the same hot spot, 1 = disjoint hot spots",
    ),
    "js": Label(
        "JS divergence",
        "Jensen-Shannon divergence (distance, 0 = same)",
        "Jensen-Shannon divergence of the maps as distributions (natural log): a distance, "
        "0 = the same, ln 2 = 0.69 = disjoint",
    ),
    "com_shift": Label(
        "centre shift",
        "centre-of-mass shift / diagonal (distance, 0 = same)",
        "shift of the maps' centre of mass, as a fraction of the map diagonal: a "
        "distance, 0 = the same place, 1 = opposite corners",
    ),
}
#: Each localization score against the ground-truth masks (1 = all attention on the object).
LOCALIZATION_LABELS: dict[str, Label] = {
    "energy": Label(
        "energy in mask",
        "energy inside the mask (score, 1 = on the object)",
        "share of the map's energy inside the mask: a score, 1 = all attention on the "
        "object, 0 = none",
    ),
    "pointing": Label(
        "pointing game",
        "pointing game (score, 1 = all hit)",
        "pointing game: share of images whose hottest pixel lies in the mask (grown by "
        "`pointing_tolerance`): a score, 1 = all hit",
    ),
    "mask_iou": Label(
        "top-k IoU with mask",
        "top-k IoU with the mask (score, 1 = they coincide)",
        "IoU of the map's top `topk` pixels with the mask: a score, 1 = they coincide",
    ),
}
#: Each per-map statistic.
STAT_LABELS: dict[str, Label] = {
    "entropy": Label(
        "entropy",
        "map entropy / ln(h*w) (1 = diffuse)",
        "entropy of the map as a distribution, over its maximum ln(h*w): 1 = uniform "
        "(diffuse) attention, 0 = one hot pixel",
    ),
}
#: Each faithfulness measure and the sanity check, with its direction.
FAITHFULNESS_LABELS: dict[str, Label] = {
    "drop": Label(
        "average drop",
        "average drop (lower is better)",
        "Average Drop: the share of the class score lost when only the map's region is kept "
        "(the image times the map), relu(s(x) - s(m*x)) / s(x): lower is better, 0 = nothing "
        "lost",
    ),
    "increase": Label(
        "increase in confidence",
        "increase in confidence (higher is better)",
        "Increase in Confidence: share of images whose class score rises when only the map's "
        "region is kept: higher is better",
    ),
    "deletion": Label(
        "deletion AUC",
        "deletion AUC (lower is better)",
        "deletion: area under the class score as the map's most important pixels are removed "
        "first (RISE): lower is better, the score falls fast",
    ),
    "insertion": Label(
        "insertion AUC",
        "insertion AUC (higher is better)",
        "insertion: area under the class score as the map's most important pixels are "
        "restored first onto a blank image (RISE): higher is better",
    ),
    SANITY: Label(
        "sanity (Spearman vs randomised)",
        "sanity: Spearman vs randomised model (lower is better)",
        "randomisation sanity check: Spearman correlation of the maps with those of a copy "
        "whose layers after the monitored one are re-initialised: lower is better, near 1 = "
        "the maps do not depend on what the model learned",
    ),
}
#: The descriptions and chart titles alone, by name (views of the tables above).
MEASURE_DESCRIPTIONS = {name: label.description for name, label in MEASURE_LABELS.items()}
LOCALIZATION_DESCRIPTIONS = {name: label.description for name, label in LOCALIZATION_LABELS.items()}
STAT_DESCRIPTIONS = {name: label.description for name, label in STAT_LABELS.items()}
FAITHFULNESS_DESCRIPTIONS = {name: label.description for name, label in FAITHFULNESS_LABELS.items()}
MEASURE_TITLES = {name: label.title for name, label in MEASURE_LABELS.items()}

_AGAINST_WORDS = {
    PREVIOUS: "against the previous evaluation",
    REF: "against the reference (the first evaluation, or `reference=`)",
}
_FAMILY_WORDS = {
    DRIFT: "Attention drift",
    LOCALIZATION: "Localization",
    STATISTICS: "Map statistic",
    FAITHFULNESS: "Faithfulness",
}


def describe(name: ScalarKey | str) -> str:
    """What a logged scalar means, its direction and range, in a sentence ('' if unknown).

    Example:
        >>> describe(ScalarKey(DRIFT, MapKey("target", "conv4", "gradcam"), "topk_iou_prev"))[:71]
        'Attention drift of gradcam at conv4 on the target probe set against the'
        >>> "0 = the same hot spot" in describe("cam_drift/target/conv4/gradcam/topk_iou_ref")
        True
    """
    if isinstance(name, str):
        if name == SECONDS_TAG:
            return "Seconds the monitor spent on this evaluation (compute, draw, score, log)."
        parsed = parse_scalar_tag(name)
        if parsed is None:
            return ""
        name = parsed
    stat, excluded = name.stat, name.stat.endswith(EXCLUDED_SUFFIX)
    if excluded:
        stat = stat[: -len(EXCLUDED_SUFFIX)]
    what, against = "", ""
    if name.kind == DRIFT and parse_drift_stat(stat) is not None:
        measure, side = parse_drift_stat(stat)  # type: ignore[misc]
        what, against = MEASURE_DESCRIPTIONS[measure], " " + _AGAINST_WORDS[side]
    elif name.kind == LOCALIZATION:
        what = LOCALIZATION_DESCRIPTIONS.get(stat, "")
    elif name.kind == STATISTICS:
        what = STAT_DESCRIPTIONS.get(stat, "")
    elif name.kind == FAITHFULNESS:
        what = FAITHFULNESS_DESCRIPTIONS.get(stat, "")
    if not what:
        return ""
    probe, layer, method = name.maps
    subject = f"{_FAMILY_WORDS[name.kind]} of {method} at {layer} on the {probe} probe set{against}"
    if excluded:
        return (
            f"Images left out of the mean of '{stat}' ({subject}): their map was all zero, "
            "constant or non-finite, so the measure is undefined for them."
        )
    return f"{subject}: {what}. Mean over the probe images."


# --------------------------------------------------------------------------- titles and labels

#: How a chart or panel names what drift is measured against.
_AGAINST_TITLES = {REF: "drift from baseline", PREVIOUS: "drift from previous"}


def stat_title(kind: str, stat: str, *, long: bool = False) -> str:
    """The title of a chart of one drift or localization statistic; `long` adds the direction
    and range (the dashboard's titles), else the short name (the report's panels).

    Example:
        >>> stat_title(DRIFT, drift_stat("js", REF))
        'drift from baseline: JS divergence'
        >>> stat_title(LOCALIZATION, "energy", long=True)
        'localization: energy inside the mask (score, 1 = on the object)'
    """
    parsed = parse_drift_stat(stat) if kind == DRIFT else None
    if parsed is not None:
        measure, against = parsed
        label, words = MEASURE_LABELS[measure], _AGAINST_TITLES[against]
    elif kind == LOCALIZATION and stat in LOCALIZATION_LABELS:
        label, words = LOCALIZATION_LABELS[stat], "localization"
    elif kind == FAITHFULNESS and stat in FAITHFULNESS_LABELS:
        label, words = FAITHFULNESS_LABELS[stat], TRUST_CATEGORY
    else:
        raise ValueError(f"No title for {kind!r} statistic {stat!r}.")
    return f"{words}: {label.title if long else label.short}"


def stat_label(stat: str) -> str:
    """A summarised statistic as a report table names it: a localization score's short name,
    drift from the baseline with its measure, a faithfulness measure with its direction; any
    other statistic as its own name.

    Example:
        >>> stat_label("pointing"), stat_label(drift_stat("spearman", REF)), stat_label("x")
        ('pointing game', 'drift from baseline (1 - Spearman)', 'x')
    """
    if stat in LOCALIZATION_LABELS:
        return LOCALIZATION_LABELS[stat].short
    if stat in FAITHFULNESS_LABELS:
        return FAITHFULNESS_LABELS[stat].title  # with its direction: lower drop is better
    parsed = parse_drift_stat(stat)
    if parsed is not None and parsed[1] == REF:
        return f"{_AGAINST_TITLES[REF]} ({MEASURE_LABELS[parsed[0]].short})"
    return stat


# --------------------------------------------------------------------------- dashboard layout


class Chart(NamedTuple):
    """One dashboard chart: its section (`category`), its `title`, and a regular expression
    matching the tags drawn in it, one line each."""

    category: str
    title: str
    pattern: str


#: The dashboard section of the faithfulness and sanity charts.
TRUST_CATEGORY = "can I trust the maps?"


def dashboard_charts(
    probes: Mapping[str, bool], measures: Sequence[str], trust: Sequence[str] = ()
) -> list[Chart]:
    """The charts that answer "is attention moving, and is it on the object?" per probe set.

    `probes` maps each probe-set name to whether it has masks. Per probe set, in order: drift
    from the baseline and from the previous evaluation per measure (every layer and method a
    line), then the energy inside the masks where there are masks. Then, in the section
    "can I trust the maps?", one chart per `trust` statistic (faithfulness measures and
    `SANITY`), every probe set, layer and method a line.

    Example:
        >>> for chart in dashboard_charts({"target": True}, ["spearman"]):
        ...     print(chart.title)
        drift from baseline: 1 - Spearman rank corr. (distance, 0 = same)
        drift from previous: 1 - Spearman rank corr. (distance, 0 = same)
        localization: energy inside the mask (score, 1 = on the object)
        >>> dashboard_charts({"target": True}, ["spearman"])[0].pattern
        '^cam_drift/target/[^/]+/[^/]+/spearman_ref$'
    """
    charts = []
    for probe, has_masks in probes.items():
        category = f"cam-monitor: {probe}"
        groups = f"/{re.escape(encode(probe))}/[^/]+/[^/]+/"  # any layer, any method
        for against in (REF, PREVIOUS):
            for measure in measures:
                stat = drift_stat(measure, against)
                title = stat_title(DRIFT, stat, long=True)
                charts.append(Chart(category, title, f"^{DRIFT}{groups}{re.escape(stat)}$"))
        if has_masks:
            title = stat_title(LOCALIZATION, "energy", long=True)
            charts.append(Chart(category, title, f"^{LOCALIZATION}{groups}energy$"))
    for stat in trust:
        title = stat_title(FAITHFULNESS, stat, long=True)
        pattern = f"^{FAITHFULNESS}/[^/]+/[^/]+/[^/]+/{re.escape(stat)}$"
        charts.append(Chart(f"cam-monitor: {TRUST_CATEGORY}", title, pattern))
    return charts
