"""merge_sessions: what it accepts, what it refuses (merging nothing), and at what scale."""

import pickle
import time

import icechunk
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from conftest import make_repo
from icechunk_distributed import (
    ForeignSessionError,
    NotASnapshotError,
    OverlappingWritesError,
    SessionSnapshot,
    allow_pickling,
    merge_sessions,
    writable_session,
)
from tasks import write_block


def with_array(repo, shape=(8, 8), chunks=(2, 2), path="a", fill_value=-1.0):
    session = repo.writable_session("main")
    zarr.create_array(
        session.store, name=path, shape=shape, chunks=chunks, dtype="f4", fill_value=fill_value
    )
    session.commit(f"create {path}")
    return repo


def shipped(snapshot):
    """A snapshot as a worker process would receive it."""
    return pickle.loads(pickle.dumps(snapshot))


def returned(snapshot):
    """A snapshot as the coordinator receives it back from a worker."""
    return pickle.loads(pickle.dumps(snapshot))


def committed(repo, path="a"):
    return zarr.open_array(repo.readonly_session("main").store, path=path, mode="r")[...]


def assert_nothing_merged(session):
    assert not session.has_uncommitted_changes
    assert session.status().updated_chunks == {}


def test_disjoint_chunks_merge_and_commit(repo):
    with_array(repo)
    session = writable_session(repo)
    with session.allow_pickling() as snap:
        a = write_block(shipped(snap), "a", (slice(0, 2), slice(0, 8)), 1.0)
        b = write_block(shipped(snap), "a", (slice(2, 4), slice(0, 8)), 2.0)
    merge_sessions(session, returned(a), returned(b))
    session.commit("two tasks")
    data = committed(repo)
    assert (data[0:2] == 1).all() and (data[2:4] == 2).all() and (data[4:] == -1).all()


def test_overlapping_different_bytes_is_refused_and_nothing_merged(repo):
    with_array(repo)
    session = writable_session(repo)
    with session.allow_pickling() as snap:
        a = write_block(shipped(snap), "a", (slice(0, 2), slice(0, 2)), 1.0)
        b = write_block(shipped(snap), "a", (slice(0, 2), slice(0, 4)), 2.0)
    with pytest.raises(OverlappingWritesError, match=r"/a chunk \[0, 0\]") as info:
        merge_sessions(session, returned(a), returned(b))
    assert info.value.conflicts == [("/a", (0, 0))]
    assert isinstance(info.value, ValueError)
    assert_nothing_merged(session)


def test_overlap_with_an_earlier_merge_is_refused(repo):
    """Merging results one by one is as safe as merging them at once."""
    with_array(repo)
    session = writable_session(repo)
    with session.allow_pickling() as snap:
        a = write_block(shipped(snap), "a", (slice(0, 2), slice(0, 2)), 1.0)
        b = write_block(shipped(snap), "a", (slice(0, 2), slice(0, 2)), 2.0)
    merge_sessions(session, returned(a))
    before = session.status().updated_chunks
    with pytest.raises(OverlappingWritesError, match="earlier merge"):
        merge_sessions(session, returned(b))
    assert session.status().updated_chunks == before
    session.commit("first only")
    assert (committed(repo)[0:2, 0:2] == 1).all()


def test_identical_overlap_is_accepted(repo):
    """Every task rewriting the same coordinate chunk with the same bytes is fine."""
    with_array(repo)
    with_array(repo, shape=(4,), chunks=(4,), path="coord")
    session = writable_session(repo)
    with session.allow_pickling() as snap:
        results = []
        for i in range(4):
            s = shipped(snap)
            write_block(s, "coord", (slice(None),), np.arange(4, dtype="f4"))
            write_block(s, "a", (slice(2 * i, 2 * i + 2), slice(None)), float(i))
            results.append(returned(s))
    merge_sessions(session, results[:2])
    merge_sessions(session, results[2:])
    session.commit("all")
    assert (committed(repo, "coord") == np.arange(4)).all()
    assert (committed(repo)[6:8] == 3).all()


def test_an_array_recreated_with_other_dims_by_one_fork_of_a_call(repo):
    """One fork writes the 1-d array, another re-creates it 2-d: refused before anything is
    merged (icechunk refuses it after merging the first fork; our checks once crashed on
    the mixed coordinates)."""
    with_array(repo, shape=(4,), chunks=(2,))
    session = writable_session(repo)
    with session.allow_pickling() as snap:
        a = write_block(shipped(snap), "a", (slice(0, 2),), 1.0)
        b = shipped(snap)
        zarr.create_array(b.store, name="a", shape=(4, 4), chunks=(2, 2), dtype="f4",
                          fill_value=0.0, overwrite=True)  # fmt: skip
        write_block(b, "a", (slice(2, 4), slice(2, 4)), 5.0)
    with pytest.raises(OverlappingWritesError, match=r"re-created '/a'.*Nothing was merged"):
        merge_sessions(session, returned(a), returned(b))
    assert_nothing_merged(session)
    merge_sessions(session, returned(b))  # alone, the re-created array merges
    session.commit("2-d")
    assert committed(repo).shape == (4, 4) and (committed(repo)[2:, 2:] == 5).all()


def test_foreign_snapshot_is_refused(repo, other_repo):
    with_array(repo)
    with_array(other_repo)
    session = writable_session(repo)
    other = writable_session(other_repo)
    with other.allow_pickling() as snap:
        foreign = returned(write_block(shipped(snap), "a", (slice(0, 2), slice(0, 2)), 5.0))
    with pytest.raises(ForeignSessionError, match="another session"):
        merge_sessions(session, foreign)
    assert_nothing_merged(session)


def test_foreign_raw_fork_is_refused(repo, other_repo):
    """A plain icechunk fork of another repository: icechunk itself would lose its data."""
    with_array(repo)
    with_array(other_repo)
    session = writable_session(repo)
    fork = other_repo.writable_session("main").fork()
    zarr.open_array(fork.store, path="a", mode="r+")[0:2, 0:2] = 5.0
    fork = pickle.loads(pickle.dumps(fork))
    with pytest.raises(ForeignSessionError, match="another repository"):
        merge_sessions(session, fork)
    assert_nothing_merged(session)


def test_raw_fork_of_the_same_session_is_accepted(repo):
    with_array(repo)
    session = writable_session(repo)
    fork = session.fork()
    zarr.open_array(fork.store, path="a", mode="r+")[0:2, 0:2] = 5.0
    merge_sessions(session, pickle.loads(pickle.dumps(fork)))
    session.commit("raw fork")
    assert (committed(repo)[0:2, 0:2] == 5).all()


def test_snapshot_from_before_a_commit_is_refused(repo):
    with_array(repo)
    session = writable_session(repo)
    with session.allow_pickling() as snap:
        old = returned(write_block(shipped(snap), "a", (slice(0, 2), slice(0, 2)), 5.0))
    zarr.open_array(session.store, path="a", mode="r+")[4:6, 4:6] = 1.0
    session.commit("meanwhile")
    later = writable_session(repo)
    with pytest.raises(ForeignSessionError):
        merge_sessions(later, old)
    assert_nothing_merged(later)


def test_snapshot_from_before_discard_is_refused(repo):
    with_array(repo)
    session = writable_session(repo)
    with session.allow_pickling() as snap:
        old = returned(write_block(shipped(snap), "a", (slice(0, 2), slice(0, 2)), 5.0))
    session.discard_changes()
    with pytest.raises(ForeignSessionError, match="discarded"):
        merge_sessions(session, old)
    assert_nothing_merged(session)


@pytest.mark.parametrize("plain", [True, False])
def test_writable_session_as_item_is_a_type_error(repo, plain):
    with_array(repo)
    session = writable_session(repo)
    other = repo.writable_session("main") if plain else writable_session(repo)
    with pytest.raises(NotASnapshotError, match=r"fork") as info:
        merge_sessions(session, other)
    assert isinstance(info.value, TypeError)
    with pytest.raises(NotASnapshotError):
        merge_sessions(session, "not a session")


def test_refusal_is_all_or_nothing(repo):
    """One bad item among good ones: none of them is merged."""
    with_array(repo)
    session = writable_session(repo)
    with session.allow_pickling() as snap:
        good = [
            returned(write_block(shipped(snap), "a", (slice(2 * i, 2 * i + 2), slice(None)), 1.0))
            for i in range(3)
        ]
    with pytest.raises(NotASnapshotError):
        merge_sessions(session, *good, repo.writable_session("main"))
    assert_nothing_merged(session)


def test_duplicates_and_nested_lists(repo):
    with_array(repo)
    session = writable_session(repo)
    with session.allow_pickling() as snap:
        a = returned(write_block(shipped(snap), "a", (slice(0, 2), slice(None)), 1.0))
        b = returned(write_block(shipped(snap), "a", (slice(2, 4), slice(None)), 2.0))
        c = returned(write_block(shipped(snap), "a", (slice(4, 6), slice(None)), 3.0))
    # A thread pool returns the same object for every task; a pickled copy of an already
    # merged result is recognised too.
    merge_sessions(session, [a, [b, a]], (c, [[a, b]]), a)
    merge_sessions(session, returned(a))
    session.commit("nested")
    data = committed(repo)
    assert (data[0:2] == 1).all() and (data[2:4] == 2).all() and (data[4:6] == 3).all()


def test_tree_merge_on_a_worker(repo):
    """A snapshot as base merges others (as a worker would), then goes home once."""
    with_array(repo)
    session = writable_session(repo)
    with session.allow_pickling() as snap:
        parts = [
            returned(write_block(shipped(snap), "a", (slice(2 * i, 2 * i + 2), slice(None)), i))
            for i in range(4)
        ]
        worker_side = shipped(snap)
    merged = merge_sessions(worker_side, *parts[:3])
    assert isinstance(merged, SessionSnapshot)
    with pytest.raises(OverlappingWritesError):
        merge_sessions(
            worker_side,
            returned(write_block(shipped(snap), "a", (slice(0, 1), slice(None)), 9.0)),
        )
    merge_sessions(session, returned(merged), parts[3])
    session.commit("tree")
    data = committed(repo)
    for i in range(4):
        assert (data[2 * i : 2 * i + 2] == i).all()


def test_merge_into_plain_icechunk_session_and_fork(repo, other_repo):
    with_array(repo)
    with_array(other_repo)
    session = repo.writable_session("main")
    with allow_pickling(session) as snap:
        a = returned(write_block(shipped(snap), "a", (slice(0, 2), slice(None)), 1.0))
    # A raw fork as base has no lineage to compare: node ids catch the foreign repository.
    foreign_fork = other_repo.writable_session("main").fork()
    with pytest.raises(ForeignSessionError, match="another repository"):
        merge_sessions(foreign_fork, a)
    assert not foreign_fork.has_uncommitted_changes
    merge_sessions(session, a)
    session.commit("plain")
    assert (committed(repo)[0:2] == 1).all()


def _encoded_chunk(value: float) -> bytes:
    """The stored bytes of a one-element float32 chunk, encoded by zarr itself."""
    store = zarr.storage.MemoryStore()
    arr = zarr.create_array(store, name="x", shape=(1,), chunks=(1,), dtype="f4")
    arr[0] = value
    return sync(store.get("x/c/0", default_buffer_prototype())).to_bytes()


def test_ten_thousand_snapshots(repo, capsys):
    n = 10_000
    with_array(repo, shape=(n,), chunks=(1,), path="a")
    session = writable_session(repo)
    payload = default_buffer_prototype().buffer.from_bytes(_encoded_chunk(7.0))
    with session.allow_pickling() as snap:
        blob = pickle.dumps(snap)
        results = []
        for i in range(n):
            task = pickle.loads(blob)
            sync(task.store.set(f"a/c/{i}", payload))  # one chunk per task
            results.append(pickle.dumps(task))
    received = [pickle.loads(r) for r in results]
    t0 = time.perf_counter()
    merge_sessions(session, *received)
    seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nmerged {n} snapshots in {seconds:.3f} s")
    session.commit("10k")
    assert (committed(repo) == 7.0).all()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_property_disjoint_chunk_writes_commit_the_source(tmp_path_factory, data):
    ndim = data.draw(st.integers(1, 3), label="ndim")
    chunks = tuple(data.draw(st.integers(1, 4), label="chunk") for _ in range(ndim))
    shape = tuple(
        c * data.draw(st.integers(1, 3)) + data.draw(st.integers(0, c - 1)) for c in chunks
    )
    source = np.arange(int(np.prod(shape)), dtype="f4").reshape(shape)
    repo = make_repo(tmp_path_factory.mktemp("prop"))
    with_array(repo, shape=shape, chunks=chunks, fill_value=np.nan)
    grid = [range(0, s, c) for s, c in zip(shape, chunks, strict=True)]
    blocks = [
        tuple(slice(o, min(o + c, s)) for o, c, s in zip(origin, chunks, shape, strict=True))
        for origin in np.ndindex(*(len(g) for g in grid))
        for origin in [tuple(g[i] for g, i in zip(grid, origin, strict=True))]
    ]
    # Group whole chunks into tasks at random.
    n_tasks = data.draw(st.integers(1, len(blocks)), label="tasks")
    owner = [data.draw(st.integers(0, n_tasks - 1)) for _ in blocks]
    session = writable_session(repo)
    with session.allow_pickling() as snap:
        results = []
        for t in range(n_tasks):
            task = shipped(snap)
            for block, o in zip(blocks, owner, strict=True):
                if o == t:
                    write_block(task, "a", block, source[block])
            results.append(returned(task))
    merge_sessions(session, *reversed(results))
    session.commit("property")
    np.testing.assert_array_equal(committed(repo), source)


def test_icechunk_merges_foreign_forks_silently():
    """Pin the upstream behaviour our ForeignSessionError exists for."""
    import tempfile

    repos = []
    for _ in range(2):
        r = make_repo(tempfile.mkdtemp())
        with_array(r)
        repos.append(r)
    base = repos[0].writable_session("main")
    fork = repos[1].writable_session("main").fork()
    zarr.open_array(fork.store, path="a", mode="r+")[0:2, 0:2] = 5.0
    base.merge(pickle.loads(pickle.dumps(fork)))  # no error from icechunk ...
    try:
        base.commit("foreign")
    except icechunk.IcechunkError:
        return  # a future icechunk that refuses is fine too
    assert (committed(repos[0])[0:2, 0:2] == -1).all()  # ... and the data is gone
