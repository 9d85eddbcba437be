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
    # float64 into float32 is cast, as Dataset.to_zarr does; strings into numbers are not.
    "r+ with strings into numbers": (
        lambda ds, repo: run_region_writes(ds.assign(Tair=ds.Tair.astype("U3")), repo, mode="r+"),
        TemplateMismatchError,
        r"'Tair': the store holds float32, the dataset <U3",
    ),
    "r+ with other chunks": (
        lambda ds, repo: run_region_writes(
            ds, repo, mode="r+", encoding={"Tair": {"chunks": (3, 6, 8)}}
        ),
        ValueError,
        r"encoding= given for \['Tair'\], which already exist in the store",
    ),
    "w- over existing arrays": (
        lambda ds, repo: run_region_writes(ds, repo, mode="w-"),
        TemplateMismatchError,
        r"already holds.*mode='w' to overwrite",
    ),
    "append along a dimension the store lacks": (
        lambda ds, repo: run_region_writes(
            ds.expand_dims(member=2), repo, mode="a", append_dim="member"
        ),
        TemplateMismatchError,
        r"append_dim 'member' is not a dimension of the arrays",
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
        r"task_size 'lots' is not a byte size",
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
    "encoding for an unknown variable": (
        lambda ds, repo: run_region_writes(ds, repo, mode="w", encoding={"Tiar": {}}),
        ValueError,
        r"'Tiar', which is not a variable.*did you mean 'Tair'",
    ),
    "encoding on append": (
        lambda ds, repo: run_region_writes(
            _later(ds), repo, mode="a", append_dim="time", encoding={"Tair": {"chunks": (4, 6, 8)}}
        ),
        ValueError,
        r"\['Tair'\], which already exist in the store",
    ),
    "template sizes differ from the source": (
        lambda ds, repo: run_region_writes(
            ds, repo, mode="w", template=ds.isel(time=slice(0, 6))
        ),
        TemplateMismatchError,
        r"time",
    ),
    "task_size as a float": (
        lambda ds, repo: run_region_writes(ds, repo, mode="w", task_size=2.5),
        TypeError,
        r"task_size",
    ),
    "task_size of 0MB": (
        lambda ds, repo: run_region_writes(ds, repo, mode="w", task_size="0MB"),
        ValueError,
        r"'0MB' is 0 bytes",
    ),
    "workers=0": (
        lambda ds, repo: run_region_writes(ds, repo, mode="w", workers=0),
        ValueError,
        r"workers must be at least 1",
    ),
    "progress='yes'": (
        lambda ds, repo: run_region_writes(ds, repo, mode="w", progress="yes"),
        TypeError,
        r"progress",
    ),
    "message not a string": (
        lambda ds, repo: run_region_writes(ds, repo, mode="w", message=42),
        TypeError,
        r"message",
    ),
    "commit metadata not JSON": (
        lambda ds, repo: run_region_writes(
            ds, repo, mode="w", metadata={"when": __import__("datetime").datetime.now()}
        ),
        (TypeError, ValueError),
        r"metadata\['when'\] is a datetime",
    ),
    "a branch that does not exist": (
        lambda ds, repo: run_region_writes(ds, repo, mode="w", branch="dev"),
        ValueError,
        r"branch 'dev' does not exist.*\['main'\]",
    ),
    "region with a step": (
        lambda ds, repo: run_region_writes(
            ds[["Tair", "station"]], repo, mode="r+", region={"time": slice(None, None, 2)}
        ),
        InvalidRegionError,
        r"region\['time'\].*step 2",
    ),
    "shifted labels in r+": (
        lambda ds, repo: run_region_writes(_shifted(ds), repo, mode="r+"),
        TemplateMismatchError,
        r"'time' labels differ from the store's at position 0",
    ),
    "snapshot of another repository merged": (
        lambda ds, repo: _merge_foreign(repo),
        ForeignSessionError,
        r"made from another session.*merge each snapshot into the session",
    ),
}


def _later(ds):
    """The same dataset, 12 steps later (an append)."""
    later = full_dataset(24).isel(time=slice(12, 24))
    return later.assign(mask=ds["mask"])


def _shifted(ds):
    """The same data under labels shifted by one step."""
    return ds.assign_coords(time=full_dataset(13)["time"].values[1:])


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
