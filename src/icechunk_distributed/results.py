"""What a run reports: one record per region written, one per region failed, the whole result."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from icechunk_distributed.planning import Region
from icechunk_distributed.sequences import ListLike

if TYPE_CHECKING:
    from icechunk_distributed.session import DistributedSession

__all__ = [
    "TaskFailure",
    "TaskRecord",
    "TaskRecords",
    "WriteResult",
    "total_bytes",
    "total_chunks",
]


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


class TaskRecords(ListLike[TaskRecord]):
    """The records of a run's regions, held as columns.

    A :class:`TaskRecord` is made when one is asked for. A million records cost about 40 MB
    this way, against some 200 MB as objects. Regions come from the plan (``regions``),
    looked up by index. Records are added as tasks finish; :meth:`sort` puts them in region
    order.
    """

    def __init__(self, regions: Sequence[Region]) -> None:
        self._regions = regions
        self._index = array("q")
        self._seconds = array("d")
        self._attempts = array("i")
        self._worker = array("i")
        self._n_chunks = array("q")
        self._nbytes = array("q")
        self._workers: list[str] = []
        self._worker_ids: dict[str, int] = {}

    def add(
        self, index: int, seconds: float, attempts: int, worker: str, n_chunks: int, nbytes: int
    ) -> None:
        """Record region ``index``'s task."""
        w = self._worker_ids.get(worker)
        if w is None:
            w = self._worker_ids[worker] = len(self._workers)
            self._workers.append(worker)
        self._index.append(index)
        self._seconds.append(seconds)
        self._attempts.append(attempts)
        self._worker.append(w)
        self._n_chunks.append(n_chunks)
        self._nbytes.append(nbytes)

    def sort(self) -> None:
        """Put the records in region order."""
        order = sorted(range(len(self._index)), key=self._index.__getitem__)
        for name in ("_index", "_seconds", "_attempts", "_worker", "_n_chunks", "_nbytes"):
            column = getattr(self, name)
            setattr(self, name, array(column.typecode, (column[k] for k in order)))

    @property
    def n_chunks(self) -> int:
        """Chunks (or shards) written by all the tasks."""
        return sum(self._n_chunks)

    @property
    def nbytes(self) -> int:
        """Uncompressed bytes written by all the tasks."""
        return sum(self._nbytes)

    def __len__(self) -> int:
        return len(self._index)

    def _item(self, k: int) -> TaskRecord:
        i = self._index[k]
        return TaskRecord(
            i,
            self._regions[i],
            self._seconds[k],
            self._attempts[k],
            self._workers[self._worker[k]],
            self._n_chunks[k],
            self._nbytes[k],
        )

    def __repr__(self) -> str:
        return f"<TaskRecords: {len(self)}>"


def total_chunks(records: Sequence[TaskRecord]) -> int:
    """Chunks (or shards) written by the tasks of ``records``."""
    if isinstance(records, TaskRecords):
        return records.n_chunks  # without making a record object per task
    return sum(r.n_chunks for r in records)


def total_bytes(records: Sequence[TaskRecord]) -> int:
    """Uncompressed bytes written by the tasks of ``records``."""
    if isinstance(records, TaskRecords):
        return records.nbytes
    return sum(r.nbytes for r in records)


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
    tasks : sequence of TaskRecord
        One per region, in region order (a list, or :class:`TaskRecords` for a large run).
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
    tasks: Sequence[TaskRecord]
    executor: str
    session: DistributedSession = field(repr=False)
    run_id: str | None = None
    n_resumed: int = 0
    n_checkpoints: int = 0
