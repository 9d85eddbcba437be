"""A DistributedSession shared by threads: every thread sees every write made so far.

Regression tests for issue 11: thread writes were invisible to the session's own reads until
``status()``/``commit()``, a thread's fork never saw other threads' later writes, and the
overlap ledger treated a later, deliberate overwrite as a collision.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zarr
from zarr.core.sync import sync

from icechunk_distributed import OverlappingWritesError, merge_sessions, writable_session
from icechunk_distributed.errors import SessionStateError


def with_array(repo, n=4, chunk=250):
    session = repo.writable_session("main")
    zarr.create_array(
        session.store, name="v", shape=(n * chunk,), chunks=(chunk,), dtype="f8", fill_value=-1
    )
    session.commit("array")
    return chunk


def array(store):
    return zarr.open_array(store, path="v")


def committed(repo):
    return zarr.open_array(repo.readonly_session("main").store, path="v", mode="r")[:]


def on_thread(fn, *args):
    """Run ``fn`` on a new thread (a new thread ident, as a pool worker has) and return."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))
    t.start()
    t.join(timeout=120)
    assert not t.is_alive()
    return out[0]


def test_owner_reads_see_thread_writes_before_commit(repo):
    chunk = with_array(repo)
    session = writable_session(repo)

    def task(i):
        array(session.store)[i * chunk : (i + 1) * chunk] = i

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(task, range(4)))
    expected = np.repeat(np.arange(4.0), chunk)
    np.testing.assert_array_equal(array(session.store)[:], expected)

    async def coords():
        return [c async for c in session.chunk_coordinates("/v")]

    # (icechunk 2.3 lists a chunk of an uncommitted session twice; a set compares what matters)
    assert set(sync(coords())) == {(0,), (1,), (2,), (3,)}
    session.commit("threads")
    np.testing.assert_array_equal(committed(repo), expected)


def test_a_thread_sees_what_another_thread_wrote(repo):
    chunk = with_array(repo)
    session = writable_session(repo)

    def write(i, value):
        array(session.store)[i * chunk : (i + 1) * chunk] = value

    def read():
        return array(session.store)[:]

    on_thread(write, 0, 1.0)
    assert (on_thread(read)[:chunk] == 1).all()
    # One pool: a thread that has written before reads another thread's later write.
    with ThreadPoolExecutor(2) as pool:
        barrier = threading.Barrier(2)

        def first():
            write(1, 2.0)
            barrier.wait(timeout=60)  # both threads have written once
            barrier.wait(timeout=60)  # the other thread wrote again
            return read()

        def second():
            write(2, 3.0)
            barrier.wait(timeout=60)
            write(3, 4.0)
            barrier.wait(timeout=60)

        a, b = pool.submit(first), pool.submit(second)
        b.result(timeout=120)
        seen = a.result(timeout=120)
    np.testing.assert_array_equal(seen, np.repeat([1.0, 2.0, 3.0, 4.0], chunk))
    session.commit("x")
    np.testing.assert_array_equal(committed(repo), np.repeat([1.0, 2.0, 3.0, 4.0], chunk))


def test_a_thread_overwrites_what_it_read_from_another_thread(repo):
    """Read-modify-write across threads is an ordered write, not a collision."""
    chunk = with_array(repo)
    session = writable_session(repo)
    on_thread(lambda: array(session.store).__setitem__(slice(0, chunk), 1.0))

    def add_one():
        a = array(session.store)
        a[:chunk] = a[:chunk] + 1

    on_thread(add_one)
    on_thread(add_one)
    session.commit("rmw")
    assert (committed(repo)[:chunk] == 3).all()


def test_concurrent_threads_writing_one_chunk_differently_are_refused(repo):
    chunk = with_array(repo)
    session = writable_session(repo)
    barrier = threading.Barrier(2)

    def write(value):
        store = session.store  # both forks are made before either writes
        barrier.wait(timeout=60)
        array(store)[:chunk] = value

    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(write, 1.0), pool.submit(write, 2.0)]:
            f.result(timeout=120)
    with pytest.raises(OverlappingWritesError, match="could not see each other"):
        session.commit("collision")


def test_a_store_kept_across_tasks_is_refused_at_commit(repo):
    chunk = with_array(repo)
    session = writable_session(repo)
    kept = []

    def first():
        kept.append(session.store)
        array(kept[0])[:chunk] = 1.0
        array(session.store)[chunk : 2 * chunk] = 2.0  # takes store again: the old fork retires
        array(kept[0])[2 * chunk : 3 * chunk] = 3.0  # lost if nothing said so

    on_thread(first)
    with pytest.raises(SessionStateError, match="once per task"):
        session.commit("kept")


def test_an_idle_older_thread_fork_does_not_undo_a_later_overwrite(repo):
    """A live fork merged again must not land over a younger fork's deliberate overwrite."""
    chunk = with_array(repo)
    session = writable_session(repo)
    go, done = threading.Event(), threading.Event()

    def idle_writer():  # writes chunk 0 and stays alive, its fork live, until told
        array(session.store)[:chunk] = 1.0
        done.set()
        assert go.wait(timeout=120)

    t = threading.Thread(target=idle_writer)
    t.start()
    assert done.wait(timeout=120)
    # Another thread reads chunk 0 (so the idle fork is merged) and overwrites it.
    on_thread(
        lambda: array(session.store).__setitem__(slice(0, chunk), array(session.store)[0] + 10)
    )
    assert session.status().updated_chunks  # merges the idle fork again
    go.set()
    t.join(timeout=120)
    session.commit("ordered")
    assert (committed(repo)[:chunk] == 11).all()


def test_thread_writes_and_a_block_merge_in_one_session(repo):
    chunk = with_array(repo)
    session = writable_session(repo)
    on_thread(lambda: array(session.store).__setitem__(slice(0, chunk), 1.0))
    with session.allow_pickling() as snap:
        array(snap.store)[:chunk] = array(snap.store)[:chunk] * 5  # sees the thread's write
    merge_sessions(session, snap)
    session.commit("mixed")
    assert (committed(repo)[:chunk] == 5).all()
