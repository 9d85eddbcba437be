"""The demo: write a synthetic dataset into a local repository in parallel, then verify it.

Each task regenerates its own piece of the dataset from the region it is given (the pattern
where workers open or compute their data themselves), so no array data crosses processes:
only the session snapshot travels, and its writes come back with it.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TextIO

import numpy as np
import xarray as xr

from icechunk_distributed.session import SessionSnapshot, merge_sessions, writable_session

__all__ = ["DemoResult", "DemoSpec", "run_demo", "synthetic_dataset"]


@dataclass(frozen=True)
class DemoSpec:
    """Shape of the synthetic dataset: ``time`` x ``y`` x ``x`` float32, chunked along time.

    Parameters
    ----------
    n_time, ny, nx : int
        Dimension sizes.
    time_chunk : int
        Time steps per chunk (and per task).
    """

    n_time: int = 256
    ny: int = 180
    nx: int = 360
    time_chunk: int = 8

    @classmethod
    def from_megabytes(cls, mb: float, *, time_chunk: int = 8) -> DemoSpec:
        """A spec whose data variable takes about ``mb`` megabytes."""
        step = 180 * 360 * 4
        n_time = max(time_chunk, round(mb * 1e6 / step / time_chunk) * time_chunk)
        return cls(n_time=n_time, time_chunk=time_chunk)

    @property
    def nbytes(self) -> int:
        """Bytes of the data variable."""
        return self.n_time * self.ny * self.nx * 4


HOUR = np.timedelta64(1, "h")


def _coords(spec: DemoSpec) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    lat1 = np.linspace(-89.5, 89.5, spec.ny)
    lon1 = np.linspace(-179.5, 179.5, spec.nx)
    lon, lat = np.meshgrid(lon1, lat1)
    return {
        "time": (
            ("time",),
            np.datetime64("2026-01-01", "ns") + np.arange(spec.n_time) * 3_600_000_000_000,
        ),
        "lat": (("y", "x"), lat),
        "lon": (("y", "x"), lon),
    }


def _tair(spec: DemoSpec, start: int, stop: int) -> np.ndarray:
    """Deterministic air temperature for time steps ``start:stop`` (with a few NaNs)."""
    t = np.arange(start, stop, dtype="f8")[:, None, None]
    lat = np.linspace(-89.5, 89.5, spec.ny)[None, :, None]
    lon = np.linspace(-179.5, 179.5, spec.nx)[None, None, :]
    data = 273.15 + 30 * np.cos(np.deg2rad(lat)) + 5 * np.sin(np.deg2rad(lon) + t / 24.0)
    out: np.ndarray = data.astype("f4")
    out[:, 0, 0] = np.nan  # a missing corner, to check fill values survive
    return out


def synthetic_dataset(spec: DemoSpec, start: int = 0, stop: int | None = None) -> xr.Dataset:
    """The demo dataset, or its time steps ``start:stop``.

    Parameters
    ----------
    spec : DemoSpec
        Dataset shape.
    start, stop : int
        Time range; the whole dataset by default.

    Returns
    -------
    xarray.Dataset
        ``Tair`` (time, y, x) with 2-D ``lat``/``lon`` coordinates and attributes.
    """
    stop = spec.n_time if stop is None else stop
    coords = _coords(spec)
    coords["time"] = (("time",), coords["time"][1][start:stop])
    tair = _tair(spec, start, stop)
    return xr.Dataset(
        {"Tair": (("time", "y", "x"), tair, {"units": "K", "long_name": "air temperature"})},
        coords=coords,
        attrs={"title": "icechunk-distributed demo", "source": "synthetic"},
    )


def _template(spec: DemoSpec) -> xr.Dataset:
    """Full-size dataset whose data variable is lazy, so writing it writes metadata only."""
    import dask.array as da

    ds = synthetic_dataset(spec, 0, 1).isel(time=slice(0, 0))
    lazy = da.empty((spec.n_time, spec.ny, spec.nx), chunks=(spec.time_chunk, -1, -1), dtype="f4")
    coords = _coords(spec)
    return xr.Dataset(
        {"Tair": (("time", "y", "x"), lazy, ds["Tair"].attrs)},
        coords=coords,
        attrs=ds.attrs,
    )


def _write_piece(
    snapshot: SessionSnapshot, spec: DemoSpec, start: int, stop: int
) -> SessionSnapshot:
    # Coordinates were written once by the coordinator: write only the region's data.
    piece = synthetic_dataset(spec, start, stop).drop_vars(["time", "lat", "lon"])
    piece.to_zarr(snapshot.store, region={"time": slice(start, stop)}, consolidated=False)
    return snapshot


@dataclass(frozen=True)
class DemoResult:
    """What the demo did and how long it took."""

    executor: str
    n_regions: int
    nbytes: int
    seconds: float
    snapshot_id: str
    path: str | None

    def summary(self) -> str:
        """One human-readable line."""
        mb = self.nbytes / 1e6
        return (
            f"wrote {self.n_regions} regions, {mb:.1f} MB in {self.seconds:.2f} s "
            f"({mb / self.seconds:.1f} MB/s) with {self.executor}; verified; "
            f"commit {self.snapshot_id} in "
            + (self.path if self.path else "a temporary repository (removed)")
        )


def _executor(name: str, workers: int) -> Executor:
    if name == "threads":
        return ThreadPoolExecutor(workers)
    if name == "processes":
        # Never 'fork': icechunk's runtime does not survive it.
        method = (
            "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        )
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    raise ValueError(f"unknown executor {name!r}; choose 'threads' or 'processes'")


def run_demo(
    *,
    executor: str = "processes",
    workers: int | None = None,
    megabytes: float = 64.0,
    path: str | None = None,
    out: TextIO | None = None,
) -> DemoResult:
    """Write the synthetic dataset in parallel into a local repository and verify it.

    Parameters
    ----------
    executor : {"processes", "threads"}
        Where the region writes run.
    workers : int, optional
        Pool size; the number of CPUs by default.
    megabytes : float
        Approximate size of the data.
    path : str, optional
        Repository directory (must not exist yet); a temporary one, removed afterwards, by default.
    out : file, optional
        Where progress lines go (stderr by default).

    Returns
    -------
    DemoResult
        Regions, bytes, seconds and the commit id.
    """
    import icechunk

    out = sys.stderr if out is None else out
    spec = DemoSpec.from_megabytes(megabytes)
    workers = workers or os.cpu_count() or 2
    tmp = None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="icechunk-distributed-demo-")
        path = os.path.join(tmp, "repo")
    try:
        repo = icechunk.Repository.create(icechunk.local_filesystem_storage(path))
        starts = list(range(0, spec.n_time, spec.time_chunk))
        print(
            f"demo: {spec.nbytes / 1e6:.1f} MB ({spec.n_time}x{spec.ny}x{spec.nx} float32) "
            f"in {len(starts)} regions on {workers} {executor}",
            file=out,
        )
        t0 = time.perf_counter()
        session = writable_session(repo, "main")
        _template(spec).to_zarr(session.store, compute=False, consolidated=False, mode="w-")
        with _executor(executor, workers) as pool, session.allow_pickling() as snapshot:
            futures = [
                pool.submit(_write_piece, snapshot, spec, s, min(s + spec.time_chunk, spec.n_time))
                for s in starts
            ]
            for future in as_completed(futures):
                merge_sessions(session, future.result())  # merge as results arrive
        snapshot_id = session.commit(
            f"demo: {len(starts)} regions with {executor}", {"tool": "icechunk-distributed demo"}
        )
        seconds = time.perf_counter() - t0

        readback = xr.open_zarr(
            repo.readonly_session("main").store, consolidated=False, chunks=None
        ).load()
        xr.testing.assert_identical(readback, synthetic_dataset(spec))
        kept = None if tmp is not None else path
        return DemoResult(executor, len(starts), spec.nbytes, seconds, snapshot_id, kept)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
