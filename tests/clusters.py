"""Real multi-process clusters on loopback, started the way people start them.

- **Ray**: a head and worker nodes (two by default), each a ``ray start --block`` command
  (``--num-cpus 1``, no dashboard, its own ``--temp-dir``: Ray allows one per node), the head
  on ``127.0.0.2`` and the workers on ``127.0.0.3``, ``127.0.0.4``, ... The head is not on
  ``127.0.0.1``: Ray replaces a ``--node-ip-address`` of ``127.0.0.1``/``localhost`` by the
  machine's primary address (``ray._private.services.resolve_ip_for_localhost``), so the head
  would advertise a non-loopback address; other ``127.0.0.x`` addresses are taken as given.
  Nodes on one machine each need their own address (a driver or a worker finds its node by
  IP). Token authentication is off (``RAY_AUTH_MODE=disabled``: ``ray start --head`` turns it
  on otherwise, and the other nodes would need the token).
- **dask**: ``dask scheduler --host 127.0.0.1`` and worker nodes (two by default), each
  ``dask worker ADDRESS --host 127.0.0.1 --nthreads 1`` (a nanny and its worker process),
  no dashboards.

Every node is started with ``subprocess.Popen(start_new_session=True)`` from its own working
directory (a temporary one), with the environment of the tests minus ``PYTHONPATH``: like the
machines of a real cluster, the nodes cannot import the test helper modules. (A Ray driver
puts its own working directory on its workers' ``sys.path``: drivers started by the tests run
from the repository root, or from a temporary directory, never from tests/.)

A node is its *session*: the ``ray start``/``dask`` process is the session leader, and
everything it starts stays in the session (Ray's worker processes move to process groups of
their own, but not to another session). Killing a node sends SIGKILL to every process of its
recorded session id; nothing is found by name (``ray stop`` would stop every Ray on the
machine). A cluster stops its nodes when its ``with`` block or fixture ends, even if the test
fails; if the test process itself dies first (a timeout, SIGKILL), a small reaper process
kills them: nodes in sessions of their own would otherwise outlive it.

Loopback only, with one caveat measured on Ray 2.60: ``gcs_server`` and ``raylet`` open their
gRPC ports on all interfaces (``*:port`` in ``ss -ltn``) whatever the node address, with no
option to bind them elsewhere; every address the cluster advertises and every connection the
tests make are on 127.0.0.0/8. dask (scheduler, nannies, workers and their HTTP servers)
listens on 127.0.0.1 only.

Use :func:`ray_cluster` / :func:`dask_cluster` (context managers), or the fixtures at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
RAY_HEAD_IP = "127.0.0.2"
RAY_FIRST_WORKER = 3  # worker nodes on 127.0.0.3, 127.0.0.4, ...
DASK_HOST = "127.0.0.1"

START_TIMEOUT = 600.0
"""Seconds a cluster may take to start (Ray on a busy 2-core machine: 20-40 s)."""

# What conftest.ray_engine passes to ray.init: a session-wide local Ray that joining a cluster
# from the test process has to shut down, and restores afterwards.
SESSION_RAY_INIT: dict[str, Any] = {
    "num_cpus": 2,
    "include_dashboard": False,
    "log_to_driver": False,
}


def node_env(**extra: str) -> dict[str, str]:
    """The environment of a cluster node: the tests' own, minus ``PYTHONPATH`` (conftest.py
    puts the tests directory there for local workers) and the single-node switch conftest.py
    sets for local Rays (a node takes ``--node-ip-address`` instead), Ray's usage stats and
    token authentication off (no network call; no token file needed to join)."""
    drop = ("PYTHONPATH", "RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    env.update(extra)
    return env


def flags(**options: object) -> list[str]:
    """Command-line options: ``flags(num_cpus=1)`` is ``["--num-cpus", "1"]``."""
    out = []
    for name, value in options.items():
        out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def free_port(host: str = "") -> int:
    """A TCP port free on every interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# A node: one started command and every process of its session


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, session id)`` of a process, from /proc (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], int(fields[3])


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _proc_stat(int(name))
            if stat is not None and stat[1] == sid and stat[0] not in ("Z", "X"):
                out.append(int(name))
    return out


def session_of(pid: int) -> int | None:
    """The session id of ``pid`` (None if it is gone)."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


@dataclass
class Node:
    """One cluster node: a command started in a session of its own, from its own directory."""

    name: str
    argv: list[str]
    cwd: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    killed_at: float | None = None

    @classmethod
    def start(cls, name: str, argv: list[str], cwd: Path, env: dict[str, str]) -> Node:
        cwd.mkdir(parents=True, exist_ok=True)
        log_path = cwd / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(name, argv, cwd, proc, log_path)

    @property
    def sid(self) -> int:
        """The node's session id (= the pid of the command, the session leader)."""
        return self.proc.pid

    def pids(self) -> list[int]:
        return session_pids(self.sid)

    def holds(self, pid: int) -> bool:
        """Whether process ``pid`` belongs to this node."""
        return session_of(pid) == self.sid

    def log(self, tail: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def kill(self, timeout: float = 30) -> None:
        """SIGKILL every process of the node's session, until none is left."""
        if self.killed_at is None:
            self.killed_at = time.monotonic()
        deadline = time.monotonic() + timeout
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.sid, signal.SIGKILL)  # the leader's group: most of the node at once
        while True:
            left = self.pids()
            for pid in left:  # processes that moved to groups of their own (Ray's workers)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if not left:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: processes {left} survived SIGKILL")
            time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def wait_for_log(self, text: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until the node's log shows ``text``; fail if the command ends first."""
        deadline = time.monotonic() + timeout
        while text not in self.log(tail=1_000_000):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.proc.returncode}) while starting:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not start within {timeout} s:\n{self.log()}")
            time.sleep(0.1)


def wait_for_port(host: str, port: int, node: Node, timeout: float = START_TIMEOUT) -> None:
    """Wait until ``host:port`` accepts TCP connections; fail if ``node`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        if node.proc.poll() is not None:
            raise RuntimeError(f"{node.name} exited ({node.proc.returncode}):\n{node.log()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{node.name}: nothing listens on {host}:{port} after {timeout} s")
        time.sleep(0.1)


# Runs in a process of its own: reads session ids (one a line; "-sid" forgets one) until its
# stdin closes, which happens when the test process closes it or dies (even by SIGKILL, or a
# timeout that skips fixture teardown); then SIGKILLs every process left in those sessions.
_REAPER = """
import os, signal, sys, time
sids = set()
for line in sys.stdin:
    sid = int(line)
    if sid < 0:
        sids.discard(-sid)
    else:
        sids.add(sid)
def left():
    out = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X") and int(fields[3]) in sids:
            out.append(int(name))
    return out
for _ in range(600):
    pids = left()
    if not pids:
        break
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.05)
"""


class Reaper:
    """A process that kills a cluster's nodes (by session id) if the test process dies
    before stopping them: nodes live in sessions of their own, so nothing else would."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _REAPER],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # not in the test's process group: it outlives a killpg
            text=True,
        )

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def watch(self, sid: int) -> None:
        self._send(str(sid))

    def forget(self, sid: int) -> None:
        """A node stopped by the cluster itself: its session id may be reused later."""
        self._send(str(-sid))

    def close(self) -> None:
        """The cluster is stopped: the reaper checks, finds nothing left, and exits."""
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Cluster:
    """Nodes, and the address a client connects to.

    While the cluster runs, a thread records every process seen in each node's session
    (every 50 ms), so :meth:`node_of` also places processes that have exited since: Ray ends
    a job's worker processes when its driver disconnects.
    """

    kind: str  # "ray" or "dask"
    base: Path  # the nodes' working directories are in it
    env: dict[str, str]  # the nodes' environment
    address: str = ""
    nodes: list[Node] = field(default_factory=list)
    scratch: list[Path] = field(default_factory=list)  # removed by stop()
    _seen: dict[int, Node] = field(default_factory=dict)
    _stop_watching: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread(target=self._watch, name="cluster-watcher", daemon=True).start()
        self._reaper = Reaper()

    def add(self, node: Node) -> None:
        """A node started for this cluster: watched, and reaped if this process dies."""
        self.nodes.append(node)
        self._reaper.watch(node.sid)

    def _watch(self) -> None:
        while not self._stop_watching.wait(0.05):
            for node in list(self.nodes):
                for pid in node.pids():
                    self._seen.setdefault(pid, node)

    def scratch_dir(self, name: str) -> Path:
        """A short directory of its own under the system temp dir, removed by :meth:`stop`
        (Ray's sockets live in its ``--temp-dir``: AF_UNIX paths are limited to 107 bytes,
        which pytest's tmp_path can exceed)."""
        path = Path(tempfile.mkdtemp(prefix=f"icd-{name}-"))
        self.scratch.append(path)
        return path

    @property
    def workers(self) -> list[Node]:
        return self.nodes[1:]

    def add_worker(self, wait: bool = True) -> Node:
        """Start one more worker node, which joins the running cluster. With ``wait``, a Ray
        node is returned once started; a dask worker is returned at once, and registers
        with the scheduler shortly after."""
        if self.kind == "ray":
            return start_ray_worker(self, wait=wait)
        return start_dask_worker(self)

    def node_of(self, pid: int) -> Node | None:
        """The node that runs (or ran) process ``pid``, by its session; None if none did."""
        sid = session_of(pid)
        node = next((n for n in self.nodes if n.sid == sid), None)
        return node or self._seen.get(pid)

    def stop(self) -> None:
        """Kill every node (workers first, so none is left waiting for its head)."""
        self._stop_watching.set()
        errors = []
        for node in reversed(self.nodes):
            try:
                node.kill()
                self._reaper.forget(node.sid)
            except Exception as exc:  # keep going: stop the others
                errors.append(exc)
        self._reaper.close()
        for path in self.scratch:
            shutil.rmtree(path, ignore_errors=True)
        if errors:
            raise errors[0]

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.log(1500)}" for n in self.nodes)


def _stopped_on_error(cluster: Cluster, start: Callable[[], None]) -> None:
    try:
        start()
    except BaseException:
        cluster.stop()
        raise


# ---------------------------------------------------------------------------------------------
# Ray


def start_ray_cluster(base: Path, n_workers: int = 2, **env: str) -> Cluster:
    """``ray start --block`` a head and ``n_workers`` worker nodes (one CPU each)."""
    port = free_port()
    cluster = Cluster("ray", base, node_env(**env), f"{RAY_HEAD_IP}:{port}")

    def start() -> None:
        head = Node.start(
            "ray-head",
            [
                *(str(BIN / "ray"), "start", "--block", "--head", "--disable-usage-stats"),
                *flags(
                    node_ip_address=RAY_HEAD_IP,
                    port=port,
                    num_cpus=1,
                    include_dashboard="false",
                    dashboard_port=free_port(),  # the minimal head process still listens
                    ray_client_server_port=free_port(),
                    dashboard_agent_listen_port=free_port(),
                    temp_dir=cluster.scratch_dir("ray-head"),
                ),
            ],
            base / "ray-head",
            cluster.env,
        )
        cluster.add(head)
        # The workers can start as soon as the GCS answers; the head finishes meanwhile.
        wait_for_port(RAY_HEAD_IP, port, head)
        for _ in range(n_workers):
            start_ray_worker(cluster, wait=False)
        for node in cluster.nodes:
            node.wait_for_log("Ray runtime started")

    _stopped_on_error(cluster, start)
    return cluster


def start_ray_worker(cluster: Cluster, wait: bool = True) -> Node:
    """``ray start --block --address HEAD`` one more worker node (one CPU, its own
    loopback address: 127.0.0.3, 127.0.0.4, ...)."""
    i = len(cluster.nodes)
    name = f"ray-worker-{i}"
    argv = [
        *(str(BIN / "ray"), "start", "--block", "--disable-usage-stats"),
        *flags(
            address=cluster.address,
            node_ip_address=f"127.0.0.{RAY_FIRST_WORKER + i - 1}",
            num_cpus=1,
            dashboard_agent_listen_port=free_port(),
            temp_dir=cluster.scratch_dir(name),
        ),
    ]
    node = Node.start(name, argv, cluster.base / name, cluster.env)
    cluster.add(node)
    if wait:
        node.wait_for_log("Ray runtime started")
    return node


def wait_for_ray_nodes(ray: Any, n: int, timeout: float = START_TIMEOUT) -> None:
    """Wait until the connected cluster has ``n`` live nodes (and their CPUs)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [node for node in ray.nodes() if node["Alive"]]
        if len(alive) >= n and ray.cluster_resources().get("CPU", 0) >= n:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(alive)} of {n} Ray nodes alive after {timeout} s")
        time.sleep(0.2)


@contextlib.contextmanager
def no_ray_driver() -> Iterator[Any]:
    """No Ray driver in this process during the block; yield the ``ray`` module.

    A process is the driver of one Ray at a time. If this test process runs one (the local Ray
    of conftest's session-wide ``ray_engine`` fixture), it is shut down first and started
    again afterwards with the same arguments, so the tests that use ``ray_engine`` later still
    find it. Whatever the block joins is left (``ray.shutdown``) at the end.
    """
    import ray

    had_local = ray.is_initialized()
    if had_local:
        ray.shutdown()
    try:
        yield ray
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if had_local:
            ray.init(**SESSION_RAY_INIT)


@contextlib.contextmanager
def ray_driver(cluster: Cluster) -> Iterator[Any]:
    """Join ``cluster`` from this process (``ray.init(address=...)``); yield the ``ray`` module.

    The driver finds its node by itself: the head, the one local node of the cluster that
    ``ray.init`` prefers. See :func:`no_ray_driver` for the Ray this process ran before.
    """
    with no_ray_driver() as ray:
        ray.init(address=cluster.address, log_to_driver=False)
        wait_for_ray_nodes(ray, len(cluster.nodes))
        yield ray


# ---------------------------------------------------------------------------------------------
# dask


def start_dask_cluster(base: Path, n_workers: int = 2) -> Cluster:
    """``dask scheduler`` and ``n_workers`` ``dask worker`` processes (one thread each)."""
    scheduler_file = base / "scheduler" / "scheduler.json"
    cluster = Cluster("dask", base, node_env())

    def start() -> None:
        # No dashboard; its HTTP server (health, metrics) still starts: on loopback.
        scheduler = Node.start(
            "dask-scheduler",
            [
                *(str(BIN / "dask"), "scheduler", "--no-dashboard"),
                *flags(
                    host=DASK_HOST,
                    port=0,
                    dashboard_address=f"{DASK_HOST}:0",
                    scheduler_file=scheduler_file,
                ),
            ],
            base / "scheduler",
            cluster.env,
        )
        cluster.add(scheduler)
        deadline = time.monotonic() + START_TIMEOUT
        while not cluster.address:
            if scheduler.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the dask scheduler did not start:\n{scheduler.log()}")
            with contextlib.suppress(OSError, ValueError):  # not there, or being written
                cluster.address = json.loads(scheduler_file.read_text())["address"]
            time.sleep(0.05)
        for _ in range(n_workers):
            start_dask_worker(cluster)
        wait_for_dask_workers(cluster, n_workers)

    _stopped_on_error(cluster, start)
    return cluster


def start_dask_worker(cluster: Cluster) -> Node:
    """``dask worker SCHEDULER`` one more worker (a nanny and its worker process, one
    thread); it registers with the scheduler shortly after."""
    name = f"dask-worker-{len(cluster.nodes)}"
    argv = [
        *(str(BIN / "dask"), "worker", cluster.address, "--no-dashboard"),
        *flags(
            host=DASK_HOST,
            nthreads=1,
            nworkers=1,
            dashboard_address=f"{DASK_HOST}:0",
            name=name,
            local_directory=cluster.base / name / "work",
        ),
    ]
    node = Node.start(name, argv, cluster.base / name, cluster.env)
    cluster.add(node)
    return node


def wait_for_dask_workers(cluster: Cluster, n: int, timeout: float = START_TIMEOUT) -> None:
    """Wait until ``n`` workers are registered with the scheduler."""
    import distributed

    with distributed.Client(cluster.address, set_as_default=False, timeout=60) as client:
        try:
            client.wait_for_workers(n, timeout=timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"dask workers did not join:\n{cluster.logs()}") from exc


@contextlib.contextmanager
def no_current_dask_client() -> Iterator[None]:
    """No current dask client in this process during the block (``get_client()`` raises).

    conftest's session-wide ``dask_client`` fixture leaves its LocalCluster's client current
    for the rest of the session. The clients are hidden, not closed, and come back after the
    block; distributed offers no public way to do that, hence its private registry.
    """
    from distributed import client as dask_client

    hidden = dict(dask_client._global_clients)
    dask_client._global_clients.clear()
    token = dask_client._current_client.set(None)
    try:
        yield
    finally:
        dask_client._current_client.reset(token)
        dask_client._global_clients.update(hidden)


# ---------------------------------------------------------------------------------------------
# Context managers and fixtures


@contextlib.contextmanager
def ray_cluster(base: Path, n_workers: int = 2, **env: str) -> Iterator[Cluster]:
    """A Ray cluster for the ``with`` block: stopped (by session id) even if the block fails."""
    cluster = start_ray_cluster(base, n_workers, **env)
    try:
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def dask_cluster(base: Path, n_workers: int = 2) -> Iterator[Cluster]:
    """A dask cluster for the ``with`` block: stopped (by session id) even if the block fails."""
    cluster = start_dask_cluster(base, n_workers)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def shared_ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Ray cluster for a test module (tests that do not break it)."""
    pytest.importorskip("ray")
    with ray_cluster(tmp_path_factory.mktemp("ray-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def shared_dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A dask cluster for a test module (tests that do not break it)."""
    pytest.importorskip("distributed")
    with dask_cluster(tmp_path_factory.mktemp("dask-cluster")) as cluster:
        yield cluster


@pytest.fixture
def new_ray_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Start Ray clusters of the test's own (``new_ray_cluster(n_workers=2, **env)``); they
    are stopped afterwards."""
    pytest.importorskip("ray")
    with contextlib.ExitStack() as stack:
        n = iter(range(1000))

        def start(n_workers: int = 2, **env: str) -> Cluster:
            return stack.enter_context(ray_cluster(tmp_path / f"ray-{next(n)}", n_workers, **env))

        yield start


@pytest.fixture
def new_dask_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Start dask clusters of the test's own (``new_dask_cluster(n_workers=2)``); they are
    stopped afterwards."""
    pytest.importorskip("distributed")
    with contextlib.ExitStack() as stack:
        n = iter(range(1000))

        def start(n_workers: int = 2) -> Cluster:
            return stack.enter_context(dask_cluster(tmp_path / f"dask-{next(n)}", n_workers))

        yield start
