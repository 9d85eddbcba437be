"""Region-parallel writes of an xarray Dataset: plan, validate, write metadata, fan out, commit.

:func:`run_region_writes` is the one call; :class:`RegionWriter` exposes its steps. The
coordinator writes array metadata, coordinates and variables without a region dimension; each
task writes the region-dimension data variables of one region through its own fork; results
are merged (with :func:`~icechunk_distributed.session.merge_sessions`' checks) as they arrive,
and one commit publishes everything, or nothing is committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import icechunk
import numpy as np
import xarray as xr

from icechunk_distributed import options, runs
from icechunk_distributed._version import __version__
from icechunk_distributed.adapters import Adapter, Capabilities, get_adapter
from icechunk_distributed.errors import (
    CommitConflictError,
    PayloadTooLargeError,
    RegionWriteError,
    RunMismatchError,
    SessionStateError,
    TargetMovedError,
    TemplateMismatchError,
    UnpicklableSourceError,
)
from icechunk_distributed.planning import Region, WritePlan, build_plan, dims_of_regions
from icechunk_distributed.planning import format_region as _fmt
from icechunk_distributed.runner import Backups, ProgressEvent, run_batch, run_loop
from icechunk_distributed.runs import plan_digest
from icechunk_distributed.session import DistributedSession, SessionSnapshot, merge_sessions
from icechunk_distributed.task import (
    Loader,
    TaskInput,
    TaskOutput,
    run_task,
    same_dtype,
    write_variables,
)
from icechunk_distributed.template import (
    MODES,
    Mode,
    TemplateInfo,
    check_labels,
    decide_encodings,
    describe_template,
    is_time_like,
    metadata_dataset,
    read_store,
    resolve_region,
    stored_encodings,
    task_encoding,
    write_metadata,
)

if TYPE_CHECKING:
    from icechunk import Repository, Session

__all__ = [
    "RegionWriter",
    "TaskFailure",
    "TaskRecord",
    "WriteResult",
    "fan_out",
    "plan_regions",
    "run_region_writes",
]

Progress = bool | Callable[[ProgressEvent], None] | None

TASK_SHARE_OF_LIMIT = 0.5
"""Of an engine's payload limit, the share one task's data may take when the plan sizes tasks."""


# ---------------------------------------------------------------------------------------------
# Results


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
    """What :func:`run_region_writes` did.

    Attributes
    ----------
    snapshot_id : str or None
        The commit (None with ``commit=False``).
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
        The session holding the writes (committed unless ``commit=False``).
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


# ---------------------------------------------------------------------------------------------
# The writer


def _appendable(stored: np.dtype[Any], new: np.dtype[Any]) -> bool:
    """Whether data of dtype ``new`` may be written into an array holding ``stored``.

    xarray's rule: numbers, times, bools and objects are cast by the stored encoding;
    fixed-width strings must match exactly (or go into an object array), or they would be
    truncated.
    """
    if new.kind in "iufcmMbO" or (new.kind in "SU" and stored.kind == "O"):
        return True
    return bool(new == stored) or (new.kind in "OT" and stored.kind in "OT")


def _open_session(target: Any, branch: str) -> tuple[DistributedSession, bool]:
    if isinstance(target, icechunk.Repository):
        from icechunk_distributed.session import writable_session

        return writable_session(target, branch), True
    if isinstance(target, DistributedSession):
        session = target
    elif isinstance(target, icechunk.Session) and not isinstance(target, icechunk.ForkSession):
        session = DistributedSession(target)
    else:
        raise TypeError(
            "target must be an icechunk Repository or a writable Session/DistributedSession, "
            f"not {type(target).__name__}"
        )
    if session.read_only:
        raise SessionStateError(
            "the target session is read-only; pass the Repository, or repo.writable_session(branch)"
        )
    return session, False


class RegionWriter:
    """The steps of :func:`run_region_writes`, for users who want to look in between.

    Parameters are those of :func:`run_region_writes` (without ``executor``, ``message``,
    ``metadata`` and ``commit``). Typical use::

        writer = RegionWriter(ds, repo, mode="w-")
        writer.plan()                     # validated regions; nothing written yet
        writer.write_metadata()           # metadata, coordinates, the coordinator's variables
        writer.write_regions(executor="processes")
        writer.commit("ingest")

    Nothing is committed before :meth:`commit`; on any error, ``writer.session.discard_changes()``
    (done for you when the writer opened the session from a repository) leaves the branch as it was.
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
    ) -> None:
        if isinstance(source, xr.Dataset):
            if template is not None:
                options.check_template_matches(source, template)
            template = source
            self.loader: Loader | None = None
            self.source: xr.Dataset | None = source
        elif callable(source):
            if template is None:
                raise TypeError(
                    "a loader source needs template=: a Dataset with the full shape, dtypes, "
                    "coordinates and attributes (lazy is fine), e.g. built with dask arrays"
                )
            self.loader, self.source = source, None
        else:
            raise TypeError(
                "source must be an xarray.Dataset or a callable load(region) -> Dataset, "
                f"not {type(source).__name__}"
            )
        if not isinstance(template, xr.Dataset):
            raise TypeError(f"template must be an xarray.Dataset, not {type(template).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
        if append_dim is not None and mode not in ("a", "a-"):
            raise ValueError(f"append_dim= goes with mode='a' or 'a-', not mode={mode!r}")
        if append_dim is not None and append_dim not in template.dims:
            raise ValueError(
                f"append_dim {append_dim!r} is not a dimension of the template "
                f"({list(template.dims)})"
            )
        if region is not None:
            if mode not in ("r+", "a"):
                raise ValueError(
                    f"region= writes into existing arrays: use mode='r+' (or 'a'), not {mode!r}"
                )
            if append_dim is not None:
                raise ValueError("region= and append_dim= cannot go together")
        self.template = template
        self.group = group.strip("/") or None if group else None
        self.mode: Mode = mode
        self.append_dim = append_dim
        self.region = region
        self.region_dims = None if region_dims is None else tuple(region_dims)
        self.regions = None if regions is None else [dict(r) for r in regions]
        self.task_size = options.check_task_size(task_size)
        self.retries = options.check_retries(retries)
        self.progress = options.check_progress(progress)
        self.encoding = options.check_encoding(encoding, [str(n) for n in template.variables])
        self.session, self.owns_session = _open_session(target, branch)
        self.branch = self.session.branch
        self._plan: WritePlan | None = None
        self._info: TemplateInfo | None = None
        self._placed: Region = {}  # where a region write goes in the stored arrays
        self._existing: tuple[str, ...] = ()  # variables already in the store
        self._stored_dims: dict[str, tuple[str, ...]] = {}
        # Each new variable's encoding, settled once (decide_encodings): tasks apply it.
        self._decided: dict[str, dict[str, Any]] = {}
        self.records: list[TaskRecord] = []
        self._item_bytes = 0
        self._encodings: dict[str, dict[str, Any]] = {}
        self._labels: dict[str, np.ndarray] = {}
        self.executor_name = ""
        # What planning checks the store against (a resumed run: the target as it was when
        # the run started, not its work branch, which already holds the metadata).
        self._reference: Session | None = None
        self._checked_limit: tuple[int | None] | None = None  # check_picklable passed for it

    def _plan_store(self) -> Any:
        if self._reference is not None:
            return self._reference.store
        return self.session.session.store

    # -- planning and checking, before anything is written
    def _check_store(self) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """Check the store against the mode; return the offsets and existing write units."""
        names = [str(n) for n in self.template.variables]
        where = f"group {self.group or '/'!r}"
        if self.mode == "w":
            return {}, {}
        state = read_store(self._plan_store(), self.group)
        present = [] if state is None else [n for n in names if n in state.units]
        if self.mode == "w-":
            if present:
                raise TemplateMismatchError(
                    f"{where} already holds {sorted(present)}; mode='w-' only creates. Use "
                    "mode='w' to overwrite, 'r+' to write into them, or 'a' to append."
                )
            if state is not None:
                raise TemplateMismatchError(
                    f"{where} already exists; mode='w-' only creates a new group (as in "
                    "Dataset.to_zarr). Use mode='a' to add variables to it, or mode='w' to "
                    "replace it."
                )
            return {}, {}
        if state is None:
            if self.mode == "r+" or self.append_dim is not None:
                raise TemplateMismatchError(
                    f"mode={self.mode!r} writes into existing arrays, but {where} does not "
                    "exist; use mode='w-' to create it"
                )
            return {}, {}
        self._existing = tuple(present)
        if self.mode == "r+" or self.region is not None:
            missing = [n for n in names if n not in state.units]
            if missing:
                raise TemplateMismatchError(
                    f"variable {missing[0]!r} is not in the store ({where}); mode='r+' and "
                    "region= only write into existing arrays. Use mode='a' without region= "
                    "to add variables."
                )
        if self.encoding:
            given = sorted(set(self.encoding) & set(present))
            if given:
                raise ValueError(
                    f"encoding= given for {given}, which already exist in the store: their "
                    "encoding is the stored one and cannot change (as in Dataset.to_zarr). "
                    "Drop those entries, or rewrite them with mode='w'."
                )
        if self.append_dim is not None and self.append_dim not in state.sizes:
            raise TemplateMismatchError(
                f"append_dim {self.append_dim!r} is not a dimension of the arrays in {where} "
                f"(dimensions: {sorted(state.sizes)})"
            )
        offsets: dict[str, int] = {}
        if self.region is not None:
            self._placed = resolve_region(self.region, self.template, state)
            offsets = {d: s.start for d, s in self._placed.items()}
            loose = [
                str(n)
                for n, v in self.template.variables.items()
                if not set(self._placed) & set(map(str, v.dims))
            ]
            if loose:
                raise TemplateMismatchError(
                    f"with region={_fmt(self._placed)}, every variable must have one of its "
                    f"dimensions (as in Dataset.to_zarr); {loose} do not. Drop them: "
                    f"ds.drop_vars({loose!r})"
                )
        elif self.append_dim is not None:
            offsets = {self.append_dim: state.sizes[self.append_dim]}
        for name in present:
            var, dims = self.template[name], state.dims[name]
            if set(map(str, var.dims)) != set(dims):
                raise TemplateMismatchError(
                    f"{name!r}: the store has dims {dims}, the dataset {var.dims}"
                )
            self._stored_dims[name] = dims
            stored_dtype = state.dataset[name].dtype
            if not _appendable(stored_dtype, var.dtype):
                raise TemplateMismatchError(
                    f"{name!r}: the store holds {stored_dtype}, the dataset {var.dtype}; "
                    "fixed-width strings and bytes must keep their exact dtype (as in "
                    "Dataset.to_zarr). Cast the variable, or rewrite it with mode='w'."
                )
            for dim in dims:
                if dim == self.append_dim or dim in self._placed:
                    continue
                if state.sizes[dim] != var.sizes[dim]:
                    raise TemplateMismatchError(
                        f"{name!r}: size along {dim!r} is {state.sizes[dim]} in the store and "
                        f"{var.sizes[dim]} in the dataset. Write part of the arrays with "
                        "region={...} or region='auto' (mode='r+')."
                    )
        check_labels(self.template, state, offsets, skip=[self.append_dim or ""])
        units = {n: state.units[n] for n in present if n in self.template.data_vars}
        return offsets, units

    def plan(
        self, *, parallelism: int | None = None, max_task_bytes: int | None = None
    ) -> list[Region]:
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
            offsets, existing_units = self._check_store()
            self._decided = decide_encodings(self.template, self.encoding, existing=self._existing)
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
                existing_units=existing_units,
                keep=(self.append_dim,) if self.append_dim else (),
            )
            self._plan = build_plan(
                dims=info.dims,
                units=info.units,
                itemsizes=info.itemsizes,
                sizes=info.sizes,
                offsets=offsets,
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

    def _described(self) -> TemplateInfo:
        self.plan()
        assert self._info is not None
        return self._info

    @property
    def write_plan(self) -> WritePlan:
        """The validated plan (planning first if needed)."""
        self.plan()
        assert self._plan is not None
        return self._plan

    def _task_input(self, index: int, snapshot: SessionSnapshot) -> TaskInput:
        plan = self.write_plan
        region = plan.regions[index]
        expect = {}
        for name, dims in plan.dims.items():
            shape = tuple(
                (region[d].stop - region[d].start) if d in region else plan.sizes[d] for d in dims
            )
            expect[name] = (dims, shape, self.template[name].dtype)
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
            expect=expect,
            units=plan.units,
            encodings=self._encodings,
            labels={d: v[region[d]] for d, v in self._labels.items() if d in region},
            stored_dims=self._stored_dims,
        )

    def check_picklable(self, max_arg_bytes: int | None = None) -> int:
        """Raise if tasks cannot be shipped to processes; return one task's payload bytes.

        Parameters
        ----------
        max_arg_bytes : int, optional
            The engine's limit on a call's arguments (Lithops' ``data_limit``).

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
        import cloudpickle

        if not self.write_plan.regions:
            return 0
        what = "loader" if self.loader is not None else "source dataset"
        obj: Any = self.loader if self.loader is not None else None
        try:
            if self.loader is not None:
                size = len(cloudpickle.dumps(self.loader))
            else:
                obj = self._task_input(0, None).piece  # type: ignore[arg-type]
                size = len(cloudpickle.dumps(obj))
        except Exception as exc:
            raise UnpicklableSourceError(
                f"the {what} {obj!r:.200} cannot be pickled for worker processes ({exc}). "
                "Use executor='threads', or make it picklable: a module-level function "
                "instead of a closure over open files or locks, or a loader that opens the "
                "data inside the task."
            ) from exc
        if max_arg_bytes is not None and size > 0.8 * max_arg_bytes:
            raise PayloadTooLargeError(
                f"one task's data is {size / 2**20:.1f} MiB pickled, over the engine's limit of "
                f"{max_arg_bytes / 2**20:.0f} MiB per call. Pass a loader (load(region) -> "
                "Dataset, with template=) so tasks ship regions instead of data, use a smaller "
                "task_size, or raise the limit (Lithops: config['lithops']['data_limit'] in MiB)."
            )
        self._item_bytes = size
        return size

    def _check_shippable(self, caps: Capabilities) -> None:
        """:meth:`check_picklable` for an engine that crosses processes, once per limit.

        Also refuses a repository other processes cannot reach (in-memory storage).
        """
        if caps.crosses_processes:
            self.session.check_shareable()
        if caps.crosses_processes and self._checked_limit != (caps.max_arg_bytes,):
            self.check_picklable(caps.max_arg_bytes)
            self._checked_limit = (caps.max_arg_bytes,)

    # -- writing
    def _write_coordinator_part(self, caps: Capabilities) -> None:
        """Check tasks can be shipped (before any write); write metadata and eager variables."""
        self._check_shippable(caps)
        self.write_metadata()

    def _base_store(self) -> Any:
        # The base session's own store, whichever thread calls: forks made afterwards (the
        # tasks' seed) see these writes.
        return self.session.direct_store()

    def _eager_data(self) -> xr.Dataset | None:
        """The coordinator's variables: from the source, or from ``load(full extent)``.

        Never from a loader's template, whose data may be placeholders.
        """
        info = self._described()
        if not info.eager_vars or self.loader is None:
            return self.source
        names = list(info.eager_vars)
        full = {d: slice(0, info.sizes[d]) for d in info.region_dims}
        for attempt in range(self.retries + 1):  # the same retries as the tasks get
            try:
                data = self.loader(full)
                break
            except Exception:
                if attempt == self.retries:
                    raise
        missing = [n for n in names if not isinstance(data, xr.Dataset) or n not in data]
        if missing:
            raise TemplateMismatchError(
                f"the loader, called with the full extent {full}, returned no {missing}; "
                "variables the tasks do not write are read from it once"
            )
        for name in names:
            got, want = data[name], self.template[name]
            if got.shape != want.shape or not same_dtype(got.dtype, want.dtype):
                raise TemplateMismatchError(
                    f"the loader returned {name!r} with shape {got.shape} and dtype "
                    f"{got.dtype}; the template has {want.shape} and {want.dtype}"
                )
        return data

    def write_metadata(self) -> None:
        """Write metadata, coordinates and the variables the tasks do not write.

        One ``Dataset.to_zarr(compute=False)`` call on a stand-in of the template: xarray
        creates or grows the arrays with the encodings it would choose for the real data,
        checks the mode and the region, and writes everything in memory; the task variables
        are lazy stand-ins and are not written here.
        """
        info = self._described()
        eager = self._eager_data()
        meta, encoding, lazy = metadata_dataset(
            self.template, info, self._decided, self.encoding, eager=eager
        )
        store = self._base_store()
        write_metadata(
            store,
            meta,
            encoding,
            group=self.group,
            mode=self.mode,
            append_dim=self.append_dim,
            region=self._placed or None,
        )
        if lazy:
            self._write_lazy(xr.Dataset({n: meta.variables[n] for n in lazy}), store)

    def _write_lazy(self, data: xr.Dataset, store: Any) -> None:
        """Write the coordinator's lazy variables as tasks write theirs (to_zarr left them)."""
        names = [str(n) for n in data.variables]
        if self.mode == "a-" and self.append_dim:
            # a-: existing variables without the append dim are left as they are.
            names = [n for n in names if n not in self._existing or self.append_dim in data[n].dims]
        plan = self.write_plan
        placed = {d: slice(o, o + plan.sizes[d]) for d, o in plan.offsets.items()}
        stored = stored_encodings(store, self.group, names)
        write_variables(
            store,
            self.group,
            data[names],
            encodings={n: task_encoding(stored[n], self._decided.get(n)) for n in names},
            region=placed,
            stored_dims=self._stored_dims,
        )

    def write_regions(
        self, executor: Any = "threads", *, workers: int | None = None
    ) -> list[TaskRecord]:
        """Run one task per region on ``executor``; merge results as they arrive.

        Parameters
        ----------
        executor : str, concurrent.futures.Executor or Adapter
            Where tasks run (see :func:`run_region_writes`).
        workers : int, optional
            Pool size, for pools the library starts.

        Returns
        -------
        list of TaskRecord
            One per region.

        Raises
        ------
        RegionWriteError
            Some regions failed on every attempt; their writes were not merged.
        """
        adapter = get_adapter(executor, workers=workers)
        try:
            return self._write_regions(adapter)
        finally:
            if adapter is not executor:
                adapter.close()

    def _write_regions(
        self,
        adapter: Adapter,
        *,
        indices: Sequence[int] | None = None,
        after_merge: Callable[[int], None] | None = None,
        backups: Backups | None = None,
        lock: contextlib.AbstractContextManager[Any] | None = None,
    ) -> list[TaskRecord]:
        """Write the regions ``indices`` (all by default); ``after_merge(i)`` follows each merge.

        ``lock`` is held while merging and while building task arguments, so that another
        thread may checkpoint the session in between.
        """
        guard = lock if lock is not None else contextlib.nullcontext()
        plan = self.write_plan
        self.executor_name = adapter.name
        self._check_shippable(adapter.capabilities)
        todo = list(range(len(plan.regions))) if indices is None else list(indices)
        # The stored encoding, decided by xarray when it wrote the metadata (task_encoding).
        stored = stored_encodings(self.session.session.store, self.group, list(plan.dims))
        self._encodings = {n: task_encoding(stored[n], self._decided.get(n)) for n in plan.dims}
        records: list[TaskRecord | None] = [None] * len(todo)

        def on_success(j: int, out: TaskOutput, attempts: int) -> None:
            assert out.snapshot is not None
            i = todo[j]
            with guard:
                merge_sessions(self.session, out.snapshot)
                if after_merge is not None:
                    after_merge(i)
            records[j] = TaskRecord(
                i, plan.regions[i], out.seconds, attempts, out.worker, out.n_chunks, out.nbytes
            )

        with self.session.allow_pickling() as snapshot:

            def build(j: int, attempt: int) -> TaskInput:
                with guard:
                    inp = self._task_input(todo[j], snapshot.copy_for_task())
                inp.attempt = attempt
                return inp

            fan_out(
                adapter,
                run_task,
                [plan.regions[i] for i in todo],
                build,
                backups=backups,
                retries=self.retries,
                progress=self.progress,
                item_bytes=self._item_bytes,
                on_success=on_success,
                indices=todo,
            )
        self.records = [r for r in records if r is not None]
        return self.records

    def _commit_args(
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
            "n_chunks": sum(r.n_chunks for r in self.records),
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
        plan, info = self.write_plan, self._described()
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
        message, meta = self._commit_args(message, metadata)
        try:
            return self.session.commit(message, meta, rebase_with=icechunk.ConflictDetector())
        except (icechunk.ConflictError, icechunk.RebaseFailedError) as exc:
            raise CommitConflictError(
                f"another commit on branch {self.branch!r} changed the same chunks or metadata "
                f"while this run was writing ({exc}). Nothing was committed; the branch shows "
                "only the other commit. Re-run to write on top of it."
            ) from exc


def fan_out(
    adapter: Adapter,
    fn: Callable[[Any], TaskOutput],
    regions: Sequence[Region],
    build: Callable[[int, int], Any],
    *,
    retries: int,
    progress: Progress,
    item_bytes: int,
    on_success: Callable[[int, TaskOutput, int], None],
    backups: Backups | None = None,
    indices: Sequence[int] | None = None,
) -> None:
    """Run ``fn(build(i, attempt))`` for every region through the generic loop.

    Shared by :class:`RegionWriter` and :func:`~icechunk_distributed.store_arrays`: pickles
    arguments for engines that cross processes, batches them for engines whose calls are
    expensive, drives the progress bar and callback, and raises :class:`RegionWriteError`
    listing every region that failed on all its attempts. ``indices`` are the regions'
    numbers in the plan, for the reports (``range(len(regions))`` by default).
    """
    caps = adapter.capabilities
    number = list(range(len(regions))) if indices is None else list(indices)
    failures: list[TaskFailure] = []
    bar = _progress_bar(progress, len(regions))

    def make_arg(i: int, attempt: int) -> Any:
        task = build(i, attempt)
        if caps.crosses_processes:
            import cloudpickle

            return cloudpickle.dumps(task)
        return task

    def on_failure(i: int, out: Any, attempts: int) -> None:
        if isinstance(out, TaskOutput):
            error, exc, tb = out.error or "", out.exception, out.traceback
        else:  # the engine's own failure (a dead worker, a broken pool)
            error, exc, tb = _describe(out), out, None
        failures.append(TaskFailure(number[i], regions[i], error, exc, attempts, tb))

    def on_event(event: ProgressEvent) -> None:
        if indices is not None:
            event = dataclasses.replace(event, index=number[event.index])
        if bar is not None:
            bar(event)
        if callable(progress) and not isinstance(progress, bool):
            progress(event)

    batch_size = _batch_rule(caps, item_bytes)
    try:
        run_loop(
            adapter,
            fn if batch_size is None else functools.partial(run_batch, fn),
            len(regions),
            make_arg,
            batch_size=batch_size,
            retries=retries,
            is_success=lambda out: isinstance(out, TaskOutput) and out.ok,
            describe_error=_describe,
            is_retryable=lambda out: not isinstance(out, TaskOutput) or out.retryable,
            on_success=on_success,
            on_failure=on_failure,
            on_event=on_event,
            backups=backups,
        )
    finally:
        if bar is not None:
            bar(None)
    if failures:
        failures.sort(key=lambda f: f.index)
        lines = "\n".join(
            f"  region #{f.index} ({_fmt(f.region)}), {f.attempts} attempt(s): "
            + _first_line(f.error)
            for f in failures[:10]
        )
        more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
        raise RegionWriteError(
            f"{len(failures)} of {len(regions)} region(s) failed after {retries + 1} "
            f"attempt(s) each; nothing was committed.\n{lines}{more}",
            failures,
        )


def _batch_rule(caps: Capabilities, item_bytes: int) -> Callable[[int], int] | None:
    """Tasks per call, for engines whose calls are expensive (None: one task per call).

    At most 2 calls per worker slot per round, and never more data per call than the engine
    accepts.
    """
    if caps.per_call_overhead <= 0:
        return None
    cap = None
    if caps.max_arg_bytes and item_bytes:
        cap = max(1, int(0.8 * caps.max_arg_bytes) // (item_bytes + 2048))

    def size(n_pending: int) -> int:
        per_call = max(1, -(-n_pending // (2 * max(1, caps.parallelism))))
        return per_call if cap is None else min(per_call, cap)

    return size


def _first_line(text: str, limit: int = 300) -> str:
    """The gist of an error for a summary line (the full text is in ``failures``)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = " ".join(lines[:2]) if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _describe(out: Any) -> str:
    if isinstance(out, TaskOutput):
        return out.error or "failed"
    if isinstance(out, BaseException):
        return f"{type(out).__name__}: {out}"
    return repr(out)


def _progress_bar(progress: Progress, total: int) -> Callable[[ProgressEvent | None], None] | None:
    show = sys.stderr.isatty() if progress is None else progress is True
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    bar = tqdm(total=total, desc="regions", unit="region")
    n_backups = 0

    def update(event: ProgressEvent | None) -> None:
        nonlocal n_backups
        if event is None:
            bar.close()
        elif event.kind == "done":
            bar.update(1)
        elif event.kind in ("retry", "failed"):
            bar.set_postfix(retries=event.attempt, failed=event.n_failed, refresh=False)
        elif event.kind == "backup":
            n_backups += 1
            bar.set_postfix(backups=n_backups, refresh=False)

    return update


class _Resumable:
    """A ``run_id`` run: checkpoints on its work branch, one conditional publication."""

    def __init__(self, repo: Repository, run_id: str, branch: str) -> None:
        self.repo, self.run_id, self.branch = repo, run_id, branch
        self.work = runs.work_branch(run_id)
        self.n_checkpoints = 0
        self.created = False
        # Published already (a tag outlives later commits on the target): nothing to write.
        self.published = runs.published_state(repo, run_id, branch)
        self.state, tip = (None, None) if self.published else runs.read_state(repo, run_id)
        self.work_tip = tip if self.state is not None else None
        # The record this call must match: the published run's, or the one on the work branch.
        self.stored = self.published[0] if self.published else self.state
        known = self.stored
        if known is None:
            if branch not in repo.list_branches():
                mine = sorted(
                    b for b in repo.list_branches() if not b.startswith(runs.RUN_BRANCH_PREFIX)
                )
                raise ValueError(
                    f"branch {branch!r} does not exist; create it first (existing: {mine})"
                )
            if tip is not None:  # a work branch without any checkpoint: nothing to keep
                repo.delete_branch(self.work)
            self.base = repo.lookup_branch(branch)
        else:
            if known.branch != branch:
                raise RunMismatchError(
                    f"run {run_id!r} writes to branch {known.branch!r}, not {branch!r}. Rerun "
                    f"with branch={known.branch!r}, or use another run_id."
                )
            self.base = known.base_snapshot_id

    @property
    def session_branch(self) -> str:
        """Where the writer's session opens: the work branch once it exists."""
        return self.branch if self.published else self.work

    def start(self) -> None:
        if self.state is None and self.published is None:
            self.repo.create_branch(self.work, self.base)
            self.created = True

    def check(self, writer: RegionWriter, caps: Capabilities) -> int:
        """Plan against the run's base; refuse a plan other than the stored one."""
        known = self.stored
        parallelism = caps.parallelism
        if known is not None:
            parallelism = int(known.plan.get("parallelism") or parallelism)
        writer._reference = self.repo.readonly_session(snapshot_id=self.base)
        writer.plan(**{**writer.limits_for(caps), "parallelism": parallelism})
        summary, digest = writer.plan_summary()
        if known is not None and known.digest != digest:
            theirs = {k: v for k, v in known.plan.items() if k != "parallelism"}
            diff = sorted(k for k in set(summary) | set(theirs) if summary.get(k) != theirs.get(k))
            raise RunMismatchError(
                f"run {self.run_id!r} was started with another plan; it differs in "
                f"{diff or ['the regions (task_size= or regions=)']}: stored "
                f"{ {k: theirs.get(k) for k in diff} }, now { {k: summary.get(k) for k in diff} }. "
                "Rerun with the original arguments, or use another run_id"
                + (
                    " (this one is published)."
                    if self.published
                    else f", or drop its progress with icechunk_distributed.remove_run(repo, "
                    f"{self.run_id!r})."
                )
            )
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
        return parallelism

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
        assert self.state is not None
        try:
            writer.session._checkpoint(message, self.state.to_metadata())
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
        if self.work in self.repo.list_branches():
            self.repo.delete_branch(self.work)

    def abandon(self) -> None:
        """After a failure before the first checkpoint: the work branch holds nothing."""
        if self.created and self.n_checkpoints == 0:
            with contextlib.suppress(Exception):
                if self.repo.lookup_branch(self.work) == self.base:  # still ours, still empty
                    self.repo.delete_branch(self.work)


class _Checkpointer:
    """Commits a run's progress at least every ``every`` seconds while regions are merged.

    A timer thread saves merged-but-unsaved regions even when no result arrives for a while
    (the last, slow tasks): ``lock`` keeps merges, argument building and checkpoints apart. A
    failed save is retried at the next occasion; three in a row end the run.
    """

    MAX_FAILURES = 3

    def __init__(self, run: _Resumable, writer: RegionWriter, every: float) -> None:
        self.run, self.writer, self.every = run, writer, every
        self.lock = threading.Lock()
        self.dirty = False
        self.last = time.monotonic()
        assert run.state is not None
        self.n_saved = len(run.state.done)  # regions in the last checkpoint
        self.failures = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="checkpoints", daemon=True)

    def __enter__(self) -> _Checkpointer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def save(self) -> None:
        assert self.run.state is not None
        n = len(self.run.state.done)
        self.run.checkpoint(self.writer, f"icechunk-distributed run {self.run.run_id}: checkpoint")
        self.dirty, self.last, self.n_saved = False, time.monotonic(), n

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
        assert self.run.state is not None
        self.run.state.done.add(index)
        self.dirty = True
        self._save_when_due()

    def _loop(self) -> None:
        while not self._stop.wait(max(0.01, min(self.every, 1.0))):
            with self.lock:
                self._save_when_due()


def _write_resumable(
    writer: RegionWriter,
    run: _Resumable,
    adapter: Adapter,
    *,
    message: str | None,
    metadata: Mapping[str, Any] | None,
    checkpoint_every: float,
    backups: Backups | None,
) -> tuple[str, list[TaskRecord], int]:
    """Plan, check, write what the work branch lacks, checkpoint, publish; see run_id=."""
    run.check(writer, adapter.capabilities)
    if run.published is not None:
        published, snapshot_id = run.published
        if run.work in run.repo.list_branches():
            run.repo.delete_branch(run.work)
        return snapshot_id, [], published.n_regions
    state = run.state
    assert state is not None
    n_resumed = len(state.done)
    if state.complete and run.work_tip is not None:  # stopped between commit and publication
        run.publish(run.work_tip)
        return run.work_tip, [], n_resumed
    if run.created:
        writer._write_coordinator_part(adapter.capabilities)
        run.checkpoint(writer, f"icechunk-distributed run {run.run_id}: metadata")
    # Even if the target moved meanwhile, finish the work on the work branch: publication
    # (conditional) refuses then, and the complete result is there to publish deliberately.
    records: list[TaskRecord] = []
    if not state.complete:
        saver = _Checkpointer(run, writer, checkpoint_every)
        todo = [i for i in range(state.n_regions) if i not in state.done]
        try:
            with saver:
                records = writer._write_regions(
                    adapter,
                    indices=todo,
                    after_merge=saver.merged,
                    backups=backups,
                    lock=saver.lock,
                )
        except BaseException as exc:
            # Keep what was merged: the same call again continues from there.
            if saver.dirty:
                with contextlib.suppress(Exception):
                    saver.save()
            if isinstance(exc, RegionWriteError) and exc.args:
                exc.args = (
                    exc.args[0].replace("nothing was committed", "the target branch is unchanged")
                    + f"\nThe {saver.n_saved} region(s) written are kept on branch "
                    f"{run.work!r}: call again with run_id={run.run_id!r} to write only the "
                    "rest.",
                )
            raise
        state.complete = True
    message, meta = writer._commit_args(message, metadata, run.run_id)
    meta.update(state.to_metadata())
    try:
        snapshot_id = writer.session.commit(message, meta, allow_empty=True)
    except icechunk.ConflictError as exc:
        raise run.conflict() from exc
    run.publish(snapshot_id)
    return snapshot_id, records, n_resumed


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
        :class:`~icechunk_distributed.runner.ProgressEvent`.
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
        defaults of :class:`~icechunk_distributed.runner.Backups`); the first copy to finish
        wins and the other is never merged. Off by default.

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
    """
    t0 = time.perf_counter()
    message = options.check_message(message)
    metadata = options.check_metadata(metadata)
    workers = options.check_workers(workers)
    if isinstance(target, icechunk.Repository):
        options.check_branch(target, branch)
    try:
        every = float(checkpoint_every)  # numpy scalars too
    except (TypeError, ValueError):
        every = math.nan
    if isinstance(checkpoint_every, bool) or not 0 < every < math.inf:
        raise ValueError(f"checkpoint_every must be positive (seconds), got {checkpoint_every}")
    policy = Backups() if backups is True else backups or None
    if policy is not None and not isinstance(policy, Backups):
        raise TypeError(f"backups must be True, False or a Backups(...), not {backups!r}")
    run: _Resumable | None = None
    if run_id is not None:
        if not isinstance(target, icechunk.Repository):
            raise TypeError(
                "run_id= needs the Repository as target: the run commits to its own work "
                f"branch and publishes to branch={branch!r}; got {type(target).__name__}"
            )
        if not commit:
            raise ValueError("run_id= publishes at the end; it cannot go with commit=False")
        run = _Resumable(target, run_id, branch)
        run.start()
    try:
        writer = RegionWriter(
            source,
            target,
            template=template,
            branch=branch if run is None else run.session_branch,
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
    except BaseException:
        if run is not None:
            run.abandon()  # bad arguments: leave no work branch behind
        raise
    n_resumed = 0
    snapshot_id: str | None
    try:
        adapter = get_adapter(executor, workers=workers)
    except BaseException:
        if run is not None:
            run.abandon()
        raise
    try:
        if run is not None:
            snapshot_id, records, n_resumed = _write_resumable(
                writer,
                run,
                adapter,
                message=message,
                metadata=metadata,
                checkpoint_every=every,
                backups=policy,
            )
        else:
            writer.plan(**writer.limits_for(adapter.capabilities))
            writer._write_coordinator_part(adapter.capabilities)
            records = writer._write_regions(adapter, backups=policy)
            snapshot_id = writer.commit(message, metadata) if commit else None
    except BaseException:
        if writer.owns_session and not writer.session.read_only:
            writer.session.discard_changes()  # nothing was committed: drop it all
        if run is not None:
            run.abandon()
        raise
    finally:
        if adapter is not executor:
            adapter.close()
    plan = writer.write_plan
    return WriteResult(
        snapshot_id=snapshot_id,
        branch=branch if run is not None else writer.branch,
        n_regions=len(plan.regions),
        n_chunks=sum(r.n_chunks for r in records),
        bytes_written=sum(r.nbytes for r in records),
        seconds=time.perf_counter() - t0,
        tasks=records,
        executor=adapter.name,
        session=writer.session,
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
            return writer.plan(parallelism=parallelism)
        adapter = get_adapter(executor, workers=options.check_workers(workers))
        try:
            return writer.plan(**writer.limits_for(adapter.capabilities))
        finally:
            if adapter is not executor:
                adapter.close()
    finally:
        if writer.owns_session:
            writer.session.discard_changes()
