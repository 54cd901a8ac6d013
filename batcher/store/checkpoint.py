"""The checkpoint: an append-only store of answers, keyed by request.

Line 1 is a header naming the format; every later line is one finished
request, ``{"k": key, "status": ..., "i": position, ...RowResult}``, where
``key`` is the row's request key (``batcher.store.keys``) in hex. Each line is written with a
single ``os.write`` the moment its response is parsed, so a SIGKILL loses
at most the requests still in flight. On open, a torn last line (a kill
mid-write) is cut off, and an index of where each key's latest line lives
is built with numpy (sorted ``uint64`` halves of the keys, searched with
``searchsorted``: 29 bytes a key), so the rows of any input, in any order,
are found without a JSON parse per line and the results are written by
reading lines back one batch at a time, never the whole journal at once.

Answers are never removed: a row that leaves the input and comes back
later is answered from here again. ``fresh`` discards everything.

A lock file stops a second run of the same job (``flock``, or its fallback
in ``batcher.io.platform``); a crash never leaves it stuck: the kernel drops a
lock when its process dies, and a fallback claim naming a dead process is
taken over.
The index is ``batcher.store.keyindex``'s; reading beside a run, without the lock,
is ``batcher.store.journal``'s.

Longer than most modules because the file's format (header, line layout,
torn-line repair, the lock) is kept in one place with the code that writes it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from batcher.errors import CheckpointError, OutputError, RunInProgress, fresh_option
from batcher.io import platform
from batcher.io.safefiles import make_private, open_private
from batcher.records import RESULT_FIELDS, STATUS_OK, RowResult
from batcher.store.keyindex import KeyIndex
from batcher.store.keys import KEY_BYTES

FORMAT_VERSION = 2
READ_CHUNK = 4 << 20
_NEWLINE = 10
_HEADER_PREFIX = b'{"batcher_checkpoint":'
_LINE_HEAD = re.compile(rb'\{"k":"[0-9a-f]{32}","status":"(ok|error)",')
_KEY_PREFIX = np.frombuffer(b'{"k":"', dtype=np.uint8)
_STATUS_OK = np.frombuffer(b'","status":"ok",', dtype=np.uint8)
_STATUS_ERROR = np.frombuffer(b'","status":"erro', dtype=np.uint8)
_HEX_START = len(_KEY_PREFIX)
_HEX_END = _HEX_START + 2 * KEY_BYTES
_HEAD_WINDOW = _HEX_END + len(_STATUS_OK)
_MAX_HEADER = 4096  # a header is ~100 bytes; a longer first line is some other file
_HEX_VALUES = np.full(256, 255, dtype=np.uint8)
_HEX_VALUES[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)


class Checkpoint:
    """One job's store of answers, opened for appending; use as a context manager."""

    def __init__(self, path: Path, *, fresh: bool = False) -> None:
        self.path = path
        self._lock_fd = _acquire_lock(path)
        try:
            self._index = KeyIndex()
            self._fd = self._open(fresh)
            self._opened_size = os.lseek(self._fd, 0, os.SEEK_END)
        except BaseException:
            _release_lock(self._lock_fd, path)
            raise

    # -- queries ----------------------------------------------------------------------------

    @property
    def rows_recorded(self) -> int:
        """How many answers (of any status) the store holds."""
        return self._index.size()

    def answered(self, keys: np.ndarray) -> np.ndarray:
        """For each key of ``(n, 16)`` ``keys``: does the store hold an ``ok`` answer
        from before this run (or its last :meth:`refresh`)? Those rows are never
        sent again."""
        return self._index.ok_when_opened(keys)

    def stored_before_run(self, keys: np.ndarray) -> np.ndarray:
        """For each key: was its latest answer in the file when this run opened it?"""
        offsets, lengths = self._index.lines(keys)
        before: np.ndarray = (lengths > 0) & (offsets < self._opened_size)
        return before

    def refresh(self) -> None:
        """Let :meth:`answered` see the answers appended since the store was
        opened (a merge of the index: between phases of a run, not per row)."""
        self._index.seal_opened()

    def read(self, keys: np.ndarray) -> list[dict[str, Any] | None]:
        """The latest record stored for each of ``keys``, as the dicts ``append``
        wrote (None where a key has none).

        Rows that finished together sit close together: one ``pread`` of their
        span replaces one per row when the span is not much larger than them.
        """
        records: list[dict[str, Any] | None] = [None] * len(keys)
        offsets, lengths = self._index.lines(keys)
        present = np.flatnonzero(lengths)
        if not present.size:
            return records
        starts = offsets[present]
        ends = starts + lengths[present]
        low, high = int(starts.min()), int(ends.max())
        if high - low <= 4 * int(lengths[present].sum()) + READ_CHUNK:
            span = memoryview(platform.pread(self._fd, high - low, low))
            for row, begin, end in zip(present.tolist(), (starts - low).tolist(),
                                       (ends - low).tolist(), strict=True):
                records[row] = orjson.loads(span[begin:end])
        else:
            for row, begin, end in zip(present.tolist(), starts.tolist(), ends.tolist(),
                                       strict=True):
                records[row] = orjson.loads(platform.pread(self._fd, end - begin, begin))
        return records

    # -- writing ----------------------------------------------------------------------------

    def append(self, rows: Sequence[tuple[bytes, int]], result: RowResult) -> tuple[int, int]:
        """Record one request's outcome under the key of every row it answers
        (``(key, position)`` pairs: more than one with ``duplicates: share``),
        in a single write, durably enough to survive a kill of this process.
        Returns where the first line is (for :meth:`record_at`).

        The position (``"i"``) is the row's place in the input of the run
        that wrote the line, for people reading the journal; only the key
        finds an answer.
        """
        # "k" and "status" lead every line, so reopening needs no full JSON parse.
        fields = result.to_dict()
        status = orjson.dumps(fields.pop("status"))
        body = orjson.dumps(fields)[1:]
        lines = [b'{"k":"%s","status":%s,"i":%d,%s\n' % (key.hex().encode("ascii"), status,
                                                          position, body)
                 for key, position in rows]
        data = b"".join(lines)
        offset = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write the checkpoint ({exc.strerror})"
                              ) from None
        if written != len(data):
            # A short write (disk full) leaves a torn line that the next open cuts off.
            raise OutputError(f"{self.path}: cannot write the checkpoint (disk full?)")
        ok = result.status == STATUS_OK
        first = offset, len(lines[0]) - 1
        for (key, _position), line in zip(rows, lines, strict=True):
            self._index.add(key, offset, len(line) - 1, ok)
            offset += len(line)
        return first

    def record_at(self, place: tuple[int, int]) -> RowResult:
        """The outcome stored in the line ``append`` reported."""
        offset, length = place
        record = orjson.loads(platform.pread(self._fd, length, offset))
        return RowResult(**{name: record.get(name) for name in RESULT_FIELDS})

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            _release_lock(self._lock_fd, self.path)
            self._lock_fd = -1

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- opening ----------------------------------------------------------------------------

    def _open(self, fresh: bool) -> int:
        fd = open_private(self.path, "checkpoint")
        try:
            if _holds_no_rows(fd):
                self._write_header(fd)
            elif fresh:  # start over, but only ever over a checkpoint, never a data file
                read_header(fd, self.path)
                self._write_header(fd)
            else:
                self._load(fd)
            make_private(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _write_header(self, fd: int) -> None:
        header = orjson.dumps({"batcher_checkpoint": FORMAT_VERSION, "keyed_by": "request"}
                              ) + b"\n"
        try:
            os.ftruncate(fd, 0)
            written = platform.pwrite(fd, header, 0)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write the checkpoint ({exc.strerror})"
                              ) from None
        if written != len(header):
            raise OutputError(f"{self.path}: cannot write the checkpoint (disk full?)")

    def _load(self, fd: int) -> None:
        header_line, header = read_header(fd, self.path)
        check_version(header, self.path)
        offset = len(header_line) + 1
        pending = b""
        while chunk := platform.pread(fd, READ_CHUNK, offset + len(pending)):
            data = pending + chunk
            end = data.rfind(b"\n") + 1
            if end:
                self._load_block(data[:end], offset)
            offset += end
            pending = data[end:]
        if pending:
            # A torn last line from a kill mid-write: cut it so appends start clean.
            os.ftruncate(fd, offset)
        self._index.seal_opened()

    def _load_block(self, block: bytes, base: int) -> None:
        """Index a run of whole lines at once with numpy, not a JSON parse per
        line, so a million-line store opens in well under a second.

        Every line starts ``{"k":"<32 hex digits>","status":"ok"`` or
        ``..."error"`` (``append`` writes them so); anything else is corrupt.
        """
        data = np.frombuffer(block, dtype=np.uint8)
        ends = np.flatnonzero(data == _NEWLINE)
        starts = np.concatenate(([0], ends[:-1] + 1))
        lengths = ends - starts
        if (lengths < _HEAD_WINDOW).any():
            self._report_corrupt_line(block, base)
        # 32-bit indexes (a block is a few MB): a quarter of the memory traffic of 64-bit.
        window = data[starts.astype(np.int32)[:, None] + np.arange(_HEAD_WINDOW, dtype=np.int32)]
        nibbles = _HEX_VALUES[window[:, _HEX_START:_HEX_END]]
        status = window[:, _HEX_END:]
        ok = (status == _STATUS_OK).all(axis=1)
        well_formed = ((window[:, :_HEX_START] == _KEY_PREFIX).all(axis=1)
                       & (nibbles != 255).all(axis=1)
                       & (ok | (status == _STATUS_ERROR).all(axis=1)))
        if not well_formed.all():
            self._report_corrupt_line(block, base)
        keys = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
        self._index.add_many(keys, starts + base, lengths, ok)

    def _report_corrupt_line(self, block: bytes, base: int) -> None:
        start = 0
        for line in block.split(b"\n")[:-1]:
            if not _LINE_HEAD.match(line):
                break
            start += len(line) + 1
        raise CheckpointError(f"{self.path}: corrupt line at byte {base + start} "
                              f"(run with {fresh_option()} to start over)")


def verify_checkpoint(path: Path, fresh: bool = False) -> None:
    """Without locking or changing anything (for ``validate`` and ``--dry-run``): an
    existing file at ``path`` is a batcher checkpoint this version reads (with
    ``fresh``: a checkpoint of any version, which ``--fresh`` replaces; never a
    file that is no checkpoint)."""
    try:
        fd = os.open(path, os.O_RDONLY | platform.SAFE_OPEN)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"{path}: cannot open the checkpoint ({exc.strerror})") from None
    try:
        if _holds_no_rows(fd):
            return
        _line, header = read_header(fd, path)
        if not fresh:
            check_version(header, path)
    finally:
        os.close(fd)


def read_header(fd: int, path: Path) -> tuple[bytes, dict[str, Any]]:
    """The first line and its header; a file that is no checkpoint is never touched."""
    line = _read_first_line(fd, _MAX_HEADER)
    header: Any = None
    if line is not None and line.startswith(_HEADER_PREFIX):
        with contextlib.suppress(orjson.JSONDecodeError):
            header = orjson.loads(line)
    if line is None or not isinstance(header, dict) \
            or not isinstance(header.get("batcher_checkpoint"), int):
        raise CheckpointError(
            f"{path}: not a batcher checkpoint, so batcher will not overwrite it "
            f"(not even with {fresh_option()}); move it away or point output.checkpoint elsewhere")
    return line, header


def check_version(header: dict[str, Any], path: Path) -> None:
    version = header["batcher_checkpoint"]
    if version < FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by an older batcher, which kept answers by row position; "
            "this one keeps them by request and cannot match the old rows. Finish the job "
            f"with the older version, or run with {fresh_option()} to start over (every row is "
            "sent again)")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer batcher (format {version}); "
                              f"upgrade batcher, or run with {fresh_option()} to start over")


def _holds_no_rows(fd: int) -> bool:
    """Empty, or only a header torn by a kill or a full disk: nothing was recorded."""
    head = platform.pread(fd, len(_HEADER_PREFIX) + 1, 0)
    if not head:
        return True
    if b"\n" in platform.pread(fd, 4096, 0):
        return False
    return _HEADER_PREFIX.startswith(head[: len(_HEADER_PREFIX)])


def _read_first_line(fd: int, limit: int) -> bytes | None:
    """The first line, or None when there is none within ``limit`` bytes."""
    data = b""
    while b"\n" not in data:
        chunk = platform.pread(fd, 4096, len(data))
        if not chunk or len(data) > limit:
            return None
        data += chunk
    return data[: data.index(b"\n")]


def lock_path_for(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _acquire_lock(path: Path) -> int:
    lock_path = lock_path_for(path)
    fd = open_private(lock_path, "lock file")
    try:
        make_private(fd)
        locked = platform.try_lock(fd, lock_path)
    except BaseException:
        os.close(fd)
        raise
    if not locked:
        os.close(fd)
        raise RunInProgress(
            f"{path}: another batcher run of this job is in progress (lock {lock_path.name} "
            "is held); wait for it to finish")
    return fd


def _release_lock(fd: int, path: Path) -> None:
    platform.unlock(fd, lock_path_for(path))
    os.close(fd)
