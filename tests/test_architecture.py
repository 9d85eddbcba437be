"""The package's architecture rules (tools/architecture.py), and tests of the checker itself.

Importing the package imports no optional engine: see test_recipes.py
(test_import_does_not_import_executors).
"""

import importlib.util
import re
import sys
import textwrap
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
SRC = _ROOT / "src" / "icechunk_distributed"


def _load_tool():
    # tools/ is not a package: load the script by path (registered so dataclasses work).
    spec = importlib.util.spec_from_file_location(
        "architecture", _ROOT / "tools" / "architecture.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


arch = _load_tool()


def make_package(tmp_path, files: dict[str, str], name: str = "pkg") -> Path:
    """Write ``{relative path: source}`` as package ``name``; every directory gets an __init__."""
    root = tmp_path / name
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    return root


def long_function(name: str, body_lines: int, marker: str = "", decorator: str = "") -> str:
    lines = [marker, decorator, f"def {name}():"] + ["    x = 1"] * body_lines
    return "\n".join(line for line in lines if line) + "\n"


def test_package_follows_the_rules():
    found = arch.violations(SRC)
    assert not found, f"{len(found)} architecture violations:\n" + "\n".join(found)


def test_real_tree_graph_has_known_edges():
    graph = arch.import_graph(SRC)
    assert graph["icechunk_distributed.merge"]["icechunk_distributed.errors"] == "eager"
    assert graph["icechunk_distributed.cli"]["icechunk_distributed.demo"] == "lazy"
    assert graph["icechunk_distributed.runner"]["icechunk_distributed.adapters"] == "typing"
    # "from icechunk_distributed import options" is an edge to the module, not the package.
    assert "icechunk_distributed.options" in graph["icechunk_distributed.writer"]


def test_cycle_is_found(tmp_path):
    root = make_package(
        tmp_path, {"a.py": "from pkg.b import B\nA = 1\n", "b.py": "import pkg.a\n"}
    )
    assert arch.violations(root) == ["import cycle: pkg.a -> pkg.b -> pkg.a"]


def test_relative_imports_form_edges(tmp_path):
    root = make_package(
        tmp_path,
        {
            "sub/x.py": "from .. import a\nfrom ..b import B\nfrom . import y\n",
            "sub/y.py": "from .x import X\n",
            "a.py": "",
            "b.py": "B = 1\n",
        },
    )
    graph = arch.import_graph(root)
    assert graph["pkg.sub.x"] == {"pkg.a": "eager", "pkg.b": "eager", "pkg.sub.y": "eager"}
    assert arch.violations(root) == ["import cycle: pkg.sub.x -> pkg.sub.y -> pkg.sub.x"]


def test_private_import_is_found(tmp_path):
    root = make_package(
        tmp_path,
        {
            "a.py": "_helper = 1\n__version__ = '1'\n",
            "_version.py": "__version__ = '1'\n",
            "b.py": """\
                from pkg.a import _helper, __version__
                from pkg._version import __version__ as v
                from pkg import a
                import pkg.a as alias

                def f():
                    return a._helper, alias._helper, a.__doc__
            """,
        },
    )
    assert arch.violations(root) == [
        "pkg.b:1: private import _helper from pkg.a",
        "pkg.b:7: private access _helper of pkg.a",
        "pkg.b:7: private access _helper of pkg.a",
    ]


def test_long_function_needs_a_marker(tmp_path):
    limit = arch.MAX_FUNCTION_LINES
    root = make_package(
        tmp_path,
        {
            "ok.py": long_function("short", limit - 1),
            "bad.py": long_function("too_long", limit),
            "above.py": long_function("f", limit, marker="# long: one linear recipe"),
            "decorated.py": long_function("f", limit, "# long: a table", "@staticmethod"),
            "empty.py": long_function("f", limit, marker="# long:"),  # no reason given
            "body.py": "def f():\n    # long: generated\n" + "    x = 1\n" * limit,
        },
    )
    assert sorted(arch.violations(root)) == [
        f"pkg.bad:too_long ({limit + 1} lines)",
        f"pkg.empty:f ({limit + 1} lines)",
    ]


def test_long_method_is_named_with_its_class(tmp_path):
    method = textwrap.indent(long_function("run", arch.MAX_FUNCTION_LINES), "    ")
    root = make_package(tmp_path, {"m.py": "class C:\n" + method})
    assert arch.violations(root) == [f"pkg.m:C.run ({arch.MAX_FUNCTION_LINES + 1} lines)"]


def test_long_module_is_found(tmp_path):
    root = make_package(tmp_path, {"big.py": "x = 1\n" * (arch.MAX_MODULE_LINES + 1)})
    assert arch.violations(root) == [f"pkg.big: {arch.MAX_MODULE_LINES + 1} lines (max 600)"]


def test_type_checking_imports_do_not_form_cycles(tmp_path):
    root = make_package(
        tmp_path,
        {
            "a.py": "from pkg.b import B\n",
            "b.py": """\
                import typing
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from pkg.a import A
                if typing.TYPE_CHECKING:
                    def f():
                        import pkg.c
                else:
                    import pkg.d
                B = 1
            """,
            "c.py": "import pkg.b\n",
            "d.py": "",
        },
    )
    graph = arch.import_graph(root)
    assert graph["pkg.b"] == {"pkg.a": "typing", "pkg.c": "typing", "pkg.d": "eager"}
    assert arch.violations(root) == []


def test_lazy_import_forms_an_edge(tmp_path):
    root = make_package(
        tmp_path,
        {
            "a.py": "import pkg.b\n",
            "b.py": "def f():\n    from pkg.a import A\n    return A\n",
        },
    )
    assert arch.import_graph(root)["pkg.b"] == {"pkg.a": "lazy"}
    assert arch.violations(root) == ["import cycle: pkg.a -> pkg.b -> pkg.a"]


def test_edges_into_the_top_package_are_reported_not_cycles(tmp_path):
    root = make_package(
        tmp_path,
        {
            "__init__.py": "from pkg.a import A\nfrom pkg.adapters import Adapter\n",
            "a.py": "from pkg import Adapter\nA = 1\n",
            "cli.py": "from pkg import A\n",
            "adapters/__init__.py": "Adapter = 1\ndef get():\n    from pkg.adapters import x\n",
            "adapters/x.py": "from pkg.adapters import Adapter\n",
        },
    )
    assert arch.violations(root) == [
        # Edges into a subpackage's __init__ are ordinary edges.
        "import cycle: pkg.adapters -> pkg.adapters.x -> pkg.adapters",
        "pkg.a: imports from pkg (import from the defining module)",
    ]


def test_check_exits_nonzero_on_violations(tmp_path, capsys):
    root = make_package(tmp_path, {"a.py": "import pkg.b\n", "b.py": "import pkg.a\n"})
    assert arch.main(["--check", "--root", str(root)]) == 1
    assert "import cycle: pkg.a -> pkg.b -> pkg.a" in capsys.readouterr().out
    assert arch.main(["--root", str(root)]) == 0
    assert "cycles:\n  pkg.a -> pkg.b -> pkg.a" in capsys.readouterr().out


def test_report_layers_an_acyclic_package(tmp_path):
    root = make_package(
        tmp_path,
        {
            "a.py": '"""Bottom.\n\nMore."""\n',
            "b.py": "import pkg.a\n",
            "c.py": "from pkg import b\n",
        },
    )
    out = arch.report(root)
    assert re.search(r"^pkg\.a +3  Bottom\.$", out, re.MULTILINE)
    assert "  pkg.c -> pkg.b" in out
    assert "layers:\n  0: pkg, pkg.a\n  1: pkg.b\n  2: pkg.c" in out
