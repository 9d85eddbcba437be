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
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import icechunk
import numpy as np
import xarray as xr

from icechunk_distributed import runs
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
from icechunk_distributed.planning import Region, WritePlan, _fmt, build_plan
from icechunk_distributed.runner import Backups, ProgressEvent, run_batch, run_loop
from icechunk_distributed.runs import plan_digest
from icechunk_distributed.session import (
    DistributedSession,
    SessionSnapshot,
    _Changes,
    merge_sessions,
)

if TYPE_CHECKING:
    from icechunk import Repository, Session

__all__ = [
    "RegionWriter",
    "TaskFailure",
    "TaskRecord",
    "TemplateInfo",
    "WriteResult",
    "describe_template",
    "run_region_writes",
]

Mode = Literal["w-", "w", "r+", "a"]
Loader = Callable[[dict[str, slice]], xr.Dataset]
Progress = bool | Callable[[ProgressEvent], None] | None


# ---------------------------------------------------------------------------------------------
# Describing the template


@dataclass(frozen=True)
class TemplateInfo:
    """Which variables tasks write, along which dims, in which write units (chunks/shards)."""

    region_dims: tuple[str, ...]
    sizes: dict[str, int]
    dims: dict[str, tuple[str, ...]]  # region variables only
    units: dict[str, dict[str, int]]  # region variables only
    itemsizes: dict[str, int]
    all_units: dict[str, dict[str, int]]  # every data variable
    eager_vars: tuple[str, ...]  # data variables lacking a region dim: the coordinator's


def _normalise_chunks(chunks: Any, var: xr.Variable) -> dict[str, int] | None:
    if chunks is None:
        return None
    if isinstance(chunks, int):
        chunks = (chunks,) * var.ndim
    if isinstance(chunks, Mapping):
        chunks = tuple(chunks.get(d, var.sizes[d]) for d in var.dims)
    chunks = tuple(chunks)
    if len(chunks) != var.ndim:
        return None
    return {
        str(d): max(1, int(var.sizes[d] if c in (None, -1) else c))
        for d, c in zip(var.dims, chunks, strict=True)
    }


def _units_of(name: str, var: xr.Variable, encoding: Mapping[str, Any]) -> dict[str, int]:
    enc = {**var.encoding, **encoding.get(name, {})}
    for key in ("shards", "chunks"):
        units = _normalise_chunks(enc.get(key), var)
        if units:
            return units
    if var.chunks is not None:  # dask: the first chunk along each dim
        return {str(d): max(1, int(c[0])) for d, c in zip(var.dims, var.chunks, strict=True)}
    return {str(d): max(1, int(var.sizes[d])) for d in var.dims}


def describe_template(
    template: xr.Dataset,
    *,
    encoding: Mapping[str, Mapping[str, Any]] | None = None,
    region_dims: Sequence[str] | None = None,
    existing_units: Mapping[str, Mapping[str, int]] | None = None,
) -> TemplateInfo:
    """Work out write units and region variables of ``template``.

    Parameters
    ----------
    template : xarray.Dataset
        The dataset (lazy is fine).
    encoding : dict, optional
        Per-variable encoding (``chunks``, ``shards``) overriding the variables' own.
    region_dims : sequence of str, optional
        Dimensions to split; by default those along which any data variable has several chunks.
    existing_units : dict, optional
        Write units of arrays that already exist (they win over everything else).

    Returns
    -------
    TemplateInfo
        The description.
    """
    encoding = encoding or {}
    sizes = {str(d): int(n) for d, n in template.sizes.items()}
    all_units: dict[str, dict[str, int]] = {}
    for name, var in template.data_vars.items():
        name = str(name)
        if existing_units and name in existing_units:
            all_units[name] = dict(existing_units[name])
        else:
            all_units[name] = _units_of(name, var.variable, encoding)
    if region_dims is None:
        chosen: list[str] = []
        for name, units in all_units.items():
            for dim in template[name].dims:
                if units[str(dim)] < sizes[str(dim)] and dim not in chosen:
                    chosen.append(str(dim))
        region_dims = tuple(chosen)
    region_dims = tuple(region_dims)
    dims: dict[str, tuple[str, ...]] = {}
    eager: list[str] = []
    for name in all_units:
        var_dims = tuple(str(d) for d in template[name].dims)
        # Tasks write variables that have every region dim; the coordinator writes the rest
        # once (splitting along a dim a variable lacks would make several tasks write it).
        if set(region_dims) <= set(var_dims):
            dims[name] = var_dims
        else:
            eager.append(name)
    return TemplateInfo(
        region_dims=region_dims,
        sizes=sizes,
        dims=dims,
        units={n: all_units[n] for n in dims},
        itemsizes={n: template[n].dtype.itemsize for n in dims},
        all_units=all_units,
        eager_vars=tuple(eager),
    )


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
# The task


@dataclass
class _TaskInput:
    index: int
    attempt: int
    snapshot: SessionSnapshot
    piece: xr.Dataset | None
    loader: Loader | None
    region: Region
    abs_region: Region
    group: str | None
    expect: dict[str, tuple[tuple[str, ...], tuple[int, ...], np.dtype[Any]]]
    units: dict[str, dict[str, int]]
    encodings: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _TaskOutput:
    index: int
    ok: bool
    snapshot: SessionSnapshot | None = None
    error: str | None = None
    exception: BaseException | None = None
    traceback: str | None = None
    seconds: float = 0.0
    worker: str = ""
    n_chunks: int = 0
    nbytes: int = 0


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"


def _check_piece(piece: Any, inp: _TaskInput) -> xr.Dataset:
    region = _fmt(inp.region)
    if not isinstance(piece, xr.Dataset):
        raise TypeError(
            f"the loader returned {type(piece).__name__} for region {{{region}}}; "
            "it must return an xarray.Dataset"
        )
    problems = []
    for name, (dims, shape, dtype) in inp.expect.items():
        if name not in piece.data_vars:
            problems.append(f"variable {name!r} is missing")
            continue
        var = piece[name]
        if tuple(map(str, var.dims)) != dims:
            problems.append(f"{name!r} has dims {var.dims}, expected {dims}")
        elif var.shape != shape:
            problems.append(f"{name!r} has shape {var.shape}, expected {shape}")
        elif var.dtype != dtype:
            problems.append(f"{name!r} has dtype {var.dtype}, expected {dtype}")
    if problems:
        raise ValueError(
            f"the piece for region {{{region}}} does not match the template: " + "; ".join(problems)
        )
    selected: xr.Dataset = piece[list(inp.expect)]
    return selected.drop_vars(list(selected.coords))


def _check_inside(
    snapshot: SessionSnapshot,
    *,
    prefix: str,
    dims: Mapping[str, tuple[str, ...]],
    units: Mapping[str, Mapping[str, int]],
    region: Region,
) -> int:
    """Every chunk this task wrote lies inside ``region``, in one of ``dims``' arrays.

    Array paths are ``prefix`` + name. The task is then done with its fork: freeze it with the
    changes just computed, so the coordinator's merge (in this process, for thread pools)
    need not ask icechunk again. Returns how many chunks the task wrote.
    """
    fork = snapshot._live_fork()
    changes = _Changes.of(fork.session())
    fork._changes, fork.live = changes, False
    n = 0
    for path, coords in changes.chunks.items():
        name = path[len(prefix) :] if path.startswith(prefix) else path
        if name not in dims:
            raise RuntimeError(f"the task wrote to {path!r}, which is not one of its arrays")
        for c in coords:
            for dim, index in zip(dims[name], c, strict=True):
                if dim not in region:
                    continue
                u, s = units[name][dim], region[dim]
                if not s.start // u <= index < -(-s.stop // u):
                    raise RuntimeError(
                        f"the task wrote chunk {list(c)} of {path!r}, outside its region "
                        f"({dim}={s.start}:{s.stop}, chunk size {u})"
                    )
        n += len(coords)
    return n


def _load(piece: xr.Dataset) -> xr.Dataset:
    if any(v.chunks is not None for v in piece.variables.values()):
        import dask

        # Compute in this task, without a nested cluster or thread pool.
        with dask.config.set(scheduler="synchronous"):
            loaded: xr.Dataset = piece.load()
            return loaded
    return piece.load()


_CF_KEYS = frozenset(
    {"dtype", "scale_factor", "add_offset", "_FillValue", "missing_value", "units", "calendar"}
)


def _write_piece(piece: xr.Dataset, inp: _TaskInput) -> None:
    """Encode each variable as ``to_zarr`` would, then assign it into the zarr array.

    ``Dataset.to_zarr(region=...)`` costs ~10 ms per call in Python overhead (opening and
    checking every array, reading existing encodings); the coordinator read the encodings
    once, so a task only CF-encodes its data (units, calendars, fill values, scale factors,
    dtypes: xarray's own encoder) and writes through arrays it opens once.
    """
    import zarr
    from xarray.backends.zarr import encode_zarr_variable

    prefix = f"{inp.group}/" if inp.group else ""
    for name in inp.expect:
        var = piece[name].variable.copy(deep=False)
        var.encoding = dict(inp.encodings.get(name, {}))
        encoded = encode_zarr_variable(var, name=name, zarr_format=3)
        index = tuple(inp.abs_region.get(str(d), slice(None)) for d in var.dims)
        array = zarr.open_array(inp.snapshot.store, path=prefix + name, mode="r+")
        array[index] = np.asarray(encoded.values)


def _execute(inp: _TaskInput) -> _TaskOutput:
    t0 = time.perf_counter()
    try:
        piece = inp.loader(dict(inp.region)) if inp.loader is not None else inp.piece
        piece = _load(_check_piece(piece, inp))
        _write_piece(piece, inp)
        n_chunks = _check_inside(
            inp.snapshot,
            prefix="/" + (f"{inp.group}/" if inp.group else ""),
            dims={name: expected[0] for name, expected in inp.expect.items()},
            units=inp.units,
            region=inp.abs_region,
        )
        return _TaskOutput(
            inp.index,
            True,
            snapshot=inp.snapshot,
            seconds=time.perf_counter() - t0,
            worker=_worker_name(),
            n_chunks=n_chunks,
            nbytes=int(piece.nbytes),
        )
    except Exception as exc:
        return _failed(inp.index, exc, t0)


def _failed(index: int, exc: Exception, t0: float) -> _TaskOutput:
    """A task's failure, as it travels home (call it inside the ``except`` block)."""
    try:  # the exception travels home if it pickles; its text always does
        import cloudpickle

        cloudpickle.dumps(exc)
        shipped: BaseException | None = exc
    except Exception:
        shipped = None
    return _TaskOutput(
        index,
        False,
        error=f"{type(exc).__name__}: {exc}",
        exception=shipped,
        traceback=traceback.format_exc(),
        seconds=time.perf_counter() - t0,
        worker=_worker_name(),
    )


def _received(arg: Any) -> Any:
    """A task's argument in the worker: ``bytes`` when it crossed a process boundary."""
    if isinstance(arg, bytes):
        import cloudpickle

        return cloudpickle.loads(arg)
    return arg


def _run_task(arg: _TaskInput | bytes) -> _TaskOutput:
    """Entry point in the worker."""
    inp = _received(arg)
    assert isinstance(inp, _TaskInput)
    return _execute(inp)


# ---------------------------------------------------------------------------------------------
# The writer


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


def _group_of(store: Any, group: str | None) -> Any:
    import zarr

    try:
        return zarr.open_group(store, path=group or "", mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return None


_ENCODING_KEYS = _CF_KEYS | {
    "chunks",
    "shards",
    "compressors",
    "filters",
    "serializer",
    "write_empty_chunks",
}


class RegionWriter:
    """The steps of :func:`run_region_writes`, for users who want to look in between.

    Parameters are those of :func:`run_region_writes` (without ``executor``, ``message``,
    ``metadata`` and ``commit``). Typical use::

        writer = RegionWriter(ds, repo, mode="w-")
        writer.plan()                     # validated regions; nothing written yet
        writer.write_metadata()           # array metadata and coordinates
        writer.write_eager()              # variables without a region dimension
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
        region_dims: Sequence[str] | None = None,
        regions: Sequence[Mapping[str, slice]] | None = None,
        task_size: int | str | None = None,
        encoding: Mapping[str, Mapping[str, Any]] | None = None,
        retries: int = 2,
        progress: Progress = None,
    ) -> None:
        if isinstance(source, xr.Dataset):
            if template is None:
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
        if mode not in ("w-", "w", "r+", "a"):
            raise ValueError(f"mode must be one of 'w-', 'w', 'r+', 'a'; got {mode!r}")
        if mode == "a" and append_dim is None:
            raise ValueError("mode='a' needs append_dim= (the dimension to grow)")
        if append_dim is not None and mode != "a":
            raise ValueError(f"append_dim= goes with mode='a', not mode={mode!r}")
        if append_dim is not None and append_dim not in template.dims:
            raise ValueError(
                f"append_dim {append_dim!r} is not a dimension of the template "
                f"({list(template.dims)})"
            )
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.template = template
        self.group = group.strip("/") or None if group else None
        self.mode: Mode = mode
        self.append_dim = append_dim
        self.region_dims = None if region_dims is None else tuple(region_dims)
        self.regions = None if regions is None else [dict(r) for r in regions]
        self.task_size = task_size
        self.encoding = {k: dict(v) for k, v in (encoding or {}).items()}
        self.retries = retries
        self.progress = progress
        self.session, self.owns_session = _open_session(target, branch)
        self.branch = self.session.branch
        self._plan: WritePlan | None = None
        self._info: TemplateInfo | None = None
        self._offsets: dict[str, int] = {}
        self.records: list[TaskRecord] = []
        self._item_bytes = 0
        self._encodings: dict[str, dict[str, Any]] = {}
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
    def _existing(self) -> dict[str, dict[str, int]]:
        """Check the store against the mode; return the write units of existing arrays."""
        store = self._plan_store()
        group = _group_of(store, self.group)
        names = [str(n) for n in self.template.variables]
        if self.mode == "w-":
            if group is not None:
                present = sorted(set(names) & {k for k, _ in group.arrays()})
                if present:
                    raise TemplateMismatchError(
                        f"group {self.group or '/'!r} already holds {present}; mode='w-' only "
                        "creates. Use mode='w' to overwrite, 'r+' to write into them, or 'a' "
                        "to append."
                    )
            return {}
        if self.mode == "w":
            return {}
        if group is None:
            raise TemplateMismatchError(
                f"mode={self.mode!r} writes into existing arrays, but group "
                f"{self.group or '/'!r} does not exist; use mode='w-' to create it"
            )
        try:
            existing = xr.open_zarr(store, group=self.group, consolidated=False, chunks=None)
        except (KeyError, ValueError) as exc:
            raise TemplateMismatchError(
                f"group {self.group or '/'!r} cannot be read as an xarray Dataset ({exc}); "
                f"mode={self.mode!r} needs the arrays written by xarray (with dimension names)"
            ) from exc
        units: dict[str, dict[str, int]] = {}
        arrays = dict(group.arrays())
        for name, var in self.template.data_vars.items():
            name = str(name)
            if name not in existing.data_vars or name not in arrays:
                raise TemplateMismatchError(
                    f"variable {name!r} is not in the store (group {self.group or '/'!r}); "
                    f"mode={self.mode!r} only writes into existing arrays"
                )
            old = existing[name]
            if old.dims != var.dims:
                raise TemplateMismatchError(
                    f"{name!r}: the store has dims {old.dims}, the template {var.dims}"
                )
            for dim in var.dims:
                if dim != self.append_dim and old.sizes[dim] != var.sizes[dim]:
                    raise TemplateMismatchError(
                        f"{name!r}: size along {dim!r} is {old.sizes[dim]} in the store and "
                        f"{var.sizes[dim]} in the template"
                    )
            if old.dtype != var.dtype:
                raise TemplateMismatchError(
                    f"{name!r}: the store holds {old.dtype}, the template {var.dtype}"
                )
            array = arrays[name]
            grid = array.shards or array.chunks
            units[name] = {str(d): int(c) for d, c in zip(var.dims, grid, strict=True)}
            wanted = _normalise_chunks(
                self.encoding.get(name, {}).get("shards")
                or self.encoding.get(name, {}).get("chunks"),
                var.variable,
            )
            if wanted and wanted != units[name]:
                raise TemplateMismatchError(
                    f"{name!r}: encoding asks for chunks {wanted}, the store has {units[name]}"
                )
        if self.append_dim is not None:
            self._offsets = {self.append_dim: int(existing.sizes[self.append_dim])}
        return units

    def plan(self, *, parallelism: int | None = None) -> list[Region]:
        """Plan and validate the regions (in source coordinates); nothing is written.

        Parameters
        ----------
        parallelism : int, optional
            Workers the default task size should keep busy.

        Returns
        -------
        list of dict
            The regions.
        """
        if self._plan is None:
            existing_units = self._existing()
            region_dims = self.region_dims
            if region_dims is None and self.regions is not None:
                order = [str(d) for d in self.template.dims]
                keys = {d for r in self.regions for d in r}
                region_dims = tuple([d for d in order if d in keys] + sorted(keys - set(order)))
            if self.append_dim is not None:
                # Appending always splits along the append dim: tasks must write into the
                # grown part of the arrays, never over what is there.
                if region_dims is None:
                    region_dims = describe_template(
                        self.template, encoding=self.encoding, existing_units=existing_units
                    ).region_dims
                if self.append_dim not in region_dims:
                    region_dims = (*region_dims, self.append_dim)
            info = describe_template(
                self.template,
                encoding=self.encoding,
                region_dims=region_dims,
                existing_units=existing_units,
            )
            self._plan = build_plan(
                dims=info.dims,
                units=info.units,
                itemsizes=info.itemsizes,
                sizes=info.sizes,
                offsets=self._offsets,
                region_dims=info.region_dims,
                regions=self.regions,
                task_size=self.task_size,
                parallelism=parallelism,
                require_cover=self.mode != "r+",
            )
            self._info = info
        return self._plan.regions

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

    def _task_input(self, index: int, snapshot: SessionSnapshot) -> _TaskInput:
        plan, info = self.write_plan, self._info
        assert info is not None
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
        return _TaskInput(
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
        )

    def _store_encodings(self) -> dict[str, dict[str, Any]]:
        """The CF encoding of each task-written variable, as stored (read once, here)."""
        names = list(self.write_plan.dims)
        if not names:
            return {}
        stored = xr.open_zarr(
            self.session.session.store, group=self.group, consolidated=False, chunks=None
        )
        return {
            name: {k: v for k, v in stored[name].encoding.items() if k in _CF_KEYS}
            for name in names
        }

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
        """:meth:`check_picklable` for an engine that crosses processes, once per limit."""
        if caps.crosses_processes and self._checked_limit != (caps.max_arg_bytes,):
            self.check_picklable(caps.max_arg_bytes)
            self._checked_limit = (caps.max_arg_bytes,)

    # -- writing
    def _write_coordinator_part(self, caps: Capabilities) -> None:
        """Check tasks can be shipped (before any write); write metadata and eager variables."""
        self._check_shippable(caps)
        self.write_metadata()
        self.write_eager()

    def _metadata_template(self) -> xr.Dataset:
        import dask.array as da

        info = self._described()
        meta = self.template.copy()
        for name, units in info.all_units.items():
            var = meta[name].variable
            chunks = tuple(units[str(d)] for d in var.dims)
            meta[name] = var.copy(
                deep=False, data=da.empty(var.shape, chunks=chunks, dtype=var.dtype)
            )
        lazy = {k: v for k, v in meta.coords.items() if v.chunks is not None}
        if not lazy:
            return meta
        import dask

        # In this process, not on whatever dask client happens to be the default.
        with dask.config.set(scheduler="synchronous"):
            return meta.assign_coords({k: v.compute() for k, v in lazy.items()})

    def _base_store(self) -> Any:
        # The base session's own store, whichever thread calls: forks made afterwards (the
        # tasks' seed) must see these writes.
        self.session._coordinator.invalidate_seed()
        return self.session.session.store

    def write_metadata(self) -> None:
        """Write array metadata and coordinates (mode ``a``: grow the arrays first)."""
        info = self._described()
        if self.mode == "r+":
            return
        meta = self._metadata_template()
        store = self._base_store()
        if self.mode == "a":
            meta.to_zarr(
                store,
                group=self.group,
                mode="a",
                append_dim=self.append_dim,
                compute=False,
                consolidated=False,
                safe_chunks=False,  # the lazy arrays are never written: no chunk is shared
            )
            return
        encoding: dict[str, dict[str, Any]] = {k: dict(v) for k, v in self.encoding.items()}
        for name, units in info.all_units.items():
            var = meta[name]
            # xarray replaces a variable's own encoding with the one passed here: keep it.
            own = {k: v for k, v in var.encoding.items() if k in _ENCODING_KEYS}
            enc = encoding[name] = {**own, **encoding.get(name, {})}
            grid = tuple(units[str(d)] for d in var.dims)
            if enc.get("shards") is not None:
                enc["shards"] = grid
            else:
                enc["chunks"] = grid
        mode: Mode = self.mode
        if mode == "w-" and _group_of(self.session.session.store, self.group) is not None:
            mode = "a"  # the group exists without these arrays: add them
        meta.to_zarr(
            store,
            group=self.group,
            mode=mode,
            compute=False,
            consolidated=False,
            encoding=encoding,
        )

    def write_eager(self) -> None:
        """Write the data variables that lack a region dimension (once, here).

        With a loader source they come from ``load(full extent)``, restricted to those
        variables, never from the template (whose data may be placeholders).
        """
        info = self._described()
        if not info.eager_vars:
            return
        names = list(info.eager_vars)
        if self.loader is not None:
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
                    "variables without a region dimension are read from it once"
                )
            for name in names:
                if data[name].shape != self.template[name].shape:
                    raise TemplateMismatchError(
                        f"the loader returned {name!r} with shape {data[name].shape}, the "
                        f"template has {self.template[name].shape}"
                    )
            data = data[names]
        else:
            assert self.source is not None
            data = self.source[names]
        data = _load(data.drop_vars(list(data.coords)))
        for var in data.variables.values():
            var.encoding = {}
        store = self._base_store()
        grown = [n for n in names if self.append_dim in data[n].dims]
        if grown:  # mode "a": these were grown; write into the new part only
            o, n = self._offsets[str(self.append_dim)], info.sizes[str(self.append_dim)]
            data[grown].to_zarr(
                store,
                group=self.group,
                mode="r+",
                region={str(self.append_dim): slice(o, o + n)},
                consolidated=False,
            )
        rest = [n for n in names if n not in grown]
        if rest:
            data[rest].to_zarr(store, group=self.group, mode="r+", consolidated=False)

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
        self._encodings = self._store_encodings()
        records: list[TaskRecord | None] = [None] * len(todo)

        def on_success(j: int, out: _TaskOutput, attempts: int) -> None:
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

            def build(j: int, attempt: int) -> _TaskInput:
                with guard:
                    inp = self._task_input(todo[j], snapshot._fresh())
                inp.attempt = attempt
                return inp

            _fan_out(
                adapter,
                _run_task,
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


def _fan_out(
    adapter: Adapter,
    fn: Callable[[Any], _TaskOutput],
    regions: Sequence[Region],
    build: Callable[[int, int], Any],
    *,
    retries: int,
    progress: Progress,
    item_bytes: int,
    on_success: Callable[[int, _TaskOutput, int], None],
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
        if isinstance(out, _TaskOutput):
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
            is_success=lambda out: isinstance(out, _TaskOutput) and out.ok,
            describe_error=_describe,
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
    if isinstance(out, _TaskOutput):
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

    def check(self, writer: RegionWriter, parallelism: int) -> int:
        """Plan against the run's base; refuse a plan other than the stored one."""
        known = self.stored
        if known is not None:
            parallelism = int(known.plan.get("parallelism") or parallelism)
        writer._reference = self.repo.readonly_session(snapshot_id=self.base)
        writer.plan(parallelism=parallelism)
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
    run.check(writer, adapter.capabilities.parallelism)
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
    mode : {"w-", "w", "r+", "a"}, default "w-"
        Create (refuse existing arrays), overwrite, write regions into existing arrays, or
        append along ``append_dim``.
    append_dim : str, optional
        The dimension to grow, with ``mode="a"``.
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
            writer.plan(parallelism=adapter.capabilities.parallelism)
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
