"""Icechunk's own Python tests (test_distributed_append, test_dask, test_xarray,
test_concurrency, test_pickle, test_distributed_writers), ported to this library's session API.

The rule they pin: the overlap check guards ONE fan-out (the tasks of one allow_pickling()
block, or of one run) against each other. Merges of different blocks or runs into the same
uncommitted session are ordered, deliberate writes: the later one wins, as in icechunk.
"""

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import shutil
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import icechunk
import numpy as np
import pytest
import xarray as xr
import zarr

import icechunk_distributed as icd
from conftest import (
    _engine_params,
    make_repo,
    read_back,
    small_dataset,
    start_engine,
    write_template,
)
from icechunk_distributed.errors import (
    DistributedWriteError,
    ForeignSessionError,
    OverlappingWritesError,
    PicklingNotAllowedError,
)
from upstream_tasks import (
    MarkingLoader,
    mark_and_write,
    read_then_write,
    tile,
    write_cell,
    write_tile,
    write_time_step,
    write_values,
)

ENC = {"Tair": {"chunks": (2, 6, 8)}}


def spawn_pool(workers: int = 2) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def pool_of(kind: str):
    return ThreadPoolExecutor(2) if kind == "threads" else spawn_pool()


def with_vector(repo, n: int = 4, path: str = "a") -> icechunk.Repository:
    """Commit a 1-D float array of ``n`` one-element chunks filled with -1."""
    session = repo.writable_session("main")
    zarr.create_array(session.store, name=path, shape=(n,), chunks=(1,), dtype="f8",
                      fill_value=-1.0)  # fmt: skip
    session.commit(f"create {path}")
    return repo


def committed(repo, path: str = "a") -> list:
    return zarr.open_array(repo.readonly_session("main").store, path=path, mode="r")[...].tolist()


def via_pickle(obj):
    """``obj`` as a worker receives it, or as the coordinator receives it back."""
    return pickle.loads(pickle.dumps(obj))


def chunk_coords(session, path: str) -> set:
    async def collect():
        return {tuple(c) async for c in session.chunk_coordinates(path)}

    return asyncio.run(collect())


def open_session(session) -> xr.Dataset:
    return xr.open_zarr(session.store, consolidated=False, chunks=None).load()


def plus_one(ds: xr.Dataset) -> xr.Dataset:
    return ds.copy(data={k: v.values + 1 for k, v in ds.data_vars.items()})


def first_block(session, pool) -> None:
    """One allow_pickling() block on ``pool``: two tasks write [1, 2] into chunks 0 and 1."""
    with session.allow_pickling() as snap:
        first = [pool.submit(write_values, snap, "a", i, [i + 1.0]) for i in (0, 1)]
        icd.merge_sessions(session, *[f.result() for f in first])


# ---------------------------------------------------------------------------------------------
# 1. One fan-out is checked; successive blocks and runs are ordered writes (later wins).


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_two_blocks_without_commit_later_block_wins(repo, kind):
    with_vector(repo)
    session = icd.writable_session(repo)
    with pool_of(kind) as pool:
        first_block(session, pool)
        with session.allow_pickling() as snap:
            second = [pool.submit(write_values, snap, "a", i, [v]) for i, v in ((0, 10), (2, 30))]
            icd.merge_sessions(session, *[f.result() for f in second])
    session.commit("two blocks")
    assert committed(repo) == [10.0, 2.0, 30.0, -1.0]


@pytest.mark.parametrize("how", ["at_once", "one_by_one"])
def test_different_bytes_within_one_block_are_still_refused(repo, how):
    """A first block wrote chunk 0; in a second block two tasks write chunk 0 differently."""
    with_vector(repo)
    session = icd.writable_session(repo)
    with session.allow_pickling() as snap:
        icd.merge_sessions(session, via_pickle(write_values(via_pickle(snap), "a", 0, [1.0])))
    with session.allow_pickling() as snap:
        a = via_pickle(write_values(via_pickle(snap), "a", 0, [5.0]))
        b = via_pickle(write_values(via_pickle(snap), "a", 0, [6.0]))
    if how == "at_once":
        with pytest.raises(OverlappingWritesError) as info:
            icd.merge_sessions(session, a, b)
        expected = [1.0, -1.0, -1.0, -1.0]  # nothing of the refused call is merged
    else:
        icd.merge_sessions(session, a)  # a later block over an earlier one: fine
        with pytest.raises(OverlappingWritesError) as info:
            icd.merge_sessions(session, b)
        expected = [5.0, -1.0, -1.0, -1.0]
    assert ("/a", (0,)) in info.value.conflicts
    session.commit("what was accepted")
    assert committed(repo) == expected


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_a_later_block_reads_what_earlier_blocks_merged(repo, kind):
    with_vector(repo)
    session = icd.writable_session(repo)
    with pool_of(kind) as pool:
        first_block(session, pool)
        with session.allow_pickling() as snap:
            seen, result = pool.submit(read_then_write, snap, "a", 3, [4.0]).result()
    assert seen == [1.0, 2.0, -1.0, -1.0]
    icd.merge_sessions(session, result)
    session.commit("read your writes")
    assert committed(repo) == [1.0, 2.0, -1.0, 4.0]


@pytest.mark.parametrize("executor", ["threads", "processes"])
@pytest.mark.parametrize("second", ["w", "r+", "r+ region"])
def test_two_runs_into_one_uncommitted_session(repo, executor, second):
    """Upstream's repeated to_icechunk into one session: the second run wins."""
    ds = small_dataset()
    new = plus_one(ds)
    session = icd.writable_session(repo)
    run = dict(executor=executor, commit=False, progress=False)
    icd.run_region_writes(ds, session, encoding=ENC, **run)
    if second == "w":
        icd.run_region_writes(new, session, mode="w", encoding=ENC, **run)
        expected = new
    elif second == "r+":
        icd.run_region_writes(new, session, mode="r+", **run)
        expected = new
    else:
        piece = new.isel(time=slice(4, 8)).drop_vars(["lat", "lon"])
        icd.run_region_writes(piece, session, mode="r+", region={"time": slice(4, 8)}, **run)
        expected = ds.copy(deep=True)
        expected["Tair"][4:8] = new["Tair"][4:8]
    xr.testing.assert_identical(open_session(session), expected)  # before the commit
    session.commit("two runs")
    xr.testing.assert_identical(read_back(repo), expected)


# -- icechunk GH1006 (test_distributed_append): append along x, then along y, one session.

CX, CY = 3, 6
NX, NY = 2 * CX + 1, 3 * CY + 1  # both end in a partial chunk


def field(value: float, xs, ys, **chunks) -> xr.Dataset:
    data = np.full((len(xs), len(ys)), value)
    ds = xr.Dataset({"a": (("x", "y"), data)}, coords={"x": list(xs), "y": list(ys)})
    return ds.chunk(chunks)


@pytest.mark.parametrize(
    "executor", ["serial", "threads", "processes", *_engine_params("dask", "ray")]
)
def test_append_along_x_then_y_in_one_session(tmp_path, executor, request):
    if executor in ("dask", "ray"):
        start_engine(request, executor)
    repo = make_repo(tmp_path / "repo")
    run = dict(executor=executor, progress=False)
    icd.run_region_writes(field(1.1, range(NX), range(NY), x=CX, y=CY), repo, **run)
    session = icd.writable_session(repo)
    x_more = field(2.2, range(NX, NX + 1), range(NY), x=1, y=CY)
    icd.run_region_writes(x_more, session, mode="a", append_dim="x", commit=False, **run)
    y_more = field(3.3, range(NX + 1), range(NY, NY + 1), x=CX, y=-1)
    icd.run_region_writes(y_more, session, mode="a", append_dim="y", commit=False, **run)
    expected = np.full((NX + 1, NY + 1), 1.1)
    expected[NX, :NY] = 2.2
    expected[:, NY] = 3.3
    np.testing.assert_array_equal(open_session(session)["a"].values, expected)
    session.commit("two appends")
    stored = read_back(repo)
    np.testing.assert_array_equal(stored["a"].values, expected)
    assert stored["x"].values.tolist() == list(range(NX + 1))
    assert stored["y"].values.tolist() == list(range(NY + 1))


# ---------------------------------------------------------------------------------------------
# 3. The thread recipe (one shared session, tasks return nothing) reads its writes at once.


def test_thread_recipe_is_readable_before_commit(repo):
    ds = small_dataset()
    session = icd.writable_session(repo)
    write_template(session.store, ds)
    with ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(write_time_step, ds, session, i) for i in range(ds.sizes["time"])]:
            assert f.result(timeout=120) is None
    assert chunk_coords(session, "/Tair") == {(t, 0, 0) for t in range(ds.sizes["time"])}
    xr.testing.assert_identical(open_session(session), ds)
    session.commit("thread recipe")
    xr.testing.assert_identical(read_back(repo), ds)


def test_dask_threads_write_to_a_shared_session(repo):
    """test_dask_schedulers on threads: dask tasks write the time steps to one session."""
    dask = pytest.importorskip("dask")
    ds = small_dataset()
    session = icd.writable_session(repo)
    write_template(session.store, ds)
    steps = [dask.delayed(write_time_step, pure=False)(ds, session, i) for i in range(12)]
    dask.compute(*steps, scheduler="threads", num_workers=4)
    xr.testing.assert_identical(open_session(session), ds)
    session.commit("dask threads")
    xr.testing.assert_identical(read_back(repo), ds)


# ---------------------------------------------------------------------------------------------
# 4. In-memory repositories (test_concurrency, test_repeated_to_icechunk_serial).


def memory_repo() -> icechunk.Repository:
    return icechunk.Repository.create(icechunk.in_memory_storage())


def test_concurrent_cell_writes_to_one_in_memory_session():
    n = 6
    repo = memory_repo()
    session = icd.writable_session(repo)
    zarr.create_array(session.store, name="array", shape=(n, n - 1), chunks=(1, 1), dtype="f8",
                      fill_value=1e23)  # fmt: skip
    cells = [(x, y) for x in range(n) for y in range(n - 1)]
    with ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(write_cell, session, "array", x, y) for x, y in cells]:
            f.result(timeout=120)
    assert chunk_coords(session, "/array") == set(cells)
    expected = np.fromfunction(lambda x, y: x * y, (n, n - 1))
    before_commit = zarr.open_array(session.store, path="array", mode="r")[...]
    np.testing.assert_array_equal(before_commit, expected)
    session.commit("cells")
    np.testing.assert_array_equal(committed(repo, "array"), expected)


@pytest.mark.parametrize("executor", ["serial", "threads"])
def test_repeated_runs_on_an_in_memory_repository(executor):
    ds = small_dataset()
    repo = memory_repo()
    icd.run_region_writes(ds, repo, executor=executor, encoding=ENC, progress=False)
    xr.testing.assert_identical(read_back(repo), ds)
    icd.run_region_writes(plus_one(ds), repo, executor=executor, mode="w", encoding=ENC,
                          progress=False)  # fmt: skip
    xr.testing.assert_identical(read_back(repo), plus_one(ds))


def test_allow_pickling_on_threads_with_an_in_memory_repository():
    repo = with_vector(memory_repo())
    session = icd.writable_session(repo)
    with ThreadPoolExecutor(3) as pool, session.allow_pickling() as snap:
        futures = [pool.submit(write_values, snap, "a", i, [10.0 * i]) for i in range(4)]
        results = [f.result(timeout=120) for f in futures]
    icd.merge_sessions(session, *results)
    session.commit("threads in memory")
    assert committed(repo) == [0.0, 10.0, 20.0, 30.0]


def write_on_spawned_processes(repo, marks, how: str) -> None:
    if how == "recipe":
        session = icd.writable_session(repo)
        with spawn_pool() as pool, session.allow_pickling() as snap:
            futures = [pool.submit(mark_and_write, str(marks), snap, i) for i in range(2)]
            icd.merge_sessions(session, *[f.result(timeout=120) for f in futures])
        return
    template = small_dataset().chunk({"time": 2})
    with contextlib.ExitStack() as stack:
        executor = "processes" if how == "processes" else stack.enter_context(spawn_pool())
        icd.run_region_writes(MarkingLoader(marks), repo, template=template, group="g",
                              encoding=ENC, executor=executor, progress=False)  # fmt: skip


@pytest.mark.parametrize("how", ["recipe", "processes", "pool"])
def test_in_memory_repository_is_refused_on_processes(tmp_path, how):
    repo = with_vector(memory_repo())
    before = repo.lookup_branch("main")
    marks = tmp_path / "marks"
    marks.mkdir()
    with pytest.raises(DistributedWriteError, match=r"(?i)memory"):
        write_on_spawned_processes(repo, marks, how)
    # Refused before any task ran (the coordinator's own process aside), nothing committed.
    ran = [m for m in os.listdir(marks) if not m.startswith(f"load-{os.getpid()}-")]
    assert ran == []
    assert repo.lookup_branch("main") == before


# ---------------------------------------------------------------------------------------------
# 5. A fork of a byte-for-byte copy of the repository is foreign.


@pytest.mark.parametrize("shipped", ["raw fork", "snapshot"])
def test_fork_of_a_copied_repository_is_foreign(tmp_path, shipped):
    n = 128  # 1 KiB chunks: above icechunk's 512-byte inline threshold, so stored as objects
    repo = make_repo(tmp_path / "original")
    session = repo.writable_session("main")
    zarr.create_array(session.store, name="a", shape=(4 * n,), chunks=(n,), dtype="f8",
                      fill_value=-1.0, compressors=None)  # fmt: skip
    session.commit("create a")
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    copy = icechunk.Repository.open(icechunk.local_filesystem_storage(str(tmp_path / "copy")))
    other = icd.writable_session(copy, "main")
    payload = np.random.default_rng(0).random(n)
    if shipped == "raw fork":
        fork = other.fork()
        zarr.open_array(fork.store, path="a", mode="r+")[:n] = payload
        item = via_pickle(fork)
    else:
        with other.allow_pickling() as snap:
            item = via_pickle(write_values(via_pickle(snap), "a", 0, payload))

    session = icd.writable_session(repo)
    with pytest.raises(ForeignSessionError):
        icd.merge_sessions(session, item)
    assert not session.has_uncommitted_changes
    zarr.open_array(session.store, path="a", mode="r+")[n : 2 * n] = 7.0
    session.commit("own write")
    expected = np.full(4 * n, -1.0)
    expected[n : 2 * n] = 7.0
    np.testing.assert_array_equal(committed(repo), expected)  # every chunk is readable


# ---------------------------------------------------------------------------------------------
# 6. Pickling (test_pickle).


def test_pickling_a_session_outside_the_block_is_a_value_error(repo):
    with_vector(repo)
    session = icd.writable_session(repo)
    # ValueError: what icechunk itself raises for a writable session
    with pytest.raises(ValueError, match=r"allow_pickling\(\)") as info:
        pickle.dumps(session)
    assert isinstance(info.value, PicklingNotAllowedError)
    assert isinstance(info.value, pickle.PicklingError)
    assert isinstance(info.value, DistributedWriteError)
    with pytest.raises(ValueError, match="fork"):  # the raw writable store: icechunk's refusal
        pickle.dumps(session.store)
    write_values(session, "a", 0, [1.0])
    session.commit("one")
    with pytest.raises(ValueError, match="read-only") as info:  # committed: still refused
        pickle.dumps(session)
    assert isinstance(info.value, PicklingNotAllowedError)


def test_pickle_round_trips_of_forks_snapshots_and_read_only_sessions(repo):
    with_vector(repo)
    session = icd.writable_session(repo)
    fork = via_pickle(session.fork())
    assert not fork.store.read_only
    write_values(fork, "a", 0, [1.0])
    with session.allow_pickling() as snap:
        task = via_pickle(snap)
        assert not task.store.read_only
        assert (task.branch, task.base_snapshot_id) == ("main", session.snapshot_id)
        back = via_pickle(write_values(task, "a", 1, [2.0]))
    icd.merge_sessions(session, via_pickle(fork), back)
    snapshot_id = session.commit("fork and snapshot")
    original = repo.readonly_session("main")
    reader = via_pickle(original)
    assert (reader.snapshot_id, reader.branch) == (snapshot_id, original.branch)
    assert zarr.open_array(reader.store, path="a", mode="r")[...].tolist() == [1, 2, -1, -1]


# ---------------------------------------------------------------------------------------------
# test_distributed_writers: tiles written by tasks on a dask cluster, one commit on a branch.


@pytest.mark.dask
def test_tiles_on_a_dask_cluster_commit_on_a_branch(repo, dask_client):
    tiles, size, seed = 4, 5, 42
    session = repo.writable_session("main")
    zarr.create_array(session.store, name="array", shape=(tiles * size,) * 2,
                      chunks=(size, size), dtype="f8", fill_value=np.nan)  # fmt: skip
    repo.create_branch("dist", session.commit("array created"))
    session = icd.writable_session(repo, "dist")
    with session.allow_pickling() as snap:
        futures = [dask_client.submit(write_tile, snap, "array", i, j, size, seed, pure=False)
                   for i in range(tiles) for j in range(tiles)]  # fmt: skip
        results = dask_client.gather(futures)
    icd.merge_sessions(session, *results)
    session.commit("distributed commit")
    store = repo.readonly_session("dist").store

    async def keys():
        return [k async for k in store.list_prefix("")]

    assert len(asyncio.run(keys())) == 1 + 1 + tiles * tiles  # group, array, every chunk
    expected = np.block([[tile(i, j, size, seed) for j in range(tiles)] for i in range(tiles)])
    np.testing.assert_array_equal(zarr.open_array(store, path="array", mode="r")[...], expected)
    assert np.isnan(zarr.open_array(repo.readonly_session("main").store, path="array")[...]).all()
