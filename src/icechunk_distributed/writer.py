"""RegionWriter: the staged steps of a region-parallel write, glue between the stages.

:func:`~icechunk_distributed.run_region_writes` (in :mod:`icechunk_distributed.api`) runs
them in order; :class:`RegionWriter` exposes them: check the store and plan (``target``,
``template``, ``planning``), write the metadata and the coordinator's variables (through
xarray, ``template``), run one task per region (``dispatch``, ``task``) and merge each
result into the session as it arrives (``session``), then commit once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import icechunk
import numpy as np
import xarray as xr

from icechunk_distributed import options
from icechunk_distributed._version import __version__
from icechunk_distributed.adapters import Adapter, Capabilities, open_adapter
from icechunk_distributed.dispatch import region_write_error, run_region_tasks, shipped_size
from icechunk_distributed.errors import CommitConflictError, SessionStateError
from icechunk_distributed.merging import ResultMerger
from icechunk_distributed.metadata import eager_data, metadata_dataset, write_lazy, write_metadata
from icechunk_distributed.planning import Picked, Region, WritePlan, build_plan, dims_of_regions
from icechunk_distributed.progress import Progress
from icechunk_distributed.results import TaskFailure, TaskRecord, TaskRecords, total_chunks
from icechunk_distributed.runner import Backups
from icechunk_distributed.runs import plan_digest
from icechunk_distributed.session import DistributedSession, SessionSnapshot, open_session
from icechunk_distributed.target import StoreCheck, check_store
from icechunk_distributed.task import Expectations, Loader, TaskInput, TaskOutput, run_task
from icechunk_distributed.template import (
    Mode,
    TemplateInfo,
    decide_encodings,
    describe_template,
    is_time_like,
    stored_encodings,
    task_encoding,
)

if TYPE_CHECKING:
    from icechunk import Repository, Session

__all__ = ["TASK_SHARE_OF_LIMIT", "RegionWriter"]

TASK_SHARE_OF_LIMIT = 0.5
"""Of an engine's payload limit, the share one task's data may take when the plan sizes tasks."""

# The steps, in order; each refuses to run before the one it needs.
_NEW, _METADATA, _REGIONS, _COMMITTED = range(4)
_STEP_NAMES = {_NEW: "nothing", _METADATA: "write_metadata()", _REGIONS: "write_regions()",
               _COMMITTED: "commit()"}  # fmt: skip


class _RegionsFailed(Exception):
    """Leaves an ``allow_pickling()`` block after failed regions (they are reported)."""


class RegionWriter:
    """The steps of :func:`~icechunk_distributed.run_region_writes`, to look in between.

    Parameters are those of :func:`~icechunk_distributed.run_region_writes` (without
    ``executor``, ``message``, ``metadata`` and ``commit``), and ``reference``. Typical use::

        writer = RegionWriter(ds, repo, mode="w-")
        writer.plan()                     # validated regions; nothing written yet
        writer.write_metadata()           # metadata, coordinates, the coordinator's variables
        writer.write_regions(executor="processes")
        writer.commit("ingest")

    The steps refuse to run out of order (:class:`SessionStateError`). Nothing is committed
    before :meth:`commit`; on any error, ``writer.session.discard_changes()`` (done for you by
    ``run_region_writes``) leaves the branch as it was.

    Parameters
    ----------
    reference : icechunk.Session, optional
        Check the store against this (read-only) session instead of the target's: a resumed
        run plans against the target as it was when the run started, not its work branch.
    """

    def __init__(
        self,
        source: xr.Dataset | Loader,
        target: Repository | Session | DistributedSession,
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
        retries: int = 2,
        progress: Progress = None,
        reference: Session | None = None,
    ) -> None:
        self.template, self.source, self.loader = options.check_source(
            source, template, mode=mode, append_dim=append_dim, region=region
        )
        self.group = group.strip("/") or None if group else None
        self.mode: Mode = mode
        self.append_dim = append_dim
        self.region = region
        self.region_dims = None if region_dims is None else tuple(region_dims)
        self.regions = None if regions is None else [dict(r) for r in regions]
        self.task_size = options.check_task_size(task_size)
        self.retries = options.check_retries(retries)
        self.progress = options.check_progress(progress)
        self.encoding = options.check_encoding(encoding, [str(n) for n in self.template.variables])
        self.reference = reference
        # A repository's session is opened when first needed (a constructor does no I/O);
        # a session target is checked and wrapped now.
        self._target, self._branch = target, branch
        self.owns_session = isinstance(target, icechunk.Repository)
        self._session = None if self.owns_session else open_session(target, branch)
        self.records: Sequence[TaskRecord] = []
        self.executor_name = ""
        # Set by plan(): what the store holds, the plan, and each new variable's encoding,
        # settled once (decide_encodings) for the tasks to apply.
        self._found = StoreCheck()
        self._plan: WritePlan | None = None
        self._info: TemplateInfo | None = None
        self._decided: dict[str, dict[str, Any]] = {}
        self._labels: dict[str, np.ndarray] = {}  # a loader's index labels, to check pieces
        self._expect: Expectations | None = None
        # Set when tasks run: the encodings they apply, one task's pickled size, and the
        # engine limit check_picklable passed for.
        self._encodings: dict[str, dict[str, Any]] = {}
        self._item_bytes = 0
        self._checked_limit: tuple[int | None, bool] | None = None
        self._stage = _NEW

    @property
    def session(self) -> DistributedSession:
        """The session the write goes through (opened on ``branch`` for a repository)."""
        if self._session is None:
            self._session = open_session(self._target, self._branch)
        return self._session

    @property
    def branch(self) -> str | None:
        """The branch the session writes to."""
        return self.session.branch

    def discard(self) -> None:
        """Drop the uncommitted writes if this writer opened the session (else they are yours)."""
        if self.owns_session and self._session is not None and not self._session.read_only:
            self._session.discard_changes()

    def _require(self, stage: int, step: str, missing: str) -> None:
        if self._stage < stage - 1:
            raise SessionStateError(f"{step} needs {missing} first")
        if self._stage >= stage:
            raise SessionStateError(
                f"{step} already ran for this writer (it has done {_STEP_NAMES[self._stage]}); "
                "make a new RegionWriter for another write"
            )

    # -- planning and checking, before anything is written
    def plan(
        self, *, parallelism: int | None = None, max_task_bytes: int | None = None
    ) -> Sequence[Region]:
        """Plan and validate the regions (in source coordinates); nothing is written.

        Parameters
        ----------
        parallelism : int, optional
            Workers the default task size should keep busy.
        max_task_bytes : int, optional
            Keep each task's data under this size where the plan chooses the task size (the
            engine's limit on what one call ships; see :meth:`limits_for`).

        Returns
        -------
        list of dict
            The regions.
        """
        if self._plan is None:
            found = check_store(
                self.reference.store if self.reference is not None else self.session.session.store,
                self.template,
                group=self.group,
                mode=self.mode,
                append_dim=self.append_dim,
                region=self.region,
                encoding=self.encoding,
            )
            self._found = found
            self._decided = decide_encodings(self.template, self.encoding, existing=found.existing)
            region_dims = self.region_dims
            if region_dims is None and self.regions is not None:
                region_dims = dims_of_regions(self.regions, [str(d) for d in self.template.dims])
            if region_dims is not None and self.append_dim and self.append_dim not in region_dims:
                # Appending always splits along the append dim: tasks write into the grown
                # part of the arrays, never over what is there.
                region_dims = (*region_dims, self.append_dim)
            info = describe_template(
                self.template,
                encodings=self._decided,
                coordinator=[
                    str(n)
                    for n, v in self.template.data_vars.items()
                    if str(n) in self._decided and v.chunks is None and is_time_like(v.variable)
                ],
                region_dims=region_dims,
                existing_units=found.units,
                keep=(self.append_dim,) if self.append_dim else (),
            )
            self._expect = None
            self._plan = build_plan(
                dims=info.dims,
                units=info.units,
                itemsizes=info.itemsizes,
                sizes=info.sizes,
                offsets=found.offsets,
                region_dims=info.region_dims,
                regions=self.regions,
                task_size=self.task_size,
                parallelism=parallelism,
                require_cover=self.mode != "r+",
                max_task_bytes=max_task_bytes,
            )
            self._info = info
            if self.loader is not None:
                self._labels = {
                    d: np.asarray(self.template.indexes[d])
                    for d in info.region_dims
                    if d in self.template.indexes
                }
        return self._plan.regions

    def limits_for(self, caps: Capabilities) -> dict[str, int | None]:
        """The planning limits an engine sets, as keyword arguments of :meth:`plan`.

        Its parallelism; and for a Dataset source shipped to an engine with a payload limit
        (Lithops' ``data_limit``), a share of that limit per task, so that tasks ship within
        it (a loader ships only its region).
        """
        limit = caps.max_arg_bytes
        ship = self.source is not None and caps.crosses_processes and limit
        return {
            "parallelism": caps.parallelism,
            "max_task_bytes": int(limit * TASK_SHARE_OF_LIMIT) if ship and limit else None,
        }

    @property
    def info(self) -> TemplateInfo:
        """What the template holds for planning (planning first if needed)."""
        self.plan()
        assert self._info is not None
        return self._info

    @property
    def write_plan(self) -> WritePlan:
        """The validated plan (planning first if needed)."""
        self.plan()
        assert self._plan is not None
        return self._plan

    def task_input(self, index: int, snapshot: SessionSnapshot) -> TaskInput:
        """Task ``index``'s input, writing through ``snapshot``."""
        plan = self._plan if self._plan is not None else self.write_plan
        region = plan.regions[index]
        if self._expect is None:
            dtypes = {n: self.template.variables[n].dtype for n in plan.dims}
            self._expect = Expectations(plan.dims, plan.sizes, dtypes)
        piece = None
        if self.source is not None:
            piece = self.source[list(plan.dims)].isel(region)
            piece = piece.drop_vars(list(piece.coords))
        return TaskInput(
            index=index,
            attempt=0,
            snapshot=snapshot,
            piece=piece,
            loader=self.loader,
            region=region,
            abs_region=plan.absolute(region),
            group=self.group,
            expect=self._expect(region),
            units=plan.units,
            encodings=self._encodings,
            labels={d: v[region[d]] for d, v in self._labels.items() if d in region},
            stored_dims=self._found.stored_dims,
        )

    def check_picklable(self, max_arg_bytes: int | None = None, *, by_value: bool = False) -> int:
        """Raise if tasks cannot be shipped to processes; return one task's payload bytes.

        Parameters
        ----------
        max_arg_bytes : int, optional
            The engine's limit on a call's arguments (Lithops' ``data_limit``).
        by_value : bool, default False
            Pickle the user's own modules by value (for workers elsewhere).

        Returns
        -------
        int
            Pickled size of the first task's data (or loader).

        Raises
        ------
        UnpicklableSourceError
            The source or loader cannot be pickled.
        PayloadTooLargeError
            One task's data is over ``max_arg_bytes``.
        """
        if not self.write_plan.regions:
            return 0
        obj: Any = self.loader
        if obj is None:
            obj = self.task_input(0, None).piece  # type: ignore[arg-type]
        what = "loader" if self.loader is not None else "source dataset"
        size = shipped_size(obj, what, max_arg_bytes, by_value=by_value)
        self._item_bytes = size
        return size

    def check_engine(self, caps: Capabilities) -> None:
        """Refuse an engine that cannot run these tasks, before anything is written.

        For engines that cross processes: the repository must be reachable from them (not
        in memory), and :meth:`check_picklable` must pass for the engine's payload limit
        (checked once per limit).
        """
        if caps.crosses_processes:
            self.session.check_shareable()
        checked = (caps.max_arg_bytes, not caps.shares_modules)
        if caps.crosses_processes and self._checked_limit != checked:
            self.check_picklable(caps.max_arg_bytes, by_value=not caps.shares_modules)
            self._checked_limit = checked

    # -- writing
    def write_metadata(self) -> None:
        """Write metadata, coordinates and the variables the tasks do not write.

        One ``Dataset.to_zarr(compute=False)`` call on a stand-in of the template: xarray
        creates or grows the arrays with the encodings it would choose for the real data,
        checks the mode and the region, and writes everything in memory; the task variables
        are lazy stand-ins and are not written here.
        """
        self._require(_METADATA, "write_metadata()", "plan()")
        info = self.info
        eager = self.source
        if info.eager_vars and self.loader is not None:
            eager = eager_data(self.loader, self.template, info, retries=self.retries)
        meta, encoding, lazy = metadata_dataset(
            self.template, info, self._decided, self.encoding, eager=eager
        )
        # A virtual loader creates its arrays itself: their codecs are the source files'.
        virtual = [n for n in getattr(self.loader, "virtual_variables", ()) if n in meta]
        if virtual:
            meta = meta.drop_vars(virtual)
            lazy = [n for n in lazy if n not in virtual]
        # The base session's own store, whichever thread calls: forks made afterwards (the
        # tasks' seed) see these writes.
        store = self.session.direct_store()
        write_metadata(
            store,
            meta,
            encoding,
            group=self.group,
            mode=self.mode,
            append_dim=self.append_dim,
            region=self._found.placed or None,
        )
        if lazy:
            plan, found = self.write_plan, self._found
            # a-: existing variables without the append dim are left as they are.
            untouched = []
            if self.mode == "a-" and self.append_dim:
                untouched = [
                    n for n in lazy if n in found.existing and self.append_dim not in meta[n].dims
                ]
            write_lazy(
                store,
                xr.Dataset({n: meta.variables[n] for n in lazy}),
                group=self.group,
                decided=self._decided,
                placed={d: slice(o, o + plan.sizes[d]) for d, o in plan.offsets.items()},
                skip=untouched,
                stored_dims=found.stored_dims,
            )
        create = getattr(self.loader, "write_virtual_metadata", None)
        if create is not None:
            create(
                store,
                self.group,
                shapes={n: self.template[n].shape for n in virtual},
                append_dim=self.append_dim,
            )
        self._stage = _METADATA

    def metadata_written_earlier(self) -> None:
        """Skip :meth:`write_metadata`: the session holds it already.

        For a resumed run: its work branch has the metadata the first call wrote.
        """
        self._require(_METADATA, "metadata_written_earlier()", "plan()")
        self.plan()
        self._stage = _METADATA

    def write_regions(
        self,
        executor: Any = "threads",
        *,
        workers: int | None = None,
        backups: Backups | None = None,
    ) -> Sequence[TaskRecord]:
        """Run one task per region on ``executor``; merge results as they arrive.

        Parameters
        ----------
        executor : str, concurrent.futures.Executor or Adapter
            Where tasks run (see :func:`~icechunk_distributed.run_region_writes`).
        workers : int, optional
            Pool size, for pools the library starts.
        backups : Backups, optional
            Straggler backups (see :func:`~icechunk_distributed.run_region_writes`).

        Returns
        -------
        list of TaskRecord
            One per region.

        Raises
        ------
        RegionWriteError
            Some regions failed on every attempt; their writes were not merged.
        """
        with open_adapter(executor, workers=workers) as adapter:
            records, failures = self.run_tasks(adapter, backups=backups)
        if failures:
            raise region_write_error(
                failures,
                n_regions=len(self.write_plan.regions),
                retries=self.retries,
                outcome="nothing was committed",
            )
        return records

    def run_tasks(
        self,
        adapter: Adapter,
        *,
        indices: Sequence[int] | None = None,
        after_merge: Callable[[int], None] | None = None,
        backups: Backups | None = None,
        lock: contextlib.AbstractContextManager[Any] | None = None,
        max_batch: int | None = None,
    ) -> tuple[Sequence[TaskRecord], list[TaskFailure]]:
        """Write the regions ``indices`` (all by default) on ``adapter``; report, do not raise.

        ``after_merge(i)`` follows the merge of region ``i``. ``lock`` is held while merging
        and while building task arguments, so that another thread may checkpoint the session
        in between. ``max_batch`` caps the results merged at once (a run counting chunks per
        commit, ``resume``); such a run merges task by task, as its count is per region. Returns
        the records of the regions written and the failures.
        """
        self._require(_REGIONS, "write_regions()", "write_metadata()")
        guard = lock if lock is not None else contextlib.nullcontext()
        plan = self.write_plan
        self.executor_name = adapter.name
        self.check_engine(adapter.capabilities)
        todo: Sequence[int] = range(len(plan.regions)) if indices is None else list(indices)
        # The stored encoding, decided by xarray when it wrote the metadata (task_encoding).
        stored = stored_encodings(self.session.session.store, self.group, list(plan.dims))
        self._encodings = {n: task_encoding(stored[n], self._decided.get(n)) for n in plan.dims}
        records = TaskRecords(plan.regions)
        merger = ResultMerger(
            self.session, after_merge=after_merge, lock=guard, max_batch=max_batch
        )

        def on_success(j: int, out: TaskOutput, attempts: int) -> None:
            assert out.snapshot is not None
            i = todo[j]
            merger.add(i, out.snapshot)
            records.add(i, out.seconds, attempts, out.worker, out.n_chunks, out.nbytes)

        failures: list[TaskFailure] = []
        with contextlib.suppress(_RegionsFailed), self.session.allow_pickling() as snapshot, merger:

            def build(j: int, attempt: int) -> TaskInput:
                with guard:
                    inp = self.task_input(todo[j], snapshot.copy_for_task())
                inp.attempt = attempt
                return inp

            try:
                failures = run_region_tasks(
                    adapter,
                    run_task,
                    plan.regions if indices is None else Picked(plan.regions, todo),
                    build,
                    backups=backups,
                    retries=self.retries,
                    progress=self.progress,
                    item_bytes=self._item_bytes,
                    on_success=on_success,
                    indices=todo,
                    combine=max_batch is None,
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    merger.flush()  # what succeeded stays merged (a run_id run keeps it)
                raise
            merger.flush()
            if failures:  # leave the block by an exception: it closes the pickling window
                raise _RegionsFailed
        records.sort()
        self.records = records
        if not failures:
            self._stage = _REGIONS
        return self.records, failures

    def commit_record(
        self, message: str | None, metadata: Mapping[str, Any] | None, run_id: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """The commit message and metadata: the caller's, plus the run's own record."""
        plan = self.write_plan
        record = {
            "version": __version__,
            "executor": self.executor_name,
            "mode": self.mode,
            "group": self.group or "/",
            "n_regions": len(plan.regions),
            "n_chunks": total_chunks(self.records),
            "region_dims": list(plan.region_dims),
        }
        if run_id is not None:
            record["run_id"] = run_id
        meta = {**dict(metadata or {}), "icechunk_distributed": record}
        message = message or (
            f"icechunk-distributed: {len(plan.regions)} regions, mode {self.mode!r}, "
            f"{self.executor_name or 'no executor'}"
        )
        return message, meta

    def plan_summary(self) -> tuple[dict[str, Any], str]:
        """What the plan is (JSON-able, for run records) and its fingerprint."""
        plan, info = self.write_plan, self.info
        summary: dict[str, Any] = {
            "mode": self.mode,
            "group": self.group or "/",
            "append_dim": self.append_dim,
            "region_dims": list(plan.region_dims),
            "sizes": dict(plan.sizes),
            "offsets": dict(plan.offsets),
            "variables": {n: [list(d), str(self.template[n].dtype)] for n, d in plan.dims.items()},
            "eager": sorted(str(n) for n in info.eager_vars),
            "units": plan.units,
            "n_regions": len(plan.regions),
        }
        regions = [[[d, s.start, s.stop] for d, s in r.items()] for r in plan.regions]
        digest = plan_digest({**summary, "regions": regions})
        return summary, digest

    def commit(self, message: str | None = None, metadata: Mapping[str, Any] | None = None) -> str:
        """Commit everything in one snapshot, rebasing over unrelated concurrent commits.

        Parameters
        ----------
        message : str, optional
            Commit message; a summary of the run by default.
        metadata : dict, optional
            Extra commit metadata (the run's own record is under ``"icechunk_distributed"``).

        Returns
        -------
        str
            The new snapshot id.

        Raises
        ------
        CommitConflictError
            Another commit changed the same chunks or metadata meanwhile; nothing was committed.
        """
        self._require(_COMMITTED, "commit()", "write_regions()")
        message, meta = self.commit_record(message, metadata)
        try:
            snapshot_id = self.session.commit(
                message, meta, rebase_with=icechunk.ConflictDetector()
            )
        except (icechunk.ConflictError, icechunk.RebaseFailedError) as exc:
            raise CommitConflictError(
                f"another commit on branch {self.branch!r} changed the same chunks or metadata "
                f"while this run was writing ({exc}). Nothing was committed; the branch shows "
                "only the other commit. Re-run to write on top of it."
            ) from exc
        self._stage = _COMMITTED
        return snapshot_id
