"""The demo: write a synthetic dataset into a local repository in parallel, then verify it.

It is one :func:`~icechunk_distributed.run_region_writes` call with a loader: each task builds
its own piece of the dataset from its region (the pattern where workers open or compute their
data themselves), so no array data crosses processes; only the session snapshot travels, and
its writes come back with it.

:func:`run_ingest_demo` (``demo --ingest``) is the other main job: a few daily netCDF files,
one variable packed as int16, through :func:`~icechunk_distributed.ingest`, checked against
what ``xr.open_mfdataset`` makes of the same files.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TextIO

import numpy as np
import xarray as xr

from icechunk_distributed.api import run_region_writes
from icechunk_distributed.ingestion import IngestResult, ingest

__all__ = [
    "DemoResult",
    "DemoSpec",
    "IngestDemoResult",
    "ingest_spec",
    "run_demo",
    "run_ingest_demo",
    "sample_files",
    "synthetic_dataset",
]


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


@dataclass(frozen=True)
class _Loader:
    """Builds one region of the demo dataset inside the task: no data crosses processes."""

    spec: DemoSpec

    def __call__(self, region: dict[str, slice]) -> xr.Dataset:
        time = region.get("time", slice(0, self.spec.n_time))
        return synthetic_dataset(self.spec, time.start, time.stop)


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


def run_demo(
    *,
    executor: str = "processes",
    workers: int | None = None,
    megabytes: float = 64.0,
    path: str | None = None,
    out: TextIO | None = None,
    progress: bool | None = None,
) -> DemoResult:
    """Write the synthetic dataset in parallel into a local repository and verify it.

    Parameters
    ----------
    executor : str
        Where the region writes run: any name ``run_region_writes`` accepts.
    workers : int, optional
        Pool size; the number of CPUs by default.
    megabytes : float
        Approximate size of the data.
    path : str, optional
        Repository directory (must not exist yet); a temporary one, removed afterwards, by default.
    out : file, optional
        Where progress lines go (stderr by default).
    progress : bool, optional
        A progress bar (default: when stderr is a terminal).

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
        print(
            f"demo: {spec.nbytes / 1e6:.1f} MB ({spec.n_time}x{spec.ny}x{spec.nx} float32), "
            f"{spec.n_time // spec.time_chunk} chunks, on {workers} {executor}",
            file=out,
        )
        t0 = time.perf_counter()
        result = run_region_writes(
            _Loader(spec),
            repo,
            template=_template(spec),
            executor=executor,
            workers=workers,
            task_size=1,  # one chunk of time steps per task: shows the fan-out
            message=f"demo: {spec.n_time} time steps with {executor}",
            metadata={"tool": "icechunk-distributed demo"},
            progress=progress,
        )
        snapshot_id = result.snapshot_id
        assert snapshot_id is not None
        seconds = time.perf_counter() - t0

        readback = xr.open_zarr(
            repo.readonly_session("main").store, consolidated=False, chunks=None
        ).load()
        xr.testing.assert_identical(readback, synthetic_dataset(spec))
        kept = None if tmp is not None else path
        return DemoResult(executor, result.n_regions, spec.nbytes, seconds, snapshot_id, kept)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# demo --ingest: sample files through ingest

HOURS_PER_FILE = 24  # daily files of hourly steps
# How the sample files pack precipitation: int16 with an offset and a fill value, as many
# archives (ERA5's netCDF among them) store their variables. Range 25 +- 32.7 mm/h.
PACKED = {"dtype": "int16", "scale_factor": 0.001, "add_offset": 25.0, "_FillValue": -32768}


def _precip(spec: DemoSpec) -> np.ndarray:
    """Deterministic precipitation (mm/h), float32, with one missing cell."""
    t = np.arange(spec.n_time, dtype="f8")[:, None, None]
    lat = np.linspace(-89.5, 89.5, spec.ny)[None, :, None]
    lon = np.linspace(-179.5, 179.5, spec.nx)[None, None, :]
    rain = 20 + 15 * np.sin(np.deg2rad(lon) * 2 + t / 6.0) * np.cos(np.deg2rad(lat))
    out: np.ndarray = rain.astype("f4")
    out[:, spec.ny // 2, spec.nx // 2] = np.nan  # written as the _FillValue
    return out


def ingest_spec(megabytes: float, n_files: int = 8) -> DemoSpec:
    """Daily files of hourly steps whose grid makes about ``megabytes`` on disk in all.

    Parameters
    ----------
    megabytes : float
        Total size of the files' data (float32 ``Tair`` and int16 ``precip``).
    n_files : int
        Number of daily files.

    Returns
    -------
    DemoSpec
        ``n_files * 24`` time steps on a ``ny x 2ny`` grid, one file per chunk of time.
    """
    n_time = n_files * HOURS_PER_FILE
    cells = megabytes * 1e6 / (6 * n_time)  # 4 + 2 bytes per grid cell and step
    ny = max(4, round(math.sqrt(cells / 2)))
    return DemoSpec(n_time=n_time, ny=ny, nx=2 * ny, time_chunk=HOURS_PER_FILE)


def sample_files(directory: str, spec: DemoSpec) -> list[str]:
    """Write the demo's daily netCDF files (h5netcdf) into ``directory``.

    Parameters
    ----------
    directory : str
        An existing directory.
    spec : DemoSpec
        Dataset shape; one file per ``spec.time_chunk`` time steps.

    Returns
    -------
    list of str
        The files, in time order (``day-2026-01-01.nc``, ...): ``Tair`` float32 (with NaNs)
        and ``precip`` packed as int16 (``scale_factor``, ``add_offset``, ``_FillValue``).
    """
    whole = synthetic_dataset(spec)
    whole["precip"] = (("time", "y", "x"), _precip(spec), {"units": "mm/h"})
    paths = []
    for start in range(0, spec.n_time, spec.time_chunk):
        day = whole.isel(time=slice(start, start + spec.time_chunk))
        path = os.path.join(directory, f"day-{str(day.time.values[0])[:10]}.nc")
        day.to_netcdf(path, engine="h5netcdf", encoding={"precip": dict(PACKED)})
        paths.append(path)
    return paths


@dataclass(frozen=True)
class IngestDemoResult:
    """What ``demo --ingest`` did."""

    executor: str
    n_files: int
    nbytes: int
    result: IngestResult
    path: str | None

    def summary(self) -> str:
        """A few human-readable lines: the ingest's summary, then the verification."""
        where = self.path if self.path else "a temporary one (removed)"
        return (
            f"{self.result.summary()}\nverified: identical to xr.open_mfdataset of the "
            f"{self.n_files} files; repository: {where}"
        )


def run_ingest_demo(
    *,
    executor: str = "processes",
    workers: int | None = None,
    megabytes: float = 64.0,
    path: str | None = None,
    out: TextIO | None = None,
    progress: bool | None = None,
    n_files: int = 8,
) -> IngestDemoResult:
    """Write sample daily netCDF files, ingest them in parallel, and verify the result.

    Parameters
    ----------
    executor : str
        Where headers are read and regions written: any name ``ingest`` accepts.
    workers : int, optional
        Pool size; the number of CPUs by default.
    megabytes : float
        Approximate size of the files' data.
    path : str, optional
        Repository directory (must not exist yet); a temporary one, removed afterwards, by
        default. The sample files are always removed.
    out : file, optional
        Where progress lines go (stderr by default).
    progress : bool, optional
        A progress bar (default: when stderr is a terminal).
    n_files : int
        Number of daily files.

    Returns
    -------
    IngestDemoResult
        The ingest's result and where the repository is.
    """
    import icechunk

    out = sys.stderr if out is None else out
    spec = ingest_spec(megabytes, n_files)
    workers = workers or os.cpu_count() or 2
    tmp = tempfile.mkdtemp(prefix="icechunk-distributed-demo-")
    kept, path = path, path or os.path.join(tmp, "repo")
    try:
        files = sample_files(tmp, spec)
        nbytes = sum(os.path.getsize(f) for f in files)
        print(
            f"demo --ingest: {len(files)} daily netCDF files ({nbytes / 1e6:.1f} MB; "
            f"{spec.time_chunk}x{spec.ny}x{spec.nx} float32 Tair, int16-packed precip each), "
            f"on {workers} {executor}",
            file=out,
        )
        repo = icechunk.Repository.create(icechunk.local_filesystem_storage(path))
        result = ingest(
            os.path.join(tmp, "day-*.nc"),
            repo,
            concat_dim="time",
            executor=executor,
            workers=workers,
            step="1h",  # hourly without gaps: a missing day would be refused
            message=f"demo: ingest {len(files)} daily files with {executor}",
            progress=progress,
        )
        readback = xr.open_zarr(repo.readonly_session("main").store, consolidated=False)
        with xr.open_mfdataset(files, engine="h5netcdf", combine="by_coords") as expected:
            xr.testing.assert_identical(readback.load(), expected.load())
        return IngestDemoResult(executor, len(files), nbytes, result, kept)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
