"""Compare two Icechunk repositories: ours (``run_region_writes``) against the reference
(``Dataset.to_zarr``).

:func:`assert_same_repos` collects every difference (node set, zarr metadata, raw stored
values, decoded datasets and their encodings) and raises one ``AssertionError`` whose first
line names the first few differences, ``ours`` value first, then the reference's.
"""

from __future__ import annotations

from typing import Any

import icechunk
import numpy as np
import xarray as xr
import zarr
import zarr.errors

# Encoding keys that depend on where the dataset was read from, not on what is stored.
SOURCE_KEYS = frozenset({"source"})


def _short(v: Any, n: int = 90) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _is_nan(v: Any) -> bool:
    try:
        return bool(isinstance(v, (float, np.floating, np.complexfloating)) and np.isnan(v))
    except TypeError:
        return False


def diff_values(ours: Any, ref: Any, where: str = "") -> list[str]:
    """Recursive, type-aware equality of JSON-like metadata/encoding values (NaN == NaN)."""
    if isinstance(ours, dict) and isinstance(ref, dict):
        out = []
        for k in sorted(set(ours) | set(ref), key=str):
            w = f"{where}.{k}" if where else str(k)
            if k not in ours:
                out.append(f"{w}: missing in ours (ref {_short(ref[k])})")
            elif k not in ref:
                out.append(f"{w}: extra in ours {_short(ours[k])}")
            else:
                out += diff_values(ours[k], ref[k], w)
        return out
    if isinstance(ours, (list, tuple)) and isinstance(ref, (list, tuple)):
        if type(ours) is not type(ref) or len(ours) != len(ref):
            return [f"{where}: {_short(ours)} vs {_short(ref)}"]
        out = []
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            out += diff_values(a, b, f"{where}[{i}]")
        # a list of many differing scalars: one line is enough
        return out if len(out) <= 2 else [f"{where}: {_short(ours)} vs {_short(ref)}"]
    if isinstance(ours, np.ndarray) or isinstance(ref, np.ndarray):
        a, b = np.asarray(ours), np.asarray(ref)
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {_short(ours)} vs {_short(ref)}"]
        try:
            np.testing.assert_array_equal(a, b)
        except AssertionError:
            return [f"{where}: {_short(ours)} vs {_short(ref)}"]
        return []
    if _is_nan(ours) and _is_nan(ref) and type(ours) is type(ref):
        return []
    if type(ours) is not type(ref):
        return [
            f"{where}: {_short(ours)} ({type(ours).__name__}) "
            f"vs {_short(ref)} ({type(ref).__name__})"
        ]
    try:
        same = bool(ours == ref)
    except Exception:
        same = repr(ours) == repr(ref)
    if not same:
        return [f"{where}: {_short(ours)} vs {_short(ref)}"]
    return []


def _nodes(store: Any) -> dict[str, Any]:
    """Every group and array by path; empty for a store without a root group (nothing
    committed yet, e.g. when the first step was refused)."""
    try:
        root = zarr.open_group(store, mode="r")
    except zarr.errors.GroupNotFoundError:
        return {}
    nodes = {"/": root}
    for path, node in root.members(max_depth=None):
        nodes["/" + path.strip("/")] = node
    return nodes


def _nan_mask(a: np.ndarray) -> np.ndarray:
    return np.isnan(a) if a.dtype.kind in "fc" else np.zeros(a.shape, bool)


def _raw(arr: zarr.Array) -> np.ndarray:
    return np.asarray(arr[...])


def diff_stores(ours: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """Node set, node kinds, array metadata, group attributes and raw stored values of two
    node maps (:func:`_nodes`)."""
    out = []
    for p in sorted(set(ref) - set(ours)):
        out.append(f"node {p}: missing in ours")
    for p in sorted(set(ours) - set(ref)):
        out.append(f"node {p}: extra in ours")
    for p in sorted(set(ours) & set(ref)):
        a, b = ours[p], ref[p]
        if isinstance(a, zarr.Group) != isinstance(b, zarr.Group):
            out.append(f"node {p}: {type(a).__name__} vs {type(b).__name__}")
            continue
        if isinstance(a, zarr.Group):
            out += [f"group {p} attrs {d}" for d in diff_values(dict(a.attrs), dict(b.attrs))]
            out += [
                f"group {p} meta {d}"
                for d in diff_values(a.metadata.to_dict(), b.metadata.to_dict())
            ]
            continue
        meta = diff_values(a.metadata.to_dict(), b.metadata.to_dict())
        out += [f"array {p} meta {d}" for d in meta]
        va, vb = _raw(a), _raw(b)
        if va.dtype != vb.dtype or va.shape != vb.shape:
            out.append(
                f"array {p} values: dtype/shape {va.dtype}{va.shape} vs {vb.dtype}{vb.shape}"
            )
            continue
        if va.dtype.kind in "OTUS":
            la, lb = va.tolist(), vb.tolist()
            if la != lb:
                flat_a, flat_b = va.ravel().tolist(), vb.ravel().tolist()
                i = next(i for i, (x, y) in enumerate(zip(flat_a, flat_b, strict=True)) if x != y)
                out.append(
                    f"array {p} values differ (first at flat index {i}: "
                    f"{_short(flat_a[i])} vs {_short(flat_b[i])})"
                )
            continue
        try:
            np.testing.assert_array_equal(va, vb)
        except AssertionError as e:
            mismatch = next(
                (ln.strip() for ln in str(e).splitlines() if "Mismatched" in ln), "values differ"
            )
            bad = ~((va == vb) | (_nan_mask(va) & _nan_mask(vb)))
            idx = tuple(int(i[0]) for i in np.nonzero(bad)) if bad.any() else ()
            first = f", first at {list(idx)}: {va[idx]!r} vs {vb[idx]!r}" if bad.any() else ""
            out.append(f"array {p} values: {mismatch}{first}")
    return out


def _encodings(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    return {
        str(k): {kk: vv for kk, vv in v.encoding.items() if kk not in SOURCE_KEYS}
        for k, v in ds.variables.items()
    }


def open_decoded(store: Any, group: str | None) -> xr.Dataset:
    return xr.open_zarr(store, consolidated=False, chunks=None, group=group).load()


def diff_decoded(ours_store: Any, ref_store: Any, group: str | None) -> list[str]:
    out = []
    try:
        b = open_decoded(ref_store, group)
    except Exception as e:
        # xarray wrote something it cannot read back itself (random appends of times can
        # overflow its own time units). Parity then means ours fails to read the same way.
        try:
            open_decoded(ours_store, group)
        except Exception as mine:
            if type(mine) is type(e):
                return []
            return [
                f"decoded[{group}]: reference unreadable ({type(e).__name__}: {e}), ours "
                f"unreadable otherwise ({type(mine).__name__}: {mine})"
            ]
        return [f"decoded[{group}]: reference unreadable: {type(e).__name__}: {e}; ours reads"]
    try:
        a = open_decoded(ours_store, group)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        return [f"decoded[{group}]: ours unreadable: {type(e).__name__}: {first}"]
    try:
        xr.testing.assert_identical(a, b)
    except AssertionError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        head = " / ".join(lines[:4])
        out.append(f"decoded[{group}] not identical: {_short(head, 300)}")
    out += [f"decoded[{group}] encoding {d}" for d in diff_values(_encodings(a), _encodings(b))]
    return out


def _groups_with_arrays(nodes: dict[str, Any]) -> list[str | None]:
    groups: list[str | None] = []
    for p, node in nodes.items():
        if isinstance(node, zarr.Group) and any(
            isinstance(m, zarr.Array) for _, m in node.members()
        ):
            groups.append(None if p == "/" else p.strip("/"))
    return groups


def diff_repos(ours: icechunk.Repository, ref: icechunk.Repository) -> list[str]:
    """Every difference, read back from fresh read-only sessions on ``main``."""
    ours_store = ours.readonly_session("main").store
    ref_store = ref.readonly_session("main").store
    ours_nodes, ref_nodes = _nodes(ours_store), _nodes(ref_store)
    out = diff_stores(ours_nodes, ref_nodes)
    # decoded datasets of every group holding arrays, in either repository
    groups = dict.fromkeys(_groups_with_arrays(ref_nodes) + _groups_with_arrays(ours_nodes))
    for group in groups:
        out += diff_decoded(ours_store, ref_store, group)
    return out


def assert_same_repos(ours: icechunk.Repository, ref: icechunk.Repository) -> None:
    diffs = diff_repos(ours, ref)
    if diffs:
        n = len(diffs)
        head = "; ".join(diffs[:3]) + (f"; (+{n - 3} more)" if n > 3 else "")
        raise AssertionError(f"{n} differences (ours vs to_zarr): {head}\n" + "\n".join(diffs))
