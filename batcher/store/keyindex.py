"""Where each request key's latest line lies in the checkpoint, held in numpy.

Keys are split into two ``uint64`` halves and kept sorted beside each line's
offset, length and ``ok`` flag (29 bytes a key), searched with
``searchsorted``, so a million keys cost 29 MB and any input's rows, in any
order, are found without a JSON parse per line.

The index grows with the store, so it is never held twice (a million-row
run's peak memory is ``bench/memory.py``'s): the table found on open is not
copied when a run appends (its new lines are sorted into a second table,
searched first), lines appended one at a time gather in flat arrays rather
than a Python object each, and tables merge a column at a time, giving up
each column of their parts as it is merged.
"""

from __future__ import annotations

from array import array

import numpy as np

from batcher.store.keys import KEY_BYTES, split

# Lines appended one at a time are gathered this many at a time (33 bytes each).
_APPEND_BLOCK = 65536


class KeyIndex:
    """Where each key's latest line is, and whether it was ``ok``.

    Two sorted tables: ``opened``, the lines found on open (what deciding
    what to send sees), and ``recent``, the lines this run appended, sorted
    in only when looked up; a key in both is answered from ``recent``, whose
    lines are later.
    """

    def __init__(self) -> None:
        self._opened = _Table.empty()
        self._recent = _Table.empty()
        self._unsorted: list[_Table] = []  # added since ``recent`` was last sorted
        self._appends = _Appends()

    def size(self) -> int:
        """Lines indexed: a key stored again since the last merge counts twice."""
        return (len(self._opened) + len(self._recent) + len(self._appends)
                + sum(len(table) for table in self._unsorted))

    def add(self, key: bytes, offset: int, length: int, ok: bool) -> None:
        self._appends.add(key, offset, length, ok)
        if len(self._appends) >= _APPEND_BLOCK:
            self._unsorted.append(self._appends.table())
            self._appends = _Appends()

    def add_many(self, keys: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
                 ok: np.ndarray) -> None:
        high, low = split(keys)
        self._unsorted.append(_Table(high, low, offsets.astype(np.int64),
                                     lengths.astype(np.int32), ok.astype(bool)))

    def ok_when_opened(self, keys: np.ndarray) -> np.ndarray:
        """For each key: did the store hold an ``ok`` line for it when opened (or
        at the last :meth:`seal_opened`)?"""
        if not len(self._opened):
            return np.zeros(len(keys), dtype=bool)
        places = self._opened.find(keys)
        ok: np.ndarray = (places >= 0) & self._opened.ok[np.maximum(places, 0)]
        return ok

    def lines(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Offsets and lengths of each key's latest line (length 0: none)."""
        self._sort_recent()
        offsets = np.zeros(len(keys), dtype=np.int64)
        lengths = np.zeros(len(keys), dtype=np.int64)
        missing = np.arange(len(keys))
        for table in (self._recent, self._opened):
            places = table.find(keys[missing])
            hit = places >= 0
            offsets[missing[hit]] = table.offsets[places[hit]]
            lengths[missing[hit]] = table.lengths[places[hit]]
            missing = missing[~hit]
        return offsets, lengths

    def seal_opened(self) -> None:
        """Merge everything added into the table deciding what to send sees."""
        parts = [self._opened, self._recent, *self._unsorted, self._appends.table()]
        self._opened = self._recent = _Table.empty()
        self._unsorted, self._appends = [], _Appends()
        self._opened = _Table.merged(parts)

    def _sort_recent(self) -> None:
        if not self._unsorted and not len(self._appends):
            return
        parts = [self._recent, *self._unsorted, self._appends.table()]
        self._recent = _Table.empty()
        self._unsorted, self._appends = [], _Appends()
        self._recent = _Table.merged(parts)


class _Appends:
    """Lines added one at a time, in flat arrays until there are enough for a table."""

    def __init__(self) -> None:
        self._keys = bytearray()
        self._offsets = array("q")
        self._lengths = array("q")
        self._ok = array("b")

    def __len__(self) -> int:
        return len(self._offsets)

    def add(self, key: bytes, offset: int, length: int, ok: bool) -> None:
        self._keys += key
        self._offsets.append(offset)
        self._lengths.append(length)
        self._ok.append(ok)

    def table(self) -> _Table:
        high, low = split(np.frombuffer(self._keys, dtype=np.uint8).reshape(-1, KEY_BYTES))
        return _Table(high, low, np.array(self._offsets, dtype=np.int64),
                      np.array(self._lengths, dtype=np.int32),
                      np.array(self._ok, dtype=bool))


class _Table:
    """Keys sorted by their two halves, with where their lines are."""

    def __init__(self, high: np.ndarray, low: np.ndarray, offsets: np.ndarray,
                 lengths: np.ndarray, ok: np.ndarray) -> None:
        self.high, self.low, self.offsets, self.lengths, self.ok = high, low, offsets, lengths, ok

    @classmethod
    def empty(cls) -> _Table:
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64),
                   np.zeros(0, np.int32), np.zeros(0, bool))

    @classmethod
    def merged(cls, parts: list[_Table]) -> _Table:
        """One sorted table of ``parts``' keys, each key's latest line (the
        largest offset) kept.

        ``parts`` are emptied column by column as the merge takes them, so
        with no other reference to them a merge needs the table plus about
        two columns (the sort order and a column being reordered), not two
        tables.
        """
        def take(name: str) -> np.ndarray:
            column = np.concatenate([getattr(part, name) for part in parts])
            for part in parts:
                setattr(part, name, np.zeros(0, column.dtype))
            return column

        # The halves of a part share one buffer (``split``): take both before sorting.
        high, low = take("high"), take("low")
        order = np.argsort(high)
        high, low = high[order], low[order]
        offsets = take("offsets")[order]
        lengths = take("lengths")[order]
        ok = take("ok")[order]
        del order
        ties = np.flatnonzero(high[1:] == high[:-1])
        if ties.size:
            # Keys stored more than once (an error, then a retry): order each run of
            # equal first halves by the second half, then by offset, in place.
            runs = np.union1d(ties, ties + 1)
            within = np.lexsort((offsets[runs], low[runs], high[runs]))
            for column in (high, low, offsets, lengths, ok):
                column[runs] = column[runs][within]
            # A key stored twice keeps its latest line: the last of its run.
            last = np.ones(len(high), dtype=bool)
            last[:-1] = (high[1:] != high[:-1]) | (low[1:] != low[:-1])
            if not last.all():
                return cls(high[last], low[last], offsets[last], lengths[last], ok[last])
        return cls(high, low, offsets, lengths, ok)

    def __len__(self) -> int:
        return len(self.high)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The place of each key in the table, or -1."""
        high, low = split(keys)
        places = np.full(len(high), -1, dtype=np.int64)
        if not len(self) or not len(high):
            return places
        # Searching in sorted order keeps the binary searches close together.
        order = np.argsort(high)
        first = np.empty(len(high), dtype=np.int64)
        first[order] = np.searchsorted(self.high, high[order])
        at = np.minimum(first, len(self) - 1)
        same_high = self.high[at] == high
        hit = same_high & (self.low[at] == low)
        places[hit] = at[hit]
        # Two keys whose first halves agree (about once in 2**64): look along the run.
        for row in np.flatnonzero(same_high & ~hit).tolist():
            place = int(first[row])
            while place < len(self) and self.high[place] == high[row]:
                if self.low[place] == low[row]:
                    places[row] = place
                    break
                place += 1
        return places
