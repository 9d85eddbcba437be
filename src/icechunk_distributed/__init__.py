"""Write xarray and zarr data into an Icechunk repository in parallel, on any executor.

The core is :func:`allow_pickling` (ship a writable session to workers as a snapshot) and
:func:`merge_sessions` (merge what comes back, refusing merges that would lose data).
Importing this package imports no executor (ray, lithops, dask, joblib).
"""

from icechunk_distributed._version import __version__
from icechunk_distributed.errors import (
    DistributedWriteError,
    ForeignSessionError,
    ForkStartMethodError,
    NotASnapshotError,
    OverlappingWritesError,
    PicklingNotAllowedError,
    SessionStateError,
)
from icechunk_distributed.session import (
    DistributedSession,
    SessionSnapshot,
    allow_pickling,
    merge_sessions,
    writable_session,
)

__all__ = [
    "DistributedSession",
    "DistributedWriteError",
    "ForeignSessionError",
    "ForkStartMethodError",
    "NotASnapshotError",
    "OverlappingWritesError",
    "PicklingNotAllowedError",
    "SessionSnapshot",
    "SessionStateError",
    "__version__",
    "allow_pickling",
    "merge_sessions",
    "writable_session",
]
