"""What comes back from the tasks: lineage and overlap checks, then one icechunk merge.

The overlap rule. Every merge into a target advances the target's *version*; every fork
knows the version it was forked from (``Fork.seen``). A chunk (or node) that a fork writes
and an earlier merge also wrote is

* an ordered, deliberate write when the fork was made after that merge (it could see the
  earlier bytes): the later write wins, as in icechunk;
* a collision otherwise (the two writers could not see each other, like two tasks of one
  ``allow_pickling()`` block): different bytes raise :class:`OverlappingWritesError`,
  identical bytes are accepted.

Forks merged in one call never saw each other, so any chunk two of them wrote is compared.
Forks are merged oldest first, so a later write always lands last.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import icechunk
import numpy as np

from icechunk_distributed.errors import ForeignSessionError, OverlappingWritesError
from icechunk_distributed.forks import ChunkCoords, Fork, chunk_bytes, chunk_content, node_bytes
from icechunk_distributed.owners import NOBODY, ChunkOwners, coords_array

if TYPE_CHECKING:
    from collections.abc import Collection

    from icechunk import Session

    from icechunk_distributed.forks import Changes

__all__ = ["Item", "Ledger", "Lineage", "Target", "merge_forks"]

Key = tuple[str, ChunkCoords]
# A chunk ("c", path, coords) or an array's or group's metadata ("n", path, ()).
Write = tuple[str, str, ChunkCoords]


@dataclass(frozen=True, slots=True)
class Lineage:
    """The base session a snapshot was made from, and that base's state then."""

    token: str
    generation: int
    branch: str | None
    base_snapshot_id: str
    version: int = 0

    def describe(self) -> str:
        """``branch 'main' at snapshot ...``."""
        return f"branch {self.branch!r} at snapshot {self.base_snapshot_id}"

    def same_base(self, other: Lineage, checkpoints: Collection[str] = ()) -> bool:
        """Same base session, with no commit, discard or rebase in between.

        ``checkpoints``: the base's earlier snapshot ids that it left by a checkpoint (a
        resumable run's), which keeps forks made before it valid. Any other change of
        snapshot id (a rebase of a plain session, say) makes them stale. The version does
        not matter here: merges into the base keep its forks valid.
        """
        return (
            self.token == other.token
            and self.generation == other.generation
            and (
                self.base_snapshot_id == other.base_snapshot_id
                or self.base_snapshot_id in checkpoints
            )
        )


@dataclass
class Ledger:
    """What has been merged into one target, for the overlap rule across merge calls."""

    version: int = 0
    # path -> who last wrote each chunk (a fork number, see `number`), and the version its
    # write was merged at; compact arrays (owners.py)
    chunks: dict[str, ChunkOwners] = field(default_factory=dict)
    numbers: dict[str, int] = field(default_factory=dict)  # fork uid -> fork number
    nodes: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (fork, version)
    merged: set[str] = field(default_factory=set)  # uids of frozen forks already merged
    # live forks: the keys each has merged before (a re-merge does not re-check them)
    own: dict[str, set[Write]] = field(default_factory=dict)
    # a raw icechunk fork's base snapshot id -> the version when it was first seen
    raw_seen: dict[str, int] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def number(self, uid: str) -> int:
        """The fork's number in :attr:`chunks` (given on first use)."""
        n = self.numbers.get(uid)
        if n is None:
            n = self.numbers[uid] = len(self.numbers)
        return n

    def seen_of(self, fork: Fork) -> int:
        """The version ``fork`` was made from; for a raw fork, looked up by its base."""
        if fork.seen is not None:
            return fork.seen
        # A raw fork carries no version: DistributedSession.fork() records the version of
        # the snapshot id it forked from. A fork of unknown origin (a plain session's
        # fork()) counts as made before every merge, so every overlap with it is checked.
        return self.raw_seen.get(fork.session().snapshot_id, -1)


@dataclass
class Target:
    """Where merged forks go, and what may be merged into it."""

    session: Session
    lineage: Lineage | None  # what snapshots must descend from; None: check node ids only
    ledger: Ledger
    describe: str
    checkpoints: frozenset[str] = frozenset()
    storage: str | None = None  # the repository's storage, for error messages


Item = tuple[Fork, Lineage | None, str]


def _check_lineage(target: Target, lineage: Lineage, name: str) -> None:
    assert target.lineage is not None
    if lineage.token != target.lineage.token:
        if lineage.describe() == target.lineage.describe():
            origin = f"another writable session of the same {lineage.describe()}"
        else:
            origin = f"another session ({lineage.describe()})"
        raise ForeignSessionError(
            f"{name} was made from {origin}, not from {target.describe} it is merged into "
            f"({target.lineage.describe()}). Icechunk would merge it silently and its data "
            "could be lost: merge each snapshot into the session whose allow_pickling() block "
            "produced it."
        )
    if not lineage.same_base(target.lineage, target.checkpoints):
        raise ForeignSessionError(
            f"{name} was made before {target.describe} committed, discarded its changes or "
            f"was rebased (then {lineage.describe()}, now {target.lineage.describe()}); its "
            "writes are against an outdated base. Redo that work from a new allow_pickling() "
            "block."
        )


def _check_raw_fork(target: Target, fork: Fork, name: str, changes: Changes) -> None:
    """A raw fork must write to the target's own arrays (same node ids)."""
    # A fork of another repository has other node ids, and icechunk drops its chunks.
    session = fork.session()
    for path in sorted(set(changes.chunks) | (changes.nodes - changes.new_nodes)):
        try:
            theirs = session.get_node_id(path)
        except icechunk.IcechunkError:
            continue  # deleted in the fork; nothing to attach to
        try:
            ours = target.session.get_node_id(path)
        except icechunk.IcechunkError:
            ours = None
        if ours != theirs:
            raise ForeignSessionError(
                f"{name} wrote to {path!r}, which is "
                + ("missing from" if ours is None else "a different array in")
                + f" {target.describe} it is merged into: the fork comes from another "
                "repository, branch or history. Icechunk would merge it silently and lose "
                "its data. Merge forks only into the session they were forked from."
            )


def _check_raw_objects(target: Target, raw: list[tuple[Fork, str, Changes]]) -> None:
    """Every raw fork's chunks must be objects of the target's repository.

    A byte-for-byte copy of a repository keeps its node ids, so only the objects tell it
    apart: merge the raw forks into a scratch fork of the target and read through it one chunk
    of each that the fork stored as an object (one read per raw fork). A fork whose chunks are
    all inlined in its manifest is skipped, rightly: their bytes travel with the fork.
    """
    probes = [(f, n, chunk) for f, n, c in raw if (chunk := _stored_chunk(f, c)) is not None]
    if not probes:
        return
    scratch = target.session.fork()
    scratch.merge(*(f.session() for f, _, _ in probes))
    for _, name, (path, coords) in probes:
        try:
            chunk_bytes(scratch, path, coords)
        except icechunk.IcechunkError as exc:
            where = f" (storage: {target.storage})" if target.storage else ""
            raise ForeignSessionError(
                f"{name} wrote chunk {list(coords)} of {path!r} to another repository: the "
                f"object is missing from the repository of {target.describe}{where} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0]}). The fork comes from a "
                "copy of the repository (copies keep the same array ids, so icechunk cannot "
                "tell them apart) or from another repository; merging it would commit a "
                "snapshot that cannot be read. Merge forks only into the repository they "
                "were made from."
            ) from None


def _stored_chunk(fork: Fork, changes: Changes) -> Key | None:
    """One chunk the fork stored as an object of its repository (None: all inlined)."""
    session = fork.session()
    for path, coords in changes.chunks.items():
        for c in coords:
            if session.chunk_type(path, list(c)) == icechunk.ChunkType.native:
                return (path, c)
    return None


def _describe_overlaps(conflicts: list[Key], described: list[str]) -> OverlappingWritesError:
    more = f"\n  ... and {len(conflicts) - len(described)} more" if len(conflicts) > 10 else ""
    return OverlappingWritesError(
        f"{len(conflicts)} chunk(s) were written with different bytes (or references to "
        "different places in source files) by two sessions that "
        "could not see each other's writes (tasks of one fan-out); icechunk would silently "
        "keep whichever is merged last. Nothing was merged.\n"
        + "\n".join(described)
        + more
        + "\nMake each task write whole chunks of its own region only (regions aligned to the "
        "chunk grid, no two tasks writing the same chunk).",
        conflicts,
    )


def merge_forks(target: Target, items: list[Item], *, replay: Collection[Fork] = ()) -> list[Fork]:
    """Validate every fork, then merge them all, or raise having merged nothing.

    ``replay``: forks merged before that must land again, in age order, because an older live
    fork is merged again with them (see :class:`~icechunk_distributed.session.DistributedSession`);
    they are not checked again. Returns the forks merged (oldest first).
    """
    ledger = target.ledger
    with ledger.lock:
        todo: list[Item] = []
        uids: set[str] = set()
        for item in items:
            fork = item[0]
            if fork.uid in uids or (not fork.live and fork.uid in ledger.merged):
                continue
            if not fork.has_changes():
                continue
            uids.add(fork.uid)
            todo.append(item)
        if not todo:
            return []
        # A live fork may change under us: take its changes once, for checking and book-keeping.
        changes_of = {fork.uid: fork.changes() for fork, _, _ in todo}
        raw: list[tuple[Fork, str, Changes]] = []
        for fork, lineage, name in todo:
            if lineage is not None and target.lineage is not None:
                _check_lineage(target, lineage, name)
            else:
                _check_raw_fork(target, fork, name, changes_of[fork.uid])
                if fork.seen is None:
                    raw.append((fork, name, changes_of[fork.uid]))
        _check_raw_objects(target, raw)
        _check_deletions(todo, changes_of)
        seen_of = {fork.uid: ledger.seen_of(fork) for fork, _, _ in todo}
        written = _gather(ledger, todo, changes_of)
        # Each item's fork number, made once for the suspect search and the owner records.
        numbers = np.asarray([ledger.number(f.uid) for f, _, _ in todo], dtype=np.int32)
        _check_overlaps(target, todo, changes_of, seen_of, written, numbers)

        forks = [fork for fork, _, _ in todo]
        if len(set(seen_of.values())) > 1:
            forks.sort(key=lambda f: seen_of[f.uid])
        again = [f for f in replay if f.uid not in uids]
        # Older first, so that a later write always lands last.
        order = sorted([*forks, *again], key=ledger.seen_of) if again else forks
        target.session.merge(*(f.session() for f in order))
        if any(not f.live or _is_new(ledger, f, changes_of[f.uid]) for f in forks):
            ledger.version += 1
        version = ledger.version
        _record_chunks(ledger, todo, forks, written, numbers, version)
        for fork in forks:
            _record(ledger, fork, changes_of[fork.uid], version)
        return forks


def _check_deletions(todo: list[Item], changes_of: dict[str, Changes]) -> None:
    """Refuse a call where one fork deleted (or re-created) a node another one wrote to.

    Icechunk refuses such a pair too, but only after merging the forks before it: checked
    here, nothing is merged.
    """
    deleted = [(item, p) for item in todo for p in changes_of[item[0].uid].deleted]
    if not deleted or len(todo) < 2:
        return
    for (fork, _, name), path in deleted:
        for other, _, other_name in todo:
            if other is fork:
                continue
            theirs = changes_of[other.uid]
            # Deleting the same node twice is no conflict (icechunk merges it).
            touched = set(theirs.chunks) | (theirs.nodes - (theirs.deleted - theirs.new_nodes))
            if any(t == path or t.startswith(path.rstrip("/") + "/") for t in touched):
                raise OverlappingWritesError(
                    f"{name} deleted or re-created {path!r}, which {other_name} wrote to or "
                    "changed; "
                    "the two could not see each other's writes (tasks of one fan-out), and "
                    "icechunk cannot merge both. Nothing was merged. Create or re-create "
                    "arrays before the fan-out (in the template), not inside tasks.",
                    [(path, ())],
                )


def _is_new(ledger: Ledger, fork: Fork, changes: Changes) -> bool:
    own = ledger.own.get(fork.uid)
    if own is None:
        return True
    return any(("c", p, c) not in own for p, cs in changes.chunks.items() for c in cs) or any(
        ("n", p, ()) not in own for p in changes.nodes
    )


@dataclass(frozen=True, slots=True)
class _Written:
    """One array's chunks written by a merge call's forks, as one block of coordinates.

    A live fork's chunks merged before are left out.
    """

    path: str
    rows: np.ndarray  # (n, ndim) chunk coordinates
    item_of: np.ndarray  # (n,) the writer: an index into the call's items
    repeated: np.ndarray | None  # (n,) written by two forks of the call; None: one fork wrote

    def of_item(self, n: int) -> np.ndarray:
        """The rows item ``n`` wrote."""
        rows: np.ndarray = self.rows[self.item_of == n]
        return rows


def _gather(ledger: Ledger, todo: list[Item], changes_of: dict[str, Changes]) -> list[_Written]:
    """Every chunk the call's forks wrote, one block per array (and dimensionality).

    Built once per merge call, then used both to find suspects and to record the owners: a
    merge costs a few array operations per array, not per fork.
    """
    parts: dict[tuple[str, int], tuple[list[ChunkCoords], list[int], list[int]]] = {}
    for n, (fork, _, _) in enumerate(todo):
        own = ledger.own.get(fork.uid) if fork.live else None
        for path, coords in changes_of[fork.uid].chunks.items():
            if own:
                coords = [c for c in coords if ("c", path, c) not in own]
            if coords:
                # Keyed by dimensionality too: an array re-created at the same path with
                # other dims between two forks' making gives two blocks.
                block = parts.setdefault((path, len(coords[0])), ([], [], []))
                block[0].extend(coords)
                block[1].append(n)
                block[2].append(len(coords))
    out = []
    for (path, ndim), (coords, items, counts) in parts.items():
        rows = coords_array(coords, ndim)
        item_of = np.repeat(np.asarray(items, dtype=np.int64), counts)
        out.append(_Written(path, rows, item_of, _repeated(rows) if len(items) > 1 else None))
    return out


def _repeated(rows: np.ndarray) -> np.ndarray:
    """For each row of coordinates, whether it occurs more than once in ``rows``."""
    if rows.shape[1] == 0:
        return np.ones(len(rows), dtype=bool)
    high = rows.max(axis=0) + 1
    if float(np.prod(high, dtype=np.float64)) < 2**62:
        # One integer per chunk: a 1-d unique, much cheaper than a unique over rows.
        keys = np.ravel_multi_index(tuple(rows.T), tuple(high.tolist()))
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    else:  # pragma: no cover - a grid of more than 2**62 chunks
        _, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    repeated: np.ndarray = counts[inverse.reshape(-1)] > 1
    return repeated


def _record_chunks(
    ledger: Ledger,
    todo: list[Item],
    order: list[Fork],
    written: list[_Written],
    numbers: np.ndarray,
    version: int,
) -> None:
    """Record who wrote each chunk merged (forks in merge ``order``: the last writer wins).

    ``numbers``: each item's fork number.
    """
    rank = {f.uid: k for k, f in enumerate(order)}
    for block in written:
        owners = ledger.chunks.setdefault(block.path, ChunkOwners())
        if block.repeated is None or not block.repeated.any():
            owners.record(block.rows, numbers[block.item_of], version)
            continue
        # Two forks wrote one chunk (with the same bytes, or the merge was refused): one
        # fork after the other, so that the later one is the owner.
        for n in sorted(set(block.item_of.tolist()), key=lambda n: rank[todo[n][0].uid]):
            owners.record(block.of_item(n), int(numbers[n]), version)


def _record(ledger: Ledger, fork: Fork, changes: Changes, version: int) -> None:
    """Record the fork's nodes, and what identifies it in later merges.

    Its chunks are recorded by :func:`_record_chunks`.
    """
    number = ledger.number(fork.uid)
    if not fork.live:
        for path in changes.nodes:
            ledger.nodes[path] = (number, version)
        if fork.seen is not None:  # a raw fork has no identity across calls
            ledger.merged.add(fork.uid)
        return
    own = ledger.own.setdefault(fork.uid, set())
    for path, coords in changes.chunks.items():
        own.update(("c", path, c) for c in coords)
    for path in changes.nodes:
        w = ("n", path, ())
        if w not in own:
            ledger.nodes[path] = (number, version)
            own.add(w)


def _stored(session: Session, write: Write) -> object:
    kind, path, c = write
    return chunk_content(session, path, c) if kind == "c" else node_bytes(session, path)


def _as_ref(content: object) -> str:
    """`` (reference file@offset+length)`` for a virtual chunk's content, else nothing."""
    if isinstance(content, tuple) and content[:1] == ("virtual",):
        location, offset, length = content[1:]
        return f" (reference {location}@{offset}+{length})"
    return ""


def _check_overlaps(
    target: Target,
    todo: list[Item],
    changes_of: dict[str, Changes],
    seen_of: dict[str, int],
    written: list[_Written],
    numbers: np.ndarray,
) -> None:
    """Raise :class:`OverlappingWritesError` for writes that collide (see the module notes)."""
    ledger = target.ledger
    nobody: set[Write] = set()
    conflicts: list[Key] = []
    described: list[str] = []

    def conflict(write: Write, name: str, other: str, mine: object, theirs: object) -> None:
        kind, path, c = write
        conflicts.append((path, c))
        if len(described) < 10:
            what = f"chunk {list(c)}" if kind == "c" else "metadata"
            described.append(f"  {path} {what}: {name}{_as_ref(mine)} and {other}{_as_ref(theirs)}")

    # The first writer of each chunk and node in this call, by kind ("c" or "n"): keyed by
    # (path, coords), so that the common case (one writer) builds no Write tuple.
    first: dict[str, dict[Key, Item]] = {"c": {}, "n": {}}

    def check(
        kind: str, path: str, c: ChunkCoords, owner: tuple[int, int] | None, item: Item
    ) -> None:
        fork, _, name = item
        if (
            owner is not None
            and owner[0] != ledger.number(fork.uid)
            and seen_of[fork.uid] < owner[1]
        ):
            # An earlier merge this fork could not see wrote it too.
            write = (kind, path, c)
            mine, theirs = _stored(fork.session(), write), _stored(target.session, write)
            if mine != theirs:
                conflict(write, name, f"an earlier merge into {target.describe}", mine, theirs)
                return
        other_item = first[kind].setdefault((path, c), item)
        if other_item is item:
            return
        write = (kind, path, c)
        other, _, other_name = other_item
        if write in ledger.own.get(other.uid, nobody):
            return  # the other's write was merged before: checked against the ledger
        mine, theirs = _stored(fork.session(), write), _stored(other.session(), write)
        if mine != theirs:
            conflict(write, name, other_name, mine, theirs)

    for path, k, item in _suspects(ledger, todo, seen_of, written, numbers):
        owners = ledger.chunks.get(path)
        check("c", path, k, owners.get(k) if owners else None, item)
    for item in todo:
        own = ledger.own.get(item[0].uid, nobody)
        for path in changes_of[item[0].uid].nodes:
            if ("n", path, ()) not in own:
                check("n", path, (), ledger.nodes.get(path), item)
    if conflicts:
        raise _describe_overlaps(conflicts, described)


def _suspects(
    ledger: Ledger,
    todo: list[Item],
    seen_of: dict[str, int],
    written: list[_Written],
    numbers: np.ndarray,
) -> list[tuple[str, ChunkCoords, Item]]:
    """The chunks that need a closer look, in merge order.

    Those an earlier merge wrote that the fork could not see, and those two forks of this
    call both wrote: found for all the call's chunks of an array at once (numpy), so that a
    merge costs a few array operations rather than a dict lookup per chunk. A live fork's
    chunks merged before are its own: not looked at again (:func:`_gather` left them out).
    ``numbers``: each item's fork number.
    """
    seen = np.asarray([seen_of[f.uid] for f, _, _ in todo], dtype=np.int64)
    out: list[tuple[int, int, str, ChunkCoords]] = []
    for block in written:
        rows, item_of = block.rows, block.item_of
        suspect = np.zeros(len(rows), dtype=bool)
        owners = ledger.chunks.get(block.path)
        if owners is not None:
            forks, versions = owners.lookup(rows)
            suspect |= (forks != NOBODY) & (forks != numbers[item_of]) & (seen[item_of] < versions)
        if block.repeated is not None:
            suspect |= block.repeated
        for k in np.flatnonzero(suspect).tolist():
            out.append((int(item_of[k]), k, block.path, tuple(rows[k].tolist())))
    out.sort(key=lambda t: (t[0], t[1]))  # item by item, as the forks are merged
    return [(path, c, todo[n]) for n, _, path, c in out]
