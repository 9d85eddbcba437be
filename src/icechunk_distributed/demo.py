"""The demo: write a synthetic dataset into a local repository in parallel, then verify it.

It is one :func:`~icechunk_distributed.run_region_writes` call with a loader: each task builds
its own piece of the dataset from its region (the pattern where workers open or compute their
data themselves), so no array data crosses processes; only the session snapshot travels, and
its writes come back with it.
"""

from __future__ import annotations

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
