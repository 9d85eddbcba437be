"""Real multi-process clusters, started the way people start them (tests/clusters.py).

A Ray cluster (``ray start`` head + 2 worker nodes) and a dask cluster (``dask scheduler`` + 2
``dask worker``), all on loopback, each node from its own directory and without the tests on
its ``PYTHONPATH``. The workers see the repository only through S3 (the moto server of
tests/s3.py). Checked:

- what lands is what ``Dataset.to_zarr`` writes (values and every array's zarr metadata),
  from a dataset and from a loader defined in a test module (tests/cluster_tasks.py, which the
  workers cannot import: it has to be shipped);
- a user's ``Client(address)`` and ``RAY_ADDRESS`` are used as they are: nothing assumes a
  local scheduler;
- losing a node: a worker node costs attempts, not data (one commit, the exact source); the
  head or scheduler ends the run with the branch unchanged, and the same call with the same
  ``run_id`` on another cluster finishes it.

No timing is asserted; the time each loss takes to be noticed is printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import icechunk
import pytest

import clusters
import s3
from cluster_tasks import ENCODING, N_TIME, GatedLoader, cluster_dataset, load, template
from icechunk_distributed import list_runs, run_region_writes
from icechunk_distributed.runs import read_state
from parity.compare import assert_same_repos

moto_endpoint, s3_location = s3.moto_endpoint, s3.s3_location
shared_ray_cluster, shared_dask_cluster = clusters.shared_ray_cluster, clusters.shared_dask_cluster
new_ray_cluster, new_dask_cluster = clusters.new_ray_cluster, clusters.new_dask_cluster

pytestmark = pytest.mark.cluster

DEADLINE = 600.0
"""Seconds any awaited condition may take (generous: a busy 2-core machine)."""

RUN = {"encoding": ENCODING, "task_size": 1, "progress": False}  # N_TIME regions


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> icechunk.Repository:
    """What ``Dataset.to_zarr`` stores for the test dataset (a local repository)."""
    repo = icechunk.Repository.create(
        icechunk.local_filesystem_storage(str(tmp_path_factory.mktemp("reference")))
    )
    session = repo.writable_session("main")
    cluster_dataset().to_zarr(session.store, encoding=ENCODING, consolidated=False)
    session.commit("to_zarr")
    return repo


def history(repo: icechunk.Repository, branch: str = "main") -> list[str]:
    return [s.id for s in repo.ancestry(branch=branch)]


def source(kind: str) -> dict[str, Any]:
    """``run_region_writes`` arguments for a dataset or a loader source."""
    if kind == "dataset":
        return {"source": cluster_dataset()}
    return {"source": load, "template": template()}


def pids_of(result: Any) -> set[int]:
    """The worker pid of every task record (``worker`` is ``host:pid:thread``)."""
    return {int(t.worker.split(":")[1]) for t in result.tasks}


def assert_ran_on_nodes(result: Any, cluster: clusters.Cluster) -> None:
    """Every task ran in a process of the cluster's nodes, and on more than one node."""
    nodes = {pid: cluster.node_of(pid) for pid in pids_of(result)}
    assert None not in nodes.values(), f"tasks ran outside the cluster: {nodes}"
    assert os.getpid() not in nodes
    assert len({n.name for n in nodes.values() if n is not None}) >= 2, nodes


def wait_until(
    condition: Callable[[], Any], what: str, timeout: float = DEADLINE, every: float = 0.05
) -> Any:
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(every)


def report(what: str, **facts: Any) -> None:
    """Print a measurement (``pytest -s`` shows it)."""
    print(f"\n[cluster] {what}: " + ", ".join(f"{k}={v}" for k, v in facts.items()))


class Events:
    """A ``progress=`` callback recording (time, event) pairs."""

    def __init__(self) -> None:
        self.events: list[tuple[float, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, event: Any) -> None:
        with self.lock:
            self.events.append((time.monotonic(), event))

    def first(self, kind: str, index: int) -> tuple[float, Any] | None:
        with self.lock:
            found = [(t, e) for t, e in self.events if e.kind == kind and e.index == index]
        return found[0] if found else None


def held_start_on(cluster: clusters.Cluster, gate: Path, nodes: list[clusters.Node]) -> Any:
    """``(region start, pid, node)`` of a task that started on one of ``nodes``, if any."""
    for start, pid in GatedLoader.starts(gate):
        node = cluster.node_of(pid)
        if node in nodes:
            return start, pid, node
    return None


# ---------------------------------------------------------------------------------------------
# The data through both clusters


@pytest.mark.parametrize("kind", ["dataset", "loader"])
@pytest.mark.ray
def test_ray_cluster_writes_what_to_zarr_writes(kind, shared_ray_cluster, s3_location, reference):
    repo = icechunk.Repository.create(s3_location.storage())
    before = history(repo)
    with clusters.ray_driver(shared_ray_cluster) as ray:
        args = source(kind)
        result = run_region_writes(args.pop("source"), repo, executor=ray, **args, **RUN)
    assert result.n_regions == N_TIME
    assert_ran_on_nodes(result, shared_ray_cluster)
    assert history(s3_location.open())[1:] == before
    assert_same_repos(s3_location.open(), reference)


@pytest.mark.parametrize("kind", ["dataset", "loader"])
@pytest.mark.dask
def test_dask_cluster_writes_what_to_zarr_writes(kind, shared_dask_cluster, s3_location, reference):
    import distributed

    repo = icechunk.Repository.create(s3_location.storage())
    before = history(repo)
    with distributed.Client(shared_dask_cluster.address, set_as_default=False) as client:
        args = source(kind)
        result = run_region_writes(args.pop("source"), repo, executor=client, **args, **RUN)
    assert result.n_regions == N_TIME
    assert_ran_on_nodes(result, shared_dask_cluster)
    assert history(s3_location.open())[1:] == before
    assert_same_repos(s3_location.open(), reference)


# ---------------------------------------------------------------------------------------------
# Item 5: the user's connection to a remote scheduler is what runs the tasks


@pytest.mark.dask
def test_a_remote_dask_client_is_reused(shared_dask_cluster, moto_endpoint, reference):
    """``executor="dask"`` takes the current ``Client(address)``; ``executor=client`` takes
    that client; the scheduler address in dask's config (``DASK_SCHEDULER_ADDRESS``) is
    joined, not replaced by a LocalCluster. Tasks run on the cluster's workers every time."""
    import dask
    import distributed

    from icechunk_distributed.adapters.dask import DaskAdapter

    def fresh_repo() -> s3.S3Location:
        location = s3.S3Location(moto_endpoint, s3.create_bucket(moto_endpoint), "repo")
        icechunk.Repository.create(location.storage())
        return location

    with distributed.Client(shared_dask_cluster.address) as client:  # the current client
        adapter = DaskAdapter()
        assert adapter.client is client
        assert not adapter.capabilities.shares_modules  # the workers get test modules by value
        for executor in ("dask", client):
            location = fresh_repo()
            result = run_region_writes(cluster_dataset(), location.open(), executor=executor, **RUN)
            assert_ran_on_nodes(result, shared_dask_cluster)
            assert_same_repos(location.open(), reference)
        n_clients = len(client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.clients))
    # No current client, the address in dask's config: the adapter joins it and leaves.
    with (
        clusters.no_current_dask_client(),
        dask.config.set({"scheduler-address": shared_dask_cluster.address}),
    ):
        with pytest.raises(ValueError, match="No global client"):
            distributed.get_client()
        location = fresh_repo()
        result = run_region_writes(load, location.open(), template=template(), executor="dask",
                                   workers=7, **RUN)  # fmt: skip
        assert_ran_on_nodes(result, shared_dask_cluster)
        assert_same_repos(location.open(), reference)
    with distributed.Client(shared_dask_cluster.address, set_as_default=False) as client:
        # The adapter closed its client: the scheduler's own and this one are left, as before.
        wait_until(
            lambda: (
                len(client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.clients))
                == n_clients
            ),
            "the adapter's client leaving the scheduler",
        )


@pytest.mark.ray
def test_executor_ray_joins_the_cluster_at_RAY_ADDRESS(
    shared_ray_cluster, s3_location, reference, monkeypatch
):
    """``executor="ray"`` with ``RAY_ADDRESS`` set joins that cluster (``workers=`` sizes only
    a local Ray: Ray refuses ``num_cpus`` when joining), and leaves it afterwards, running."""
    repo = icechunk.Repository.create(s3_location.storage())
    with clusters.no_ray_driver() as ray:
        with monkeypatch.context() as env:  # undone before no_ray_driver restores a local Ray
            env.setenv("RAY_ADDRESS", shared_ray_cluster.address)
            result = run_region_writes(
                load, repo, template=template(), executor="ray", workers=2, **RUN
            )
        assert not ray.is_initialized()  # disconnected: it connected
    assert_ran_on_nodes(result, shared_ray_cluster)
    assert all(node.proc.poll() is None for node in shared_ray_cluster.nodes)
    assert_same_repos(s3_location.open(), reference)


# ---------------------------------------------------------------------------------------------
# Nodes come and go during a run: those that join get tasks (an autoscaler, dask-jobqueue),
# and losing one (item 3) costs attempts, not data


def _join_then_lose_a_node(cluster, gate, run, noticed):
    """Run ``run()`` in a thread on a cluster with one worker slot. Once a task is held
    there, start two worker nodes and wait until each runs a held task (the adapter must see
    them and raise its bound on tasks in flight: 2 per slot, counted at the start, would be
    too few). Then kill one of them mid-task, wait until ``noticed(start)`` says the engine
    noticed, and release the held tasks. Return the result, the lost region's start and
    process, the killed node, and the seconds it took to notice."""
    GatedLoader.prepare(gate)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run)
        try:
            wait_until(lambda: GatedLoader.starts(gate) or future.done(), "a first task")
            joined = [cluster.add_worker(wait=False), cluster.add_worker(wait=False)]
            held = [
                wait_until(
                    lambda node=node: held_start_on(cluster, gate, [node]) or future.done(),
                    f"a task running on {node.name}, which joined during the run",
                )
                for node in joined
            ]
            assert not future.done(), future.result()
            start, pid, node = held[0]
            node.kill()
            wait_until(lambda: noticed(start) or future.done(), "the engine noticing the loss")
            seconds = time.monotonic() - node.killed_at
            GatedLoader.release(gate)
            result = future.result(timeout=DEADLINE)
        finally:
            GatedLoader.release(gate)  # never leave a task held (and the thread waiting)
    return result, start, pid, node, round(seconds, 2)


@pytest.mark.ray
def test_ray_nodes_that_join_get_tasks_and_losing_one_costs_attempts_not_data(
    new_ray_cluster, s3_location, reference, tmp_path
):
    cluster = new_ray_cluster(n_workers=0)  # the head alone: 1 CPU
    repo = icechunk.Repository.create(s3_location.storage())
    before = history(repo)
    gate = tmp_path / "gate"
    events = Events()
    with clusters.ray_driver(cluster) as ray:

        def run() -> Any:
            loader, kwargs = GatedLoader(gate), {**RUN, "progress": events}
            return run_region_writes(loader, repo, template=template(), executor=ray, **kwargs)

        result, start, _, node, seconds = _join_then_lose_a_node(
            cluster, gate, run, noticed=lambda start: events.first("retry", start)
        )
    retry = events.first("retry", start)
    assert retry is not None, "the lost task was not retried"
    report(
        "Ray worker node killed mid-task",
        node=node.name,
        retry_after_s=seconds,
        error=retry[1].error.splitlines()[0][:120] if retry[1].error else None,
        attempts={t.index: t.attempts for t in result.tasks if t.attempts > 1},
    )
    assert result.tasks[start].attempts >= 2
    assert not any(node.holds(p) for p in pids_of(result))  # no result from the dead node
    assert history(s3_location.open())[1:] == before  # one new commit
    assert_same_repos(s3_location.open(), reference)


@pytest.mark.dask
def test_dask_workers_that_join_get_tasks_and_losing_one_costs_attempts_not_data(
    new_dask_cluster, s3_location, reference, tmp_path
):
    import distributed

    cluster = new_dask_cluster(n_workers=1)
    repo = icechunk.Repository.create(s3_location.storage())
    before = history(repo)
    gate = tmp_path / "gate"
    with distributed.Client(cluster.address, set_as_default=False) as client:

        def run() -> Any:
            loader = GatedLoader(gate)
            return run_region_writes(loader, repo, template=template(), executor=client, **RUN)

        result, start, pid, node, seconds = _join_then_lose_a_node(
            cluster, gate, run, noticed=lambda _: len(client.scheduler_info()["workers"]) == 2
        )
    # dask's scheduler reruns the lost task by itself on another worker: find that start.
    again = [(s, p) for s, p in GatedLoader.starts(gate) if s == start and p != pid]
    assert again, "the lost task never started again"
    elsewhere = cluster.node_of(again[0][1])
    report(
        "dask worker (nanny + worker process) killed mid-task",
        node=node.name,
        worker_removed_after_s=seconds,
        attempts_of_lost_region=result.tasks[start].attempts,
        restarted_on=elsewhere.name if elsewhere else "?",
    )
    assert not any(node.holds(p) for p in pids_of(result))
    assert history(s3_location.open())[1:] == before
    assert_same_repos(s3_location.open(), reference)


# ---------------------------------------------------------------------------------------------
# Item 3: losing the head or the scheduler ends the run cleanly; run_id finishes it elsewhere

COORDINATOR = """
import json, sys, time, traceback
import s3
from cluster_tasks import ENCODING, GatedLoader, template

spec = json.loads(sys.argv[1])
repo = s3.S3Location(spec["endpoint"], spec["bucket"], spec["prefix"]).open()
if spec["engine"] == "dask":
    import distributed
    client = distributed.Client(spec["address"])  # the current client: executor="dask" uses it
# Ray: RAY_ADDRESS is set; workers=2 sizes only a local Ray (ray.init refuses num_cpus when
# joining a cluster).
from icechunk_distributed import run_region_writes
try:
    run_region_writes(
        GatedLoader(spec["gate"], hold_from=spec["hold_from"]), repo, template=template(),
        encoding=ENCODING, task_size=1, executor=spec["engine"], workers=2, run_id=spec["run_id"],
        checkpoint_every=0.05, progress=False,
    )
except BaseException as exc:
    kind = type(exc).__module__ + "." + type(exc).__name__
    outcome = {"ok": False, "type": kind, "message": str(exc)[:2000], "at": time.monotonic()}
    print("OUTCOME " + json.dumps(outcome), flush=True)
    traceback.print_exc()
    sys.exit(1)
print("OUTCOME " + json.dumps({"ok": True, "at": time.monotonic()}), flush=True)
"""
HOLD_FROM = 4  # regions 0-3 run through and are checkpointed; the others wait at the gate


def _lose_the_head(
    engine: str, cluster: clusters.Cluster, location: s3.S3Location, tmp_path: Path, env: dict
) -> dict[str, Any]:
    """Run the coordinator in a subprocess; once regions are checkpointed and held tasks run,
    kill the head node; return what the coordinator said and how long it took to end."""
    gate = tmp_path / "gate"
    GatedLoader.prepare(gate)
    spec = {
        "endpoint": location.endpoint, "bucket": location.bucket, "prefix": location.prefix,
        "engine": engine, "address": cluster.address, "gate": str(gate),
        "hold_from": HOLD_FROM, "run_id": f"lost-{engine}-head",
    }  # fmt: skip
    workdir = tmp_path / "coordinator"  # not the tests dir: Ray puts the driver's cwd on
    workdir.mkdir()  # its workers' sys.path
    log_path = tmp_path / "coordinator.log"
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", COORDINATOR, json.dumps(spec)],
            cwd=workdir,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:

            def far_enough() -> bool:
                runs = list_runs(location.open())
                held = [s for s, _ in GatedLoader.starts(gate) if s >= HOLD_FROM]
                return bool(runs) and runs[0].n_done >= HOLD_FROM and bool(held)

            t0 = time.monotonic()
            # Every 0.5 s: list_runs reads the repository (moto serves the run meanwhile).
            wait_until(
                lambda: proc.poll() is not None or far_enough(), "checkpointed progress", every=0.5
            )
            waited = time.monotonic() - t0
            assert proc.poll() is None, f"the coordinator ended early:\n{log_path.read_text()}"
            head = cluster.nodes[0]
            head.kill()
            killed = time.monotonic()
            try:
                proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the coordinator still runs {DEADLINE} s after its head died "
                            f"(hangs):\n{log_path.read_text()[-3000:]}")  # fmt: skip
            ended = time.monotonic()
        finally:
            GatedLoader.release(gate)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = log_path.read_text()
    outcome = next(
        (json.loads(line[8:]) for line in text.splitlines() if line.startswith("OUTCOME ")), None
    )
    return {
        "returncode": proc.returncode,
        "outcome": outcome,
        "seconds_to_end": round(ended - killed, 2),
        "seconds_to_checkpoint": round(waited, 2),
        "log": text,
    }


def _resume_elsewhere(location, run_id, executor, reference, before):
    """The same call with the same ``run_id`` on another cluster: only the regions not
    checkpointed are written, and the target moves once, to the exact source."""
    repo = location.open()
    state, _ = read_state(repo, run_id)  # what the lost run checkpointed
    assert state is not None and len(state.done) >= HOLD_FROM
    result = run_region_writes(load, repo, template=template(), executor=executor, run_id=run_id,
                               **RUN)  # fmt: skip
    assert result.n_resumed == len(state.done)
    assert sorted(t.index for t in result.tasks) == sorted(set(range(N_TIME)) - state.done)
    after = history(location.open())
    assert after[-len(before) :] == before  # the old history, and the run's commits on top
    assert sorted(location.open().list_branches()) == ["main"]
    assert_same_repos(location.open(), reference)


@pytest.mark.dask
def test_losing_the_dask_scheduler_fails_cleanly_then_run_id_finishes_elsewhere(
    new_dask_cluster, shared_dask_cluster, s3_location, reference, tmp_path
):
    import distributed

    cluster = new_dask_cluster()
    repo = icechunk.Repository.create(s3_location.storage())
    before = history(repo)
    # The client's reconnect window (distributed.comm.timeouts.connect, 30 s by default):
    # shortened for the coordinator only, to keep the test short.
    env = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "10s"}
    lost = _lose_the_head("dask", cluster, s3_location, tmp_path, env=env)
    report(
        "dask scheduler killed mid-run",
        seconds_to_end=lost["seconds_to_end"],
        seconds_to_checkpoint=lost["seconds_to_checkpoint"],
        returncode=lost["returncode"],
        outcome=lost["outcome"] and {k: v for k, v in lost["outcome"].items() if k != "at"},
    )
    # The tasks in flight fail with FutureCancelledError (scheduler-connection-lost); once the
    # client gives up reconnecting (distributed.comm.timeouts.connect), the adapter
    # raises ConnectionError for the rest, and the run ends with RegionWriteError.
    assert lost["returncode"] == 1, lost["log"][-3000:]
    outcome = lost["outcome"]
    assert outcome is not None and outcome["type"].endswith("RegionWriteError"), lost["log"]
    assert "dask scheduler at tcp://127.0.0.1" in outcome["message"], outcome["message"]
    assert "the target branch is unchanged" in outcome["message"]
    assert history(s3_location.open()) == before  # the target branch unchanged
    with distributed.Client(shared_dask_cluster.address, set_as_default=False) as client:
        _resume_elsewhere(s3_location, "lost-dask-head", client, reference, before)


@pytest.mark.ray
def test_losing_the_ray_head_fails_cleanly_then_run_id_finishes_elsewhere(
    new_ray_cluster, shared_ray_cluster, s3_location, reference, tmp_path
):
    cluster = new_ray_cluster()
    repo = icechunk.Repository.create(s3_location.storage())
    before = history(repo)
    # Ray ends a driver that cannot reach the GCS for gcs_rpc_server_reconnect_timeout_s
    # (60 s by default): shortened for the coordinator only, to keep the test short.
    env = {"RAY_ADDRESS": cluster.address, "RAY_gcs_rpc_server_reconnect_timeout_s": "15"}
    lost = _lose_the_head("ray", cluster, s3_location, tmp_path, env=env)
    report(
        "Ray head killed mid-run",
        seconds_to_end=lost["seconds_to_end"],
        seconds_to_checkpoint=lost["seconds_to_checkpoint"],
        returncode=lost["returncode"],
        outcome=lost["outcome"] and {k: v for k, v in lost["outcome"].items() if k != "at"},
    )
    # No Python exception: Ray's core worker ends the process ("Failed to connect to GCS
    # within 15 seconds ... The program will terminate"), exit status 1.
    assert lost["returncode"] == 1 and lost["outcome"] is None, lost["log"][-3000:]
    assert "Failed to connect to GCS" in lost["log"], lost["log"][-3000:]
    assert history(s3_location.open()) == before
    with clusters.ray_driver(shared_ray_cluster) as ray:
        _resume_elsewhere(s3_location, "lost-ray-head", ray, reference, before)
