"""Icechunk forks as this library handles them: what a fork changed, and reading its bytes.

A :class:`Fork` is one icechunk ``ForkSession``, alive in this process or still as bytes from
a pickle, with what it changed (:class:`Changes`) and the version of the session state it was
forked from (what it could *see*; the merge's overlap rule is built on that).
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zarr.buffer import default_buffer_prototype

from icechunk_distributed.errors import ForkStartMethodError

if TYPE_CHECKING:
    from icechunk import ForkSession, IcechunkStore, Session

__all__ = [
    "Changes",
    "ChunkCoords",
    "Fork",
    "chunk_bytes",
    "chunk_content",
    "chunk_key",
    "claim_process",
    "node_bytes",
    "read_key",
]

ChunkCoords = tuple[int, ...]

# ---------------------------------------------------------------------------------------------
# The `fork` start method: icechunk's runtime does not survive it.

_USED_IN_PID: int | None = None


def claim_process() -> None:
    """Record that this process uses icechunk; fail fast in a child forked after such use.

    Module state is inherited by a ``fork`` child and fresh in a ``spawn``/``forkserver`` one,
    so a recorded pid that is not ours means we were forked from a process that had already
    started icechunk's runtime: any icechunk call here would hang.
    """
    global _USED_IN_PID
    pid = os.getpid()
    if _USED_IN_PID is None:
        _USED_IN_PID = pid
    elif pid != _USED_IN_PID:
        raise ForkStartMethodError(
            f"This process (pid {pid}) was started with the 'fork' method from a process "
            f"(pid {_USED_IN_PID}) that had already used icechunk; icechunk would hang here. "
            "Start workers with 'spawn' or 'forkserver' instead, for example "
            "ProcessPoolExecutor(mp_context=multiprocessing.get_context('forkserver')) "
            "(or get_context('spawn')); with joblib use the default 'loky' backend."
        )


@dataclass(frozen=True, slots=True)
class Changes:
    """The chunks and node metadata a fork changed (paths are absolute, like ``/temp``)."""

    chunks: dict[str, list[ChunkCoords]]
    nodes: frozenset[str]
    new_nodes: frozenset[str]
    deleted: frozenset[str] = frozenset()  # deleted (or deleted and re-created) nodes

    @staticmethod
    def of(session: Session) -> Changes:
        """What ``session`` changed since its base (one ``status()`` call)."""
        diff = session.status()
        new = diff.new_arrays | diff.new_groups
        nodes = new | diff.updated_arrays | diff.updated_groups
        deleted = diff.deleted_arrays | diff.deleted_groups
        nodes |= deleted
        chunks = {path: [tuple(c) for c in coords] for path, coords in diff.updated_chunks.items()}
        return Changes(
            chunks=chunks,
            nodes=frozenset(nodes),
            new_nodes=frozenset(new),
            deleted=frozenset(deleted),
        )

    def is_empty(self) -> bool:
        """Whether nothing was changed."""
        return not self.chunks and not self.nodes

    def n_chunks(self) -> int:
        """How many chunks were written."""
        return sum(len(c) for c in self.chunks.values())

    def size(self) -> tuple[int, int]:
        """``(chunks, nodes)`` changed: grows when the fork writes something new."""
        return (self.n_chunks(), len(self.nodes))


class Fork:
    """One icechunk fork, alive in this process or still as bytes from a pickle.

    ``seen`` is the version of the session state the fork was made from (None for a raw
    icechunk fork, whose origin the merge infers). A *live* fork is one this process may
    still write through: its changes are recomputed at every merge. A fork that arrived by
    pickle, or that a task sealed, is frozen: its ``uid`` survives pickling, so the same
    result reaching the coordinator twice is merged once, and its changes travel with it.
    """

    __slots__ = ("_blob", "_changes", "_session", "live", "seen", "uid")

    def __init__(
        self,
        *,
        uid: str,
        seen: int | None,
        session: ForkSession | None = None,
        blob: bytes | None = None,
        changes: Changes | None = None,
        live: bool = False,
    ) -> None:
        self.uid = uid
        self.seen = seen
        self._session = session
        self._blob = blob
        self._changes = changes
        self.live = live

    def session(self) -> ForkSession:
        """The icechunk ``ForkSession`` (unpickled on first use)."""
        if self._session is None:
            assert self._blob is not None
            claim_process()
            self._session = pickle.loads(self._blob)
            self._blob = None
        return self._session

    def store(self) -> IcechunkStore:
        """The fork's zarr store."""
        return self.session().store

    def changes(self) -> Changes:
        """What the fork changed (recomputed while it is live)."""
        if self._changes is None or self.live:
            self._changes = Changes.of(self.session())
        return self._changes

    def seal(self) -> Changes:
        """Freeze the fork: its writer is done. Returns what it changed."""
        changes = Changes.of(self.session())
        self._changes, self.live = changes, False
        return changes

    def has_changes(self) -> bool:
        """Whether the fork changed anything."""
        if self._changes is not None and not self.live:
            return not self._changes.is_empty()
        return self.session().has_uncommitted_changes

    def export(self) -> tuple[str, int | None, bytes, Changes]:
        """What a pickle of this fork carries."""
        session = self.session()
        return (self.uid, self.seen, pickle.dumps(session), self.changes())


# ---------------------------------------------------------------------------------------------
# Reading bytes


async def _get(store: IcechunkStore, key: str) -> bytes | None:
    buffer = await store.get(key, prototype=default_buffer_prototype())
    return None if buffer is None else buffer.to_bytes()


def read_key(session: Session, key: str) -> bytes | None:
    """Read one key of a session's store without zarr's I/O loop.

    A blocking icechunk call made on zarr's single I/O thread deadlocks when another thread's
    write to the same session is suspended on that loop (the root of the shared-session hang),
    so reads made while tasks may still write use a private event loop instead.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_get(session.store, key))
    # Called from inside a running loop (a notebook cell): use a thread with its own loop.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _get(session.store, key)).result()


def chunk_key(metadata: dict[str, Any], coords: ChunkCoords) -> str:
    """The store key of a chunk, relative to its array, from the array's ``zarr.json``.

    zarr v3's chunk key encodings ("default" ``c/0/1``, "v2" ``0.1``) as the spec defines
    them: zarr has no public function for it (``tests/test_structure.py`` checks we agree).
    """
    encoding = metadata.get("chunk_key_encoding", {"name": "default"})
    name = encoding.get("name", "default")
    separator = encoding.get("configuration", {}).get("separator")
    if name == "v2":
        separator = separator or "."
        return separator.join(map(str, coords)) if coords else "0"
    separator = separator or "/"
    return separator.join(["c", *map(str, coords)])


def chunk_bytes(session: Session, path: str, coords: ChunkCoords) -> bytes | None:
    """The stored bytes of one chunk of array ``path`` (None: not written)."""
    prefix = path.strip("/")
    raw = read_key(session, f"{prefix}/zarr.json")
    if raw is None:
        return None
    return read_key(session, f"{prefix}/{chunk_key(json.loads(raw), coords)}")


def node_bytes(session: Session, path: str) -> bytes | None:
    """The ``zarr.json`` of one array or group."""
    return read_key(session, f"{path.strip('/')}/zarr.json".lstrip("/"))


async def _virtual_ref(store: IcechunkStore, path: str, coords: ChunkCoords) -> tuple[Any, ...]:
    async for batch in store.array_chunk_iterator(path.strip("/")):
        at, _, locations, offsets, lengths, _ = batch
        for i in range(len(locations)):
            if tuple(int(c) for c in at[i]) == coords:
                return (locations[i], int(offsets[i]), int(lengths[i]))
    return ()


def chunk_content(session: Session, path: str, coords: ChunkCoords) -> Any:
    """What one chunk holds, to compare two writes of it.

    A virtual chunk is its reference ``(location, offset, length)``: two tasks that point the
    same chunk at different places collide even if the bytes there happen to agree, and the
    coordinator need not be allowed to read the source files. Any other chunk is its bytes.
    """
    import icechunk

    if session.chunk_type(path, list(coords)) != icechunk.ChunkType.virtual:
        return chunk_bytes(session, path, coords)
    coro = _virtual_ref(session.store, path, coords)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return ("virtual", *asyncio.run(coro))
    with ThreadPoolExecutor(1) as pool:
        return ("virtual", *pool.submit(asyncio.run, coro).result())
