"""Region-parallel writes of plain numpy or dask arrays into zarr arrays (no xarray).

The same pipeline as a Dataset write, without a template: each target array's chunk grid is
planned (``planning``), one task per region writes a slice of the source through its own
fork (``_write_array``), the loop runs them (``dispatch``), and the results are merged into
the targets' session only when every region succeeded: all or nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import icechunk
import numpy as np

from icechunk_distributed import shipping
from icechunk_distributed.adapters import Adapter, open_adapter
from icechunk_distributed.dispatch import region_write_error, run_region_tasks, shipped_size
from icechunk_distributed.errors import (
    InvalidRegionError,
    TemplateMismatchError,
)
from icechunk_distributed.planning import Region, WritePlan, build_plan, check_slice
from icechunk_distributed.progress import Progress
from icechunk_distributed.results import TaskRecord, WriteResult
from icechunk_distributed.session import DistributedSession, SessionSnapshot, merge_sessions
from icechunk_distributed.task import TaskOutput, check_inside, failed, worker_name

__all__ = ["store_arrays"]


@dataclass
class _ArrayTask:
    snapshot: SessionSnapshot
    path: str
    dims: tuple[str, ...]
    region: Region
    data: Any
    units: dict[str, int]


def _write_array(arg: _ArrayTask | bytes) -> TaskOutput:
    task = shipping.loads(arg)
    assert isinstance(task, _ArrayTask)
    t0 = time.perf_counter()
    try:
        import zarr

        data = task.data
        if hasattr(data, "compute"):
            import dask

            with dask.config.set(scheduler="synchronous"):
                data = data.compute()
        data = np.asarray(data)
        array = zarr.open_array(task.snapshot.store, path=task.path, mode="r+")
        array[tuple(task.region[d] for d in task.dims)] = data
        n = check_inside(
            task.snapshot,
            prefix="/",
            dims={task.path: task.dims},
            units={task.path: task.units},
            region=task.region,
        )
        return TaskOutput(
            0, True, snapshot=task.snapshot, seconds=time.perf_counter() - t0,
            worker=worker_name(), n_chunks=n, nbytes=int(data.nbytes),
        )  # fmt: skip
    except Exception as exc:
        return failed(0, exc, t0)


def _placement(region: tuple[slice, ...] | None, shape: tuple[int, ...], tgt: Any) -> list[int]:
    """Where a source of ``shape`` starts in ``tgt`` (checked like ``to_zarr``'s region)."""
    if region is None:
        if shape != tuple(tgt.shape):
            raise TemplateMismatchError(
                f"source shape {shape} differs from target {tgt.path!r} {tgt.shape}; pass "
                "region=(slice(start, stop), ...) to write it into part of the array"
            )
        return [0] * len(shape)
    if len(region) != len(shape):
        raise InvalidRegionError(
            f"region has {len(region)} slices for {len(shape)}-dimensional arrays"
        )
    starts = []
    for axis, (s, n, size) in enumerate(zip(region, shape, tgt.shape, strict=True)):
        check_slice(f"region[{axis}]", s, size)
        start = 0 if s.start is None else int(s.start)
        stop = size if s.stop is None else int(s.stop)
        if not 0 <= start <= stop <= size or stop - start != n:
            raise InvalidRegionError(
                f"region[{axis}] = {start}:{stop} must lie within {tgt.path!r} (size {size}) "
                f"and hold the source's {n} elements"
            )
        starts.append(start)
    return starts


def _session_of(targets: list[Any]) -> DistributedSession:
    """The one writable icechunk session all targets are opened on."""
    paths = [t.path for t in targets]
    if len(set(paths)) != len(paths):
        raise ValueError(
            f"targets {paths} name the same array more than once: each array takes one source"
        )
    if not all(isinstance(t.store, icechunk.IcechunkStore) for t in targets):
        raise TypeError("targets must be zarr arrays opened on an icechunk session's store")
    base = targets[0].store.session
    if any(t.store.session != base for t in targets[1:]):
        raise TypeError("all targets must belong to one writable icechunk session")
    return DistributedSession(base)


def _plan(
    src: Any,
    tgt: Any,
    region: tuple[slice, ...] | None,
    regions: Sequence[tuple[slice, ...]] | None,
    task_size: int | str | None,
) -> WritePlan:
    """One target's plan: its write units (shards, else chunks), placed where ``region`` says."""
    dims = tuple(f"axis_{k}" for k in range(tgt.ndim))
    offsets = _placement(region, tuple(src.shape), tgt)
    grid = tgt.shards or tgt.chunks
    return build_plan(
        dims={tgt.path: dims},
        units={tgt.path: dict(zip(dims, grid, strict=True))},
        itemsizes={tgt.path: np.dtype(tgt.dtype).itemsize},
        sizes=dict(zip(dims, src.shape, strict=True)),
        offsets=dict(zip(dims, offsets, strict=True)),
        region_dims=dims if regions is not None else None,
        regions=None if regions is None else [dict(zip(dims, r, strict=False)) for r in regions],
        task_size=task_size,
        require_cover=False,
    )


def _check_shippable(
    adapter: Adapter, session: DistributedSession, srcs: list[Any], paths: list[str]
) -> None:
    """For engines that cross processes: reachable storage, picklable sources."""
    if not adapter.capabilities.crosses_processes:
        return
    session.check_shareable()  # in-memory storage cannot reach worker processes
    for src, path in zip(srcs, paths, strict=True):
        first = tuple(slice(0, min(1, n)) for n in src.shape)
        by_value = not adapter.capabilities.shares_modules
        shipped_size(src[first], f"source for {path!r}", None, by_value=by_value)


# long: half of it is the docstring; the body builds tasks inline (they close over it).
def store_arrays(
    sources: Sequence[Any] | Any,
    targets: Sequence[Any] | Any,
    *,
    executor: Any = "threads",
    regions: Sequence[tuple[slice, ...]] | None = None,
    region: tuple[slice, ...] | None = None,
    retries: int = 2,
    progress: Progress = None,
    task_size: int | str | None = None,
    workers: int | None = None,
) -> WriteResult:
    """Write numpy or dask arrays into zarr arrays of a writable session, region-parallel.

    Parameters
    ----------
    sources : array or sequence of arrays
        numpy or dask arrays (anything with ``shape``, ``dtype`` and slicing).
    targets : zarr.Array or sequence of zarr.Array
        Arrays opened on one writable icechunk session's store, same shapes as the sources.
    executor : str, concurrent.futures.Executor or Adapter, default "threads"
        Where tasks run (as in :func:`~icechunk_distributed.run_region_writes`).
    regions : sequence of tuple of slice, optional
        Explicit task regions in source coordinates (applied to every array); planned from
        the chunk grid by default. They may cover part of the sources: only that part is
        written (the arrays exist).
    region : tuple of slice, optional
        Where the sources go in the targets, as ``Dataset.to_zarr(region=...)`` places a
        dataset: one slice per axis (step 1), as long as the sources. By default the sources
        have the targets' shapes.
    retries : int, default 2
        Extra attempts per failed region.
    progress : bool or callable, optional
        A tqdm bar or a callback, as in ``run_region_writes``.
    task_size : int or str, optional
        Chunks or bytes per task.
    workers : int, optional
        Pool size for executors started by name.

    Returns
    -------
    WriteResult
        Counts, bytes, seconds and per-task records; ``session`` is the targets' session
        (a :class:`~icechunk_distributed.DistributedSession`) with every region merged in,
        not committed (``snapshot_id`` is None).

    Raises
    ------
    RegionWriteError
        Some regions failed on every attempt. Nothing was merged: the session holds what it
        held before the call.
    """
    t0 = time.perf_counter()
    single = not isinstance(targets, list | tuple)
    srcs: list[Any] = [sources] if single else list(sources)
    tgts: list[Any] = [targets] if single else list(targets)
    if len(srcs) != len(tgts):
        raise ValueError(f"{len(srcs)} sources for {len(tgts)} targets")
    session = _session_of(tgts)
    plans = [
        (t.path, _plan(s, t, region, regions, task_size)) for s, t in zip(srcs, tgts, strict=True)
    ]
    work = [(k, r) for k, (_, p) in enumerate(plans) for r in p.regions]
    outputs: dict[int, tuple[TaskOutput, int]] = {}
    with open_adapter(executor, workers=workers) as adapter:
        _check_shippable(adapter, session, srcs, [p for p, _ in plans])
        with session.allow_pickling() as snapshot:

            def build(i: int, attempt: int) -> _ArrayTask:
                k, region = work[i]
                path, plan = plans[k]
                dims = plan.dims[path]
                full = {d: region.get(d, slice(0, plan.sizes[d])) for d in dims}
                data = srcs[k][tuple(full[d] for d in dims)]
                placed = plan.absolute(full)  # in the target's coordinates
                snap = snapshot.copy_for_task()
                return _ArrayTask(snap, path, dims, placed, data, plan.units[path])

            def on_success(i: int, out: TaskOutput, attempts: int) -> None:
                outputs[i] = (out, attempts)  # merged once every region has succeeded

            failures = run_region_tasks(
                adapter,
                _write_array,
                [region for _, region in work],
                build,
                retries=retries,
                progress=progress,
                item_bytes=0,
                on_success=on_success,
            )
            if failures:  # raised inside the block: it closes the pickling window
                raise region_write_error(
                    failures, n_regions=len(work), retries=retries, outcome="nothing was merged"
                )
        merge_sessions(session, *[out.snapshot for out, _ in outputs.values()])
    tasks = [
        TaskRecord(i, work[i][1], out.seconds, n, out.worker, out.n_chunks, out.nbytes)
        for i, (out, n) in sorted(outputs.items())
    ]
    return WriteResult(
        snapshot_id=None,
        branch=session.branch,
        n_regions=len(work),
        n_chunks=sum(t.n_chunks for t in tasks),
        bytes_written=sum(t.nbytes for t in tasks),
        seconds=time.perf_counter() - t0,
        tasks=tasks,
        executor=adapter.name,
        session=session,
    )
