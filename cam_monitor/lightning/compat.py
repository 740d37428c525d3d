"""Both Lightning namespaces, `pytorch_lightning` and `lightning.pytorch`: which are installed,
their classes by name, and what a logger or strategy is, whichever namespace made it.

One Trainer in either namespace accepts the monitor; these names are the only place that
knows there are two.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache
from typing import Any

# The two names under which Lightning ships the same Trainer: the standalone `pytorch-lightning`
# package and the `lightning` package's `lightning.pytorch`.
NAMESPACE_PACKAGES = {"pytorch_lightning": "pytorch-lightning", "lightning.pytorch": "lightning"}


def installed_namespaces() -> tuple[str, ...]:
    """The Lightning namespaces that are installed, imported (a broken install raises its own
    error); ImportError naming what to install if there is none.

    Example:
        >>> set(installed_namespaces()) <= {"pytorch_lightning", "lightning.pytorch"}
        True
    """
    found = []
    for name in NAMESPACE_PACKAGES:
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            importlib.import_module(name)
            found.append(name)
    if not found:
        raise ImportError(
            "CamMonitor is a Lightning callback and neither `lightning` nor `pytorch-lightning` "
            "is installed: pip install 'cam-monitor[lightning]' (for `import lightning`) or "
            "'cam-monitor[pytorch-lightning]' (for `import pytorch_lightning`). The engine "
            "(`cam_monitor.compute_cams`) works without either."
        )
    return tuple(found)


NAMESPACES = installed_namespaces()


@cache
def lightning_classes(module: str, name: str) -> tuple[type, ...]:
    """The class `name` of `<namespace>.<module>` in every installed namespace (for isinstance
    checks and base classes); empty where no namespace has it.

    Example:
        >>> [c.__module__ for c in lightning_classes("callbacks", "Callback")][0].endswith(
        ...     "callbacks.callback")
        True
    """
    found = []
    for namespace in NAMESPACES:
        try:
            found.append(getattr(importlib.import_module(f"{namespace}.{module}"), name))
        except (ImportError, AttributeError):  # a logger module whose package is missing
            continue
    return tuple(found)


def is_logger(logger: Any, name: str) -> bool:
    """Whether `logger` is Lightning's `name` logger (``"TensorBoardLogger"``...) of either
    namespace."""
    module = "loggers.neptune" if name == "NeptuneLogger" else "loggers"
    return isinstance(logger, lightning_classes(module, name))


def is_sharded(strategy: Any) -> bool:
    """Whether `strategy` shards the model's layers over processes (FSDP, model parallel,
    DeepSpeed), of either namespace: then no rank holds a whole layer to hook.

    Example:
        >>> is_sharded(lightning_classes("strategies", "DDPStrategy")[0]())
        False
    """
    sharded = lightning_classes("strategies", "FSDPStrategy") + lightning_classes(
        "strategies", "ModelParallelStrategy"
    )
    return isinstance(strategy, sharded) or "DeepSpeed" in type(strategy).__name__
