"""Write xarray and zarr data into an Icechunk repository in parallel, on any executor.

The core is :func:`allow_pickling` (ship a writable session to workers as a snapshot) and
:func:`merge_sessions` (merge what comes back, refusing merges that would lose data).
Importing this package imports no executor (ray, lithops, dask, joblib).
"""

from icechunk_distributed._version import __version__
from icechunk_distributed.adapters import Adapter, Capabilities
from icechunk_distributed.api import plan_regions, run_region_writes
from icechunk_distributed.arrays import store_arrays
from icechunk_distributed.errors import (
    CommitConflictError,
    DistributedWriteError,
    ForeignSessionError,
    ForkStartMethodError,
    InvalidRegionError,
    NotASnapshotError,
    OverlappingWritesError,
    PayloadTooLargeError,
    PicklingNotAllowedError,
    PieceMismatchError,
    RegionWriteError,
    RunMismatchError,
    SessionStateError,
    TargetMovedError,
    TemplateMismatchError,
    UnpicklableSourceError,
    UnshareableStorageError,
)
from icechunk_distributed.ingestion import IngestPlan, IngestResult, ingest, plan_ingest
from icechunk_distributed.progress import ProgressEvent
from icechunk_distributed.results import TaskFailure, TaskRecord, WriteResult
from icechunk_distributed.runner import Backups
from icechunk_distributed.runs import (
    CleanupReport,
    RunInfo,
    garbage_collect,
    list_runs,
    remove_run,
)
from icechunk_distributed.session import (
    DistributedSession,
    SessionSnapshot,
    allow_pickling,
    merge_sessions,
    writable_session,
)
from icechunk_distributed.writer import RegionWriter

__all__ = [
    "Adapter",
    "Backups",
    "Capabilities",
    "CleanupReport",
    "CommitConflictError",
    "DistributedSession",
    "DistributedWriteError",
    "ForeignSessionError",
    "ForkStartMethodError",
    "IngestPlan",
    "IngestResult",
    "InvalidRegionError",
    "NotASnapshotError",
    "OverlappingWritesError",
    "PayloadTooLargeError",
    "PicklingNotAllowedError",
    "PieceMismatchError",
    "ProgressEvent",
    "RegionWriteError",
    "RegionWriter",
    "RunInfo",
    "RunMismatchError",
    "SessionSnapshot",
    "SessionStateError",
    "TargetMovedError",
    "TaskFailure",
    "TaskRecord",
    "TemplateMismatchError",
    "UnpicklableSourceError",
    "UnshareableStorageError",
    "WriteResult",
    "__version__",
    "allow_pickling",
    "garbage_collect",
    "ingest",
    "list_runs",
    "merge_sessions",
    "plan_ingest",
    "plan_regions",
    "remove_run",
    "run_region_writes",
    "store_arrays",
    "writable_session",
]
