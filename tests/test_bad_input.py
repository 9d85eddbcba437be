"""Bad input: a specific error that says what to do, before any object is written."""

# fmt: off

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor

import pytest

from icechunk_distributed import (
    ForeignSessionError,
    InvalidRegionError,
    RegionWriteError,
    SessionStateError,
    TemplateMismatchError,
    UnpicklableSourceError,
    allow_pickling,
    merge_sessions,
    run_region_writes,
    writable_session,
)
from tasks import full_dataset, load_region, wrong_shape_loader

ENC = {"Tair": {"chunks": (2, 6, 8)}, "station": {"chunks": (2,)}}
W = {"mode": "w", "encoding": ENC}


def t(*pairs):
    """Regions along time."""
    return [{"time": slice(a, b)} for a, b in pairs]


def n_objects(path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def n_chunk_objects(path) -> int:
    return sum(len(files) for _, _, files in os.walk(os.path.join(path, "chunks")))


# Found by the task itself (a loader's piece exists only there): by then the fork's
# anonymous snapshot exists (metadata objects, unreferenced), but no chunk was written.
IN_TASK = {"loader returns the wrong piece"}


def unpicklable_loader():
    lock = threading.Lock()

    def load(region):
        with lock:
            return load_region(region)

    return load


CASES = {
    "misaligned region": (
        lambda ds, repo: run_region_writes(
            ds, repo, **W, regions=t((0, 3), (3, 12))
        ),
        InvalidRegionError,
        r"'Tair'.*offset 3 is not a multiple of its chunk size 2 along 'time'",
    ),
    "overlapping regions": (
        lambda ds, repo: run_region_writes(
            ds, repo, **W, regions=t((0, 6), (4, 12))
        ),
        InvalidRegionError,
        r"regions #0 \(time=0:6\) and #1 \(time=4:12\) overlap",
    ),
    "region out of bounds": (
        lambda ds, repo: run_region_writes(
            ds, repo, **W, regions=t((0, 14))
        ),
        InvalidRegionError,
        r"out of bounds \(dimension 'time' has size 12\)",
    ),
    "unknown region dimension": (
        lambda ds, repo: run_region_writes(ds, repo, **W, regions=[{"tim": slice(0, 12)}]),
        InvalidRegionError,
        r"unknown region dimension 'tim'",
    ),
    "regions leave a gap": (
        lambda ds, repo: run_region_writes(
            ds, repo, **W, regions=t((0, 4), (6, 12))
        ),
        InvalidRegionError,
        r"do not cover.*first gap at time=4",
    ),
    "r+ without the arrays": (
        lambda ds, repo: run_region_writes(ds.rename(Tair="Tmax"), repo, mode="r+"),
        TemplateMismatchError,
        r"'Tmax' is not in the store",
    ),
    "r+ with another shape": (
        lambda ds, repo: run_region_writes(ds.isel(x=slice(0, 4)), repo, mode="r+"),
        TemplateMismatchError,
        r"size along 'x' is 8 in the store and 4",
    ),
    "r+ with another dtype": (
        lambda ds, repo: run_region_writes(ds.assign(Tair=ds.Tair.astype("f8")), repo, mode="r+"),
        TemplateMismatchError,
        r"the store holds float32, the template float64",
    ),
    "r+ with other chunks": (
        lambda ds, repo: run_region_writes(
            ds, repo, mode="r+", encoding={"Tair": {"chunks": (3, 6, 8)}}
        ),
        TemplateMismatchError,
        r"encoding asks for chunks",
    ),
    "w- over existing arrays": (
        lambda ds, repo: run_region_writes(ds, repo, mode="w-"),
        TemplateMismatchError,
        r"already holds.*mode='w' to overwrite",
    ),
    "append without append_dim": (
        lambda ds, repo: run_region_writes(ds, repo, mode="a"),
        ValueError,
        r"mode='a' needs append_dim",
    ),
    "unknown mode": (
        lambda ds, repo: run_region_writes(ds, repo, mode="x"),
        ValueError,
        r"mode must be one of",
    ),
    "loader without template": (
        lambda ds, repo: run_region_writes(load_region, repo),
        TypeError,
        r"a loader source needs template=",
    ),
    "unpicklable loader on processes": (
        lambda ds, repo: run_region_writes(
            unpicklable_loader(),
            repo,
            template=ds.chunk({"time": 2}),
            mode="w",
            executor="processes",
        ),
        UnpicklableSourceError,
        r"loader .*cannot be pickled.*executor='threads'",
    ),
    "unknown executor name": (
        lambda ds, repo: run_region_writes(ds, repo, mode="w", executor="spark"),
        ValueError,
        r"known names: serial, threads, processes, joblib",
    ),
    "fork-context process pool": (
        lambda ds, repo: run_region_writes(
            ds,
            repo,
            mode="w",
            executor=ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")),
        ),
        ValueError,
        r"'fork' start method.*forkserver",
    ),
    "joblib multiprocessing backend": (
        lambda ds, repo: _joblib_mp(ds, repo),
        ValueError,
        r"multiprocessing' backend forks",
    ),
    "read-only session as target": (
        lambda ds, repo: run_region_writes(ds, repo.readonly_session("main"), mode="w"),
        (SessionStateError, TypeError),
        r"read-only|writable",
    ),
    "unparseable task_size": (
        lambda ds, repo: run_region_writes(ds, repo, mode="w", task_size="lots"),
        ValueError,
        r"cannot parse 'lots' as a size",
    ),
    "not a dataset": (
        lambda ds, repo: run_region_writes(ds["Tair"].values, repo, mode="w"),
        TypeError,
        r"source must be an xarray.Dataset or a callable",
    ),
    "loader returns the wrong piece": (
        lambda ds, repo: run_region_writes(
            # Chunks of 768 bytes: objects of their own (smaller ones are inlined).
            wrong_shape_loader,
            repo,
            template=ds,
            mode="w",
            encoding={"Tair": {"chunks": (4, 6, 8)}, "station": {"chunks": (4,)}},
            executor="serial",
            retries=0,
        ),
        RegionWriteError,
        r"does not match the template: 'Tair' has shape \(1, 6, 8\), expected \(4, 6, 8\)",
    ),
    "unknown executor object": (
        lambda ds, repo: run_region_writes(ds, repo, mode="w", executor=object()),
        TypeError,
        r"cannot use 'object' as an executor: pass one of",
    ),
    "run_id with illegal characters": (
        lambda ds, repo: run_region_writes(ds, repo, mode="w", run_id="era5 / nov"),
        ValueError,
        r"run_id must be 1-100 letters, digits",
    ),
    "run_id with a session target": (
        lambda ds, repo: run_region_writes(
            ds, repo.writable_session("main"), mode="w", run_id="x"
        ),
        TypeError,
        r"run_id= needs the Repository as target",
    ),
    "snapshot of another repository merged": (
        lambda ds, repo: _merge_foreign(repo),
        ForeignSessionError,
        r"made from another session.*merge each snapshot into the session",
    ),
}


def _merge_foreign(repo):
    """Merge a snapshot written through another repository's session."""
    import tempfile

    import icechunk
    import zarr

    other = icechunk.Repository.create(icechunk.local_filesystem_storage(tempfile.mkdtemp()))
    theirs = writable_session(other)
    zarr.create_array(theirs.store, name="Tair", shape=(4,), chunks=(2,), dtype="f4")
    with allow_pickling(theirs) as snapshot:
        zarr.open_array(snapshot.store, path="Tair", mode="r+")[:] = 1.0
        return merge_sessions(writable_session(repo), snapshot)


def _joblib_mp(ds, repo):
    import joblib

    with joblib.parallel_config(backend="multiprocessing"):
        return run_region_writes(ds, repo, mode="w", executor="joblib")


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_anything_is_written(tmp_path, case):
    from conftest import make_repo

    call, error, message = CASES[case]
    path = tmp_path / "repo"
    repo = make_repo(path)
    ds = full_dataset()
    run_region_writes(ds, repo, encoding=ENC, progress=False)
    count = n_chunk_objects if case in IN_TASK else n_objects
    before = (repo.lookup_branch("main"), count(path))
    with pytest.raises(error, match=message):
        call(ds, repo)
    assert (repo.lookup_branch("main"), count(path)) == before
