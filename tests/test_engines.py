"""The distributed engines for real: a local Ray, Lithops' localhost backend, a dask
LocalCluster (each started once per test session), by name and as objects."""

import os

import pytest
import xarray as xr

from conftest import _engine_params, make_repo, read_back, start_engine
from icechunk_distributed import (
    PayloadTooLargeError,
    RegionWriteError,
    run_region_writes,
)
from tasks import DieOnce, FlakyLoader, ShiftedLoader, full_dataset
from test_bad_input import n_objects

ENC = {"Tair": {"chunks": (2, 6, 8)}, "station": {"chunks": (2,)}}


@pytest.fixture(params=_engine_params("ray", "ray-module", "dask", "dask-client",
                                      "dask-executor", "lithops", "lithops-executor"))  # fmt: skip
def engine(request):
    """An ``executor=`` value: a name, or the engine's own object."""
    kind = request.param
    if kind.startswith("ray"):
        ray = request.getfixturevalue("ray_engine")
        return "ray" if kind == "ray" else ray
    if kind.startswith("dask"):
        client = request.getfixturevalue("dask_client")
        return {"dask": "dask", "dask-client": client, "dask-executor": client.get_executor()}[kind]
    fexec = request.getfixturevalue("lithops_executor")
    return "lithops" if kind == "lithops" else fexec


def plus(ds, n):
    out = ds.copy(data={k: v.values + n for k, v in ds.data_vars.items()})
    return out


@pytest.mark.parametrize("kind", ["dataset", "loader"])
def test_modes_on_every_engine(tmp_path, engine, kind):
    """w-, a, r+ and w in turn, each read back from a fresh read-only session."""
    ds = full_dataset()
    repo = make_repo(tmp_path / "repo")

    def run(data, offset=0, add=0, **kw):
        if kind == "loader":
            source, template = ShiftedLoader(offset, add), data.chunk({"time": 2})
        else:
            source, template = plus(data, add), None
        return run_region_writes(source, repo, template=template, executor=engine,
                                 progress=False, **kw)  # fmt: skip

    run(ds.isel(time=slice(0, 7)), encoding=ENC)
    xr.testing.assert_identical(read_back(repo), ds.isel(time=slice(0, 7)))
    run(ds.isel(time=slice(7, None)), offset=7, mode="a", append_dim="time")
    xr.testing.assert_identical(read_back(repo), ds)
    run(ds, add=1, mode="r+")
    xr.testing.assert_identical(read_back(repo), plus(ds, 1))
    run(ds, mode="w", encoding=ENC)
    xr.testing.assert_identical(read_back(repo), ds)


def test_retries_and_permanent_failure(tmp_path, engine):
    ds = full_dataset()
    repo = make_repo(tmp_path / "repo")
    calls = tmp_path / "calls"
    calls.mkdir()
    result = run_region_writes(FlakyLoader(calls, fail_times=1), repo, executor=engine,
                               template=ds.chunk({"time": 2}), encoding=ENC, task_size=1,
                               progress=False)  # fmt: skip
    assert [t.attempts for t in result.tasks] == [2] * 6
    xr.testing.assert_identical(read_back(repo), ds)
    before = repo.lookup_branch("main")
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(RegionWriteError) as info:
        run_region_writes(FlakyLoader(bad, fail_times=0, always_fail=2), repo, executor=engine,
                          template=ds.chunk({"time": 2}), mode="r+", retries=1, task_size=1,
                          progress=False)  # fmt: skip
    assert [(f.region["time"].start, f.attempts) for f in info.value.failures] == [(2, 2)]
    assert repo.lookup_branch("main") == before


@pytest.mark.parametrize("name", _engine_params("ray", "dask", "lithops"))
def test_a_killed_worker_ends_in_a_retry_or_a_clear_error(tmp_path, name, request):
    start_engine(request, name)
    ds = full_dataset()
    repo = make_repo(tmp_path / "repo")
    before = repo.lookup_branch("main")
    try:
        result = run_region_writes(
            DieOnce(tmp_path), repo, template=ds.chunk({"time": 2}), encoding=ENC,
            executor=name, task_size=1, progress=False,
        )  # fmt: skip
    except RegionWriteError as exc:  # a clear error, and nothing committed
        failures = exc.failures
        assert repo.lookup_branch("main") == before
        assert failures
    else:
        xr.testing.assert_identical(read_back(repo), ds)
        assert result.n_regions == 6
    assert (tmp_path / "died").exists()  # a worker process really was killed


@pytest.mark.lithops
def test_lithops_batches_regions(tmp_path, lithops_executor):
    from icechunk_distributed.adapters.lithops import LithopsAdapter

    ds = full_dataset(n_time=240)
    repo = make_repo(tmp_path / "repo")
    adapter = LithopsAdapter(lithops_executor, workers=2)
    enc = {"Tair": {"chunks": (1, 6, 8)}, "station": {"chunks": (1,)}}
    result = run_region_writes(
        load_region_240, repo, template=ds.chunk({"time": 1}), encoding=enc, executor=adapter,
        task_size=1, progress=False,
    )  # fmt: skip
    assert result.n_regions == 240
    assert adapter.n_calls == 4  # 2 workers, at most 2 calls each per round
    xr.testing.assert_identical(read_back(repo), ds)


def load_region_240(region):
    return full_dataset(n_time=240).isel(region)


@pytest.mark.lithops
def test_lithops_refuses_oversized_arguments(tmp_path, lithops_executor):
    import numpy as np

    big = xr.Dataset({"v": (("time", "x"), np.random.default_rng(0).random((4, 400_000)))})
    repo = make_repo(tmp_path / "repo")
    with pytest.raises(PayloadTooLargeError, match="Pass a loader"):
        run_region_writes(big, repo, executor=lithops_executor,
                          encoding={"v": {"chunks": (2, 400_000)}})  # fmt: skip
    assert not repo.readonly_session("main").status().updated_chunks


@pytest.mark.parametrize("name", _engine_params("ray", "dask", "lithops"))
def test_bad_input_on_engines_is_refused_before_writing(tmp_path, name, request):
    import threading

    from icechunk_distributed import InvalidRegionError, UnpicklableSourceError

    start_engine(request, name)
    ds = full_dataset()
    repo = make_repo(tmp_path / "repo")
    before = (repo.lookup_branch("main"), n_objects(tmp_path / "repo"))
    lock = threading.Lock()

    def unpicklable(region):
        with lock:
            return ds.isel(region)

    with pytest.raises(UnpicklableSourceError, match="cannot be pickled"):
        run_region_writes(unpicklable, repo, template=ds.chunk({"time": 2}), executor=name)
    with pytest.raises(InvalidRegionError, match="not aligned"):
        run_region_writes(ds, repo, executor=name, encoding=ENC,
                          regions=[{"time": slice(0, 3)}, {"time": slice(3, 12)}])  # fmt: skip
    assert (repo.lookup_branch("main"), n_objects(tmp_path / "repo")) == before


@pytest.mark.dask
def test_dask_client_that_is_not_the_default(tmp_path):
    distributed = pytest.importorskip("distributed")
    ds = full_dataset()
    repo = make_repo(tmp_path / "repo")
    with (
        distributed.LocalCluster(
            n_workers=1, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        run_region_writes(ds, repo, executor=client, encoding=ENC, progress=False)
    xr.testing.assert_identical(read_back(repo), ds)


def _adapter_inside_a_task(n):
    from icechunk_distributed.adapters.dask import DaskAdapter

    adapter = DaskAdapter()  # the worker's own client
    return sorted(
        result for _, result in adapter.map_unordered(lambda x: x * x, enumerate(range(n)))
    )


@pytest.mark.dask
def test_dask_adapter_inside_a_task_of_a_one_thread_worker():
    # The waiting task leaves the worker's thread pool: its own tasks can run on that thread.
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        outer = client.submit(_adapter_inside_a_task, 4, pure=False)
        assert outer.result(timeout=600) == [0, 1, 4, 9]


def _listening(process) -> list[str]:
    """The addresses ``process`` listens on (TCP); none if it ended meanwhile (Ray starts and
    ends worker processes on its own schedule)."""
    import psutil

    try:
        connections = process.net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return []
    return [
        f"{c.laddr.ip} (port {c.laddr.port}, pid {process.pid}, {_name(process)})"
        for c in connections
        if c.status == "LISTEN"
    ]


def _name(process) -> str:
    import psutil

    try:
        return " ".join(process.cmdline())[:120]
    except psutil.NoSuchProcess:
        return "ended"


def _is_ray(process) -> bool:
    import psutil

    try:
        return "ray" in " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return False


def _is_loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def test_local_ray_stays_on_loopback(ray_engine):
    """The tests' local Ray advertises and listens on loopback only: Ray's single-node switch
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, set by conftest.py) does that. Without it Ray
    binds its gRPC servers to every interface and advertises the machine's address. If a
    Ray release drops the switch, this fails here rather than the suite going off-host.
    The test process's own listeners are checked too: any in-process server an earlier test
    left running (a dask dashboard given ``":0"`` listened on 0.0.0.0) shows up here."""
    psutil = pytest.importorskip("psutil")
    nodes = [n["NodeManagerAddress"] for n in ray_engine.nodes() if n["Alive"]]
    assert nodes and all(_is_loopback(ip) for ip in nodes), nodes
    ray_processes = [p for p in psutil.Process().children(recursive=True) if _is_ray(p)]
    assert ray_processes, "no Ray process found under the test process"
    listeners = [line for p in [psutil.Process(), *ray_processes] for line in _listening(p)]
    assert listeners, "nothing listens"
    off_host = [line for line in listeners if not _is_loopback(line.split()[0])]
    assert not off_host, off_host


_OWN_DASK_CLUSTER = """
import json, sys
import psutil
from icechunk_distributed.adapters.dask import DaskAdapter

adapter = DaskAdapter(workers=1)
try:
    assert adapter.client.submit(sum, [1, 2], pure=False).result(timeout=300) == 3
    me = psutil.Process()
    print(json.dumps([
        [c.laddr.ip, c.laddr.port, p.pid]
        for p in [me, *me.children(recursive=True)]
        for c in p.net_connections(kind="tcp")
        if c.status == "LISTEN"
    ]))
finally:
    adapter.close()
"""


def test_the_dask_adapters_own_cluster_stays_on_loopback():
    """With no client anywhere the dask adapter starts a LocalCluster; its scheduler, workers
    and dashboard listen on loopback only. Run in a fresh interpreter: the suite's session
    client would otherwise be found first."""
    import json
    import subprocess
    import sys

    pytest.importorskip("distributed")
    pytest.importorskip("psutil")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    done = subprocess.run(
        [sys.executable, "-c", _OWN_DASK_CLUSTER],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    listeners = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(listeners) >= 3, listeners  # scheduler, dashboard, worker (and its nanny)
    off_host = [entry for entry in listeners if not _is_loopback(entry[0])]
    assert not off_host, off_host
