"""Small daily source files for the ingest tests (importable by worker processes too)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr


def day(i: int, *, n: int = 4, ny: int = 3, dtype: str = "f4", extra: bool = False) -> xr.Dataset:
    """Day ``i`` of a small daily series: ``n`` 6-hourly steps, a float and a packed variable."""
    time = pd.date_range("2026-01-01", periods=n, freq="6h") + pd.Timedelta(days=i)
    rng = np.random.default_rng(i)
    ds = xr.Dataset(
        {
            "t2m": (("time", "y"), rng.random((n, ny)).astype(dtype), {"units": "K"}),
            "rain": (("time", "y"), (rng.integers(0, 100, (n, ny)) / 10).astype("f4")),
        },
        coords={"time": time, "y": np.arange(ny) * 10.0},
    )
    packed = {"dtype": "int16", "scale_factor": np.float32(0.1), "_FillValue": np.int16(-1)}
    ds["rain"].encoding.update(packed)
    if extra:
        ds["wind"] = ds["t2m"] * 2
    return ds


def write(tmp_path, datasets: dict[str, xr.Dataset]) -> list[str]:
    """Each dataset to ``tmp_path / name`` (netCDF4 via h5netcdf, or Zarr for ``*.zarr``)."""
    paths = []
    for name, ds in datasets.items():
        path = tmp_path / name
        if name.endswith(".zarr"):
            ds.to_zarr(path, zarr_format=3, consolidated=False)
        else:
            ds.to_netcdf(path, engine="h5netcdf")
        paths.append(str(path))
    return paths


def days(tmp_path, which, **kwargs) -> list[str]:
    """Files ``d<i>.nc`` for the days ``which``."""
    return write(tmp_path, {f"d{i:02d}.nc": day(i, **kwargs) for i in which})
