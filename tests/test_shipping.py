"""Code shipping: loaders from modules beside the user's script run on workers elsewhere.

Workers of a real cluster do not share the coordinator's working directory or ``sys.path``.
The end-to-end tests run a user's script as its own process, from its own directory, with a
loader in a helper module next to it that imports a second sibling inside its body, on
executors whose workers cannot import either module by name: Lithops localhost (its workers
run from Lithops' own directory) and a process pool whose workers leave the script's
directory. The multi-node clusters of ``test_clusters.py`` exercise the same path.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import cloudpickle
import numpy as np
import pytest
import xarray as xr

from icechunk_distributed import shipping

# A worker elsewhere: another directory, and nothing of the coordinator's sys.path but the
# environment's own (the project's directory is not on it).
_WORKER = """
import sys, cloudpickle
fn = cloudpickle.loads(sys.stdin.buffer.read())
print(fn(3))
"""


def _project(tmp_path, name: str = "proj"):
    """A user's project: a helper beside the script, importing a sibling inside a function."""
    root = tmp_path / name
    root.mkdir()
    (root / "grid.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            def values(start, stop):
                t = np.arange(start, stop, dtype="f8")
                return t[:, None] * 10.0 + np.arange(4.0)
            """
        )
    )
    (root / "catalog.py").write_text("import threading\n\nLOCK = threading.Lock()\n")
    (root / "helpers.py").write_text(
        textwrap.dedent(
            """
            import xarray as xr

            def load(region):
                import grid  # a sibling, imported only inside the function

                t = region["time"]
                return xr.Dataset({"v": (("time", "x"), grid.values(t.start, t.stop))})

            def triple(n):
                return 3 * n

            class BadSource(Exception):
                pass

            def load_bad(region):
                if region["time"].start == 6:
                    raise BadSource(f"file for {region['time'].start} is corrupt")
                return load(region)

            def load_locked(region):
                import catalog  # holds a lock: cannot travel by value

                with catalog.LOCK:
                    return load(region)
            """
        )
    )
    return root


def _expected(n: int = 12) -> xr.Dataset:
    t = np.arange(n, dtype="f8")
    return xr.Dataset({"v": (("time", "x"), t[:, None] * 10.0 + np.arange(4.0))})


def _run_elsewhere(payload: bytes, cwd) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WORKER],
        input=payload.decode("latin-1"),
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="latin-1",
        timeout=120,
        check=False,
    )


@pytest.fixture
def project_on_path(tmp_path, monkeypatch):
    """The project importable here (as if the coordinator ran from it), and only here."""
    root = _project(tmp_path)
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in ("helpers", "grid"):
        sys.modules.pop(name, None)


def test_local_modules_are_the_users_not_the_environments(project_on_path):
    import helpers

    local = shipping.local_modules()
    assert local["helpers"] is helpers
    # Installed, standard, or this library (an editable install): never shipped by value.
    for name in ("numpy", "xarray", "icechunk", "cloudpickle", "os", "icechunk_distributed"):
        assert name not in local


def test_a_sibling_modules_function_runs_where_its_module_is_missing(project_on_path, tmp_path):
    import helpers

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # By reference (cloudpickle's default) the worker cannot import the module...
    plain = _run_elsewhere(cloudpickle.dumps(helpers.triple), elsewhere)
    assert "No module named 'helpers'" in plain.stderr
    # ...by value it runs, and the registration does not outlive the call.
    shipped = _run_elsewhere(shipping.dumps(helpers.triple), elsewhere)
    assert shipped.stdout.strip() == "9", shipped.stderr
    assert "helpers" not in cloudpickle.list_registry_pickle_by_value()


def test_modules_imported_inside_a_function_travel_with_it(project_on_path, tmp_path):
    import helpers

    assert "grid" not in sys.modules  # only imported inside load: found and shipped anyway
    payload = shipping.dumps(lambda n: int(helpers.load({"time": slice(0, n)})["v"].sum()))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _run_elsewhere(payload, elsewhere)
    assert out.stdout.strip() == str(int(_expected(3)["v"].sum())), out.stderr


def test_installed_code_still_travels_by_reference():
    import xarray

    assert len(shipping.dumps(xarray.open_dataset)) < 200  # a name, not the code


# The user's script, run as its own process from the project directory.
_SCRIPT = """
import sys
from concurrent.futures import Executor, ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import icechunk
import xarray as xr
import icechunk_distributed as icd
from icechunk_distributed.adapters.lithops import localhost_config

import helpers

def leave_the_project(root):
    # A worker elsewhere: not in the project directory, and the project not on sys.path.
    import os
    os.chdir(os.path.dirname(root))
    sys.path[:] = [p for p in sys.path if p not in ("", root)]

class Elsewhere(Executor):
    # Stands for an executor whose workers run on other machines (MPIPoolExecutor, ...).
    def __init__(self, pool):
        self.pool = pool
    def submit(self, fn, /, *args, **kwargs):
        return self.pool.submit(fn, *args, **kwargs)
    def shutdown(self, wait=True, *, cancel_futures=False):
        self.pool.shutdown(wait, cancel_futures=cancel_futures)

def executor(kind):
    import os
    if kind == "lithops":
        import lithops
        return lithops.FunctionExecutor(config=localhost_config(2), log_level=None)
    if kind == "processes":
        return "processes"
    pool = ProcessPoolExecutor(
        2, mp_context=get_context("spawn"), initializer=leave_the_project,
        initargs=(os.getcwd(),),
    )
    return Elsewhere(pool)

def main(kind, loader, repo_path):
    template = xr.Dataset({"v": (("time", "x"), np.zeros((12, 4)))}).chunk({"time": 3})
    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(repo_path))
    try:
        result = icd.run_region_writes(
            getattr(helpers, loader), repo, template=template, executor=executor(kind),
            progress=False, retries=0, encoding={"v": {"chunks": (3, 4)}},
        )
    except icd.RegionWriteError as exc:
        for f in exc.failures:
            print("failed", f.index, type(f.exception).__name__,
                  isinstance(f.exception, helpers.BadSource), f.error)
    else:
        print("regions", result.n_regions)

if __name__ == "__main__":
    main(*sys.argv[1:])
"""


def _run_script(tmp_path, kind: str, loader: str):
    root = _project(tmp_path)
    (root / "script.py").write_text(_SCRIPT)
    repo_path = tmp_path / "repo"
    run = subprocess.run(
        [sys.executable, "script.py", kind, loader, str(repo_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, repo_path


def _stored(repo_path) -> xr.Dataset:
    import icechunk

    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(repo_path)))
    return xr.open_zarr(repo.readonly_session("main").store, consolidated=False)


@pytest.mark.parametrize("kind", [pytest.param("lithops", marks=pytest.mark.lithops), "elsewhere"])
def test_a_scripts_loader_from_a_sibling_module_writes_on_workers_elsewhere(tmp_path, kind):
    if kind == "lithops":
        pytest.importorskip("lithops")
    out, repo_path = _run_script(tmp_path, kind, "load")
    assert "regions 4" in out, out
    xr.testing.assert_equal(_stored(repo_path), _expected())


def test_the_users_exception_class_comes_home_from_workers_elsewhere(tmp_path):
    # The class travelled by value; the coordinator gets its own class back, not a copy.
    out, _ = _run_script(tmp_path, "elsewhere", "load_bad")
    assert "failed 2 BadSource True" in out, out


def test_local_pools_keep_module_state_by_reference(tmp_path):
    # A lock (or a large table) at module level cannot travel by value; on a pool of this
    # machine, which imports the module itself, nothing of it travels.
    out, repo_path = _run_script(tmp_path, "processes", "load_locked")
    assert "regions 4" in out, out
    xr.testing.assert_equal(_stored(repo_path), _expected())


def test_compiled_code_beside_the_script_is_refused_before_it_ships(tmp_path):
    # A compiled module that is not installed cannot travel by value: say what to do instead.
    # (ujson's extension, copied into a package beside a "script", stands in for the user's
    # own build; a top-level copy would count as the installed ujson distribution.)
    ujson = pytest.importorskip("ujson")
    package = tmp_path / "proj" / "mypkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    built = pathlib.Path(ujson.__file__)
    (package / built.name).write_bytes(built.read_bytes())
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(package.parent)!r})
        import mypkg.ujson
        from icechunk_distributed import errors, shipping
        try:
            shipping.dumps(mypkg.ujson.dumps)
        except errors.UnpicklableSourceError as exc:
            print("refused:", exc)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert "refused:" in run.stdout, run.stderr
    assert "'mypkg.ujson'" in run.stdout
    assert "runtime_env" in run.stdout and "upload_file" in run.stdout


def test_in_body_imports_of_every_form_are_shipped(tmp_path, monkeypatch):
    # `from pkg import sub`, `from . import sub`, and a shipped module's own in-body import.
    root = tmp_path / "proj2"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "sub.py").write_text("def one():\n    return 1\n")
    (root / "pkg" / "rel.py").write_text(
        "def two():\n    from . import sub\n\n    return 2 * sub.one()\n"
    )
    (root / "units.py").write_text("K = 4\n")
    (root / "chain.py").write_text("def four():\n    import units\n\n    return units.K\n")
    (root / "entry.py").write_text(
        textwrap.dedent(
            """
            def total(_):
                from pkg import sub
                from pkg.rel import two
                import chain

                return sub.one() + two() + chain.four()
            """
        )
    )
    monkeypatch.syspath_prepend(str(root))
    import entry

    try:
        payload = shipping.dumps(entry.total)
    finally:
        for name in [
            m for m in sys.modules if m.split(".")[0] in ("pkg", "units", "chain", "entry")
        ]:
            sys.modules.pop(name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _run_elsewhere(payload, elsewhere)
    assert out.stdout.strip() == "7", out.stderr


def test_shipped_copies_never_replace_a_real_module(project_on_path):
    # Workers in this very process (Beam's in-process runner, dask with processes=False)
    # must keep the user's own module objects.
    import helpers

    fn = cloudpickle.loads(shipping.dumps(lambda r: helpers.load(r)))
    assert sys.modules["helpers"] is helpers
    assert fn({"time": slice(0, 2)})["v"].shape == (2, 4)


def test_two_runs_at_once_keep_each_others_registration(project_on_path):
    import helpers

    with shipping.local_code_by_value() as first:
        with shipping.local_code_by_value():
            pass  # the inner run ends first...
        # ...and the outer one still ships by value.
        assert len(shipping.dumps(helpers.triple, first)) > 200
    assert "helpers" not in cloudpickle.list_registry_pickle_by_value()


@pytest.mark.dask
def test_only_a_cluster_started_for_the_run_shares_modules():
    # A LocalCluster made earlier has the sys.path of then: a directory added since (a
    # notebook's sys.path.insert) is missing on its workers, so the user's modules go by value.
    distributed = pytest.importorskip("distributed")
    from icechunk_distributed.adapters import get_adapter
    from icechunk_distributed.adapters.dask import DaskAdapter

    with (
        distributed.LocalCluster(
            n_workers=1, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        assert DaskAdapter(client).capabilities.shares_modules is False
        assert get_adapter(client.get_executor()).capabilities.shares_modules is False


def test_a_module_added_to_sys_path_at_run_time_reaches_a_local_ray(tmp_path):
    # Ray's local workers see this process's working and script directories only.
    pytest.importorskip("ray")
    late = tmp_path / "late"
    late.mkdir()
    (late / "latemod.py").write_text("def square(x):\n    return x * x\n")
    code = textwrap.dedent(
        f"""
        import sys
        import ray
        import icechunk_distributed as icd
        from icechunk_distributed.adapters.ray import RayAdapter
        sys.path.insert(0, {str(late)!r})
        import latemod
        from icechunk_distributed import shipping
        adapter = RayAdapter(num_cpus=1)
        with shipping.for_workers(by_value=not adapter.capabilities.shares_modules) as dumps:
            arg = dumps(lambda: latemod.square(7))
        out = list(adapter.map_unordered(lambda a: shipping.loads(a)(), [(0, arg)]))
        adapter.close()
        print("result", out[0][1])
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert "result 49" in run.stdout, run.stderr[-2000:]
