"""Map-vs-map measures and localization scores: batched torch, on the maps' device.

Maps are raw non-negative CAMs `[B, h, w]` (many exact zeros, not normalised). Every measure
returns a float32 tensor `[B]`, one value per image. Where a measure is undefined for an image
(a constant or all-zero map, an empty mask, a non-finite or negative entry where a
distribution is needed) its value is NaN, never a silent 0; `summarize` then averages the
finite values and counts the NaNs. Nothing here syncs with the host except `summarize`.

The public functions check their arguments (`k`, `tolerance`, the measure's name);
`drift_scores` and `localization_scores` take them from a `DriftOptions`, validated once when
it was built, and check only the maps.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from .methods import SIGNED_METHODS, upsample_maps
from .schema import MEASURES as MEASURES  # the one definition; importable from here as before
from .targets import IGNORE_LABELS

if TYPE_CHECKING:
    from .options import DriftOptions

_LN2 = math.log(2.0)


def as_measured(maps: Tensor, method: str) -> Tensor:
    """The maps every measure scores: |map| for a signed method (mass must be >= 0; the sign
    of an attribution says which way, its size how much), other maps as they are.

    Example:
        >>> as_measured(torch.tensor([[[-2.0, 1.0]]]), "integrated_gradients").tolist()
        [[[2.0, 1.0]]]
    """
    return maps.abs() if method in SIGNED_METHODS else maps


# --------------------------------------------------------------------------- input checks


def _check_maps(maps: Tensor, name: str = "maps") -> None:
    """Raise ValueError unless `maps` is `[B, h, w]` with at least one pixel per map."""
    if maps.ndim != 3:
        raise ValueError(f"{name} must have shape [B, h, w], got {tuple(maps.shape)}")
    if maps.shape[1] * maps.shape[2] == 0:
        raise ValueError(f"{name} must have at least one pixel per map, got {tuple(maps.shape)}")


def _check_pair(a: Tensor, b: Tensor) -> None:
    """Raise ValueError naming both shapes unless `a` and `b` are equal-shaped `[B, h, w]`."""
    if a.shape != b.shape:
        raise ValueError(
            f"maps must have the same shape, got a: {tuple(a.shape)} and b: {tuple(b.shape)}"
        )
    _check_maps(a, "a")


def _check_k(k: float) -> None:
    """Raise ValueError unless the top fraction `k` lies in (0, 1]."""
    if not isinstance(k, (int, float)) or not 0.0 < k <= 1.0:
        raise ValueError(f"k must be a fraction in (0, 1], got {k!r}")


def _flat(maps: Tensor) -> Tensor:
    """`[B, h, w]` -> float32 `[B, h*w]`."""
    return maps.flatten(1).float()


def _finite_rows(flat: Tensor) -> Tensor:
    """Bool `[B]`: True where every entry of the row is finite."""
    return torch.isfinite(flat).all(dim=1)


def _non_constant(flat: Tensor) -> Tensor:
    """Bool `[B]`: True where the row holds at least two distinct values."""
    low, high = torch.aminmax(flat, dim=1)
    return high > low


def _nan_where_invalid(values: Tensor, valid: Tensor) -> Tensor:
    """`values` as float32, with NaN wherever `valid` is False."""
    return torch.where(valid, values, torch.full_like(values, math.nan)).float()


# --------------------------------------------------------------------------- correlations


def _average_ranks(flat: Tensor) -> Tensor:
    """1-based ranks of each row of `[B, N]`, tied values sharing the mean of their ranks.

    One sort per row, O(B N log N): each run of equal sorted values gets (first + last) / 2 + 1.

    Example:
        >>> _average_ranks(torch.tensor([[0.0, 3.0, 0.0, 1.0, 0.0]])).tolist()
        [[2.0, 5.0, 2.0, 4.0, 2.0]]
    """
    return _ranks_of_sorted(*flat.sort(dim=1))


def _ranks_of_sorted(values: Tensor, order: Tensor) -> Tensor:
    """`_average_ranks` of rows whose sort gave `values` and `order`."""
    n = values.shape[1]
    positions = torch.arange(n, device=values.device, dtype=torch.float32).expand_as(values)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, positions, 0.0).cummax(dim=1).values
    last = torch.where(ends, positions, float(n - 1)).flip(1).cummin(dim=1).values.flip(1)
    return torch.empty_like(values).scatter_(1, order, (first + last) / 2 + 1)


def _row_pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of matching rows of `[B, N]`; NaN where a row has zero variance."""
    return _correlation(_centred(x), _centred(y))


def _centred(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of `[B, N]` scaled to max |value| 1 (so tiny-but-varying maps do not underflow) and
    centred, with their sums of squares: each row's half of a Pearson correlation."""
    x = x / x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    centred = x - x.mean(dim=1, keepdim=True)
    return centred, (centred * centred).sum(dim=1)


def _correlation(x: tuple[Tensor, Tensor], y: tuple[Tensor, Tensor]) -> Tensor:
    """Pearson correlation of matching rows given their `_centred` halves."""
    (xc, x_squares), (yc, y_squares) = x, y
    denominator = torch.sqrt(x_squares * y_squares)
    safe = torch.where(denominator > 0, denominator, 1.0)
    r = ((xc * yc).sum(dim=1) / safe).clamp(-1.0, 1.0)
    return _nan_where_invalid(r, denominator > 0)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each pair of maps `[B, h, w]` -> `[B]`, in [-1, 1].

    NaN where either map is constant (all-zero included) or has a non-finite entry.

    Example:
        >>> a = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[1.0, 1.0], [1.0, 1.0]]])
        >>> [round(r, 6) for r in pearson(a, 2 * a + 1).tolist()]
        [1.0, nan]
    """
    _check_pair(a, b)
    x, y = _flat(a), _flat(b)
    valid = _finite_rows(x) & _finite_rows(y) & _non_constant(x) & _non_constant(y)
    return _nan_where_invalid(_row_pearson(x, y), valid)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of maps `[B, h, w]` -> `[B]`, in [-1, 1].

    Ties (the many exact zeros of a ReLU'd map) get average ranks, as in scipy.stats.spearmanr.
    NaN where either map is constant (all-zero included) or has a non-finite entry.

    Example:
        >>> a = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
        >>> spearman(a, torch.tensor([[[0.0, 1.0], [0.0, 2.0]]])).tolist()
        [0.5]
    """
    _check_pair(a, b)
    x, y = _flat(a), _flat(b)
    valid = _finite_rows(x) & _finite_rows(y) & _non_constant(x) & _non_constant(y)
    return _nan_where_invalid(_row_pearson(_average_ranks(x), _average_ranks(y)), valid)


# --------------------------------------------------------------------------- top-k sets


def _top_count(k: float, n: int) -> int:
    """ceil(k * n) pixels, at least 1 and at most n (rounded first so 0.1 * 30 gives 3)."""
    return min(n, max(1, math.ceil(round(k * n, 6))))


def _top_set(flat: Tensor, k: float) -> tuple[Tensor, Tensor]:
    """Top-k-fraction pixels of each row `[B, N]` as a bool mask, and a `[B]` validity flag.

    A pixel is in the set when its value is >= the ceil(k N)-th largest value (ties at the
    threshold all join) and > the row's minimum (the background is never "top").
    """
    threshold = flat.topk(_top_count(k, flat.shape[1]), dim=1).values[:, -1:]
    low = flat.amin(dim=1, keepdim=True)
    top = (flat >= threshold) & (flat > low)
    return top, _finite_rows(flat) & _non_constant(flat)


def _iou(x: Tensor, y: Tensor) -> Tensor:
    """IoU of matching rows of two bool `[B, N]` masks; NaN where both are empty."""
    union = (x | y).sum(dim=1)
    intersection = (x & y).sum(dim=1)
    return _nan_where_invalid(intersection / union.clamp_min(1), union > 0)


def topk_iou(a: Tensor, b: Tensor, k: float = 0.2) -> Tensor:
    """IoU of the top-`k`-fraction pixel sets of each pair of maps `[B, h, w]` -> `[B]`.

    The set holds pixels >= the ceil(k*h*w)-th largest value (all ties at that value join) and
    above the map's minimum, so a mostly-zero map's set is its support, never its zeros. NaN
    where either map is constant (its top set is undefined) or has a non-finite entry.

    Example:
        >>> a = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])
        >>> topk_iou(a, a.flip(-1), k=0.5).tolist()  # {2, 3} vs {0, 1}
        [0.0]
    """
    _check_pair(a, b)
    _check_k(k)
    return _topk_iou(a, b, k)


def _topk_iou(a: Tensor, b: Tensor, k: float) -> Tensor:
    """`topk_iou` of checked maps and fraction."""
    top_a, valid_a = _top_set(_flat(a), k)
    top_b, valid_b = _top_set(_flat(b), k)
    return _nan_where_invalid(_iou(top_a, top_b), valid_a & valid_b)


# --------------------------------------------------------------------------- distributions


def _distribution(flat: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of `[B, N]` normalised to sum 1, and a `[B]` flag: finite, non-negative, sum > 0."""
    total = flat.sum(dim=1)
    valid = _finite_rows(flat) & (flat >= 0).all(dim=1) & (total > 0) & torch.isfinite(total)
    return flat / torch.where(valid, total, 1.0)[:, None], valid


def _plogp_over(p: Tensor, q: Tensor) -> Tensor:
    """Row sums of p * ln(p / q), with 0 * ln(0 / q) = 0 (q > 0 wherever p > 0)."""
    positive = p > 0
    ratio = torch.where(positive, p, 1.0) / torch.where(positive, q, 1.0)
    return torch.where(positive, p * torch.log(ratio), 0.0).sum(dim=1)


def js_divergence(a: Tensor, b: Tensor) -> Tensor:
    """Jensen-Shannon divergence (natural log) of the maps normalised to sum 1 -> `[B]`.

    In [0, ln 2]: 0 for maps equal up to scale, ln 2 for disjoint supports. NaN where a map
    sums to 0 or has a negative or non-finite entry.

    Example:
        >>> a = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
        >>> js_divergence(a, torch.tensor([[[0.0, 5.0]], [[1.0, 1.0]]])).tolist()  # ln 2, nan
        [0.6931471824645996, nan]
    """
    _check_pair(a, b)
    return _js(_distribution(_flat(a)), _distribution(_flat(b)))


def _js(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
    """`js_divergence` of rows given as `_distribution`s."""
    (p, valid_p), (q, valid_q) = a, b
    m = (p + q) / 2
    js = (0.5 * (_plogp_over(p, m) + _plogp_over(q, m))).clamp(0.0, _LN2)
    return _nan_where_invalid(js, valid_p & valid_q)


def _centre_of_mass(maps: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) centre of mass `[B, 2]` in pixel-centre coordinates, and a `[B]` flag."""
    p, valid = _distribution(_flat(maps))
    return _centre(p, maps.shape), valid


def _centre(p: Tensor, shape: torch.Size) -> Tensor:
    """The centre of mass `[B, 2]` of distributions `p` `[B, h*w]` over maps of `shape`."""
    b, h, w = shape
    p = p.view(b, h, w)
    rows = torch.arange(h, device=p.device, dtype=torch.float32)
    cols = torch.arange(w, device=p.device, dtype=torch.float32)
    return torch.stack([p.sum(dim=2) @ rows, p.sum(dim=1) @ cols], dim=1)


def com_shift(a: Tensor, b: Tensor) -> Tensor:
    """Distance between the maps' centres of mass, as a fraction of the map diagonal -> `[B]`.

    Pixel (i, j) sits at (i, j); the diagonal is sqrt((h-1)^2 + (w-1)^2), the largest distance
    between pixel centres, so values lie in [0, 1]. NaN where a map sums to 0 or has a
    negative or non-finite entry, and for 1x1 maps (zero diagonal).

    Example:
        >>> a = torch.zeros(1, 3, 3); b = torch.zeros(1, 3, 3)
        >>> a[0, 0, 0] = 1.0; b[0, 2, 2] = 4.0
        >>> com_shift(a, b).tolist()
        [1.0]
    """
    _check_pair(a, b)
    centre_a, valid_a = _centre_of_mass(a)
    centre_b, valid_b = _centre_of_mass(b)
    return _shift(centre_a, centre_b, (a.shape[1], a.shape[2]), valid_a & valid_b)


def _shift(a: Tensor, b: Tensor, shape: tuple[int, int], valid: Tensor) -> Tensor:
    """`com_shift` of centres of mass `a`, `b` `[B, 2]` of maps `shape` `(h, w)`."""
    diagonal = math.hypot(shape[0] - 1, shape[1] - 1)
    distance = torch.linalg.vector_norm(a - b, dim=1) / max(diagonal, 1.0)
    return _nan_where_invalid(distance.clamp(0.0, 1.0), valid & (diagonal > 0))


def entropy(maps: Tensor) -> Tensor:
    """Shannon entropy of each map `[B, h, w]` as a distribution, over ln(h*w) -> `[B]`.

    In [0, 1]: 1 for a uniform map, 0 for a single hot pixel. NaN for a map summing to 0, one
    with a negative or non-finite entry, and for 1-pixel maps (ln 1 = 0 cannot normalise).

    Example:
        >>> entropy(torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]])).tolist()
        [0.5, 1.0]
    """
    _check_maps(maps)
    p, valid = _distribution(_flat(maps))
    n = p.shape[1]
    h = -_plogp_over(p, torch.ones_like(p)) / (math.log(n) if n > 1 else 1.0)
    return _nan_where_invalid(h.clamp(0.0, 1.0), valid & (n > 1))


# --------------------------------------------------------------------------- drift


def drift(a: Tensor, b: Tensor, measure: str, k: float = 0.2) -> Tensor:
    """One of `MEASURES` as a distance `[B]` (0 = same attention), for drift curves.

    spearman/pearson: 1 - r, in [0, 2]; topk_iou: 1 - IoU, in [0, 1]; js (in [0, ln 2]) and
    com_shift (in [0, 1]) as they are. NaN wherever the underlying measure is NaN.

    Example:
        >>> a = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
        >>> [round(drift(a, a, m).item(), 6) for m in MEASURES]
        [0.0, 0.0, 0.0, 0.0, 0.0]
    """
    if measure not in MEASURES:
        raise ValueError(
            f"unknown drift measure {measure!r}; valid measures: {', '.join(MEASURES)}"
        )
    if measure == "topk_iou":
        return 1.0 - topk_iou(a, b, k)  # checks `k`
    return _drift(a, b, measure, k)


def drift_scores(a: Tensor, b: Tensor, options: DriftOptions) -> dict[str, Tensor]:
    """Every measure of `options` as in `drift`, by name; its measures and `topk` were checked
    when `options` was built, so only the maps are checked here.

    Example:
        >>> from cam_monitor.options import DriftOptions
        >>> a = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
        >>> {m: d.tolist() for m, d in drift_scores(a, a, DriftOptions()).items()}
        {'spearman': [0.0], 'topk_iou': [0.0]}
    """
    _check_pair(a, b)
    measures, k = options.measures, options.topk
    return paired_drift(prepare(a, measures, k), prepare(b, measures, k), measures)


class Prepared(NamedTuple):
    """What the drift measures need of each map `[B, h, w]` (`prepare`), computed once however
    many maps it is compared with: a new map compared with its previous and its reference map
    is sorted once, for Spearman and the top-k set together, not once per measure and pair."""

    shape: tuple[int, int]
    valid: Tensor  # [B]: finite and not constant (correlations, top-k sets)
    pearson: tuple[Tensor, Tensor] | None  # rows centred (scaled to max |value| 1), sums of squares
    spearman: tuple[Tensor, Tensor] | None  # the same of the average ranks
    top: Tensor | None  # [B, N] bool: the top-k set
    distribution: tuple[Tensor, Tensor] | None  # rows summing to 1, and their [B] validity
    centre: Tensor | None  # [B, 2]: the centre of mass

    def take(self, ranges: list[tuple[int, int]]) -> Prepared:
        """The same of rows `ranges` (`(start, stop)`, in order, repeats allowed), sliced: no
        index is copied to the maps' device."""
        merged: list[list[int]] = []
        for start, stop in ranges:  # adjacent ranges become one slice
            if merged and merged[-1][1] == start:
                merged[-1][1] = stop
            else:
                merged.append([start, stop])
        if len(merged) == 1 and merged[0] == [0, len(self.valid)]:
            return self
        return Prepared(self.shape, *(_take(part, merged) for part in self[1:]))


def prepare(maps: Tensor, measures: tuple[str, ...], k: float) -> Prepared:
    """The parts of `maps` (`[B, h, w]`, checked) that `measures` compare (`paired_drift`).

    Example:
        >>> a = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
        >>> ready = prepare(a, ("spearman", "topk_iou"), 0.5)
        >>> ready.top.tolist(), ready.distribution is None
        ([[False, False, True, True]], True)
    """
    _check_maps(maps)
    flat = _flat(maps)
    valid = _finite_rows(flat) & _non_constant(flat)
    ranks = top = distribution = centre = None
    if "spearman" in measures or "topk_iou" in measures:
        values, order = flat.sort(dim=1)
        if "spearman" in measures:
            ranks = _ranks_of_sorted(values, order)
        if "topk_iou" in measures:  # the ceil(k N)-th largest value, as `topk` finds it
            threshold = values[:, flat.shape[1] - _top_count(k, flat.shape[1])][:, None]
            top = (flat >= threshold) & (flat > values[:, :1])
    if "js" in measures or "com_shift" in measures:
        distribution = _distribution(flat)
        if "com_shift" in measures:
            centre = _centre(distribution[0], maps.shape)
    return Prepared(
        (maps.shape[1], maps.shape[2]),
        valid,
        _centred(flat) if "pearson" in measures else None,
        _centred(ranks) if ranks is not None else None,
        top,
        distribution,
        centre,
    )


def paired_drift(a: Prepared, b: Prepared, measures: tuple[str, ...]) -> dict[str, Tensor]:
    """`drift_scores` of maps prepared with these `measures` (their rows pair up)."""
    valid = a.valid & b.valid
    scores: dict[str, Tensor] = {}
    for measure in measures:
        if measure in ("spearman", "pearson"):
            x, y = (a.spearman, b.spearman) if measure == "spearman" else (a.pearson, b.pearson)
            assert x is not None and y is not None
            scores[measure] = 1.0 - _nan_where_invalid(_correlation(x, y), valid)
        elif measure == "topk_iou":
            assert a.top is not None and b.top is not None
            scores[measure] = 1.0 - _nan_where_invalid(_iou(a.top, b.top), valid)
        elif measure == "js":
            assert a.distribution is not None and b.distribution is not None
            scores[measure] = _js(a.distribution, b.distribution)
        else:
            assert a.centre is not None and b.centre is not None
            assert a.distribution is not None and b.distribution is not None
            both = a.distribution[1] & b.distribution[1]
            scores[measure] = _shift(a.centre, b.centre, a.shape, both)
    return scores


def _take(part: Tensor | tuple[Tensor, Tensor] | None, ranges: list[list[int]]) -> Any:
    """`Prepared.take` of one part."""
    if part is None:
        return None
    if isinstance(part, tuple):
        return tuple(_take(t, ranges) for t in part)
    if len(ranges) == 1:
        return part[ranges[0][0] : ranges[0][1]]
    return torch.cat([part[start:stop] for start, stop in ranges])


def _drift(a: Tensor, b: Tensor, measure: str, k: float) -> Tensor:
    """`drift` of a known measure and a checked `k` (the maps are checked here)."""
    if measure == "spearman":
        return 1.0 - spearman(a, b)
    if measure == "pearson":
        return 1.0 - pearson(a, b)
    if measure == "topk_iou":
        _check_pair(a, b)
        return 1.0 - _topk_iou(a, b, k)
    if measure == "js":
        return js_divergence(a, b)
    return com_shift(a, b)


# --------------------------------------------------------------------------- localization


def _prepare_localization(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Check shapes; return maps upsampled to the mask size and the masks, both flat `[B, H*W]`."""
    _check_maps(maps)
    if masks.ndim != 3 or masks.shape[0] != maps.shape[0]:
        raise ValueError(
            "masks must have shape [B, H, W] with the maps' batch size, got maps: "
            f"{tuple(maps.shape)} and masks: {tuple(masks.shape)}"
        )
    _check_maps(masks, "masks")
    size = (masks.shape[1], masks.shape[2])
    upsampled = upsample_maps(maps.float(), size)
    binary = masks if masks.dtype == torch.bool else masks > 0.5
    return _flat(upsampled), binary.flatten(1)


def energy_inside(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of each map's mass inside its mask, maps upsampled to the mask size -> `[B]`.

    Maps `[B, h, w]`, masks `[B, H, W]` (bool, or float thresholded at 0.5). In [0, 1]. NaN for
    a map summing to 0 (or with a negative or non-finite entry) and for an empty mask.

    Example:
        >>> maps = torch.tensor([[[3.0, 1.0]], [[0.0, 0.0]]])
        >>> energy_inside(maps, torch.tensor([[[True, False]], [[True, False]]])).tolist()
        [0.75, nan]
    """
    return _energy_inside(*_prepare_localization(maps, masks))


def _energy_inside(flat: Tensor, mask: Tensor) -> Tensor:
    p, valid = _distribution(flat)
    share = (p * mask).sum(dim=1).clamp(0.0, 1.0)
    return _nan_where_invalid(share, valid & mask.any(dim=1))


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """1.0 where the upsampled map's maximum lies in the mask dilated by `tolerance` px, else 0.0.

    Dilation is a (2t+1)-square max-pool (Chebyshev distance). With tied maxima, a hit is any
    maximal pixel inside. NaN for a constant map (no maximum), a non-finite one, or an empty mask.

    Example:
        >>> maps = torch.tensor([[[0.0, 0.0, 1.0]]]); mask = torch.tensor([[[True, False, False]]])
        >>> [pointing_game(maps, mask, t).item() for t in (0, 1, 2)]
        [0.0, 0.0, 1.0]
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative int (pixels), got {tolerance!r}")
    flat, mask = _prepare_localization(maps, masks)
    return _pointing_game(flat, mask, masks.shape, tolerance)


def _pointing_game(flat: Tensor, mask: Tensor, shape: torch.Size, tolerance: int) -> Tensor:
    """`pointing_game` of prepared maps and masks (`shape`: the masks' `[B, H, W]`)."""
    if tolerance > 0:
        grid = mask.view(shape).float()[:, None]
        pooled = torch.nn.functional.max_pool2d(grid, 2 * tolerance + 1, 1, tolerance)
        dilated = pooled.reshape(mask.shape) > 0
    else:
        dilated = mask
    is_max = flat == flat.amax(dim=1, keepdim=True)
    hit = (is_max & dilated).any(dim=1).float()
    valid = _finite_rows(flat) & _non_constant(flat) & mask.any(dim=1)
    return _nan_where_invalid(hit, valid)


def mask_iou(maps: Tensor, masks: Tensor, k: float = 0.2) -> Tensor:
    """IoU between the top-`k`-fraction pixels of the upsampled map and the mask -> `[B]`.

    Top set as in `topk_iou` (ties at the threshold join, the minimum never does). NaN for a
    constant or non-finite map and for an empty mask.

    Example:
        >>> maps = torch.tensor([[[4.0, 3.0, 0.0, 0.0]]])
        >>> mask_iou(maps, torch.tensor([[[True, False, False, False]]]), k=0.5).tolist()
        [0.5]
    """
    _check_k(k)
    return _mask_iou(*_prepare_localization(maps, masks), k)


def _mask_iou(flat: Tensor, mask: Tensor, k: float) -> Tensor:
    top, valid = _top_set(flat, k)
    return _nan_where_invalid(_iou(top, mask), valid & mask.any(dim=1))


def localization_scores(maps: Tensor, masks: Tensor, options: DriftOptions) -> dict[str, Tensor]:
    """`energy_inside`, `pointing_game` and `mask_iou` by score name, with the tolerance and
    `topk` of `options` (checked when it was built); maps and masks are checked and upsampled
    once for the three.

    Example:
        >>> from cam_monitor.options import DriftOptions
        >>> maps = torch.tensor([[[4.0, 3.0, 0.0, 0.0]]])
        >>> mask = torch.tensor([[[True, False, False, False]]])
        >>> scores = localization_scores(maps, mask, DriftOptions(topk=0.5))
        >>> {name: round(value.item(), 4) for name, value in scores.items()}
        {'energy': 0.5714, 'pointing': 1.0, 'mask_iou': 0.5}
    """
    flat, mask = _prepare_localization(maps, masks)
    return {
        "energy": _energy_inside(flat, mask),
        "pointing": _pointing_game(flat, mask, masks.shape, options.pointing_tolerance),
        "mask_iou": _mask_iou(flat, mask, options.topk),
    }


def boxes_to_masks(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Boolean masks `[B, H, W]` from boxes `[B, 4]` = (x0, y0, x1, y1) in pixel coordinates.

    Pixel (y, x) covers [x, x+1) x [y, y+1) and is inside when its centre lies in
    [x0, x1) x [y0, y1); for integer boxes that is exactly the slice [y0:y1, x0:x1].

    Example:
        >>> boxes_to_masks(torch.tensor([[1, 0, 3, 1]]), (2, 4)).int().tolist()
        [[[0, 1, 1, 0], [0, 0, 0, 0]]]
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [B, 4] (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"size must be (H, W) with positive ints, got {size!r}")
    height, width = size
    x0, y0, x1, y1 = (boxes[:, i, None, None].float() for i in range(4))
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32)[None, :, None] + 0.5
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32)[None, None, :] + 0.5
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def summarize(values: Tensor) -> tuple[float, int]:
    """Mean of the finite values and the number of non-finite ones left out (syncs to host).

    The mean is NaN when no value is finite, so an all-degenerate batch is never reported as 0.

    Example:
        >>> summarize(torch.tensor([0.5, float("nan"), 1.0]))
        (0.75, 1)
    """
    flat = values.detach().reshape(-1)
    finite = torch.isfinite(flat)
    excluded = int((~finite).sum().item())
    if excluded == flat.numel():
        return math.nan, excluded
    return float(flat[finite].double().mean().item()), excluded


def class_iou(predicted: Tensor, label_maps: Tensor, classes: Tensor) -> Tensor:
    """Per image, the IoU of class `classes[b]` between a predicted class map and a label map
    (`[B, H, W]` each; the prediction is resized, nearest, to the labels' size); NaN where the
    class is neither predicted nor labelled.

    Example:
        >>> pred = torch.tensor([[[1, 1], [0, 0]]]); true = torch.tensor([[[1, 0], [0, 0]]])
        >>> class_iou(pred, true, torch.tensor([1])).tolist()
        [0.5]
    """
    mine, theirs = _class_pixels(predicted, label_maps, classes)
    return _iou(mine.flatten(1), theirs.flatten(1))


def class_accuracy(predicted: Tensor, label_maps: Tensor, classes: Tensor) -> Tensor:
    """Per image, the pixel accuracy of class `classes[b]`: the share of the pixels labelled
    with it that the prediction assigns to it (shapes as `class_iou`); NaN where no pixel is
    labelled with it.

    Example:
        >>> pred = torch.tensor([[[1, 1], [0, 0]]]); true = torch.tensor([[[1, 0], [1, 0]]])
        >>> class_accuracy(pred, true, torch.tensor([1])).tolist()
        [0.5]
    """
    mine, theirs = _class_pixels(predicted, label_maps, classes)
    hits = (mine & theirs).flatten(1).sum(dim=1).float()
    labelled = theirs.flatten(1).sum(dim=1).float()
    return torch.where(labelled > 0, hits / labelled.clamp(min=1), torch.nan)


def class_share(predicted: Tensor, classes: Tensor) -> Tensor:
    """Per image, the share of its pixels the prediction `[B, H, W]` assigns to `classes[b]`;
    NaN where the class is unknown (-1: a target callable returned scores).

    Example:
        >>> class_share(torch.tensor([[[2, 0], [0, 0]]]), torch.tensor([2])).tolist()
        [0.25]
    """
    wanted = classes.to(predicted.device)[:, None, None]
    share = (predicted == wanted).flatten(1).float().mean(dim=1)
    return torch.where(wanted[:, 0, 0] >= 0, share, torch.nan)


class SegmentMeasures(NamedTuple):
    """How a segmentation model predicts the class each image's map explains, per image
    (float32 `[B]` each): the `share` of the image's pixels predicted as it and, where label
    maps exist (else None), its `iou` and pixel `accuracy` (`class_iou`, `class_accuracy`)."""

    share: Tensor
    iou: Tensor | None
    accuracy: Tensor | None


def segment_measures(
    predicted: Tensor, classes: Tensor, label_maps: Tensor | None = None
) -> SegmentMeasures:
    """The `SegmentMeasures` of predicted class maps `[B, H, W]` for the explained `classes`
    `[B]`: what captions show and the history records.

    Example:
        >>> pred = torch.tensor([[[1, 1], [0, 0]]]); true = torch.tensor([[[1, 0], [1, 0]]])
        >>> [m.tolist() for m in segment_measures(pred, torch.tensor([1]), true)]
        [[0.5], [0.3333333432674408], [0.5]]
    """
    share = class_share(predicted, classes)
    if label_maps is None:
        return SegmentMeasures(share, None, None)
    iou = class_iou(predicted, label_maps, classes)
    return SegmentMeasures(share, iou, class_accuracy(predicted, label_maps, classes))


def _class_pixels(predicted: Tensor, label_maps: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
    """Where each image's class is predicted and where it is labelled, at the labels' size (the
    prediction resized, nearest); unlabelled pixels (`IGNORE_LABELS`) are scored by neither."""
    if predicted.shape[-2:] != label_maps.shape[-2:]:
        resized = torch.nn.functional.interpolate(
            predicted[:, None].float(), size=label_maps.shape[-2:], mode="nearest"
        )
        predicted = resized[:, 0].long()
    wanted = classes.to(predicted.device)[:, None, None]
    labels = label_maps.to(predicted.device)
    scored = ~torch.isin(labels, torch.tensor(IGNORE_LABELS, device=labels.device))
    return (predicted == wanted) & scored, labels == wanted
