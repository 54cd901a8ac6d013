"""The checkpoint: an append-only journal of finished rows beside the results.

Line 1 is a header carrying the job's fingerprint; every later line is one
finished row, ``{"i": position, ...RowResult}``, written with a single
``os.write`` the moment its response is parsed, so a SIGKILL loses at most
the requests still in flight. On open, a torn last line (a kill mid-write)
is cut off, and an in-memory index of where each row's latest line lives
(12 bytes a row) lets the final results be written in input order by
reading lines back one batch at a time, never the whole journal at once.

A lock file held with ``flock`` stops a second run of the same job; the
kernel drops it when its process dies, so a crash never leaves it stuck.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from array import array
from pathlib import Path
from typing import Any

import orjson

from batcher.errors import CheckpointError, OutputError
from batcher.records import STATUS_OK, RowResult

FORMAT_VERSION = 1
_STATE_NONE, _STATE_OK, _STATE_ERROR = 0, 1, 2
_READ_CHUNK = 1 << 20


class Checkpoint:
    """One job's journal, opened for appending; use as a context manager."""

    def __init__(self, path: Path, fingerprint: str, *, fresh: bool = False) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self._lock_fd = _acquire_lock(path)
        try:
            if fresh:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            self._offsets = array("q")
            self._lengths = array("i")
            self._states = bytearray()
            self.rows_recorded = 0
            self._fd = self._open()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- queries ----------------------------------------------------------------------------

    def is_done(self, position: int) -> bool:
        """True when the row's latest outcome is ``ok``: it is never sent again."""
        return position < len(self._states) and self._states[position] == _STATE_OK

    def has_outcome(self, position: int) -> bool:
        return position < len(self._states) and self._states[position] != _STATE_NONE

    def count_done(self, limit: int | None = None) -> int:
        states = self._states if limit is None else self._states[:limit]
        return states.count(_STATE_OK)

    def read(self, positions: range) -> list[RowResult | None]:
        """The latest outcome of each row in ``positions`` (None where there is none)."""
        results: list[RowResult | None] = []
        for position in positions:
            if not self.has_outcome(position):
                results.append(None)
                continue
            line = os.pread(self._fd, self._lengths[position], self._offsets[position])
            results.append(RowResult.from_dict(orjson.loads(line)))
        return results

    # -- writing ----------------------------------------------------------------------------

    def append(self, position: int, result: RowResult) -> None:
        """Record one finished row, durably enough to survive a kill of this process."""
        record: dict[str, Any] = {"i": position}
        record.update(result.to_dict())
        line = orjson.dumps(record) + b"\n"
        offset = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write the checkpoint ({exc.strerror})"
                              ) from None
        if written != len(line):
            # A short write (disk full) leaves a torn line that the next open cuts off.
            raise OutputError(f"{self.path}: cannot write the checkpoint (disk full?)")
        self._index(position, offset, len(line) - 1, result.status == STATUS_OK)

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- opening ----------------------------------------------------------------------------

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot open the checkpoint ({exc.strerror})"
                              ) from None
        try:
            if os.fstat(fd).st_size == 0:
                header = {"batcher_checkpoint": FORMAT_VERSION, "fingerprint": self.fingerprint}
                os.write(fd, orjson.dumps(header) + b"\n")
            else:
                self._load(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _load(self, fd: int) -> None:
        offset = 0
        pending = b""
        header_seen = False
        while chunk := os.pread(fd, _READ_CHUNK, offset + len(pending)):
            data = pending + chunk
            start = 0
            while (end := data.find(b"\n", start)) != -1:
                line = data[start:end]
                if not header_seen:
                    self._check_header(line)
                    header_seen = True
                elif line.strip():
                    self._load_line(line, offset + start, end - start)
                start = end + 1
            offset += start
            pending = data[start:]
        if pending or not header_seen:
            if not header_seen:
                raise CheckpointError(f"{self.path}: not a batcher checkpoint "
                                      "(run with --fresh to replace it)")
            # A torn last line from a kill mid-write: cut it so appends start clean.
            os.ftruncate(fd, offset)

    def _check_header(self, line: bytes) -> None:
        try:
            header = orjson.loads(line)
        except orjson.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("batcher_checkpoint") != FORMAT_VERSION:
            raise CheckpointError(f"{self.path}: not a batcher checkpoint "
                                  "(run with --fresh to replace it)")
        if header.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"{self.path}: the checkpoint was made by a different job (the input, model, "
                "prompt or params changed); run with --fresh to discard it and start over")

    def _load_line(self, line: bytes, offset: int, length: int) -> None:
        try:
            record = orjson.loads(line)
            position = int(record["i"])
            ok = record["status"] == STATUS_OK
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: corrupt line at byte {offset} "
                                  "(run with --fresh to start over)") from None
        self._index(position, offset, length, ok)

    def _index(self, position: int, offset: int, length: int, ok: bool) -> None:
        missing = position + 1 - len(self._states)
        if missing > 0:
            self._offsets.extend([0] * missing)
            self._lengths.extend([0] * missing)
            self._states.extend(bytes(missing))
        if self._states[position] == _STATE_NONE:
            self.rows_recorded += 1
        self._offsets[position] = offset
        self._lengths[position] = length
        self._states[position] = _STATE_OK if ok else _STATE_ERROR


def _acquire_lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise OutputError(f"{lock_path}: cannot create the lock file ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointError(
            f"{path}: another batcher run of this job is in progress (lock {lock_path.name} "
            "is held); wait for it to finish") from None
    return fd
