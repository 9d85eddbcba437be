"""Regression tests for bugs found in review: each one lost data, hung or failed late."""

import threading

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

import icechunk_distributed as icd
from conftest import read_back
from icechunk_distributed import run_region_writes, store_arrays
from icechunk_distributed.adapters.local import SerialAdapter
from icechunk_distributed.runner import TaskLoop
from tasks import DieOnce, full_dataset, load_region

ENC = {"Tair": {"chunks": (2, 6, 8)}, "station": {"chunks": (2,)}}


def test_an_exception_in_the_merge_callback_propagates():
    """It used to pass for an engine failure: the task was dropped and the run 'succeeded'."""

    def on_success(i, result, attempts):
        if i == 1:
            raise OSError("merge failed")

    with pytest.raises(OSError, match="merge failed"):
        TaskLoop(
            SerialAdapter(), lambda x: x, retries=0,
            is_success=lambda r: True, describe_error=str, on_success=on_success,
        ).run(3, lambda i, a: i)  # fmt: skip


def test_store_arrays_refuses_one_target_twice(repo):
    session = icd.writable_session(repo)
    z = zarr.create_array(session.store, name="z", shape=(8,), chunks=(2,), dtype="i8")
    with pytest.raises(ValueError, match="more than once"):
        store_arrays([np.arange(8), np.arange(8) * 100], [z, z])


def test_loader_eager_variables_come_from_the_loader_not_the_template(repo):
    ds = full_dataset()
    template = ds.copy(data={k: da.zeros(v.shape, dtype=v.dtype) for k, v in ds.data_vars.items()})
    run_region_writes(load_region, repo, template=template, encoding=ENC, progress=False)
    xr.testing.assert_identical(read_back(repo), ds)  # mask is the loader's, not zeros


@pytest.mark.parametrize(
    ("chunk", "existing", "appended"), [(1, 10, 1), (4, 8, 4), (4, 8, 3), (4, 6, 4)]
)
def test_append_smaller_than_a_chunk(repo, chunk, existing, appended):
    ds = full_dataset(n_time=existing + appended)
    enc = {"Tair": {"chunks": (chunk, 6, 8)}, "station": {"chunks": (chunk,)}}
    run_region_writes(ds.isel(time=slice(0, existing)), repo, encoding=enc, progress=False)
    run_region_writes(ds.isel(time=slice(existing, None)), repo, mode="a", append_dim="time",
                      progress=False)  # fmt: skip
    xr.testing.assert_identical(read_back(repo), ds)


def test_append_with_an_eager_variable_along_the_append_dim(repo):
    ds = full_dataset(n_time=12)
    enc = {"Tair": {"chunks": (2, 3, 8)}, "station": {"chunks": (2,)}}
    run_region_writes(ds.isel(time=slice(0, 8)), repo, encoding=enc, progress=False)
    result = run_region_writes(ds.isel(time=slice(8, None)), repo, mode="a", append_dim="time",
                               progress=False)  # fmt: skip
    assert {tuple(t.region) for t in result.tasks} == {("time", "y")}  # station is eager
    xr.testing.assert_identical(read_back(repo), ds)


def test_a_dead_worker_is_retried_on_a_fresh_pool(repo, tmp_path):
    ds = full_dataset()
    result = run_region_writes(DieOnce(tmp_path), repo, template=ds.chunk({"time": 2}),
                               executor="processes", task_size=1, progress=False)  # fmt: skip
    xr.testing.assert_identical(read_back(repo), ds)
    assert max(t.attempts for t in result.tasks) == 2


def test_run_from_another_thread_than_the_session_owner(repo):
    ds = full_dataset()
    session = icd.writable_session(repo)
    errors = []

    def run():
        try:
            run_region_writes(ds, session, encoding=ENC, progress=False)
        except Exception as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert not errors
    xr.testing.assert_identical(read_back(repo), ds)


def test_variable_encoding_is_kept_unless_replaced(repo, other_repo):
    """A variable's own encoding is used; an explicit encoding= replaces it (as in to_zarr)."""
    ds = full_dataset()
    ds["Tair"] = ds["Tair"].fillna(0)
    ds["Tair"].encoding = {"dtype": "int16", "scale_factor": 0.001, "_FillValue": -9999}
    run_region_writes(ds, repo, encoding={"station": {"chunks": (2,)}}, progress=False)
    raw = zarr.open_array(repo.readonly_session("main").store, path="Tair")
    assert raw.dtype == np.dtype("int16")
    np.testing.assert_allclose(read_back(repo)["Tair"].values, ds["Tair"].values, atol=1e-3)
    run_region_writes(ds, other_repo, encoding=ENC, progress=False)
    raw = zarr.open_array(other_repo.readonly_session("main").store, path="Tair")
    assert raw.dtype == np.dtype("float32")


def test_zero_length_dimension(repo):
    ds = full_dataset().isel(time=slice(0, 0))
    assert icd.plan_regions(ds) == [{}]  # nothing to split: one task
    run_region_writes(ds, repo, progress=False)
    xr.testing.assert_identical(read_back(repo), ds)


def test_fast_path_keeps_strings_bools_and_datetimes(repo):
    """Tasks encode with xarray's own zarr encoder: every dtype to_zarr handles round-trips."""
    ds = full_dataset()
    ds["label"] = (("time",), np.array([f"t{i}" for i in range(12)]))
    ds["flag"] = (("time",), np.arange(12) % 2 == 0)
    ds["when"] = (
        ("time",),
        np.datetime64("2020-01-01", "ns") + np.arange(12) * np.timedelta64(1, "D"),
    )
    enc = {**ENC, "label": {"chunks": (2,)}, "flag": {"chunks": (2,)}, "when": {"chunks": (2,)}}
    run_region_writes(ds, repo, encoding=enc, progress=False)
    xr.testing.assert_identical(read_back(repo), ds)


def test_errors_with_extra_fields_survive_pickling():
    # Found by the S3 work: a run inside a process-pool task that failed surfaced as
    # BrokenProcessPool, because these errors could not be unpickled.
    import pickle

    from icechunk_distributed import (
        OverlappingWritesError,
        RegionWriteError,
        TargetMovedError,
    )

    errors = [
        RegionWriteError("2 regions failed", ["f1", "f2"]),
        OverlappingWritesError("overlap", [("/a", (0,))]),
        TargetMovedError(
            "moved",
            run_id="r",
            work_branch="w",
            snapshot_id=None,
            base_snapshot_id="b",
            tip_snapshot_id="t",
        ),
    ]
    for error in errors:
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
        assert back.__dict__ == error.__dict__


def test_a_snapshot_from_before_a_rebase_is_refused(repo):
    # Found in review: checkpoints made lineages ignore snapshot ids, so a plain session's
    # rebase no longer made earlier snapshots stale (the other commit's chunk was lost).
    import icechunk
    import pytest
    import zarr

    from icechunk_distributed import ForeignSessionError, allow_pickling, merge_sessions

    setup = repo.writable_session("main")
    zarr.create_array(setup.store, name="a", shape=(4,), chunks=(1,), dtype="i4")
    setup.commit("array")
    session = repo.writable_session("main")
    with allow_pickling(session) as snapshot:
        zarr.open_array(snapshot.store, path="a", mode="r+")[0] = 111
        other = repo.writable_session("main")
        zarr.open_array(other.store, path="a", mode="r+")[0] = 222
        other.commit("the other writer")
        session.rebase(icechunk.ConflictDetector())
        with pytest.raises(ForeignSessionError, match="outdated base"):
            merge_sessions(session, snapshot)


def test_the_result_names_the_branch_it_committed_to(repo):
    # Found by the ingest work: after the commit the session is read-only and forgets its
    # branch, so WriteResult.branch was None for every repository target.
    import numpy as np
    import xarray as xr

    from icechunk_distributed import run_region_writes

    result = run_region_writes(xr.Dataset({"a": ("x", np.arange(4))}), repo)
    assert result.branch == "main" and result.snapshot_id == repo.lookup_branch("main")
