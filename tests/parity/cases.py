"""Dataset builders for the parity harness.

Every case is a module-level function ``build(src_dir) -> list[Step]``: the steps are applied
in order to two repositories, once with ``Dataset.to_zarr`` (the reference) and once with
``run_region_writes``, with the same arguments. Builders are deterministic (seeded), and the
harness calls each builder twice (once per side), so the two sides never share a Dataset
object. Everything here is importable as ``parity.cases`` (tests/ is on ``PYTHONPATH``, also
for worker processes), so the datasets and anything they reference pickle by reference.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr


@dataclasses.dataclass
class Step:
    """One write: ``ds.to_zarr(store, consolidated=False, **kwargs)`` against
    ``run_region_writes(ds, repo, executor=..., **kwargs, **ours)``."""

    ds: xr.Dataset
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    ours: dict[str, Any] = dataclasses.field(default_factory=dict)  # run_region_writes only
    # What to_zarr writes instead of ``ds``, where to_zarr refuses ``ds`` but we write it
    # (a documented difference): the same data, in a form to_zarr accepts.
    reference: xr.Dataset | None = None


# ---------------------------------------------------------------------------------------------
# Building blocks

NT, NLAT, NLON = 24, 20, 30


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _times(n: int, start: str = "2020-01-01") -> np.ndarray:
    return np.datetime64(start, "ns") + np.arange(n) * np.timedelta64(1, "h")


def era5_like(nt: int = NT, seed: int = 0, start: str = "2020-01-01") -> xr.Dataset:
    """t2m/u10/v10 (time, lat, lon) float32 with NaNs, 1-D lat/lon, time_bnds, a static lsm."""
    rng = _rng(seed)
    time = _times(nt, start)
    lat = np.linspace(90, -90, NLAT).astype("f8")
    lon = np.linspace(0, 358, NLON).astype("f8")

    def field(lo, hi):
        a = (lo + (hi - lo) * rng.random((nt, NLAT, NLON))).astype("f4")
        a[::5, 0, :3] = np.nan
        return a

    bnds = np.stack([time, time + np.timedelta64(1, "h")], axis=1)
    ds = xr.Dataset(
        {
            "t2m": (
                ("time", "lat", "lon"),
                field(200, 320),
                {"units": "K", "long_name": "2 m temperature"},
            ),
            "u10": (("time", "lat", "lon"), field(-30, 30), {"units": "m s**-1"}),
            "v10": (("time", "lat", "lon"), field(-30, 30), {"units": "m s**-1"}),
            "time_bnds": (("time", "bnds"), bnds),
            "lsm": (("lat", "lon"), rng.random((NLAT, NLON)).astype("f4"), {"units": "1"}),
        },
        coords={
            "time": ("time", time, {"long_name": "time", "standard_name": "time"}),
            "lat": ("lat", lat, {"units": "degrees_north"}),
            "lon": ("lon", lon, {"units": "degrees_east"}),
        },
        attrs={"Conventions": "CF-1.6", "history": "parity test"},
    )
    return ds


def packing(scale_dtype: str = "f8") -> dict[str, dict[str, Any]]:
    """int16 packing, as ERA5 netCDF files have it."""
    t = np.dtype(scale_dtype).type
    return {
        "t2m": {
            "dtype": "int16",
            "scale_factor": t(0.002),
            "add_offset": t(260.0),
            "_FillValue": np.int16(-32767),
        },
        "u10": {
            "dtype": "int16",
            "scale_factor": t(0.001),
            "add_offset": t(0.0),
            "_FillValue": np.int16(-32767),
        },
        "v10": {
            "dtype": "int16",
            "scale_factor": t(0.001),
            "add_offset": t(0.0),
            "_FillValue": np.int16(-32767),
        },
    }


def _with_chunks(
    enc: dict[str, dict[str, Any]], chunks: dict[str, tuple[int, ...]]
) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in enc.items()}
    for name, c in chunks.items():
        out.setdefault(name, {})["chunks"] = c
    return out


ERA5_CHUNKS = {"t2m": (6, 10, 15), "u10": (6, 10, 15), "v10": (6, 10, 15)}


def simple(
    nt: int = NT, nx: int = 10, seed: int = 0, dtype: str = "f4", start: str = "2020-01-01"
) -> xr.Dataset:
    rng = _rng(seed)
    data = (rng.random((nt, nx)) * 100).astype(dtype)
    if data.dtype.kind == "f":
        data[::4, 0] = np.nan
    return xr.Dataset(
        {"a": (("time", "x"), data, {"units": "1"})},
        coords={"time": _times(nt, start), "x": np.arange(nx, dtype="i4")},
        attrs={"title": "simple"},
    )


# ---------------------------------------------------------------------------------------------
# Single writes


def era5_packed(src: Path) -> list[Step]:
    return [
        Step(era5_like(), {"encoding": _with_chunks(packing("f8"), ERA5_CHUNKS)}, {"task_size": 1})
    ]


def era5_packed_f32scale(src: Path) -> list[Step]:
    return [
        Step(era5_like(), {"encoding": _with_chunks(packing("f4"), ERA5_CHUNKS)}, {"task_size": 1})
    ]


def era5_packed_defaults(src: Path) -> list[Step]:
    """Packing, no chunk encoding: to_zarr lets zarr choose."""
    return [Step(era5_like(), {"encoding": packing("f8")})]


def era5_time_encoded(src: Path) -> list[Step]:
    enc = _with_chunks(packing("f8"), ERA5_CHUNKS)
    enc["time"] = {
        "units": "hours since 1900-01-01 00:00:00",
        "calendar": "gregorian",
        "dtype": "int32",
    }
    return [Step(era5_like(), {"encoding": enc}, {"task_size": 1})]


def datetime_coord_plain(src: Path) -> list[Step]:
    return [Step(simple(), {"encoding": {"a": {"chunks": (4, 5)}}})]


def datetime_coord_encoded(src: Path) -> list[Step]:
    enc = {"a": {"chunks": (4, 5)}, "time": {"units": "hours since 2000-01-01", "dtype": "int64"}}
    return [Step(simple(), {"encoding": enc})]


def datetime_coord_units_only(src: Path) -> list[Step]:
    enc = {"a": {"chunks": (4, 5)}, "time": {"units": "days since 1970-01-01"}}
    return [Step(simple(), {"encoding": enc})]


def _datetime_vars(nt: int = NT, seed: int = 0, start: str = "2020-01-01") -> xr.Dataset:
    ds = simple(nt, seed=seed, start=start)
    vt = np.broadcast_to(ds.time.values[:, None], (nt, 10)).copy() + np.timedelta64(6, "h")
    vt[::3, 1] = np.datetime64("NaT")
    step = (np.arange(nt * 10).reshape(nt, 10) * np.timedelta64(30, "m")).astype("m8[ns]")
    step[1::4, 2] = np.timedelta64("NaT", "ns")
    ds["valid_time"] = (("time", "x"), vt, {"long_name": "valid time"})
    ds["step"] = (("time", "x"), step)
    return ds


def datetime_var_nat(src: Path) -> list[Step]:
    enc = {v: {"chunks": (4, 5)} for v in ("a", "valid_time", "step")}
    return [Step(_datetime_vars(), {"encoding": enc})]


def datetime_var_nat_encoded(src: Path) -> list[Step]:
    enc = {v: {"chunks": (4, 5)} for v in ("a", "valid_time", "step")}
    enc["valid_time"].update(units="seconds since 1970-01-01", dtype="int64")
    enc["step"].update(units="minutes", dtype="int64")
    return [Step(_datetime_vars(), {"encoding": enc})]


def _cftime_ds(calendar: str, nt: int = NT, seed: int = 0, start: str = "2000-01-01") -> xr.Dataset:
    time = xr.date_range(start, periods=nt, freq="6h", calendar=calendar, use_cftime=True)
    ds = simple(nt, seed=seed)
    ds = ds.assign_coords(time=("time", np.asarray(time), {"standard_name": "time"}))
    ref = xr.date_range("1999-12-01", periods=nt, freq="D", calendar=calendar, use_cftime=True)
    ds["reftime"] = ("time", np.asarray(ref))
    return ds


def cftime_noleap(src: Path) -> list[Step]:
    return [
        Step(
            _cftime_ds("noleap"),
            {"encoding": {"a": {"chunks": (4, 5)}, "reftime": {"chunks": (8,)}}},
        )
    ]


def cftime_360day(src: Path) -> list[Step]:
    return [Step(_cftime_ds("360_day"), {"encoding": {"a": {"chunks": (4, 5)}}}, {"task_size": 1})]


def cftime_encoded(src: Path) -> list[Step]:
    enc = {
        "a": {"chunks": (4, 5)},
        "time": {"units": "hours since 1990-01-01", "calendar": "noleap", "dtype": "int32"},
    }
    return [Step(_cftime_ds("noleap"), {"encoding": enc})]


DTYPES = ("bool", "complex128", "float16", "uint64", "int8")


def _dtype_values(dtype: str, rng: np.random.Generator) -> np.ndarray:
    shape = (NT, 10)
    if dtype == "bool":
        data = rng.random(shape) > 0.5
    elif dtype == "complex128":
        data = rng.random(shape) + 1j * rng.random(shape)
        data[::5, 0] = np.nan + 0j
    elif dtype == "float16":
        data = rng.random(shape).astype("f2")
        data[::5, 0] = np.nan
    elif dtype == "uint64":
        data = rng.integers(0, 2**64 - 1, size=shape, dtype="u8", endpoint=True)
        data[0, 0] = np.iinfo("u8").max
    elif dtype == "int8":
        data = rng.integers(-128, 127, size=shape, dtype="i1", endpoint=True)
    else:
        raise ValueError(dtype)
    return data


def dtypes(src: Path) -> list[Step]:
    """One variable per dtype (v_bool, v_complex128, ...): differences name the variable."""
    rng = _rng(0)
    ds = simple()
    for dtype in DTYPES:
        ds[f"v_{dtype}"] = (("time", "x"), _dtype_values(dtype, rng), {"kind": dtype})
    enc = {
        f"v_{d}": {"chunks": c}
        for d, c in zip(DTYPES, [(6, 5), (4, 10), (6, 5), (8, 5), (3, 2)], strict=True)
    }
    return [Step(ds, {"encoding": {"a": {"chunks": (6, 5)}, **enc}})]


def _words(n: int, seed: int = 0) -> list[str]:
    rng = _rng(seed)
    pool = ["alpha", "b", "gamma-ray", "δέλτα", "", "epsilon zeta", "ü", "x" * 17]
    return [pool[i] for i in rng.integers(0, len(pool), size=n)]


def strings_object(src: Path) -> list[Step]:
    ds = simple()
    ds["label"] = (("time", "x"), np.array(_words(NT * 10), dtype=object).reshape(NT, 10))
    return [Step(ds, {"encoding": {"label": {"chunks": (6, 5)}, "a": {"chunks": (6, 5)}}})]


def strings_object_missing(src: Path) -> list[Step]:
    ds = simple()
    lab = np.array(_words(NT * 10), dtype=object).reshape(NT, 10)
    lab[::3, 0] = None
    ds["label"] = (("time", "x"), lab)
    return [Step(ds, {"encoding": {"label": {"chunks": (6, 5)}, "a": {"chunks": (6, 5)}}})]


def strings_fixed_unicode(src: Path) -> list[Step]:
    ds = simple()
    ds["label"] = (("time", "x"), np.array(_words(NT * 10), dtype="<U17").reshape(NT, 10))
    return [Step(ds, {"encoding": {"label": {"chunks": (6, 5)}, "a": {"chunks": (6, 5)}}})]


def strings_fixed_bytes(src: Path) -> list[Step]:
    ds = simple()
    words = [w.encode("ascii", "replace") for w in _words(NT * 10)]
    ds["code"] = (("time", "x"), np.array(words, dtype="S17").reshape(NT, 10))
    return [Step(ds, {"encoding": {"code": {"chunks": (6, 5)}, "a": {"chunks": (6, 5)}}})]


def string_station_coord(src: Path) -> list[Step]:
    rng = _rng(1)
    stations = np.array(["ZRH", "GVA", "BSL", "BRN", "LUG", "SMA", "KLO"], dtype=object)
    ds = xr.Dataset(
        {"temp": (("time", "station"), rng.random((NT, stations.size)).astype("f4"))},
        coords={
            "time": _times(NT),
            "station": stations,
            "station_name": (
                "station",
                np.array(["Zürich", "Genève", "Basel", "Bern", "Lugano", "Säntis", "Kloten"]),
            ),
        },
    )
    return [Step(ds, {"encoding": {"temp": {"chunks": (4, 7)}}})]


def scalar_variable(src: Path) -> list[Step]:
    ds = simple()
    ds["height"] = ((), np.float32(2.0), {"units": "m"})
    ds["crs"] = ((), np.int32(0), {"grid_mapping_name": "latitude_longitude"})
    return [Step(ds, {"encoding": {"a": {"chunks": (4, 5)}}})]


def size_zero_dim(src: Path) -> list[Step]:
    ds = simple()
    ds["empty"] = (("time", "e"), np.zeros((NT, 0), "f4"))
    ds["nothing"] = (("e",), np.zeros((0,), "i8"))
    return [Step(ds, {"encoding": {"a": {"chunks": (4, 5)}}})]


def mixed_chunks(src: Path) -> list[Step]:
    rng = _rng(2)
    ds = simple()
    ds["b"] = (("time", "x"), rng.random((NT, 10)))
    ds["c"] = (("time", "x"), rng.random((NT, 10)).astype("f4"))
    ds["d"] = (("x", "time"), rng.random((10, NT)).astype("f4"))
    enc = {"a": {"chunks": (4, 5)}, "b": {"chunks": (6, 10)}, "d": {"chunks": (5, 3)}}
    return [Step(ds, {"encoding": enc})]


def numpy_auto_chunks(src: Path) -> list[Step]:
    rng = _rng(3)
    ds = xr.Dataset(
        {"big": (("time", "y", "x"), rng.random((200, 100, 120), dtype="f4"))},
        coords={"time": _times(200), "y": np.arange(100), "x": np.arange(120)},
    )
    return [Step(ds, {})]


def numpy_no_encoding(src: Path) -> list[Step]:
    return [Step(era5_like(), {})]


def dask_coarser_than_zarr(src: Path) -> list[Step]:
    """dask chunks are multiples of the requested zarr chunks (to_zarr accepts that)."""
    ds = era5_like().chunk({"time": 12, "lat": 20, "lon": 30})
    return [Step(ds, {"encoding": _with_chunks({}, ERA5_CHUNKS)})]


def _rechunk_data(ds: xr.Dataset, chunks: dict[str, Any]) -> xr.Dataset:
    """``ds`` with the ERA5 data variables (only) rechunked to ``chunks``."""
    out = ds.copy()
    for name in ERA5_CHUNKS:
        out[name] = ds[name].chunk(chunks)
    return out


def dask_finer_than_zarr(src: Path) -> list[Step]:
    """dask chunks smaller than the zarr chunks: several dask chunks per zarr chunk.

    to_zarr refuses this (safe_chunks); tasks write whole zarr chunks, so we write it: the
    reference is the same data with the data variables rechunked to the zarr chunks
    (docs/runner.md, "Differences from to_zarr").
    """
    base = era5_like().chunk({"time": 6})
    ds = _rechunk_data(base, {"time": 3, "lat": 10, "lon": 15})
    ref = _rechunk_data(base, {"time": 6, "lat": 10, "lon": 15})
    return [Step(ds, {"encoding": _with_chunks({}, ERA5_CHUNKS)}, reference=ref)]


def dask_misaligned(src: Path) -> list[Step]:
    """dask chunks straddling zarr chunks: refused by to_zarr, written by us (see above)."""
    base = era5_like().chunk({"time": 6})
    ds = _rechunk_data(base, {"time": (5, 7, 12), "lat": 20, "lon": 30})
    ref = _rechunk_data(base, {"time": 6, "lat": 10, "lon": 15})
    return [Step(ds, {"encoding": _with_chunks({}, ERA5_CHUNKS)}, reference=ref)]


def dask_no_encoding(src: Path) -> list[Step]:
    return [Step(era5_like().chunk({"time": 6, "lat": 10}), {})]


def dask_packed(src: Path) -> list[Step]:
    ds = era5_like().chunk({"time": 6})
    return [Step(ds, {"encoding": packing("f8")})]


def sharded(src: Path) -> list[Step]:
    enc = {v: {"chunks": (2, 10, 15), "shards": (6, 20, 30)} for v in ("t2m", "u10", "v10")}
    return [Step(era5_like(), {"encoding": enc})]


def sharded_packed(src: Path) -> list[Step]:
    enc = packing("f8")
    for v in ("t2m", "u10", "v10"):
        enc[v].update(chunks=(2, 10, 15), shards=(12, 20, 30))
    return [Step(era5_like(), {"encoding": enc})]


def nested_group(src: Path) -> list[Step]:
    return [
        Step(era5_like(), {"group": "a/b", "encoding": _with_chunks(packing("f8"), ERA5_CHUNKS)})
    ]


def two_groups(src: Path) -> list[Step]:
    return [
        Step(simple(), {"group": "first", "encoding": {"a": {"chunks": (4, 5)}}}),
        Step(era5_like(), {"group": "a/b", "encoding": _with_chunks({}, ERA5_CHUNKS)}),
    ]


# -- netCDF sources, written here with h5netcdf ------------------------------------------------

NC_ENC = {
    "t2m": {
        "dtype": "int16",
        "scale_factor": 0.002,
        "add_offset": 260.0,
        "_FillValue": -32767,
        "zlib": True,
        "chunksizes": (6, 10, 15),
    },
    "u10": {"dtype": "int16", "scale_factor": 0.001, "add_offset": 0.0, "_FillValue": -32767},
    "v10": {
        "dtype": "int16",
        "scale_factor": np.float32(0.001),
        "add_offset": np.float32(0.0),
        "_FillValue": -32767,
    },
    "time": {
        "units": "hours since 1900-01-01 00:00:00.0",
        "calendar": "gregorian",
        "dtype": "int32",
    },
}


def _nc(path: Path, ds: xr.Dataset) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path, engine="h5netcdf", encoding=NC_ENC)
    return path


def netcdf_single(src: Path) -> list[Step]:
    """One file, lazily open: the source carries netCDF encodings. task_size=1: many tasks."""
    p = _nc(src / "era5.nc", era5_like())
    return [Step(xr.open_dataset(p, engine="h5netcdf"), {}, {"task_size": 1})]


def netcdf_mfdataset(src: Path) -> list[Step]:
    full = era5_like()
    p1 = _nc(src / "era5_1.nc", full.isel(time=slice(0, 12)))
    p2 = _nc(src / "era5_2.nc", full.isel(time=slice(12, None)))
    return [Step(xr.open_mfdataset([p1, p2], engine="h5netcdf", combine="by_coords"), {})]


# ---------------------------------------------------------------------------------------------
# Sequences


def _appends(
    full: xr.Dataset,
    cuts: list[int],
    first: dict[str, Any],
    ours: dict[str, Any] | None = None,
    mode: str = "a",
    dim: str = "time",
) -> list[Step]:
    bounds = [0, *cuts, full.sizes[dim]]
    steps = [
        Step(
            full.isel({dim: slice(bounds[0], bounds[1])}), {"mode": "w-", **first}, dict(ours or {})
        )
    ]
    for a, b in itertools.pairwise(bounds[1:]):
        steps.append(
            Step(full.isel({dim: slice(a, b)}), {"mode": mode, "append_dim": dim}, dict(ours or {}))
        )
    return steps


def append_simple(src: Path) -> list[Step]:
    return _appends(simple(), [8, 13, 14], {"encoding": {"a": {"chunks": (4, 5)}}})


def append_era5_packed(src: Path) -> list[Step]:
    return _appends(
        era5_like(),
        [10, 11, 18],
        {"encoding": _with_chunks(packing("f8"), ERA5_CHUNKS)},
        {"task_size": 1},
    )


def append_era5_packed_f32scale(src: Path) -> list[Step]:
    return _appends(era5_like(), [12, 18], {"encoding": _with_chunks(packing("f4"), ERA5_CHUNKS)})


def append_era5_time_encoded(src: Path) -> list[Step]:
    enc = _with_chunks(packing("f8"), ERA5_CHUNKS)
    enc["time"] = {
        "units": "hours since 1900-01-01 00:00:00",
        "calendar": "gregorian",
        "dtype": "int32",
    }
    return _appends(era5_like(), [7, 20], {"encoding": enc})


def append_datetime_plain(src: Path) -> list[Step]:
    """No time encoding: the first write picks units from the first part's values."""
    full = simple()
    # the appended part starts on a minute boundary the first part's units cannot express
    full = full.assign_coords(
        time=full.time.values
        + np.where(np.arange(NT) >= 12, np.timedelta64(90, "s"), np.timedelta64(0, "s"))
    )
    return _appends(full, [12, 18], {"encoding": {"a": {"chunks": (4, 5)}}})


def append_datetime_var_nat(src: Path) -> list[Step]:
    enc = {v: {"chunks": (4, 5)} for v in ("a", "valid_time", "step")}
    return _appends(_datetime_vars(), [9, 10, 17], {"encoding": enc})


def append_cftime_noleap(src: Path) -> list[Step]:
    return _appends(_cftime_ds("noleap"), [8, 15], {"encoding": {"a": {"chunks": (4, 5)}}})


def append_cftime_360day(src: Path) -> list[Step]:
    return _appends(
        _cftime_ds("360_day"),
        [5, 6, 20],
        {"encoding": {"a": {"chunks": (3, 10)}}},
        {"task_size": 1},
    )


def append_dask(src: Path) -> list[Step]:
    full = era5_like().chunk({"time": 6})
    return _appends(full, [12, 18], {"encoding": _with_chunks({}, ERA5_CHUNKS)})


def append_sharded(src: Path) -> list[Step]:
    enc = {v: {"chunks": (2, 10, 15), "shards": (6, 20, 30)} for v in ("t2m", "u10", "v10")}
    return _appends(era5_like(), [6, 15], {"encoding": enc})


def append_strings(src: Path) -> list[Step]:
    ds = simple()
    ds["label"] = (("time", "x"), np.array(_words(NT * 10), dtype=object).reshape(NT, 10))
    return _appends(
        ds, [7, 16], {"encoding": {"label": {"chunks": (6, 5)}, "a": {"chunks": (6, 5)}}}
    )


def append_nested_group(src: Path) -> list[Step]:
    steps = _appends(era5_like(), [12, 18], {"encoding": _with_chunks(packing("f8"), ERA5_CHUNKS)})
    for s in steps:
        s.kwargs["group"] = "a/b"
    return steps


def append_a_minus(src: Path) -> list[Step]:
    """mode="a-": append along time; variables without time (lsm, lat, lon) are not rewritten."""
    return _appends(
        era5_like(), [12, 18], {"encoding": _with_chunks(packing("f8"), ERA5_CHUNKS)}, mode="a-"
    )


def add_variable_mode_a(src: Path) -> list[Step]:
    """mode="a" without append_dim: add a new variable to an existing group."""
    ds = era5_like()
    first = ds[["t2m", "u10"]]
    rng = _rng(9)
    new = ds[["lsm"]].drop_vars("lsm")
    new["sp"] = (
        ("time", "lat", "lon"),
        (rng.random((NT, NLAT, NLON)) * 1000 + 90000).astype("f4"),
        {"units": "Pa"},
    )
    return [
        Step(
            first,
            {
                "mode": "w-",
                "encoding": {
                    k: {**packing("f8")[k], "chunks": ERA5_CHUNKS[k]} for k in ("t2m", "u10")
                },
            },
        ),
        Step(new, {"mode": "a", "encoding": {"sp": {"chunks": (6, 10, 15)}}}),
    ]


def add_variable_mode_a_nested(src: Path) -> list[Step]:
    steps = add_variable_mode_a(src)
    for s in steps:
        s.kwargs["group"] = "a/b"
    return steps


def rplus_whole(src: Path) -> list[Step]:
    enc = _with_chunks(packing("f8"), ERA5_CHUNKS)
    return [
        Step(era5_like(seed=0), {"mode": "w-", "encoding": enc}),
        Step(era5_like(seed=1), {"mode": "r+"}, {"task_size": 1}),
    ]


def _region_piece(ds: xr.Dataset, dim: str, sl: slice) -> xr.Dataset:
    """to_zarr(region=...) requires dropping the variables without the region dim."""
    piece = ds.isel({dim: sl})
    return piece.drop_vars([k for k, v in piece.variables.items() if dim not in v.dims])


def rplus_region(src: Path) -> list[Step]:
    enc = _with_chunks(packing("f8"), ERA5_CHUNKS)
    sl = slice(6, 18)
    return [
        Step(era5_like(seed=0), {"mode": "w-", "encoding": enc}),
        Step(_region_piece(era5_like(seed=1), "time", sl), {"mode": "r+", "region": {"time": sl}}),
    ]


def rplus_region_unaligned(src: Path) -> list[Step]:
    """A region that does not start on a chunk boundary (to_zarr allows it for numpy data)."""
    enc = {"a": {"chunks": (4, 5)}}
    sl = slice(5, 14)
    return [
        Step(simple(seed=0), {"mode": "w-", "encoding": enc}),
        Step(_region_piece(simple(seed=1), "time", sl), {"mode": "r+", "region": {"time": sl}}),
    ]


def rplus_region_auto(src: Path) -> list[Step]:
    enc = _with_chunks(packing("f8"), ERA5_CHUNKS)
    piece = era5_like(seed=1).isel(time=slice(12, 24)).drop_vars(["lsm"])
    return [
        Step(era5_like(seed=0), {"mode": "w-", "encoding": enc}),
        Step(piece, {"mode": "r+", "region": "auto"}),
    ]


def rplus_region_cftime(src: Path) -> list[Step]:
    sl = slice(8, 16)
    return [
        Step(_cftime_ds("noleap", seed=0), {"mode": "w-", "encoding": {"a": {"chunks": (4, 5)}}}),
        Step(
            _region_piece(_cftime_ds("noleap", seed=1), "time", sl),
            {"mode": "r+", "region": {"time": sl}},
        ),
    ]


# ---------------------------------------------------------------------------------------------

SINGLE = [
    era5_packed,
    era5_packed_f32scale,
    era5_packed_defaults,
    era5_time_encoded,
    datetime_coord_plain,
    datetime_coord_encoded,
    datetime_coord_units_only,
    datetime_var_nat,
    datetime_var_nat_encoded,
    cftime_noleap,
    cftime_360day,
    cftime_encoded,
    dtypes,
    strings_object,
    strings_object_missing,
    strings_fixed_unicode,
    strings_fixed_bytes,
    string_station_coord,
    scalar_variable,
    size_zero_dim,
    mixed_chunks,
    numpy_auto_chunks,
    numpy_no_encoding,
    dask_coarser_than_zarr,
    dask_finer_than_zarr,
    dask_misaligned,
    dask_no_encoding,
    dask_packed,
    sharded,
    sharded_packed,
    nested_group,
    two_groups,
    netcdf_single,
    netcdf_mfdataset,
]

SEQUENCES = [
    append_simple,
    append_era5_packed,
    append_era5_packed_f32scale,
    append_era5_time_encoded,
    append_datetime_plain,
    append_datetime_var_nat,
    append_cftime_noleap,
    append_cftime_360day,
    append_dask,
    append_sharded,
    append_strings,
    append_nested_group,
    append_a_minus,
    add_variable_mode_a,
    add_variable_mode_a_nested,
    rplus_whole,
    rplus_region,
    rplus_region_unaligned,
    rplus_region_auto,
    rplus_region_cftime,
]


def case_id(build: Callable[..., list[Step]]) -> str:
    return build.__name__.replace("_", "-")
