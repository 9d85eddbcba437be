"""``icd.ingest`` end to end: engines, the dry run, refusals, the append cron, resume, S3.

What is stored is compared with ``xr.open_mfdataset`` of the same files (the metadata-level
comparison with ``to_zarr`` is tests/parity/test_parity_ingest.py).
"""

from __future__ import annotations

import os

import boto3
import dask
import numpy as np
import pytest
import xarray as xr
import zarr

import icechunk_distributed as icd
import s3
from conftest import make_repo, read_back
from icechunk_distributed.errors import TemplateMismatchError
from icechunk_distributed.filemap import FileLoader
from icechunk_distributed.sources import SourceOptions, glob_pattern
from ingest_files import day, days, write
from killing import kill_when

moto_endpoint = s3.moto_endpoint


def expected(paths: list[str], engine: str = "h5netcdf") -> xr.Dataset:
    """``open_mfdataset`` of the files, stored with ``to_zarr`` and read back as we read ours
    (a float32 ``scale_factor`` comes back from Zarr's JSON as float64, for both)."""
    store = zarr.storage.MemoryStore()
    # In this process even where a dask client is the default (a worker's copy of an
    # in-memory store would be lost).
    with (
        dask.config.set(scheduler="synchronous"),
        xr.set_options(use_new_combine_kwarg_defaults=True),
        xr.open_mfdataset(paths, engine=engine, combine="by_coords") as ds,
    ):
        if engine == "zarr":  # Zarr v2 codecs cannot write v3 arrays: the defaults
            for var in ds.variables.values():
                for key in ("compressor", "compressors", "filters", "serializer"):
                    var.encoding.pop(key, None)
        ds.to_zarr(store, consolidated=False)
    return xr.open_zarr(store, consolidated=False, chunks=None).load()


def history(repo, branch="main") -> list[str]:
    return [s.id for s in repo.ancestry(branch=branch)]


@pytest.fixture(params=["serial", "threads", "processes", "dask", "ray"])
def engine(request):
    if request.param == "dask":
        return request.getfixturevalue("dask_client")
    if request.param == "ray":
        request.getfixturevalue("ray_engine")
    return request.param


def test_ingest_on_every_engine(tmp_path, engine):
    paths = days(tmp_path, [3, 0, 2, 1, 4, 5])
    repo = make_repo(tmp_path / "repo")
    result = icd.ingest(
        str(tmp_path / "d*.nc"), repo, concat_dim="time", executor=engine, progress=False
    )
    assert result.files == sorted(paths) and result.skipped == []
    assert result.snapshot_id == history(repo)[0]
    assert result.write is not None and result.write.branch == "main"
    xr.testing.assert_identical(read_back(repo), expected(paths))
    assert "ingested 6 file(s)" in result.summary()


def test_the_dry_run_names_each_tasks_files_and_writes_nothing(tmp_path):
    days(tmp_path, range(5))  # 5 files of 4 steps; chunks of 6 straddle them
    repo = make_repo(tmp_path / "repo")
    before = history(repo)
    plan = icd.plan_ingest(
        str(tmp_path / "*.nc"), repo, concat_dim="time", chunks={"time": 6}, task_size=1
    )
    assert [r["time"] for r in plan.regions] == [slice(0, 6), slice(6, 12), slice(12, 18),
                                                 slice(18, 20)]  # fmt: skip
    names = [[os.path.basename(p) for p in plan.files_of(r)] for r in plan.regions]
    assert names == [["d00.nc", "d01.nc"], ["d01.nc", "d02.nc"], ["d03.nc", "d04.nc"],
                     ["d04.nc"]]  # fmt: skip
    assert "5 file(s) to write" in plan.summary() and "4 task(s)" in plan.summary()
    assert history(repo) == before and sorted(repo.list_branches()) == ["main"]
    result = icd.ingest(
        str(tmp_path / "*.nc"), repo, concat_dim="time", chunks={"time": 6}, task_size=1
    )
    assert [t.region for t in result.write.tasks] == plan.regions


def test_progress_callbacks_see_the_scan_then_the_write(tmp_path):
    paths = days(tmp_path, range(3))
    events = []
    result = icd.ingest(
        paths, make_repo(tmp_path / "repo"), concat_dim="time", task_size=1,
        progress=events.append,
    )  # fmt: skip
    done = [(e.stage, e.n_total) for e in events if e.kind == "done"]
    assert done == [("scan", 3)] * 3 + [("write", result.write.n_regions)] * 3


def test_small_files_are_grouped_several_per_task(tmp_path):
    paths = days(tmp_path, range(12))
    repo = make_repo(tmp_path / "repo")
    result = icd.ingest(paths, repo, concat_dim="time", executor="threads", workers=1)
    assert result.write is not None and result.write.n_regions < len(paths)
    xr.testing.assert_identical(read_back(repo), expected(paths))


def test_loader_reads_only_the_overlapping_part_of_each_file(tmp_path):
    paths = days(tmp_path, range(3))
    loader = FileLoader(tuple(paths), (0, 4, 8), (4, 4, 4), "time", ("t2m",), None, None)
    assert [(os.path.basename(p), s) for p, s in loader.parts(3, 9)] == [
        ("d00.nc", slice(3, 4)),
        ("d01.nc", slice(0, 4)),
        ("d02.nc", slice(0, 1)),
    ]
    piece = loader({"time": slice(3, 9)})
    xr.testing.assert_identical(piece["t2m"], expected(paths)["t2m"].isel(time=slice(3, 9)))


def test_one_chunk_along_the_concat_dim_is_one_task_not_the_coordinator(tmp_path):
    paths = days(tmp_path, range(3))
    repo = make_repo(tmp_path / "repo")
    result = icd.ingest(paths, repo, concat_dim="time", chunks={"time": -1}, workers=4)
    assert result.write is not None and result.write.n_regions == 1
    assert result.write.n_chunks == 2  # t2m and rain, one chunk each, by the task
    xr.testing.assert_identical(read_back(repo), expected(paths))


def test_cftime_calendars_and_their_steps(tmp_path):
    def noleap(i):
        ds = day(i)
        times = xr.date_range("2001-02-27", periods=12, freq="6h", calendar="noleap")
        return ds.assign_coords(time=times[4 * i : 4 * i + 4])

    paths = write(tmp_path, {f"d{i}.nc": noleap(i) for i in (2, 0, 1)})
    repo = make_repo(tmp_path / "repo")
    icd.ingest(paths, repo, concat_dim="time", step="6h")
    xr.testing.assert_identical(read_back(repo), expected(paths))
    assert read_back(repo).time.dt.calendar == "noleap"


def test_zarr_v2_sources_get_the_default_codecs(tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"d{i}.zarr"
        day(i).to_zarr(path, zarr_format=2, consolidated=True)
        paths.append(str(path))
    repo = make_repo(tmp_path / "repo")
    icd.ingest(str(tmp_path / "*.zarr"), repo, concat_dim="time")
    xr.testing.assert_identical(read_back(repo), expected(paths, engine="zarr"))


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("era/*.nc", "era/d00.nc", True),
        ("era/*.nc", "era/old/d00.nc", False),  # * stays inside one segment, as in glob
        ("a*/x.nc", "a1/sub/x.nc", False),
        ("**/*.nc", "top.nc", True),  # **/ is zero or more segments
        ("**/*.nc", "a/b/c.nc", True),
        ("d[0-1]?.nc", "d05.nc", True),
        ("d[!0]?.nc", "d05.nc", False),
    ],
)
def test_s3_globs_match_like_local_globs(pattern, key, matches):
    assert bool(glob_pattern(pattern).fullmatch(key)) is matches


# -- refusals: each before anything is written


def _odd_files(tmp_path, case):
    if case == "variables":
        return write(tmp_path, {"d0.nc": day(0), "d1.nc": day(1, extra=True)}), r"variables"
    if case == "dtypes":
        return write(tmp_path, {"d0.nc": day(0), "d1.nc": day(1, dtype="f8")}), r"dtypes"
    if case == "overlap":
        odd = day(0).isel(time=slice(2, None))
        return write(tmp_path, {"d0.nc": day(0), "d1.nc": odd}), r"overlap"
    if case == "repeat":
        return write(tmp_path, {"d0.nc": day(0), "d1.nc": day(0)}), r"repeat"
    if case == "coordinate":
        odd = day(1).set_coords("rain")
        return write(tmp_path, {"d0.nc": day(0), "d1.nc": odd}), r"in their coordinates"
    if case == "some-without-times":
        odd = day(1).drop_vars("time")
        return write(tmp_path, {"d0.nc": day(0), "d1.nc": odd}), r"have no 'time' coordinate"
    if case == "empty":
        odd = day(1).isel(time=slice(0, 0))
        return write(tmp_path, {"d0.nc": day(0), "d1.nc": odd}), r"no 'time' steps: .*d1.nc"
    if case == "missing":
        return [*days(tmp_path, [0]), str(tmp_path / "nope.nc")], r"no such file: .*nope.nc"
    if case == "no-match":
        return [str(tmp_path / "*.grib")], r"\*.grib \(matches nothing\)"
    broken = tmp_path / "broken.nc"
    broken.write_bytes(b"not a netCDF file")
    return [*days(tmp_path, [0]), str(broken)], r"could not be read:\n.*broken.nc"


@pytest.mark.parametrize(
    "case",
    [
        *("variables", "dtypes", "overlap", "repeat", "coordinate", "some-without-times"),
        *("empty", "missing", "no-match", "unreadable"),
    ],
)
def test_bad_file_sets_are_refused_before_anything_is_written(tmp_path, case):
    paths, match = _odd_files(tmp_path, case)
    repo = make_repo(tmp_path / "repo")
    before = history(repo)
    error = FileNotFoundError if case in ("missing", "no-match") else TemplateMismatchError
    with pytest.raises(error, match=match):
        icd.ingest(paths, repo, concat_dim="time", retries=0, progress=False)
    assert history(repo) == before and sorted(repo.list_branches()) == ["main"]


def test_a_gap_is_refused_when_the_step_is_given(tmp_path):
    paths = days(tmp_path, [0, 1, 3])
    repo = make_repo(tmp_path / "repo")
    with pytest.raises(TemplateMismatchError, match=r"gap in 'time': .*d01.nc ends at .*d03.nc"):
        icd.ingest(paths, repo, concat_dim="time", step="6h")
    icd.ingest(paths[:2], repo, concat_dim="time", step="6h")  # no gap: fine
    tenths = [day(i).assign_coords(time=np.arange(4 * i, 4 * i + 4) / 10) for i in range(3)]
    numeric = write(tmp_path, {f"n{i}.nc": ds for i, ds in enumerate(tenths)})
    plan = icd.plan_ingest(numeric, concat_dim="time", step=0.1)  # 0.1 + 0.2 != 0.3: close
    assert plan.files is not None and plan.files.size == 12
    with pytest.raises(ValueError, match="not a time step"):
        icd.plan_ingest(paths, concat_dim="time", step="often")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"concat_dim": ""}, TypeError, "concat_dim must be a dimension name"),
        ({"concat_dim": "time", "mode": "r+"}, ValueError, "mode must be 'w-'"),
        ({"concat_dim": "time", "chunks": {"time": 0}}, ValueError, r"chunks\['time'\]"),
        ({"concat_dim": "time", "chunks": 24}, TypeError, "chunks must be a dict"),
        ({"concat_dim": "x"}, TemplateMismatchError, "no dimension 'x'"),
        ({"concat_dim": "time", "chunks": {"tme": 3}}, ValueError, r"do not have: \['tme'\]"),
        ({"concat_dim": "time", "run_id": "bad id"}, ValueError, "run_id must be"),
        ({"concat_dim": "time", "retries": -1}, ValueError, "retries"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, error, match):
    paths = days(tmp_path, [0, 1])
    repo = make_repo(tmp_path / "repo")
    with pytest.raises(error, match=match):
        icd.ingest(paths, repo, progress=False, **kwargs)
    assert sorted(repo.list_branches()) == ["main"] and len(history(repo)) == 1


def test_creating_over_an_existing_dataset_is_refused(tmp_path):
    paths = days(tmp_path, [0, 1])
    repo = make_repo(tmp_path / "repo")
    icd.ingest(paths[:1], repo, concat_dim="time")
    before = history(repo)
    with pytest.raises(Exception, match=r"already holds .* mode='w-' only creates"):
        icd.ingest(paths, repo, concat_dim="time")
    assert history(repo) == before
    icd.ingest(paths, repo, concat_dim="time", mode="w")  # overwrite: asked for
    xr.testing.assert_identical(read_back(repo), expected(paths))


# -- append


def test_the_daily_cron_appends_new_files_and_skips_stored_ones(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    repo = make_repo(tmp_path / "repo")
    pattern = str(src / "*.nc")
    days(src, range(3))
    first = icd.ingest(pattern, repo, concat_dim="time", mode="a", chunks={"time": 4})
    assert len(first.files) == 3 and first.skipped == []  # an empty store: created
    new = days(src, [3, 4])
    second = icd.ingest(pattern, repo, concat_dim="time", mode="a", step="6h")
    assert second.files == new and len(second.skipped) == 3
    assert "skipped 3 file(s)" in second.summary()
    commits = history(repo)
    third = icd.ingest(pattern, repo, concat_dim="time", mode="a")
    assert third.write is None and third.snapshot_id is None and len(third.skipped) == 5
    assert history(repo) == commits  # nothing new: no commit
    assert "nothing to write" in third.summary()
    xr.testing.assert_identical(read_back(repo), expected(sorted(map(str, src.iterdir()))))


def _shifted(i: int, hours: int) -> xr.Dataset:
    ds = day(i)
    return ds.assign_coords(time=ds.time + np.timedelta64(hours, "h"))


@pytest.mark.parametrize(
    ("odd", "match"),
    [
        (_shifted(1, 12), r"odd.nc is partly in the store: 2 of its 4 'time' values"),
        (_shifted(1, -3), r"1 file\(s\) have 'time' values inside the stored range.*odd.nc"),
        (_shifted(0, 1), r"inside the stored range, which ends at 2026-01-02T18"),
    ],
)
def test_an_append_that_would_rewrite_stored_values_is_refused(tmp_path, odd, match):
    repo = make_repo(tmp_path / "repo")
    icd.ingest(days(tmp_path, [0, 1]), repo, concat_dim="time")
    before = history(repo)
    (tmp_path / "new").mkdir()
    (path,) = write(tmp_path / "new", {"odd.nc": odd})
    with pytest.raises(TemplateMismatchError, match=match):
        icd.ingest(path, repo, concat_dim="time", mode="a")
    assert history(repo) == before


@pytest.mark.parametrize(
    ("odd", "match"),
    [
        (day(2, dtype="f8"), r"'t2m' in the files to append .*d02.nc.* dtype float64; .* float32"),
        (day(2, extra=True), r"do not have the stored variables: not in the store \['wind'\]"),
        (day(2).drop_vars("rain"), r"do not have the stored variables: missing \['rain'\]"),
    ],
)
def test_an_append_of_files_unlike_the_store_is_refused(tmp_path, odd, match):
    repo = make_repo(tmp_path / "repo")
    icd.ingest(days(tmp_path, [0, 1]), repo, concat_dim="time")
    before = history(repo)
    (tmp_path / "new").mkdir()
    with pytest.raises(TemplateMismatchError, match=match):
        icd.ingest(write(tmp_path / "new", {"d02.nc": odd}), repo, concat_dim="time", mode="a")
    assert history(repo) == before


def test_an_append_keeps_the_stored_static_variables(tmp_path):
    # open_mfdataset of all the files takes the first file's mask: so does the store.
    def masked(i, value):
        return day(i).assign(mask=("y", np.full(3, value, "f4")))

    paths = write(tmp_path, {f"d{i}.nc": masked(i, float(i)) for i in range(3)})
    repo = make_repo(tmp_path / "repo")
    icd.ingest(paths[:2], repo, concat_dim="time")
    icd.ingest(paths, repo, concat_dim="time", mode="a")
    stored = read_back(repo)
    np.testing.assert_array_equal(stored["mask"], np.zeros(3, "f4"))
    xr.testing.assert_identical(stored, expected(paths))


def test_an_append_that_the_stored_time_units_would_round_is_refused(tmp_path):
    repo = make_repo(tmp_path / "repo")
    daily = [day(i).isel(time=[0]) for i in range(2)]
    daily[0]["time"].encoding.update({"units": "days since 2026-01-01", "dtype": "int64"})
    paths = write(tmp_path, {"d0.nc": daily[0], "d1.nc": daily[1]})
    icd.ingest(paths[:1], repo, concat_dim="time")
    before = history(repo)
    six_hourly = write(tmp_path, {"d2.nc": day(2)})  # 06:00 is no whole day
    with pytest.raises(TemplateMismatchError, match=r"cannot be stored exactly .* rounded"):
        icd.ingest(six_hourly, repo, concat_dim="time", mode="a")
    icd.ingest(paths, repo, concat_dim="time", mode="a")  # whole days: fine
    assert len(history(repo)) == len(before) + 1


def test_an_append_without_a_stored_coordinate_along_the_dim_is_refused(tmp_path):
    repo = make_repo(tmp_path / "repo")
    first = day(0).assign_coords(valid=("time", np.arange(4)))
    icd.ingest(write(tmp_path, {"d0.nc": first}), repo, concat_dim="time")
    with pytest.raises(TemplateMismatchError, match=r"missing \[\"coordinate 'valid'\"\]"):
        icd.ingest(days(tmp_path, [1]), repo, concat_dim="time", mode="a")


def test_a_bad_run_id_fails_even_with_nothing_to_write(tmp_path):
    paths = days(tmp_path, [0])
    repo = make_repo(tmp_path / "repo")
    icd.ingest(paths, repo, concat_dim="time")
    with pytest.raises(ValueError, match="run_id must be"):
        icd.ingest(paths, repo, concat_dim="time", mode="a", run_id="bad id")


def test_an_append_after_a_gap_is_refused_when_the_step_is_given(tmp_path):
    repo = make_repo(tmp_path / "repo")
    icd.ingest(days(tmp_path, [0]), repo, concat_dim="time")
    with pytest.raises(TemplateMismatchError, match=r"the store ends at .*d02.nc starts"):
        icd.ingest(days(tmp_path, [2]), repo, concat_dim="time", mode="a", step="6h")


# -- resume after the coordinator is killed

COORDINATOR = """
import sys, time
import icechunk, icechunk_distributed as icd
from icechunk_distributed.filemap import FileLoader

read = FileLoader._read
def gated(self, region, names):
    # The second half never finishes: the run makes progress but cannot end before the
    # test kills it, however busy the machine.
    while region["time"].start >= 48:
        time.sleep(0.05)
    return read(self, region, names)
FileLoader._read = gated
repo = icechunk.Repository.open(icechunk.local_filesystem_storage(sys.argv[1]))
icd.ingest(sys.argv[2], repo, concat_dim="time", mode="a", run_id="daily", task_size=1,
           checkpoint_every=0.05, executor="threads", workers=2, progress=False)
"""


def test_a_killed_ingest_resumes_with_its_run_id(tmp_path):
    repo = make_repo(tmp_path / "repo")
    src = tmp_path / "src"
    src.mkdir()
    icd.ingest(days(src, [0, 1]), repo, concat_dim="time", chunks={"time": 4})
    paths = days(src, range(2, 26))
    before = history(repo)

    def far_enough() -> bool:
        runs = icd.list_runs(repo)
        return bool(runs) and runs[0].n_done >= 4

    args = [str(tmp_path / "repo"), str(src / "*.nc")]
    kill_when(COORDINATOR, args, far_enough, tmp_path / "coordinator.log")
    (run,) = icd.list_runs(repo)
    done = run.n_done
    assert 4 <= done <= 12 and history(repo) == before  # nothing published yet
    result = icd.ingest(
        str(src / "*.nc"), repo, concat_dim="time", mode="a", run_id="daily", task_size=1
    )
    assert result.write is not None and result.write.n_resumed == done
    assert len(result.write.tasks) == 24 - done and len(result.skipped) == 2
    xr.testing.assert_identical(read_back(repo), expected(sorted(map(str, src.iterdir()))))
    # Published once, on top of what was there (the run's checkpoints are its history).
    assert sorted(repo.list_branches()) == ["main"] and history(repo)[-len(before) :] == before
    assert paths[-1] in result.files


# -- S3 sources


def test_s3_sources_with_options_that_never_show(tmp_path, moto_endpoint):
    bucket = s3.create_bucket(moto_endpoint)
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name=s3.REGION,
        aws_access_key_id=s3.ACCESS_KEY_ID,
        aws_secret_access_key=s3.SECRET_ACCESS_KEY,
    )
    paths = days(tmp_path, [2, 0, 1])
    zarr_path = write(tmp_path, {"d03.zarr": day(3)})[0]
    for path in paths:
        client.upload_file(path, bucket, f"era/{os.path.basename(path)}")
    for root, _, names in os.walk(zarr_path):
        for name in names:
            key = os.path.relpath(os.path.join(root, name), tmp_path)
            client.upload_file(os.path.join(root, name), bucket, f"zarr/{key}")
    options = {
        "endpoint": moto_endpoint,
        "region": s3.REGION,
        "access_key_id": s3.ACCESS_KEY_ID,
        "secret_access_key": s3.SECRET_ACCESS_KEY,
        "allow_http": True,
    }
    assert s3.SECRET_ACCESS_KEY not in repr(SourceOptions(options))
    repo = make_repo(tmp_path / "repo")
    result = icd.ingest(
        f"s3://{bucket}/era/*.nc",
        repo,
        concat_dim="time",
        executor="processes",
        workers=2,
        source_options=options,
        progress=False,
    )
    assert result.files == [f"s3://{bucket}/era/d{i:02d}.nc" for i in range(3)]
    xr.testing.assert_identical(read_back(repo), expected(sorted(paths)))
    appended = icd.ingest(
        f"s3://{bucket}/zarr/*.zarr",
        repo,
        concat_dim="time",
        mode="a",
        source_options=options,
        progress=False,
    )
    assert appended.files == [f"s3://{bucket}/zarr/d03.zarr"]
    stored = read_back(repo)
    assert stored.sizes["time"] == 16
    with pytest.raises(FileNotFoundError) as missing:
        icd.ingest(f"s3://{bucket}/nope/*.nc", repo, concat_dim="time", source_options=options)
    with pytest.raises(TemplateMismatchError) as unreadable:
        icd.ingest(
            [f"s3://{bucket}/era/d00.nc", f"s3://{bucket}/era/absent.nc"],
            repo,
            concat_dim="time",
            mode="a",
            retries=0,
            source_options=options,
            progress=False,
        )
    for error in (missing.value, unreadable.value):
        assert s3.SECRET_ACCESS_KEY not in str(error) and "absent.nc" in str(unreadable.value)
