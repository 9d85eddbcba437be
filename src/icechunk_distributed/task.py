"""The worker side: one region's piece checked, encoded with the stored encoding, written.

A task gets a :class:`TaskInput` (shipped pickled to other processes), builds or receives its
piece, checks it against what the coordinator expects (variables, dims, shape, dtype, and the
index labels of its region), encodes each variable with the encoding the coordinator wrote
to the store (xarray's own encoder: the task never re-derives units, dtypes or fill values),
assigns it into the zarr arrays of its fork, and checks that every chunk it wrote lies inside
its region.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from icechunk_distributed import shipping
from icechunk_distributed.errors import PieceMismatchError
from icechunk_distributed.planning import Region, format_region
from icechunk_distributed.references import is_virtual, write_references
from icechunk_distributed.session import SessionSnapshot
from icechunk_distributed.snapshot import combine_snapshots

__all__ = [
    "Expectations",
    "Expected",
    "Loader",
    "TaskInput",
    "TaskOutput",
    "open_array",
    "run_call",
    "run_task",
    "same_dtype",
    "write_variables",
]

Loader = Callable[[dict[str, slice]], xr.Dataset]
Expected = tuple[tuple[str, ...], tuple[int, ...], np.dtype[Any]]
"""A variable's dims, shape and dtype in a piece."""


@dataclass
class TaskInput:
    """What one task needs: its region, its data or loader, and what to check it against.

    Attributes
    ----------
    expect : dict
        Per variable: dims, shape and dtype of the piece.
    labels : dict
        Per index coordinate along a region dim: the labels of the region (a loader's piece
        must carry the same, if it carries the coordinate at all).
    encodings : dict
        Per variable: what to encode the piece with (see ``template.task_encoding``: the
        stored encoding, with the packing values as given for arrays this write creates).
    """

    index: int
    attempt: int
    snapshot: SessionSnapshot
    piece: xr.Dataset | None
    loader: Loader | None
    region: Region
    abs_region: Region
    group: str | None
    expect: dict[str, Expected]
    units: dict[str, dict[str, int]]
    encodings: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    stored_dims: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class TaskOutput:
    """What a task sends home: its snapshot on success, the error otherwise.

    ``retryable`` is False for failures another attempt cannot fix (a loader returning the
    wrong piece). ``shared``: the snapshot holds the writes of every task of its engine call
    (:func:`run_call`), and is merged whole.
    """

    index: int
    ok: bool
    snapshot: SessionSnapshot | None = None
    error: str | None = None
    exception: BaseException | None = None
    traceback: str | None = None
    seconds: float = 0.0
    worker: str = ""
    n_chunks: int = 0
    nbytes: int = 0
    retryable: bool = True
    shared: bool = False

    def __getstate__(self) -> dict[str, Any]:
        # The exception travels as cloudpickle bytes: engines pickle results with plain
        # pickle, which refuses a class shipped by value (the user's own exception class on
        # a worker elsewhere); cloudpickle hands the coordinator's own class back.
        state = dict(self.__dict__)
        if state["exception"] is not None:
            state["exception"] = shipping.pack_exception(state["exception"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("exception"), bytes):
            state["exception"] = shipping.unpack_exception(state["exception"])
        self.__dict__.update(state)


class Expectations:
    """Per variable, the dims, shape and dtype of a region's piece (:attr:`TaskInput.expect`).

    Built once per region shape (regions mostly share one), not once per task.
    """

    def __init__(
        self,
        dims: Mapping[str, tuple[str, ...]],
        sizes: Mapping[str, int],
        dtypes: Mapping[str, np.dtype[Any]],
    ) -> None:
        self.dims, self.sizes, self.dtypes = dims, sizes, dtypes
        self._known: dict[tuple[tuple[str, int], ...], dict[str, Expected]] = {}

    def __call__(self, region: Region) -> dict[str, Expected]:
        """The expectations of ``region``'s piece (shared between regions of its shape)."""
        key = tuple((d, s.stop - s.start) for d, s in region.items())
        known = self._known.get(key)
        if known is None:
            lengths = dict(key)
            known = self._known[key] = {
                name: (dims, tuple(lengths.get(d, self.sizes[d]) for d in dims), self.dtypes[name])
                for name, dims in self.dims.items()
            }
        return known


_NAMES: dict[tuple[int, int, str], str] = {}


def worker_name() -> str:
    """``host:pid:thread`` of the calling worker (one string per thread, not per task)."""
    key = (os.getpid(), threading.get_ident(), threading.current_thread().name)
    name = _NAMES.get(key)
    if name is None:
        if len(_NAMES) > 4096:  # threads come and go: keep the cache small
            _NAMES.clear()
        name = _NAMES[key] = f"{socket.gethostname()}:{key[0]}:{key[2]}"
    return name


_STRING_KINDS = frozenset("OUST")


def same_dtype(got: np.dtype[Any], want: np.dtype[Any]) -> bool:
    """Whether data of dtype ``got`` may stand for the template's ``want``."""
    # Strings may come as object, <U, S or StringDType, times in any resolution: the stored
    # encoding encodes each family the same way.
    return (
        got == want
        or (got.kind in _STRING_KINDS and want.kind in _STRING_KINDS)
        or (got.kind in "mM" and got.kind == want.kind)
    )


def check_piece(piece: Any, inp: TaskInput) -> xr.Dataset:
    """Raise :class:`PieceMismatchError` unless ``piece`` is the expected one; select it."""
    region = format_region(inp.region)
    if not isinstance(piece, xr.Dataset):
        raise PieceMismatchError(
            f"the loader returned {type(piece).__name__} for region {{{region}}}; "
            "it must return an xarray.Dataset"
        )
    problems = []
    for name, (dims, shape, dtype) in inp.expect.items():
        if name not in piece.data_vars:
            problems.append(f"variable {name!r} is missing")
            continue
        var = piece[name]
        if tuple(map(str, var.dims)) != dims:
            problems.append(f"{name!r} has dims {var.dims}, expected {dims}")
        elif var.shape != shape:
            problems.append(f"{name!r} has shape {var.shape}, expected {shape}")
        elif not same_dtype(var.dtype, dtype):
            problems.append(f"{name!r} has dtype {var.dtype}, expected {dtype}")
    for dim, labels in inp.labels.items():
        if dim in piece.indexes and not _labels_equal(np.asarray(piece.indexes[dim]), labels):
            got = np.asarray(piece.indexes[dim])
            problems.append(f"its {dim!r} labels {_span(got)} are not the region's {_span(labels)}")
    if problems:
        raise PieceMismatchError(
            f"the piece for region {{{region}}} does not match the template: " + "; ".join(problems)
        )
    selected: xr.Dataset = piece[list(inp.expect)]
    return selected.drop_vars(list(selected.coords))


def _labels_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    try:
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    except TypeError:
        return bool(np.array_equal(a, b))


def _span(labels: np.ndarray) -> str:
    return f"{labels[0]!r}..{labels[-1]!r}" if len(labels) else "[]"


def check_inside(
    snapshot: SessionSnapshot,
    *,
    prefix: str,
    dims: Mapping[str, tuple[str, ...]],
    units: Mapping[str, Mapping[str, int]],
    region: Region,
) -> int:
    """Every chunk this task wrote lies inside ``region``, in one of ``dims``' arrays.

    Array paths are ``prefix`` + name. The task is then done with its fork: freeze it with the
    changes just computed, so the coordinator's merge (in this process, for thread pools)
    need not ask icechunk again. Returns how many chunks the task wrote.
    """
    changes = snapshot.seal()
    n = 0
    for path, coords in changes.chunks.items():
        name = path[len(prefix) :] if path.startswith(prefix) else path
        if name not in dims:
            raise RuntimeError(f"the task wrote to {path!r}, which is not one of its arrays")
        for c in coords:
            for dim, index in zip(dims[name], c, strict=True):
                if dim not in region:
                    continue
                u, s = units[name][dim], region[dim]
                if not s.start // u <= index < -(-s.stop // u):
                    raise RuntimeError(
                        f"the task wrote chunk {list(c)} of {path!r}, outside its region "
                        f"({dim}={s.start}:{s.stop}, chunk size {u})"
                    )
        n += len(coords)
    return n


def write_variables(
    store: Any,
    group: str | None,
    data: xr.Dataset,
    *,
    encodings: Mapping[str, Mapping[str, Any]],
    region: Region,
    stored_dims: Mapping[str, tuple[str, ...]],
    seen: Hashable | None = None,
) -> None:
    """Encode each variable of ``data`` with its encoding; assign it at ``region``.

    This is what ``Dataset.to_zarr(region=...)`` does (the encoding applied by xarray's own
    encoder), without its ~10 ms per call of opening and checking every array: the
    coordinator read the encodings once. ``region`` is in the stored arrays' coordinates.
    Lazy data are encoded lazily, then computed here (without a nested cluster), exactly as
    ``to_zarr`` computes them: dask's arithmetic promotes differently from numpy's in-place
    operations, so encoding loaded values could round packed data differently. ``seen``: see
    :func:`open_array`.
    """
    from xarray.backends.zarr import encode_zarr_variable

    prefix = f"{group}/" if group else ""
    for name, variable in data.variables.items():
        name = str(name)
        dims = stored_dims.get(name)
        if is_virtual(variable.data):
            # References to chunks of source files: stored as they are, never encoded.
            write_references(
                store,
                group,
                name,
                variable.data,
                dims=tuple(map(str, variable.dims)),
                region=region,
                checksum=variable.encoding.get("last_updated_at"),
            )
            continue
        var = variable.copy(deep=False)
        if dims and tuple(map(str, var.dims)) != dims:
            var = var.transpose(*dims)
        var.encoding = dict(encodings.get(name, {}))
        if var.dtype == object:
            # Strings: computed first (no arithmetic to keep lazy), then filled as to_zarr does.
            if var.chunks is not None:
                import dask

                with dask.config.set(scheduler="synchronous"):
                    var = var.compute()
            var = _fill_missing_strings(var)
        encoded = encode_zarr_variable(var, name=name, zarr_format=3)
        if encoded.chunks is None:
            values = np.asarray(encoded.values)
        else:
            import dask

            with dask.config.set(scheduler="synchronous"):
                values = np.asarray(encoded.values)
        index = tuple(region.get(str(d), slice(None)) for d in var.dims)
        array = open_array(store, prefix + name, seen=seen)
        array[index] = values


_METADATA: dict[tuple[Hashable, str], Any] = {}
_METADATA_ENTRIES = 256  # arrays of a few runs at once; cleared when full


def open_array(store: Any, path: str, *, seen: Hashable | None = None) -> Any:
    """The zarr array at ``path`` of ``store``, for writing.

    ``seen`` names the state of the repository the store shows (a snapshot's lineage):
    stores with the same ``seen`` hold the same array metadata, which is then read and
    parsed once per process instead of once per task (about a third of a one-chunk task's
    time). Uses zarr's public ``AsyncArray(metadata, store_path)`` constructor.
    """
    import zarr
    from zarr.storage import StorePath

    if seen is None:
        return zarr.open_array(store, path=path, mode="r+")
    key = (seen, path)
    metadata = _METADATA.get(key)
    if metadata is None:
        array = zarr.open_array(store, path=path, mode="r+")
        if len(_METADATA) >= _METADATA_ENTRIES:
            _METADATA.clear()
        _METADATA[key] = array.metadata
        return array
    return zarr.Array(zarr.AsyncArray(metadata=metadata, store_path=StorePath(store, path)))


def _fill_missing_strings(var: xr.Variable) -> xr.Variable:
    """Missing values of an object string array as ``to_zarr`` stores them: ``""``.

    xarray infers the fill from the whole variable's values; a piece may hold nothing but
    missing values, from which it would infer a float (and store "nan").
    """
    import pandas as pd

    values = np.asarray(var.values)
    missing = pd.isnull(values)
    if not missing.any() or (missing.all() and var.encoding.get("dtype") is None):
        return var
    kinds = {type(v) for v in values[~missing].ravel()[:1]}
    dtype = var.encoding.get("dtype")
    if bytes in kinds or (dtype is not None and np.dtype(dtype).kind == "S"):
        fill: Any = b""
    elif kinds <= {str} or (dtype is not None and np.dtype(dtype).kind in "TUO"):
        fill = ""
    else:
        return var  # not strings (cftime and friends keep their own handling)
    values = values.copy()
    values[missing] = fill
    return var.copy(deep=False, data=values)


def execute(inp: TaskInput) -> TaskOutput:
    """Run one task: build or take the piece, check, write, check the chunks written."""
    t0 = time.perf_counter()
    try:
        piece = inp.loader(dict(inp.region)) if inp.loader is not None else inp.piece
        piece = check_piece(piece, inp)
        write_variables(
            inp.snapshot.store,
            inp.group,
            piece,
            encodings=inp.encodings,
            region=inp.abs_region,
            stored_dims=inp.stored_dims,
            seen=inp.snapshot.lineage,
        )
        n_chunks = check_inside(
            inp.snapshot,
            prefix="/" + (f"{inp.group}/" if inp.group else ""),
            dims={name: inp.stored_dims.get(name) or exp[0] for name, exp in inp.expect.items()},
            units=inp.units,
            region=inp.abs_region,
        )
        return TaskOutput(
            inp.index,
            True,
            snapshot=inp.snapshot,
            seconds=time.perf_counter() - t0,
            worker=worker_name(),
            n_chunks=n_chunks,
            nbytes=int(piece.nbytes),
        )
    except Exception as exc:
        return failed(inp.index, exc, t0)


def failed(index: int, exc: Exception, t0: float) -> TaskOutput:
    """A task's failure, as it travels home (call it inside the ``except`` block)."""
    # The exception travels home if it pickles; its text always does.
    shipped = exc if shipping.pack_exception(exc) is not None else None
    return TaskOutput(
        index,
        False,
        error=f"{type(exc).__name__}: {exc}",
        exception=shipped,
        traceback=traceback.format_exc(),
        seconds=time.perf_counter() - t0,
        worker=worker_name(),
        retryable=not isinstance(exc, PieceMismatchError),
    )


def run_task(arg: TaskInput | bytes) -> TaskOutput:
    """Entry point in the worker."""
    inp = shipping.loads(arg)
    assert isinstance(inp, TaskInput)
    return execute(inp)


def run_call(
    fn: Callable[[Any], TaskOutput], args: list[Any], *, combine: bool = True
) -> list[TaskOutput]:
    """One engine call of several tasks: run each, then combine their snapshots.

    When every task succeeded (and ``combine``), their forks are merged here into one (see
    :func:`~icechunk_distributed.snapshot.combine_snapshots`), which every output carries:
    the coordinator merges one fork per call. A call with a failure returns each task's own.
    """
    outs = [fn(arg) for arg in args]
    if not combine or len(outs) < 2 or not all(o.ok and o.snapshot is not None for o in outs):
        return outs
    combined = combine_snapshots([o.snapshot for o in outs if o.snapshot is not None])
    if combined is not None:
        for out in outs:
            out.snapshot, out.shared = combined, True
    return outs
