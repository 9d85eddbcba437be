"""Code shipping: what a task needs from the user's own modules travels inside its pickle.

Workers of a real cluster (``ray start`` nodes, ``dask worker`` processes, Lithops functions)
run in other directories, with another ``sys.path``: a loader defined in a module beside the
user's script is importable on the coordinator only. cloudpickle pickles such functions *by
reference* (module and name), so every attempt would fail on the worker with
``ModuleNotFoundError``. Here every module that is neither part of the standard library nor
installed in the environment (site-packages, or a path an editable install put on
``sys.path``) is registered with cloudpickle to be pickled *by value* while a task is pickled;
modules such code imports inside a function body are shipped along and put in the worker's
``sys.modules`` before the task runs. Installed packages still travel by reference: the
workers must have the same environment (``docs/clusters.md``).
"""

from __future__ import annotations

import contextlib
import dis
import functools
import glob
import importlib.machinery
import importlib.util
import os
import site
import sys
import sysconfig
import types
from collections.abc import Iterator
from typing import Any

__all__ = ["LocalCode", "dumps", "loads", "local_code_by_value", "local_modules"]

_OWN = __name__.partition(".")[0]


@functools.cache
def _installed_roots() -> tuple[str, ...]:
    """Directories whose modules every worker of this environment can import.

    The standard library, site-packages and the directories ``.pth`` files there add (an
    editable install puts its source directory on ``sys.path`` that way). Not the script's
    directory, the working directory or ``PYTHONPATH``: workers elsewhere lack those.
    """
    paths = sysconfig.get_paths()
    sites = [*site.getsitepackages(), site.getusersitepackages(), paths["purelib"]]
    roots = {paths["stdlib"], paths["platstdlib"], *sites}
    for directory in sites:
        for pth in glob.glob(os.path.join(directory, "*.pth")):
            with contextlib.suppress(OSError), open(pth, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith(("#", "import ", "import\t")):
                        roots.add(os.path.join(directory, line))
    return tuple(os.path.realpath(r) + os.sep for r in roots if r)


def _module_file(module: types.ModuleType) -> str | None:
    path = getattr(module, "__file__", None)
    if path is None:  # a namespace package: where its first portion lies
        portions = list(getattr(module, "__path__", []) or [])
        path = os.path.join(portions[0], "") if portions else None
    return os.path.realpath(path) if path else None


def _is_local(name: str, module: types.ModuleType) -> bool:
    """A top-level module workers may not be able to import by name."""
    if name in sys.stdlib_module_names or name in sys.builtin_module_names or name == _OWN:
        return False
    if name.startswith("__editable__"):  # setuptools' editable-install finders
        return False
    path = _module_file(module)
    if path is None or name in _editable_mappings():  # built in, frozen, editable install
        return False
    return not path.startswith(_installed_roots())


@functools.cache
def _editable_mappings() -> dict[str, str]:
    """Top-level names served by setuptools' editable finders (``MAPPING`` of each)."""
    found: dict[str, str] = {}
    for finder in sys.meta_path:
        mapping = getattr(sys.modules.get(getattr(finder, "__module__", "")), "MAPPING", None)
        if isinstance(mapping, dict) and "__editable__" in getattr(finder, "__module__", ""):
            found.update(mapping)
    return found


def local_modules() -> dict[str, types.ModuleType]:
    """The imported top-level modules that are neither standard nor installed.

    Returns
    -------
    dict
        ``{name: module}``: the user's script's siblings, test helpers, anything put on
        ``sys.path`` by hand. ``__main__`` is not listed (cloudpickle ships it by value anyway).
    """
    return {
        name: module
        for name, module in list(sys.modules.items())
        if "." not in name
        and isinstance(module, types.ModuleType)
        and not name.startswith("__")
        and _is_local(name, module)
    }


class LocalCode:
    """The local modules registered with cloudpickle to be pickled by value.

    Attributes
    ----------
    modules : dict
        ``{name: module}``, top-level and any submodule added since.
    """

    def __init__(self, modules: dict[str, types.ModuleType]) -> None:
        self.modules = dict(modules)
        self._added: list[types.ModuleType] = []
        for module in modules.values():
            self._register(module)

    def _register(self, module: types.ModuleType) -> None:
        import cloudpickle

        if module.__name__ not in cloudpickle.list_registry_pickle_by_value():
            cloudpickle.register_pickle_by_value(module)
            self._added.append(module)

    def find(self, name: str) -> types.ModuleType | None:
        """The local module ``name``, imported here if it is local and not imported yet.

        A function may import a sibling module only inside its body, so the module is not
        loaded on the coordinator; importing it here runs nothing the worker would not.
        """
        top = name.partition(".")[0]
        if top not in self.modules:
            if top in sys.modules:
                return None  # imported, and not local
            try:
                spec = importlib.util.find_spec(top)
            except (ImportError, ValueError):
                return None
            origin = spec.origin if spec else None
            if not origin or os.path.realpath(origin).startswith(_installed_roots()):
                return None
            module = importlib.import_module(top)
            if not _is_local(top, module):
                return None
            self.modules[top] = module
            self._register(module)
        try:
            found = importlib.import_module(name)
        except ImportError:
            return None
        self.modules.setdefault(name, found)
        return found

    def close(self) -> None:
        """Unregister what was registered here."""
        import cloudpickle

        for module in self._added:
            with contextlib.suppress(ValueError):
                cloudpickle.unregister_pickle_by_value(module)
        self._added = []


@contextlib.contextmanager
def local_code_by_value() -> Iterator[LocalCode]:
    """Within the block, cloudpickle pickles the code of :func:`local_modules` by value.

    Registration is process-wide in cloudpickle; only modules registered here are
    unregistered on exit.

    Yields
    ------
    LocalCode
        The registered modules; pass it to :func:`dumps`.
    """
    code = LocalCode(local_modules())
    try:
        yield code
    finally:
        code.close()


def _imports_in(code: types.CodeType) -> Iterator[tuple[str, int]]:
    """``(name, level)`` of every ``import`` statement in ``code`` and its nested code."""
    # `import a.b` is: push level, push fromlist, IMPORT_NAME; the level is two steps back.
    before: list[dis.Instruction] = []
    for ins in dis.get_instructions(code):
        if ins.opname == "IMPORT_NAME":
            level = before[-2].argval if len(before) >= 2 else 0
            yield str(ins.argval), level if isinstance(level, int) else 0
        before = [*before[-1:], ins]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _imports_in(const)


@functools.cache
def _pickler_class() -> Any:
    """A cloudpickle pickler that notes the local modules by-value functions import inside."""
    import cloudpickle

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
        def __init__(self, file: Any, local: LocalCode) -> None:
            super().__init__(file)
            self.local = local
            self.needs: dict[str, types.ModuleType] = {}

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, types.FunctionType):
                _note_imports(obj, self.local, self.needs)
            elif isinstance(obj, types.BuiltinFunctionType | type):
                _check_compiled(obj, self.local)
            return super().reducer_override(obj)

    return Pickler


def _note_imports(fn: types.FunctionType, local: LocalCode, needs: dict[str, Any]) -> None:
    top = (fn.__module__ or "").partition(".")[0]
    if top not in local.modules and top != "__main__":
        return  # pickled by reference: its imports are the worker's business
    package = fn.__globals__.get("__package__") or ""
    for name, level in _imports_in(fn.__code__):
        try:
            full = importlib.util.resolve_name("." * level + name, package) if level else name
        except (ImportError, ValueError):
            continue
        parts = full.split(".")
        for i in range(1, len(parts) + 1):  # a package before its submodules
            module = local.find(".".join(parts[:i]))
            if module is None:
                break
            needs.setdefault(module.__name__, module)


def _check_compiled(obj: Any, local: LocalCode) -> None:
    """Refuse what only travels by reference from a compiled module the workers lack."""
    top = (getattr(obj, "__module__", None) or "").partition(".")[0]
    module = local.modules.get(top)
    if module is None:
        return
    origin = getattr(sys.modules.get(obj.__module__), "__file__", None) or ""
    if origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        from icechunk_distributed.errors import UnpicklableSourceError

        raise UnpicklableSourceError(
            f"{getattr(obj, '__qualname__', obj)!r} comes from the compiled module "
            f"{obj.__module__!r} ({origin}), which is not installed in the environment: "
            "compiled code cannot travel by value to workers elsewhere. Install it on the "
            "workers (`pip install` the project there, or in the image), or ship it with "
            "the engine: Ray `runtime_env={'py_modules': [...]}`, dask "
            "`client.upload_file(...)`, Lithops a custom runtime."
        )


def _installed(modules: dict[str, types.ModuleType], obj: Any) -> Any:
    """In the worker: make shipped modules importable, then hand back the task."""
    for name, module in modules.items():
        sys.modules[name] = module  # the coordinator's code wins over a stale copy
    return obj


class _WithModules:
    """Pickles as ``_installed(modules, obj)``: unpickling yields ``obj`` itself."""

    def __init__(self, modules: dict[str, types.ModuleType], obj: Any) -> None:
        self.modules, self.obj = modules, obj

    def __reduce__(self) -> tuple[Any, ...]:
        return _installed, (self.modules, self.obj)


def dumps(obj: Any, local: LocalCode | None = None) -> bytes:
    """Pickle ``obj`` for a worker that may not share this process's ``sys.path``.

    Parameters
    ----------
    obj : object
        A task argument.
    local : LocalCode, optional
        What :func:`local_code_by_value` registered (pass its value when pickling many
        tasks); without it, registration is done here for this one call.

    Returns
    -------
    bytes
        Loads with ``cloudpickle.loads`` (or ``pickle.loads``) as ``obj``; modules that its
        by-value functions import inside their bodies come along and are installed in
        ``sys.modules`` first.
    """
    import io

    if local is None:
        with local_code_by_value() as registered:
            return dumps(obj, registered)
    buffer = io.BytesIO()
    pickler = _pickler_class()(buffer, local)
    pickler.dump(obj)
    if not pickler.needs:
        return buffer.getvalue()
    buffer = io.BytesIO()
    _pickler_class()(buffer, local).dump(_WithModules(dict(pickler.needs), obj))
    return buffer.getvalue()


def loads(arg: Any) -> Any:
    """A task's argument in the worker: unpickled if it came as ``bytes`` from :func:`dumps`.

    Parameters
    ----------
    arg : object
        What the engine passed to the task function.

    Returns
    -------
    object
        The task argument.
    """
    if isinstance(arg, bytes):
        import cloudpickle

        return cloudpickle.loads(arg)
    return arg
