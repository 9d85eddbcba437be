"""The demo: write a synthetic dataset into a local repository in parallel, then verify it.

It is one :func:`~icechunk_distributed.run_region_writes` call with a loader: each task builds
its own piece of the dataset from its region (the pattern where workers open or compute their
data themselves), so no array data crosses processes; only the session snapshot travels, and
its writes come back with it.

:func:`run_ingest_demo` (``demo --ingest``) is the other main job: a few daily netCDF files,
one variable packed as int16, through :func:`~icechunk_distributed.ingest`, checked against
what ``xr.open_mfdataset`` makes of the same files. With ``virtual=True`` (``demo --ingest
--virtual``) the files are referenced instead of copied: the repository gets a virtual chunk
container for their directory, is read back with access to it, and the demo counts the
chunks that are references and compares the repository's size with the files'.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
import xarray as xr

from icechunk_distributed.api import run_region_writes
from icechunk_distributed.info import format_bytes
from icechunk_distributed.ingestion import IngestResult, ingest
from icechunk_distributed.virtualscan import file_url

__all__ = [
    "DemoResult",
    "DemoSpec",
    "IngestDemoResult",
    "VirtualReport",
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
class VirtualReport:
    """What a virtual ingest stored: chunk types per array, and sizes on disk.

    Attributes
    ----------
    chunk_types : dict
        ``{array: {chunk type: count}}`` for the data variables (``"virtual"``,
        ``"native"``, ``"inline"``, ``"uninitialized"``).
    repo_bytes : int
        Bytes of the repository's directory.
    files_bytes : int
        Bytes of the files it references.
    files_dir : str or None
        Where the files are kept for a kept repository (None: removed with the demo).
    """

    chunk_types: dict[str, dict[str, int]]
    repo_bytes: int
    files_bytes: int
    files_dir: str | None

    def summary(self) -> str:
        """One line: how many chunks are references, and the sizes."""
        counts = [
            f"{types.get('virtual', 0)} of {sum(types.values())} chunks of {name}"
            for name, types in self.chunk_types.items()
        ]
        return (
            f"referenced, not copied: {', '.join(counts)} are virtual references into the "
            f"files; the repository takes {format_bytes(self.repo_bytes)} on disk for "
            f"{format_bytes(self.files_bytes)} of files"
        )


@dataclass(frozen=True)
class IngestDemoResult:
    """What ``demo --ingest`` did."""

    executor: str
    n_files: int
    nbytes: int
    result: IngestResult
    path: str | None
    virtual: VirtualReport | None = None

    def summary(self) -> str:
        """A few human-readable lines: the ingest's summary, then the verification."""
        where = self.path if self.path else "a temporary one (removed)"
        lines = [self.result.summary()]
        access = ""
        if self.virtual is not None:
            lines.append(self.virtual.summary())
            access = " (read with authorize_virtual_chunk_access)"
            if self.virtual.files_dir:
                where += f"; it references the files in {self.virtual.files_dir}: keep them"
        lines.append(
            f"verified: identical to xr.open_mfdataset of the {self.n_files} files{access}; "
            f"repository: {where}"
        )
        return "\n".join(lines)


def _files_dir(tmp: str, kept: str | None, virtual: bool) -> str:
    """Where the sample files go: the temporary directory, or ``<path>-files``.

    A kept virtual repository references its files: they are kept too, next to it.
    """
    if not (virtual and kept):
        return tmp
    files_dir = os.path.abspath(kept).rstrip(os.sep) + "-files"
    if os.path.exists(files_dir) and os.listdir(files_dir):
        raise ValueError(
            f"{files_dir} is not empty: the virtual demo keeps its sample files there, next "
            "to the repository at --path, as the repository references them"
        )
    os.makedirs(files_dir, exist_ok=True)
    return files_dir


def _virtual_repository(path: str, files_dir: str) -> tuple[Any, dict[str, Any]]:
    """A new repository with a virtual chunk container for ``files_dir``, and the access."""
    import icechunk

    prefix = file_url(str(files_dir)).rstrip("/") + "/"
    config = icechunk.RepositoryConfig.default()
    store = icechunk.local_filesystem_store(files_dir)
    config.set_virtual_chunk_container(icechunk.VirtualChunkContainer(prefix, store))
    access = icechunk.containers_credentials({prefix: icechunk.credentials.LocalFileSystemAccess})
    storage = icechunk.local_filesystem_storage(path)
    repo = icechunk.Repository.create(storage, config, authorize_virtual_chunk_access=access)
    return repo, access


def _chunk_types(session: Any, names: list[str]) -> dict[str, dict[str, int]]:
    """``{array: {chunk type: count}}`` over every chunk of the arrays ``names``."""
    import zarr

    root = zarr.open_group(session.store, mode="r")
    out: dict[str, dict[str, int]] = {}
    for name in names:
        array = root[name]
        assert isinstance(array, zarr.Array)
        grid = [-(-n // c) for n, c in zip(array.shape, array.chunks, strict=True)]
        counts: dict[str, int] = {}
        for coords in np.ndindex(*grid):
            kind = str(session.chunk_type(f"/{name}", list(coords))).rsplit(".", 1)[-1]
            counts[kind] = counts.get(kind, 0) + 1
        out[name] = counts
    return out


def _disk_bytes(directory: str) -> int:
    return sum(
        os.path.getsize(os.path.join(where, name))
        for where, _, names in os.walk(directory)
        for name in names
    )


# long: the demo's steps in order (files, repository, ingest, verification), each a call.
def run_ingest_demo(
    *,
    executor: str = "processes",
    workers: int | None = None,
    megabytes: float = 64.0,
    path: str | None = None,
    out: TextIO | None = None,
    progress: bool | None = None,
    n_files: int = 8,
    virtual: bool = False,
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
        default. The sample files are removed, except those a kept virtual repository
        references (in ``<path>-files``).
    out : file, optional
        Where progress lines go (stderr by default).
    progress : bool, optional
        A progress bar (default: when stderr is a terminal).
    n_files : int
        Number of daily files.
    virtual : bool
        Reference the files' chunks instead of copying them (VirtualiZarr), read them back
        through the repository's virtual chunk container, and count the references.

    Returns
    -------
    IngestDemoResult
        The ingest's result, where the repository is and, virtual, what it references.
    """
    import icechunk

    out = sys.stderr if out is None else out
    spec = ingest_spec(megabytes, n_files)
    workers = workers or os.cpu_count() or 2
    tmp = tempfile.mkdtemp(prefix="icechunk-distributed-demo-")
    kept, path = path, path or os.path.join(tmp, "repo")
    files_dir = tmp
    try:
        files_dir = _files_dir(tmp, kept, virtual)
        files = sample_files(files_dir, spec)
        nbytes = sum(os.path.getsize(f) for f in files)
        print(
            f"demo --ingest{' --virtual' * virtual}: {len(files)} daily netCDF files "
            f"({nbytes / 1e6:.1f} MB; {spec.time_chunk}x{spec.ny}x{spec.nx} float32 Tair, "
            f"int16-packed precip each), on {workers} {executor}",
            file=out,
        )
        access: dict[str, Any] | None = None
        if virtual:
            repo, access = _virtual_repository(path, files_dir)
        else:
            repo = icechunk.Repository.create(icechunk.local_filesystem_storage(path))
        result = ingest(
            os.path.join(files_dir, "day-*.nc"),
            repo,
            concat_dim="time",
            executor=executor,
            workers=workers,
            step="1h",  # hourly without gaps: a missing day would be refused
            message=f"demo: ingest {len(files)} daily files with {executor}",
            progress=progress,
            virtual=virtual,
        )
        # A fresh repository object, as a reader would open it (with access, if virtual).
        reader = icechunk.Repository.open(
            icechunk.local_filesystem_storage(path), authorize_virtual_chunk_access=access
        )
        session = reader.readonly_session("main")
        readback = xr.open_zarr(session.store, consolidated=False)
        with xr.open_mfdataset(files, engine="h5netcdf", combine="by_coords") as expected:
            xr.testing.assert_identical(readback.load(), expected.load())
        report = None
        if virtual:
            kinds = _chunk_types(session, ["Tair", "precip"])
            report = VirtualReport(kinds, _disk_bytes(path), nbytes, kept and files_dir)
        return IngestDemoResult(executor, len(files), nbytes, result, kept, report)
    except BaseException:
        if files_dir != tmp:  # the kept files of a virtual demo that failed
            shutil.rmtree(files_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
