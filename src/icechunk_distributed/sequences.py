"""Read-only sequences that stand in for lists: they compare and concatenate like one.

The plan's regions (:class:`~icechunk_distributed.planning.TiledRegions`) and a run's task
records (:class:`~icechunk_distributed.results.TaskRecords`) were lists; kept compact now,
they still behave like the lists callers had: indexable from the end and by slices, equal to
a list with the same items, and ``+`` gives a list.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import overload

__all__ = ["ListLike"]


class ListLike[T](Sequence[T]):
    """A read-only sequence that indexes, compares and concatenates like a list.

    Subclasses give ``__len__`` and ``_item(k)`` for ``0 <= k < len(self)``.
    """

    def _item(self, k: int) -> T:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> list[T]: ...
    def __getitem__(self, i: int | slice) -> T | list[T]:
        n = len(self)
        if isinstance(i, slice):
            return [self._item(k) for k in range(*i.indices(n))]
        k = i + n if i < 0 else i
        if not 0 <= k < n:
            raise IndexError(f"index {i} out of range for {n} items")
        return self._item(k)

    def __iter__(self) -> Iterator[T]:
        for k in range(len(self)):
            yield self._item(k)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list | ListLike):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are unhashable

    def __add__(self, other: Iterable[T]) -> list[T]:
        return [*self, *other]

    def __radd__(self, other: Iterable[T]) -> list[T]:
        return [*other, *self]
