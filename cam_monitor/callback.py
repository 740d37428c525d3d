"""Where `CamMonitor` was imported from before `cam_monitor.lightning`: kept for imports."""

from .lightning.callback import CamMonitor as CamMonitor
from .lightning.checks import MONITORED_PREFIXES as MONITORED_PREFIXES
from .lightning.checks import check_consumer_layers as check_consumer_layers
from .lightning.checks import check_metric_consumers as check_metric_consumers
from .lightning.checks import check_strategy as check_strategy
from .lightning.trainer import logging_off as logging_off
from .lightning.trainer import publish_metrics as publish_metrics
from .lightning.trainer import val_dataloaders as val_dataloaders

__all__ = [
    "MONITORED_PREFIXES",
    "CamMonitor",
    "check_consumer_layers",
    "check_metric_consumers",
    "check_strategy",
    "logging_off",
    "publish_metrics",
    "val_dataloaders",
]
