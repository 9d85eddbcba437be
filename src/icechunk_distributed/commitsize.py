"""How many chunk references one commit may hold (``max_chunks_per_commit=``), and counting them.

Icechunk warns when one commit holds more than 50 million chunk references and has failed
near 72 million (earth-mover/icechunk#1558, #1568). The plan knows how many chunks each region
holds before anything is written: :func:`must_split` decides whether a write needs several
commits (or refuses it where it cannot have them), :func:`chunk_sizes` gives a run's
:class:`~icechunk_distributed.resume.Checkpointer` the counts it commits by. The commits
themselves are the run machinery's, in :mod:`icechunk_distributed.resume`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

import icechunk

if TYPE_CHECKING:
    from icechunk_distributed.writer import RegionWriter

__all__ = [
    "DEFAULT_MAX_CHUNKS_PER_COMMIT",
    "check_coordinator_chunks",
    "check_max_chunks_per_commit",
    "chunk_sizes",
    "must_split",
]

DEFAULT_MAX_CHUNKS_PER_COMMIT = 10_000_000
"""Chunk references one commit holds at most, by default. Icechunk warns at 50 million
references in one commit and has failed near 72 million (earth-mover/icechunk#1558, #1568); a
fifth of the warning level keeps well clear of both, and such a commit is still quick."""


def check_max_chunks_per_commit(value: object) -> int | None:
    """Check ``max_chunks_per_commit``: an integer >= 1 (numpy integers too), or None.

    Returns
    -------
    int or None
        The limit as a Python ``int``; None for no limit (always one commit).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"max_chunks_per_commit must be an integer (chunk references per commit) or None, "
            f"not {type(value).__name__} ({value!r})"
        )
    if value < 1:
        raise ValueError(f"max_chunks_per_commit must be at least 1, got {value}")
    return int(value)


def must_split(writer: RegionWriter, target: object, limit: int | None, *, commit: bool) -> bool:
    """Whether a write without ``run_id`` must commit in steps (an internal run).

    Only a Repository target committed by this call can: the run needs a work branch, and
    publishes by moving the target branch. Otherwise a plan over ``limit`` is refused here,
    before anything is written.

    Raises
    ------
    ValueError
        The plan holds more than ``limit`` chunk references and the target is a session, or
        ``commit=False``.
    """
    if limit is None or _fits(writer, limit):
        return False
    n = writer.write_plan.n_chunks
    if n <= limit:
        return False
    if isinstance(target, icechunk.Repository) and commit:
        return True
    why = (
        "commit=False leaves the one commit to you"
        if not commit
        else "a session target is committed in one commit"
    )
    raise ValueError(
        f"this write holds {n:,} chunk references, more than max_chunks_per_commit={limit:,}, "
        f"and cannot be committed in steps ({why}). Pass the Repository itself as target, with "
        "commit=True (the default): the write then commits in steps on a work branch and "
        "publishes once. Or raise max_chunks_per_commit (Icechunk warns above 50 million "
        "chunk references per commit). Nothing was written."
    )


def _fits(writer: RegionWriter, limit: int) -> bool:
    """Whether all the chunks of the written extent fit under ``limit``.

    An upper bound of the regions' count (disjoint, chunk-aligned regions hold different
    chunks) in one step per variable: the usual case needs no pass over every region.
    """
    return writer.write_plan.chunks_in({}) <= limit


def chunk_sizes(
    writer: RegionWriter, todo: Sequence[int], limit: int | None
) -> dict[int, int] | None:
    """The chunk count of each region in ``todo`` (the plan's: what its task writes at most).

    None when they fit in one commit: no need to count. Refuses a region over the limit by
    itself: its task's result is merged whole, so no commit could hold it.
    """
    if limit is None or _fits(writer, limit):
        return None
    plan = writer.write_plan
    sizes = {i: plan.chunks_in(plan.regions[i]) for i in todo}
    if sum(sizes.values()) <= limit:
        return None
    biggest = max(todo, key=sizes.__getitem__)
    if sizes[biggest] > limit:
        raise ValueError(
            f"region {biggest} holds {sizes[biggest]:,} chunk references, more than "
            f"max_chunks_per_commit={limit:,}; one task's writes go into one commit whole. "
            "Lower task_size (or use smaller regions=), or raise max_chunks_per_commit. "
            "Nothing was written."
        )
    return sizes


def check_coordinator_chunks(writer: RegionWriter, limit: int | None) -> None:
    """Refuse a run's metadata commit over the limit (coordinates, untasked variables)."""
    if limit is None:
        return
    n = sum(len(c) for c in writer.session.status().updated_chunks.values())
    if n > limit:
        raise ValueError(
            f"the coordinator's own writes (coordinates, and variables lacking one of the "
            f"region dimensions) hold {n:,} chunk references, more than max_chunks_per_commit="
            f"{limit:,}, and go into one commit. Give region_dims= that every large variable "
            "has, so that tasks write them, or raise max_chunks_per_commit. Nothing was "
            "published."
        )
