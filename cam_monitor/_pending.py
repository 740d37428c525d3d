"""MERGE: delete this file. Stand-ins for names other branches of issue 11 add (same signatures).

- `first_spatial_layer` -> `cam_monitor.layers.first_spatial_layer`
- `evaluation_record`, `write_probe_sets` -> `cam_monitor.history`
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .engine import CamResult
from .history import Evaluation, write_probe
from .isolation import isolated
from .options import ForwardFn
from .probe import ProbeSet


def first_spatial_layer(module: nn.Module, inputs: Any, forward: ForwardFn | None) -> str:
    """Name of the last module (run once, not a pooling layer) whose output is `[B, C, h, w]`."""
    seen: dict[str, int] = {}
    order: list[str] = []
    spatial: set[str] = set()
    pooling = (
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d,
    )  # fmt: skip

    def make_hook(name: str, module_: nn.Module) -> Any:
        def hook(_: nn.Module, __: Any, output: Any) -> None:
            seen[name] = seen.get(name, 0) + 1
            order.append(name)
            if isinstance(output, Tensor) and output.dim() == 4 and output.shape[-2:].numel() > 1:
                if not isinstance(module_, pooling):
                    spatial.add(name)

        return hook

    handles = [m.register_forward_hook(make_hook(n, m)) for n, m in module.named_modules() if n]
    try:
        with isolated(module), torch.no_grad():
            module(inputs) if forward is None else forward(module, inputs)
    finally:
        for handle in handles:
            handle.remove()
    candidates = [n for n in order if n in spatial and seen[n] == 1]
    if not candidates:
        raise ValueError(
            f"{type(module).__name__} has no layer with a spatial [B, C, H, W] output; pass "
            "layer= explicitly (with reshape= for token outputs)."
        )
    return candidates[-1]


def evaluation_record(
    index: int,
    epoch: int,
    step: int,
    probes: Mapping[str, ProbeSet],
    results: Mapping[str, CamResult],
    scalars: Mapping[str, float],
) -> Evaluation:
    """The history entry of one evaluation, as numpy arrays."""
    return Evaluation(
        index=index,
        epoch=epoch,
        step=step,
        probe_hashes={name: probe.digest for name, probe in probes.items()},
        maps={
            (probe, layer, method): maps.detach().cpu().numpy()
            for probe, result in results.items()
            for (layer, method), maps in result.maps.items()
        },
        targets={name: r.targets.cpu().numpy() for name, r in results.items()},
        logits={name: r.logits.cpu().numpy() for name, r in results.items()},
        labels={
            name: p.labels.cpu().numpy()
            for name, p in probes.items()
            if p.labels is not None and name in results
        },
        scalars=dict(scalars),
    )


def write_probe_sets(folder: str | Path, probes: Mapping[str, ProbeSet]) -> Path:
    """Store the probe sets whose inputs are a tensor, so reports can draw overlays."""
    kept = {n: p for n, p in probes.items() if isinstance(p.inputs, Tensor)}
    return write_probe(
        folder,
        inputs={n: p.inputs.detach().float().cpu().numpy() for n, p in kept.items()},
        labels={n: p.labels.cpu().numpy() for n, p in kept.items() if p.labels is not None},
        masks={n: p.masks.cpu().numpy() for n, p in kept.items() if p.masks is not None},
        hashes={n: p.digest for n, p in kept.items()},
    )
