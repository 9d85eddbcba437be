"""The benchmark scenarios and the baselines they are compared with.

S1 many small regions (240 x 205x275 float32, 54 MB): ours on threads and processes against
   the documented per-region ``Dataset.to_zarr(region=...)`` pattern on the same executors,
   and the raw floor (zstd-compress the same bytes and write files from one process).
S3 Lithops localhost, 240 regions: ours against the documented one-call-per-region pattern
   and the best hand-batched version (a few calls, zarr array assignment).
S4 coordinator scaling: many tiny regions on threads (coordinator CPU per task, peak RSS
   growth), and merge + commit time for many chunk references.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import icechunk
import numpy as np
import xarray as xr
import zarr

import icechunk_distributed as icd
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

BY, BX = 2048, 2048  # 16 MiB float32 per time step


def bulk(start: int, stop: int) -> np.ndarray:
    t = np.arange(start, stop, dtype="f4")[:, None, None]
    row = np.linspace(0, 1, BX, dtype="f4")
    col = np.linspace(0, 1, BY, dtype="f4")[:, None]
    return np.ascontiguousarray((np.sin(t / 7) + row * col).astype("f4"))


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


def plain_zarr_task(arg: tuple[str, int]) -> int:
    path, i = arg
    array = zarr.open_array(zarr.storage.LocalStore(path), path="Tair", mode="r+")
    array[i : i + 1] = bulk(i, i + 1)
    return i


class S2:
    """About 1 GiB in 64 regions of 16 MiB: ours on processes, dask and ray against
    ``icechunk.xarray.to_icechunk`` on a dask LocalCluster, and plain zarr without Icechunk."""

    def __init__(
        self, n_regions: int = 64, engines: tuple[str, ...] = ("processes", "dask", "ray")
    ):
        from distributed import Client, LocalCluster

        self.n = n_regions
        self.repos = _Repos()
        self.processes = FuturesAdapter.processes(2)
        self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0")
        self.client = Client(self.cluster, set_as_default=False)
        self.engines = engines
        self.ray = None
        if "ray" in engines:
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            self.ray = ray

    def __enter__(self) -> S2:
        list(self.processes.executor.map(abs, range(4)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.processes.close()
        self.client.close()
        self.cluster.close()
        if self.ray is not None:
            self.ray.shutdown()
        self.repos.close()

    @property
    def nbytes(self) -> int:
        return self.n * BY * BX * 4

    def _check(self, store: Any) -> None:
        array = zarr.open_array(store, path="Tair", mode="r")
        for i in (0, self.n // 2, self.n - 1):
            np.testing.assert_array_equal(array[i : i + 1], bulk(i, i + 1))

    def _ours(self, executor: Any) -> float:
        repo = self.repos.new()
        t0 = time.perf_counter()
        icd.run_region_writes(bulk_load, repo, template=bulk_template(self.n), executor=executor,
                              task_size=1, progress=False)  # fmt: skip
        seconds = time.perf_counter() - t0
        self._check(repo.readonly_session("main").store)
        shutil.rmtree(os.path.join(self.repos.root, f"r{self.repos.n}"))
        return seconds

    def _to_icechunk(self) -> float:
        from icechunk.xarray import to_icechunk

        repo = self.repos.new()
        t0 = time.perf_counter()
        session = repo.writable_session("main")
        import dask

        with dask.config.set(scheduler=self.client.get):
            to_icechunk(bulk_template(self.n), session)
        session.commit("to_icechunk")
        seconds = time.perf_counter() - t0
        self._check(repo.readonly_session("main").store)
        shutil.rmtree(os.path.join(self.repos.root, f"r{self.repos.n}"))
        return seconds

    def _plain_zarr(self, engine: str) -> float:
        path = tempfile.mkdtemp(dir=self.repos.root)
        t0 = time.perf_counter()
        bulk_template(self.n).to_zarr(zarr.storage.LocalStore(path), compute=False,
                                      consolidated=False)  # fmt: skip
        args = [(path, i) for i in range(self.n)]
        if engine == "processes":
            list(self.processes.executor.map(plain_zarr_task, args))
        elif engine == "dask":
            self.client.gather(self.client.map(plain_zarr_task, args, pure=False))
        else:
            assert self.ray is not None
            task = self.ray.remote(plain_zarr_task)
            self.ray.get([task.remote(a) for a in args])
        seconds = time.perf_counter() - t0
        self._check(zarr.storage.LocalStore(path))
        shutil.rmtree(path)
        return seconds

    def contenders(self) -> dict[str, Callable[[], float]]:
        out: dict[str, Callable[[], float]] = {}
        if "processes" in self.engines:
            out["ours (processes)"] = lambda: self._ours(self.processes)
        if "dask" in self.engines:
            out["ours (dask)"] = lambda: self._ours(self.client)
        if "ray" in self.engines:
            out["ours (ray)"] = lambda: self._ours("ray")
        out["to_icechunk (dask)"] = self._to_icechunk
        for engine in self.engines:
            out[f"plain zarr ({engine})"] = functools.partial(self._plain_zarr, engine)
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


def _tiny_load(region: dict[str, slice]) -> xr.Dataset:
    s = region["i"]
    return xr.Dataset({"v": (("i",), np.full(s.stop - s.start, 1.0, dtype="f4"))})


def s4_point(n_tasks: int) -> dict[str, float]:
    """One S4 measurement (run in a fresh process so peak RSS means something)."""
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
        seconds = time.perf_counter() - t0
        cpu = time.thread_time() - cpu0
        rss = peak_rss_mb()
        got = zarr.open_array(repo.readonly_session("main").store, path="v")[:]
        assert (got == 1).all()
        return {
            "n_tasks": n_tasks,
            "seconds": seconds,
            "coordinator_us_per_task": cpu / n_tasks * 1e6,
            "rss_growth_mb": rss - rss0,
        }
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


def s4(sizes: list[int], chunks: int) -> dict[str, Any]:
    points = []
    for n in sizes:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.scenarios", "s4-point", str(n)],
            capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent,
        )  # fmt: skip
        points.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"tasks": points, "merge_commit": merge_commit(chunks)}


def plot_s4(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("S4   (no plot: pip install matplotlib)")
        return None
    n = [p["n_tasks"] for p in result["tasks"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.loglog(n, [p["seconds"] for p in result["tasks"]], "o-")
    a.set(xlabel="tasks", ylabel="wall time (s)", title="time vs tasks (threads, 2 cores)")
    b.semilogx(
        n, [p["coordinator_us_per_task"] for p in result["tasks"]], "o-", label="CPU/task (us)"
    )
    b.semilogx(n, [p["rss_growth_mb"] for p in result["tasks"]], "s-", label="peak RSS growth (MB)")
    b.set(xlabel="tasks", title="coordinator cost")
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


if __name__ == "__main__":
    if sys.argv[1:2] == ["s4-point"]:
        print(json.dumps(s4_point(int(sys.argv[2]))))
