"""S5: many netCDF files into one new Icechunk repository (issue 13, item 6).

96 daily files of 24 hourly steps on a 192 x 384 grid: a float32 ``t2m`` and an int16-packed
``tp`` (``scale_factor``, ``add_offset``, ``_FillValue``), dims (time, lat, lon), a time
coordinate. 1.02 GB on disk (uncompressed, as ``to_netcdf(engine="h5netcdf")`` writes them),
1.36 GB decoded. They are generated once into ``benchmarks/.cache/`` and reused.

ours      ``icd.ingest(glob, repo, concat_dim="time", executor="processes", workers=W,
          chunks={"time": 24})``: the process pool is started inside the timed call.
baseline  ``xr.open_mfdataset(files, engine="h5netcdf", combine="by_coords", parallel=True,
          chunks={"time": 24})`` + ``icechunk.xarray.to_icechunk`` + commit, on a dask
          ``LocalCluster`` of W single-threaded worker processes (loopback only); starting the
          cluster is timed separately and left out of its time.

Each run is a fresh Python process (``python -m benchmarks.ingest ours|dask ...``), so its peak
RSS (``VmHWM``) is the coordinator's: the dask client process includes the scheduler, which
``LocalCluster`` runs there. CPU seconds add up that process and all its descendants (on a
shared machine they vary less than wall times). Every repository is compared with the first
one written (zarr metadata and raw stored values; once, ours against dask's, encodings and
``xr.testing.assert_identical`` of the decoded data), and the first against the source files;
any difference fails the benchmark.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
STEPS = 24  # hourly steps per daily file
VERSION = 1  # of the generated data: bump to regenerate caches

FULL = {"n_files": 96, "nlat": 192, "nlon": 384}
SMOKE = {"n_files": 4, "nlat": 12, "nlon": 20}

TP_ENCODING = {
    "dtype": "int16",
    "scale_factor": np.float32(2e-5),
    "add_offset": np.float32(0.6),
    "_FillValue": np.int16(-32767),
}


# -- the source files ----------------------------------------------------------------------------


def day(i: int, nlat: int, nlon: int) -> Any:
    """Day ``i``: 24 hourly steps of ``t2m`` (float32) and ``tp`` (to be packed as int16)."""
    import pandas as pd
    import xarray as xr

    rng = np.random.default_rng(i)
    lat = np.linspace(90, -90, nlat, dtype="f4")
    lon = np.linspace(0, 360, nlon, endpoint=False, dtype="f4")
    hours = np.arange(i * STEPS, (i + 1) * STEPS)
    time_ = pd.Timestamp("2020-01-01") + pd.to_timedelta(hours, unit="h")
    phase = (2 * np.pi * hours / 24).astype("f4")[:, None, None]
    coslat = np.cos(np.deg2rad(lat))[None, :, None]
    wave = np.sin(np.deg2rad(lon) * 3)[None, None, :]
    shape = (STEPS, nlat, nlon)
    t2m = 250 + 40 * coslat + 5 * np.sin(phase + np.deg2rad(lon)[None, None, :]) + wave
    t2m = (t2m + rng.standard_normal(shape, dtype="f4")).astype("f4")
    rain = np.sin(phase / 3 + wave * 2) * coslat + rng.standard_normal(shape, dtype="f4") - 0.6
    tp = np.maximum(rain, 0).astype("f4") * 0.02  # metres, about 60% dry
    tp[:, : max(1, nlat // 20), : max(1, nlon // 10)] = np.nan  # a missing block: _FillValue
    return xr.Dataset(
        {
            "t2m": (("time", "lat", "lon"), t2m, {"units": "K", "long_name": "2 m temperature"}),
            "tp": (("time", "lat", "lon"), tp, {"units": "m", "long_name": "Total precipitation"}),
        },
        coords={
            "time": ("time", time_),
            "lat": ("lat", lat, {"units": "degrees_north"}),
            "lon": ("lon", lon, {"units": "degrees_east"}),
        },
        attrs={"source": "icechunk-distributed benchmark S5", "day": i},
    )


def _write_day(arg: tuple[str, int, int, int]) -> int:
    path, i, nlat, nlon = arg
    ds = day(i, nlat, nlon)
    ds["time"].encoding.update({"units": "hours since 2020-01-01", "dtype": "int64"})
    tmp = path + ".part"
    ds.to_netcdf(tmp, engine="h5netcdf", encoding={"tp": TP_ENCODING})
    os.replace(tmp, path)
    return os.path.getsize(path)


def source_files(n_files: int, nlat: int, nlon: int, workers: int = 2) -> list[str]:
    """The files, from the cache when it holds a complete set, else generated there."""
    where = CACHE / f"s5-v{VERSION}-{n_files}x{STEPS}x{nlat}x{nlon}"
    names = [str(where / f"era_{i:03d}.nc") for i in range(n_files)]
    marker = where / "COMPLETE"
    if marker.exists():
        sizes = json.loads(marker.read_text())
        if all(os.path.exists(p) and os.path.getsize(p) == sizes.get(p) for p in names):
            return names
    where.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    t0 = time.perf_counter()
    args = [(p, i, nlat, nlon) for i, p in enumerate(names)]
    if n_files * nlat * nlon > 1_000_000 and workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            sizes = dict(zip(names, pool.map(_write_day, args), strict=True))
    else:
        sizes = dict(zip(names, map(_write_day, args), strict=True))
    marker.write_text(json.dumps(sizes))
    print(
        f"S5   generated {n_files} files, {sum(sizes.values()) / 1e9:.2f} GB, in {where} "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return names


# -- the contenders, each in a fresh process -----------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak RSS. ``VmHWM``, where there is one: ``ru_maxrss`` survives
    ``exec``, so a child started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class CpuMeter:
    """CPU seconds of this process and its descendants (pool workers, dask workers and
    nanny), from ``start()`` to ``stop()``: sampled every 0.2 s with psutil, since
    ``RUSAGE_CHILDREN`` misses processes a forkserver starts. Load on a shared machine
    stretches wall times; CPU seconds stay comparable. None without psutil."""

    def __init__(self) -> None:
        import threading

        self.base: dict[int, float] = {}
        self.seen: dict[int, float] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _sample() -> dict[int, float]:
        import psutil

        me = psutil.Process()
        out = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def _loop(self) -> None:
        while not self.done.wait(0.2):
            self.seen.update(self._sample())

    def start(self) -> CpuMeter:
        try:
            self.base = self._sample()
        except ImportError:
            return self
        self.seen = dict(self.base)
        self.thread.start()
        return self

    def stop(self) -> dict[str, float | None]:
        if not self.thread.is_alive():
            return {"cpu_seconds": None, "coordinator_cpu_seconds": None}
        self.seen.update(self._sample())
        self.done.set()
        self.thread.join()
        me = os.getpid()
        total = sum(t - self.base.get(pid, 0.0) for pid, t in self.seen.items())
        return {"cpu_seconds": total, "coordinator_cpu_seconds": self.seen[me] - self.base[me]}


def run_ours(pattern: str, repo_path: str, workers: int) -> dict[str, Any]:
    import icechunk

    import icechunk_distributed as icd

    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(repo_path))
    rss0 = peak_rss_mb()
    meter = CpuMeter().start()
    t0 = time.perf_counter()
    result = icd.ingest(
        pattern, repo, concat_dim="time", executor="processes", workers=workers,
        chunks={"time": STEPS}, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    cpu = meter.stop()
    assert result.write is not None
    return {
        "seconds": seconds,
        "scan_seconds": result.scan_seconds,
        "write_seconds": result.write.seconds,
        "tasks": len(result.write.tasks),
        "task_seconds": sum(t.seconds for t in result.write.tasks),
        "files": len(result.files),
        "regions": result.write.n_regions,
        "bytes_written": result.write.bytes_written,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": rss0,
        **cpu,
    }


def run_dask(pattern: str, repo_path: str, workers: int) -> dict[str, Any]:
    import glob

    import icechunk
    import xarray as xr
    from distributed import Client, LocalCluster
    from icechunk.xarray import to_icechunk

    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(repo_path))
    rss0 = peak_rss_mb()
    t_start = time.perf_counter()
    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
        host="127.0.0.1",
    )  # fmt: skip
    client = Client(cluster)
    client.wait_for_workers(workers)
    startup = time.perf_counter() - t_start
    try:
        meter = CpuMeter().start()
        t0 = time.perf_counter()
        files = sorted(glob.glob(pattern))  # what open_mfdataset does with a glob
        ds = xr.open_mfdataset(
            files, engine="h5netcdf", combine="by_coords", parallel=True, chunks={"time": STEPS}
        )
        opened = time.perf_counter() - t0
        session = repo.writable_session("main")
        to_icechunk(ds, session)
        session.commit("open_mfdataset + to_icechunk")
        seconds = time.perf_counter() - t0
        cpu = meter.stop()
        ds.close()
    finally:
        client.close()
        cluster.close()
    return {
        "seconds": seconds,
        "startup_seconds": startup,
        "open_seconds": opened,
        "files": len(files),
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": rss0,
        **cpu,
    }


def contender(kind: str, pattern: str, repo_path: str, workers: int) -> dict[str, Any]:
    """Run one contender in a fresh Python process; its measurements."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.ingest", kind, pattern, repo_path, str(workers)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"S5 {kind} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- checks --------------------------------------------------------------------------------------


def _open(repo_path: str) -> Any:
    import icechunk

    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(repo_path))
    return repo.readonly_session("main").store


def _metadata(array: Any) -> dict[str, Any]:
    meta = array.metadata.to_dict()
    return {k: v for k, v in meta.items() if k not in ("attributes",)} | {
        "attributes": dict(array.attrs)
    }


def same_store(a_path: str, b_path: str, *, decoded: bool = True) -> None:
    """Fail unless the two repositories hold the same dataset: the same arrays, zarr metadata
    and attributes, the same raw stored values (``tp``: the packed int16), and, with
    ``decoded``, ``xr.testing.assert_identical`` of what ``xr.open_zarr`` gives (the same
    encodings too). Slabs of 8 chunks bound the memory."""
    import xarray as xr
    import zarr

    a, b = zarr.open_group(_open(a_path), mode="r"), zarr.open_group(_open(b_path), mode="r")
    names = sorted(a.array_keys())
    if names != sorted(b.array_keys()):
        raise AssertionError(f"S5: arrays differ: {names} != {sorted(b.array_keys())}")
    if dict(a.attrs) != dict(b.attrs):
        raise AssertionError(f"S5: group attributes differ: {dict(a.attrs)} != {dict(b.attrs)}")
    for name in names:
        x, y = a[name], b[name]
        mx, my = _metadata(x), _metadata(y)
        if mx != my:
            diff = {
                k: (mx.get(k), my.get(k)) for k in mx.keys() | my.keys() if mx.get(k) != my.get(k)
            }
            raise AssertionError(f"S5: zarr metadata of {name!r} differs: {diff}")
        step = x.chunks[0] * 8
        for start in range(0, x.shape[0], step):
            sl = slice(start, start + step)
            if not np.array_equal(x[sl], y[sl], equal_nan=x.dtype.kind == "f"):
                raise AssertionError(f"S5: stored values of {name!r} differ (from index {start})")
    if not decoded:
        return
    da = xr.open_zarr(_open(a_path), consolidated=False, chunks=None)
    db = xr.open_zarr(_open(b_path), consolidated=False, chunks=None)
    for name in da.variables:
        ea = {k: v for k, v in da[name].encoding.items() if k != "preferred_chunks"}
        eb = {k: v for k, v in db[name].encoding.items() if k != "preferred_chunks"}
        if repr(ea) != repr(eb):
            raise AssertionError(f"S5: encoding of {name!r} differs: {ea} != {eb}")
    step = STEPS * 8
    for start in range(0, da.sizes["time"], step):
        part = {"time": slice(start, start + step)}
        xr.testing.assert_identical(da.isel(part).load(), db.isel(part).load())


def matches_sources(repo_path: str, files: list[str]) -> None:
    """Fail unless the store holds what the files hold (decoded, and tp's raw int16)."""
    import xarray as xr
    import zarr

    stored = xr.open_zarr(_open(repo_path), consolidated=False, chunks=None)
    with xr.open_dataset(files[0], engine="h5netcdf") as first:
        if stored.attrs != first.attrs:  # open_mfdataset keeps the first file's
            raise AssertionError(f"S5: global attributes {stored.attrs} != {first.attrs}")
    raw_tp = zarr.open_array(_open(repo_path), path="tp", mode="r")
    if stored.sizes["time"] != len(files) * STEPS:
        raise AssertionError(
            f"S5: {stored.sizes['time']} time steps stored, not {len(files) * STEPS}"
        )
    picks = sorted({0, len(files) // 2, len(files) - 1})
    for i in picks:
        part = slice(i * STEPS, (i + 1) * STEPS)
        with xr.open_dataset(files[i], engine="h5netcdf") as src:
            got = stored.isel(time=part).load()
            # global attrs: the first file's (as open_mfdataset); tp decodes to float64 from
            # zarr (its scale_factor is a JSON number there), to float32 from the netCDF file
            xr.testing.assert_identical(
                got.drop_vars("tp").drop_attrs(deep=False),
                src.drop_vars("tp").drop_attrs(deep=False),
            )
            assert got["tp"].attrs == src["tp"].attrs, (got["tp"].attrs, src["tp"].attrs)
            np.testing.assert_allclose(
                got["tp"].values, src["tp"].values, rtol=1e-6, atol=1e-7, err_msg=f"S5 tp {i}"
            )
        with xr.open_dataset(files[i], engine="h5netcdf", mask_and_scale=False) as src:
            np.testing.assert_array_equal(raw_tp[part], src["tp"].values, err_msg=f"S5 tp {i}")


# -- the scenario --------------------------------------------------------------------------------


class S5:
    """Ours against open_mfdataset + to_icechunk on dask, W workers each, fresh processes."""

    OURS, DASK = "ours (processes)", "to_icechunk (dask)"

    def __init__(self, smoke: bool = False, workers: int | None = None) -> None:
        self.size = SMOKE if smoke else FULL
        self.workers = workers or os.cpu_count() or 2
        self.files = source_files(**self.size, workers=self.workers)
        self.pattern = str(Path(self.files[0]).parent / "era_*.nc")
        self.disk_bytes = sum(os.path.getsize(p) for p in self.files)
        n = self.size["n_files"] * STEPS * self.size["nlat"] * self.size["nlon"]
        self.decoded_bytes = n * 8  # t2m and tp, float32 each as read from the files
        self.root = tempfile.mkdtemp(prefix="icd-bench-s5-")
        self.n = 0
        self.reference: tuple[str, str] | None = None  # (kind, path) of the first run
        self.compared_decoded = False
        self.runs: dict[str, list[dict[str, Any]]] = {self.OURS: [], self.DASK: []}

    def __enter__(self) -> S5:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, name: str, kind: str) -> float:
        self.n += 1
        path = os.path.join(self.root, f"r{self.n}-{kind}")
        load = os.getloadavg()[0]
        result = contender(kind, self.pattern, path, self.workers)
        result["loadavg_before"] = load
        t0 = time.perf_counter()
        if self.reference is None:
            matches_sources(path, self.files)
            self.reference = (kind, path)
        else:
            # Decoded through xarray once, ours against dask; raw stored values and zarr
            # metadata every time (together they fix the decoded data).
            decoded = not self.compared_decoded and kind != self.reference[0]
            same_store(self.reference[1], path, decoded=decoded)
            self.compared_decoded |= decoded
            shutil.rmtree(path)
        result["check_seconds"] = time.perf_counter() - t0
        self.runs[name].append(result)
        return float(result["seconds"])

    def contenders(self) -> dict[str, Callable[[], float]]:
        return {
            self.OURS: lambda: self._run(self.OURS, "ours"),
            self.DASK: lambda: self._run(self.DASK, "dask"),
        }

    def report(self) -> dict[str, Any]:
        import statistics

        def med(name: str, key: str) -> float:
            return statistics.median(float(r[key]) for r in self.runs[name])

        def cpu(name: str, key: str) -> float | None:
            got = [r[key] for r in self.runs[name] if r.get(key) is not None]
            return statistics.median(got) if got else None

        ours_s, dask_s = med(self.OURS, "seconds"), med(self.DASK, "seconds")
        ours_cpu, dask_cpu = cpu(self.OURS, "cpu_seconds"), cpu(self.DASK, "cpu_seconds")
        return {
            "files": len(self.files),
            "file_shape": [STEPS, self.size["nlat"], self.size["nlon"]],
            "disk_bytes": self.disk_bytes,
            "decoded_bytes": self.decoded_bytes,
            "workers": self.workers,
            "ours_s": ours_s,
            "ours_scan_s": med(self.OURS, "scan_seconds"),
            "dask_s": dask_s,
            "dask_open_s": med(self.DASK, "open_seconds"),
            "dask_startup_s": med(self.DASK, "startup_seconds"),
            "ours_over_dask": ours_s / dask_s,
            "ours_over_dask_with_startup": ours_s / (dask_s + med(self.DASK, "startup_seconds")),
            "ours_cpu_s": ours_cpu,
            "dask_cpu_s": dask_cpu,
            "ours_over_dask_cpu": ours_cpu / dask_cpu if ours_cpu and dask_cpu else None,
            "ours_coordinator_cpu_s": cpu(self.OURS, "coordinator_cpu_seconds"),
            "dask_coordinator_cpu_s": cpu(self.DASK, "coordinator_cpu_seconds"),
            "ours_peak_rss_mb": med(self.OURS, "peak_rss_mb"),
            "dask_peak_rss_mb": med(self.DASK, "peak_rss_mb"),
            "ours_mb_per_s": self.disk_bytes / 1e6 / ours_s,
            "dask_mb_per_s": self.disk_bytes / 1e6 / dask_s,
            "compared_decoded": self.compared_decoded,
            "runs": self.runs,
        }

    def print_summary(self) -> None:
        r = self.report()
        print(
            f"S5   {r['files']} files, {r['disk_bytes'] / 1e9:.2f} GB on disk, "
            f"{r['workers']} workers: ours {r['ours_s']:.1f} s (scan {r['ours_scan_s']:.1f} s, "
            f"{r['ours_mb_per_s']:.0f} MB/s, peak RSS {r['ours_peak_rss_mb']:.0f} MB); dask "
            f"{r['dask_s']:.1f} s + {r['dask_startup_s']:.1f} s cluster start-up (open "
            f"{r['dask_open_s']:.1f} s, {r['dask_mb_per_s']:.0f} MB/s, peak RSS "
            f"{r['dask_peak_rss_mb']:.0f} MB); ours/dask {r['ours_over_dask']:.2f}x"
        )
        if r["ours_over_dask_cpu"] is not None:
            print(
                f"S5   CPU seconds, all processes: ours {r['ours_cpu_s']:.1f}, dask "
                f"{r['dask_cpu_s']:.1f} (ours/dask {r['ours_over_dask_cpu']:.2f}x); coordinator "
                f"{r['ours_coordinator_cpu_s']:.1f} / {r['dask_coordinator_cpu_s']:.1f}"
            )


if __name__ == "__main__":
    os.environ.setdefault("ICECHUNK_LOG", "error")
    kind, pattern, repo_path, workers = sys.argv[1:5]
    run = {"ours": run_ours, "dask": run_dask}[kind]
    print(json.dumps(run(pattern, repo_path, int(workers))))
