"""Task functions shipped to worker processes (importable by spawn children)."""

import numpy as np
import zarr

from conftest import small_dataset


def write_timestamp(*, itime: int, session):
    """The documented recipe's task: one time step through xarray, region='auto'."""
    ds = small_dataset()
    ds.isel(time=[itime]).to_zarr(session.store, region="auto", consolidated=False)
    return session


def write_functional(itime: int, shareable):
    """The functional recipe's task: positional arguments."""
    return write_timestamp(itime=itime, session=shareable)


def write_block(snapshot, path: str, index: tuple[slice, ...], values: np.ndarray):
    """Write ``values`` at ``index`` of array ``path`` through zarr."""
    array = zarr.open_array(snapshot.store, path=path, mode="r+")
    array[index] = values
    return snapshot


def touch_store(snapshot):
    """Use the snapshot's store (in a fork child this must fail fast, not hang)."""
    zarr.open_group(snapshot.store, mode="r")
    return snapshot


def full_dataset(n_time: int = 12, calendar: str | None = "noleap"):
    """The runner tests' dataset: cftime (or datetime64) time, 2-D coords, NaNs, attrs, and a
    variable without the time dimension."""
    import cftime
    import xarray as xr

    ds = small_dataset(n_time=n_time)
    if calendar is not None:
        times = [
            cftime.datetime(2026, 1, 1 + i // 24, i % 24, calendar=calendar) for i in range(n_time)
        ]
        ds = ds.assign_coords(time=xr.DataArray(np.array(times), dims="time"))
    ds["Tair"].attrs["long_name"] = "air temperature"
    ds["mask"] = (("y", "x"), (ds["lat"].values > 0).astype("i1"), {"meaning": "north"})
    ds["station"] = (("time",), np.arange(n_time, dtype="i4"))
    return ds


def count_call(directory: str, key: str) -> int:
    """Record one more call for ``key`` in ``directory``; return its number (exact across
    processes: one file per call, created exclusively)."""
    import os

    n = 1
    while True:
        try:
            os.close(os.open(os.path.join(directory, f"{key}.{n}"), os.O_CREAT | os.O_EXCL))
            return n
        except FileExistsError:
            n += 1


def load_region(region):
    """A loader: builds its own piece of the dataset inside the task."""
    return full_dataset().isel(region)


class FlakyLoader:
    """Fails the first ``fail_times`` calls for each region, counting calls in files (so the
    count is exact across processes)."""

    def __init__(self, directory, fail_times=1, always_fail=None):
        self.directory = str(directory)
        self.fail_times = fail_times
        self.always_fail = always_fail  # a region start along time that never succeeds

    def __call__(self, region):
        start = region["time"].start
        key = f"{start}-{region['time'].stop}"
        n = count_call(self.directory, key)
        if start == self.always_fail or n <= self.fail_times:
            raise OSError(f"transient failure #{n} for time={key}")
        return load_region(region)


def wrong_shape_loader(region):
    piece = load_region(region)
    return piece.isel(time=slice(0, 1))


class DieOnce:
    """A loader whose first call kills its worker process outright (no exception, no cleanup)."""

    def __init__(self, directory):
        import os

        self.directory = str(directory)
        self.coordinator = os.getpid()  # never kill the coordinator (it loads eager variables)

    def __call__(self, region):
        import os

        flag = os.path.join(self.directory, "died")
        if os.getpid() != self.coordinator and not os.path.exists(flag):
            with open(flag, "w"):
                pass
            os._exit(1)
        return load_region(region)


class ShiftedLoader:
    """``load_region`` for a source that starts ``offset`` steps into the full dataset, with
    ``plus`` added to every data variable."""

    def __init__(self, offset=0, plus=0):
        self.offset = offset
        self.plus = plus

    def __call__(self, region):
        region = dict(region)
        if "time" in region:
            t = region["time"]
            region["time"] = slice(t.start + self.offset, t.stop + self.offset)
        piece = load_region(region)
        for name in piece.data_vars:
            piece[name] = piece[name] + self.plus
        return piece
