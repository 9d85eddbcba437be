"""Region-parallel writes of plain numpy or dask arrays into zarr arrays (no xarray)."""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import icechunk
import numpy as np

from icechunk_distributed.adapters import get_adapter
from icechunk_distributed.errors import (
    RegionWriteError,
    TemplateMismatchError,
    UnpicklableSourceError,
)
from icechunk_distributed.planning import WritePlan, _fmt, build_plan
from icechunk_distributed.session import DistributedSession, SessionSnapshot, merge_sessions
from icechunk_distributed.writer import (
    Progress,
    TaskFailure,
    _describe,
    _progress_bar,
    _TaskOutput,
    _worker_name,
)

__all__ = ["store_arrays"]


@dataclass
class _ArrayTask:
    snapshot: SessionSnapshot
    path: str
    index: tuple[slice, ...]
    data: Any
    units: tuple[int, ...]


def _write_array(arg: _ArrayTask | bytes) -> _TaskOutput:
    if isinstance(arg, bytes):
        import cloudpickle

        arg = cloudpickle.loads(arg)
    assert isinstance(arg, _ArrayTask)
    t0 = time.perf_counter()
    try:
        import zarr

        data = arg.data
        if hasattr(data, "compute"):
            import dask

            with dask.config.set(scheduler="synchronous"):
                data = data.compute()
        data = np.asarray(data)
        array = zarr.open_array(arg.snapshot.store, path=arg.path, mode="r+")
        array[arg.index] = data
        written = arg.snapshot.session.status().updated_chunks
        n = 0
        for path, coords in written.items():
            if path.strip("/") != arg.path.strip("/"):
                raise RuntimeError(f"the task wrote to {path!r}, not only to {arg.path!r}")
            for c in coords:
                for k, (i, s, u) in enumerate(zip(c, arg.index, arg.units, strict=True)):
                    if not s.start // u <= i < -(-s.stop // u):
                        raise RuntimeError(
                            f"chunk {c} of {path!r} is outside the region (axis {k})"
                        )
            n += len(coords)
        return _TaskOutput(
            0, True, snapshot=arg.snapshot, seconds=time.perf_counter() - t0,
            worker=_worker_name(), n_chunks=n, nbytes=int(data.nbytes),
        )  # fmt: skip
    except Exception as exc:
        return _TaskOutput(
            0, False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
            seconds=time.perf_counter() - t0, worker=_worker_name(),
        )  # fmt: skip


def store_arrays(
    sources: Sequence[Any] | Any,
    targets: Sequence[Any] | Any,
    *,
    executor: Any = "threads",
    regions: Sequence[tuple[slice, ...]] | None = None,
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
        Explicit regions (applied to every array); planned from the chunk grid by default.
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
        if tuple(src.shape) != tuple(tgt.shape):
            raise TemplateMismatchError(
                f"source shape {tuple(src.shape)} differs from target {tgt.path!r} {tgt.shape}"
            )
        dims = tuple(f"axis_{k}" for k in range(tgt.ndim))
        grid = tgt.shards or tgt.chunks
        plan = build_plan(
            dims={tgt.path: dims},
            units={tgt.path: dict(zip(dims, grid, strict=True))},
            itemsizes={tgt.path: np.dtype(tgt.dtype).itemsize},
            sizes=dict(zip(dims, tgt.shape, strict=True)),
            region_dims=dims if regions is not None else None,
            regions=None
            if regions is None
            else [dict(zip(dims, r, strict=False)) for r in regions],
            task_size=task_size,
        )
        plans.append((tgt.path, plan))
    work = [(k, r) for k, (_, p) in enumerate(plans) for r in p.regions]
    adapter = get_adapter(executor, workers=workers)
    crosses = adapter.capabilities.crosses_processes
    if crosses:
        import cloudpickle

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
    failures: list[TaskFailure] = []
    bar = _progress_bar(progress, len(work))
    try:
        with session.allow_pickling() as snapshot:

            def make_arg(i: int, attempt: int) -> Any:
                k, region = work[i]
                path, plan = plans[k]
                index = tuple(region.get(d, slice(0, plan.sizes[d])) for d in plan.dims[path])
                task = _ArrayTask(
                    snapshot._fresh(), path, index, srcs[k][index],
                    tuple(plan.units[path][d] for d in plan.dims[path]),
                )  # fmt: skip
                if crosses:
                    import cloudpickle

                    return cloudpickle.dumps(task)
                return task

            def on_success(i: int, out: Any, attempts: int) -> None:
                merge_sessions(session, out.snapshot)

            def on_failure(i: int, out: Any, attempts: int) -> None:
                failures.append(TaskFailure(i, work[i][1], _describe(out), None, attempts))

            def on_event(event: Any) -> None:
                if bar is not None:
                    bar(event)
                if callable(progress) and not isinstance(progress, bool):
                    progress(event)

            from icechunk_distributed.runner import run_loop

            run_loop(
                adapter,
                _write_array,
                len(work),
                make_arg,
                retries=retries,
                is_success=lambda out: isinstance(out, _TaskOutput) and out.ok,
                describe_error=_describe,
                on_success=on_success,
                on_failure=on_failure,
                on_event=on_event,
            )
    finally:
        if bar is not None:
            bar(None)
        if adapter is not executor:
            adapter.close()
    if failures:
        lines = "\n".join(f"  region ({_fmt(f.region)}): {f.error}" for f in failures[:10])
        raise RegionWriteError(
            f"{len(failures)} region(s) failed; their writes were not merged.\n{lines}", failures
        )
    return session
