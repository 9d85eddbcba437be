"""Region-parallel writes of plain numpy or dask arrays into zarr arrays (no xarray)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import icechunk
import numpy as np

from icechunk_distributed.adapters import get_adapter
from icechunk_distributed.errors import (
    InvalidRegionError,
    TemplateMismatchError,
    UnpicklableSourceError,
)
from icechunk_distributed.planning import Region, WritePlan, build_plan, check_slice
from icechunk_distributed.session import DistributedSession, SessionSnapshot, merge_sessions
from icechunk_distributed.task import TaskOutput, check_inside, failed, received, worker_name
from icechunk_distributed.writer import Progress, fan_out

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
    task = received(arg)
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
) -> DistributedSession:
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
    DistributedSession
        The targets' session with every region merged in, not committed.

    Raises
    ------
    RegionWriteError
        Some regions failed on every attempt. The regions that succeeded are merged into the
        session (uncommitted): commit what is there, or ``discard_changes()``.
    """
    single = not isinstance(targets, list | tuple)
    srcs: list[Any] = [sources] if single else list(sources)
    tgts: list[Any] = [targets] if single else list(targets)
    if len(srcs) != len(tgts):
        raise ValueError(f"{len(srcs)} sources for {len(tgts)} targets")
    paths = [t.path for t in tgts]
    if len(set(paths)) != len(paths):
        raise ValueError(
            f"targets {paths} name the same array more than once: each array takes one source"
        )
    if not all(isinstance(t.store, icechunk.IcechunkStore) for t in tgts):
        raise TypeError("targets must be zarr arrays opened on an icechunk session's store")
    base = tgts[0].store.session
    if any(t.store.session != base for t in tgts[1:]):
        raise TypeError("all targets must belong to one writable icechunk session")
    session = DistributedSession(base)
    plans: list[tuple[str, WritePlan]] = []
    for src, tgt in zip(srcs, tgts, strict=True):
        dims = tuple(f"axis_{k}" for k in range(tgt.ndim))
        offsets = _placement(region, tuple(src.shape), tgt)
        grid = tgt.shards or tgt.chunks
        plan = build_plan(
            dims={tgt.path: dims},
            units={tgt.path: dict(zip(dims, grid, strict=True))},
            itemsizes={tgt.path: np.dtype(tgt.dtype).itemsize},
            sizes=dict(zip(dims, src.shape, strict=True)),
            offsets=dict(zip(dims, offsets, strict=True)),
            region_dims=dims if regions is not None else None,
            regions=None
            if regions is None
            else [dict(zip(dims, r, strict=False)) for r in regions],
            task_size=task_size,
            require_cover=False,
        )
        plans.append((tgt.path, plan))
    work = [(k, r) for k, (_, p) in enumerate(plans) for r in p.regions]
    adapter = get_adapter(executor, workers=workers)
    crosses = adapter.capabilities.crosses_processes
    if crosses:
        import cloudpickle

        try:
            session.check_shareable()  # in-memory storage cannot reach worker processes
        except Exception:
            if adapter is not executor:
                adapter.close()
            raise

        for k, (path, _) in enumerate(plans):
            first = tuple(slice(0, min(1, n)) for n in srcs[k].shape)
            try:
                cloudpickle.dumps(srcs[k][first])
            except Exception as exc:
                if adapter is not executor:
                    adapter.close()
                raise UnpicklableSourceError(
                    f"the source for {path!r} cannot be pickled for worker processes ({exc}); "
                    "use executor='threads'"
                ) from exc
    try:
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
                merge_sessions(session, out.snapshot)

            fan_out(
                adapter,
                _write_array,
                [region for _, region in work],
                build,
                retries=retries,
                progress=progress,
                item_bytes=0,
                on_success=on_success,
            )
    finally:
        if adapter is not executor:
            adapter.close()
    return session
