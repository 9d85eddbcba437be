"""Files mapped to regions: the template, the loader tasks run, the files an append writes.

The template is what ``xr.open_mfdataset(files)`` would give, built without opening every
file: the first file (in concat order) lends its variables, attributes and encodings, and the
scanned headers give the concat coordinate and the other coordinates along it. Data
variables along the concat dimension are lazy stand-ins of the full size (the tasks write
them); everything else is taken from the first file, as ``open_mfdataset`` does with
``compat="override"`` (and only after :func:`~icechunk_distributed.scan.combine_headers`
checked that the files agree on their other coordinates).

The region rule: tasks split only ``concat_dim``, along the stored chunks, so every task
writes whole chunks. A task opens the files that overlap its region and reads only their
overlapping part; a file that straddles a task boundary (file lengths that are not a multiple
of the chunk length, or the reverse) is opened by both tasks, each reading its own steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from icechunk_distributed.errors import TemplateMismatchError
from icechunk_distributed.scan import FileHeader, FileSet, check_step, short_list
from icechunk_distributed.sources import SourceOptions, open_source

__all__ = ["FileLoader", "StoredDataset", "file_template", "split_append", "task_variables"]

# Encoding keys that describe the source file's own layout, not the data: the chunks of the
# new arrays are decided here, once, for every variable.
_LAYOUT_KEYS = ("chunks", "preferred_chunks", "shards", "chunksizes", "contiguous")
# A Zarr v2 source's codecs (numcodecs objects) cannot encode v3 arrays: the new arrays get
# zarr's default codecs instead.
_CODEC_KEYS = ("compressor", "compressors", "filters", "serializer")


def _v2_codecs(encoding: Mapping[str, Any]) -> tuple[str, ...]:
    """The codec keys of ``encoding`` when any codec in it is not a Zarr v3 codec."""
    from zarr.abc.codec import BaseCodec

    codecs: list[Any] = []
    for key in _CODEC_KEYS:
        value = encoding.get(key)
        codecs.extend(value if isinstance(value, list | tuple) else [value])
    if any(c is not None and not isinstance(c, BaseCodec) for c in codecs):
        return _CODEC_KEYS
    return ()


def task_variables(ds: xr.Dataset, concat_dim: str) -> list[str]:
    """Data variables along ``concat_dim``: the ones tasks read from the files."""
    return [str(n) for n, v in ds.data_vars.items() if concat_dim in v.dims]


def _chunks_of(
    var: xr.Variable, concat_dim: str, size: int, chunks: Mapping[str, int | None]
) -> tuple[int, ...]:
    """The chunks of a new array: ``chunks=`` where given, else the first file's own.

    The first file's own chunks are what ``open_mfdataset``'s dask chunks, and so
    ``to_zarr``, would use.
    """
    out = []
    for axis, dim in enumerate(var.dims):
        full = size if dim == concat_dim else int(var.shape[axis])
        if dim in chunks:
            c = chunks[str(dim)]
            out.append(full if c is None or c == -1 else min(int(c), full))
        elif var.chunks is not None:
            out.append(min(int(var.chunks[axis][0]), full))
        else:
            out.append(full)
    return tuple(max(1, c) for c in out)


def file_template(
    files: FileSet,
    *,
    engine: str | None = None,
    options: SourceOptions | None = None,
    chunks: Mapping[str, int | None] | None = None,
) -> xr.Dataset:
    """The dataset the files form, lazy where the tasks write.

    Parameters
    ----------
    files : FileSet
        The checked, ordered files.
    engine : str, optional
        xarray's engine for them.
    options : SourceOptions, optional
        How to reach ``s3://`` sources.
    chunks : dict, optional
        ``{dim: size}`` of the new arrays; by default the first file's chunks.

    Returns
    -------
    xarray.Dataset
        Full size along ``concat_dim``; values of everything but the task variables.
    """
    import dask.array as da

    dim, size = files.concat_dim, files.size
    chunks = dict(chunks or {})
    with open_source(files.headers[0].path, engine=engine, chunks={}, options=options) as first:
        names = task_variables(first, dim)
        along = [str(n) for n, v in first.variables.items() if dim in v.dims and n not in names]
        data_vars: dict[str, xr.Variable] = {}
        for name in names:
            var = first[name].variable
            shape = tuple(size if d == dim else n for d, n in zip(var.dims, var.shape, strict=True))
            lazy = da.zeros(shape, dtype=var.dtype, chunks=_chunks_of(var, dim, size, chunks))
            data_vars[name] = xr.Variable(var.dims, lazy, var.attrs, encoding=var.encoding)
        coords = _concat_coords(files, first)
        # Everything without the concat dim is the first file's, loaded: the coordinator
        # writes it once.
        base = first.drop_vars(names + along).load()
        ds = base.assign(data_vars).assign_coords(coords)
        # open_mfdataset makes every variable but the index coordinates a dask array in the
        # files' own chunks, and to_zarr stores those chunks: so do the same, explicitly.
        for key, var in ds.variables.items():
            codecs = _v2_codecs(var.encoding)
            if key in ds.indexes:
                # Rechunking: the files' layout means nothing for the new arrays.
                drop = (_LAYOUT_KEYS if chunks else ()) + codecs
                var.encoding = {k: v for k, v in var.encoding.items() if k not in drop}
                continue
            drop = _LAYOUT_KEYS + codecs
            encoding = {k: v for k, v in var.encoding.items() if k not in drop}
            own = first[key].variable
            if own.ndim:
                encoding["chunks"] = _chunks_of(own, dim, size, chunks)
            var.encoding = encoding
    return ds


def _concat_coords(files: FileSet, first: xr.Dataset) -> dict[str, xr.Variable]:
    """The concat coordinate and the other coordinates along it, from every file's header."""
    dim = files.concat_dim
    out: dict[str, xr.Variable] = {}
    values = files.concat_values()
    if values is not None and dim in first.variables:
        var = first[dim].variable
        out[dim] = xr.Variable((dim,), values, var.attrs, encoding=dict(var.encoding))
    for name, var in first.coords.items():
        if name == dim or dim not in var.dims:
            continue
        parts = [h.concat_coords[str(name)] for h in files.headers]
        axis = var.dims.index(dim)
        out[str(name)] = xr.Variable(
            var.dims, np.concatenate(parts, axis=axis), var.attrs, encoding=dict(var.encoding)
        )
    return out


@dataclass(frozen=True)
class FileLoader:
    """Reads one region of a file set inside a task: only the files that overlap it.

    Picklable (paths and offsets only), so it ships to any engine. ``options`` keeps its
    values out of every ``repr``.
    """

    paths: tuple[str, ...]
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    concat_dim: str
    variables: tuple[str, ...]
    engine: str | None = None
    options: SourceOptions | None = None
    drop: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        files: FileSet,
        variables: Sequence[str],
        *,
        engine: str | None = None,
        options: SourceOptions | None = None,
    ) -> FileLoader:
        """The loader of ``files``' ``variables``."""
        dim = files.concat_dim
        others = sorted(set(files.headers[0].variables) - set(variables))
        return cls(
            tuple(files.paths),
            tuple(files.offsets),
            tuple(h.sizes[dim] for h in files.headers),
            dim,
            tuple(variables),
            engine,
            options,
            tuple(others),
        )

    def parts(self, start: int, stop: int) -> list[tuple[str, slice]]:
        """The files overlapping ``start:stop`` and the part of each, in order."""
        out = []
        for path, offset, n in zip(self.paths, self.offsets, self.lengths, strict=True):
            if offset < stop and start < offset + n:
                out.append(
                    (path, slice(max(start, offset) - offset, min(stop, offset + n) - offset))
                )
        return out

    def __call__(self, region: dict[str, slice]) -> xr.Dataset:
        """The region's piece: each overlapping file's part, read, then concatenated."""
        return self._read(region, self.variables)

    def coordinator_variables(self, names: Sequence[str], region: dict[str, slice]) -> xr.Dataset:
        """The variables the coordinator writes once, without opening every file.

        Those without the concat dim come from the first file (as ``open_mfdataset`` takes
        them with ``compat="override"``); those along it (a single chunk: no task could
        share it) are read from the files like a region.
        """
        along = [n for n in names if n in self.variables]
        static = [n for n in names if n not in self.variables]
        parts = [self._read(region, along)] if along else []
        if static:
            with open_source(self.paths[0], engine=self.engine, options=self.options) as ds:
                parts.append(ds[static].load())
        return xr.merge(parts, compat="override", join="override", combine_attrs="override")

    def _read(self, region: dict[str, slice], names: Sequence[str]) -> xr.Dataset:
        s = region.get(self.concat_dim, slice(0, sum(self.lengths)))
        other = {d: v for d, v in region.items() if d != self.concat_dim}
        pieces = []
        for path, part in self.parts(s.start, s.stop):
            with open_source(
                path, engine=self.engine, chunks=None, options=self.options, drop=self.drop
            ) as ds:
                piece = ds[list(names)].isel({self.concat_dim: part, **other})
                pieces.append(piece.load())
        if len(pieces) == 1:
            return pieces[0]
        return xr.concat(
            pieces,
            dim=self.concat_dim,
            data_vars="all",
            coords="minimal",
            compat="override",
            join="override",
        )


@dataclass(frozen=True)
class StoredDataset:
    """What an append checks new files against: the stored concat values and variables.

    Attributes
    ----------
    values : numpy.ndarray
        The stored concat coordinate, decoded.
    variables : dict
        Per data variable: its dims, its decoded dtype, and whether the store packs it
        (``scale_factor``/``add_offset``: then any float the files bring is packed alike).
    """

    values: np.ndarray
    variables: dict[str, tuple[tuple[str, ...], np.dtype[Any], bool]]
    along: tuple[str, ...] = ()
    concat: xr.Variable | None = None

    @classmethod
    def of(cls, stored: xr.Dataset, concat_dim: str) -> StoredDataset:
        """Read from an opened store."""
        along = tuple(sorted(str(n) for n, v in stored.coords.items() if concat_dim in v.dims))
        variables = {
            str(n): (
                tuple(str(d) for d in v.dims),
                v.dtype,
                bool({"scale_factor", "add_offset"} & set(v.encoding)),
            )
            for n, v in stored.data_vars.items()
        }
        concat = stored[concat_dim].variable
        return cls(np.asarray(concat.values), variables, along, concat)

    def check_append(
        self, template: xr.Dataset, first: str, *, referenced: Sequence[str] = ()
    ) -> None:
        """Refuse new files whose variables, dims or dtypes are not the stored ones.

        ``to_zarr`` would cast a float64 file into a float32 store silently, or fail deep
        inside xarray on a missing variable; an ingest names the file instead.
        ``referenced``: a virtual ingest's arrays, present whatever the template holds, whose
        dtypes are compared by their layout instead (they are not decoded here).
        """
        ours: dict[str, xr.DataArray | None] = {str(n): v for n, v in template.data_vars.items()}
        ours.update({n: None for n in referenced if n not in ours})
        missing = sorted(set(self.variables) - set(ours))
        extra = sorted(set(ours) - set(self.variables))
        dim = self.concat.dims[0] if self.concat is not None else None
        theirs = tuple(sorted(str(n) for n, v in template.coords.items() if dim in v.dims))
        missing += [f"coordinate {n!r}" for n in self.along if n not in theirs]
        extra += [f"coordinate {n!r}" for n in theirs if n not in self.along]
        if missing or extra:
            raise TemplateMismatchError(
                f"the files to append ({first}, ...) do not have the stored variables: "
                + "; ".join(
                    f"{what} {names}"
                    for what, names in (("missing", missing), ("not in the store", extra))
                    if names
                )
            )
        for name, (dims, dtype, packed) in self.variables.items():
            var = ours[name]
            if var is None or name in referenced:
                continue
            got = tuple(str(d) for d in var.dims)
            same = (
                var.dtype == dtype
                or (packed and var.dtype.kind == "f")
                or (var.dtype.kind in "mM" and var.dtype.kind == dtype.kind)
            )
            if got != dims or not same:
                raise TemplateMismatchError(
                    f"{name!r} in the files to append ({first}, ...) has dims {got} and dtype "
                    f"{var.dtype}; the store has {dims} and {dtype}. Convert the files, or "
                    "write them to a new dataset"
                )
        if dim is not None and dim in template.variables:
            self._check_representable(template[dim].variable, first)

    def _check_representable(self, new: xr.Variable, first: str) -> None:
        """The new concat values survive the stored encoding (its units and dtype).

        Six-hourly times appended to a store encoded as integer "days since ..." would be
        rounded to whole days, silently (as ``to_zarr`` does).
        """
        assert self.concat is not None
        keys = ("units", "calendar", "dtype", "scale_factor", "add_offset")
        encoding = {k: v for k, v in self.concat.encoding.items() if k in keys}
        probe = new.copy(deep=False)
        probe.encoding = encoding
        try:
            with warnings.catch_warnings():
                # xarray warns, then picks finer units; an append keeps the stored ones.
                warnings.simplefilter("ignore", UserWarning)
                encoded = xr.conventions.encode_cf_variable(probe)
            back = xr.conventions.decode_cf_variable("probe", encoded)
            same = encoded.attrs.get("units") == encoding.get("units") and np.array_equal(
                np.asarray(back.values), np.asarray(new.values)
            )
        except (ValueError, TypeError, OverflowError):
            same = False
        if not same:
            raise TemplateMismatchError(
                f"the {new.dims[0]!r} values of the files to append ({first}, ...) cannot be "
                f"stored exactly with the stored encoding {encoding}: they would be rounded. "
                "Write them to a new dataset with finer units"
            )


@dataclass(frozen=True)
class AppendSplit:
    """An append's files: those already stored (skipped) and those still to write."""

    new: list[FileHeader]
    skipped: list[FileHeader]


def split_append(files: FileSet, stored: np.ndarray, *, step: Any = None) -> AppendSplit:
    """Which files an append writes: those whose concat values all follow the store's.

    A file whose values are all in the store, at consecutive positions, is already there
    (skipped: a cron job that lists the whole directory again is safe). Refused: a file
    partly in the store, or one whose values would go inside the stored range (an append
    only grows the end). With ``step``, the first new file must follow the store's last value
    by exactly one step.

    Raises
    ------
    TemplateMismatchError
        Naming the files and the values.
    """
    dim = files.concat_dim
    new: list[FileHeader] = []
    skipped: list[FileHeader] = []
    inside: list[str] = []
    last = stored[-1] if len(stored) else None
    for h in files.headers:
        values = h.concat_values
        if values is None:
            raise TemplateMismatchError(
                f"appending needs {dim!r} values in every file, to tell new files from stored "
                f"ones; {h.path} has none"
            )
        at = np.searchsorted(stored, values)
        found = (at < len(stored)) & (stored[np.minimum(at, len(stored) - 1)] == values)
        if len(stored) and found.all() and np.all(np.diff(at) == 1):
            skipped.append(h)
        elif found.any():
            raise TemplateMismatchError(
                f"{h.path} is partly in the store: {int(found.sum())} of its {len(values)} "
                f"{dim!r} values are stored already ({values[found][0]}...). Files already "
                "ingested must be the same files, with the same values"
            )
        elif last is not None and not values[0] > last:
            inside.append(h.path)
        else:
            new.append(h)
    if inside:
        raise TemplateMismatchError(
            f"{len(inside)} file(s) have {dim!r} values inside the stored range, which ends at "
            f"{last}: {short_list(inside)}. An append only adds values after the last stored one"
        )
    if step is not None and new:
        check_step(new, dim, step, before=last)
    return AppendSplit(new, skipped)
