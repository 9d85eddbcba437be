"""Report the package's architecture and check its layering rules (stdlib ``ast`` only).

Usage: ``python tools/architecture.py [--check] [--root DIR]``. ``DIR`` is the package
directory (default ``src/icechunk_distributed``); its name is the top package's name.

Edges are in-package imports, marked ``eager`` (module level), ``lazy`` (inside a function)
or ``typing`` (under ``if TYPE_CHECKING:``). Only explicit imports are edges: the parent
packages Python runs implicitly are not, or every module would import the top package.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# Modules that may import the top package's re-exports (entry points, not library code).
TOP_IMPORT_ALLOWED = ("__main__", "cli", "demo")
LONG_MARKER = re.compile(r"#\s*long:\s*\S")  # "# long:" followed by a reason
RANK = {"eager": 0, "lazy": 1, "typing": 2}  # an edge keeps its strongest kind


@dataclass
class Module:
    """One source file: its lines, syntax tree, import edges and private-name uses."""

    name: str
    lines: list[str]
    tree: ast.Module
    edges: dict[str, str] = field(default_factory=dict)
    private: list[str] = field(default_factory=list)


def _module_names(root: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class _Imports(ast.NodeVisitor):
    """Collect one module's in-package import edges and private-name imports."""

    def __init__(self, mod: Module, modules: set[str], is_package: bool) -> None:
        self.mod, self.modules, self.kind = mod, modules, "eager"
        self.package = mod.name if is_package else mod.name.rpartition(".")[0]
        self.top = mod.name.split(".")[0]
        self.bound: dict[str, str] = {}  # local name -> in-package module it is bound to

    def _edge(self, target: str) -> None:
        old = self.mod.edges.get(target)
        if target != self.mod.name and (old is None or RANK[self.kind] < RANK[old]):
            self.mod.edges[target] = self.kind

    def _nested(self, node: ast.AST) -> None:
        # A function body runs later: its imports are lazy (typing-only stays typing-only).
        saved, self.kind = self.kind, "lazy" if self.kind == "eager" else self.kind
        self.generic_visit(node)
        self.kind = saved

    visit_FunctionDef = visit_AsyncFunctionDef = _nested

    def visit_If(self, node: ast.If) -> None:
        # "if TYPE_CHECKING:" or "if typing.TYPE_CHECKING:"; its else branch runs as usual.
        test = node.test
        if getattr(test, "id", getattr(test, "attr", None)) != "TYPE_CHECKING":
            self.generic_visit(node)
            return
        saved, self.kind = self.kind, "typing"
        for stmt in node.body:
            self.visit(stmt)
        self.kind = saved
        for stmt in node.orelse:
            self.visit(stmt)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name in self.modules:
                self._edge(alias.name)
                # "import a.b" binds "a"; "import a.b as m" binds "m" to a.b.
                local = alias.asname or alias.name.split(".")[0]
                self.bound[local] = alias.name if alias.asname else local

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: climb (level - 1) packages up from this one
            parts = self.package.split(".")
            parts = [*parts[: max(len(parts) - node.level + 1, 0)], node.module or ""]
            base = ".".join(p for p in parts if p)
        if base.split(".")[0] != self.top:
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in self.modules:  # "from pkg import module"
                self._edge(sub)
                self.bound[alias.asname or alias.name] = sub
                continue
            if base in self.modules:
                self._edge(base)
            if _private(alias.name):
                self.mod.private.append(
                    f"{self.mod.name}:{node.lineno}: private import {alias.name} from {base}"
                )

    def private_attributes(self, tree: ast.Module) -> None:
        """Flag ``m._name`` where ``m`` resolves to an in-package module (best effort)."""
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if not isinstance(value, ast.Name) or value.id not in self.bound:
                continue
            target = self.bound[value.id]
            for attr in reversed(chain):
                target = f"{target}.{attr}"
            if target in self.modules and target != self.mod.name:
                self.mod.private.append(
                    f"{self.mod.name}:{node.lineno}: private access {node.attr} of {target}"
                )


def scan(root: Path) -> dict[str, Module]:
    """Parse every module under the package directory ``root``."""
    paths = _module_names(root)
    modules = {}
    for name, path in paths.items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        mod = Module(name, text.splitlines(), tree)
        visitor = _Imports(mod, set(paths), path.name == "__init__.py")
        visitor.visit(tree)
        visitor.private_attributes(tree)
        modules[name] = mod
    return modules


def import_graph(root: Path) -> dict[str, dict[str, str]]:
    """Module -> imported in-package module -> ``"eager"`` | ``"lazy"`` | ``"typing"``."""
    return {name: dict(mod.edges) for name, mod in scan(root).items()}


def _runtime_graph(graph: dict[str, dict[str, str]], top: str) -> dict[str, list[str]]:
    # The top package re-exports everything, so edges into it would make every module part
    # of one cycle; they are excluded here and reported by their own rule instead.
    return {
        m: sorted(t for t, kind in edges.items() if kind != "typing" and t != top)
        for m, edges in graph.items()
    }


def cycles(runtime: dict[str, list[str]]) -> list[list[str]]:
    """The shortest cycle through each module that is on one, as ``[a, b, ..., a]``.

    Not every elementary cycle (there can be exponentially many), but every module on a
    cycle appears in at least one; each cycle is listed once, rotated to start at its minimum.
    """
    found: set[tuple[str, ...]] = set()
    for start in runtime:
        paths, seen = [[start]], {start}  # breadth first: the first path back is the shortest
        while paths:
            path = paths.pop(0)
            if start in runtime.get(path[-1], []):
                i = path.index(min(path))
                found.add(tuple(path[i:] + path[:i]))
                break
            for w in runtime.get(path[-1], []):
                if w not in seen:
                    seen.add(w)
                    paths.append([*path, w])
    return sorted([*c, c[0]] for c in found)


def layers(runtime: dict[str, list[str]]) -> dict[str, int]:
    """Layer 0 imports nothing in-package; otherwise one more than its highest import."""
    depth: dict[str, int] = {}

    def layer(m: str) -> int:
        if m not in depth:
            depth[m] = 1 + max((layer(t) for t in runtime.get(m, [])), default=-1)
        return depth[m]

    for m in runtime:
        layer(m)
    return depth


def _long_functions(mod: Module) -> list[str]:
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                size = (child.end_lineno or child.lineno) - child.lineno + 1
                first = child.decorator_list[0].lineno if child.decorator_list else child.lineno
                # The line above the def (or its decorators), the def line itself, or any
                # line up to the first body statement may carry the marker (1-based lines).
                marked = mod.lines[max(first - 2, 0) : child.body[0].lineno]
                if size > MAX_FUNCTION_LINES and not any(LONG_MARKER.search(s) for s in marked):
                    out.append(f"{mod.name}:{prefix}{child.name} ({size} lines)")
                visit(child, f"{prefix}{child.name}.")

    visit(mod.tree, "")
    return out


def violations(root: Path) -> list[str]:
    """Every broken rule in the package directory ``root``, one message each."""
    modules = scan(root)
    top = root.name
    graph = {name: mod.edges for name, mod in modules.items()}
    found = [f"import cycle: {' -> '.join(c)}" for c in cycles(_runtime_graph(graph, top))]
    allowed = {f"{top}.{m}" for m in TOP_IMPORT_ALLOWED}
    for name, mod in modules.items():
        if top in mod.edges and name not in allowed:
            found.append(f"{name}: imports from {top} (import from the defining module)")
        found.extend(mod.private)
        if len(mod.lines) > MAX_MODULE_LINES:
            found.append(f"{name}: {len(mod.lines)} lines (max {MAX_MODULE_LINES})")
        found.extend(_long_functions(mod))
    return found


def report(root: Path) -> str:
    """The module table, the import graph and the layering (or the cycles)."""
    modules = scan(root)
    width = max(len(n) for n in [*modules, "module"])
    out = [f"{'module':<{width}}  lines  docstring"]
    for mod in sorted(modules.values(), key=lambda m: (-len(m.lines), m.name)):
        doc = (ast.get_docstring(mod.tree) or "").strip().split("\n")[0]
        out.append(f"{mod.name:<{width}}  {len(mod.lines):>5}  {doc}")
    out += ["", "imports (runtime; * = lazy):"]
    for name in sorted(modules):
        edges = modules[name].edges
        deps = [t + ("*" if k == "lazy" else "") for t, k in sorted(edges.items()) if k != "typing"]
        out.append(f"  {name} -> {', '.join(deps) or '-'}")
    runtime = _runtime_graph({n: m.edges for n, m in modules.items()}, root.name)
    found = cycles(runtime)
    if found:
        out += ["", "cycles:", *(f"  {' -> '.join(c)}" for c in found)]
    else:
        depth = layers(runtime)
        out += ["", "layers:"]
        for level in range(max(depth.values()) + 1):
            out.append(f"  {level}: {', '.join(sorted(m for m in depth if depth[m] == level))}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Print the report and the violations; with ``--check`` only fail on violations."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if any rule is broken")
    default_root = Path(__file__).resolve().parents[1] / "src" / "icechunk_distributed"
    parser.add_argument("--root", type=Path, default=default_root, help="package directory")
    args = parser.parse_args(argv)
    found = violations(args.root)
    if not args.check:
        print(report(args.root), end="\n\n")
    print(f"violations ({len(found)}):", *(f"  {v}" for v in found), sep="\n")
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
