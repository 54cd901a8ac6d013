"""Answers journaled by request key: how a run spread over many workers resumes.

On one machine the checkpoint is one journal written by one process. When
many workers answer rows at once (``batcher.raydata``), each worker appends
to a journal file of its own in a shared folder (``journal-<worker>.jsonl``;
no locks, no coordination), and a row is known by its request key
(``batcher.store.keys``: its id and the request it sends), not by its place in the
input, which a distributed read does not keep. Every
line is ``{"k": "<key hex>", "status": ..., ...RowResult}``, written with one
``os.write`` the moment the row's answer arrives, so a kill loses only the
requests in flight; a torn last line (a kill mid-write) is ignored.

A worker starting up indexes the ``ok`` lines of every journal file in the
folder (only the fixed-width head of each line is looked at; 40 bytes a row
in memory), and reads a row's record back only when that row comes by again:
a row answered ``ok`` is never sent again, a row that ended in ``error`` is.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from batcher.errors import OutputError
from batcher.io import platform
from batcher.io.safefiles import open_private, private_folder
from batcher.records import RowResult
from batcher.store.keys import KEY_BYTES

_OK_HEAD = re.compile(rb'\{"k":"([0-9a-f]{32})","status":"ok",')
_READ_CHUNK = 4 << 20
JOURNAL_GLOB = "journal-*.jsonl"


class AnswerWriter:
    """One worker's journal file in ``folder``, opened for appending."""

    def __init__(self, folder: Path, worker: str) -> None:
        self.path = folder / f"journal-{worker}.jsonl"
        # Every prompt's answer: a private folder of private files, as the checkpoint.
        private_folder(folder, "journal folder")
        self._fd = open_private(self.path, "journal", os.O_WRONLY | os.O_APPEND)

    def append(self, key: bytes, result: RowResult) -> None:
        record: dict[str, Any] = {"k": key.hex(), "status": result.status}
        record.update(result.to_dict())
        line = orjson.dumps(record) + b"\n"
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write the journal ({exc.strerror})") from None
        if written != len(line):
            raise OutputError(f"{self.path}: cannot write the journal (disk full?)")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Answers:
    """The ``ok`` answers in a folder of journals, looked up by request key."""

    def __init__(self, folder: Path) -> None:
        private_folder(folder, "journal folder", create=False)  # no answers planted by others
        self._files = sorted(folder.glob(JOURNAL_GLOB)) if folder.is_dir() else []
        keys: list[bytes] = []
        places: list[tuple[int, int, int]] = []
        for number, path in enumerate(self._files):
            for key, offset, length in _ok_lines(path):
                keys.append(key)
                places.append((number, offset, length))
        order = np.argsort(np.array(keys, dtype=f"S{KEY_BYTES}"), kind="stable")
        self._keys = np.array(keys, dtype=f"S{KEY_BYTES}")[order]
        table = np.array(places, dtype=np.int64).reshape(-1, 3)[order]
        self._file, self._offset, self._length = table[:, 0], table[:, 1], table[:, 2]
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def find(self, keys: np.ndarray) -> list[dict[str, Any] | None]:
        """Each key's journaled ``ok`` record (the result's fields), or None; ``keys``
        as ``batcher.store.keys.RowKeys`` makes them, ``(n, 16)`` bytes."""
        found: list[dict[str, Any] | None] = [None] * len(keys)
        if not len(self._keys) or not len(keys):
            return found
        wanted = np.ascontiguousarray(keys, dtype=np.uint8).view(f"S{KEY_BYTES}").ravel()
        # The last of equal keys: a row answered twice (two runs racing) keeps either.
        at = np.searchsorted(self._keys, wanted, side="right") - 1
        hits = np.flatnonzero((at >= 0) & (self._keys[np.maximum(at, 0)] == wanted))
        for row in hits.tolist():
            place = int(at[row])
            line = platform.pread(self._fd(int(self._file[place])), int(self._length[place]),
                                  int(self._offset[place]))
            record = orjson.loads(line)
            del record["k"]
            found[row] = record
        return found

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, number: int) -> int:
        fd = self._fds.get(number)
        if fd is None:
            fd = self._fds[number] = os.open(self._files[number], os.O_RDONLY | platform.BINARY)
        return fd


def _ok_lines(path: Path) -> list[tuple[bytes, int, int]]:
    """Key, offset and length of every whole ``ok`` line of one journal file."""
    lines: list[tuple[bytes, int, int]] = []
    with path.open("rb") as handle:
        base = 0
        pending = b""
        while chunk := handle.read(_READ_CHUNK):
            data = pending + chunk
            start = 0
            while (end := data.find(b"\n", start)) >= 0:
                match = _OK_HEAD.match(data, start, start + 64)
                if match is not None:
                    lines.append((bytes.fromhex(match.group(1).decode()), base + start,
                                  end - start))
                start = end + 1
            base += start
            pending = data[start:]
    return lines
