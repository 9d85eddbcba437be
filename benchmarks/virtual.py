"""S6: 1,000 small netCDF4 files referenced from one new Icechunk repository (virtual ingest).

1,000 daily files of 24 hourly steps on a 10 x 20 grid: two float32 variables ``t2m`` and
``u10``, dims (time, lat, lon), HDF5-chunked (12, 10, 20) with zlib, a time coordinate in
"hours since 2020-01-01", consecutive days. 50 KB each, 50 MB in all; 4,000 chunks to
reference (2 variables x 2 chunks x 1,000 files). Generated once into ``benchmarks/.cache/``
(``--smoke``: 20 files) and reused.

ours      ``icd.ingest(files, repo, concat_dim="time", virtual=True, executor="processes",
          workers=W)``: the process pool is started inside the timed call.
baseline  ``virtualizarr.open_virtual_mfdataset(urls, parser=HDFParser(), parallel=pool,
          combine="nested", concat_dim="time", coords="minimal", compat="override",
          data_vars="minimal", join="override")`` on a ``ProcessPoolExecutor(W)`` (forkserver;
          started inside the timed call), then ``vds.vz.to_icechunk(session.store)`` and
          ``session.commit()``.

Both repositories get a virtual chunk container for the files' directory. Each run is a fresh
Python process (``python -m benchmarks.virtual ours|baseline DIR N REPO W``), so its peak RSS
(``VmHWM``) is the coordinator's (the client's); CPU seconds add up that process and its
descendants. Checks, any failure of which fails the benchmark: the first repository decodes to
what ``xr.open_mfdataset(files)`` gives (``xr.testing.assert_identical``); every later one holds
the same arrays and, for every referenced array, the same zarr metadata and the same reference
(file, offset, length) for every chunk as the first (read with VirtualiZarr's
``IcechunkParser``); ours and the baseline decode to identical datasets. Differences in the
zarr metadata of the arrays stored as bytes (the coordinates: codecs, chunks) are reported,
not failed: the two contenders choose them differently.

The coordinator's peak RSS against the file count (the feature keeps manifests out of the
coordinator) is measured with single runs of both contenders on the first 250 and 500 files.
Where our time goes: ``python -m benchmarks.virtual profile [N [DIR [serial|processes]]]`` times
each step of ours (CPU seconds per file with ``serial``; the coordinator's wall-clock timeline
with ``processes``); the scenario records both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.ingest import CpuMeter, peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
STEPS = 24  # hourly steps per daily file
CHUNK = 12  # steps per HDF5 chunk
VERSION = 1  # of the generated data: bump to regenerate caches
VARIABLES = ("t2m", "u10")

FULL = {"n_files": 1000, "nlat": 10, "nlon": 20}
SMOKE = {"n_files": 20, "nlat": 10, "nlon": 20}
SCALING = {"full": (250, 500), "smoke": (10,)}  # file counts of the single RSS runs


# -- the source files ----------------------------------------------------------------------------


def day(i: int, nlat: int, nlon: int) -> Any:
    """Day ``i``: 24 hourly steps of ``t2m`` and ``u10`` (float32)."""
    import pandas as pd
    import xarray as xr

    rng = np.random.default_rng(i)
    lat = np.linspace(90, -90, nlat, dtype="f4")
    lon = np.linspace(0, 360, nlon, endpoint=False, dtype="f4")
    hours = np.arange(i * STEPS, (i + 1) * STEPS)
    time_ = pd.Timestamp("2020-01-01") + pd.to_timedelta(hours, unit="h")
    phase = (2 * np.pi * hours / 24).astype("f4")[:, None, None]
    coslat = np.cos(np.deg2rad(lat))[None, :, None]
    shape = (STEPS, nlat, nlon)
    t2m = 250 + 40 * coslat + 5 * np.sin(phase + np.deg2rad(lon)[None, None, :])
    t2m = (t2m + rng.standard_normal(shape, dtype="f4")).astype("f4")
    u10 = (5 * np.sin(phase / 2) + 2 * rng.standard_normal(shape, dtype="f4")).astype("f4")
    u10[:, 0, 0] = np.nan  # a missing column: the fill value
    return xr.Dataset(
        {
            "t2m": (("time", "lat", "lon"), t2m, {"units": "K", "long_name": "2 m temperature"}),
            "u10": (("time", "lat", "lon"), u10, {"units": "m s-1", "long_name": "10 m wind"}),
        },
        coords={
            "time": ("time", time_),
            "lat": ("lat", lat, {"units": "degrees_north"}),
            "lon": ("lon", lon, {"units": "degrees_east"}),
        },
        attrs={"source": "icechunk-distributed benchmark S6"},
    )


def _write_day(arg: tuple[str, int, int, int]) -> int:
    path, i, nlat, nlon = arg
    ds = day(i, nlat, nlon)
    ds["time"].encoding.update({"units": "hours since 2020-01-01", "dtype": "int64"})
    chunked = {"zlib": True, "complevel": 4, "chunksizes": (CHUNK, nlat, nlon)}
    tmp = path + ".part"
    ds.to_netcdf(tmp, engine="h5netcdf", encoding={v: chunked for v in VARIABLES})
    os.replace(tmp, path)
    return os.path.getsize(path)


def source_files(n_files: int, nlat: int, nlon: int, workers: int = 2) -> list[str]:
    """The files, from the cache when it holds a complete set, else generated there."""
    where = CACHE / f"s6-v{VERSION}-{n_files}x{STEPS}x{nlat}x{nlon}"
    names = [str(where / f"day_{i:04d}.nc") for i in range(n_files)]
    marker = where / "COMPLETE"
    if marker.exists():
        sizes = json.loads(marker.read_text())
        if all(os.path.exists(p) and os.path.getsize(p) == sizes.get(p) for p in names):
            return names
    where.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    t0 = time.perf_counter()
    args = [(p, i, nlat, nlon) for i, p in enumerate(names)]
    if n_files > 100 and workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            sizes = dict(zip(names, pool.map(_write_day, args, chunksize=20), strict=True))
    else:
        sizes = dict(zip(names, map(_write_day, args), strict=True))
    marker.write_text(json.dumps(sizes))
    print(
        f"S6   generated {n_files} files, {sum(sizes.values()) / 1e6:.0f} MB, in {where} "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return names


def listing(directory: str, n: int) -> list[str]:
    """The first ``n`` files of the directory, in order."""
    return sorted(str(p) for p in Path(directory).absolute().glob("day_*.nc"))[:n]


def prefix_of(directory: str) -> str:
    """The virtual chunk container's prefix for the files of ``directory``."""
    return Path(os.path.abspath(directory)).as_uri() + "/"


def create_repository(repo_path: str, directory: str) -> Any:
    """A new repository with a virtual chunk container for ``directory``."""
    import icechunk

    root = os.path.abspath(directory) + "/"
    config = icechunk.RepositoryConfig.default()
    config.set_virtual_chunk_container(
        icechunk.VirtualChunkContainer(prefix_of(directory), icechunk.local_filesystem_store(root))
    )
    return icechunk.Repository.create(icechunk.local_filesystem_storage(repo_path), config=config)


def open_repository(repo_path: str, directory: str) -> Any:
    """A repository, allowed to read the references to ``directory``'s files."""
    import icechunk

    return icechunk.Repository.open(
        icechunk.local_filesystem_storage(repo_path),
        authorize_virtual_chunk_access={
            prefix_of(directory): icechunk.credentials.LocalFileSystemAccess
        },
    )


# -- the contenders, each in a fresh process -----------------------------------------------------


def run_ours(directory: str, n: int, repo_path: str, workers: int) -> dict[str, Any]:
    import virtualizarr.parsers  # noqa: F401 - imported by both before the RSS baseline
    import xarray  # noqa: F401

    import icechunk_distributed as icd

    files = listing(directory, n)
    repo = create_repository(repo_path, directory)
    rss0 = peak_rss_mb()
    meter = CpuMeter().start()
    t0 = time.perf_counter()
    result = icd.ingest(
        files, repo, concat_dim="time", virtual=True, executor="processes", workers=workers,
        progress=False,
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
        "chunks": result.write.n_chunks,
        "files": len(result.files),
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": rss0,
        **cpu,
    }


def run_baseline(directory: str, n: int, repo_path: str, workers: int) -> dict[str, Any]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import virtualizarr
    import xarray  # noqa: F401
    from obspec_utils.registry import ObjectStoreRegistry
    from obstore.store import LocalStore
    from virtualizarr.parsers import HDFParser

    urls = [Path(p).as_uri() for p in listing(directory, n)]
    repo = create_repository(repo_path, directory)
    rss0 = peak_rss_mb()
    meter = CpuMeter().start()
    t0 = time.perf_counter()
    # An executor instance: VirtualiZarr 2.8 deprecates passing the class (it would make a
    # forkserver pool of os.cpu_count() workers itself). forkserver: icechunk hangs in a
    # forked child.
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        vds = virtualizarr.open_virtual_mfdataset(
            urls,
            registry=ObjectStoreRegistry({"file://": LocalStore()}),
            parser=HDFParser(),
            parallel=pool,
            combine="nested",
            concat_dim="time",
            coords="minimal",
            compat="override",
            data_vars="minimal",
            join="override",
        )
    opened = time.perf_counter() - t0
    session = repo.writable_session("main")
    vds.vz.to_icechunk(session.store)
    session.commit("open_virtual_mfdataset + to_icechunk")
    seconds = time.perf_counter() - t0
    cpu = meter.stop()
    return {
        "seconds": seconds,
        "open_seconds": opened,
        "files": len(urls),
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": rss0,
        **cpu,
    }


def contender(kind: str, directory: str, n: int, repo_path: str, workers: int) -> dict[str, Any]:
    """Run one contender in a fresh Python process; its measurements."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.virtual", kind, directory, str(n), repo_path,
         str(workers)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"S6 {kind} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- where our time goes -------------------------------------------------------------------------

# (names, step): the steps of a virtual ingest, timed by wrapping the library's callables of
# these names ("Class.method" or "function", the first that exists) wherever a module of
# icechunk_distributed binds them; private names, so a step the library no longer has is
# reported as not found. Parses are VirtualiZarr's HDFParser, wherever they are called from.
PROFILED: list[tuple[tuple[str, ...], str]] = [
    (("scan_files",), "scan: all files (on the executor)"),
    (("VirtualHeaderReader.__call__",), "scan: read one header"),
    (("read_hdf_header",), "header with h5py"),
    (("VirtualHeaderReader.parsed",), "header parsed (the reference)"),
    (("HDFParser.__call__",), "parse (HDFParser)"),
    (("load_arrays", "_open_loaded"), "load coordinates (xarray)"),
    (("virtual_template",), "plan: template (first file)"),
    (("RegionWriter.write_metadata",), "write metadata"),
    (("RegionWriter.run_tasks",), "tasks: all (on the executor)"),
    (("execute",), "task"),
    (("VirtualLoader.__call__",), "task: parse files -> references"),
    (("write_variables",), "task: write references to the fork"),
    (("check_inside",), "task: check chunks written"),
    (("merge_sessions",), "merge a fork"),
    (("RegionWriter.commit",), "commit"),
    (("FuturesAdapter.close",), "shut the process pool down"),
]
SPLIT = frozenset({"parse (HDFParser)", "load coordinates (xarray)"})  # timed per caller
_MODULES = (
    "virtual", "virtualscan", "hdfheader", "ingestion", "task", "writer", "scan",
    "adapters.local",
)  # fmt: skip


def _step_order(key: str) -> tuple[int, int]:
    order = {step: i for i, (_, step) in enumerate(PROFILED)}
    parent, _, child = key.partition(" > ")
    return order.get(parent, len(order)), order.get(child, -1) if child else -1


def _wrap(name: str, wrap: Callable[[Any], Any]) -> bool:
    """Replace every binding of ``name`` in icechunk_distributed (and HDFParser's method)."""
    import contextlib
    import importlib

    for module_name in _MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(f"icechunk_distributed.{module_name}")
    modules = [m for k, m in sys.modules.items() if k.startswith("icechunk_distributed") and m]
    owner_name, _, attr = name.rpartition(".")
    done = False
    if owner_name == "HDFParser":
        from virtualizarr.parsers import HDFParser

        setattr(HDFParser, attr, wrap(HDFParser.__dict__[attr]))
        return True
    for module in modules:
        if owner_name:
            owner = getattr(module, owner_name, None)
            own = isinstance(owner, type) and owner.__module__ == module.__name__
            if own and attr in vars(owner):
                setattr(owner, attr, wrap(vars(owner)[attr]))
                done = True
            continue
        fn = getattr(module, attr, None)
        ours = str(getattr(fn, "__module__", "")).startswith("icechunk_distributed")
        if callable(fn) and getattr(fn, "__name__", None) == attr and ours:
            setattr(module, attr, wrap(fn))
            done = True
    return done


def profile_ours(directory: str, n: int, executor: str = "serial") -> dict[str, Any]:
    """Ours on ``n`` files, each step timed by wrapping the callables of ``PROFILED``; nested
    steps count in their parents too (a parse inside a task).

    ``executor="serial"`` runs everything in this process and times CPU seconds
    (``time.process_time``): the work per file. ``"processes"`` (2 workers) times the
    coordinator's steps in wall seconds: the timeline of a real run (the steps inside
    workers are not seen)."""
    import functools

    import virtualizarr.parsers  # noqa: F401
    import xarray  # noqa: F401

    import icechunk_distributed as icd

    cpu: dict[str, float] = {}
    calls: dict[str, int] = {}
    stack: list[str] = []
    clock = time.process_time if executor == "serial" else time.perf_counter

    def timed(step: str) -> Callable[[Any], Any]:
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                # Parses happen in the scan, the template and the tasks: split them by caller.
                key = f"{stack[-1]} > {step}" if stack and step in SPLIT else step
                stack.append(key)
                t0 = clock()
                try:
                    return fn(*args, **kwargs)
                finally:
                    cpu[key] = cpu.get(key, 0.0) + clock() - t0
                    calls[key] = calls.get(key, 0) + 1
                    stack.pop()

            return wrapper

        return wrap

    missing = [
        "/".join(names)
        for names, step in PROFILED
        if not any(_wrap(name, timed(step)) for name in names)
    ]
    files = listing(directory, n)
    repo_path = tempfile.mkdtemp(prefix="icd-bench-s6-profile-")
    try:
        repo = create_repository(os.path.join(repo_path, "repo"), directory)
        t0, w0 = time.process_time(), time.perf_counter()
        icd.ingest(
            files, repo, concat_dim="time", virtual=True, executor=executor, workers=2,
            progress=False,
        )  # fmt: skip
        total, wall = time.process_time() - t0, time.perf_counter() - w0
    finally:
        shutil.rmtree(repo_path, ignore_errors=True)
    return {
        "files": n,
        "executor": executor,
        "clock": "cpu" if executor == "serial" else "wall",
        "cpu_seconds": total,  # of this process
        "wall_seconds": wall,
        "steps": {k: {"seconds": cpu[k], "calls": calls[k]} for k in sorted(cpu, key=_step_order)},
        "not_found": missing,
    }


def print_profile(p: dict[str, Any]) -> None:
    n, serial = p["files"], p["clock"] == "cpu"
    head = (
        f"{p['cpu_seconds']:.2f} CPU s ({1000 * p['cpu_seconds'] / n:.1f} ms per file)"
        if serial
        else f"{p['wall_seconds']:.2f} s wall; the coordinator's steps in wall seconds"
    )
    print(f"S6   ours, {p['executor']}, {n} files: {head}; nested steps count in their parents")
    for step, s in p["steps"].items():
        per = f"{1000 * s['seconds'] / n:>6.1f} ms/file" if serial else ""
        print(f"S6     {step:<62} {s['calls']:>5} calls {s['seconds']:>7.2f} s {per}")
    if p["not_found"]:
        print(f"S6     (not found, not timed: {', '.join(p['not_found'])})")


# -- checks --------------------------------------------------------------------------------------


def manifests(repo_path: str) -> dict[str, Any]:
    """Every array's ``ManifestArray`` (metadata and chunk references), as VirtualiZarr's
    ``IcechunkParser`` reads them from the repository; chunks stored in the repository
    appear under ``icechunk://native/``."""
    import icechunk
    from obspec_utils.registry import ObjectStoreRegistry
    from obstore.store import LocalStore
    from virtualizarr.parsers import IcechunkParser

    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(repo_path))
    store = IcechunkParser().parse_session(
        repo.readonly_session("main"),
        ObjectStoreRegistry({"file://": LocalStore()}),
        native_chunks_prefix="icechunk://native",
    )
    arrays: dict[str, Any] = dict(store._group.arrays)  # no public accessor of its group
    return arrays


def _is_virtual(array: Any) -> bool:
    return any(str(p).startswith("file://") for p in array.manifest._paths.flat)


def _meta(array: Any) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads(json.dumps(array.metadata.to_dict(), default=str))
    return meta


def _stored_values(repo_path: str, name: str) -> Any:
    """The raw values of an array stored as bytes (a coordinate) in the repository."""
    import icechunk
    import zarr

    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(repo_path))
    return zarr.open_array(repo.readonly_session("main").store, path=name, mode="r")[...]


def same_references(a_path: str, b_path: str) -> list[str]:
    """Fail unless both repositories hold the same arrays; for every referenced array, the
    same zarr metadata and the same (file, offset, length) for every chunk; for every array
    stored as bytes, the same raw values. Return the zarr metadata differences of the arrays
    stored as bytes (their codecs and chunks may differ between the contenders)."""
    a, b = manifests(a_path), manifests(b_path)
    if sorted(a) != sorted(b):
        raise AssertionError(f"S6: arrays differ: {sorted(a)} != {sorted(b)}")
    notes = []
    for name in sorted(a):
        x, y = a[name], b[name]
        mx, my = _meta(x), _meta(y)
        diff = {
            k: (mx.get(k), my.get(k))
            for k in sorted(mx.keys() | my.keys())
            if mx.get(k) != my.get(k)
        }
        virtual = _is_virtual(x), _is_virtual(y)
        if virtual[0] != virtual[1]:
            raise AssertionError(f"S6: {name!r} is referenced in one repository only")
        if not virtual[0]:
            notes += [f"{name}: {k}: {u} != {v}" for k, (u, v) in diff.items()]
            if not np.array_equal(_stored_values(a_path, name), _stored_values(b_path, name)):
                raise AssertionError(f"S6: the stored values of {name!r} differ")
            continue
        if diff:
            raise AssertionError(f"S6: zarr metadata of the referenced {name!r} differs: {diff}")
        mx_, my_ = x.manifest, y.manifest
        same = (
            (mx_._paths == my_._paths) & (mx_._offsets == my_._offsets)
            & (mx_._lengths == my_._lengths)
        )  # fmt: skip
        if not same.all():
            at = tuple(int(i) for i in np.argwhere(~same)[0])
            raise AssertionError(
                f"S6: {int((~same).sum())} chunk reference(s) of {name!r} differ, first at "
                f"{at}: {mx_.get_entry(at)} != {my_.get_entry(at)}"
            )
        if (mx_._paths == "").any():
            raise AssertionError(f"S6: {name!r} has chunks without a reference")
    return notes


def decoded(repo_path: str, directory: str) -> Any:
    """The dataset xarray decodes from the repository, loaded."""
    import xarray as xr

    repo = open_repository(repo_path, directory)
    store = repo.readonly_session("main").store
    with xr.open_zarr(store, consolidated=False, chunks=None) as ds:
        return ds.load()


def matches_sources(repo_path: str, directory: str, files: list[str]) -> None:
    """Fail unless the repository decodes to what ``xr.open_mfdataset(files)`` gives."""
    import xarray as xr

    got = decoded(repo_path, directory)
    with xr.open_mfdataset(
        files, engine="h5netcdf", combine="nested", concat_dim="time", coords="minimal",
        compat="override", data_vars="minimal", join="override", chunks=None,
    ) as want:  # fmt: skip
        xr.testing.assert_identical(got, want.load())


# -- the scenario --------------------------------------------------------------------------------


def source_state() -> dict[str, Any]:
    """The library's code measured: the commit, and a digest of uncommitted changes to src/."""
    import hashlib

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
        return out.stdout if out.returncode == 0 else ""

    diff = git("diff", "HEAD", "--", "src")
    untracked = git("ls-files", "--others", "--exclude-standard", "--", "src").split()
    digest = hashlib.sha256(diff.encode())
    for path in sorted(untracked):
        digest.update((ROOT / path).read_bytes())
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "uncommitted_src_sha256": digest.hexdigest() if diff or untracked else None,
        "untracked_src": untracked,
    }


class S6:
    """Ours against open_virtual_mfdataset + to_icechunk, W workers each, fresh processes."""

    OURS, BASELINE = "ours (virtual, processes)", "open_virtual_mfdataset"

    def __init__(self, smoke: bool = False, workers: int | None = None) -> None:
        self.smoke = smoke
        self.size = SMOKE if smoke else FULL
        self.workers = workers or os.cpu_count() or 2
        self.files = source_files(**self.size, workers=self.workers)
        self.directory = str(Path(self.files[0]).parent)
        self.disk_bytes = sum(os.path.getsize(p) for p in self.files)
        self.root = tempfile.mkdtemp(prefix="icd-bench-s6-")
        self.n = 0
        self.reference: tuple[str, str] | None = None  # (kind, path) of the first run
        self.compared_decoded = False
        self.notes: list[str] = []
        self.runs: dict[str, list[dict[str, Any]]] = {self.OURS: [], self.BASELINE: []}
        self.scaling: list[dict[str, Any]] = []
        self.profiled: dict[str, Any] | None = None
        self.source = source_state()  # the library's code measured (compared at the end)

    def __enter__(self) -> S6:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _path(self, kind: str) -> str:
        self.n += 1
        return os.path.join(self.root, f"r{self.n}-{kind}")

    def _run(self, name: str, kind: str) -> float:
        path = self._path(kind)
        load = os.getloadavg()[0]
        result = contender(kind, self.directory, len(self.files), path, self.workers)
        result["loadavg_before"] = load
        t0 = time.perf_counter()
        if self.reference is None:
            matches_sources(path, self.directory, self.files)
            self.reference = (kind, path)
        else:
            notes = same_references(self.reference[1], path)
            if kind != self.reference[0]:
                self.notes = sorted(set(self.notes) | set(notes))
                if not self.compared_decoded:
                    # Decoded once, ours against the baseline (reading every chunk through
                    # the references); references, metadata and stored coordinates every
                    # time.
                    import xarray as xr

                    xr.testing.assert_identical(
                        decoded(self.reference[1], self.directory), decoded(path, self.directory)
                    )
                    self.compared_decoded = True
            elif notes:
                raise AssertionError(f"S6: two {kind} runs stored different metadata: {notes}")
            shutil.rmtree(path)
        result["check_seconds"] = time.perf_counter() - t0
        self.runs[name].append(result)
        return float(result["seconds"])

    def contenders(self) -> dict[str, Callable[[], float]]:
        return {
            self.OURS: lambda: self._run(self.OURS, "ours"),
            self.BASELINE: lambda: self._run(self.BASELINE, "baseline"),
        }

    def scale(self) -> list[dict[str, Any]]:
        """Single runs of both contenders on fewer files: peak RSS against the file count
        (the full count's figures are the medians of the main runs)."""
        for n in SCALING["smoke" if self.smoke else "full"]:
            point: dict[str, Any] = {"files": n}
            paths = {}
            for kind in ("ours", "baseline"):
                paths[kind] = self._path(f"{kind}-{n}")
                r = contender(kind, self.directory, n, paths[kind], self.workers)
                point[kind] = {k: r[k] for k in ("seconds", "peak_rss_mb", "rss_after_imports_mb")}
            same_references(paths["ours"], paths["baseline"])
            for p in paths.values():
                shutil.rmtree(p)
            self.scaling.append(point)
        return self.scaling

    def profile(self, n: int = 200) -> dict[str, Any]:
        """Where our time goes, each in a fresh process: CPU per step serially on up to ``n``
        files, and the coordinator's timeline of a run on processes with all the files."""
        self.profiled = {}
        for executor, count in (("serial", min(n, len(self.files))), ("processes", None)):
            count = count or len(self.files)
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.virtual", "profile", str(count),
                 self.directory, executor],
                capture_output=True, text=True, cwd=ROOT,
            )  # fmt: skip
            if out.returncode != 0:
                raise RuntimeError(f"S6 profile failed ({out.returncode}):\n{out.stderr[-4000:]}")
            self.profiled[executor] = json.loads(out.stdout.strip().splitlines()[-1])
        return self.profiled

    def report(self) -> dict[str, Any]:
        import statistics

        def med(name: str, key: str) -> float:
            return statistics.median(float(r[key]) for r in self.runs[name])

        def cpu(name: str, key: str) -> float | None:
            got = [r[key] for r in self.runs[name] if r.get(key) is not None]
            return statistics.median(got) if got else None

        ours_s, base_s = med(self.OURS, "seconds"), med(self.BASELINE, "seconds")
        ours_cpu, base_cpu = cpu(self.OURS, "cpu_seconds"), cpu(self.BASELINE, "cpu_seconds")
        ours_rss, base_rss = med(self.OURS, "peak_rss_mb"), med(self.BASELINE, "peak_rss_mb")
        rss_points = [
            {
                "files": p["files"],
                "ours_peak_rss_mb": p["ours"]["peak_rss_mb"],
                "baseline_peak_rss_mb": p["baseline"]["peak_rss_mb"],
            }
            for p in self.scaling
        ] + [
            {
                "files": len(self.files),
                "ours_peak_rss_mb": ours_rss,
                "baseline_peak_rss_mb": base_rss,
            }
        ]
        return {
            "files": len(self.files),
            "file_shape": [STEPS, self.size["nlat"], self.size["nlon"]],
            "chunk_refs": len(self.files) * len(VARIABLES) * (STEPS // CHUNK),
            "disk_bytes": self.disk_bytes,
            "workers": self.workers,
            "ours_s": ours_s,
            "ours_scan_s": med(self.OURS, "scan_seconds"),
            "ours_write_s": med(self.OURS, "write_seconds"),
            "baseline_s": base_s,
            "baseline_open_s": med(self.BASELINE, "open_seconds"),
            "ours_over_baseline": ours_s / base_s,
            "ours_cpu_s": ours_cpu,
            "baseline_cpu_s": base_cpu,
            "ours_over_baseline_cpu": ours_cpu / base_cpu if ours_cpu and base_cpu else None,
            "ours_coordinator_cpu_s": cpu(self.OURS, "coordinator_cpu_seconds"),
            "baseline_coordinator_cpu_s": cpu(self.BASELINE, "coordinator_cpu_seconds"),
            "ours_peak_rss_mb": ours_rss,
            "baseline_peak_rss_mb": base_rss,
            "ours_over_baseline_rss": ours_rss / base_rss,
            "ours_rss_after_imports_mb": med(self.OURS, "rss_after_imports_mb"),
            "baseline_rss_after_imports_mb": med(self.BASELINE, "rss_after_imports_mb"),
            "rss_vs_files": rss_points,
            "metadata_differences": self.notes,
            "compared_decoded": self.compared_decoded,
            "source": self.source,
            "source_changed_during_run": source_state() != self.source,
            "profile": self.profiled,
            "runs": self.runs,
            "scaling": self.scaling,
        }

    def print_summary(self) -> None:
        r = self.report()
        print(
            f"S6   {r['files']} files ({r['chunk_refs']} chunk references), {r['workers']} "
            f"workers: ours {r['ours_s']:.1f} s (scan {r['ours_scan_s']:.1f} s), peak RSS "
            f"{r['ours_peak_rss_mb']:.0f} MB; open_virtual_mfdataset {r['baseline_s']:.1f} s "
            f"(open {r['baseline_open_s']:.1f} s), peak RSS {r['baseline_peak_rss_mb']:.0f} MB; "
            f"ours/baseline {r['ours_over_baseline']:.2f}x time, "
            f"{r['ours_over_baseline_rss']:.2f}x peak RSS"
        )
        if r["ours_over_baseline_cpu"] is not None:
            print(
                f"S6   CPU seconds, all processes: ours {r['ours_cpu_s']:.1f}, baseline "
                f"{r['baseline_cpu_s']:.1f} (ours/baseline {r['ours_over_baseline_cpu']:.2f}x); "
                f"coordinator {r['ours_coordinator_cpu_s']:.1f} / "
                f"{r['baseline_coordinator_cpu_s']:.1f}"
            )
        print(
            f"S6   coordinator peak RSS above its RSS after imports: ours "
            f"{r['ours_peak_rss_mb'] - r['ours_rss_after_imports_mb']:.0f} MB, baseline "
            f"{r['baseline_peak_rss_mb'] - r['baseline_rss_after_imports_mb']:.0f} MB"
        )
        if r["source_changed_during_run"]:
            print("S6   warning: the library's code in src/ changed during the run")
        for p in r["rss_vs_files"]:
            print(
                f"S6   {p['files']:>5} files: coordinator peak RSS ours "
                f"{p['ours_peak_rss_mb']:.0f} MB, baseline {p['baseline_peak_rss_mb']:.0f} MB"
            )
        for note in r["metadata_differences"]:
            print(f"S6   stored coordinate metadata, ours != baseline: {note}")
        for profiled in (self.profiled or {}).values():
            print_profile(profiled)


if __name__ == "__main__":
    os.environ.setdefault("ICECHUNK_LOG", "error")
    if sys.argv[1] == "profile":  # python -m benchmarks.virtual profile [N [DIR [EXECUTOR]]]
        n_files = int(sys.argv[2]) if len(sys.argv) > 2 else 200
        where = sys.argv[3] if len(sys.argv) > 3 else str(Path(source_files(**FULL)[0]).parent)
        result = profile_ours(where, n_files, sys.argv[4] if len(sys.argv) > 4 else "serial")
        print_profile(result)
        print(json.dumps(result))
        sys.exit(0)
    kind, directory, n, repo_path, workers = sys.argv[1:6]
    run = {"ours": run_ours, "baseline": run_baseline}[kind]
    print(json.dumps(run(directory, int(n), repo_path, int(workers))))
