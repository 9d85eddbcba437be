import os

# Local-filesystem storage warns about concurrent committers on every open; tests commit once.
os.environ.setdefault("ICECHUNK_LOG", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A Ray that ray.init starts here (or in a subprocess the tests start) advertises the machine's
# address and binds its gRPC servers to every interface; with Ray's "no multi-node cluster"
# switch it uses 127.0.0.1 for both. Ray reads it on import. Cluster nodes (tests/clusters.py)
# drop it and take --node-ip-address 127.0.0.x instead. Pinned by test_engines.py.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Worker processes of every engine (Ray, Lithops, dask) import the test helpers (tasks.py).
_here = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in [_here, os.environ.get("PYTHONPATH", "")] if p
)

import icechunk  # noqa: E402 - after the environment above, which icechunk reads on import
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402


def make_repo(path) -> icechunk.Repository:
    return icechunk.Repository.create(icechunk.local_filesystem_storage(str(path)))


def small_dataset(n_time: int = 12, ny: int = 6, nx: int = 8, seed: int = 0) -> xr.Dataset:
    """time/y/x with 2-D lat/lon coordinates, NaNs and attributes."""
    rng = np.random.default_rng(seed)
    lat, lon = np.meshgrid(np.linspace(-60, 60, ny), np.linspace(0, 350, nx), indexing="ij")
    tair = rng.random((n_time, ny, nx)).astype("f4")
    tair[::3, 0, 0] = np.nan
    return xr.Dataset(
        {"Tair": (("time", "y", "x"), tair, {"units": "K"})},
        coords={
            "time": np.datetime64("2026-01-01", "ns") + np.arange(n_time) * np.timedelta64(1, "h"),
            "lat": (("y", "x"), lat),
            "lon": (("y", "x"), lon),
        },
        attrs={"title": "test"},
    )


def write_template(store, ds: xr.Dataset, time_chunk: int = 1) -> None:
    """Write metadata and coordinates only: data variables go in as lazy dask arrays."""
    ds.chunk({"time": time_chunk}).to_zarr(store, compute=False, consolidated=False)


def read_back(repo: icechunk.Repository, branch: str = "main") -> xr.Dataset:
    """The committed dataset, from a fresh read-only session."""
    session = repo.readonly_session(branch)
    return xr.open_zarr(session.store, consolidated=False, chunks=None).load()


@pytest.fixture
def repo(tmp_path) -> icechunk.Repository:
    return make_repo(tmp_path / "repo")


@pytest.fixture
def other_repo(tmp_path) -> icechunk.Repository:
    return make_repo(tmp_path / "other")


# ---------------------------------------------------------------------------------------------
# The distributed engines, each started once per test session (for tests/ and tests/faults/).


@pytest.fixture(scope="session")
def ray_engine():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def dask_client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    )
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="session")
def lithops_executor():
    lithops = pytest.importorskip("lithops")
    from icechunk_distributed.adapters.lithops import localhost_config

    fexec = lithops.FunctionExecutor(config=localhost_config(2), log_level=None)
    yield fexec
    fexec.clean()


ENGINE_FIXTURES = {"ray": "ray_engine", "dask": "dask_client", "lithops": "lithops_executor"}


def start_engine(request, name):
    """Start (once per session) the engine that ``executor=name`` will find."""
    return request.getfixturevalue(ENGINE_FIXTURES[name])


def _engine_params(*names):
    return [pytest.param(n, marks=getattr(pytest.mark, n.split("-")[0])) for n in names]
