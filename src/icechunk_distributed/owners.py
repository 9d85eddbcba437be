"""Who last wrote each chunk of an array, and when: the overlap ledger's bulk, kept compact.

The ledger of :mod:`~icechunk_distributed.merge` remembers, for every chunk merged into a
target, the fork that wrote it and the version its write was merged at. As a dict keyed by
coordinate tuples that costs 125-170 bytes per chunk (1.2-1.6 GB for 10 million, measured);
:class:`ChunkOwners` keeps two int32 arrays over the bounding box of the chunks recorded
(8 bytes per cell), growing it geometrically, and answers a whole merge's lookups with one
numpy indexing operation. Arrays written too sparsely for a box (or zero-dimensional ones)
keep a dict instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DENSE_MIN_CELLS", "DENSE_SLACK", "NOBODY", "ChunkOwners", "coords_array"]

NOBODY = -1
"""The fork number of a chunk nobody recorded."""

DENSE_MIN_CELLS = 1 << 20
"""A box of up to this many cells (8 MiB) is always fine."""

DENSE_SLACK = 8
"""Beyond :data:`DENSE_MIN_CELLS`, a box may hold this many cells per chunk recorded, at most
(so at most 64 bytes per chunk: half a dict entry's cost); sparser writes keep a dict."""


def coords_array(coords: list[tuple[int, ...]], ndim: int) -> np.ndarray:
    """Chunk coordinates as an ``(n, ndim)`` int64 array."""
    return np.asarray(coords, dtype=np.int64).reshape(len(coords), ndim)


class ChunkOwners:
    """For one array: each recorded chunk's writer (a fork number) and version."""

    __slots__ = ("_high", "_mixed", "_ndim", "_sparse", "_tried", "fork", "n", "version")

    def __init__(self) -> None:
        self.fork: np.ndarray | None = None  # int32 over the box; NOBODY where unrecorded
        self.version: np.ndarray | None = None
        self._sparse: dict[tuple[int, ...], tuple[int, int]] | None = None
        self.n = 0  # chunks recorded (an upper bound: a chunk recorded twice counts twice)
        self._high: np.ndarray | None = None  # 1 + the highest coordinate along each dim
        self._tried = 0  # self.n when a sparse record last considered going dense
        self._mixed = False  # coordinates of several dimensionalities: a dict for good
        self._ndim: int | None = None  # of the first coordinates recorded

    def lookup(self, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fork numbers (:data:`NOBODY` if none) and versions for ``(n, ndim)`` coordinates."""
        n = len(coords)
        forks = np.full(n, NOBODY, dtype=np.int32)
        versions = np.zeros(n, dtype=np.int32)
        if self._sparse is not None:
            for k, c in enumerate(map(tuple, coords.tolist())):
                entry = self._sparse.get(c)
                if entry is not None:
                    forks[k], versions[k] = entry
        elif self.fork is not None and self.version is not None and n:
            if coords.shape[1] != self.fork.ndim:  # another array at this path now
                return forks, versions
            inside = np.all(coords < np.asarray(self.fork.shape), axis=1)
            index = tuple(coords[inside].T)
            forks[inside] = self.fork[index]
            versions[inside] = self.version[index]
        return forks, versions

    def get(self, c: tuple[int, ...]) -> tuple[int, int] | None:
        """One chunk's ``(fork number, version)``, if recorded."""
        forks, versions = self.lookup(coords_array([c], len(c)))
        return None if forks[0] == NOBODY else (int(forks[0]), int(versions[0]))

    def record(self, coords: np.ndarray, fork: int | np.ndarray, version: int) -> None:
        """``fork`` wrote the chunks at ``coords``, merged at ``version``.

        ``fork`` is one fork number, or one per row of ``coords`` (no coordinates twice).
        """
        if not len(coords):
            return
        self.n += len(coords)
        if self._ndim is None:
            self._ndim = coords.shape[1]
        elif self._ndim != coords.shape[1]:
            # The array was re-created at this path with other dims: a dict holds both.
            self._mixed = True
        if coords.shape[1] == 0 or self._mixed:  # zero-dimensional: one chunk, ()
            self._to_sparse()
        else:
            high = coords.max(axis=0) + 1
            self._high = high if self._high is None else np.maximum(self._high, high)
            if self._sparse is None:
                self._grow()
            elif self.n >= 2 * self._tried:  # sparse so far: dense enough by now?
                self._tried = self.n
                if self._box_ok(self._high):
                    self._to_dense()
        if self._sparse is not None:
            if isinstance(fork, np.ndarray):
                for c, f in zip(map(tuple, coords.tolist()), fork.tolist(), strict=True):
                    self._sparse[c] = (f, version)
            else:
                entry = (fork, version)
                for c in map(tuple, coords.tolist()):
                    self._sparse[c] = entry
            return
        assert self.fork is not None
        assert self.version is not None
        index = tuple(coords.T)
        self.fork[index] = fork
        self.version[index] = version

    def _box_ok(self, shape: np.ndarray) -> bool:
        return float(np.prod(shape, dtype=np.float64)) <= max(DENSE_MIN_CELLS, DENSE_SLACK * self.n)

    def _grow(self) -> None:
        """Make the box hold every chunk recorded (or go sparse if it would be too big)."""
        assert self._high is not None
        need = self._high
        have = np.zeros_like(need) if self.fork is None else np.asarray(self.fork.shape)
        if np.all(need <= have):
            return
        # Geometric growth: a box growing chunk by chunk is copied O(log n) times.
        shape = np.maximum(need, np.where(need > have, 2 * have, have))
        if not self._box_ok(shape):
            shape = np.maximum(need, have)
            if not self._box_ok(shape):
                self._to_sparse()
                return
        self._resize(shape)

    def _resize(self, shape: np.ndarray) -> None:
        fork = np.full(tuple(shape.tolist()), NOBODY, dtype=np.int32)
        version = np.zeros(tuple(shape.tolist()), dtype=np.int32)
        if self.fork is not None and self.version is not None:
            old = tuple(slice(0, s) for s in self.fork.shape)
            fork[old], version[old] = self.fork, self.version
        self.fork, self.version = fork, version

    def _to_sparse(self) -> None:
        if self._sparse is not None:
            return
        sparse: dict[tuple[int, ...], tuple[int, int]] = {}
        if self.fork is not None and self.version is not None:
            where = np.argwhere(self.fork != NOBODY)
            index = tuple(where.T)
            for c, f, v in zip(
                map(tuple, where.tolist()),
                self.fork[index].tolist(),
                self.version[index].tolist(),
                strict=True,
            ):
                sparse[c] = (f, v)
        self._sparse, self.fork, self.version = sparse, None, None
        self._tried = self.n

    def _to_dense(self) -> None:
        assert self._sparse is not None
        assert self._high is not None
        sparse, self._sparse = self._sparse, None
        self._resize(self._high)
        assert self.fork is not None
        assert self.version is not None
        if sparse:
            where = coords_array(list(sparse), len(self._high))
            values = np.asarray(list(sparse.values()), dtype=np.int32)
            self.fork[tuple(where.T)] = values[:, 0]
            self.version[tuple(where.T)] = values[:, 1]

    def nbytes(self) -> int:
        """Memory held by the arrays (the dict's entries are not counted)."""
        arrays: list[Any] = [a for a in (self.fork, self.version) if a is not None]
        return sum(int(a.nbytes) for a in arrays)
