"""Read-only sequences that stand in for lists: they compare and concatenate like one.

The plan's regions (:class:`~icechunk_distributed.planning.TiledRegions`) and a run's task
records (:class:`~icechunk_distributed.results.TaskRecords`) were lists; kept compact now,
they still behave like the lists callers had: equal to a list with the same items, and
``+`` gives a list.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["ListLike"]


class ListLike[T](Sequence[T]):
    """A read-only sequence that compares and concatenates like a list."""

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list | ListLike):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are unhashable

    def __add__(self, other: Iterable[T]) -> list[T]:
        return [*self, *other]

    def __radd__(self, other: Iterable[T]) -> list[T]:
        return [*other, *self]
