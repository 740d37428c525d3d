"""cam-monitor: Grad-CAM attention and its drift, logged from a PyTorch Lightning callback."""

from .callback import CamMonitor as CamMonitor
from .engine import CamResult as CamResult
from .engine import compute_cams as compute_cams

__version__ = "0.1.0"

__all__ = ["CamMonitor", "CamResult", "__version__", "compute_cams"]
