"""Straggler backups in the generic loop, on real engines: threads, processes, a local Ray, a
dask LocalCluster and Lithops' localhost backend.

The tasks (``slow_tasks.task``) follow a script: which copy of which task sleeps, and which
fails. A sleeping loser gives up as soon as the winner has succeeded, so no engine is left busy.
The engines are started here, once for the module, rather than by importing test_engines'
session fixtures: an imported fixture is a second instance, and Ray cannot be started twice.
"""

import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor

import pytest

import slow_tasks
from icechunk_distributed.adapters import Adapter, Capabilities
from icechunk_distributed.adapters.local import FuturesAdapter, SerialAdapter
from icechunk_distributed.runner import Backups, TaskLoop, run_batch
from slow_tasks import seen, started

N = 8
SLOW = 1  # the straggling task
QUICK = Backups(factor=2, min_done=0.5, min_seconds=0.5, poll=0.05)
# Seconds a straggler would sleep; it gives up as soon as its backup has succeeded. A generous
# deadline, not a timing: however busy the machine, the backup wins long before. A copy that
# waits for flags raises TimeoutError when they have not come by then.
LONG = 120.0
# Lithops localhost v2 starts a process per call (~0.7 s) on 2 workers: with more tasks than
# workers, a queued call looks like a straggler too (its time counts from submission).
TASKS = {"lithops": 2}
ENGINES = [
    "threads",
    "processes",
    pytest.param("ray", marks=pytest.mark.ray),
    pytest.param("dask", marks=pytest.mark.dask),
    pytest.param("lithops", marks=pytest.mark.lithops),
]


def _make(name):
    if name == "threads":
        return FuturesAdapter.threads(4)
    if name == "processes":
        return FuturesAdapter.processes(2)
    pytest.importorskip({"ray": "ray", "dask": "distributed", "lithops": "lithops"}[name])
    if name == "ray":
        from icechunk_distributed.adapters.ray import RayAdapter

        return RayAdapter(num_cpus=2)  # reuses a Ray another test module started
    if name == "dask":
        from icechunk_distributed.adapters.dask import DaskAdapter

        return DaskAdapter(workers=2)  # reuses the default client, if there is one
    import lithops

    from icechunk_distributed.adapters.lithops import LithopsAdapter, localhost_config

    config = localhost_config(2)
    config["localhost"]["version"] = 2  # v1 runs jobs in turn: a backup would wait for all
    return LithopsAdapter(lithops.FunctionExecutor(config=config, log_level=None), workers=2)


@pytest.fixture(scope="module")
def engines():
    """``engines(name)``: that engine's adapter, started once for this module, then closed
    (each adapter stops only what it started itself; the Lithops executor is ours)."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = _make(name)
        return made[name]

    yield get
    for name, adapter in made.items():
        adapter.close()
        if name == "lithops":
            adapter.executor.clean()


class Run:
    """The callbacks' record of one ``TaskLoop`` run."""

    def __init__(self):
        self.wins = {}  # index -> (index, winning attempt), the result on_success received
        self.attempts = {}  # index -> attempts launched, as on_success was told
        self.failures = []
        self.events = []

    def on_success(self, i, result, attempts):
        assert i not in self.wins, f"task {i} succeeded twice"
        self.wins[i] = result
        self.attempts[i] = attempts

    def on_event(self, event):
        self.events.append(event)

    def close(self):
        pass

    def kinds(self, kind):
        return [(e.index, e.attempt) for e in self.events if e.kind == kind]


class Seeing(Adapter):
    """Any engine's adapter, leaving ``seen(index, attempt)`` in ``flags`` as the loop receives
    each copy's result (a return value or an error), for the scripts to wait on."""

    def __init__(self, inner, flags):
        self.inner, self.flags = inner, flags

    @property
    def capabilities(self):
        return self.inner.capabilities

    def map_unordered(self, fn, items, **kwargs):
        with contextlib.closing(self.inner.map_unordered(fn, items, **kwargs)) as results:
            for key, result in results:
                copy = slow_tasks.copy_of(result)
                if copy is not None:
                    (self.flags / seen(*copy)).touch()
                yield key, result


def run(adapter, flags, script, *, n=N, backups=QUICK, retries=0, stop_early=True, batch=None):
    record = Run()
    loop = TaskLoop(
        Seeing(adapter, flags),
        slow_tasks.task if batch is None else functools.partial(run_batch, slow_tasks.task),
        retries=retries,
        is_success=lambda result: not isinstance(result, BaseException),
        describe_error=repr,
        on_success=record.on_success,
        batch_size=None if batch is None else (lambda n: batch),
        backups=backups,
        observers=[record],
    )
    failed = loop.run(n, lambda i, attempt: (i, attempt, script, str(flags), stop_early))
    record.failures = [(f.index, f.attempts) for f in failed]
    return record


def firsts(n=N, winners=None):
    """Every task won by its first copy, except the ``{task: winning attempt}`` given."""
    return {i: (i, (winners or {}).get(i, 1)) for i in range(n)}


def assert_won(record, n=N, winners=None):
    """Every task won once, by its own result; the ``{task: attempt}`` given by exactly that
    copy. On a busy machine a task outside the script may look slow enough to be backed up
    too, so its winner may be either copy."""
    winners = winners or {}
    assert sorted(record.wins) == list(range(n))
    for i, (index, attempt) in record.wins.items():
        assert index == i
        assert attempt == winners[i] if i in winners else attempt in (1, 2), (i, attempt)


def assert_backup_won(record, n):
    """Every task succeeded once; the straggler through its backup (attempt 2). Other tasks
    may have been backed up too, when an engine queued them behind the straggler."""
    assert_won(record, n, {SLOW: 2})  # the slow copy's result never reached on_success
    assert record.attempts[SLOW] == 2
    assert (SLOW, 2) in record.kinds("backup")
    assert len(record.kinds("done")) == n
    assert not record.failures


@pytest.mark.parametrize("name", ENGINES)
def test_a_straggler_is_backed_up_and_the_backup_wins(engines, tmp_path, name):
    adapter = engines(name)
    assert adapter.capabilities.supports_backups
    n = TASKS.get(name, N)
    record = run(adapter, tmp_path, {(SLOW, 1): (LONG, False)}, n=n)
    assert_backup_won(record, n)
    assert not record.kinds("retry")


@pytest.mark.parametrize("name", ENGINES)
def test_without_backups_nothing_is_backed_up(engines, tmp_path, name):
    n = TASKS.get(name, N)
    record = run(engines(name), tmp_path, {(SLOW, 1): (1.5, False)}, n=n, backups=None)
    assert record.wins == firsts(n)
    assert set(record.attempts.values()) == {1}
    assert not record.kinds("backup")
    assert not (tmp_path / f"{SLOW}.2").exists()  # no second copy ever ran


@pytest.mark.parametrize("name", ENGINES)
def test_a_copy_that_fails_while_its_backup_runs_is_not_a_failure(engines, tmp_path, name):
    """retries=0, so a failure counted for the first copy would be final. The first copy
    fails once its backup has started; the backup succeeds once the first copy has failed."""
    script = {
        (SLOW, 1): (LONG, True, (started(SLOW, 2),)),
        (SLOW, 2): (LONG, False, (seen(SLOW, 1),)),  # once the loop has the failure
    }
    n = TASKS.get(name, N)
    record = run(engines(name), tmp_path, script, n=n, retries=0)
    assert_backup_won(record, n)
    assert not record.kinds("retry") and not record.kinds("failed")


def test_both_copies_failing_count_as_one_failed_attempt(tmp_path):
    """A backup does not use up the retry budget: one retry is left, and it succeeds."""
    script = {
        (SLOW, 1): (LONG, True, (started(SLOW, 2),)),  # fails while its backup runs
        (SLOW, 2): (LONG, True, (seen(SLOW, 1),)),  # then the backup fails too
    }
    with FuturesAdapter.threads(4) as adapter:
        record = run(adapter, tmp_path, script, retries=1)
    assert_won(record, winners={SLOW: 3})
    assert (SLOW, 2) in record.kinds("backup")
    assert record.kinds("retry") == [(SLOW, 2)]  # after both copies failed, counted once
    assert not record.failures


class Recording(FuturesAdapter):
    """A thread pool adapter that keeps every result it hands to the loop."""

    def __init__(self, workers):
        super().__init__(ThreadPoolExecutor(workers), owned=True)
        self.seen = []

    def map_unordered(self, fn, items, *, poll=None):
        with contextlib.closing(super().map_unordered(fn, items, poll=poll)) as results:
            for key, result in results:
                self.seen.append(result)
                yield key, result


def test_a_loser_finishing_while_the_round_runs_is_dropped(tmp_path):
    """The straggler's first copy loses to its backup, then succeeds while task 5 still runs
    (its result is dropped); task 5's first copy wins over its own backup."""
    script = {
        (SLOW, 1): (LONG, False, (seen(SLOW, 2),)),  # succeeds once its backup's success came
        (5, 1): (LONG, False, (started(5, 2), seen(SLOW, 1))),  # ... and then its own
        (5, 2): (LONG, False, (seen(5, 1),)),
    }
    with Recording(4) as adapter:
        record = run(adapter, tmp_path, script, stop_early=False)
    assert_won(record, winners={SLOW: 2, 5: 1})
    assert record.attempts[5] == 2
    assert {(SLOW, 2), (5, 2)} <= set(record.kinds("backup"))
    assert (SLOW, 1) in adapter.seen  # the loser's success did come back, and was dropped


def test_backups_of_batched_calls(tmp_path):
    """With several tasks per call, the straggling call is backed up as a whole."""
    with FuturesAdapter.threads(4) as adapter:
        record = run(adapter, tmp_path, {(SLOW, 1): (LONG, False)}, batch=2)
    assert_won(record, winners={0: 2, SLOW: 2})  # task 0 shares the straggler's call
    assert {(0, 2), (SLOW, 2)} <= set(record.kinds("backup"))


@pytest.mark.parametrize("name", ["threads", "processes"])
def test_closing_an_owned_pool_does_not_wait_for_a_loser(tmp_path, name):
    adapter = _make(name)
    try:
        # The first copy runs until the test lets it go, after the pool is closed.
        script = {(SLOW, 1): (LONG, False, ("release",))}
        try:
            record = run(adapter, tmp_path, script, stop_early=False)
        finally:
            adapter.close()
        assert_won(record, winners={SLOW: 2})
        assert not slow_tasks.ended(tmp_path, SLOW, 1)  # the loser is still running
    finally:
        (tmp_path / "release").touch()


@pytest.mark.lithops
def test_lithops_localhost_v1_runs_no_backups():
    pytest.importorskip("lithops")
    from icechunk_distributed.adapters.lithops import LithopsAdapter

    with LithopsAdapter(workers=2) as adapter:  # localhost_config(): version 1
        assert not adapter.capabilities.supports_backups


class NoPoll(Adapter):
    """A custom adapter written before backups existed: ``map_unordered`` has no ``poll``."""

    capabilities = Capabilities(crosses_processes=False, parallelism=1)

    def map_unordered(self, fn, items):
        for key, arg in items:
            yield key, fn(arg)


@pytest.mark.parametrize("adapter", [SerialAdapter(), NoPoll()], ids=["serial", "custom"])
def test_backups_are_ignored_by_engines_without_them(tmp_path, adapter):
    assert not adapter.capabilities.supports_backups
    record = run(adapter, tmp_path, {(SLOW, 1): (1.0, False)})
    assert record.wins == firsts()
    assert not record.kinds("backup")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"factor": 0.5}, r"factor=0\.5\): must be at least 1"),
        ({"factor": float("nan")}, "factor=nan"),
        ({"min_done": 1.5}, r"min_done=1\.5\): must be a fraction between 0 and 1"),
        ({"min_done": -0.1}, "min_done"),
        ({"min_seconds": -1}, r"min_seconds=-1\): must be zero or more"),
        ({"poll": 0}, r"poll=0\): must be a positive, finite number of seconds"),
        ({"poll": float("inf")}, "poll=inf"),
    ],
)
def test_backups_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Backups(**kwargs)


def test_backups_take_keywords_only():
    assert Backups() == Backups(factor=3.0, min_done=0.5, min_seconds=1.0, poll=0.25)
    with pytest.raises(TypeError):
        Backups(3.0)
