"""The attention tracker: previous and reference maps per probe, layer and method, and its state.

It turns the raw maps of one evaluation into drift, localization and entropy scalars keyed by
`schema.ScalarKey`, remembers the maps for the next evaluation, and round-trips through a
checkpoint with keys encoded by `schema.MapKey.encoded` (so any probe, layer or method name
survives a resume).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .batch import Batch, tensors
from .drift import drift, energy_inside, entropy, mask_iou, pointing_game, summarize
from .methods import SIGNED_METHODS
from .options import DriftOptions
from .schema import DRIFT, LOCALIZATION, PREVIOUS, REF, STATISTICS, MapKey, ScalarKey, drift_stat

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

    def score(
        self, results: Mapping[str, CamResult], probes: Mapping[str, ProbeSet]
    ) -> tuple[dict[ScalarKey, float], int]:
        """Drift, localization and entropy scalars; also the number of non-finite maps seen."""
        options = self.options
        per_image: dict[ScalarKey, Tensor] = {}
        non_finite: list[Tensor] = []
        for probe_name, result in results.items():
            masks = probes[probe_name].masks
            for (layer, method), raw in result.maps.items():
                maps = raw.abs() if method in SIGNED_METHODS else raw  # measures need mass >= 0
                key = MapKey(probe_name, layer, method)
                non_finite.append((~torch.isfinite(maps)).flatten(1).any(1))
                earlier = {PREVIOUS: self.previous.get(key), REF: self.reference.get(key)}
                for against, other in earlier.items():
                    if other is None or other.shape != maps.shape:
                        continue
                    for measure in options.measures:
                        stat = drift_stat(measure, against)
                        values = drift(other.to(maps.device), maps, measure, k=options.topk)
                        per_image[ScalarKey(DRIFT, key, stat)] = values
                per_image[ScalarKey(STATISTICS, key, "entropy")] = entropy(maps)
                if masks is not None:
                    loc = {
                        "energy": energy_inside(maps, masks),
                        "pointing": pointing_game(maps, masks, options.pointing_tolerance),
                        "mask_iou": mask_iou(maps, masks, options.topk),
                    }
                    per_image.update({ScalarKey(LOCALIZATION, key, s): v for s, v in loc.items()})
                self.previous[key] = maps
                self.reference.setdefault(key, maps)
        count = torch.cat(non_finite).sum(dim=0, keepdim=True).float() if non_finite else None
        return _summaries(per_image, count)

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
        for (probe, layer, method), maps in evaluation.maps.items():
            device = _device_of(probes.get(probe))
            self.reference[MapKey(probe, layer, method)] = torch.from_numpy(maps).float().to(device)

    def state_dict(self) -> dict[str, Any]:
        """Reference and previous maps on the CPU, keyed by `MapKey.encoded`."""
        return {
            "key_format": _KEY_FORMAT,
            "reference": {k.encoded: v.cpu() for k, v in self.reference.items()},
            "previous": {k.encoded: v.cpu() for k, v in self.previous.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Read a `state_dict`, also one written before keys were encoded (joined with '/')."""
        parse = MapKey.parse if state.get("key_format") == _KEY_FORMAT else _legacy_key
        self.reference = {parse(k): v for k, v in state.get("reference", {}).items()}
        self.previous = {parse(k): v for k, v in state.get("previous", {}).items()}


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


def _summaries(
    per_image: Mapping[ScalarKey, Tensor], non_finite: Tensor | None
) -> tuple[dict[ScalarKey, float], int]:
    """Mean over finite values per key, plus `excluded` counts where some were not finite, and
    the count of non-finite maps, which rides along in the one host transfer."""
    chunks = [v.detach().float().flatten() for v in per_image.values()]
    if non_finite is not None:
        chunks.append(non_finite.detach().float().flatten())
    if not chunks:
        return {}, 0
    sizes = [chunk.numel() for chunk in chunks]
    parts = torch.cat(chunks).cpu().split(sizes)
    scalars: dict[ScalarKey, float] = {}
    for key, chunk in zip(per_image, parts, strict=False):
        mean, excluded = summarize(chunk)
        scalars[key] = mean
        if excluded:
            scalars[key.excluded] = float(excluded)
    count = round(float(parts[-1].item())) if non_finite is not None else 0
    return scalars, count
