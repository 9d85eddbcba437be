"""Up-front checks of ``run_region_writes``' arguments, before anything is written.

Each function takes one argument (or a few related ones) as the caller gave it, returns it
normalised (Python ``int`` for numpy integers, plain ``dict`` copies for mappings), and raises
an error that says what was wrong and how to fix it: ``TypeError`` for a value of the wrong
kind, ``ValueError`` for a value out of range, and the library's own errors
(:mod:`icechunk_distributed.errors`) where one fits.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import xarray as xr

from icechunk_distributed.errors import TemplateMismatchError
from icechunk_distributed.planning import parse_bytes
from icechunk_distributed.runs import RUN_BRANCH_PREFIX
from icechunk_distributed.template import MODES

if TYPE_CHECKING:
    from icechunk import Repository

    from icechunk_distributed.progress import ProgressEvent

__all__ = [
    "RESERVED_METADATA_KEYS",
    "check_branch",
    "check_checkpoint_every",
    "check_encoding",
    "check_message",
    "check_metadata",
    "check_progress",
    "check_retries",
    "check_source",
    "check_task_size",
    "check_template_matches",
    "check_workers",
]

RESERVED_METADATA_KEYS = ("icechunk_distributed", "icechunk_distributed_run")
"""Commit-metadata keys the library writes itself: the run's record, and a resumable run's
progress. A caller's value under either would be overwritten."""


# -- helpers


def _is_int(value: object) -> TypeGuard[int | np.integer[Any]]:
    """Whether ``value`` is an integer kind (Python or numpy), but not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _count(value: object, *, minimum: int, kind: str, low: str) -> int:
    """``value`` as a Python int >= ``minimum``.

    TypeError ``kind`` (and what it got) for a non-integer; ValueError ``low`` (formatted
    with the value) below the minimum.
    """
    if not _is_int(value):
        raise TypeError(f"{kind}, not {_describe(value)}")
    count = int(value)
    if count < minimum:
        raise ValueError(low.format(count))
    return count


def _type_name(value: object) -> str:
    """``datetime.datetime``, ``numpy.ndarray``; builtins without their module (``str``)."""
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(value: object) -> str:
    """``a float (2.5)``, or ``None``, for messages; long reprs are cut."""
    if value is None:
        return "None"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    name = _type_name(value)
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name} ({text})"


def _did_you_mean(name: object, choices: Iterable[object]) -> str:
    """``"; did you mean 'Tair'?"`` when ``name`` is close to one of ``choices``, else ``""``."""
    by_text = {str(c): c for c in choices}
    close = difflib.get_close_matches(str(name), list(by_text), n=1)
    return f"; did you mean {by_text[close[0]]!r}?" if close else ""


# -- scalars


def check_task_size(task_size: object) -> int | str | None:
    """Check ``task_size``: chunks per task, a byte size, or automatic.

    Parameters
    ----------
    task_size : int, str or None
        ``None`` (automatic), an integer >= 1 (units along the region dims per task; numpy
        integers are accepted, bools are not), or a byte size such as ``"128MB"`` or
        ``"1 GiB"`` that is more than 0 bytes.

    Returns
    -------
    int, str or None
        A Python ``int`` for an integer, the string unchanged, or ``None``.

    Raises
    ------
    TypeError
        For a float (ambiguous: a number of chunks or of bytes?), a bool or any other type.
    ValueError
        For an integer below 1, or a string that is not a size or is 0 bytes.
    """
    hint = "give an int number of chunks per task (e.g. 4) or a byte size such as '64MB'"
    if task_size is None:
        return None
    if _is_int(task_size):
        chunks = int(task_size)
        if chunks < 1:
            raise ValueError(
                f"task_size must be at least 1 chunk per task, got {chunks}; "
                "pass None for the automatic size, or a byte size such as '64MB'"
            )
        return chunks
    if isinstance(task_size, str):
        try:
            nbytes = parse_bytes(task_size)
        except ValueError as exc:
            raise ValueError(
                f"task_size {task_size!r} is not a byte size; {hint} or '1 GiB'"
            ) from exc
        if nbytes <= 0:
            raise ValueError(f"task_size {task_size!r} is 0 bytes; {hint}")
        return task_size
    if isinstance(task_size, float | np.floating):
        raise TypeError(f"task_size is {_describe(task_size)}; {hint}")
    raise TypeError(f"task_size is {_describe(task_size)}; {hint}, or None for automatic")


def check_workers(workers: object) -> int | None:
    """Check ``workers``, the pool size for executors started by name.

    Parameters
    ----------
    workers : int or None
        ``None`` (the executor's default) or an integer >= 1 (numpy integers are accepted,
        bools are not).

    Returns
    -------
    int or None
        A Python ``int``, or ``None``.

    Raises
    ------
    TypeError
        For anything but an integer or ``None``.
    ValueError
        For an integer below 1.
    """
    if workers is None:
        return None
    return _count(
        workers,
        minimum=1,
        kind="workers must be an int (the pool size) or None (the executor's default)",
        low="workers must be at least 1, got {}; pass None for the executor's default",
    )


def check_retries(retries: object) -> int:
    """Check ``retries``, the extra attempts per failed region.

    Parameters
    ----------
    retries : int
        An integer >= 0 (numpy integers are accepted, bools are not); 0 means no retries.

    Returns
    -------
    int
        A Python ``int``.

    Raises
    ------
    TypeError
        For anything but an integer.
    ValueError
        For a negative integer.
    """
    return _count(
        retries,
        minimum=0,
        kind="retries must be an int >= 0 (extra attempts per failed region; 0 for none)",
        low="retries must be at least 0 (extra attempts per failed region), got {}; use 0 "
        "for no retries",
    )


def check_checkpoint_every(checkpoint_every: object) -> float:
    """Check ``checkpoint_every``: positive, finite seconds (numpy scalars too, not bools).

    Returns
    -------
    float
        The seconds.
    """
    try:
        every = float(checkpoint_every)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        every = math.nan
    if isinstance(checkpoint_every, bool) or not 0 < every < math.inf:
        raise ValueError(f"checkpoint_every must be positive (seconds), got {checkpoint_every}")
    return every


def check_progress(progress: object) -> bool | Callable[[ProgressEvent], None] | None:
    """Check ``progress``: a bar, a callback, or the default.

    Parameters
    ----------
    progress : bool, callable or None
        ``None`` (a tqdm bar when stderr is a terminal), ``True``/``False`` (a bar or none;
        numpy bools are accepted), or a callable receiving a
        :class:`~icechunk_distributed.runner.ProgressEvent`.

    Returns
    -------
    bool, callable or None
        ``progress``, with a numpy bool turned into a Python ``bool``.

    Raises
    ------
    TypeError
        For anything else (a string such as ``"yes"``, say).
    """
    if progress is None:
        return None
    if isinstance(progress, bool | np.bool_):
        return bool(progress)
    if callable(progress):
        callback: Callable[[ProgressEvent], None] = progress
        return callback
    raise TypeError(
        f"progress must be None (a bar when stderr is a terminal), True or False (a tqdm "
        f"bar or none), or a callable receiving a ProgressEvent; got {_describe(progress)}"
    )


def check_message(message: object) -> str | None:
    """Check ``message``, the commit message.

    Parameters
    ----------
    message : str or None
        The commit message; ``None`` for the library's default.

    Returns
    -------
    str or None
        ``message``.

    Raises
    ------
    TypeError
        For anything but a ``str`` or ``None``.
    """
    if message is None or isinstance(message, str):
        return message
    raise TypeError(
        f"message must be a str (the commit message) or None for the default, "
        f"not {_describe(message)}; convert it, e.g. str(message)"
    )


# -- commit metadata


def _fix_for(value: object) -> str:
    """How to make ``value`` JSON, for the error message."""
    if isinstance(value, bytes | bytearray):
        return "decode it, e.g. value.decode()"
    if isinstance(value, np.ndarray):
        return "convert it, e.g. value.tolist()"
    if isinstance(value, set | frozenset):
        return "convert it, e.g. sorted(value)"
    return "convert it, e.g. str(value)"


def _json_value(value: object, where: str) -> Any:
    """``value`` as the JSON icechunk stores (numpy scalars as Python ones, tuples as lists)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if _is_int(value):
        return int(value)
    if isinstance(value, float | np.floating):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(
                f"{where} is {number!r}, which JSON cannot store (icechunk would silently store "
                "null); use None or a string such as 'nan'"
            )
        return number
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{where} has the key {_describe(key)}; JSON object keys must be str: "
                    "convert it, e.g. str(key)"
                )
            out[key] = _json_value(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        return [_json_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(
        f"{where} is a {_type_name(value)}, which cannot be stored as JSON; {_fix_for(value)}"
    )


def check_metadata(metadata: object) -> dict[str, Any] | None:
    """Check ``metadata``, the extra commit metadata, and return it as icechunk stores it.

    Icechunk stores commit metadata as JSON. It refuses some values only at commit time (a
    ``datetime``, a set, a non-str key), after every region has been written, and silently
    changes others (NaN becomes null, bytes a list of ints): both are refused here.

    Parameters
    ----------
    metadata : mapping or None
        ``str`` keys; values ``None``, bool, int, finite float, str, lists, tuples and
        mappings of those (numpy scalars are accepted). Not the reserved keys
        :data:`RESERVED_METADATA_KEYS`, where the library writes its own record.

    Returns
    -------
    dict or None
        A plain copy, with numpy scalars as Python ones and tuples as lists.

    Raises
    ------
    TypeError
        For a non-mapping, a non-str key, or a value JSON cannot hold; the message names the
        key (``metadata['when']``) and the value's type.
    ValueError
        For a reserved key, or a NaN or infinite float.
    """
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError(
            f"metadata must be a mapping (a dict with str keys) or None, not {_describe(metadata)}"
        )
    for key in RESERVED_METADATA_KEYS:
        if key in metadata:
            raise ValueError(
                f"commit metadata key {key!r} is reserved: icechunk-distributed writes its own "
                "record of the run there; use another key"
            )
    out: dict[str, Any] = _json_value(metadata, "commit metadata")
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as exc:  # pragma: no cover - _json_value is stricter
        raise TypeError(f"commit metadata cannot be stored as JSON: {exc}") from exc
    return out


# -- repository and dataset


def check_branch(repo: Repository, branch: object) -> None:
    """Check that ``branch`` exists in ``repo``.

    Parameters
    ----------
    repo : icechunk.Repository
        The target repository.
    branch : str
        The branch to commit to.

    Raises
    ------
    TypeError
        If ``branch`` is not a ``str``.
    ValueError
        If the branch does not exist; the message lists the repository's branches (not the
        library's private ``icechunk-distributed/`` work branches) and how to create it.
    """
    if not isinstance(branch, str):
        raise TypeError(f"branch must be a str (a branch name), not {_describe(branch)}")
    existing = repo.list_branches()
    if branch in existing:
        return
    visible = sorted(b for b in existing if not b.startswith(RUN_BRANCH_PREFIX))
    base = "main" if "main" in visible else (visible[0] if visible else None)
    start = f"repo.lookup_branch({base!r})" if base is not None else "<snapshot id>"
    raise ValueError(
        f"branch {branch!r} does not exist in the repository (branches: {visible})"
        f"{_did_you_mean(branch, visible)}; "
        f"create it with repo.create_branch({branch!r}, {start})"
    )


def check_encoding(
    encoding: object,
    variables: Iterable[Hashable],
    *,
    existing: Collection[Hashable] = (),
    append: bool = False,
) -> dict[str, dict[str, Any]]:
    """Check ``encoding``: per-variable encodings, as in ``Dataset.to_zarr``.

    Parameters
    ----------
    encoding : mapping or None
        Variable name -> mapping of encoding keys (``chunks``, ``shards``, compressors, ...).
    variables : iterable of hashable
        The dataset's variables, coordinates included (``template.variables``).
    existing : collection of hashable, optional
        The variables already in the store.
    append : bool, default False
        Whether the write appends (``mode="a"``): the encoding of an existing variable cannot
        change then, so encoding for it is refused (xarray refuses it too).

    Returns
    -------
    dict
        A plain ``dict`` of ``dict`` copies (empty for ``None``).

    Raises
    ------
    TypeError
        If ``encoding`` or one of its values is not a mapping.
    ValueError
        For a name that is not a variable (with the close match, if any), or, on append, a
        variable that already exists.
    """
    if encoding is None:
        return {}
    if not isinstance(encoding, Mapping):
        raise TypeError(
            "encoding must be a mapping of variable name -> encoding, e.g. "
            f"{{'Tair': {{'chunks': (24, 100, 100)}}}}, not {_describe(encoding)}"
        )
    names = list(variables)
    known = set(names)
    present = set(existing)
    out: dict[str, dict[str, Any]] = {}
    for name, enc in encoding.items():
        if name not in known:
            shown = sorted(str(n) for n in names)
            raise ValueError(
                f"encoding given for {name!r}, which is not a variable of the dataset "
                f"(variables: {shown}){_did_you_mean(name, names)}"
            )
        if not isinstance(enc, Mapping):
            raise TypeError(
                f"encoding[{name!r}] is {_describe(enc)}, not a mapping of encoding keys; "
                f"write e.g. {{{name!r}: {{'chunks': ...}}}}"
            )
        if append and name in present:
            raise ValueError(
                f"variable {name!r} already exists in the store; its encoding cannot be "
                f"changed on append (mode='a'); drop encoding for it"
            )
        out[name] = dict(enc)
    return out


def check_source(
    source: xr.Dataset | Callable[[dict[str, slice]], xr.Dataset],
    template: xr.Dataset | None,
    *,
    mode: str,
    append_dim: str | None,
    region: object,
) -> tuple[xr.Dataset, xr.Dataset | None, Callable[[dict[str, slice]], xr.Dataset] | None]:
    """Check the source, template and mode arguments; refuse what ``to_zarr`` refuses.

    Returns
    -------
    tuple
        The template (the source itself if it is a Dataset), the source Dataset or None,
        and the loader or None.
    """
    loader: Callable[[dict[str, slice]], xr.Dataset] | None = None
    dataset: xr.Dataset | None = None
    if isinstance(source, xr.Dataset):
        if template is not None:
            check_template_matches(source, template)
        template, dataset = source, source
    elif callable(source):
        if template is None:
            raise TypeError(
                "a loader source needs template=: a Dataset with the full shape, dtypes, "
                "coordinates and attributes (lazy is fine), e.g. built with dask arrays"
            )
        loader = source
    else:
        raise TypeError(
            "source must be an xarray.Dataset or a callable load(region) -> Dataset, "
            f"not {type(source).__name__}"
        )
    if not isinstance(template, xr.Dataset):
        raise TypeError(f"template must be an xarray.Dataset, not {type(template).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    if append_dim is not None and mode not in ("a", "a-"):
        raise ValueError(f"append_dim= goes with mode='a' or 'a-', not mode={mode!r}")
    if append_dim is not None and append_dim not in template.dims:
        raise ValueError(
            f"append_dim {append_dim!r} is not a dimension of the template ({list(template.dims)})"
        )
    if region is not None and mode not in ("r+", "a"):
        raise ValueError(
            f"region= writes into existing arrays: use mode='r+' (or 'a'), not {mode!r}"
        )
    if region is not None and append_dim is not None:
        raise ValueError("region= and append_dim= cannot go together")
    return template, dataset, loader


def check_template_matches(source: object, template: xr.Dataset | None) -> None:
    """Check a Dataset source against its template: dimension sizes and data variables.

    A no-op unless both are given and ``source`` is a Dataset (a loader's pieces are
    checked in the tasks). Tasks write the template's data variables, sliced from
    ``source``: each must be in ``source`` with the same dims, shape and dtype, and
    ``source`` must not hold data variables the template lacks (they would not be written).

    Parameters
    ----------
    source : xarray.Dataset or callable
        The source given to ``run_region_writes``.
    template : xarray.Dataset or None
        The template given with it.

    Raises
    ------
    TypeError
        If ``template`` is not an ``xarray.Dataset`` or ``None``.
    TemplateMismatchError
        Naming every dimension and variable that differs, with both sizes (or dims, shapes,
        dtypes).
    """
    if template is None or not isinstance(source, xr.Dataset):
        return
    if not isinstance(template, xr.Dataset):
        raise TypeError(f"template must be an xarray.Dataset, not {_describe(template)}")
    problems: list[str] = []
    for dim, size in template.sizes.items():
        if dim not in source.sizes:
            problems.append(f"dimension {dim!r} (size {size} in the template) is not in the source")
        elif source.sizes[dim] != size:
            problems.append(
                f"dimension {dim!r} has size {source.sizes[dim]} in the source and {size} in "
                "the template"
            )
    for name, var in template.data_vars.items():
        if name not in source.data_vars:
            problems.append(f"data variable {name!r} of the template is not in the source")
            continue
        got = source.data_vars[name]
        if got.dims != var.dims:
            problems.append(
                f"{name!r} has dims {got.dims} in the source and {var.dims} in the template"
            )
        elif got.shape != var.shape:
            problems.append(
                f"{name!r} has shape {got.shape} in the source and {var.shape} in the template"
            )
        elif got.dtype != var.dtype:
            problems.append(
                f"{name!r} has dtype {got.dtype} in the source and {var.dtype} in the template"
            )
    extra = sorted(str(n) for n in source.data_vars if n not in template.data_vars)
    if extra:
        problems.append(
            f"data variables {extra} of the source are not in the template and would not be "
            f"written; add them to the template or drop them: source.drop_vars({extra})"
        )
    if problems:
        raise TemplateMismatchError(
            "the source does not match the template: " + "; ".join(problems)
        )
