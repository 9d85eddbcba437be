"""Code shipping: what a task needs from the user's own modules travels inside its pickle.

Workers of a real cluster (``ray start`` nodes, ``dask worker`` processes, Lithops functions)
run in other directories, with another ``sys.path``: a loader defined in a module beside the
user's script is importable on the coordinator only. cloudpickle pickles such functions *by
reference* (module and name), so every attempt would fail on the worker with
``ModuleNotFoundError``. For engines whose workers may not share this process's modules
(``Capabilities.shares_modules`` False: cluster nodes, serverless functions), every module
that is neither part of the standard library nor installed in the environment
(site-packages, a path an editable install put on ``sys.path``, an installed distribution)
is registered with cloudpickle to be pickled *by value* while tasks are pickled; modules such
code imports inside a function body are shipped along and put in the worker's
``sys.modules`` before the task runs. Installed packages still travel by reference: the
workers must have the same environment (``docs/clusters.md``). Pools on this machine keep
plain cloudpickle: by value, module-level state (locks, large tables) would travel too.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import glob
import importlib.machinery
import importlib.util
import io
import os
import site
import sys
import sysconfig
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "LocalCode",
    "dumps",
    "for_workers",
    "loads",
    "local_code_by_value",
    "local_modules",
    "pack_exception",
    "unpack_exception",
]

_OWN = __name__.partition(".")[0]

_LOCK = threading.Lock()
_REGISTERED: dict[str, int] = {}  # module name -> live LocalCode objects that registered it
_SHIPPED = "__icechunk_distributed_shipped__"  # marks a module copy installed in a worker


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
    return path


def _under_roots(path: str) -> bool:
    # Both spellings: a package symlinked into site-packages (Nix, Spack, uv's symlink
    # mode) is installed where its link is, not where it points.
    roots = _installed_roots()
    return os.path.abspath(path).startswith(roots) or os.path.realpath(path).startswith(roots)


@functools.cache
def _distributed_names() -> frozenset[str]:
    """Top-level names of installed distributions (slow: read once, only when needed).

    Catches packages installed where no site directory is: ``PYTHONPATH`` trees of HPC
    module systems, strict editable installs, zipapps.
    """
    import importlib.metadata

    return frozenset(importlib.metadata.packages_distributions())


def _is_local(name: str, module: types.ModuleType) -> bool:
    """A top-level module workers may not be able to import by name."""
    if name in sys.stdlib_module_names or name in sys.builtin_module_names or name == _OWN:
        return False
    if name.startswith("__editable__"):  # setuptools' editable-install finders
        return False
    path = _module_file(module)
    if path is None or name in _editable_mappings():  # built in, frozen, editable install
        return False
    return not _under_roots(path) and name not in _distributed_names()


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
        self._shippable: dict[str, bool] = {}
        for module in modules.values():
            self._register(module)

    def _register(self, module: types.ModuleType) -> None:
        import cloudpickle

        with _LOCK:  # counted: two runs at once must not unregister each other's modules
            count = _REGISTERED.get(module.__name__, 0)
            if count == 0 and module.__name__ in cloudpickle.list_registry_pickle_by_value():
                return  # registered by the user: theirs to keep
            if count == 0:
                cloudpickle.register_pickle_by_value(module)
            _REGISTERED[module.__name__] = count + 1
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
            if not origin or _under_roots(origin) or top in _distributed_names():
                return None
            try:
                module = importlib.import_module(top)
            except Exception:  # e.g. needs a package only the workers have: theirs to find
                return None
            if not _is_local(top, module):
                return None
            self.modules[top] = module
            self._register(module)
        try:
            found = importlib.import_module(name)
        except Exception:  # not a module (a name imported from one), or fails here
            return None
        self.modules.setdefault(name, found)
        return found

    def shippable(self, module: types.ModuleType) -> bool:
        """Whether ``module`` pickles by value (its module-level objects do), cached.

        A module imported inside some function body is shipped on the chance that the
        function runs; one that cannot travel (a lock at module level, say) is left to
        the worker's own import, as without shipping.
        """
        verdict = self._shippable.get(module.__name__)
        if verdict is None:
            try:
                _pickler_class()(io.BytesIO(), self).dump(module)
                verdict = True
            except Exception:
                verdict = False
            self._shippable[module.__name__] = verdict
        return verdict

    def close(self) -> None:
        """Unregister what was registered here."""
        import cloudpickle

        with _LOCK:
            for module in self._added:
                _REGISTERED[module.__name__] -= 1
                if _REGISTERED[module.__name__] == 0:
                    del _REGISTERED[module.__name__]
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


@functools.lru_cache(maxsize=4096)
def _imports_in(code: types.CodeType) -> tuple[tuple[str, int, tuple[str, ...]], ...]:
    """``(name, level, fromlist)`` of every ``import`` in ``code`` and its nested code."""
    found: list[tuple[str, int, tuple[str, ...]]] = []
    # `import a.b` is: push level, push fromlist, IMPORT_NAME: the level two steps back.
    before: list[dis.Instruction] = []
    for ins in dis.get_instructions(code):
        if ins.opname == "IMPORT_NAME":
            level = before[-2].argval if len(before) >= 2 else 0
            names = before[-1].argval if before else None
            fromlist = tuple(n for n in names or () if n != "*") if isinstance(names, tuple) else ()
            found.append((str(ins.argval), level if isinstance(level, int) else 0, fromlist))
        before = [*before[-1:], ins]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found.extend(_imports_in(const))
    return tuple(found)


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
            else:  # compiled functions (builtins, Cython's), classes, and instances' classes
                _check_compiled(obj if callable(obj) else type(obj), self.local)
            return super().reducer_override(obj)

    return Pickler


def _note_imports(fn: types.FunctionType, local: LocalCode, needs: dict[str, Any]) -> None:
    top = (fn.__module__ or "").partition(".")[0]
    if top not in local.modules and top != "__main__":
        return  # pickled by reference: its imports are the worker's business
    package = fn.__globals__.get("__package__") or ""
    for name, level, fromlist in _imports_in(fn.__code__):
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
        else:  # `from pkg import sub`: a submodule, or only a name (then nothing to ship)
            for sub in fromlist:
                module = local.find(f"{full}.{sub}")
                if module is not None:
                    needs.setdefault(module.__name__, module)


def _check_compiled(obj: Any, local: LocalCode) -> None:
    """Refuse what only travels by reference from a compiled module the workers lack."""
    name = getattr(obj, "__module__", None)
    if not isinstance(name, str) or name.partition(".")[0] not in local.modules:
        return
    origin = getattr(sys.modules.get(name), "__file__", None) or ""
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
        present = sys.modules.get(name)
        # A copy shipped earlier is replaced (the coordinator's code wins over a stale
        # one); a real module is not (in-process workers share the coordinator's).
        if present is None or getattr(present, _SHIPPED, False):
            setattr(module, _SHIPPED, True)
            sys.modules[name] = module
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
    if local is None:
        with local_code_by_value() as registered:
            return dumps(obj, registered)
    needs: dict[str, types.ModuleType] = {}
    while True:  # shipped modules' functions may import more modules inside: until none new
        buffer = io.BytesIO()
        pickler = _pickler_class()(buffer, local)
        pickler.dump(_WithModules(needs, obj) if needs else obj)
        new = {n: m for n, m in pickler.needs.items() if n not in needs and local.shippable(m)}
        if not new:
            return buffer.getvalue()
        needs = {**needs, **new}


@contextlib.contextmanager
def for_workers(*, by_value: bool) -> Iterator[Callable[[Any], bytes]]:
    """The function that pickles task arguments for an engine's workers, for one run.

    Parameters
    ----------
    by_value : bool
        Ship the user's own modules by value (workers that may not import them: see
        ``Capabilities.shares_modules``); otherwise plain ``cloudpickle.dumps``.

    Yields
    ------
    callable
        ``dumps(obj) -> bytes``.
    """
    import cloudpickle

    if not by_value:
        yield cloudpickle.dumps
        return
    with local_code_by_value() as code:
        yield functools.partial(dumps, local=code)


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


def pack_exception(exc: BaseException) -> bytes | None:
    """``exc`` as cloudpickle bytes, or ``None`` if it cannot be pickled.

    Parameters
    ----------
    exc : BaseException
        A task's exception, in the worker.

    Returns
    -------
    bytes or None
        Bytes that :func:`unpack_exception` turns back into it on the coordinator.
    """
    import cloudpickle

    try:
        data: bytes = cloudpickle.dumps(exc)
    except Exception:
        return None
    return data


def unpack_exception(data: bytes) -> BaseException | None:
    """The exception :func:`pack_exception` packed, or ``None`` if it cannot be rebuilt here.

    Parameters
    ----------
    data : bytes
        From :func:`pack_exception`.

    Returns
    -------
    BaseException or None
        The exception (its text and traceback travel separately, and always arrive).
    """
    import cloudpickle

    try:
        exc = cloudpickle.loads(data)
    except Exception:  # e.g. a class whose __init__ takes other arguments than its args
        return None
    return exc if isinstance(exc, BaseException) else None
