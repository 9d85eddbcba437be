"""Virtual chunk references written into a fork: what a virtual task writes instead of bytes.

A variable whose data is a VirtualiZarr ``ManifestArray`` stands for chunks that already sit
in source files. Writing it stores, per chunk, a reference (file, offset, length) in the
icechunk session, at the chunk offset of the task's region, through VirtualiZarr's own
writer. This module imports VirtualiZarr only when such a variable is met, so the byte path
never needs it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any

__all__ = ["is_virtual", "write_references"]


def is_virtual(data: Any) -> bool:
    """Whether ``data`` is a VirtualiZarr ``ManifestArray`` (without importing VirtualiZarr)."""
    module = sys.modules.get("virtualizarr.manifests")
    return module is not None and isinstance(data, module.ManifestArray)


def write_references(
    store: Any,
    group: str | None,
    name: str,
    data: Any,
    *,
    dims: tuple[str, ...],
    region: Mapping[str, slice],
    checksum: datetime | None,
) -> None:
    """Store the references of ``data`` (a ``ManifestArray``) at ``region`` of array ``name``.

    Parameters
    ----------
    store : icechunk.IcechunkStore
        A writable store (a task's fork).
    group : str, optional
        The group of the array.
    name : str
        The array.
    data : virtualizarr.manifests.ManifestArray
        The references, shaped like the region.
    dims : tuple of str
        The array's dimensions, in ``data``'s axis order.
    region : dict
        Where ``data`` lands, in the stored array's coordinates; it starts on chunk boundaries.
    checksum : datetime, optional
        Source files changed after this time fail to read (icechunk checks it on reads).
    """
    import zarr
    from virtualizarr.writers.icechunk import write_manifest_to_icechunk

    path = f"{group}/{name}" if group else name
    chunk_shape = zarr.open_array(store, path=path, mode="r").chunks
    offsets = []
    for dim, size in zip(dims, chunk_shape, strict=True):
        start = (region[dim].start or 0) if dim in region else 0
        if start % size:
            raise ValueError(
                f"references of {name!r} would start at {dim}={start}, inside a chunk of "
                f"{size}: references can only be placed at whole chunks"
            )
        offsets.append(start // size)
    node = zarr.open_group(store, path=group or "", mode="r", zarr_format=3)
    write_manifest_to_icechunk(
        store=store,
        group=node,
        arr_name=name,
        manifest=data.manifest,
        chunk_index_offsets=tuple(offsets),
        last_updated_at=checksum,
    )
