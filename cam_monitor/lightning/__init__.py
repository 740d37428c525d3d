"""The Lightning side of cam-monitor: the `CamMonitor` callback (`callback`), its setup-time
checks on the Trainer (`checks`), both Lightning namespaces (`compat`), one evaluation and the
strict-or-warn policy (`evaluator`), what a checkpoint stores of a run (`resume`), the
Trainer access it needs (`trainer`) and its pickling guard (`pickling`).

Everything else in cam-monitor works without Lightning; only this package and `sinks` know it.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .callback import CamMonitor as CamMonitor


def __getattr__(name: str) -> Any:
    """`CamMonitor` imported when asked for: `compat` alone imports no callback."""
    if name == "CamMonitor":
        from .callback import CamMonitor

        return CamMonitor
    raise AttributeError(f"module 'cam_monitor.lightning' has no attribute {name!r}")


__all__ = ["CamMonitor"]
