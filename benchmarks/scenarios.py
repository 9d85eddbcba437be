"""The benchmark scenarios and the baselines they are compared with.

S1 many small regions (240 x 205x275 float32, 54 MB): ours on threads and processes against
   the documented per-region ``Dataset.to_zarr(region=...)`` pattern on the same executors,
   and the raw floor (zstd-compress the same bytes and write files from one process).
S2 bulk, 1 GiB in 64 regions of 16 MiB computed in the tasks: ours on every local engine
   against plain zarr (no Icechunk) on the same executor, ``icechunk.xarray.to_icechunk`` on a
   dask LocalCluster, and cubed's ``store_icechunk`` on cubed's processes executor.
S3 Lithops localhost, 240 regions: ours against the documented one-call-per-region pattern
   and the best hand-batched version (a few calls, zarr array assignment).
S4 coordinator scaling: many tiny regions on threads (coordinator CPU per task, peak RSS
   growth) against a minimal hand-written fork -> thread pool -> merge -> commit loop doing the
   same writes, and merge + commit time for many chunk references.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import icechunk
import numpy as np
import xarray as xr
import zarr

import icechunk_distributed as icd
from benchmarks.bulk import (
    BX,
    BY,
    bulk,
    cubed_block,
    noop,
    plain_zarr_batch,
    plain_zarr_task,
)
from icechunk_distributed.adapters.local import FuturesAdapter

NY, NX = 205, 275


# -- shared helpers ----------------------------------------------------------------------------


def tair(start: int, stop: int) -> np.ndarray:
    t = np.arange(start, stop, dtype="f4")[:, None, None]
    field = np.sin(t / 10) + np.linspace(0, 1, NY, dtype="f4")[:, None] * np.arange(NX, dtype="f4")
    return np.ascontiguousarray(field.astype("f4"))


def dataset(n: int) -> xr.Dataset:
    return xr.Dataset(
        {"Tair": (("time", "y", "x"), tair(0, n), {"units": "K"})},
        coords={"time": np.arange(n)},
    )


def load(region: dict[str, slice]) -> xr.Dataset:
    t = region["time"]
    return xr.Dataset(
        {"Tair": (("time", "y", "x"), tair(t.start, t.stop), {"units": "K"})},
        coords={"time": np.arange(t.start, t.stop)},
    )


def template(n: int) -> xr.Dataset:
    ds = dataset(n)
    return ds.assign(Tair=ds.Tair.chunk({"time": 1}))


class _Repos:
    """Fresh local repositories in one temporary directory, removed at the end."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="icd-bench-")
        self.n = 0

    def new(self) -> icechunk.Repository:
        self.n += 1
        path = os.path.join(self.root, f"r{self.n}")
        return icechunk.Repository.create(icechunk.local_filesystem_storage(path))

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def verify(repo: icechunk.Repository, n: int) -> None:
    got = zarr.open_array(repo.readonly_session("main").store, path="Tair")[:]
    np.testing.assert_array_equal(got, tair(0, n))


# -- the documented pattern ----------------------------------------------------------------------


def documented_task(fork: Any, piece: xr.Dataset, i: int) -> Any:
    """What the Icechunk docs have each task do: one region through ``Dataset.to_zarr``."""
    piece.drop_vars("time").to_zarr(
        fork.store, region={"time": slice(i, i + 1)}, consolidated=False
    )
    return fork


def documented(repo: icechunk.Repository, ds: xr.Dataset, pool: Executor, copy: bool) -> str:
    session = repo.writable_session("main")
    ds.assign(Tair=ds.Tair.chunk({"time": 1})).to_zarr(
        session.store, compute=False, consolidated=False
    )
    fork = session.fork()
    futures = [
        # threads share memory: give each task its own copy of the fork (sharing one hangs)
        pool.submit(documented_task, pickle.loads(pickle.dumps(fork)) if copy else fork,
                    ds.isel(time=slice(i, i + 1)), i)
        for i in range(ds.sizes["time"])
    ]  # fmt: skip
    session.merge(*[f.result() for f in futures])
    return session.commit("documented pattern")


# -- S1 ------------------------------------------------------------------------------------------


class S1:
    """Many small regions on threads and processes (warm pools, reused across repetitions)."""

    def __init__(self, n_regions: int = 240) -> None:
        self.n = n_regions
        self.ds = dataset(n_regions)
        self.repos = _Repos()
        self.threads = FuturesAdapter.threads(2)
        self.processes = FuturesAdapter.processes(2)

    def __enter__(self) -> S1:
        # warm the process pool (imports in the workers)
        list(self.processes.executor.map(abs, range(4)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.threads.close()
        self.processes.close()
        self.repos.close()

    def _ours(self, adapter: FuturesAdapter) -> float:
        repo = self.repos.new()
        t0 = time.perf_counter()
        icd.run_region_writes(
            self.ds, repo, executor=adapter, encoding={"Tair": {"chunks": (1, NY, NX)}},
            progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        verify(repo, self.n)
        return seconds

    def _documented(self, pool: Executor, copy: bool) -> float:
        repo = self.repos.new()
        t0 = time.perf_counter()
        documented(repo, self.ds, pool, copy)
        seconds = time.perf_counter() - t0
        verify(repo, self.n)
        return seconds

    def _raw_floor(self) -> float:
        import numcodecs

        codec = numcodecs.Zstd(level=0)  # zarr's default compressor
        data = self.ds.Tair.values
        out = tempfile.mkdtemp(dir=self.repos.root)
        t0 = time.perf_counter()
        for i in range(self.n):
            with open(os.path.join(out, str(i)), "wb") as f:
                f.write(codec.encode(data[i]))
        return time.perf_counter() - t0

    def contenders(self) -> dict[str, Callable[[], float]]:
        return {
            "ours (threads)": lambda: self._ours(self.threads),
            "documented (threads)": lambda: self._documented(self.threads.executor, True),
            "raw floor (1 process)": self._raw_floor,
            "ours (processes)": lambda: self._ours(self.processes),
            "documented (processes)": lambda: self._documented(self.processes.executor, False),
        }


# -- S2 ------------------------------------------------------------------------------------------

S2_ENGINES = ("threads", "processes", "joblib", "dask", "ray", "lithops")
S2_WORKERS = 2


def bulk_load(region: dict[str, slice]) -> xr.Dataset:
    t = region["time"]
    return xr.Dataset({"Tair": (("time", "y", "x"), bulk(t.start, t.stop))})


def bulk_template(n: int) -> xr.Dataset:
    import dask.array as da

    lazy = da.map_blocks(
        lambda block, block_info=None: bulk(*block_info[None]["array-location"][0]),
        da.empty((n, BY, BX), chunks=(1, BY, BX), dtype="f4"),
        dtype="f4",
    )
    return xr.Dataset({"Tair": (("time", "y", "x"), lazy)})


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


class S2:
    """About 1 GiB in 64 regions of 16 MiB on 2 workers: ours on every local engine against
    plain zarr without Icechunk on the same executor, ``icechunk.xarray.to_icechunk`` on a
    dask LocalCluster, and cubed's ``store_icechunk`` on cubed's processes executor.

    Engines whose package is missing are skipped with a note (``skipped``), as is cubed.
    """

    def __init__(self, n_regions: int = 64, engines: tuple[str, ...] = S2_ENGINES) -> None:
        from distributed import Client, LocalCluster

        needs = {"joblib": "joblib", "ray": "ray", "lithops": "lithops"}
        self.skipped: dict[str, str] = {}
        for engine in engines:
            if engine in needs and not _importable(needs[engine]):
                self.skipped[f"ours ({engine})"] = f"{needs[engine]} not installed"
        if not _importable("cubed"):
            self.skipped["cubed store_icechunk (processes)"] = "cubed not installed"
        self.engines = tuple(e for e in engines if f"ours ({e})" not in self.skipped)
        self.n = n_regions
        self.repos = _Repos()
        self.threads = FuturesAdapter.threads(S2_WORKERS)
        self.processes = FuturesAdapter.processes(S2_WORKERS)
        # to_icechunk needs the dask cluster whichever engines run
        self.cluster = LocalCluster(
            n_workers=S2_WORKERS,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        )
        self.client = Client(self.cluster, set_as_default=False)
        self.joblib: Any = None
        if "joblib" in self.engines:
            from icechunk_distributed.adapters.joblib import JoblibAdapter

            self.joblib = JoblibAdapter(n_jobs=S2_WORKERS)
        self.ray: Any = None
        if "ray" in self.engines:
            import ray

            ray.init(num_cpus=S2_WORKERS, include_dashboard=False, log_to_driver=False)
            self.ray = ray
        self.lithops: Any = None
        if "lithops" in self.engines:
            from icechunk_distributed.adapters.lithops import LithopsAdapter

            self.lithops = LithopsAdapter(workers=S2_WORKERS)
        self.calls: dict[str, int] = {}  # Lithops calls per run
        self._metadata: dict[str, Any] | None = None  # the first committed array's

    def __enter__(self) -> S2:
        for engine, reason in self.skipped.items():
            print(f"S2   {engine}: skipped ({reason})")
        self.warm()
        return self

    def __exit__(self, *exc: object) -> None:
        self.threads.close()
        self.processes.close()
        self.client.close()
        self.cluster.close()
        if self.ray is not None:
            self.ray.shutdown()
        if self.lithops is not None:
            self.lithops.close()
        self.repos.close()

    @property
    def nbytes(self) -> int:
        return self.n * BY * BX * 4

    def _check(self, store: Any) -> None:
        """Values (first, middle, last region) and the same zarr metadata in every store."""
        array = zarr.open_array(store, path="Tair", mode="r")
        for i in (0, self.n // 2, self.n - 1):
            np.testing.assert_array_equal(array[i : i + 1], bulk(i, i + 1))
        meta = array.metadata.to_dict()
        if self._metadata is None:
            self._metadata = meta
        assert meta == self._metadata, (meta, self._metadata)

    def _check_repo(self, repo: icechunk.Repository) -> None:
        """The committed array, then the repository is removed (1 GiB each)."""
        self._check(repo.readonly_session("main").store)
        shutil.rmtree(os.path.join(self.repos.root, f"r{self.repos.n}"))

    def _executor(self, engine: str) -> Any:
        return {
            "threads": self.threads,
            "processes": self.processes,
            "joblib": self.joblib,
            "dask": self.client,
            "ray": "ray",
            "lithops": self.lithops,
        }[engine]

    def _ours(self, engine: str) -> float:
        repo = self.repos.new()
        calls = self.lithops.n_calls if engine == "lithops" else 0
        t0 = time.perf_counter()
        icd.run_region_writes(bulk_load, repo, template=bulk_template(self.n),
                              executor=self._executor(engine), task_size=1,
                              progress=False)  # fmt: skip
        seconds = time.perf_counter() - t0
        if engine == "lithops":
            self.calls["ours (lithops)"] = self.lithops.n_calls - calls
        self._check_repo(repo)
        return seconds

    def warm(self) -> None:
        """One untimed 2-region write by ours on every engine: the workers import what the
        tasks need (icechunk, xarray, zarr, this module) before any contender is timed.
        Lithops localhost starts a fresh interpreter for every job, so there one trivial call
        only gets Lithops' runtime set up. cubed starts a new pool per compute: nothing to warm.
        """
        for engine in self.engines:
            if engine == "lithops":
                fexec = self.lithops.executor
                fexec.get_result(fexec.map(noop, [1, 2], include_modules=[]),
                                 show_progressbar=False)  # fmt: skip
                continue
            repo = self.repos.new()
            icd.run_region_writes(bulk_load, repo, template=bulk_template(2),
                                  executor=self._executor(engine), task_size=1,
                                  progress=False)  # fmt: skip
            shutil.rmtree(os.path.join(self.repos.root, f"r{self.repos.n}"))

    def _to_icechunk(self) -> float:
        import dask
        from icechunk.xarray import to_icechunk

        repo = self.repos.new()
        t0 = time.perf_counter()
        session = repo.writable_session("main")
        with dask.config.set(scheduler=self.client.get):
            to_icechunk(bulk_template(self.n), session)
        session.commit("to_icechunk")
        seconds = time.perf_counter() - t0
        self._check_repo(repo)
        return seconds

    def _cubed(self) -> float:
        """cubed's ``store_icechunk`` (the usage of cubed's own tests): the target array opened
        in a fork, the merged fork cubed returns merged into the session, one commit. cubed's
        processes executor starts a fresh spawn pool for every compute: that is in its time."""
        import cubed
        from cubed.icechunk import store_icechunk

        repo = self.repos.new()
        work_dir = tempfile.mkdtemp(dir=self.repos.root)
        t0 = time.perf_counter()
        spec = cubed.Spec(work_dir=work_dir, allowed_mem="1GB", executor_name="processes",
                          executor_options={"max_workers": S2_WORKERS})  # fmt: skip
        session = repo.writable_session("main")
        # the same metadata as ours and to_icechunk (xarray's encoding of the same template)
        bulk_template(self.n).to_zarr(session.store, compute=False, consolidated=False)
        fork = session.fork()
        target = zarr.open_array(fork.store, path="Tair", mode="r+")
        base = cubed.empty((self.n, BY, BX), dtype="f4", chunks=(1, BY, BX), spec=spec)
        source = cubed.map_blocks(cubed_block, base, dtype="f4")
        session.merge(store_icechunk(sources=[source], targets=[target]))
        session.commit("cubed store_icechunk")
        seconds = time.perf_counter() - t0
        self._check_repo(repo)
        shutil.rmtree(work_dir)
        return seconds

    def _plain_zarr(self, engine: str) -> float:
        path = tempfile.mkdtemp(dir=self.repos.root)
        t0 = time.perf_counter()
        bulk_template(self.n).to_zarr(zarr.storage.LocalStore(path), compute=False,
                                      consolidated=False)  # fmt: skip
        args = [(path, i) for i in range(self.n)]
        if engine == "threads":
            list(self.threads.executor.map(plain_zarr_task, args))
        elif engine == "processes":
            list(self.processes.executor.map(plain_zarr_task, args))
        elif engine == "joblib":
            import joblib

            joblib.Parallel(n_jobs=S2_WORKERS)(joblib.delayed(plain_zarr_task)(a) for a in args)
        elif engine == "dask":
            self.client.gather(self.client.map(plain_zarr_task, args, pure=False))
        elif engine == "ray":
            task = self.ray.remote(plain_zarr_task)
            self.ray.get([task.remote(a) for a in args])
        else:  # lithops: as many calls as ours makes (2 per worker), regions split among them
            groups = np.array_split(np.arange(self.n), min(self.n, 2 * S2_WORKERS))
            batches = [pickle.dumps((path, [int(i) for i in g])) for g in groups]
            fexec = self.lithops.executor
            futures = fexec.map(plain_zarr_batch, batches, include_modules=[])
            fexec.get_result(futures, show_progressbar=False)
            self.calls["plain zarr (lithops)"] = len(batches)
        seconds = time.perf_counter() - t0
        self._check(zarr.storage.LocalStore(path))
        shutil.rmtree(path)
        return seconds

    def contenders(self) -> dict[str, Callable[[], float]]:
        """Per engine ours, then plain zarr on it; ``to_icechunk`` after dask, cubed after
        processes (the executors each is compared with)."""
        out: dict[str, Callable[[], float]] = {}
        for engine in self.engines:
            out[f"ours ({engine})"] = functools.partial(self._ours, engine)
            out[f"plain zarr ({engine})"] = functools.partial(self._plain_zarr, engine)
            if engine == "processes" and "cubed store_icechunk (processes)" not in self.skipped:
                out["cubed store_icechunk (processes)"] = self._cubed
            if engine == "dask":
                out["to_icechunk (dask)"] = self._to_icechunk
        if "dask" not in self.engines:
            out["to_icechunk (dask)"] = self._to_icechunk
        return out


# -- S3 ------------------------------------------------------------------------------------------


def lithops_per_region(arg: bytes) -> bytes:
    """The documented pattern on Lithops: one call per region (fork in, fork out)."""
    fork, i = pickle.loads(arg)
    documented_task(fork, load({"time": slice(i, i + 1)}), i)
    return pickle.dumps(fork)


def lithops_batch(arg: bytes) -> bytes:
    """A careful hand-written batch: many regions per call, zarr array assignment."""
    fork, indices = pickle.loads(arg)
    array = zarr.open_array(fork.store, path="Tair", mode="r+")
    for i in indices:
        array[i : i + 1] = tair(i, i + 1)
    return pickle.dumps(fork)


class S3:
    """Lithops localhost with 2 workers."""

    def __init__(self, n_regions: int = 240) -> None:
        from icechunk_distributed.adapters.lithops import LithopsAdapter

        self.n = n_regions
        self.repos = _Repos()
        self.adapter = LithopsAdapter(workers=2)
        self.fexec = self.adapter.executor
        self.calls: dict[str, float] = {}

    def __enter__(self) -> S3:
        return self

    def __exit__(self, *exc: object) -> None:
        self.adapter.close()
        self.repos.close()

    def _ours(self) -> float:
        repo = self.repos.new()
        before = self.adapter.n_calls
        t0 = time.perf_counter()
        icd.run_region_writes(load, repo, template=template(self.n), executor=self.adapter,
                              task_size=1, progress=False)  # fmt: skip
        seconds = time.perf_counter() - t0
        self.calls["ours (lithops)"] = self.adapter.n_calls - before
        verify(repo, self.n)
        return seconds

    def _by_hand(self, per_region: bool) -> float:
        repo = self.repos.new()
        t0 = time.perf_counter()
        session = repo.writable_session("main")
        template(self.n).to_zarr(session.store, compute=False, consolidated=False)
        fork = session.fork()
        if per_region:
            args = [pickle.dumps((fork, i)) for i in range(self.n)]
            fn = lithops_per_region
        else:  # 2 calls per worker, like ours
            groups = np.array_split(np.arange(self.n), 4)
            args = [pickle.dumps((fork, [int(i) for i in g])) for g in groups]
            fn = lithops_batch
        futures = self.fexec.map(fn, args, include_modules=[])
        results = self.fexec.get_result(futures, show_progressbar=False)
        session.merge(*[pickle.loads(r) for r in results])
        session.commit("by hand")
        seconds = time.perf_counter() - t0
        name = "documented per-region" if per_region else "hand-batched"
        self.calls[name] = len(args)
        verify(repo, self.n)
        return seconds

    def contenders(self) -> dict[str, Callable[[], float]]:
        return {
            "ours (lithops)": self._ours,
            "hand-batched": lambda: self._by_hand(False),
            "documented per-region": lambda: self._by_hand(True),
        }


# -- S4 ------------------------------------------------------------------------------------------

# Sizes from which S4 runs each contender once (a 100,000-task pair takes about 10 minutes).
S4_ONCE_FROM = 100_000
# Largest size the hand-written loop runs at. At 100,000 tasks it took 560 s and 868 MB of peak
# RSS growth (every fork is held until merged) on a loaded 2-core machine; 1,000,000 would need
# about 1.5 hours and 9 GB, so there ours runs alone.
S4_HAND_MAX = 100_000


def _tiny_load(region: dict[str, slice]) -> xr.Dataset:
    s = region["i"]
    return xr.Dataset({"v": (("i",), np.full(s.stop - s.start, 1.0, dtype="f4"))})


def _s4_result(repo: icechunk.Repository, n_tasks: int) -> dict[str, Any]:
    """Check what a S4 contender committed; return what both must agree on."""
    store = repo.readonly_session("main").store
    array = zarr.open_array(store, path="v", mode="r")
    assert array.shape == (n_tasks,)
    assert (np.asarray(array[:]) == 1).all()
    meta = {"group": zarr.open_group(store, mode="r").metadata.to_dict(),
            "v": array.metadata.to_dict()}  # fmt: skip
    return {
        "commits": len(list(repo.ancestry(branch="main"))),
        "zarr_metadata": json.loads(json.dumps(meta, default=str)),
    }


def s4_point(n_tasks: int) -> dict[str, Any]:
    """One S4 measurement of ours (run in a fresh process so peak RSS means something)."""
    import dask.array as da

    from benchmarks.ingest import peak_rss_mb

    repos = _Repos()
    try:
        repo = repos.new()
        tpl = xr.Dataset({"v": (("i",), da.zeros(n_tasks, chunks=1, dtype="f4"))})
        rss0 = peak_rss_mb()
        cpu0, t0 = time.thread_time(), time.perf_counter()  # this thread: the coordinator
        with ThreadPoolExecutor(2) as pool:
            icd.run_region_writes(_tiny_load, repo, template=tpl, executor=pool, task_size=1,
                                  progress=False)  # fmt: skip
        return _s4_measured(repo, n_tasks, t0=t0, cpu0=cpu0, rss0=rss0)
    finally:
        repos.close()


def _s4_measured(
    repo: icechunk.Repository, n_tasks: int, *, t0: float, cpu0: float, rss0: float
) -> dict[str, Any]:
    """One S4 run's figures, since ``t0`` (wall), ``cpu0`` (this thread) and ``rss0``."""
    from benchmarks.ingest import peak_rss_mb

    seconds = time.perf_counter() - t0
    cpu = time.thread_time() - cpu0
    return {
        "n_tasks": n_tasks,
        "seconds": seconds,
        "coordinator_us_per_task": cpu / n_tasks * 1e6,
        "rss_growth_mb": peak_rss_mb() - rss0,
        **_s4_result(repo, n_tasks),
    }


def _hand_task(fork: Any, region: dict[str, slice]) -> Any:
    ds = _tiny_load(region)
    zarr.open_array(fork.store, path="v", mode="r+")[region["i"]] = ds["v"].values
    return fork


def s4_hand_point(n_tasks: int) -> dict[str, Any]:
    """The same writes as :func:`s4_point` by a minimal hand-written loop: fork -> thread pool
    -> merge as they complete -> commit (fresh process, measured the same way)."""
    import dask.array as da

    from benchmarks.ingest import peak_rss_mb

    repos = _Repos()
    try:
        repo = repos.new()
        # The same zarr metadata as ours (checked by `s4`). One dask block and encoding
        # chunks=(1,): `to_zarr(compute=False)` of a template with n one-element blocks builds
        # an n-task store graph first (12 s at 100,000).
        tpl = xr.Dataset({"v": (("i",), da.zeros(n_tasks, chunks=n_tasks, dtype="f4"))})
        rss0 = peak_rss_mb()
        cpu0, t0 = time.thread_time(), time.perf_counter()
        session = repo.writable_session("main")
        tpl.to_zarr(session.store, compute=False, mode="w", consolidated=False,
                    encoding={"v": {"chunks": (1,)}})  # fmt: skip
        with ThreadPoolExecutor(2) as pool:
            # Forks are made here, before any merge: a fork made inside the task, after
            # merges began, copies the merged changes (125 s instead of 37 s at 10,000).
            futures = [
                pool.submit(_hand_task, session.fork(), {"i": slice(i, i + 1)})
                for i in range(n_tasks)
            ]
            for future in as_completed(futures):
                session.merge(future.result())
        session.commit("hand-written loop")
        return _s4_measured(repo, n_tasks, t0=t0, cpu0=cpu0, rss0=rss0)
    finally:
        repos.close()


def s4_floor(n_tasks: int, n_forks: int = 0) -> dict[str, Any]:
    """Icechunk's own memory floor for S4's writes: the same ``n_tasks`` one-chunk writes by
    zarr straight into one session (10,000 at a time), or through ``n_forks`` forks merged
    with icechunk's ``Session.merge``; no pool, no coordinator; one commit."""
    from benchmarks.ingest import peak_rss_mb

    repos = _Repos()
    try:
        repo = repos.new()
        session = repo.writable_session("main")
        zarr.create_array(session.store, name="v", shape=(n_tasks,), chunks=(1,), dtype="f4")
        session.commit("array")
        rss0 = peak_rss_mb()
        t0 = time.perf_counter()
        session = repo.writable_session("main")
        step = n_tasks // n_forks if n_forks else 10_000
        for start in range(0, n_tasks, step):
            target = session.fork() if n_forks else session
            zarr.open_array(target.store, path="v", mode="r+")[start : start + step] = 1.0
            if n_forks:
                session.merge(target)
        before_commit = peak_rss_mb() - rss0
        session.commit("floor")
        return {"n_tasks": n_tasks, "forks": n_forks, "seconds": time.perf_counter() - t0,
                "rss_growth_before_commit_mb": before_commit,
                "rss_growth_mb": peak_rss_mb() - rss0,
                **_s4_result(repo, n_tasks)}  # fmt: skip
    finally:
        repos.close()


def merge_commit(n_chunks: int, n_forks: int = 100) -> dict[str, float]:
    """Time ``merge_sessions`` + commit of ``n_chunks`` chunk references from ``n_forks`` forks."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    repos = _Repos()
    try:
        repo = repos.new()
        session = repo.writable_session("main")
        zarr.create_array(session.store, name="v", shape=(n_chunks,), chunks=(1,), dtype="f4")
        session.commit("array")
        mem = zarr.storage.MemoryStore()
        scratch = zarr.create_array(mem, name="x", shape=(1,), chunks=(1,), dtype="f4")
        scratch[0] = 1.0
        payload = sync(mem.get("x/c/0", default_buffer_prototype()))
        session = icd.writable_session(repo)
        results = []
        per_fork = n_chunks // n_forks
        with session.allow_pickling() as snapshot:
            for k in range(n_forks):
                task = pickle.loads(pickle.dumps(snapshot))
                store = task.store
                keys = [f"v/c/{i}" for i in range(k * per_fork, (k + 1) * per_fork)]

                async def put(store: Any = store, keys: list[str] = keys) -> None:
                    await asyncio.gather(*(store.set(key, payload) for key in keys))

                sync(put())
                results.append(pickle.loads(pickle.dumps(task)))
        t0 = time.perf_counter()
        icd.merge_sessions(session, *results)
        t_merge = time.perf_counter() - t0
        session.commit("many chunks")
        seconds = time.perf_counter() - t0
        return {"chunks": per_fork * n_forks, "forks": n_forks, "merge_s": t_merge,
                "seconds": seconds}  # fmt: skip
    finally:
        repos.close()


def _s4_subprocess(kind: str, n_tasks: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.scenarios", kind, str(n_tasks)],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"S4 {kind} {n_tasks} failed:\n{out.stderr[-3000:]}")
    point: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return point


def _s4_summary(n_tasks: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    return {
        "n_tasks": n_tasks,
        "seconds": med("seconds"),
        "runs": [r["seconds"] for r in runs],
        "coordinator_us_per_task": med("coordinator_us_per_task"),
        "rss_growth_mb": med("rss_growth_mb"),
        "commits": runs[0]["commits"],
    }


def s4(
    sizes: list[int], chunks: int, repeat: int = 1, hand_max: int | None = None
) -> dict[str, Any]:
    """Ours against the hand-written loop at each size, alternating, each run a fresh process.

    ``repeat`` runs per contender below :data:`S4_ONCE_FROM` tasks, one from there on; the
    hand-written loop runs up to ``hand_max`` tasks. Both commit the same zarr metadata, the
    same values and the same number of snapshots (checked here).
    """
    hand_max = S4_HAND_MAX if hand_max is None else hand_max
    ours, hand, versus, skipped = [], [], [], []
    for n in sizes:
        runs: dict[str, list[dict[str, Any]]] = {"s4-point": [], "s4-hand": []}
        for _ in range(repeat if n < S4_ONCE_FROM else 1):
            for kind in runs:
                if kind == "s4-hand" and n > hand_max:
                    continue
                runs[kind].append(_s4_subprocess(kind, n))
                print(f"S4   {n:>7} tasks, {'ours' if kind == 's4-point' else 'hand'}: "
                      f"{runs[kind][-1]['seconds']:.2f} s", flush=True)  # fmt: skip
        first = runs["s4-point"][0]
        for point in runs["s4-point"] + runs["s4-hand"]:
            assert point["zarr_metadata"] == first["zarr_metadata"], (point, first)
            assert point["commits"] == first["commits"], (point, first)
        ours.append(_s4_summary(n, runs["s4-point"]))
        if not runs["s4-hand"]:
            skipped.append(n)
            continue
        hand.append(_s4_summary(n, runs["s4-hand"]))
        versus.append(
            {
                "n_tasks": n,
                "ours_over_hand": ours[-1]["seconds"] / hand[-1]["seconds"],
                "pairs": [o / h for o, h in zip(ours[-1]["runs"], hand[-1]["runs"], strict=True)],
            }
        )
    return {
        "tasks": ours,
        "hand": hand,
        "ours_over_hand": versus,
        "hand_skipped_at": skipped,
        "merge_commit": merge_commit(chunks),
    }


def plot_s4(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("S4   (no plot: pip install matplotlib)")
        return None
    n = [p["n_tasks"] for p in result["tasks"]]
    hand = result.get("hand", [])
    versus = result.get("ours_over_hand", [])
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.5))
    a.loglog(n, [p["seconds"] for p in result["tasks"]], "o-", label="ours")
    if hand:
        a.loglog([p["n_tasks"] for p in hand], [p["seconds"] for p in hand], "s--",
                 label="hand-written loop")  # fmt: skip
    a.set(xlabel="tasks", ylabel="wall time (s)", title="time vs tasks (threads, 2 cores)")
    a.legend()
    b.semilogx(
        n, [p["coordinator_us_per_task"] for p in result["tasks"]], "o-", label="CPU/task (us)"
    )
    b.semilogx(n, [p["rss_growth_mb"] for p in result["tasks"]], "s-", label="peak RSS growth (MB)")
    b.set(xlabel="tasks", title="coordinator cost (ours)")
    b.legend()
    if versus:
        c.semilogx([v["n_tasks"] for v in versus], [v["ours_over_hand"] for v in versus], "o-",
                   label="ours / hand-written")  # fmt: skip
    c.axhline(1.2, color="grey", linestyle=":", label="target 1.2x")
    top = max([1.2] + [v["ours_over_hand"] for v in versus])
    c.set(xlabel="tasks", ylabel="wall time ratio", title="ours / hand-written loop")
    c.set_ylim(0, 1.15 * top)
    c.legend()
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


if __name__ == "__main__":
    if sys.argv[1:2] == ["s4-point"]:
        print(json.dumps(s4_point(int(sys.argv[2]))))
    elif sys.argv[1:2] == ["s4-hand"]:
        print(json.dumps(s4_hand_point(int(sys.argv[2]))))
    elif sys.argv[1:2] == ["s4-floor"]:  # s4-floor N [forks]
        print(json.dumps(s4_floor(int(sys.argv[2]), int((sys.argv[3:4] or ["0"])[0]))))
