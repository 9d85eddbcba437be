"""What a run reports: one record per region written, one per region failed, the whole result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from icechunk_distributed.planning import Region

if TYPE_CHECKING:
    from icechunk_distributed.session import DistributedSession

__all__ = ["TaskFailure", "TaskRecord", "WriteResult"]


@dataclass(frozen=True)
class TaskRecord:
    """One region written: where, how long, how many attempts, on which worker."""

    index: int
    region: Region
    seconds: float
    attempts: int
    worker: str
    n_chunks: int
    nbytes: int


@dataclass(frozen=True)
class TaskFailure:
    """One region that failed on every attempt."""

    index: int
    region: Region
    error: str
    exception: BaseException | None
    attempts: int
    traceback: str | None = None


@dataclass
class WriteResult:
    """What :func:`~icechunk_distributed.run_region_writes` or ``store_arrays`` did.

    Attributes
    ----------
    snapshot_id : str or None
        The commit (None when nothing was committed: ``commit=False``, ``store_arrays``).
    branch : str or None
        The branch written to.
    n_regions, n_chunks : int
        Regions (tasks) and chunks (or shards) written by tasks.
    bytes_written : int
        Uncompressed bytes written by tasks.
    seconds : float
        Wall time of the whole call.
    tasks : list of TaskRecord
        One per region, in region order.
    executor : str
        The adapter's name.
    session : DistributedSession
        The session holding the writes: uncommitted for ``commit=False`` and
        ``store_arrays``; after a commit, read-only at the new snapshot; after a ``run_id``
        run, a new writable session on the target branch (the work branch is gone).
    run_id : str or None
        The resumable run's id.
    n_resumed : int
        Regions a ``run_id`` run found written by an earlier call (not written again).
    n_checkpoints : int
        Checkpoints committed to the run's work branch by this call.
    """

    snapshot_id: str | None
    branch: str | None
    n_regions: int
    n_chunks: int
    bytes_written: int
    seconds: float
    tasks: list[TaskRecord]
    executor: str
    session: DistributedSession = field(repr=False)
    run_id: str | None = None
    n_resumed: int = 0
    n_checkpoints: int = 0
