"""cam-monitor: Grad-CAM attention and its drift, logged from a PyTorch Lightning callback."""

from typing import TYPE_CHECKING, Any

from .capture import LayerCaptureError as LayerCaptureError
from .capture import NoGradientError as NoGradientError
from .channels import filter_activations as filter_activations
from .channels import visualize_filter as visualize_filter
from .engine import CamResult as CamResult
from .engine import compute_cams as compute_cams
from .faithfulness import faithfulness as faithfulness
from .faithfulness import sanity_check as sanity_check
from .methods import ALL_METHODS as ALL_METHODS
from .methods import CAM_METHODS as CAM_METHODS
from .methods import INPUT_METHODS as INPUT_METHODS
from .methods import PIXEL_METHODS as PIXEL_METHODS
from .methods import SIGNED_METHODS as SIGNED_METHODS
from .schema import FAITHFULNESS_MEASURES as FAITHFULNESS_MEASURES
from .schema import INPUT_LAYER as INPUT_LAYER

#: The name `INPUT_LAYER` had before; kept for code that imports it.
INPUT_KEY = INPUT_LAYER

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .lightning.callback import CamMonitor as CamMonitor


def __getattr__(name: str) -> Any:
    """Import the callback (and with it Lightning) only when `CamMonitor` is asked for."""
    if name == "CamMonitor":
        from .lightning.callback import CamMonitor

        return CamMonitor
    raise AttributeError(f"module 'cam_monitor' has no attribute {name!r}")


__all__ = [
    "ALL_METHODS",
    "CAM_METHODS",
    "FAITHFULNESS_MEASURES",
    "INPUT_KEY",
    "INPUT_LAYER",
    "INPUT_METHODS",
    "PIXEL_METHODS",
    "SIGNED_METHODS",
    "CamMonitor",
    "CamResult",
    "LayerCaptureError",
    "NoGradientError",
    "__version__",
    "compute_cams",
    "faithfulness",
    "filter_activations",
    "sanity_check",
    "visualize_filter",
]
