"""Resumable runs and clean-up: progress kept on a private work branch, published at once.

A run started with ``run_region_writes(..., run_id="...")`` writes on the branch
``icechunk-distributed/<run_id>``, created at the target branch's tip (the run's *base*). Every
commit there records, in its metadata, which regions are written; a rerun with the same
``run_id`` reads that record and writes only the rest. Publication is one conditional
``Repository.reset_branch(target, final, from_snapshot_id=base)``: it moves the target only if
nobody committed to it since the run started. This module reads and removes those work
branches, and wraps ``Repository.garbage_collect`` with a cutoff that spares unfinished runs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import icechunk

from icechunk_distributed._version import __version__

if TYPE_CHECKING:
    from icechunk import Repository

__all__ = [
    "RUN_BRANCH_PREFIX",
    "CleanupReport",
    "RunInfo",
    "garbage_collect",
    "list_runs",
    "remove_run",
    "work_branch",
]

RUN_BRANCH_PREFIX = "icechunk-distributed/"
"""Work branches are named ``RUN_BRANCH_PREFIX + run_id``."""

PUBLISHED_TAG_PREFIX = "icechunk-distributed/published/"
"""A published run is tagged ``PUBLISHED_TAG_PREFIX + run_id`` (for good: a run_id is one write)."""

_STATE_KEY = "icechunk_distributed_run"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def work_branch(run_id: str) -> str:
    """The work branch of a run.

    Parameters
    ----------
    run_id : str
        Letters, digits, ``.``, ``_`` and ``-``; at most 100 characters.

    Returns
    -------
    str
        ``"icechunk-distributed/<run_id>"``.
    """
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(
            f"run_id must be 1-100 letters, digits, '.', '_' or '-' (starting with a letter "
            f"or digit), e.g. 'era5-2026-11'; got {run_id!r}"
        )
    return RUN_BRANCH_PREFIX + run_id


def _ranges(indices: Iterable[int]) -> list[list[int]]:
    """Sorted indices as ``[start, stop)`` runs: a few numbers for thousands of regions."""
    out: list[list[int]] = []
    for i in sorted(set(indices)):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _indices(ranges: Iterable[Iterable[int]]) -> set[int]:
    return {i for start, stop in ranges for i in range(start, stop)}


def plan_digest(summary: Mapping[str, Any]) -> str:
    """A short, stable fingerprint of a plan summary (JSON-able)."""
    text = json.dumps(summary, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class RunState:
    """What a run's commits record (in their metadata, under ``icechunk_distributed_run``)."""

    run_id: str
    branch: str
    base_snapshot_id: str
    digest: str
    plan: dict[str, Any]
    n_regions: int
    done: set[int] = field(default_factory=set)
    complete: bool = False
    started: str = ""

    def to_metadata(self) -> dict[str, Any]:
        return {
            _STATE_KEY: {
                "run_id": self.run_id,
                "branch": self.branch,
                "base": self.base_snapshot_id,
                "digest": self.digest,
                "plan": self.plan,
                "n_regions": self.n_regions,
                "done": _ranges(self.done),
                "complete": self.complete,
                "started": self.started,
                "version": __version__,
            }
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any] | None, run_id: str) -> RunState | None:
        """Run ``run_id``'s record in a commit's metadata (None: none, or another run's).

        A work branch starts at the target's tip, which may hold another run's record.
        """
        raw = (metadata or {}).get(_STATE_KEY)
        if not isinstance(raw, Mapping) or raw.get("run_id") != run_id:
            return None
        return cls(
            run_id=str(raw["run_id"]),
            branch=str(raw["branch"]),
            base_snapshot_id=str(raw["base"]),
            digest=str(raw["digest"]),
            plan=dict(raw.get("plan") or {}),
            n_regions=int(raw["n_regions"]),
            done=_indices(raw.get("done") or []),
            complete=bool(raw.get("complete")),
            started=str(raw.get("started") or ""),
        )


def _tip(repo: Repository, branch: str) -> icechunk.SnapshotInfo | None:
    try:
        return next(iter(repo.ancestry(branch=branch)))
    except (icechunk.IcechunkError, StopIteration):
        return None


def read_state(repo: Repository, run_id: str) -> tuple[RunState | None, str | None]:
    """The state on the run's work branch, and that branch's tip (None: no work branch)."""
    branch = work_branch(run_id)
    if branch not in repo.list_branches():
        return None, None
    tip = _tip(repo, branch)
    if tip is None:  # pragma: no cover - a branch always has a tip
        return None, None
    return RunState.from_metadata(tip.metadata, run_id), tip.id


def published_tag(run_id: str) -> str:
    """The tag marking a published run (tags outlive later commits on the target)."""
    return PUBLISHED_TAG_PREFIX + work_branch(run_id)[len(RUN_BRANCH_PREFIX) :]


def published_state(
    repo: Repository, run_id: str, branch: str | None = None
) -> tuple[RunState, str] | None:
    """The run's state and snapshot if it was published (tagged, or the tip of ``branch``)."""
    try:
        snapshot_id = repo.lookup_tag(published_tag(run_id))
    except icechunk.IcechunkError:
        tip = _tip(repo, branch) if branch is not None else None
        state = RunState.from_metadata(tip.metadata, run_id) if tip is not None else None
        if tip is None or state is None or not state.complete:
            return None
        return state, tip.id
    state = RunState.from_metadata(repo.lookup_snapshot(snapshot_id).metadata, run_id)
    if state is None:  # pragma: no cover - a foreign tag
        return None
    return state, snapshot_id


def now_iso() -> str:
    """The current UTC time, ISO 8601."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunInfo:
    """A run that has not been published and cleaned up (its work branch still exists).

    Attributes
    ----------
    run_id : str
        The ``run_id`` given to :func:`~icechunk_distributed.run_region_writes`.
    branch : str or None
        The target branch (None if the work branch holds no checkpoint yet).
    work_branch : str
        The private branch holding the run's checkpoints.
    base_snapshot_id : str
        The target's tip when the run started; publication requires it to still be there.
    n_regions, n_done : int
        Regions planned and regions checkpointed.
    complete : bool
        Every region is written; only publication is left.
    started : str
        When the run started (UTC, ISO 8601).
    updated : datetime.datetime
        When the last checkpoint was committed.
    """

    run_id: str
    branch: str | None
    work_branch: str
    base_snapshot_id: str
    n_regions: int
    n_done: int
    complete: bool
    started: str
    updated: dt.datetime


def list_runs(repo: Repository) -> list[RunInfo]:
    """The runs whose work branches exist: unfinished, failed, or not yet published.

    Parameters
    ----------
    repo : icechunk.Repository
        The repository.

    Returns
    -------
    list of RunInfo
        Sorted by ``run_id``. Rerun one with the same ``run_id`` to finish it, or remove it
        with :func:`remove_run`.
    """
    out = []
    for branch in sorted(repo.list_branches()):
        if not branch.startswith(RUN_BRANCH_PREFIX):
            continue
        run_id = branch[len(RUN_BRANCH_PREFIX) :]
        tip = _tip(repo, branch)
        if tip is None:  # pragma: no cover
            continue
        state = RunState.from_metadata(tip.metadata, run_id)
        out.append(
            RunInfo(
                run_id=run_id,
                branch=state.branch if state else None,
                work_branch=branch,
                base_snapshot_id=state.base_snapshot_id if state else tip.id,
                n_regions=state.n_regions if state else 0,
                n_done=len(state.done) if state else 0,
                complete=state.complete if state else False,
                started=state.started if state else "",
                updated=tip.written_at,
            )
        )
    return out


def remove_run(repo: Repository, run_id: str) -> bool:
    """Delete a run's work branch: its progress is dropped; the target branch is untouched.

    The chunks only that branch referenced become orphans; :func:`garbage_collect` reclaims
    them. A later run with the same ``run_id`` starts from scratch, unless that ``run_id`` was
    published: then it returns the published snapshot (its tag stays; icechunk never reuses a
    tag name), and a new write needs a new ``run_id``.

    Parameters
    ----------
    repo : icechunk.Repository
        The repository.
    run_id : str
        The run.

    Returns
    -------
    bool
        Whether there was a work branch to delete.
    """
    branch = work_branch(run_id)
    if branch not in repo.list_branches():
        return False
    repo.delete_branch(branch)
    return True


@dataclass(frozen=True)
class CleanupReport:
    """What :func:`garbage_collect` did (or, with ``dry_run``, would do).

    Attributes
    ----------
    cutoff : datetime.datetime
        Only unreferenced objects written before this were deleted.
    dry_run : bool
        Nothing was deleted.
    chunks_deleted, bytes_deleted, snapshots_deleted, manifests_deleted : int
        From icechunk's ``GCSummary``.
    summary : icechunk.GCSummary
        Icechunk's full summary.
    """

    cutoff: dt.datetime
    dry_run: bool
    chunks_deleted: int
    bytes_deleted: int
    snapshots_deleted: int
    manifests_deleted: int
    summary: Any = field(repr=False)


_MIN_AGE = dt.timedelta(hours=1)


def garbage_collect(
    repo: Repository,
    *,
    older_than: dt.timedelta = dt.timedelta(days=7),
    dry_run: bool = False,
    now: dt.datetime | None = None,
) -> CleanupReport:
    """Delete objects no branch or tag references, if older than a safe cutoff.

    Failed attempts, backups that lost, interrupted runs and removed work branches leave
    chunks nothing references; this reclaims them with ``Repository.garbage_collect``.

    Parameters
    ----------
    repo : icechunk.Repository
        The repository.
    older_than : datetime.timedelta, default 7 days
        Spare everything written more recently. It must exceed the longest write still in
        progress anywhere: a run that has not committed yet (no ``run_id``, or not yet
        checkpointed) holds chunks nothing references, and deleting them corrupts its
        commit. At least one hour.
    dry_run : bool, default False
        Count what would be deleted without deleting.
    now : datetime.datetime, optional
        The current time (for tests).

    Returns
    -------
    CleanupReport
        The cutoff used and what was deleted.

    Notes
    -----
    The cutoff is moved further back to before the start of every unfinished run that has a
    work branch (see :func:`list_runs`), since its in-flight chunks are not committed yet.
    """
    if older_than < _MIN_AGE:
        raise ValueError(
            f"older_than={older_than} is too recent to be safe: chunks of writes still in "
            f"progress are unreferenced until they commit. Use at least {_MIN_AGE}, and more "
            "than your longest-running write."
        )
    now = now or dt.datetime.now(dt.UTC)
    cutoff = now - older_than
    for run in list_runs(repo):
        started = dt.datetime.fromisoformat(run.started) if run.started else run.updated
        cutoff = min(cutoff, started - _MIN_AGE)
    summary = repo.garbage_collect(cutoff, dry_run=dry_run)
    return CleanupReport(
        cutoff=cutoff,
        dry_run=dry_run,
        chunks_deleted=int(summary.chunks_deleted),
        bytes_deleted=int(summary.bytes_deleted),
        snapshots_deleted=int(summary.snapshots_deleted),
        manifests_deleted=int(summary.manifests_deleted),
        summary=summary,
    )
