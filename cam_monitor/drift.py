"""The attention tracker: previous and reference maps per probe, layer and method, and its state.

It turns the raw maps of one evaluation into drift, localization and entropy scalars keyed by
`schema.ScalarKey`, remembers the maps for the next evaluation, and round-trips through a
checkpoint with keys encoded by `schema.MapKey.encoded` (so any probe, layer or method name
survives a resume).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .attribution import pass_ranges
from .batch import Batch, tensors
from .measures import (
    as_measured,
    entropy,
    localization_scores,
    paired_drift,
    prepare,
    summarize,
)
from .notices import warn
from .options import DriftOptions
from .schema import (
    DRIFT,
    ENTROPY,
    LOCALIZATION,
    LOCALIZATION_SCORES,
    PREVIOUS,
    REF,
    STATISTICS,
    MapKey,
    ScalarKey,
    drift_stat,
)

if TYPE_CHECKING:
    from .engine import CamResult
    from .history import Evaluation
    from .probe import ProbeSet

#: How state dict keys are written; checkpoints without this entry joined keys with '/' unencoded.
_KEY_FORMAT = "encoded"


class AttentionTracker:
    """Remembers the reference and previous maps per `MapKey` and scores new ones against them.

    Drift is a distance per measure (1 - correlation, 1 - IoU, JS, centre-of-mass shift) against
    the previous evaluation (`_prev`) and the reference (`_ref`, by default the first evaluation).
    Per-image values are gathered on the device and moved to the host in one transfer.

    Example:
        >>> tracker = AttentionTracker(DriftOptions(measures=("js",)))
        >>> tracker.options.measures, tracker.reference
        (('js',), {})
    """

    def __init__(self, options: DriftOptions | None = None) -> None:
        if options is not None and not isinstance(options, DriftOptions):
            raise TypeError(
                f"`options` must be a DriftOptions or None, got {type(options).__name__}."
            )
        self.options = options or DriftOptions()
        self.reference: dict[MapKey, Tensor] = {}
        self.previous: dict[MapKey, Tensor] = {}
        #: Whether the reference is another run's (`use_reference`): a map it lacks is never
        #: taken from this run, which would log drift from this run's start as `_ref`.
        self.external = False
        self._unreferenced: set[MapKey] = set()

    def score(
        self,
        results: Mapping[str, CamResult],
        probes: Mapping[str, ProbeSet],
        batch_size: int | None = None,
    ) -> tuple[dict[ScalarKey, float], int]:
        """Drift, localization and entropy scalars; also the number of non-finite maps seen.

        Maps of one shape on one device are scored together: each measure runs once per shape
        and chunk of `batch_size` images (None: every image at once), on the maps of every
        layer and method for those images, against their previous and reference maps at once,
        so an evaluation dispatches a few hundred small ops instead of thousands, and holds
        the measures' temporaries of one chunk, not of the whole probe. The scalars do not
        depend on `batch_size`: every measure is per image, and the means are taken over all.
        """
        options = self.options
        # Label maps score each map against the pixels of the class it explains (never "any
        # class"): the masks follow the targets of this evaluation.
        probes = {
            name: probe.class_masks(results[name].targets) if name in results else probe
            for name, probe in probes.items()
        }
        current: dict[MapKey, Tensor] = {}  # raw: `as_measured` is applied chunk by chunk
        for probe_name, result in results.items():
            for (layer, method), raw in result.maps.items():
                current[MapKey(probe_name, layer, method)] = raw
        order: list[ScalarKey] = []  # the scalars in the order of the maps, as they are logged
        blocks: list[_Block] = []
        non_finite: list[Tensor] = []
        for keys in _same_shape(current).values():
            for rows in _chunks(current, keys, batch_size):
                stacked = torch.cat([_measured(current[key], key, rows) for key in keys])
                non_finite.append((~torch.isfinite(stacked)).flatten(1).any(1))
                blocks += self._drift_blocks(keys, current, rows, stacked)
                entropies = [ScalarKey(STATISTICS, key, ENTROPY) for key in keys]
                blocks.append(_Block(entropies, _sizes(current, keys, rows), entropy(stacked)))
        for keys in _same_shape(current, by_probe=True).values():
            masks = probes[keys[0].probe].masks
            for rows in _chunks(current, keys, batch_size) if masks is not None else ():
                blocks += self._localization_blocks(keys, current, masks, rows)
        for key, maps in current.items():
            for against in (PREVIOUS, REF):
                if self._earlier(key, against, maps) is not None:
                    order += [
                        ScalarKey(DRIFT, key, drift_stat(m, against)) for m in options.measures
                    ]
            order.append(ScalarKey(STATISTICS, key, ENTROPY))
            if probes[key.probe].masks is not None:
                order += [ScalarKey(LOCALIZATION, key, stat) for stat in LOCALIZATION_SCORES]
        for key, maps in current.items():  # the result's own tensors: no copy is kept
            self.previous[key] = maps
            if not self.external:
                self.reference.setdefault(key, maps)
        self._say_unreferenced(current)
        count = torch.cat(non_finite).sum(dim=0, keepdim=True).float() if non_finite else None
        scalars, bad = _summaries(blocks, count)
        return {k: scalars[k] for k in _with_excluded(order, scalars)}, bad

    def _say_unreferenced(self, current: Mapping[MapKey, Tensor]) -> None:
        """Warn, once per map, where another run's reference holds none of it."""
        if not self.external:
            return
        missing = [k for k in current if k not in self.reference and k not in self._unreferenced]
        if not missing:
            return
        self._unreferenced.update(missing)
        held = ", ".join("/".join(k) for k in self.reference) or "no maps (history_maps='none'?)"
        warn(
            f"The reference run holds no maps of {', '.join('/'.join(k) for k in missing)}, so "
            f"no drift against the reference (_ref) is logged for them; it holds {held}. Give "
            "reference= a run that recorded the same probe sets, layers and methods."
        )

    def _earlier(self, key: MapKey, against: str, maps: Tensor) -> Tensor | None:
        """The previous or reference map of `key`, where it has the shape of `maps`."""
        other = (self.previous if against == PREVIOUS else self.reference).get(key)
        return other if other is not None and other.shape == maps.shape else None

    def _drift_blocks(
        self, keys: list[MapKey], current: Mapping[MapKey, Tensor], rows: slice, stacked: Tensor
    ) -> list[_Block]:
        """Every measure of rows `rows` of maps of one shape (`stacked`: those rows of every
        key, as measured) against their previous and reference maps: each map is prepared
        once (one sort serves Spearman and the top-k set), then one call per measure pairs
        them all."""
        pairs: dict[str, list[tuple[MapKey, Tensor, int, int]]] = {PREVIOUS: [], REF: []}
        start = 0
        for key, size in zip(keys, _sizes(current, keys, rows), strict=True):
            for against, found in pairs.items():
                other = self._earlier(key, against, current[key]) if size else None
                if other is not None:
                    found.append((key, other, start, size))
            start += size
        paired = pairs[PREVIOUS] + pairs[REF]  # in two runs of rows: `take` slices little
        if not paired:
            return []
        measures, k = self.options.measures, self.options.topk
        before = torch.cat([_measured(other, key, rows).to(stacked.device)
                            for key, other, _, _ in paired])  # fmt: skip
        ready = prepare(torch.cat([stacked, before]), measures, k)  # one pass for both
        now = ready.take([(at, at + n) for _, _, at, n in paired])
        values = paired_drift(ready.take([(len(stacked), len(ready.valid))]), now, measures)
        stats = [PREVIOUS] * len(pairs[PREVIOUS]) + [REF] * len(pairs[REF])
        keys_of = {
            measure: [ScalarKey(DRIFT, key, drift_stat(measure, stat))
                      for (key, _, _, _), stat in zip(paired, stats, strict=True)]
            for measure in values
        }  # fmt: skip
        sizes = [size for _, _, _, size in paired]
        return [_Block(keys_of[measure], sizes, scores) for measure, scores in values.items()]

    def _localization_blocks(
        self, keys: list[MapKey], current: Mapping[MapKey, Tensor], masks: Tensor, rows: slice
    ) -> list[_Block]:
        """Energy, pointing game and mask IoU of rows `rows` of maps of one shape of one probe
        set, stacked."""
        stacked = torch.cat([_measured(current[key], key, rows) for key in keys])
        chunk = masks[rows]
        tiled = chunk.repeat(len(keys), *([1] * (chunk.dim() - 1)))
        values = localization_scores(stacked, tiled, self.options)
        sizes = _sizes(current, keys, rows)
        return [
            _Block([ScalarKey(LOCALIZATION, key, stat) for key in keys], sizes, values[stat])
            for stat in LOCALIZATION_SCORES
        ]

    def use_reference(
        self, evaluation: Evaluation, probes: Mapping[str, ProbeSet], *, source: str = ""
    ) -> None:
        """Use the maps of `evaluation` (another run's first) as the `_ref` of every measure.

        Its probe hashes must match `probes` (else drift would compare different images): a
        ValueError names the probe set, both hashes and the fix. `source` names the run in it.
        """
        for name, digest in evaluation.probe_hashes.items():
            ours = probes.get(name)
            if ours is not None and ours.digest != digest:
                where = f"reference={source!r}" if source else "the reference run"
                raise ValueError(
                    f"{where} used a different probe {name!r} (hash {digest}, this run "
                    f"{ours.digest}); drift against it would compare different images. Use the "
                    "same probe data or drop reference=."
                )
        self.external = True
        for (probe, layer, method), maps in evaluation.maps.items():
            device = _device_of(probes.get(probe))
            self.reference[MapKey(probe, layer, method)] = torch.from_numpy(maps).float().to(device)

    def state_dict(self) -> dict[str, Any]:
        """Reference and previous maps on the CPU, keyed by `MapKey.encoded`."""
        return {
            "key_format": _KEY_FORMAT,
            "reference": {k.encoded: v.cpu() for k, v in self.reference.items()},
            "previous": {k.encoded: v.cpu() for k, v in self.previous.items()},
            "external": self.external,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Read a `state_dict`, also one written before keys were encoded (joined with '/')."""
        parse = MapKey.parse if state.get("key_format") == _KEY_FORMAT else _legacy_key
        self.reference = {parse(k): v for k, v in state.get("reference", {}).items()}
        self.previous = {parse(k): v for k, v in state.get("previous", {}).items()}
        self.external = bool(state.get("external", False))


def _legacy_key(text: str) -> MapKey:
    """A key of the first checkpoints: 'probe/layer/method' with no encoding (the probe up to the
    first '/', the method after the last one)."""
    probe, rest = text.split("/", 1)
    layer, method = rest.rsplit("/", 1)
    return MapKey(probe, layer, method)


def _device_of(probe: ProbeSet | None) -> torch.device:
    if probe is None:
        return torch.device("cpu")
    found = Batch.of(probe.inputs).image
    found = found if found is not None else next(tensors(probe.inputs), None)
    return torch.device("cpu") if found is None else found.device


@dataclass(frozen=True)
class _Block:
    """Per-image values `[sum(sizes)]` of several scalars computed in one call: `sizes[i]`
    values for `keys[i]`, in order."""

    keys: list[ScalarKey]
    sizes: list[int]
    values: Tensor


def _sizes(current: Mapping[MapKey, Tensor], keys: list[MapKey], rows: slice) -> list[int]:
    return [_count(current[key], rows) for key in keys]


def _count(maps: Tensor, rows: slice) -> int:
    """`len(maps[rows])` without slicing (a dispatched op per key and chunk otherwise)."""
    return max(0, min(rows.stop, maps.shape[0]) - rows.start)


def _measured(maps: Tensor, key: MapKey, rows: slice) -> Tensor:
    """Rows `rows` of `maps` as the measures read them (`as_measured`)."""
    whole = rows.start == 0 and rows.stop >= maps.shape[0]
    return as_measured(maps if whole else maps[rows], key.method)


def _chunks(
    current: Mapping[MapKey, Tensor], keys: list[MapKey], batch_size: int | None
) -> list[slice]:
    """The image rows scored together: chunks of `batch_size` (None: all) over the longest
    probe among `keys` (a shorter probe set's maps drop out of the chunks past its end)."""
    length = max(current[key].shape[0] for key in keys)
    return [slice(start, stop) for start, stop in pass_ranges(length, batch_size)]


def _same_shape(
    current: Mapping[MapKey, Tensor], by_probe: bool = False
) -> dict[tuple[Any, ...], list[MapKey]]:
    """The keys of maps that can be stacked: same `[h, w]` and device (and probe set, for
    localization against its masks), in their order."""
    groups: dict[tuple[Any, ...], list[MapKey]] = {}
    for key, maps in current.items():
        group = (tuple(maps.shape[1:]), maps.device, key.probe if by_probe else None)
        groups.setdefault(group, []).append(key)
    return groups


def _with_excluded(order: list[ScalarKey], scalars: Mapping[ScalarKey, float]) -> list[ScalarKey]:
    """`order` with each key's `excluded` count right after it, where there is one."""
    return [k for key in order for k in (key, key.excluded) if k in scalars]


def _summaries(
    blocks: list[_Block], non_finite: Tensor | None
) -> tuple[dict[ScalarKey, float], int]:
    """Mean over finite values per key (its values from every block, in order: the chunks of
    its images), plus `excluded` counts where some were not finite, and the count of non-finite
    maps, which rides along in the one host transfer."""
    chunks = [block.values.detach().float().flatten() for block in blocks]
    if non_finite is not None:
        chunks.append(non_finite.detach().float().flatten())
    if not chunks:
        return {}, 0
    host = torch.cat(chunks).cpu()
    keys = [key for block in blocks for key in block.keys]
    sizes = [size for block in blocks for size in block.sizes]
    parts = host.split([*sizes, host.numel() - sum(sizes)])
    per_key: dict[ScalarKey, list[Tensor]] = {}
    for key, part in zip(keys, parts, strict=False):
        per_key.setdefault(key, []).append(part)
    joined = {key: got[0] if len(got) == 1 else torch.cat(got) for key, got in per_key.items()}
    scalars: dict[ScalarKey, float] = {}
    lengths = {key: int(values.numel()) for key, values in joined.items()}
    for size in dict.fromkeys(lengths.values()):  # keys with as many values summarised together
        same = [key for key, length in lengths.items() if length == size]
        values = torch.stack([joined[key] for key in same])
        excluded = (~torch.isfinite(values)).sum(dim=1).tolist()
        means = values.double().mean(dim=1).tolist()
        for key, mean, bad in zip(same, means, excluded, strict=True):
            if bad:  # the mean of the finite ones only
                mean, bad = summarize(joined[key])
                scalars[key.excluded] = float(bad)
            scalars[key] = mean
    count = round(float(parts[-1].item())) if non_finite is not None else 0
    return scalars, count
