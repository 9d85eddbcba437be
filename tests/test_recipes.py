"""The parallel-writes recipes of Icechunk's documentation, on real thread and process pools."""

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed

import icechunk
import pytest
import xarray as xr

import icechunk_distributed as icd
from conftest import read_back, small_dataset, write_template
from icechunk_distributed import (
    ForkStartMethodError,
    PicklingNotAllowedError,
    SessionSnapshot,
    allow_pickling,
    merge_sessions,
    writable_session,
)
from tasks import touch_store, write_functional, write_timestamp


def spawn_pool(workers: int = 2) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def prepared(repo: icechunk.Repository) -> xr.Dataset:
    """Commit the metadata of the test dataset; return the dataset."""
    ds = small_dataset()
    session = repo.writable_session("main")
    write_template(session.store, ds)
    session.commit("metadata")
    return ds


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_documented_recipe(repo, kind):
    ds = prepared(repo)
    session = writable_session(repo, "main")
    pool = ThreadPoolExecutor(4) if kind == "threads" else spawn_pool()
    with pool as executor:
        with session.allow_pickling():
            futures = [
                executor.submit(write_timestamp, itime=i, session=session)
                for i in range(ds.sizes["time"])
            ]
        # 12 tasks on 2 processes: most call items are pickled after the block has exited.
        sessions = [f.result() for f in futures]
    session = merge_sessions(session, *sessions)
    session.commit("finished writes")
    xr.testing.assert_identical(read_back(repo), ds)


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_functional_recipe_with_plain_session(repo, kind):
    ds = prepared(repo)
    session = repo.writable_session("main")  # a plain icechunk Session
    pool = ThreadPoolExecutor(3) if kind == "threads" else spawn_pool()
    with pool as ex, allow_pickling(session) as shareable:
        assert isinstance(shareable, SessionSnapshot)
        results = [
            f.result() for f in [ex.submit(write_functional, i, shareable) for i in range(12)]
        ]
    assert merge_sessions(session, *results) is session
    session.commit("done")
    xr.testing.assert_identical(read_back(repo), ds)


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_streaming_merge_as_results_arrive(repo, kind):
    """Merging each result as it completes, while other tasks still write, loses nothing."""
    ds = prepared(repo)
    session = writable_session(repo, "main")
    pool = ThreadPoolExecutor(3) if kind == "threads" else spawn_pool()
    with pool as ex, session.allow_pickling() as snap:
        futures = [ex.submit(write_functional, i, snap) for i in range(12)]
        for future in as_completed(futures):
            merge_sessions(session, future.result())
    session.commit("streamed")
    xr.testing.assert_identical(read_back(repo), ds)


def test_thread_recipe_shared_session_never_hangs(tmp_path):
    """Tasks write to one shared DistributedSession's store, return nothing; 50 runs."""
    ds = small_dataset()
    for run in range(50):
        repo = icechunk.Repository.create(
            icechunk.local_filesystem_storage(str(tmp_path / f"r{run}"))
        )
        session = writable_session(repo, "main")
        write_template(session.store, ds)
        with ThreadPoolExecutor(4) as executor:
            futures = [
                executor.submit(write_timestamp, itime=i, session=session)
                for i in range(ds.sizes["time"])
            ]
            for f in futures:
                f.result(timeout=600)
        session.commit("finished writes")
        xr.testing.assert_identical(read_back(repo), ds)


def test_pickling_outside_the_block_is_refused(repo):
    prepared(repo)
    session = writable_session(repo, "main")
    with pytest.raises(PicklingNotAllowedError, match=r"with session\.allow_pickling\(\):"):
        pickle.dumps(session)
    with pytest.raises(pickle.PicklingError):  # also a PicklingError, for generic handlers
        pickle.dumps(session)


def test_pickling_window_lasts_until_commit(repo):
    prepared(repo)
    session = writable_session(repo, "main")
    with session.allow_pickling() as snap:
        inside = pickle.dumps(session)
    # Executors pickle queued work after the block: still allowed.
    after = pickle.loads(pickle.dumps(session))
    assert isinstance(pickle.loads(inside), SessionSnapshot)
    assert isinstance(after, SessionSnapshot)
    write_timestamp(itime=0, session=after)
    merge_sessions(session, pickle.loads(pickle.dumps(after)))
    session.commit("one step")
    with pytest.raises(PicklingNotAllowedError, match="read-only"):
        pickle.dumps(session)
    with pytest.raises(PicklingNotAllowedError, match="committed"):
        pickle.dumps(snap)


def test_one_fork_per_block_not_per_task(repo):
    """Shipping a snapshot many times forks once: the seed bytes are shared."""
    prepared(repo)
    session = writable_session(repo, "main")
    with session.allow_pickling() as snap:
        copies = [pickle.loads(pickle.dumps(session)) for _ in range(5)]
    assert len({c._seed.blob() for c in copies}) == 1
    assert copies[0]._seed.blob() == snap._seed.blob()


@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_fork_start_method_fails_fast_with_the_fix(repo):
    prepared(repo)
    session = writable_session(repo, "main")
    with (
        ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as ex,
        session.allow_pickling() as snap,
    ):
        future = ex.submit(touch_store, snap)
        with pytest.raises(ForkStartMethodError, match="forkserver") as info:
            future.result(timeout=600)
    assert "spawn" in str(info.value)


def test_import_does_not_import_executors():
    import subprocess
    import sys

    code = (
        "import sys, icechunk_distributed; "
        "mods = ('ray', 'lithops', 'dask', 'distributed', 'joblib', 'apache_beam'); "
        "print(sorted(m for m in mods if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert icd.__version__
