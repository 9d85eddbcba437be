"""Encodings decided once, on the coordinator, as Dataset.to_zarr decides them; the plan
that follows from them; and the xarray internals this relies on (pinned here, so that a
change in xarray fails loudly instead of changing what is written)."""

import cftime
import numpy as np
import pytest
import xarray as xr
import zarr

import icechunk_distributed as icd
from icechunk_distributed.template import pinned_chunks


def lazy_zeros(shape, dtype="f4"):
    """A numpy array of any size without the memory (a broadcast view)."""
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


# -- the private xarray names we use -------------------------------------------------------


def test_xarray_internals_we_rely_on():
    from xarray.backends.zarr import encode_zarr_variable
    from xarray.coding.strings import check_vlen_dtype
    from xarray.core.common import contains_cftime_datetimes

    times = xr.Variable(("t",), np.datetime64("2024-01-01", "ns") + np.arange(3) * 3600 * 10**9)
    encoded = encode_zarr_variable(times, name="t", zarr_format=3)
    assert encoded.attrs["units"] == "hours since 2024-01-01 00:00:00"
    assert encoded.dtype == np.int64
    cf = xr.Variable(("t",), np.array([cftime.datetime(2000, 1, 1, calendar="noleap")]))
    assert contains_cftime_datetimes(cf) and not contains_cftime_datetimes(times)
    assert check_vlen_dtype(np.dtype("f4")) is None


def test_to_zarr_with_compute_false_writes_no_dask_data(tmp_path):
    """The metadata step relies on it: lazy stand-ins are never computed or written."""
    import dask.array as da

    def boom(x):
        raise AssertionError("computed")

    lazy = da.zeros((4,), chunks=2).map_blocks(boom, dtype="f8")
    ds = xr.Dataset({"a": ("x", lazy)})
    store = zarr.storage.LocalStore(str(tmp_path))
    ds.to_zarr(store, compute=False, consolidated=False)
    assert zarr.open_array(store, path="a").nchunks_initialized == 0


# -- what to_zarr would decide from the data -------------------------------------------------


def test_numpy_variables_get_zarrs_default_chunks():
    var = xr.Variable(("t", "y", "x"), lazy_zeros((200, 500, 600)))
    assert pinned_chunks(var, "a", {}) == {"chunks": (25, 125, 150)}
    packed = pinned_chunks(var, "a", {"dtype": "int16", "scale_factor": 0.1})
    int16 = zarr.create_array(zarr.storage.MemoryStore(), shape=var.shape, dtype="i2")
    assert packed["chunks"] == int16.chunks  # zarr sizes chunks by the encoded dtype
    assert pinned_chunks(var, "a", {"chunks": (10, 500, 600)}) == {}


def test_lazy_variables_keep_their_dask_chunks():
    var = xr.Variable(("t", "x"), lazy_zeros((10, 8))).chunk({"t": 3, "x": 8})
    assert pinned_chunks(var, "a", {}) == {"chunks": (3, 8)}


def test_numpy_times_are_encoded_by_xarray_from_all_their_values(repo):
    """valid_time (a numpy datetime64 data variable with NaT) gets the units to_zarr infers
    from the whole variable, not one per task (the parity harness compares everything)."""
    t = np.datetime64("2024-01-01T06", "ns") + np.arange(12) * np.timedelta64(3, "h")
    t[5] = np.datetime64("NaT")
    ds = xr.Dataset({"valid_time": ("time", t), "x": ("time", np.arange(12.0))})
    icd.run_region_writes(ds, repo, encoding={"x": {"chunks": (2,)}}, task_size=1)
    stored = zarr.open_array(repo.readonly_session("main").store, path="valid_time")
    assert stored.attrs["units"] == "hours since 2024-01-01 06:00:00"
    got = xr.open_zarr(repo.readonly_session("main").store, consolidated=False, chunks=None)
    xr.testing.assert_identical(got.load(), ds)


# -- the plan follows from the encodings -----------------------------------------------------


def test_a_large_numpy_dataset_is_split_into_many_tasks():
    ds = xr.Dataset({"a": (("time", "y", "x"), lazy_zeros((200, 500, 600)))})
    regions = icd.plan_regions(ds, parallelism=4)
    assert len(regions) > 1
    assert all(r["time"].start % 25 == 0 for r in regions)


def test_a_small_unchunked_variable_does_not_collapse_the_plan():
    ds = xr.Dataset(
        {
            "tp": (("time", "lat", "lon"), np.zeros((48, 10, 12), "f4")),
            "time_bnds": (("time", "bnds"), np.zeros((48, 2))),
            "land": (("lat", "lon"), np.ones((10, 12), "i1")),
        }
    )
    enc = {"tp": {"chunks": (4, 10, 12)}}
    regions = icd.plan_regions(ds, encoding=enc, task_size=1)
    assert len(regions) == 12  # time_bnds (one chunk) and land are the coordinator's


def test_plan_regions_is_the_run_plan(repo):
    from tasks import full_dataset

    ds = full_dataset(n_time=24)
    enc = {"Tair": {"chunks": (2, 6, 8)}, "station": {"chunks": (2,)}}
    for kwargs in ({}, {"executor": "serial"}, {"task_size": 3}):
        planned = icd.plan_regions(ds, encoding=enc, **kwargs)
        result = icd.run_region_writes(ds, repo, mode="w", encoding=enc, progress=False, **kwargs)
        assert [t.region for t in result.tasks] == planned
    new = full_dataset(n_time=8).assign_coords(time=full_dataset(n_time=32)["time"].values[24:])
    planned = icd.plan_regions(new, repo, mode="a", append_dim="time", executor="serial")
    result = icd.run_region_writes(new, repo, mode="a", append_dim="time", executor="serial")
    assert [t.region for t in result.tasks] == planned


@pytest.mark.parametrize(
    ("region", "message"),
    [
        ({"time": slice(None, None, 2)}, "step 2"),
        ({"time": [0, 1]}, "must be a slice"),
        ({"time": slice(-2, None)}, "negative"),
        ({"time": slice(0, 40)}, "outside the stored dimension"),
        ({"time": slice(0.0, 12.0)}, "bounds must be integers"),
        ({"tim": slice(0, 12)}, "dimension 'tim'"),
    ],
)
def test_bad_regions_name_the_dimension(repo, region, message):
    from tasks import full_dataset

    ds = full_dataset()
    icd.run_region_writes(ds, repo, progress=False)
    before = repo.lookup_branch("main")
    with pytest.raises(icd.InvalidRegionError, match=message):
        icd.run_region_writes(ds[["Tair"]], repo, mode="r+", region=region)
    with pytest.raises(
        icd.InvalidRegionError, match=r"step|slice|negative|bounds|dimension|outside"
    ):
        icd.run_region_writes(ds, repo, mode="r+", regions=[region])
    assert repo.lookup_branch("main") == before


def test_shifted_labels_are_refused(repo):
    from tasks import full_dataset

    ds = full_dataset(calendar=None)
    icd.run_region_writes(ds, repo, progress=False)
    shifted = ds.assign_coords(time=ds["time"].values + np.timedelta64(1, "h"))
    with pytest.raises(icd.TemplateMismatchError, match="labels differ from the store's"):
        icd.run_region_writes(shifted, repo, mode="r+")
    with pytest.raises(icd.InvalidRegionError, match="not in the store"):
        icd.run_region_writes(shifted[["Tair", "station"]], repo, mode="r+", region="auto")


def test_a_loader_returning_another_region_is_refused_without_retries(repo):
    from tasks import full_dataset

    ds = full_dataset(calendar=None)

    def other_region(region):
        s = region["time"]
        n = s.stop - s.start
        start = 0 if s.start else n  # the right shape, the wrong place
        return ds.isel(time=slice(start, start + n))

    with pytest.raises(icd.RegionWriteError, match="labels") as info:
        icd.run_region_writes(
            other_region,
            repo,
            template=ds,
            encoding={"Tair": {"chunks": (6, 6, 8)}, "station": {"chunks": (6,)}},
            executor="serial",
            retries=3,
        )
    assert {f.attempts for f in info.value.failures} == {1}
    assert isinstance(info.value.failures[0].exception, icd.PieceMismatchError)


# -- found by review: each compared with to_zarr --------------------------------------------


def _to_zarr(ds, repo, **kwargs):
    import dask

    session = repo.writable_session("main")
    # The reference write, in this process whatever dask client another test left current
    # (a distributed client would have to pickle the writable session).
    with dask.config.set(scheduler="synchronous"):
        ds.to_zarr(session.store, consolidated=False, **kwargs)
    session.commit("to_zarr")


def _read(repo):
    return xr.open_zarr(repo.readonly_session("main").store, consolidated=False).load()


def test_missing_strings_in_dask_pieces_are_written_as_to_zarr_writes_them(repo, other_repo):
    s = np.array(["a", "bb", "ccc", None, None, None, "q", "r", "s", "x", "yy", None], object)
    ds = xr.Dataset({"s": ("t", s)}, coords={"t": np.arange(12)}).chunk(t=3)
    ds["s"].encoding = {"chunks": (3,)}
    icd.run_region_writes(ds, repo, executor="serial", progress=False)
    _to_zarr(ds, other_repo)
    assert _read(repo)["s"].values.tolist() == _read(other_repo)["s"].values.tolist()
    assert _read(repo)["s"].values.tolist()[3] == ""


def test_a_loaders_coordinator_variables_keep_the_templates_metadata(repo, other_repo):
    full = xr.Dataset(
        {"x": ("time", np.arange(20, dtype="f4")), "ref": ("k", np.linspace(0, 1, 4, dtype="f4"))},
        coords={"time": np.arange(20)},
    )
    template = full.chunk(time=5)
    template["ref"].attrs = {"units": "m"}
    template["ref"].encoding = {"chunks": (2,)}
    icd.run_region_writes(
        lambda r: full.isel(r), repo, template=template, executor="serial", progress=False
    )
    _to_zarr(template, other_repo)
    xr.testing.assert_identical(_read(repo), _read(other_repo))
    assert _read(repo)["ref"].encoding["chunks"] == (2,)
    with pytest.raises(icd.TemplateMismatchError, match="dtype float64"):
        icd.run_region_writes(
            lambda r: full.assign(ref=full["ref"].astype("f8")).isel(r),
            repo,
            template=template,
            mode="w",
            executor="serial",
        )


def test_w_minus_into_an_existing_group_is_refused_as_to_zarr_refuses_it(repo, other_repo):
    first = xr.Dataset({"x": ("t", np.zeros(3))}, attrs={"keep": 1})
    second = xr.Dataset({"y": ("q", np.ones(4))}, attrs={"new": 2})
    _to_zarr(first, repo)
    before = repo.lookup_branch("main")
    with pytest.raises(icd.TemplateMismatchError, match="already exists; mode='w-' only creates"):
        icd.run_region_writes(second, repo, mode="w-")
    assert repo.lookup_branch("main") == before
    _to_zarr(first, other_repo)
    with pytest.raises(FileExistsError):
        _to_zarr(second, other_repo, mode="w-")
    icd.run_region_writes(second, repo, mode="a")  # mode "a" adds, as to_zarr(mode="a")
    _to_zarr(second, other_repo, mode="a")
    xr.testing.assert_identical(_read(repo), _read(other_repo))
