"""The coordinator's book-keeping for one writable base session.

Every writable icechunk session that is shipped or merged into has one :class:`Coordinator`,
found with :func:`coordinator_of` (the only registry: a ``DistributedSession`` and the plain
session it wraps share it). It holds the *seed* (the fork every task of a block starts from),
the overlap ledger and version of the merges (:mod:`icechunk_distributed.merge`), the
per-thread forks of a ``DistributedSession``, and whether pickling is allowed. The user-facing
wrappers are in :mod:`icechunk_distributed.session`.
"""

from __future__ import annotations

import pickle
import threading
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import icechunk
from icechunk import ForkSession, Session

from icechunk_distributed.errors import (
    PicklingNotAllowedError,
    SessionStateError,
    UnshareableStorageError,
)
from icechunk_distributed.forks import Changes, Fork, claim_process, read_key
from icechunk_distributed.merge import Item, Ledger, Lineage, Target, merge_forks

if TYPE_CHECKING:
    from icechunk import IcechunkStore

__all__ = ["PICKLING_FIX", "Coordinator", "Seed", "ThreadFork", "coordinator_of"]

PICKLING_FIX = (
    "Ship it inside an allow_pickling() block and merge what the tasks return:\n\n"
    "    with session.allow_pickling():\n"
    "        futures = [executor.submit(task, session=session) for ...]\n"
    "    session = merge_sessions(session, *[f.result() for f in futures])\n"
    "    session.commit(...)\n"
)

# ---------------------------------------------------------------------------------------------
# The seed: the fork every task of one block starts from.


class Seed:
    """A fork of the base, made once per block, from which every task's fork is made.

    A task's fork is a fork of it (no pickle round trip per task). In the process that made
    it, the seed is the fork itself, so in-memory storage keeps working; elsewhere it arrives
    as bytes and is unpickled once per process.
    """

    __slots__ = ("_blob", "_session", "lineage")

    def __init__(
        self, lineage: Lineage, *, session: ForkSession | None = None, blob: bytes | None = None
    ) -> None:
        self.lineage = lineage
        self._session = session
        self._blob = blob

    def session(self) -> ForkSession:
        """The seed fork (unpickled once per process, elsewhere than where it was made)."""
        if self._session is None:
            claim_process()
            self._session = pickle.loads(self.blob())
        return self._session

    def blob(self) -> bytes:
        """The seed pickled, as tasks in other processes receive it (pickled once)."""
        if self._blob is None:
            assert self._session is not None
            self._blob = pickle.dumps(self._session)
        return self._blob

    def new_fork(self) -> Fork:
        """A new live fork of the base as it was when the seed was made."""
        session = self.session().fork()  # a fork of a clean fork writes nothing
        return Fork(uid=uuid.uuid4().hex, seen=self.lineage.version, session=session, live=True)


@dataclass(slots=True)
class ThreadFork:
    """A ``DistributedSession`` thread's fork, the lineage it was made at, and its thread."""

    fork: Fork
    lineage: Lineage
    thread: threading.Thread


class Coordinator:
    """Book-keeping for one writable base session (ours or a plain icechunk one)."""

    def __init__(self, session: Session) -> None:
        self.token = uuid.uuid4().hex
        self.generation = 0
        self._session_ref = weakref.ref(session)
        self.lock = threading.RLock()
        self._seed: Seed | None = None
        self._shareable: bool | None = None
        self.window_open = False
        # The snapshot of the open allow_pickling() block (what pickling the session ships)
        # and how to make it fork the new base after a checkpoint.
        self.current: Any = None
        self.current_reset: Callable[[], None] | None = None
        self.ledger = Ledger()
        self.checkpoints: set[str] = set()  # snapshot ids left by checkpoints, this generation
        # DistributedSession's per-thread forks, the retired ones (for the commit-time check
        # that nothing was written through them since) and the forks merged while an older
        # thread fork is live (merged again after it, so that later writes stay last).
        self.thread_forks: dict[int, ThreadFork] = {}
        self.retired: list[tuple[Fork, tuple[int, int]]] = []
        self.history: list[Fork] = []
        self.storage: str | None = None  # the repository's storage, when known

    def base(self) -> Session:
        """The base session (the one checkpoints continue, after a checkpoint)."""
        session = self._session_ref()
        if session is None:  # pragma: no cover - the snapshot keeps its base alive
            raise SessionStateError("the session this snapshot was made from no longer exists")
        return session

    def base_or_none(self) -> Session | None:
        """The base session, or None once it is gone."""
        return self._session_ref()

    def lineage(self) -> Lineage:
        """Where forks made now come from: this session, its branch, snapshot and version."""
        base = self.base()
        return Lineage(
            self.token, self.generation, base.branch, base.snapshot_id, self.ledger.version
        )

    def seed(self) -> Seed:
        """A fork of the base as it is now; made again only after the base changed."""
        with self.lock:
            self.absorb_threads()  # the new seed must see what threads wrote
            base = self.base()
            lineage = self.lineage()
            if self._seed is None or self._seed.lineage != lineage:
                if base.read_only:
                    raise SessionStateError(
                        "the session is read-only (was it committed?); open a new writable "
                        "session with writable_session(repo, branch) to write more"
                    )
                claim_process()
                # Forking a dirty session writes an anonymous snapshot: once per state.
                self._seed = Seed(lineage, session=base.fork())
            return self._seed

    def touched(self) -> None:
        """The base may be written through directly: forks made from now on must see it."""
        with self.lock:
            self.ledger.version += 1

    def check_shareable(self) -> None:
        """Refuse storage that a pickled copy cannot reach (in-memory storage), once."""
        with self.lock:
            if self._shareable is None and self.storage is not None:
                self._shareable = "in-memory" not in self.storage
            if self._shareable is None:
                # Without the repository: a copy that cannot read what the base reads.
                seed = self.seed()
                copy: ForkSession = pickle.loads(seed.blob())
                try:
                    read_key(copy, "zarr.json")
                    self._shareable = True
                except icechunk.IcechunkError:
                    read_key(seed.session(), "zarr.json")  # a real storage error raises here
                    self._shareable = False
            if not self._shareable:
                raise UnshareableStorageError(
                    "This session's repository is in memory (icechunk.in_memory_storage()): "
                    "a copy shipped to another process opens a new, empty store, so the "
                    "tasks there could not read it and their writes would be lost. Use it "
                    "with executor='serial' or 'threads' (or a ThreadPoolExecutor), or put "
                    "the repository on storage every worker can reach: "
                    "icechunk.local_filesystem_storage(path) on one machine, object storage "
                    "(s3_storage, gcs_storage, ...) for a cluster."
                )

    def check_window(self, lineage: Lineage | None) -> None:
        """Refuse to pickle outside an open ``allow_pickling()`` block or for a stale base."""
        base = self.base()
        if not self.window_open:
            raise PicklingNotAllowedError(
                "Refusing to pickle a writable icechunk session: it never entered "
                "allow_pickling(), or the session was committed or discarded its changes "
                "since. " + PICKLING_FIX
            )
        if base.read_only or (
            lineage is not None and not lineage.same_base(self.lineage(), self.checkpoints)
        ):
            self.window_open = False
            raise PicklingNotAllowedError(
                "Refusing to pickle a snapshot of a session that has committed, discarded its "
                "changes or been rebased since the snapshot was made: its tasks would write "
                "against an outdated base. Open a new allow_pickling() block. " + PICKLING_FIX
            )
        self.check_shareable()

    def rebind(self, session: Session, left: str) -> None:
        """A checkpoint committed the base (at ``left``); ``session`` continues it."""
        with self.lock:
            self.checkpoints.add(left)
            self._session_ref = weakref.ref(session)
            self._seed = None
            for ident in list(self.thread_forks):  # merged by the checkpoint; watched after
                self.retire(ident)
            self.history = []
            _register(session, self)

    def after_rebind(self) -> None:
        """After :meth:`rebind`, outside the lock: tasks built from now on fork the new base.

        (Outside, because the snapshot takes its own lock, and takes this one inside it.)
        """
        reset = self.current_reset
        if reset is not None:
            reset()

    def next_generation(self) -> None:
        """The base committed or discarded: every earlier snapshot is now stale."""
        with self.lock:
            self.generation += 1
            self._seed = None
            self.window_open = False
            self.current = self.current_reset = None
            self.ledger = Ledger(version=self.ledger.version + 1)
            self.thread_forks = {}
            self.retired = []
            self.history = []
            self.checkpoints = set()

    # -- merges into the base
    def target(self) -> Target:
        """The base as :func:`~icechunk_distributed.merge.merge_forks` merges into it."""
        checkpoints = frozenset(self.checkpoints)
        return Target(
            self.base(), self.lineage(), self.ledger, "the session", checkpoints, self.storage
        )

    def merge(self, items: list[Item]) -> list[Fork]:
        """Merge into the base; forks merged while an older thread fork lives are kept."""
        with self.lock:
            merged = merge_forks(self.target(), items, replay=self.history)
            oldest = min((t.fork.seen or 0 for t in self.thread_forks.values()), default=None)
            if oldest is None:
                self.history = []
            else:
                seen = self.ledger.seen_of
                ours = {t.fork.uid for t in self.thread_forks.values()}
                kept = [f for f in self.history if seen(f) > oldest]
                kept += [f for f in merged if f.uid not in ours and seen(f) > oldest]
                self.history = kept
            return merged

    def absorb_threads(self) -> None:
        """Merge what every thread fork wrote (they stay live: a thread may write on)."""
        with self.lock:
            items: list[Item] = [
                (t.fork, t.lineage, "a thread's fork") for t in self.thread_forks.values()
            ]
            if items:
                self.merge(items)
            for ident, record in list(self.thread_forks.items()):
                if not record.thread.is_alive():  # it will not write again
                    self.retire(ident)

    def retire(self, ident: int) -> None:
        """This thread's fork is done (the thread is back for a new store, or has ended)."""
        record = self.thread_forks.pop(ident)
        self.ledger.own.pop(record.fork.uid, None)  # never merged again, never re-checked
        # Even a fork that wrote nothing is watched: a store kept from it may still write.
        changes = record.fork.seal()
        self.retired.append((record.fork, changes.size()))
        if not changes.is_empty():
            self.history.append(record.fork)

    def thread_store(self) -> IcechunkStore:
        """This thread's store: a fork that sees every write merged so far."""
        ident = threading.get_ident()
        me = threading.current_thread()
        with self.lock:
            # Everything written by any thread so far is merged, so this thread's new fork
            # sees it. The caller's own earlier writes are finished (it is here), as are
            # those of ended threads: their forks retire. (A new thread may reuse the ident
            # of an ended one, hence the comparison of thread objects.)
            self.absorb_threads()
            for i, other in list(self.thread_forks.items()):
                done = (
                    other.fork.has_changes() if other.thread is me else not other.thread.is_alive()
                )
                if done:
                    self.retire(i)
            mine = self.thread_forks.get(ident)
            if mine is not None and (mine.fork.seen or 0) < self.ledger.version:
                self.retire(ident)  # it wrote nothing, but others did since it was made
                mine = None
            if mine is None:
                seed = self.seed()
                mine = ThreadFork(seed.new_fork(), seed.lineage, me)
                self.thread_forks[ident] = mine
            return mine.fork.store()

    def check_retired(self) -> None:
        """Refuse to commit if a thread wrote through a store its fork no longer backs."""
        with self.lock:
            retired = list(self.retired)
        for fork, size in retired:
            now = Changes.of(fork.session()).size()
            if now != size:
                raise SessionStateError(
                    "A thread wrote through a DistributedSession store it had taken before "
                    f"it took session.store again ({now[0] - size[0]} more chunk(s), "
                    f"{now[1] - size[1]} more array(s) or group(s)); those writes would be "
                    "lost. Take session.store inside each task, once per task, and do not "
                    "keep a store from one task to the next."
                )


_REGISTRY: dict[int, Coordinator] = {}
# Re-entrant: a garbage collection while the registry is locked may finalize a session and
# call _forget on the same thread.
_REGISTRY_LOCK = threading.RLock()


def coordinator_of(session: Session) -> Coordinator:
    """The coordinator of a writable session, kept as long as the session lives.

    Parameters
    ----------
    session : icechunk.Session
        A writable session (plain, or the one a ``DistributedSession`` wraps).

    Returns
    -------
    Coordinator
        The same object for the same live session.
    """
    with _REGISTRY_LOCK:
        coord = _REGISTRY.get(id(session))
        if coord is None or coord.base_or_none() is not session:  # ids are reused
            coord = Coordinator(session)
            _file(session, coord)
        return coord


def _register(session: Session, coord: Coordinator) -> None:
    """File ``coord`` under the session a checkpoint opened to continue its base."""
    with _REGISTRY_LOCK:
        _file(session, coord)


def _file(session: Session, coord: Coordinator) -> None:
    """With the registry lock held."""
    key = id(session)
    _REGISTRY[key] = coord
    weakref.finalize(session, _forget, key, coord)


def _forget(key: int, coord: Coordinator) -> None:
    with _REGISTRY_LOCK:
        if _REGISTRY.get(key) is coord:  # not a newer session that reuses the id
            del _REGISTRY[key]
