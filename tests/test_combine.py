"""One fork per engine call: the forks of a call's tasks combined where they ran.

`task.run_call` merges the forks of a call whose tasks all succeeded into one
(`snapshot.combine_snapshots`), so the coordinator checks and merges one fork per call. Only
what the coordinator's merge would accept unchanged is combined; the rest goes home task by
task. Every case is read back from a real repository.
"""

import itertools
from types import SimpleNamespace

import icechunk
import numpy as np
import pytest
import xarray as xr
import zarr

from conftest import make_repo
from icechunk_distributed import OverlappingWritesError, merge_sessions, run_region_writes
from icechunk_distributed.planning import TiledRegions
from icechunk_distributed.results import TaskRecord, TaskRecords
from icechunk_distributed.runner import TaskLoop, _Round
from icechunk_distributed.session import writable_session
from icechunk_distributed.task import TaskOutput, run_call


@pytest.fixture
def repo(tmp_path):
    repo = make_repo(tmp_path / "repo")
    session = repo.writable_session("main")
    zarr.create_array(session.store, name="a", shape=(8,), chunks=(2,), dtype="f4", fill_value=-1)
    session.commit("a")
    return repo


def writer(block, value, *, attrs=False, fail=False):
    """A task: write ``value`` into chunk ``block`` of ``a`` through its snapshot."""

    def task(snap):
        zarr.open_array(snap.store, path="a", mode="r+")[2 * block : 2 * block + 2] = value
        if attrs:
            zarr.open_group(snap.store, mode="r+").attrs["k"] = 1
        snap.seal()
        if fail:
            return TaskOutput(block, False, error="boom")
        return TaskOutput(block, True, snapshot=snap)

    return task


def run(repo, tasks, **kwargs):
    """Run ``tasks`` as one engine call, each on its own copy of one block's snapshot."""
    session = writable_session(repo)
    with session.allow_pickling() as snapshot:
        snaps = [snapshot.copy_for_task() for _ in tasks]
        outs = run_call(lambda k: tasks[k](snaps[k]), list(range(len(tasks))), **kwargs)
    return session, outs


def committed(repo):
    return zarr.open_array(repo.readonly_session("main").store, path="a", mode="r")[:].tolist()


def test_a_call_of_disjoint_tasks_comes_home_as_one_fork(repo):
    session, outs = run(repo, [writer(k, float(k)) for k in range(4)])
    assert all(o.shared and o.snapshot is outs[0].snapshot for o in outs)
    assert outs[0].snapshot.n_chunks_written() == 4
    merge_sessions(session, *[o.snapshot for o in outs])
    session.commit("one call")
    assert committed(repo) == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    ("tasks", "why"),
    [
        ([writer(0, 1.0), writer(0, 2.0)], "two tasks wrote one chunk: the merge judges"),
        ([writer(0, 1.0), writer(1, 2.0, attrs=True)], "a task changed metadata"),
        ([writer(0, 1.0), writer(1, 2.0, fail=True)], "a task failed"),
    ],
)
def test_what_the_merge_must_judge_goes_home_task_by_task(repo, tasks, why):
    session, outs = run(repo, tasks)
    assert not any(o.shared for o in outs), why
    if why.startswith("two tasks"):
        with pytest.raises(OverlappingWritesError):
            merge_sessions(session, *[o.snapshot for o in outs])
        assert committed(repo) == [-1] * 8


def test_combining_can_be_turned_off(repo):
    _, outs = run(repo, [writer(k, 1.0) for k in range(3)], combine=False)
    assert not any(o.shared for o in outs)
    assert len({id(o.snapshot) for o in outs}) == 3


def test_a_shared_result_partly_resolved_by_another_copy_sends_its_open_tasks_again():
    """Copy A of a call: task 1 failed while its backup (copy B) ran. Copy B's result is
    shared: merging it would merge tasks 0 and 2 a second time, so task 1 runs again."""
    adapter = SimpleNamespace(capabilities=SimpleNamespace(supports_backups=True))
    won = []
    loop = TaskLoop(
        adapter,
        lambda arg: arg,
        retries=0,
        is_success=lambda o: o.ok,
        describe_error=lambda o: o.error,
        on_success=lambda i, out, attempts: won.append((i, out.snapshot)),
        batch_size=lambda n: 3,
        is_shared=lambda o: o.shared,
    )
    loop.n_total, loop._attempts, loop._failed = 3, [2, 2, 2], [0, 0, 0]
    rnd = loop._round = _Round([0, 1, 2], {0, 1, 2})
    call = (0, 1, 2)
    rnd.copies[call], rnd.since[call] = 2, 0.0
    rnd.backed_up.add(call)
    loop._take(call, [TaskOutput(0, True, snapshot="A0"), TaskOutput(1, False, error="x"),
                      TaskOutput(2, True, snapshot="A2")])  # fmt: skip
    assert won == [(0, "A0"), (2, "A2")] and rnd.unresolved == {1}
    loop._take(call, [TaskOutput(i, True, snapshot="B", shared=True) for i in call])
    assert won == [(0, "A0"), (2, "A2")]  # B is not merged
    assert rnd.retry == [1] and not rnd.unresolved and not loop.failures


@pytest.mark.parametrize("executor", ["threads", "processes"])
def test_grouped_calls_keep_every_commit_under_the_chunk_limit(tmp_path, executor):
    """1,024 one-chunk regions go 16 to a call; with max_chunks_per_commit=8 each region is
    still merged (and counted) on its own, so no commit holds more than 8 (found by review:
    combined calls made commits of 16)."""
    repo = make_repo(tmp_path / "repo")
    n = 1024
    ds = xr.Dataset({"a": (("time",), np.arange(n, dtype="f4"))})
    base = repo.lookup_branch("main")
    run_region_writes(ds, repo, encoding={"a": {"chunks": (1,)}}, task_size=1, progress=False,
                      executor=executor, workers=2, max_chunks_per_commit=8)  # fmt: skip
    ids = [s.id for s in repo.ancestry(branch="main")]
    ids = ids[: ids.index(base) + 1][::-1]
    sizes = [
        sum(len(c) for c in repo.diff(from_snapshot_id=a, to_snapshot_id=b).updated_chunks.values())
        for a, b in itertools.pairwise(ids)
    ]
    assert max(sizes) <= 8 and sum(sizes) >= n
    out = xr.open_zarr(repo.readonly_session("main").store, consolidated=False)
    np.testing.assert_array_equal(out["a"].values, ds["a"].values)


def test_compact_regions_and_records_behave_like_the_lists_they_replace():
    regions = TiledRegions(["t"], [np.array([[0, 2], [2, 4]])])
    as_list = [{"t": slice(0, 2)}, {"t": slice(2, 4)}]
    assert regions == as_list and as_list == regions
    assert regions + [] == as_list  # noqa: RUF005 - `+` is what is tested
    assert regions != tuple(as_list) and regions[-1] == as_list[-1] and regions[:1] == as_list[:1]
    records = TaskRecords(as_list)
    records.add(1, 0.5, 1, "w", 3, 12)
    records.add(0, 0.25, 2, "w", 4, 16)
    records.sort()
    expected = [TaskRecord(0, as_list[0], 0.25, 2, "w", 4, 16),
                TaskRecord(1, as_list[1], 0.5, 1, "w", 3, 12)]  # fmt: skip
    assert records == expected and [*records] == expected
    assert [] + records == expected  # noqa: RUF005 - `+` is what is tested
    assert records != "" and TaskRecords([]) != "" and TaskRecords([]) == []
    assert records.n_chunks == 7 and records.nbytes == 28


def test_two_forks_deleting_the_same_node_merge(repo):
    """Not a conflict (icechunk merges it); only a deletion against a write is refused."""
    session = writable_session(repo)
    with session.allow_pickling() as snapshot:
        forks = [snapshot.copy_for_task() for _ in range(2)]
        for snap in forks:
            del zarr.open_group(snap.store, mode="r+")["a"]
            snap.seal()
    merge_sessions(session, *forks)
    session.commit("a deleted")
    with pytest.raises((KeyError, FileNotFoundError, icechunk.IcechunkError)):
        committed(repo)
