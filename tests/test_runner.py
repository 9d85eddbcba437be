"""run_region_writes end to end on every local executor, mode and source kind; failures."""

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pytest
import xarray as xr
import zarr

import icechunk_distributed as icd
from conftest import read_back
from icechunk_distributed import (
    CommitConflictError,
    InvalidRegionError,
    RegionWriteError,
    RegionWriter,
    TemplateMismatchError,
    plan_regions,
    run_region_writes,
    store_arrays,
)
from tasks import FlakyLoader, full_dataset, load_region, wrong_shape_loader

EXECUTORS = ["serial", "threads", "processes", "joblib"]
ENC = {"Tair": {"chunks": (2, 6, 8)}, "station": {"chunks": (2,)}}


def source_of(kind, ds):
    """The same data as an in-memory dataset, or as a loader with a lazy template."""
    if kind == "dataset":
        return ds, None
    return load_region, ds.chunk({"time": 2})  # the template: dask-backed, never computed


def assert_written(repo, expected, branch="main"):
    xr.testing.assert_identical(read_back(repo, branch), expected)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("kind", ["dataset", "loader"])
def test_create(repo, executor, kind):
    ds = full_dataset()
    source, template = source_of(kind, ds)
    result = run_region_writes(
        source, repo, executor=executor, template=template, encoding=ENC, progress=False
    )
    assert_written(repo, ds)
    assert result.n_regions == len(result.tasks) >= 1
    assert result.n_chunks == 12  # 6 Tair + 6 station chunks, written by tasks only
    assert result.bytes_written == ds["Tair"].variable.nbytes + ds["station"].variable.nbytes
    assert result.snapshot_id == repo.lookup_branch("main")
    assert all(t.attempts == 1 for t in result.tasks)
    info = next(iter(repo.ancestry(branch="main")))
    assert info.metadata["icechunk_distributed"]["n_regions"] == result.n_regions


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("kind", ["dataset", "loader"])
def test_overwrite(repo, executor, kind):
    ds = full_dataset()
    run_region_writes(ds * 0 + 1, repo, executor="threads", encoding=ENC, progress=False)
    source, template = source_of(kind, ds)
    run_region_writes(
        source, repo, executor=executor, template=template, mode="w", encoding=ENC, progress=False
    )
    assert_written(repo, ds)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("kind", ["dataset", "loader"])
def test_write_into_existing(repo, executor, kind):
    ds = full_dataset()
    zeros = ds.copy(data={k: np.zeros_like(v) for k, v in ds.data_vars.items()})
    run_region_writes(zeros, repo, executor="serial", encoding=ENC, progress=False)
    source, template = source_of(kind, ds)
    run_region_writes(source, repo, executor=executor, template=template, mode="r+", progress=False)
    assert_written(repo, ds)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("kind", ["dataset", "loader"])
def test_append(repo, executor, kind):
    ds = full_dataset()
    run_region_writes(
        ds.isel(time=slice(0, 7)), repo, executor="serial", encoding=ENC, progress=False
    )
    rest = ds.isel(time=slice(7, None))
    if kind == "dataset":
        source, template = rest, None
    else:
        # A lambda as loader: shipped to worker processes with cloudpickle.
        source, template = (
            (lambda r: load_region({"time": slice(r["time"].start + 7, r["time"].stop + 7)})),
            rest,
        )
    result = run_region_writes(
        source, repo, executor=executor, template=template, mode="a", append_dim="time",
        progress=False,
    )  # fmt: skip
    # The first appended region starts inside chunk 3 (index 7): one task finishes that chunk.
    assert result.tasks[0].region["time"].start == 0
    assert_written(repo, ds)


def test_datetime64_time_and_pools_given_as_objects(repo):
    ds = full_dataset(calendar=None)
    with ThreadPoolExecutor(3) as pool:
        run_region_writes(ds, repo, executor=pool, encoding=ENC, progress=False)
    assert_written(repo, ds)
    ds2 = ds + 1
    ds2.attrs = ds.attrs
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        run_region_writes(ds2, repo, executor=pool, mode="r+", progress=False)
        assert not pool._shutdown_thread  # the caller's pool is not shut down
    assert_written(repo, ds2)


def test_dask_source_and_group(repo):
    ds = full_dataset().chunk({"time": 4})
    result = run_region_writes(ds, repo, group="nested/g", progress=False)
    xr.testing.assert_identical(
        xr.open_zarr(
            repo.readonly_session("main").store, group="nested/g", consolidated=False
        ).load(),
        ds.compute(),
    )
    assert result.n_chunks == 6  # time chunks of 4: 3 Tair + 3 station


def test_commit_false_leaves_the_session_to_the_caller(repo):
    ds = full_dataset()
    session = icd.writable_session(repo)
    before = repo.lookup_branch("main")
    result = run_region_writes(ds, session, encoding=ENC, commit=False, progress=False)
    assert result.snapshot_id is None
    assert repo.lookup_branch("main") == before
    assert session.has_uncommitted_changes
    session.commit("by the caller")
    assert_written(repo, ds)


# -- retries and failures ---------------------------------------------------------------------


@pytest.mark.parametrize("executor", ["threads", "processes"])
def test_retries_count_exactly(repo, tmp_path, executor):
    ds = full_dataset()
    calls = tmp_path / "calls"
    calls.mkdir()
    result = run_region_writes(
        FlakyLoader(calls, fail_times=1), repo, template=ds.chunk({"time": 2}),
        executor=executor, retries=2, progress=False, task_size=1,
    )  # fmt: skip
    assert_written(repo, ds)
    assert [t.attempts for t in result.tasks] == [2] * 6
    # exactly two calls per region, across processes (plus the coordinator's two calls over
    # the full extent, for the variables without a region dim)
    per_region = [f for f in os.listdir(calls) if not f.startswith("0-12.")]
    assert len(per_region) == 12
    assert len(os.listdir(calls)) == 14


@pytest.mark.parametrize("executor", ["serial", "processes"])
def test_permanent_failure_commits_nothing(repo, tmp_path, executor):
    ds = full_dataset()
    run_region_writes(ds, repo, encoding=ENC, progress=False)
    before = repo.lookup_branch("main")
    events = []
    with pytest.raises(RegionWriteError) as info:
        run_region_writes(
            FlakyLoader(tmp_path, fail_times=0, always_fail=4), repo,
            template=(ds + 1).chunk({"time": 2}), mode="r+", executor=executor, retries=1,
            progress=events.append, task_size=1,
        )  # fmt: skip
    (failure,) = info.value.failures
    assert failure.region == {"time": slice(4, 6)}
    assert failure.attempts == 2
    assert "transient failure #2" in failure.error
    assert "region #2 (time=4:6), 2 attempt(s)" in str(info.value)
    assert repo.lookup_branch("main") == before
    assert_written(repo, ds)
    assert [e.kind for e in events].count("retry") == 1
    assert [e.kind for e in events].count("failed") == 1


def test_loader_returning_the_wrong_piece_fails_with_a_message(repo):
    ds = full_dataset()
    before = repo.lookup_branch("main")
    with pytest.raises(RegionWriteError, match=r"does not match the template.*shape"):
        run_region_writes(wrong_shape_loader, repo, template=ds.chunk({"time": 2}), retries=0,
                          progress=False)  # fmt: skip
    assert repo.lookup_branch("main") == before


def test_interrupt_leaves_the_branch_unchanged(repo):
    ds = full_dataset()
    before = repo.lookup_branch("main")

    def interrupt(event):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_region_writes(ds, repo, encoding=ENC, progress=interrupt, executor="threads")
    assert repo.lookup_branch("main") == before


def _existing(repo):
    ds = full_dataset()
    run_region_writes(ds, repo, encoding=ENC, progress=False)
    session = repo.writable_session("main")
    zarr.create_array(
        session.store, name="extra", shape=(4,), chunks=(2,), dtype="f4", fill_value=0,
        dimension_names=("extra_dim",),
    )  # fmt: skip
    session.commit("extra array")
    return ds


def test_concurrent_commit_on_other_chunks_survives(repo):
    ds = _existing(repo)
    new = ds + 10
    new.attrs = ds.attrs
    done = []

    def meanwhile(event):
        if not done:
            other = repo.writable_session("main")
            zarr.open_array(other.store, path="extra", mode="r+")[:] = 7.0
            other.commit("someone else")
            done.append(True)

    run_region_writes(new, repo, mode="r+", progress=meanwhile, executor="serial")
    assert_written(repo, new.merge(read_back(repo)[["extra"]]))
    assert (zarr.open_array(repo.readonly_session("main").store, path="extra")[:] == 7).all()


def test_concurrent_commit_on_the_same_chunk_is_a_clear_error(repo):
    ds = _existing(repo)
    new = ds + 10
    new.attrs = ds.attrs
    theirs = []

    def meanwhile(event):
        if not theirs:
            other = repo.writable_session("main")
            zarr.open_array(other.store, path="Tair", mode="r+")[0:2] = -5.0
            theirs.append(other.commit("someone else"))

    with pytest.raises(CommitConflictError, match="Nothing was committed"):
        run_region_writes(new, repo, mode="r+", progress=meanwhile, executor="serial")
    assert repo.lookup_branch("main") == theirs[0]


# -- the steps, arrays without xarray, the dry run --------------------------------------------


def test_region_writer_steps(repo):
    ds = full_dataset()
    writer = RegionWriter(ds, repo, encoding=ENC)
    regions = writer.plan(parallelism=2)
    assert regions == plan_regions(ds, encoding=ENC, parallelism=2)
    assert not writer.session.has_uncommitted_changes
    writer.write_metadata()
    meta = xr.open_zarr(writer.session.store, consolidated=False, chunks=None)
    assert np.isnan(meta["Tair"].values).all()  # metadata only: no data chunks yet
    assert writer.session.status().updated_chunks.get("/Tair") is None
    xr.testing.assert_equal(meta["mask"], ds["mask"])  # the coordinator's own variable
    writer.write_regions(executor="threads")
    writer.commit("steps")
    assert_written(repo, ds)


@pytest.mark.parametrize("executor", ["threads", "processes"])
def test_store_arrays(repo, executor):
    import dask.array as da

    session = icd.writable_session(repo)
    a = zarr.create_array(session.store, name="a", shape=(10, 6), chunks=(3, 6), dtype="f8")
    b = zarr.create_array(session.store, name="b", shape=(8,), chunks=(2,), shards=(4,), dtype="i4")
    src_a = np.arange(60.0).reshape(10, 6)
    src_b = da.arange(8, chunks=3, dtype="i4")
    result = store_arrays([src_a, src_b], [a, b], executor=executor, progress=False)
    assert result.snapshot_id is None and result.n_regions == len(result.tasks)
    assert result.session.has_uncommitted_changes
    result.session.commit("arrays")
    store = repo.readonly_session("main").store
    np.testing.assert_array_equal(zarr.open_array(store, path="a")[:], src_a)
    np.testing.assert_array_equal(zarr.open_array(store, path="b")[:], np.arange(8))


def test_plan_regions_task_size_and_alignment():
    ds = full_dataset(n_time=24)
    enc = {"Tair": {"chunks": (2, 6, 8)}, "station": {"chunks": (3,)}}
    # chunks of 2 and 3 along time: regions can only break at multiples of 6
    regions = plan_regions(ds, encoding=enc, task_size=1)
    assert [r["time"] for r in regions] == [slice(i, i + 6) for i in range(0, 24, 6)]
    assert len(plan_regions(ds, encoding=enc, task_size=2)) == 2
    one = plan_regions(ds, encoding=enc, task_size="1GB")
    assert one == [{"time": slice(0, 24)}]


def test_plan_regions_sharded():
    ds = full_dataset(n_time=24)
    enc = {"Tair": {"chunks": (1, 6, 8), "shards": (4, 6, 8)}, "station": {"chunks": (4,)}}
    regions = plan_regions(ds, encoding=enc, task_size=1)
    assert [r["time"] for r in regions] == [slice(i, i + 4) for i in range(0, 24, 4)]


def test_sharded_write(repo):
    ds = full_dataset(n_time=24)
    enc = {"Tair": {"chunks": (1, 6, 8), "shards": (4, 6, 8)}, "station": {"chunks": (4,)}}
    run_region_writes(ds, repo, encoding=enc, executor="threads", progress=False)
    assert_written(repo, ds)


def test_two_region_dims_and_variables_lacking_one(repo):
    """Tair is split along time and y; station (time only) and mask (y, x) lack a region dim,
    so the coordinator writes them once instead of every task rewriting them."""
    ds = full_dataset()
    enc = {"Tair": {"chunks": (2, 3, 8)}, "station": {"chunks": (2,)}}
    result = run_region_writes(ds, repo, encoding=enc, region_dims=["time", "y"], task_size=1,
                               progress=False)  # fmt: skip
    assert result.n_regions == 12
    assert {tuple(r.region) for r in result.tasks} == {("time", "y")}
    assert result.n_chunks == 12  # Tair only
    assert_written(repo, ds)


def test_progress_callback_and_bar(repo, capsys):
    ds = full_dataset()
    events = []
    result = run_region_writes(ds, repo, encoding=ENC, progress=events.append, task_size=1)
    assert [e.kind for e in events] == ["done"] * 6
    assert sorted(e.index for e in events) == list(range(6))
    assert events[-1].n_done == 6
    assert events[-1].n_total == 6
    assert all(t.worker and t.seconds >= 0 for t in result.tasks)
    run_region_writes(ds + 1, repo, mode="r+", progress=True, task_size=1)
    assert "6/6" in capsys.readouterr().err


def test_store_arrays_explicit_regions_are_validated(repo):
    session = icd.writable_session(repo)
    a = zarr.create_array(session.store, name="a", shape=(10,), chunks=(4,), dtype="f8")
    with pytest.raises(InvalidRegionError, match="chunk size 4"):
        store_arrays(np.arange(10.0), a, regions=[(slice(0, 5),), (slice(5, 10),)])
    merged = store_arrays(np.arange(10.0), a, regions=[(slice(0, 8),), (slice(8, 10),)]).session
    merged.commit("explicit")
    np.testing.assert_array_equal(
        zarr.open_array(repo.readonly_session("main").store, path="a")[:], np.arange(10.0)
    )


@pytest.mark.parametrize("executor", ["threads", "processes"])
def test_store_arrays_into_part_of_the_arrays(repo, executor):
    """region= places smaller sources, partial regions= update part (as to_zarr(region=))."""
    session = icd.writable_session(repo)
    a = zarr.create_array(session.store, name="a", shape=(12, 4), chunks=(4, 4), dtype="f8")
    a[:] = -1.0
    session.commit("placeholders")
    session = icd.writable_session(repo)
    a = zarr.open_array(session.store, path="a", mode="r+")
    src = np.arange(16.0).reshape(4, 4)
    merged = store_arrays(src, a, region=(slice(4, 8), slice(None)), executor=executor).session
    whole = np.full((12, 4), 5.0)
    merged = store_arrays(whole, a, regions=[(slice(0, 4),)], executor=executor).session
    merged.commit("parts")
    got = zarr.open_array(repo.readonly_session("main").store, path="a")[:]
    np.testing.assert_array_equal(got[0:4], 5.0)
    np.testing.assert_array_equal(got[4:8], src)
    np.testing.assert_array_equal(got[8:], -1.0)
    a = zarr.open_array(icd.writable_session(repo).store, path="a", mode="r+")
    with pytest.raises(InvalidRegionError, match="step 2"):
        store_arrays(src, a, region=(slice(0, 8, 2), slice(None)))
    with pytest.raises(TemplateMismatchError, match="pass region="):
        store_arrays(src, a)


def test_unknown_executor_object(repo):
    with pytest.raises(TypeError, match="cannot use 'object' as an executor"):
        run_region_writes(full_dataset(), repo, executor=object())


def test_a_missing_engine_names_the_extra_to_install():
    from icechunk_distributed.adapters import import_engine

    with pytest.raises(ImportError, match=r"pip install 'icechunk-distributed\[ray\]'"):
        import_engine("no_such_engine_module", "ray")


class _Unreadable:
    """An array-like source whose pieces fail when the task computes them."""

    shape = (8,)
    dtype = np.dtype("f8")

    def __getitem__(self, index):
        return self

    def compute(self):
        raise OSError("cannot read this piece")


def test_store_arrays_failure_lists_every_region(repo):
    from icechunk_distributed import RegionWriteError

    session = icd.writable_session(repo)
    a = zarr.create_array(session.store, name="a", shape=(8,), chunks=(4,), dtype="f8")
    with pytest.raises(RegionWriteError, match="cannot read this piece") as info:
        store_arrays(_Unreadable(), a, retries=1, progress=False)
    assert [(f.region, f.attempts) for f in info.value.failures] == [
        ({"axis_0": slice(0, 4)}, 2),
        ({"axis_0": slice(4, 8)}, 2),
    ]
    assert isinstance(info.value.failures[0].exception, OSError)
