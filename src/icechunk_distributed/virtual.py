"""Virtual ingest: files referenced from the repository, not copied into it.

The same pipeline as a byte ingest, with a second kind of task. Every file's header is read
on the executor (:mod:`~icechunk_distributed.virtualscan`): the coordinator learns the concat
values and each array's layout (dtype, chunk shape, codecs, fill value), checks that the
files form one chunk grid, and never sees a manifest. Each task then parses its files and
writes their chunk references (file, offset, length) into its own fork at the files' place
(:class:`VirtualLoader`), with the bytes of the ``loadable_variables`` along the concat dim;
the forks are merged with the usual checks and committed once. The coordinator writes the
other materialised variables: the dimension coordinates (the concat one from the headers)
and the static ``loadable_variables`` (from the first file). Other coordinates are
referenced, as ``open_virtual_dataset`` leaves them.

The chunk-grid rule: a virtual array has one chunk grid, so every file but the last must
hold a whole number of chunks along ``concat_dim``; a file ending inside a chunk is refused.
Tasks write whole files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import xarray as xr

from icechunk_distributed.errors import TemplateMismatchError
from icechunk_distributed.scan import FileHeader, FileSet
from icechunk_distributed.sources import SourceOptions
from icechunk_distributed.virtualscan import (
    decoding,
    default_parser,
    file_url,
    load_arrays,
    loaded_names,
    manifest_arrays,
    parse_file,
    plain_hdf,
)

# Whole files per task: enough tasks to balance the workers and retry little, few enough that
# the per-task cost (a fork shipped home and merged) stays small next to parsing.
_TASKS_PER_WORKER = 4
_MAX_FILES_PER_TASK = 64

__all__ = [
    "VirtualLoader",
    "VirtualOptions",
    "as_arrays",
    "check_virtual",
    "check_virtual_append",
    "check_virtual_options",
    "file_batches",
    "hdf_prototypes",
    "virtual_template",
]


@dataclass(frozen=True)
class VirtualOptions:
    """How a virtual ingest parses files: the VirtualiZarr parser, the arrays to load."""

    parser: Any
    loadable: tuple[str, ...] = ()


def check_virtual(
    virtual: bool,
    parser: Any,
    loadable: Sequence[str],
    chunks: Mapping[str, Any],
    engine: str | None,
) -> VirtualOptions | None:
    """The virtual options of an ingest, or None for a byte ingest.

    Raises
    ------
    ValueError
        Options that do not apply to the kind of ingest asked for.
    """
    if not virtual:
        if parser is not None or loadable:
            raise ValueError("parser= and loadable_variables= need virtual=True")
        return None
    if chunks:
        raise ValueError(
            "chunks= cannot be used with virtual=True: references keep the files' own chunks "
            "(ingest with virtual=False to rechunk)"
        )
    if engine is not None:
        raise ValueError("engine= is for byte ingests; a virtual ingest takes parser=")
    if isinstance(loadable, str):
        loadable = [loadable]
    return VirtualOptions(parser if parser is not None else default_parser(), tuple(loadable))


def check_virtual_options(
    task_size: int | str | None,
    encoding: Mapping[str, Mapping[str, Any]] | None,
    *,
    referenced: Sequence[str],
) -> None:
    """Refuse what a virtual ingest cannot honour: task sizes, encodings of references.

    Raises
    ------
    ValueError
        ``task_size``, or an ``encoding`` for a referenced array.
    """
    if task_size is not None:
        raise ValueError(
            "task_size= does not apply to a virtual ingest: each task references whole "
            "files (about four tasks per worker, at most 64 files each)"
        )
    odd = sorted(set(encoding or {}) & set(referenced))
    if odd:
        raise ValueError(
            f"encoding= names referenced arrays {odd}: references keep the files' chunks and "
            "codecs. Copy them instead (loadable_variables, or virtual=False)"
        )


def check_virtual_append(
    store: Any, group: str | None, files: FileSet, reference: FileHeader
) -> None:
    """New files must extend the stored arrays: same layout and decoding, on the chunk grid.

    Raises
    ------
    TemplateMismatchError
        An array the files reference is stored with another dtype, chunk shape, codecs or
        fill value (a dataset ingested as bytes usually is), or decoded with other scale,
        offset, fill or time units; or the stored length ends inside a chunk.
    """
    import zarr

    dim, first = files.concat_dim, files.headers[0]
    node = zarr.open_group(store, path=group or "", mode="r", zarr_format=3)
    for name, want in reference.layouts.items():
        if name not in node:
            raise TemplateMismatchError(
                f"{first.path} references {name!r}, which the store does not have"
            )
        array = node[name]
        if not isinstance(array, zarr.Array):
            raise TemplateMismatchError(f"{name!r} is a group in the store, not an array")
        meta = dataclasses.replace(array.metadata, attributes={}).to_dict()
        meta.pop("shape", None)
        have = json.loads(json.dumps(meta, sort_keys=True, default=str))
        if have != json.loads(want):
            raise TemplateMismatchError(
                f"{name!r} in the files to append ({first.path}, ...) has another layout "
                f"than the stored array (dtype, chunks, codecs or fill value): "
                f"{_layout_diff(have, json.loads(want))}. Ingest them into a new dataset"
            )
        theirs = decoding(reference.variables[name].attrs)
        if decoding(dict(array.attrs)) != theirs:
            raise TemplateMismatchError(
                f"{name!r} in the files to append ({first.path}, ...) is decoded with other "
                f"attributes than the stored array ({theirs} against "
                f"{decoding(dict(array.attrs))}): its new values would be decoded wrongly"
            )
        dims = reference.variables[name].dims
        if dim in dims:
            axis = dims.index(dim)
            if array.shape[axis] % array.chunks[axis]:
                raise TemplateMismatchError(
                    f"the stored {name!r} ends inside a chunk along {dim!r} ({array.shape[axis]} "
                    f"steps, chunks of {array.chunks[axis]}): references appended after it "
                    "would be off the chunk grid"
                )


def _layout_diff(have: Mapping[str, Any], want: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    return "; ".join(f"{k}: stored {have.get(k)}, files {want.get(k)}" for k in keys)


def file_batches(files: FileSet, parallelism: int | None) -> list[dict[str, slice]]:
    """Regions of whole consecutive files: about four per worker, at most 64 files each."""
    n = len(files.headers)
    per = max(1, min(_MAX_FILES_PER_TASK, -(-n // (_TASKS_PER_WORKER * (parallelism or 1)))))
    out = []
    for i in range(0, n, per):
        j = min(n, i + per)
        stop = files.offsets[j] if j < n else files.size
        out.append({files.concat_dim: slice(files.offsets[i], stop)})
    return out


def virtual_template(
    files: FileSet,
    reference: FileHeader,
    *,
    parser: Any,
    options: SourceOptions | None,
    loadable: Sequence[str] = (),
) -> tuple[xr.Dataset, list[str], list[str]]:
    """The dataset the files form, and which of its arrays are references.

    Returns
    -------
    tuple
        The template (lazy stand-ins, in the files' own dtype and chunks, for the arrays
        along ``concat_dim`` that tasks reference; loaded values for everything else), the
        names of those arrays, and the arrays without ``concat_dim`` that the coordinator
        references from the first file.
    """
    import dask.array as da

    dim, size = files.concat_dim, files.size
    first = files.headers[0]
    store = parse_file(file_url(first.path), parser, options)
    arrays = manifest_arrays(store)
    names = loaded_names(arrays, loadable)
    loaded = load_arrays(store, names, arrays)
    along = sorted(n for n in reference.layouts if dim in reference.variables[n].dims)
    static = sorted(n for n in reference.layouts if n not in along)
    data: dict[str, xr.Variable] = {}
    for name in along:
        array = arrays[name]
        dims = first.variables[name].dims
        shape = tuple(size if d == dim else int(n) for d, n in zip(dims, array.shape, strict=True))
        chunks = tuple(int(c) for c in array.metadata.chunks)
        lazy = da.zeros(shape, dtype=array.dtype, chunks=chunks)
        data[name] = xr.Variable(dims, lazy, encoding={"chunks": chunks})
    grid = _grid(files, along, arrays)
    coords: dict[str, xr.Variable] = {}
    for key, var in loaded.variables.items():
        name = str(key)
        if dim not in var.dims:
            continue
        if name in loaded.data_vars:
            # Loaded, not referenced: tasks write its bytes, in chunks on the files' grid.
            pairs = list(zip(var.dims, var.shape, strict=True))
            chunks = tuple(grid if d == dim else int(n) for d, n in pairs)
            shape = tuple(size if d == dim else int(n) for d, n in pairs)
            lazy = da.zeros(shape, dtype=var.dtype, chunks=chunks)
            data[name] = xr.Variable(
                var.dims, lazy, var.attrs, encoding={**_loaded(var), "chunks": chunks}
            )
            continue
        if name == dim:
            values = files.concat_values()
        else:
            values = np.concatenate(
                [h.concat_coords[str(name)] for h in files.headers], axis=var.dims.index(dim)
            )
        coords[str(name)] = xr.Variable(var.dims, values, var.attrs, encoding=_loaded(var))
    base = loaded.drop_vars([n for n in loaded.variables if dim in loaded[n].dims])
    coords = {n: v for n, v in coords.items() if n not in data}
    for var in base.variables.values():
        var.encoding = _loaded(var)
    attrs = dict(store._group.metadata.attributes)
    attrs.pop("coordinates", None)  # xarray keeps coordinate names apart from attributes
    ds = base.assign(data).assign_coords(
        {n: v for n, v in coords.items() if n in loaded.coords or n == dim}
    )
    ds = ds.assign({n: v for n, v in coords.items() if n not in ds.variables})
    ds.attrs = attrs
    return ds, along, static


def as_arrays(refs: Mapping[str, Any], prototypes: Mapping[str, Any]) -> dict[str, Any]:
    """``ManifestArray`` s of references read with h5py, with the parser's metadata."""
    from virtualizarr.manifests import ChunkManifest, ManifestArray
    from virtualizarr.manifests.utils import copy_and_replace_metadata

    out = {}
    for name, (shape, paths, offsets, lengths) in refs.items():
        manifest = ChunkManifest.from_arrays(
            paths=paths, offsets=offsets, lengths=lengths, validate_paths=False
        )
        meta = copy_and_replace_metadata(prototypes[name], new_shape=list(shape))
        out[name] = ManifestArray(metadata=meta, chunkmanifest=manifest)
    return out


def hdf_prototypes(
    url: str, names: Sequence[str], parser: Any, options: SourceOptions | None
) -> dict[str, Any]:
    """The arrays' metadata, if h5py alone reads this file's references as the parser does.

    The fast path of the tasks (:func:`~icechunk_distributed.hdfheader.read_hdf_references`,
    1 ms a small file instead of 20 for the parse), checked on one file: the parser stays the
    reference. Empty (every file is parsed) for another parser or on any difference.
    """
    from icechunk_distributed.hdfheader import read_hdf_references

    if not names or not plain_hdf(parser):
        return {}
    arrays = manifest_arrays(parse_file(url, parser, options))
    refs = read_hdf_references(url, names, options=options)
    if refs is None:
        return {}
    prototypes = {n: arrays[n].metadata for n in names}
    fast = as_arrays(refs, prototypes)
    same = all(
        fast[n].metadata == arrays[n].metadata
        and fast[n].manifest.dict() == arrays[n].manifest.dict()
        for n in names
    )
    return prototypes if same else {}


def _grid(files: FileSet, along: Sequence[str], arrays: Mapping[str, Any]) -> int:
    """A chunk length along the concat dim that every file boundary falls on.

    The referenced arrays' chunks (:func:`check_grid` put every boundary on them), else the
    files' lengths.
    """
    dim = files.concat_dim
    sizes = [
        int(arrays[n].metadata.chunks[files.headers[0].variables[n].dims.index(dim)]) for n in along
    ]
    sizes = sizes or [h.sizes[dim] for h in files.headers[:-1]] or [files.size]
    return math.gcd(*sizes)


def _loaded(var: xr.Variable) -> dict[str, Any]:
    """A loaded variable's encoding, without the file's layout (xarray picks new chunks)."""
    keys = ("chunks", "preferred_chunks", "shards", "compressors", "filters", "serializer")
    return {k: v for k, v in var.encoding.items() if k not in keys}


@dataclass(frozen=True)
class VirtualLoader:
    """Parses one region's files inside a task and returns their references.

    Picklable (URLs, offsets and the parser only). Regions hold whole files (the planner
    makes them so). ``virtual_variables`` tells the coordinator which arrays it must create
    itself (:meth:`write_virtual_metadata`) instead of through ``to_zarr``.
    """

    urls: tuple[str, ...]
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    concat_dim: str
    variables: tuple[str, ...]
    static: tuple[str, ...]
    parser: Any
    options: SourceOptions | None
    checksum: datetime
    loaded: tuple[str, ...] = ()
    # The arrays' metadata (but the shape), when the references may be read with h5py
    # alone (see hdf_prototypes); empty: every file is parsed.
    prototypes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        files: FileSet,
        variables: Sequence[str],
        static: Sequence[str],
        *,
        parser: Any,
        options: SourceOptions | None,
        loaded: Sequence[str] = (),
        prototypes: Mapping[str, Any] | None = None,
    ) -> VirtualLoader:
        """The loader of ``files``' virtual ``variables`` (and ``loaded`` ones, as bytes)."""
        # Icechunk refuses to read a reference whose file changed after this time. A second
        # later than now, as VirtualiZarr does: file systems keep finer times than icechunk.
        checksum = datetime.now(UTC) + timedelta(seconds=1)
        return cls(
            tuple(file_url(p) for p in files.paths),
            tuple(files.offsets),
            tuple(h.sizes[files.concat_dim] for h in files.headers),
            files.concat_dim,
            tuple(variables),
            tuple(static),
            parser,
            options,
            checksum,
            tuple(loaded),
            dict(prototypes or {}),
        )

    @property
    def virtual_variables(self) -> tuple[str, ...]:
        """Every array this loader references: along ``concat_dim`` and static."""
        return self.variables + self.static

    def parts(self, start: int, stop: int) -> list[tuple[str, slice]]:
        """The files overlapping ``start:stop`` and the part of each (whole files)."""
        return [(self.urls[i], slice(0, self.lengths[i])) for i in self.files_in(start, stop)]

    def files_in(self, start: int, stop: int) -> list[int]:
        """The files inside ``start:stop``; refuses a region that cuts a file."""
        out = []
        for i, (offset, n) in enumerate(zip(self.offsets, self.lengths, strict=True)):
            if offset < stop and start < offset + n:
                if offset < start or offset + n > stop:
                    raise ValueError(
                        f"region {self.concat_dim}={start}:{stop} cuts {self.urls[i]} "
                        f"({offset}:{offset + n}); virtual regions hold whole files"
                    )
                out.append(i)
        return out

    def __call__(self, region: dict[str, slice]) -> xr.Dataset:
        """The references of the region's files, one ``ManifestArray`` per variable."""
        dim = self.concat_dim
        s = region.get(dim, slice(0, sum(self.lengths)))
        parts: dict[str, list[Any]] = {n: [] for n in self.variables}
        dims: dict[str, tuple[str, ...]] = {}
        values: list[xr.Dataset] = []
        for i in self.files_in(s.start, s.stop):
            arrays = self._fast(i)
            if arrays is None:
                store = parse_file(self.urls[i], self.parser, self.options)
                arrays = manifest_arrays(store)
                if self.loaded:
                    values.append(load_arrays(store, self.loaded, arrays)[list(self.loaded)])
            for name in self.variables:
                var = arrays[name].to_virtual_variable()
                dims[name] = tuple(str(d) for d in var.dims)
                parts[name].append(var.data)
        out = {}
        if values:
            merged = xr.concat(values, dim=dim, data_vars="all", coords="minimal", join="override")
            out.update({str(n): v.variable for n, v in merged.data_vars.items()})
        for name, found in parts.items():
            axis = dims[name].index(dim)
            data = found[0] if len(found) == 1 else np.concatenate(found, axis=axis)
            out[name] = xr.Variable(dims[name], data, encoding={"last_updated_at": self.checksum})
        return xr.Dataset(out)

    def _fast(self, i: int) -> dict[str, Any] | None:
        """File ``i``'s arrays from h5py alone (None: parse it)."""
        if not self.prototypes or self.loaded:
            return None
        from icechunk_distributed.hdfheader import read_hdf_references

        refs = read_hdf_references(self.urls[i], self.variables, options=self.options)
        return None if refs is None else as_arrays(refs, self.prototypes)

    def coordinator_variables(self, names: Sequence[str], region: dict[str, slice]) -> xr.Dataset:
        """Loaded variables without the concat dim, from the first file.

        As ``open_mfdataset`` takes them with ``compat="override"``.
        """
        store = parse_file(self.urls[0], self.parser, self.options)
        return load_arrays(store, list(names), manifest_arrays(store))[list(names)]

    def write_virtual_metadata(
        self,
        store: Any,
        group: str | None,
        *,
        shapes: Mapping[str, tuple[int, ...]],
        append_dim: str | None,
    ) -> None:
        """Create (or, appending, grow) the referenced arrays, as VirtualiZarr would.

        Arrays along ``concat_dim`` get the first file's metadata and attributes with the
        full shape (``shapes``) and no references yet. Static arrays get the first file's
        references (an append leaves stored ones as they are).
        """
        import zarr
        from virtualizarr.manifests import ChunkManifest, ManifestArray
        from virtualizarr.manifests.utils import copy_and_replace_metadata

        arrays = manifest_arrays(parse_file(self.urls[0], self.parser, self.options))
        node = zarr.open_group(store, path=group or "", mode="a", zarr_format=3)
        virtual: dict[str, xr.Variable] = {}
        for name in self.virtual_variables:
            array = arrays[name]
            dims = tuple(str(d) for d in array.metadata.dimension_names)
            if name in node:
                existing = node[name]
                if append_dim is not None and name in self.variables:
                    assert isinstance(existing, zarr.Array)
                    axis = dims.index(append_dim)
                    grown = list(existing.shape)
                    grown[axis] += shapes[name][axis]
                    existing.resize(tuple(grown))
                continue
            if name in self.variables:
                shape = shapes[name]
                grid = tuple(-(-n // c) for n, c in zip(shape, array.metadata.chunks, strict=True))
                empty = ChunkManifest.from_arrays(
                    paths=np.full(grid, "", dtype=np.dtypes.StringDType()),
                    offsets=np.zeros(grid, dtype=np.uint64),
                    lengths=np.zeros(grid, dtype=np.uint64),
                )
                meta = copy_and_replace_metadata(array.metadata, new_shape=list(shape))
                array = ManifestArray(metadata=meta, chunkmanifest=empty)
            virtual[name] = array.to_virtual_variable()
        if virtual:
            # VirtualiZarr's own writer: the arrays get exactly the metadata and attributes
            # vds.vz.to_icechunk gives them.
            xr.Dataset(virtual).vz.to_icechunk(
                store, group=group, mode="a", last_updated_at=self.checksum
            )
