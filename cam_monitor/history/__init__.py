"""A run's CAM history: its on-disk `format`, the `store` on disk, the monitor's `records`, the
`background` thread that writes them, and one `run`'s folder and writer."""

from .background import BackgroundWriter as BackgroundWriter
from .format import FORMAT_VERSION as FORMAT_VERSION
from .format import PROBE_FILE as PROBE_FILE
from .format import Evaluation as Evaluation
from .format import HistoryError as HistoryError
from .format import ProbeRecord as ProbeRecord
from .format import Segmentation as Segmentation
from .records import evaluation_record as evaluation_record
from .records import write_probe_sets as write_probe_sets
from .run import RunHistory as RunHistory
from .store import evaluation_path as evaluation_path
from .store import find_histories as find_histories
from .store import find_history as find_history
from .store import history_runs as history_runs
from .store import prune_from as prune_from
from .store import read_evaluation as read_evaluation
from .store import read_history as read_history
from .store import read_probe as read_probe
from .store import write_evaluation as write_evaluation
from .store import write_probe as write_probe

__all__ = [
    "FORMAT_VERSION",
    "PROBE_FILE",
    "BackgroundWriter",
    "Evaluation",
    "HistoryError",
    "ProbeRecord",
    "RunHistory",
    "Segmentation",
    "evaluation_path",
    "evaluation_record",
    "find_histories",
    "find_history",
    "history_runs",
    "prune_from",
    "read_evaluation",
    "read_history",
    "read_probe",
    "write_evaluation",
    "write_probe",
    "write_probe_sets",
]
