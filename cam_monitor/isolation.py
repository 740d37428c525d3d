"""Run a CAM computation without leaving a trace on the model, its buffers or the RNG."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def model_devices(model: nn.Module) -> list[torch.device]:
    """Every device the model's parameters and buffers live on."""
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
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
    flags = [(module, module.training) for module in model.modules()]
    cuda = [d.index or 0 for d in model_devices(model) if d.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=cuda), torch.inference_mode(False):
            with torch.enable_grad():
                model.eval()
                yield
    finally:
        for module, flag in flags:
            module.training = flag
