"""Raw icechunk forks merged through merge_sessions: identity, fan-outs, copies, in-memory.

Regression tests for the review of issue 11's session layer.
"""

import shutil

import icechunk
import numpy as np
import pytest
import zarr

import icechunk_distributed as icd
from conftest import make_repo
from icechunk_distributed import ForeignSessionError, OverlappingWritesError, writable_session
from icechunk_distributed.errors import UnshareableStorageError


def with_vector(repo, n=4, chunk=128):
    session = repo.writable_session("main")
    zarr.create_array(session.store, name="a", shape=(n * chunk,), chunks=(chunk,), dtype="f8",
                      fill_value=-1.0, compressors=None)  # fmt: skip
    session.commit("array")
    return repo


def committed(repo):
    return zarr.open_array(repo.readonly_session("main").store, path="a", mode="r")[:]


def test_raw_forks_merged_one_by_one_are_never_mistaken_for_each_other(repo):
    """Forks garbage-collected after their merge leave their id() to the next ones."""
    with_vector(repo, n=64, chunk=1)
    session = writable_session(repo)
    for i in range(64):
        fork = session.fork()
        zarr.open_array(fork.store, path="a")[i] = i
        icd.merge_sessions(session, fork)
        del fork
    session.commit("one by one")
    np.testing.assert_array_equal(committed(repo), np.arange(64.0))


def test_two_raw_forks_of_one_state_writing_one_chunk_collide(repo):
    with_vector(repo)
    session = writable_session(repo)
    zarr.open_array(session.store, path="a")[128:256] = 5.0  # a session with changes
    a, b = session.fork(), session.fork()
    zarr.open_array(a.store, path="a")[:128] = 1.0
    zarr.open_array(b.store, path="a")[:128] = 2.0
    icd.merge_sessions(session, a)
    with pytest.raises(OverlappingWritesError):
        icd.merge_sessions(session, b)


def test_a_raw_fork_made_after_a_merge_overwrites_it(repo):
    with_vector(repo)
    session = writable_session(repo)
    a = session.fork()
    zarr.open_array(a.store, path="a")[:128] = 1.0
    icd.merge_sessions(session, a)
    b = session.fork()  # sees a's write
    zarr.open_array(b.store, path="a")[:128] = 2.0
    icd.merge_sessions(session, b)
    session.commit("ordered")
    assert (committed(repo)[:128] == 2).all()


def test_a_fork_of_a_copy_is_refused_even_when_its_first_chunk_is_inlined(tmp_path):
    repo = with_vector(make_repo(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = icechunk.Repository.open(icechunk.local_filesystem_storage(str(tmp_path / "b")))
    fork = copy.writable_session("main").fork()
    array = zarr.open_array(fork.store, path="a")
    array[:128] = 0.0  # compresses to nothing much: icechunk may inline it
    array[128:256] = np.random.default_rng(0).random(128)  # stored as an object of the copy
    session = writable_session(repo)
    with pytest.raises(ForeignSessionError, match="copy of the repository"):
        icd.merge_sessions(session, fork)
    assert not session.has_uncommitted_changes
    session.commit("nothing", allow_empty=True)
    assert (committed(repo) == -1).all()  # the branch still reads


def test_store_arrays_refuses_in_memory_storage_on_processes():
    repo = with_vector(icechunk.Repository.create(icechunk.in_memory_storage()))
    session = writable_session(repo)
    target = zarr.open_array(session.store, path="a")
    with pytest.raises(UnshareableStorageError, match="in memory"):
        icd.store_arrays(np.arange(512.0), target, executor="processes")
    assert not session.has_uncommitted_changes


def test_store_arrays_writes_an_in_memory_repository_on_threads():
    repo = with_vector(icechunk.Repository.create(icechunk.in_memory_storage()))
    session = writable_session(repo)
    icd.store_arrays(np.arange(512.0), zarr.open_array(session.store, path="a"))
    session.commit("threads")
    np.testing.assert_array_equal(committed(repo), np.arange(512.0))
