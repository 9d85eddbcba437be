"""S3-compatible storage for the tests: a moto server on 127.0.0.1, in its own process.

Use from any test file::

    import s3
    from s3 import s3_storage  # plain helper: icechunk.Storage for an endpoint/bucket/prefix

    # The fixtures. An assignment rather than ``from s3 import moto_endpoint, s3_repo``: with
    # an import, ruff's F811 flags every test that takes the fixture as a parameter.
    moto_endpoint, s3_location, s3_repo = s3.moto_endpoint, s3.s3_location, s3.s3_repo

The server runs in a separate Python process (not a thread of the test process) so that
worker processes of every executor reach it over HTTP exactly like a remote object store, and
so that its request log never mixes into the test's captured output. It stops when the test
session ends, or by itself when the test process dies (it exits when its stdin closes).

Moto does not check signatures, so the credentials below are fake; the secret is distinctive
so that tests can grep for leaks (``SECRET_ACCESS_KEY in text``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import icechunk
import pytest

from faultproxy import FaultProxy, ServerProcess, start_fault_proxy, start_server

ACCESS_KEY_ID = "AKIDICDTESTKEY00042"
SECRET_ACCESS_KEY = "SECRET-do-not-leak-1234"
REGION = "us-east-1"

MOTO_AVAILABLE = (
    importlib.util.find_spec("moto") is not None and importlib.util.find_spec("boto3") is not None
)
SKIP_REASON = "S3 tests need moto's server: pip install 'moto[server]' (brings boto3)"

# Never reach for real AWS credentials or the instance-metadata endpoint from the tests (set
# now, at collection, so worker processes started later inherit it).
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
os.environ.setdefault("AWS_CONFIG_FILE", os.devnull)

# Runs in the server process: start, print the port it got, serve until stdin closes.
_SERVER_SCRIPT = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


MotoServer = ServerProcess


def start_moto_server(timeout: float = 60) -> MotoServer:
    """Start moto's S3 server on 127.0.0.1 on a free port, in a child process."""
    return start_server([sys.executable, "-c", _SERVER_SCRIPT], "moto server", timeout)


def create_bucket(endpoint: str, bucket: str | None = None) -> str:
    """Create a bucket (a fresh unique one by default) on the server; return its name."""
    import boto3

    bucket = bucket or f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
    )
    client.create_bucket(Bucket=bucket)
    return bucket


def s3_storage(endpoint: str, bucket: str, prefix: str, **credentials: Any) -> icechunk.Storage:
    """Icechunk storage on the S3-compatible server at ``endpoint`` (plain HTTP, path style).

    Static fake credentials by default; pass ``get_credentials=...``, ``from_env=True`` or
    other ``icechunk.s3_storage`` credential arguments to use those instead.
    """
    if not credentials:
        credentials = {"access_key_id": ACCESS_KEY_ID, "secret_access_key": SECRET_ACCESS_KEY}
    return icechunk.s3_storage(
        bucket=bucket,
        prefix=prefix,
        endpoint_url=endpoint,
        allow_http=True,
        force_path_style=True,
        region=REGION,
        **credentials,
    )


def open_repo(endpoint: str, bucket: str, prefix: str, **credentials: Any) -> icechunk.Repository:
    """Open an existing repository (in a worker process, say)."""
    return icechunk.Repository.open(s3_storage(endpoint, bucket, prefix, **credentials))


@dataclass(frozen=True)
class S3Location:
    """Where a test repository lives: enough to reopen it in another process."""

    endpoint: str
    bucket: str
    prefix: str

    def storage(self, **credentials: Any) -> icechunk.Storage:
        return s3_storage(self.endpoint, self.bucket, self.prefix, **credentials)

    def open(self, **credentials: Any) -> icechunk.Repository:
        return icechunk.Repository.open(self.storage(**credentials))


class FileCredentials:
    """A picklable ``get_credentials`` for ``icechunk.s3_storage``: reads the key pair from a
    file each time it is called, so only the file's path travels with pickled sessions (the
    stand-in for a call to STS, a vault, or an instance-metadata endpoint). Each call leaves a
    ``<pid>-<n>`` file in ``calls_dir`` (if given), to see who fetched credentials."""

    def __init__(self, path: str | os.PathLike[str], calls_dir: str | None = None) -> None:
        self.path = str(path)
        self.calls_dir = calls_dir

    def __call__(self) -> icechunk.S3StaticCredentials:
        if self.calls_dir is not None:
            name = f"{os.getpid()}-{uuid.uuid4().hex}"
            with open(os.path.join(self.calls_dir, name), "w"):
                pass
        with open(self.path) as f:
            key, secret = f.read().split()
        return icechunk.S3StaticCredentials(access_key_id=key, secret_access_key=secret)

    def callers(self) -> list[int]:
        """The pid of every call so far (needs ``calls_dir``)."""
        assert self.calls_dir is not None
        return [int(name.split("-")[0]) for name in os.listdir(self.calls_dir)]

    @staticmethod
    def write(directory: str | os.PathLike[str]) -> FileCredentials:
        """Write the test key pair to ``directory``/credentials; count calls in ``calls/``."""
        calls = os.path.join(directory, "calls")
        os.makedirs(calls, exist_ok=True)
        path = os.path.join(directory, "credentials")
        with open(path, "w") as f:
            f.write(f"{ACCESS_KEY_ID} {SECRET_ACCESS_KEY}\n")
        return FileCredentials(path, calls)


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1 shared by the test session (its own process)."""
    if not MOTO_AVAILABLE:
        pytest.skip(SKIP_REASON)
    server = start_moto_server()
    try:
        yield server.endpoint
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            os.unlink(server.log_path)


@pytest.fixture
def s3_location(moto_endpoint: str) -> S3Location:
    """A fresh bucket (and a prefix in it) for one test; no repository yet."""
    return S3Location(moto_endpoint, create_bucket(moto_endpoint), "repo")


@pytest.fixture
def s3_repo(s3_location: S3Location) -> icechunk.Repository:
    """A new, empty repository in a fresh bucket on the moto server (static fake credentials)."""
    return icechunk.Repository.create(s3_location.storage())


# ---------------------------------------------------------------------------------------------
# The fault proxy in front of the moto server (faultproxy.py)


@pytest.fixture(scope="session")
def fault_proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    """The proxy in front of the test session's moto server (its own process)."""
    proxy = start_fault_proxy(moto_endpoint)
    try:
        yield proxy
    finally:
        proxy.stop()
        with contextlib.suppress(OSError):
            os.unlink(proxy.log_path)


@dataclass
class FaultyS3:
    """A fresh bucket, reached through the proxy (``location``) or directly (``direct``)."""

    proxy: FaultProxy
    location: S3Location
    direct: S3Location

    @staticmethod
    def new_bucket(proxy: FaultProxy, moto_endpoint: str) -> FaultyS3:
        """A fresh bucket on the moto server, reached both ways."""
        bucket = create_bucket(moto_endpoint)
        return FaultyS3(
            proxy,
            S3Location(proxy.endpoint, bucket, "repo"),
            S3Location(moto_endpoint, bucket, "repo"),
        )

    def history(self, branch: str = "main") -> list[str]:
        """The branch's snapshot ids, newest first, read past the proxy."""
        return [s.id for s in self.direct.open().ancestry(branch=branch)]

    def read_back(self, branch: str = "main") -> Any:
        """The committed dataset, from a fresh read-only session past the proxy."""
        import xarray as xr

        session = self.direct.open().readonly_session(branch)
        return xr.open_zarr(session.store, consolidated=False, chunks=None).load()


@pytest.fixture
def faulty_s3(fault_proxy: FaultProxy, moto_endpoint: str) -> Iterator[FaultyS3]:
    """A fresh bucket behind the proxy, with no rules yet; rules are cleared (and stalled
    requests released) when the test ends."""
    fault_proxy.set_rules([])
    try:
        yield FaultyS3.new_bucket(fault_proxy, moto_endpoint)
    finally:
        fault_proxy.set_rules([])


# ---------------------------------------------------------------------------------------------
# Run in other processes (importable by spawn children: tests/ is on PYTHONPATH)


def wait_for_parties(directory: str, n: int, timeout: float = 600) -> None:
    """A barrier across processes: arrive (one file per process), then wait until ``n`` did."""
    import time

    with open(os.path.join(directory, f"arrived-{os.getpid()}-{uuid.uuid4().hex}"), "w"):
        pass
    deadline = time.monotonic() + timeout
    while len(os.listdir(directory)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(directory))} of {n} writers arrived")
        time.sleep(0.01)


def write_in_process(
    location: S3Location,
    source: Any,
    *,
    barrier_dir: str,
    n_parties: int,
    **kwargs: Any,
) -> dict[str, Any]:
    """Open the repository afresh and ``run_region_writes(source, repo, **kwargs)``.

    Waits for the other writers once all its own regions are written, so every writer's
    session starts from the same snapshot and the commits race. Returns the outcome as plain
    data (the exception's type and text, not the object).
    """
    import icechunk_distributed as icd

    repo = location.open()

    def progress(event: Any) -> None:
        if event.n_done + event.n_failed == event.n_total:
            wait_for_parties(barrier_dir, n_parties)

    try:
        result = icd.run_region_writes(source, repo, progress=progress, **kwargs)
    except Exception as exc:
        return {
            "pid": os.getpid(),
            "ok": False,
            "conflict": isinstance(exc, icd.CommitConflictError),
            "error": f"{type(exc).__name__}: {exc}",
        }
    return {"pid": os.getpid(), "ok": True, "snapshot_id": result.snapshot_id}


class FailingLoader:
    """A loader that fails for good on the region starting at ``fail_at`` along time."""

    def __init__(self, source: Any, fail_at: int) -> None:
        self.source = source
        self.fail_at = fail_at

    def __call__(self, region: dict[str, slice]) -> Any:
        if region["time"].start == self.fail_at:
            raise OSError(f"cannot read the input file for time={region['time'].start}")
        return self.source.isel(region)
