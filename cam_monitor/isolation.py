"""Run a CAM computation without leaving a trace on the model, its buffers or the RNG."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def model_devices(
    model: nn.Module, modules: Sequence[nn.Module] | None = None
) -> list[torch.device]:
    """Every device the model's parameters and buffers live on (`modules`: its modules, when
    the caller has listed them already)."""
    devices = {
        tensor.device
        for module in (model.modules() if modules is None else modules)
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False))
    }
    return sorted(devices, key=str)


@contextmanager
def isolated(model: nn.Module) -> Iterator[None]:
    """Eval mode, grad enabled, a forked RNG; every module's `training` flag restored after.

    Eval mode freezes BatchNorm statistics and silences dropout; the fork means random
    draws inside the block (CPU and the model's CUDA devices) do not shift the training
    stream; grad is enabled even when the caller is under `no_grad` or `inference_mode`.

    Example:
        >>> net = nn.Sequential(nn.BatchNorm1d(2), nn.Dropout())
        >>> net[1].eval()  # doctest: +ELLIPSIS
        Dropout(...)
        >>> with isolated(net):
        ...     net.training, net[1].training, torch.is_grad_enabled()
        (False, False, True)
        >>> net.training, net[0].training, net[1].training
        (True, True, False)
    """
    modules = list(model.modules())
    flags = [module.training for module in modules]
    cuda = [d.index or 0 for d in model_devices(model, modules) if d.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=cuda), torch.inference_mode(False):
            with torch.enable_grad():
                if any(flags):  # `eval()` walks every module: skip it where nothing trains
                    model.eval()
                yield
    finally:
        for module, flag in zip(modules, flags, strict=True):
            if module.training != flag:  # only what changed: setattr on a Module is not free
                module.training = flag
