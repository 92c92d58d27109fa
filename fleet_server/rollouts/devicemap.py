"""An immutable device map whose update costs what changed, not the size of the fleet.

A rollout's state is a frozen value and every engine step returns a new one. Copying a plain dict
of 100,000 devices for each step costs milliseconds; :class:`DeviceMap` shares everything a step
did not touch with the map it came from:

* values live in ``B`` buckets (dicts) chosen by the key's hash; :meth:`DeviceMap.evolve` copies
  the tuple of buckets and only the buckets it changes (``B`` is about the square root of the
  fleet, so one changed device costs a few hundred pointer copies);
* the key order (insertion order, as a dict keeps it) is one append-only list shared by every map
  derived from it; a map knows how many of its entries are its own. Devices are never removed.

Reading is a dict lookup; iteration follows insertion order like a dict.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from itertools import islice
from typing import TypeVar

__all__ = ["DeviceMap"]

V = TypeVar("V")


def _bucket_count(size: int) -> int:
    count = 16
    while count * count < size:
        count *= 2
    return count


class DeviceMap(Mapping[str, V]):
    """An immutable mapping (insertion ordered) with cheap persistent updates (:meth:`evolve`)."""

    __slots__ = ("_buckets", "_len", "_mask", "_order")

    def __init__(self, items: Mapping[str, V] | None = None) -> None:
        source = dict(items or {})
        count = _bucket_count(len(source))
        buckets: list[dict[str, V]] = [{} for _ in range(count)]
        mask = count - 1
        for key, value in source.items():
            buckets[hash(key) & mask][key] = value
        self._buckets: tuple[dict[str, V], ...] = tuple(buckets)
        self._mask = mask
        self._order: list[str] = list(source)
        self._len = len(source)

    @classmethod
    def of(cls, items: Mapping[str, V]) -> DeviceMap[V]:
        """Return ``items`` itself when it is a DeviceMap, else a DeviceMap of it."""
        return items if isinstance(items, DeviceMap) else cls(items)

    def __getitem__(self, key: str) -> V:
        return self._buckets[hash(key) & self._mask][key]

    def get(self, key: str, default: V | None = None) -> V | None:  # type: ignore[override]
        """Return the value of ``key``, or ``default``."""
        return self._buckets[hash(key) & self._mask].get(key, default)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._buckets[hash(key) & self._mask]

    def __iter__(self) -> Iterator[str]:
        return islice(self._order, self._len)

    def __len__(self) -> int:
        return self._len

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DeviceMap) and other._buckets is self._buckets:
            return True
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"DeviceMap({dict(self.items())!r})"

    def evolve(self, changes: Mapping[str, V]) -> DeviceMap[V]:
        """Return a new map with ``changes`` applied (new keys appended in their order); ``self`` is
        unchanged. Costs O(changed buckets x bucket size), not O(size)."""
        if not changes:
            return self
        if 4 * len(self._buckets) ** 2 < self._len + len(changes):  # the fleet outgrew its buckets
            merged = dict(self.items())
            merged.update(changes)
            return DeviceMap(merged)
        buckets = list(self._buckets)
        copied: set[int] = set()
        order, length = self._order, self._len
        fresh = [k for k in changes if k not in self]
        if fresh:
            if len(order) != length:  # another map already appended to the shared order: branch
                order = order[:length]
            order.extend(fresh)
            length += len(fresh)
        for key, value in changes.items():
            b = hash(key) & self._mask
            if b not in copied:
                buckets[b] = dict(buckets[b])
                copied.add(b)
            buckets[b][key] = value
        new: DeviceMap[V] = DeviceMap.__new__(DeviceMap)
        new._buckets, new._mask, new._order, new._len = tuple(buckets), self._mask, order, length
        return new
