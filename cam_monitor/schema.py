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

from typing import NamedTuple
from urllib.parse import unquote

#: Drift measures, each logged as a distance (0 = the same attention).
MEASURES: tuple[str, ...] = ("spearman", "pearson", "topk_iou", "js", "com_shift")
#: Localization scores against ground-truth masks (1 = all attention on the object).
LOCALIZATION_SCORES: tuple[str, ...] = ("energy", "pointing", "mask_iou")
#: Per-map statistics.
STATS: tuple[str, ...] = ("entropy",)
#: What drift is measured against: the previous evaluation, or the reference (the first one).
PREVIOUS, REF = "prev", "ref"
AGAINST: tuple[str, ...] = (PREVIOUS, REF)

#: Scalar families: one tag prefix each.
DRIFT, LOCALIZATION, STATISTICS = "cam_drift", "cam_loc", "cam_stats"
SCALAR_KINDS: tuple[str, ...] = (DRIFT, LOCALIZATION, STATISTICS)
#: Prefix of overlay-grid image tags, and of filter-view image tags.
IMAGE_PREFIX, FILTER_PREFIX = "cam", "filters"
#: The layer name under which pixel-level methods (saliency, IG, ...) store their maps.
INPUT_LAYER = "input"
#: The monitor's own cost per evaluation, in seconds.
SECONDS_TAG = "cam_monitor/seconds"
#: Suffix of the count of images left out of a mean (all-zero, constant or non-finite maps).
EXCLUDED_SUFFIX = "_excluded"
_PROBE_HASH_PREFIX = "cam_monitor/probe_hash/"


def encode(name: str) -> str:
    """One name component as it appears in a tag or history key (``/`` becomes ``%2F``)."""
    return "".join(
        f"%{ord(ch):02X}" if ch in "%/\\" or ord(ch) < 32 or ord(ch) == 127 else ch for ch in name
    )


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
