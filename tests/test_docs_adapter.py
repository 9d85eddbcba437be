"""The "Writing your own adapter" example of docs/runner.md, run exactly as documented.

The section's one ``python`` block is written to a module in ``tmp_path`` and imported (with
``tmp_path`` on ``sys.path`` and on the ``PYTHONPATH`` that loky's workers inherit, so they
could unpickle anything the example defines). Every loky pool the example asks for is shut
down after the test.
"""

import ast
import importlib
import os
import re
import sys
from pathlib import Path

import icechunk
import pytest
import xarray as xr

import icechunk_distributed
import icechunk_distributed.adapters

DOC = Path(__file__).resolve().parents[1] / "docs" / "runner.md"
HEADING = "## Writing your own adapter"
MODULE = "runner_md_loky_adapter"
PUBLIC = {
    "icechunk_distributed": set(icechunk_distributed.__all__),
    "icechunk_distributed.adapters": set(icechunk_distributed.adapters.__all__),
}


def example_block() -> str:
    """The section's ``python`` block; fails loudly if the section or the block is gone."""
    lines = DOC.read_text().splitlines(keepends=True)
    try:
        start = lines.index(HEADING + "\n") + 1
    except ValueError:
        pytest.fail(f"{DOC} has no {HEADING!r} section")
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = "".join(lines[start:end])
    blocks = re.findall(r"^```python\n(.*?)^```\n", section, flags=re.MULTILINE | re.DOTALL)
    if len(blocks) != 1:
        pytest.fail(f"{DOC}: {HEADING!r} should hold one python block, found {len(blocks)}")
    return blocks[0]


@pytest.fixture
def example(tmp_path, monkeypatch):
    """The example as a module, and the loky pools it got (shut down afterwards)."""
    (tmp_path / f"{MODULE}.py").write_text(example_block())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in [str(tmp_path), os.environ.get("PYTHONPATH")] if p)
    )
    module = importlib.import_module(MODULE)
    pools = []
    get_pool = module.get_reusable_executor

    def recording(*args, **kwargs):
        pool = get_pool(*args, **kwargs)
        pools.append(pool)
        return pool

    monkeypatch.setattr(module, "get_reusable_executor", recording)
    try:
        yield module, pools
    finally:
        for pool in {id(p): p for p in pools}.values():
            pool.shutdown(wait=True, kill_workers=True)
        sys.modules.pop(MODULE, None)


def test_the_example_writes_and_reads_back(example, tmp_path):
    module, pools = example
    path = str(tmp_path / "repo")
    result = module.main(path)
    assert pools  # the tasks ran on loky's pool

    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(path))
    session = repo.readonly_session("main")
    back = xr.open_zarr(session.store, consolidated=False)
    xr.testing.assert_identical(back.load(), module.example_dataset())

    history = list(repo.ancestry(branch="main"))
    assert result.snapshot_id == session.snapshot_id == history[0].id
    assert history[0].metadata["icechunk_distributed"]["executor"] == "loky"
    assert result.n_regions == 6


def test_the_example_adapter_is_lazy_and_reports_failures(example):
    module, _ = example
    pulled = []

    def items(n):
        for i in range(n):
            pulled.append(i)
            yield i, "not a number" if i == 3 else -i

    with module.LokyAdapter(max_workers=2) as adapter:
        assert adapter.capabilities == icechunk_distributed.Capabilities(
            crosses_processes=True, parallelism=2
        )
        outcomes = adapter.map_unordered(abs, items(20))
        first = next(outcomes)
        # Items are pulled only for free slots: 2 workers x IN_FLIGHT_PER_WORKER.
        assert len(pulled) == 2 * module.IN_FLIGHT_PER_WORKER
        results = dict([first, *outcomes])
        assert sorted(results) == list(range(20))
        assert isinstance(results.pop(3), TypeError)  # raised in the worker, yielded as a result
        assert results == {i: i for i in results}

        pulled.clear()
        outcomes = adapter.map_unordered(abs, items(20))
        next(outcomes)
        outcomes.close()  # cancels what has not started, pulls nothing more
        assert len(pulled) == 2 * module.IN_FLIGHT_PER_WORKER


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_example_uses_public_names_only():
    tree = ast.parse(example_block())
    ours = set()  # names imported from icechunk_distributed
    aliases = set()  # local names bound to icechunk_distributed modules
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert not any(map(_private, alias.name.split("."))), alias.name
                if alias.name.split(".")[0] == "icechunk_distributed":
                    assert alias.name in PUBLIC, alias.name
                    aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            assert node.level == 0 and not any(map(_private, module.split("."))), module
            for alias in node.names:
                assert not _private(alias.name), f"{module}.{alias.name}"
                if module.split(".")[0] == "icechunk_distributed":
                    assert alias.name in PUBLIC.get(module, ()), f"{module}.{alias.name}"
                    ours.add(alias.name)
        elif isinstance(node, ast.Attribute):
            assert not _private(node.attr), ast.unparse(node)
            if isinstance(node.value, ast.Name) and node.value.id in aliases:
                assert node.attr in PUBLIC["icechunk_distributed"], ast.unparse(node)
    assert {"Adapter", "Capabilities", "ItemFeed"} <= ours
