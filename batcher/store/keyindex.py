"""Where each request key's latest line lies in the checkpoint, held in numpy.

Keys are split into two ``uint64`` halves and kept sorted beside each line's
offset, length and ``ok`` flag (29 bytes a key), searched with
``searchsorted``, so a million keys cost 29 MB and any input's rows, in any
order, are found without a JSON parse per line.
"""

from __future__ import annotations

import numpy as np

from batcher.store.keys import KEY_BYTES, split


class KeyIndex:
    """Where each key's latest line is, and whether it was ``ok``.

    The keys found on open are *sealed* into sorted numpy arrays (two
    ``uint64`` halves, an offset, a length, a flag: 29 bytes a key) searched
    with ``searchsorted``; keys appended by this run collect in growable
    arrays beside them and are merged in only when the results are read,
    so deciding what to send sees the store as it was opened.
    """

    def __init__(self) -> None:
        self._sealed = _Table.empty()
        self._opened = self._sealed  # the store as it was on open
        self._added: list[_Table] = []
        self._buffer: list[tuple[bytes, int, int, bool]] = []

    def size(self) -> int:
        return len(self._sealed) + sum(len(table) for table in self._added) + len(self._buffer)

    def add(self, key: bytes, offset: int, length: int, ok: bool) -> None:
        self._buffer.append((key, offset, length, ok))
        if len(self._buffer) >= 65536:
            self._flush_buffer()

    def add_many(self, keys: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
                 ok: np.ndarray) -> None:
        high, low = split(keys)
        self._added.append(_Table(high, low, offsets.astype(np.int64),
                                  lengths.astype(np.int32), ok.astype(bool)))

    def seal(self) -> None:
        """Merge everything added into the sorted arrays (latest line per key wins)."""
        self._flush_buffer()
        if self._added:
            self._sealed = _Table.merged([self._sealed, *self._added])
            self._added = []

    def find(self, keys: np.ndarray, *, opened: bool = False) -> np.ndarray:
        """The place of each key in the table searched, or -1."""
        if not opened:
            self.seal()
        table = self._opened if opened else self._sealed
        return table.find(keys)

    def ok_at(self, places: np.ndarray, *, opened: bool = False) -> np.ndarray:
        table = self._opened if opened else self._sealed
        return table.ok[np.maximum(places, 0)] if len(table) else np.zeros(len(places), bool)

    def lines(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Offsets and lengths of each key's latest line (length 0: none)."""
        places = self.find(keys)
        hit = places >= 0
        table = self._sealed
        offsets = np.zeros(len(keys), dtype=np.int64)
        lengths = np.zeros(len(keys), dtype=np.int64)
        offsets[hit] = table.offsets[places[hit]]
        lengths[hit] = table.lengths[places[hit]]
        return offsets, lengths

    def _flush_buffer(self) -> None:
        if not self._buffer:
            return
        keys, offsets, lengths, ok = zip(*self._buffer, strict=True)
        self._buffer = []
        key_bytes = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES)
        self.add_many(key_bytes, np.asarray(offsets), np.asarray(lengths), np.asarray(ok))

    def seal_opened(self) -> None:
        """Seal what was found on open: the store ``answered`` asks about."""
        self.seal()
        self._opened = self._sealed


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
    def merged(cls, tables: list[_Table]) -> _Table:
        """One sorted table of ``tables``' keys, each key's latest line kept.

        Built a column at a time (concatenate, reorder, drop the unordered
        copy), so a million keys need about one extra table's memory, not
        four.
        """
        high = np.concatenate([table.high for table in tables])
        order = np.argsort(high)
        high = high[order]
        low = np.concatenate([table.low for table in tables])[order]
        offsets = np.concatenate([table.offsets for table in tables])[order]
        lengths = np.concatenate([table.lengths for table in tables])[order]
        ok = np.concatenate([table.ok for table in tables])[order]
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
