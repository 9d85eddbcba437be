"""Code shipping: loaders from modules beside the user's script run on workers elsewhere.

Workers of a real cluster do not share the coordinator's working directory or ``sys.path``.
The end-to-end tests run a user's script as its own process, from its own directory, with a
loader in a helper module next to it that imports a second sibling inside its body, on
executors whose workers cannot import either module by name: Lithops localhost (its workers
run from Lithops' own directory) and a process pool whose workers leave the script's
directory. The multi-node clusters of ``test_clusters.py`` exercise the same path.
"""

from __future__ import annotations

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
import numpy as np
import icechunk
import xarray as xr
from icechunk_distributed.adapters.lithops import localhost_config

import helpers

def leave_the_project(root):
    # A worker elsewhere: not in the project directory, and the project not on sys.path.
    import os
    os.chdir(os.path.dirname(root))
    sys.path[:] = [p for p in sys.path if p not in ("", root)]

def main(kind, repo_path):
    template = xr.Dataset({"v": (("time", "x"), np.zeros((12, 4)))}).chunk({"time": 3})
    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(repo_path))
    if kind == "lithops":
        import lithops
        executor = lithops.FunctionExecutor(config=localhost_config(2), log_level=None)
    else:
        import os
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context
        executor = ProcessPoolExecutor(
            2, mp_context=get_context("spawn"), initializer=leave_the_project,
            initargs=(os.getcwd(),),
        )
    result = icd.run_region_writes(
        helpers.load, repo, template=template, executor=executor, progress=False, retries=0,
        encoding={"v": {"chunks": (3, 4)}},
    )
    print("regions", result.n_regions)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
"""


@pytest.mark.parametrize(
    "kind", [pytest.param("lithops", marks=pytest.mark.lithops), "processes-elsewhere"]
)
def test_a_scripts_loader_from_a_sibling_module_writes_on_workers_elsewhere(tmp_path, kind):
    if kind == "lithops":
        pytest.importorskip("lithops")
    root = _project(tmp_path)
    (root / "script.py").write_text(_SCRIPT)
    repo_path = tmp_path / "repo"
    run = subprocess.run(
        [sys.executable, "script.py", kind, str(repo_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "regions 4" in run.stdout
    import icechunk

    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(repo_path)))
    got = xr.open_zarr(repo.readonly_session("main").store, consolidated=False)
    xr.testing.assert_equal(got, _expected())


def test_compiled_code_beside_the_script_is_refused_before_it_ships(tmp_path):
    # A compiled module that is not installed cannot travel by value: say what to do instead.
    # (ujson's extension, copied beside a "script", stands in for the user's own build.)
    ujson = pytest.importorskip("ujson")
    root = tmp_path / "proj"
    root.mkdir()
    (root / pathlib.Path(ujson.__file__).name).write_bytes(
        pathlib.Path(ujson.__file__).read_bytes()
    )
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(root)!r})
        import ujson
        assert ujson.__file__.startswith({str(root)!r})
        from icechunk_distributed import errors, shipping
        try:
            shipping.dumps(ujson.dumps)
        except errors.UnpicklableSourceError as exc:
            print("refused:", exc)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert "refused:" in run.stdout, run.stderr
    assert "'ujson'" in run.stdout and "runtime_env" in run.stdout and "upload_file" in run.stdout
