"""Scanning source files for an ingest: headers read on the executor, combined and checked."""

import numpy as np
import pytest
import xarray as xr

from icechunk_distributed.errors import TemplateMismatchError
from icechunk_distributed.scan import combine_headers, read_header, scan_files
from ingest_files import day, write


@pytest.mark.parametrize("executor", ["serial", "threads", "processes"])
def test_headers_are_read_on_the_executor_and_ordered_by_their_values(tmp_path, executor):
    paths = write(tmp_path, {f"d{i}.nc": day(i) for i in (2, 0, 1)})
    headers = scan_files(paths, "time", executor=executor, progress=False)
    assert [h.path for h in headers] == paths  # in the order given
    files = combine_headers(headers, "time")
    assert [h.path.rsplit("/", 1)[1] for h in files.headers] == ["d0.nc", "d1.nc", "d2.nc"]
    assert (files.offsets, files.size) == ([0, 4, 8], 12)
    expected = xr.open_mfdataset(paths, engine="h5netcdf", combine="by_coords")
    assert np.array_equal(
        np.concatenate([h.concat_values for h in files.headers]), expected["time"].values
    )
    assert files.headers[0].variables["rain"].dtype == "float32"  # decoded, as xarray opens it


def test_the_given_order_is_kept_but_must_increase(tmp_path):
    paths = write(tmp_path, {f"d{i}.nc": day(i) for i in (0, 1)})
    headers = [read_header(p, "time") for p in paths]
    assert combine_headers(headers, "time", order="given").offsets == [0, 4]
    with pytest.raises(TemplateMismatchError, match=r"d1.nc and .*d0.nc overlap"):
        combine_headers(headers[::-1], "time", order="given")


@pytest.mark.parametrize(
    ("odd", "match"),
    [
        (day(1, extra=True), r"differ from .*d0.nc in their variables: .*d1.nc"),
        (day(1, dtype="f8"), r"in their dtypes.*'t2m': 'float32'.*'t2m': 'float64'"),
        (day(1, ny=4), r"in their sizes.*\{'y': 3\}.*\{'y': 4\}"),
        (day(1).assign_coords(y=np.arange(3) * 11.0), r"other values of coordinate 'y'"),
        (day(0), r"'time' values of .*d0.nc and .*d1.nc repeat"),
        (day(0).isel(time=slice(2, None)), r"d0.nc and .*d1.nc overlap"),
    ],
)
def test_files_that_cannot_form_one_dataset_are_refused_naming_them(tmp_path, odd, match):
    paths = write(tmp_path, {"d0.nc": day(0), "d1.nc": odd})
    with pytest.raises(TemplateMismatchError, match=match):
        combine_headers(scan_files(paths, "time", progress=False), "time")


def test_a_file_without_the_concat_dimension_is_refused(tmp_path):
    paths = write(tmp_path, {"d0.nc": day(0), "static.nc": day(0).isel(time=0, drop=True)})
    with pytest.raises(TemplateMismatchError, match=r"have no dimension 'time': .*static.nc"):
        combine_headers(scan_files(paths, "time", progress=False), "time")


def test_missing_and_unreadable_files_are_named(tmp_path):
    paths = write(tmp_path, {"d0.nc": day(0)})
    with pytest.raises(FileNotFoundError, match=r"1 file\(s\) do not exist: .*nope.nc"):
        scan_files([*paths, str(tmp_path / "nope.nc")], "time")
    broken = tmp_path / "broken.nc"
    broken.write_bytes(b"not a netCDF file")
    with pytest.raises(
        TemplateMismatchError, match=r"1 of 2 file\(s\) could not be read:\n.*broken.nc"
    ):
        scan_files([*paths, str(broken)], "time", retries=0, progress=False)
