"""Resumable runs (``run_id=``): work branch, checkpoints, publication, crash recovery.

A run writes on its private work branch ``icechunk-distributed/<run_id>`` and commits its
progress there (checkpoints) while regions are merged. The same call again, after a crash or
a failure, finds the record of the run in the work branch's tip, checks that the plan is the
same, writes only the missing regions, and publishes: the target branch moves to the run's
final snapshot in one conditional reset, only if nobody committed to it meanwhile. A tag
records the publication, so a call after it finds the run done. Run records and their
listing and removal are in :mod:`icechunk_distributed.runs`.

The same machinery keeps commits under Icechunk's limits (``max_chunks_per_commit=``, the
counting is in :mod:`icechunk_distributed.commitsize`): a run also checkpoints before its
uncommitted chunk references could pass the limit, and a write without ``run_id`` whose plan
is over the limit becomes an *internal* run (a generated id, no time-based checkpoints,
nothing kept after a failure): it commits in steps on its work branch and publishes once, so
readers of the target branch never see a partial write.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import icechunk

from icechunk_distributed import runs
from icechunk_distributed.commitsize import check_coordinator_chunks, chunk_sizes
from icechunk_distributed.dispatch import region_write_error
from icechunk_distributed.errors import (
    CommitConflictError,
    RunMismatchError,
    SessionStateError,
    TargetMovedError,
)
from icechunk_distributed.merging import MERGE_BATCH
from icechunk_distributed.results import TaskRecord

if TYPE_CHECKING:
    from icechunk import Repository

    from icechunk_distributed.adapters import Adapter, Capabilities
    from icechunk_distributed.runner import Backups
    from icechunk_distributed.writer import RegionWriter

__all__ = ["Checkpointer", "ResumableRun", "write_resumable"]


@dataclass
class ResumableRun:
    """A ``run_id`` run: checkpoints on its work branch, one conditional publication.

    Make it with :meth:`open`, which reads what the repository knows of the run; the
    constructor only holds that.
    """

    repo: Repository
    run_id: str
    branch: str
    base: str  # the target's snapshot the run started from
    state: runs.RunState | None = None  # the record on the work branch (progress)
    work_tip: str | None = None  # the work branch's last checkpoint
    published: tuple[runs.RunState, str] | None = None  # the record and snapshot, if published
    stale_work: bool = False  # a work branch without a checkpoint: nothing to keep
    created: bool = False  # this call created the work branch
    n_checkpoints: int = 0
    internal: bool = False  # made for max_chunks_per_commit, not by the caller's run_id
    finished: bool = False  # the complete result is committed on the work branch

    @classmethod
    def open(cls, repo: Repository, run_id: str, branch: str) -> ResumableRun:
        """Read the run's record (published, in progress or none); refuse a mismatch.

        Raises
        ------
        RunMismatchError
            The stored run writes to another branch.
        ValueError
            A new run's branch does not exist.
        """
        runs.work_branch(run_id)  # refuses a malformed run_id before any read
        # Published already (a tag outlives later commits on the target): nothing to write.
        published = runs.published_state(repo, run_id, branch)
        state, tip = (None, None) if published else runs.read_state(repo, run_id)
        known = published[0] if published else state
        if known is None:
            if branch not in repo.list_branches():
                mine = sorted(
                    b for b in repo.list_branches() if not b.startswith(runs.RUN_BRANCH_PREFIX)
                )
                raise ValueError(
                    f"branch {branch!r} does not exist; create it first (existing: {mine})"
                )
            base = repo.lookup_branch(branch)
            return cls(repo, run_id, branch, base, stale_work=tip is not None)
        if known.branch != branch:
            raise RunMismatchError(
                f"run {run_id!r} writes to branch {known.branch!r}, not {branch!r}. Rerun "
                f"with branch={known.branch!r}, or use another run_id."
            )
        return cls(
            repo,
            run_id,
            branch,
            known.base_snapshot_id,
            state=state,
            work_tip=tip if state is not None else None,
            published=published,
        )

    @classmethod
    def open_internal(cls, repo: Repository, branch: str) -> ResumableRun:
        """A new run under a generated id, for a write without ``run_id`` over the limit."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        run = cls.open(repo, f"split-{stamp}-{uuid.uuid4().hex[:8]}", branch)
        run.internal = True
        return run

    @property
    def work(self) -> str:
        """The run's private branch."""
        return runs.work_branch(self.run_id)

    @property
    def stored(self) -> runs.RunState | None:
        """The record this call must match: the published run's, or the work branch's."""
        return self.published[0] if self.published else self.state

    @property
    def session_branch(self) -> str:
        """Where the writer's session opens: the work branch once it exists."""
        return self.branch if self.published else self.work

    def start(self) -> None:
        """Create the work branch at the base, for a new run."""
        if self.state is None and self.published is None:
            if self.stale_work:
                self.repo.delete_branch(self.work)
            self.repo.create_branch(self.work, self.base)
            self.created = True

    def check(self, writer: RegionWriter, caps: Capabilities) -> None:
        """Plan against the run's base; refuse a plan other than the stored one."""
        known = self.stored
        parallelism = caps.parallelism
        if known is not None:
            parallelism = int(known.plan.get("parallelism") or parallelism)
        writer.plan(**{**writer.limits_for(caps), "parallelism": parallelism})
        summary, digest = writer.plan_summary()
        if known is not None and known.digest != digest:
            raise self._mismatch(known, summary)
        if known is None:
            self.state = runs.RunState(
                run_id=self.run_id,
                branch=self.branch,
                base_snapshot_id=self.base,
                digest=digest,
                plan={**summary, "parallelism": parallelism},
                n_regions=len(writer.write_plan.regions),
                started=runs.now_iso(),
            )

    def _mismatch(self, known: runs.RunState, summary: dict[str, Any]) -> RunMismatchError:
        theirs = {k: v for k, v in known.plan.items() if k != "parallelism"}
        diff = sorted(k for k in set(summary) | set(theirs) if summary.get(k) != theirs.get(k))
        fix = (
            " (this one is published)."
            if self.published
            else f", or drop its progress with icechunk_distributed.remove_run(repo, "
            f"{self.run_id!r})."
        )
        return RunMismatchError(
            f"run {self.run_id!r} was started with another plan; it differs in "
            f"{diff or ['the regions (task_size= or regions=)']}: stored "
            f"{ {k: theirs.get(k) for k in diff} }, now { {k: summary.get(k) for k in diff} }. "
            "Rerun with the original arguments, or use another run_id" + fix
        )

    def _reaches(self, snapshot_id: str) -> bool:
        """Whether ``snapshot_id`` is in the target's history since the run's base."""
        for info in self.repo.ancestry(branch=self.branch):
            if info.id == snapshot_id:
                return True
            if info.id == self.base:
                return False
        return False

    def _moved(self, snapshot_id: str) -> TargetMovedError:
        tip = self.repo.lookup_branch(self.branch)
        return TargetMovedError(
            f"branch {self.branch!r} moved while run {self.run_id!r} was writing (the run "
            f"started at snapshot {self.base}, the branch is now at {tip}); it was not "
            f"overwritten. The complete result is on branch {self.work!r} at snapshot "
            f"{snapshot_id}. Either publish it over the other commits, dropping them from the "
            f"branch, with repo.reset_branch({self.branch!r}, {snapshot_id!r}), or start over "
            f"on top of them: icechunk_distributed.remove_run(repo, {self.run_id!r}), then the "
            "same call again.",
            run_id=self.run_id,
            work_branch=self.work,
            snapshot_id=snapshot_id,
            base_snapshot_id=self.base,
            tip_snapshot_id=tip,
        )

    def checkpoint(self, writer: RegionWriter, message: str) -> None:
        """Commit what the writer's session holds to the work branch, with the run's record."""
        assert self.state is not None
        try:
            writer.session.checkpoint(message, self.state.to_metadata())
        except icechunk.ConflictError as exc:
            raise self.conflict() from exc
        self.n_checkpoints += 1

    def conflict(self) -> CommitConflictError:
        """Someone else committed to the work branch."""
        return CommitConflictError(
            f"another process committed to {self.work!r}, the private branch of run "
            f"{self.run_id!r}: is a second coordinator running with the same run_id? Only one "
            "may run at a time."
        )

    def publish(self, snapshot_id: str) -> None:
        """Move the target to ``snapshot_id`` if it is still at the base; then clean up.

        Idempotent: if an earlier call moved it already (and died before cleaning up), only
        the clean-up is left.
        """
        try:
            self.repo.reset_branch(self.branch, snapshot_id, from_snapshot_id=self.base)
        except icechunk.ConflictError:
            if not self._reaches(snapshot_id):
                raise self._moved(snapshot_id) from None
        if not self.internal:  # nobody calls an internal run again: no tag to find it by
            self._tag(snapshot_id)
        self.drop_work_branch()

    def _tag(self, snapshot_id: str) -> None:
        tag = runs.published_tag(self.run_id)
        try:
            self.repo.create_tag(tag, snapshot_id)
        except icechunk.IcechunkError:
            # Fine if an earlier call tagged it; otherwise keep the work branch, so that the
            # next call finds the run and finishes here instead of writing it again.
            try:
                tagged = self.repo.lookup_tag(tag)
            except icechunk.IcechunkError:
                tagged = None
            if tagged != snapshot_id:
                raise

    def drop_work_branch(self) -> None:
        """Delete the work branch if it is there (after publication)."""
        if self.work in self.repo.list_branches():
            self.repo.delete_branch(self.work)

    def abandon(self) -> None:
        """After a failure: drop a work branch with nothing worth keeping.

        That of a ``run_id`` run before its first checkpoint; that of an internal run unless
        it holds the complete result (publication was refused, :class:`TargetMovedError`
        says how to publish it): nobody resumes an internal run.
        """
        with contextlib.suppress(Exception):
            if self.internal and not self.finished:
                self.drop_work_branch()
            elif (
                self.created
                and self.n_checkpoints == 0
                and self.repo.lookup_branch(self.work) == self.base  # still ours, still empty
            ):
                self.repo.delete_branch(self.work)


class Checkpointer:
    """Commits a run's progress at least every ``every`` seconds while regions are merged.

    A timer thread saves merged-but-unsaved regions even when no result arrives for a while
    (the last, slow tasks): ``lock`` keeps merges, argument building and checkpoints apart. A
    failed save is retried at the next occasion; :attr:`MAX_FAILURES` in a row end the run.

    With ``sizes`` (the chunk count of each region to write, see :func:`chunk_sizes`), it
    also commits as soon as the next merge could pass ``limit`` chunk references. The writer
    merges results in batches of at most :attr:`batch` (passed to it as ``max_batch``), one
    batch at a time under ``lock``, so that is as soon as the uncommitted count plus
    ``batch`` times the largest region could pass the limit: no commit ever holds more. A
    batch is kept to a quarter of the limit at most, so commits hold at least about half.
    """

    MAX_FAILURES = 3
    MAX_TICK = 1.0  # seconds: how often the timer looks, at most

    def __init__(
        self,
        run: ResumableRun,
        writer: RegionWriter,
        every: float,
        sizes: dict[int, int] | None = None,
        limit: int = 0,
    ) -> None:
        assert run.state is not None
        self.run, self.state, self.writer, self.every = run, run.state, writer, every
        self.sizes, self.limit = sizes, limit  # sizes: of the regions not merged yet
        biggest = max(sizes.values(), default=0) if sizes is not None else 0
        self.batch = None if not biggest else max(1, min(MERGE_BATCH, limit // (4 * biggest)))
        self.margin = (self.batch or 0) * biggest  # what one batch may merge at most
        self.pending = 0  # chunk references merged since the last commit (the plan's count)
        self.fresh = False  # saved since the last merge that changed something
        self.full = False  # a save by count failed: saving more could pass the limit
        self.lock = threading.Lock()
        self.dirty = False
        self.last = time.monotonic()
        self.n_saved = len(run.state.done)  # regions in the last checkpoint
        self.failures = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="checkpoints", daemon=True)

    def __enter__(self) -> Checkpointer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def save(self) -> None:
        """Commit a checkpoint now."""
        n = len(self.state.done)
        self.run.checkpoint(self.writer, f"icechunk-distributed run {self.run.run_id}: checkpoint")
        self.dirty, self.last, self.n_saved, self.pending = False, time.monotonic(), n, 0
        self.fresh = True

    def save_if_dirty(self) -> None:
        """After a failure: keep what was merged, if saving still works (and fits)."""
        if self.dirty and not self.full:
            with contextlib.suppress(Exception):
                self.save()

    def _save_when_due(self) -> None:
        if not self.dirty or time.monotonic() - self.last < self.every:
            return
        try:
            self.save()
            self.failures = 0
        except (CommitConflictError, SessionStateError) as exc:  # retrying will not help
            self.error = exc
        except Exception as exc:  # e.g. a throttled store: try again next time
            self.failures += 1
            self.last = time.monotonic()
            if self.failures >= self.MAX_FAILURES:
                self.error = exc

    def merged(self, index: int) -> None:
        """Called with ``lock`` held, after region ``index`` was merged."""
        if self.error is not None:
            raise self.error
        self.state.done.add(index)
        self.dirty = True
        if self.sizes is not None:
            size = self.sizes.pop(index, 0)
            # The rest of a batch whose first region's save committed it: nothing to count.
            self.fresh = self.fresh and not self.writer.session.has_uncommitted_changes
            self.pending += 0 if self.fresh else size
            # After the last region, the final commit takes what is pending.
            if self.sizes and self.pending + self.margin > self.limit:
                try:
                    self.save()  # not deferred like a timed save: the next batch might not fit
                except BaseException as exc:
                    # No save after this: what is still merged might not fit with what waits.
                    self.error, self.full = exc, True
                    raise
                return
        self._save_when_due()

    def _loop(self) -> None:
        while not self._stop.wait(max(0.01, min(self.every, self.MAX_TICK))):
            with self.lock:
                self._save_when_due()


def write_resumable(
    writer: RegionWriter,
    run: ResumableRun,
    adapter: Adapter,
    *,
    message: str | None,
    metadata: Mapping[str, Any] | None,
    checkpoint_every: float,
    backups: Backups | None,
    max_chunks: int | None = None,
) -> tuple[str, Sequence[TaskRecord], int]:
    """Plan, check, write what the work branch lacks, checkpoint, publish.

    Returns the published snapshot id, the records of the regions written by this call, and
    how many regions earlier calls had written. No commit holds more than ``max_chunks``
    chunk references.
    """
    run.check(writer, adapter.capabilities)
    if run.published is not None:
        published, snapshot_id = run.published
        run.drop_work_branch()
        return snapshot_id, [], published.n_regions
    state = run.state
    assert state is not None
    n_resumed = len(state.done)
    if state.complete and run.work_tip is not None:  # stopped between commit and publication
        run.publish(run.work_tip)
        return run.work_tip, [], n_resumed
    todo = [i for i in range(state.n_regions) if i not in state.done]
    sizes = chunk_sizes(writer, todo, max_chunks)  # refuses a region over the limit, now
    if run.created:
        writer.check_engine(adapter.capabilities)
        writer.write_metadata()
        check_coordinator_chunks(writer, max_chunks)
        run.checkpoint(writer, f"icechunk-distributed run {run.run_id}: metadata")
    else:
        writer.metadata_written_earlier()  # by the call that created the work branch
    # Even if the target moved meanwhile, finish the work on the work branch: publication
    # (conditional) refuses then, and the complete result is there to publish deliberately.
    records: Sequence[TaskRecord] = []
    if not state.complete:
        # An internal run is never resumed: timed checkpoints would only add commits.
        every = math.inf if run.internal else checkpoint_every
        budget = (sizes, max_chunks or 0)
        records = _write_missing(writer, run, adapter, todo, every, budget, backups)
        state.complete = True
    message, meta = writer.commit_record(message, metadata, run.run_id)
    meta.update(state.to_metadata())
    try:
        snapshot_id = writer.session.commit(message, meta, allow_empty=True)
    except icechunk.ConflictError as exc:
        raise run.conflict() from exc
    run.finished = True
    run.publish(snapshot_id)
    return snapshot_id, records, n_resumed


def _write_missing(
    writer: RegionWriter,
    run: ResumableRun,
    adapter: Adapter,
    todo: list[int],
    every: float,
    budget: tuple[dict[int, int] | None, int],
    backups: Backups | None,
) -> Sequence[TaskRecord]:
    """Write the regions ``todo`` (no checkpoint holds them); on failure, keep what was merged.

    ``budget`` is each region's chunk count (None: no need to count) and the limit per commit.
    """
    saver = Checkpointer(run, writer, every, *budget)
    try:
        with saver:
            records, failures = writer.run_tasks(
                adapter,
                indices=todo,
                after_merge=saver.merged,
                backups=backups,
                lock=saver.lock,
                max_batch=saver.batch,
            )
    except BaseException:
        if not run.internal:  # an internal run's work branch is dropped: nothing to resume
            saver.save_if_dirty()  # the same call again continues from there
        raise
    if failures:
        kept = ""
        if not run.internal:
            saver.save_if_dirty()
            kept = (
                f"\nThe {saver.n_saved} region(s) written are kept on branch {run.work!r}: "
                f"call again with run_id={run.run_id!r} to write only the rest."
            )
        raise region_write_error(
            failures,
            n_regions=len(todo),
            retries=writer.retries,
            outcome="the target branch is unchanged" + kept,
        )
    return records
