"""The one call: :func:`run_region_writes` (and its dry run, :func:`plan_regions`).

Checks the arguments, opens the run (resumable with ``run_id=``, see
:mod:`icechunk_distributed.resume`), drives a :class:`~icechunk_distributed.RegionWriter`
through its steps on the chosen engine, and on any failure undoes what the call started, in
one place (:class:`_Rollback`): uncommitted writes are discarded and an empty work branch is
removed, so the target branch is exactly as it was.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import icechunk
import xarray as xr

from icechunk_distributed import options
from icechunk_distributed.adapters import open_adapter
from icechunk_distributed.commitsize import (
    DEFAULT_MAX_CHUNKS_PER_COMMIT,
    check_max_chunks_per_commit,
    must_split,
)
from icechunk_distributed.planning import Region
from icechunk_distributed.progress import Progress
from icechunk_distributed.results import WriteResult, total_bytes, total_chunks
from icechunk_distributed.resume import ResumableRun, write_resumable
from icechunk_distributed.runner import Backups
from icechunk_distributed.session import DistributedSession, writable_session
from icechunk_distributed.task import Loader
from icechunk_distributed.template import Mode
from icechunk_distributed.writer import RegionWriter

if TYPE_CHECKING:
    from icechunk import Repository, Session

__all__ = ["plan_regions", "run_region_writes"]


class _Rollback:
    """Undo steps registered as a call goes; run (newest first) only if the call fails."""

    def __init__(self) -> None:
        self.steps: list[Callable[[], None]] = []

    def __call__(self, step: Callable[[], None]) -> None:
        self.steps.append(step)

    def undo(self) -> None:
        for step in reversed(self.steps):
            with contextlib.suppress(Exception):  # the original error is the one to report
                step()


@contextlib.contextmanager
def _undo_on_failure() -> Iterator[_Rollback]:
    rollback = _Rollback()
    try:
        yield rollback
    except BaseException:
        rollback.undo()
        raise


def _check_run_options(
    target: object, branch: str, checkpoint_every: object, backups: object
) -> tuple[float, Backups | None]:
    if isinstance(target, icechunk.Repository):
        options.check_branch(target, branch)
    every = options.check_checkpoint_every(checkpoint_every)
    policy = Backups() if backups is True else backups or None
    if policy is not None and not isinstance(policy, Backups):
        raise TypeError(f"backups must be True, False or a Backups(...), not {backups!r}")
    return every, policy


def _open_run(target: object, run_id: str, branch: str, commit: bool) -> ResumableRun:
    if not isinstance(target, icechunk.Repository):
        raise TypeError(
            "run_id= needs the Repository as target: the run commits to its own work "
            f"branch and publishes to branch={branch!r}; got {type(target).__name__}"
        )
    if not commit:
        raise ValueError("run_id= publishes at the end; it cannot go with commit=False")
    return ResumableRun.open(target, run_id, branch)


# long: about 90 of its lines are the docstring of its 22 parameters; the body is glue.
def run_region_writes(
    source: xr.Dataset | Loader,
    target: Repository | Session | DistributedSession,
    *,
    executor: Any = "threads",
    template: xr.Dataset | None = None,
    branch: str = "main",
    group: str | None = None,
    mode: Mode = "w-",
    append_dim: str | None = None,
    region: Mapping[str, slice] | Literal["auto"] | None = None,
    region_dims: Sequence[str] | None = None,
    regions: Sequence[Mapping[str, slice]] | None = None,
    task_size: int | str | None = None,
    encoding: Mapping[str, Mapping[str, Any]] | None = None,
    message: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    retries: int = 2,
    progress: Progress = None,
    commit: bool = True,
    workers: int | None = None,
    run_id: str | None = None,
    checkpoint_every: float = 10.0,
    backups: Backups | bool | None = None,
    max_chunks_per_commit: int | None = DEFAULT_MAX_CHUNKS_PER_COMMIT,
) -> WriteResult:
    """Write ``source`` into an Icechunk repository region-parallel, and commit once.

    Plans chunk-aligned regions, checks them, writes metadata, coordinates and variables
    without a region dimension on the coordinator, runs one task per region on ``executor``,
    merges results as they finish, retries failed regions, and makes one commit. On any error
    nothing is committed and the branch is exactly as it was.

    Parameters
    ----------
    source : xarray.Dataset or callable
        A Dataset (numpy-, dask- or lazily file-backed), or ``load(region) -> Dataset`` that
        builds the region's piece inside the task (then ``template=`` is required).
    target : icechunk.Repository, icechunk.Session or DistributedSession
        A repository (a writable session on ``branch`` is opened and committed) or a writable
        session (used as is; with ``commit=False`` it is left uncommitted for the caller).
    executor : str, concurrent.futures.Executor or Adapter, default "threads"
        ``"serial"``, ``"threads"``, ``"processes"`` (forkserver/spawn), ``"joblib"`` (loky,
        honouring ``joblib.parallel_config``), or a ``ThreadPoolExecutor``/``ProcessPoolExecutor``.
    template : xarray.Dataset, optional
        Full shape, dtypes, coordinates and attributes; required with a loader.
    branch : str, default "main"
        Branch to commit to (with a repository target).
    group : str, optional
        Zarr group to write into.
    mode : {"w-", "w", "a", "a-", "r+"}, default "w-"
        As in ``Dataset.to_zarr``: create (refuse existing arrays); overwrite; append along
        ``append_dim`` (without it: add new variables and overwrite existing ones); append
        along ``append_dim`` without rewriting the existing variables that lack it; write
        into existing arrays only.
    append_dim : str, optional
        The dimension to grow, with ``mode="a"`` or ``"a-"``.
    region : dict or "auto", optional
        Where the source goes in the existing arrays (``mode="r+"``), as in
        ``Dataset.to_zarr(region=...)``: ``{dim: slice(start, stop)}`` (step 1), or
        ``"auto"`` to place it by its index coordinates' labels. The source's index labels
        must equal the stored ones there.
    region_dims : sequence of str, optional
        Dimensions to split (default: those along which the data variables are chunked).
    regions : sequence of dict, optional
        Explicit regions (``{dim: slice}``, in source coordinates), validated like planned ones.
    task_size : int or str, optional
        Chunks per task, or bytes such as ``"128MB"``; automatic by default.
    encoding : dict, optional
        As in ``Dataset.to_zarr`` (``chunks``, ``shards``, compressors, ...).
    message : str, optional
        Commit message.
    metadata : dict, optional
        Extra commit metadata.
    retries : int, default 2
        Extra attempts per failed region (each on a fresh copy of the fork).
    progress : bool or callable, optional
        ``True`` for a tqdm bar (default: when stderr is a terminal), or a callback receiving
        :class:`~icechunk_distributed.ProgressEvent`.
    commit : bool, default True
        Commit at the end; ``False`` leaves the merged session uncommitted (session targets).
    workers : int, optional
        Pool size for executors started by name.
    run_id : str, optional
        Make the run resumable (needs a repository target): progress is committed every
        ``checkpoint_every`` seconds to the private branch ``icechunk-distributed/<run_id>``;
        the same call again, after a crash or a failure, writes only what is missing. The
        target branch moves once, at the end, and only if nobody committed to it meanwhile
        (else :class:`~icechunk_distributed.TargetMovedError`). See ``docs/reliability.md``.
    checkpoint_every : float, default 10.0
        Seconds of progress between checkpoints of a ``run_id`` run.
    backups : bool or Backups, optional
        Launch a backup copy of tasks running far longer than their peers (``True`` for the
        defaults of :class:`~icechunk_distributed.Backups`); the first copy to finish
        wins and the other is never merged. Off by default.
    max_chunks_per_commit : int or None, default 10_000_000
        The most chunk references (chunks or shards) one commit may hold: Icechunk warns
        above 50 million in one commit and has failed near 72 million. A write whose plan
        holds more commits in steps on a work branch, as a ``run_id`` run does (and, with
        ``run_id``, checkpoints before a merge could pass the limit), then moves the target
        branch to the last step at once, so readers never see a partial write. A session
        target or ``commit=False`` cannot be split: over the limit they are refused before
        anything is written, as is a single region over it (lower ``task_size``). None: no
        limit. See ``docs/reliability.md``.

    Returns
    -------
    WriteResult
        Snapshot id, counts, bytes, seconds and per-task records.

    Raises
    ------
    RegionWriteError
        Regions failed on every attempt; nothing was committed (a ``run_id`` run keeps the
        written regions on its work branch).
    CommitConflictError
        A concurrent commit changed the same chunks; nothing was committed.
    TargetMovedError
        With ``run_id``: the target branch moved during the run; it was not overwritten.
    RunMismatchError
        With ``run_id``: the stored run was planned with other arguments.
    ValueError
        Over ``max_chunks_per_commit`` with a target that cannot commit in steps, or one
        region over it; nothing was written.
    """
    t0 = time.perf_counter()
    message = options.check_message(message)
    metadata = options.check_metadata(metadata)
    workers = options.check_workers(workers)
    every, policy = _check_run_options(target, branch, checkpoint_every, backups)
    limit = check_max_chunks_per_commit(max_chunks_per_commit)
    run = None if run_id is None else _open_run(target, run_id, branch, commit)
    n_resumed = 0
    snapshot_id: str | None
    written_to: str | None = None

    def make_writer(on: str) -> RegionWriter:
        return RegionWriter(
            source,
            target,
            template=template,
            branch=on,
            group=group,
            mode=mode,
            append_dim=append_dim,
            region=region,
            region_dims=region_dims,
            regions=regions,
            task_size=task_size,
            encoding=encoding,
            retries=retries,
            progress=progress,
        )

    with _undo_on_failure() as rollback:
        if run is not None:
            run.start()
            rollback(run.abandon)  # bad arguments or a failure: leave no empty work branch
        writer = make_writer(branch if run is None else run.session_branch)
        rollback(writer.discard)  # nothing was committed: drop it all
        with open_adapter(executor, workers=workers) as adapter:
            if run is None:
                writer.plan(**writer.limits_for(adapter.capabilities))
                if must_split(writer, target, limit, commit=commit):  # refuses if it cannot
                    assert isinstance(target, icechunk.Repository)
                    # Over the limit: an internal run commits in steps on its work branch and
                    # publishes once. This writer only planned; a new one writes there.
                    run = ResumableRun.open_internal(target, branch)
                    run.start()
                    rollback(run.abandon)
                    writer = make_writer(run.session_branch)
                    rollback(writer.discard)
            if run is not None:  # plan against the target as it was when the run started
                writer.reference = run.repo.readonly_session(snapshot_id=run.base)
                snapshot_id, records, n_resumed = write_resumable(
                    writer,
                    run,
                    adapter,
                    message=message,
                    metadata=metadata,
                    checkpoint_every=every,
                    backups=policy,
                    max_chunks=limit,
                )
            else:
                writer.check_engine(adapter.capabilities)
                writer.write_metadata()
                records = writer.write_regions(adapter, backups=policy)
                written_to = writer.branch  # a committed session is read-only and forgets it
                snapshot_id = writer.commit(message, metadata) if commit else None
    plan = writer.write_plan
    # A run's writer wrote on the work branch, which is gone now: a new session on the target.
    session = writer.session if run is None else writable_session(run.repo, branch)
    return WriteResult(
        snapshot_id=snapshot_id,
        branch=branch if run is not None else written_to,
        n_regions=len(plan.regions),
        n_chunks=total_chunks(records),
        bytes_written=total_bytes(records),
        seconds=time.perf_counter() - t0,
        tasks=records,
        executor=adapter.name,
        session=session,
        run_id=run_id,
        n_resumed=n_resumed,
        n_checkpoints=run.n_checkpoints if run is not None else 0,
    )


def plan_regions(
    source: xr.Dataset | Loader,
    target: Repository | Session | DistributedSession | None = None,
    *,
    template: xr.Dataset | None = None,
    branch: str = "main",
    group: str | None = None,
    mode: Mode = "w-",
    append_dim: str | None = None,
    region: Mapping[str, slice] | Literal["auto"] | None = None,
    region_dims: Sequence[str] | None = None,
    regions: Sequence[Mapping[str, slice]] | None = None,
    task_size: int | str | None = None,
    encoding: Mapping[str, Mapping[str, Any]] | None = None,
    executor: Any = "threads",
    workers: int | None = None,
    parallelism: int | None = None,
) -> list[Region]:
    """The regions :func:`run_region_writes` would write, with the same arguments (a dry run).

    The same planning as the run: the same checks of the store (give ``target`` for modes
    that write into existing arrays), the same encodings and chunks, the same task sizes for
    the executor's parallelism. Nothing is written.

    Parameters
    ----------
    source, target, template, branch, group, mode, append_dim, region, region_dims, regions, \
task_size, encoding, executor, workers
        As in :func:`run_region_writes`. Without ``target``, the plan is for a new store.
    parallelism : int, optional
        Workers the default task size should keep busy; by default the executor's (naming an
        engine such as ``"ray"`` starts it to ask).

    Returns
    -------
    list of dict
        One ``{dim: slice}`` per task, in source coordinates.
    """
    if target is None:
        target = icechunk.Repository.create(icechunk.in_memory_storage())
    writer = RegionWriter(
        source,
        target,
        template=template,
        branch=branch,
        group=group,
        mode=mode,
        append_dim=append_dim,
        region=region,
        region_dims=region_dims,
        regions=regions,
        task_size=task_size,
        encoding=encoding,
    )
    try:
        if parallelism is not None:
            return list(writer.plan(parallelism=parallelism))
        with open_adapter(executor, workers=options.check_workers(workers)) as adapter:
            return list(writer.plan(**writer.limits_for(adapter.capabilities)))
    finally:
        writer.discard()
