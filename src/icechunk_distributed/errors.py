"""Every error the library raises.

All of them derive from :class:`DistributedWriteError`, so ``except DistributedWriteError``
catches anything this library refuses. Each also derives from the builtin exception a caller
would naturally expect (``ValueError``, ``TypeError``, ``pickle.PicklingError``, ...), so code
that already handles those keeps working.
"""

from __future__ import annotations

import pickle
from typing import Any

__all__ = [
    "CommitConflictError",
    "DistributedWriteError",
    "ForeignSessionError",
    "ForkStartMethodError",
    "InvalidRegionError",
    "NotASnapshotError",
    "OverlappingWritesError",
    "PayloadTooLargeError",
    "PicklingNotAllowedError",
    "PieceMismatchError",
    "RegionWriteError",
    "RunMismatchError",
    "SessionStateError",
    "TargetMovedError",
    "TemplateMismatchError",
    "UnpicklableSourceError",
    "UnshareableStorageError",
]


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class DistributedWriteError(Exception):
    """Base class of every error raised by icechunk-distributed."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors with extra constructor arguments must still cross processes intact (a run
        # inside a worker task reports its own failure, not a broken pool).
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class PicklingNotAllowedError(DistributedWriteError, pickle.PicklingError, ValueError):
    """A writable session was pickled outside an ``allow_pickling()`` block.

    Shipping a writable session to a worker is only safe as a fork whose writes are merged
    back; ``allow_pickling()`` makes that fork and says when shipping is allowed. It is a
    ``ValueError`` too, as icechunk's own refusal to pickle a writable session is.
    """


class UnshareableStorageError(PicklingNotAllowedError):
    """The repository's storage cannot reach another process (in-memory storage).

    A pickled copy of an in-memory repository opens a new, empty store, so a task in another
    process would fail to read it and its writes would be lost. Raised before anything runs.
    """


class ForeignSessionError(DistributedWriteError, ValueError):
    """A snapshot or fork does not descend from the session it is merged into.

    Icechunk merges such forks without complaint and their data is silently lost (another
    repository) or applied to the wrong base (another branch, or a session that has committed
    or discarded its changes since the fork was made).
    """


class OverlappingWritesError(DistributedWriteError, ValueError):
    """Two merged sessions wrote different bytes to the same chunk.

    Icechunk would keep whichever was merged last, so the result would depend on task
    completion order. The ``conflicts`` attribute lists ``(array_path, chunk_coords)`` pairs.
    """

    def __init__(self, message: str, conflicts: list[tuple[str, tuple[int, ...]]]) -> None:
        super().__init__(message)
        self.conflicts = conflicts


class NotASnapshotError(DistributedWriteError, TypeError):
    """Something other than a snapshot or an icechunk ``ForkSession`` was passed to merge."""


class ForkStartMethodError(DistributedWriteError, RuntimeError):
    """A snapshot was used in a process started with the ``fork`` method.

    Icechunk's runtime (threads and locks) does not survive ``fork`` once the parent has used
    it: the child hangs. Use the ``spawn`` or ``forkserver`` start method.
    """


class SessionStateError(DistributedWriteError, RuntimeError):
    """The session is in a state that does not allow the requested operation."""


class InvalidRegionError(DistributedWriteError, ValueError):
    """A region is misaligned, overlapping, out of bounds, or names an unknown dimension.

    Raised before anything is written.
    """


class TemplateMismatchError(DistributedWriteError, ValueError):
    """The arrays in the store do not match the template, or already exist (``mode="w-"``).

    Missing arrays, other dimensions, sizes, dtypes or chunks are all reported with the names.
    """


class PieceMismatchError(TemplateMismatchError):
    """A loader returned a piece other than its region's (variables, shape, dtype, labels).

    Raised in the task; the region is not retried, since another attempt cannot fix it.
    """


class UnpicklableSourceError(DistributedWriteError, TypeError):
    """The source or loader cannot be shipped to worker processes. Raised before any task."""


class PayloadTooLargeError(DistributedWriteError, ValueError):
    """A task's arguments exceed what the engine accepts (Lithops' ``data_limit``).

    Raised before anything is written. Use a loader source, so tasks ship regions instead of
    data, or raise the engine's limit.
    """


class RegionWriteError(DistributedWriteError, RuntimeError):
    """Some regions still failed after every retry; nothing was committed.

    ``failures`` lists one :class:`~icechunk_distributed.writer.TaskFailure` per failed
    region: its region, the last exception (as text, and the object when it could travel),
    and how many attempts were made.
    """

    def __init__(self, message: str, failures: list[Any]) -> None:
        super().__init__(message)
        self.failures = failures


class CommitConflictError(DistributedWriteError, RuntimeError):
    """Another commit changed the same chunks or metadata while this run was writing.

    Nothing was committed: the branch shows the other writer's commit only.
    """


class RunMismatchError(DistributedWriteError, ValueError):
    """A ``run_id`` was given with a plan other than the one its checkpoints were made for.

    Raised before anything is written. Rerun with the original arguments, pick a new
    ``run_id``, or drop the old progress with :func:`~icechunk_distributed.remove_run`.
    """


class TargetMovedError(CommitConflictError):
    """The target branch moved while a resumable run was writing; it was not overwritten.

    The run's complete result (or its progress) stays on ``work_branch`` at ``snapshot_id``.
    """

    def __init__(
        self,
        message: str,
        *,
        run_id: str,
        work_branch: str,
        snapshot_id: str | None,
        base_snapshot_id: str,
        tip_snapshot_id: str,
    ) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.work_branch = work_branch
        self.snapshot_id = snapshot_id
        self.base_snapshot_id = base_snapshot_id
        self.tip_snapshot_id = tip_snapshot_id
