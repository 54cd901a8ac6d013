"""The checkpoint: an append-only journal of finished rows beside the results.

Line 1 is a header carrying the job's fingerprint; every later line is one
finished row, ``{"i": position, ...RowResult}``, written with a single
``os.write`` the moment its response is parsed, so a SIGKILL loses at most
the requests still in flight. On open, a torn last line (a kill mid-write)
is cut off, and an in-memory index of where each row's latest line lives
(13 bytes a row) lets the final results be written in input order by
reading lines back one batch at a time, never the whole journal at once.

A lock file held with ``flock`` stops a second run of the same job; the
kernel drops it when its process dies, so a crash never leaves it stuck.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from batcher.errors import CheckpointError, OutputError
from batcher.records import STATUS_OK, RowResult
from batcher.safefiles import make_private, open_private

FORMAT_VERSION = 1
_STATE_NONE, _STATE_OK, _STATE_ERROR = 0, 1, 2
_READ_CHUNK = 4 << 20
_NEWLINE = 10
_HEADER_PREFIX = b'{"batcher_checkpoint":'
_LINE_HEAD = re.compile(rb'\{"i":\d{1,18},"status":"(ok|error)",')
_POSITION_PREFIX = np.frombuffer(b'{"i":', dtype=np.uint8)
_STATUS_OK = np.frombuffer(b',"status":"ok",', dtype=np.uint8)
_STATUS_ERROR = np.frombuffer(b',"status":"erro', dtype=np.uint8)
_MAX_DIGITS = 18
_HEAD_WINDOW = 48  # bytes of each line's head that hold the position and status
_MAX_HEADER = 4096  # a header is ~100 bytes; a longer first line is some other file


class Checkpoint:
    """One job's journal, opened for appending; use as a context manager."""

    def __init__(self, path: Path, fingerprint: str, *, fresh: bool = False) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self._lock_fd = _acquire_lock(path)
        try:
            self._index = _RowIndex()
            self._fd = self._open(fresh)
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- queries ----------------------------------------------------------------------------

    @property
    def rows_recorded(self) -> int:
        return self._index.rows_recorded()

    def is_done(self, position: int) -> bool:
        """True when the row's latest outcome is ``ok``: it is never sent again."""
        return self._index.state(position) == _STATE_OK

    def count_done(self, start: int, stop: int) -> int:
        """How many rows in ``range(start, stop)`` are done."""
        return self._index.count_ok(start, stop)

    def read(self, start: int, stop: int) -> list[dict[str, Any] | None]:
        """The latest journal record of each row in ``range(start, stop)``, as the
        dicts ``append`` wrote (None where a row has none).

        Rows finish roughly in input order, so a batch's lines usually sit close
        together: one ``pread`` of their span replaces one per row.
        """
        records: list[dict[str, Any] | None] = [None] * (stop - start)
        offsets, lengths = self._index.lines(start, stop)
        present = np.flatnonzero(lengths)
        if not present.size:
            return records
        starts = offsets[present]
        ends = starts + lengths[present]
        low, high = int(starts.min()), int(ends.max())
        if high - low <= 4 * int(lengths[present].sum()) + _READ_CHUNK:
            span = memoryview(os.pread(self._fd, high - low, low))
            for row, begin, end in zip(present.tolist(), (starts - low).tolist(),
                                       (ends - low).tolist(), strict=True):
                records[row] = orjson.loads(span[begin:end])
        else:
            for row, begin, end in zip(present.tolist(), starts.tolist(), ends.tolist(),
                                       strict=True):
                records[row] = orjson.loads(os.pread(self._fd, end - begin, begin))
        return records

    # -- writing ----------------------------------------------------------------------------

    def append(self, position: int, result: RowResult) -> None:
        """Record one finished row, durably enough to survive a kill of this process."""
        # "i" and "status" lead every line, so reopening needs no full JSON parse.
        record: dict[str, Any] = {"i": position, "status": result.status}
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
        self._index.set(position, offset, len(line) - 1, result.status == STATUS_OK)

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

    def _open(self, fresh: bool) -> int:
        fd = open_private(self.path, "checkpoint")
        try:
            if _holds_no_rows(fd):
                self._write_header(fd)
            elif fresh:  # start over, but only ever over a checkpoint, never a data file
                _read_header(fd, self.path)
                self._write_header(fd)
            else:
                self._load(fd)
            make_private(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _write_header(self, fd: int) -> None:
        header = orjson.dumps({"batcher_checkpoint": FORMAT_VERSION,
                               "fingerprint": self.fingerprint}) + b"\n"
        try:
            os.ftruncate(fd, 0)
            written = os.pwrite(fd, header, 0)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write the checkpoint ({exc.strerror})"
                              ) from None
        if written != len(header):
            raise OutputError(f"{self.path}: cannot write the checkpoint (disk full?)")

    def _load(self, fd: int) -> None:
        header_line, header = _read_header(fd, self.path)
        _check_fingerprint(header, self.fingerprint, self.path)
        offset = len(header_line) + 1
        pending = b""
        while chunk := os.pread(fd, _READ_CHUNK, offset + len(pending)):
            data = pending + chunk
            end = data.rfind(b"\n") + 1
            if end:
                self._load_block(data[:end], offset)
            offset += end
            pending = data[end:]
        if pending:
            # A torn last line from a kill mid-write: cut it so appends start clean.
            os.ftruncate(fd, offset)

    def _load_block(self, block: bytes, base: int) -> None:
        """Index a run of whole lines at once with numpy, not a JSON parse per
        line, so a million-row journal opens in well under a second.

        Every row line starts ``{"i":<digits>,"status":"ok"`` or ``..."error"``
        (``append`` writes them so); anything else is a corrupt line.
        """
        data = np.frombuffer(block, dtype=np.uint8)
        ends = np.flatnonzero(data == _NEWLINE)
        starts = np.concatenate(([0], ends[:-1] + 1))
        lengths = ends - starts
        if (lengths < _HEAD_WINDOW).any():
            self._report_corrupt_line(block, base)
        window = data[starts[:, None] + np.arange(_HEAD_WINDOW)]
        digits = window[:, len(_POSITION_PREFIX):len(_POSITION_PREFIX) + _MAX_DIGITS + 1]
        is_digit = (digits >= ord("0")) & (digits <= ord("9"))
        count = np.argmin(is_digit, axis=1)  # digits before the first non-digit
        after = len(_POSITION_PREFIX) + count
        status_at = after[:, None] + np.arange(len(_STATUS_OK))
        status = np.take_along_axis(window, status_at, axis=1)
        ok = (status == _STATUS_OK).all(axis=1)
        well_formed = (
            (window[:, : len(_POSITION_PREFIX)] == _POSITION_PREFIX).all(axis=1)
            & (count > 0)
            & (ok | (status == _STATUS_ERROR).all(axis=1))
        )
        if not well_formed.all():
            self._report_corrupt_line(block, base)
        places = np.arange(_MAX_DIGITS + 1)
        weights = np.where(places < count[:, None],
                           10 ** np.clip(count[:, None] - 1 - places, 0, None), 0)
        positions = ((digits.astype(np.int64) - ord("0")) * weights).sum(axis=1)
        self._index.set_many(positions, starts + base, lengths, ok)

    def _report_corrupt_line(self, block: bytes, base: int) -> None:
        start = 0
        for line in block.split(b"\n")[:-1]:
            if not _LINE_HEAD.match(line):
                break
            start += len(line) + 1
        raise CheckpointError(f"{self.path}: corrupt line at byte {base + start} "
                              "(run with --fresh to start over)")



class _RowIndex:
    """Where each row's latest journal line is, and whether it was ``ok``.

    Three flat numpy arrays, 13 bytes a row, grown by doubling: a million
    rows cost 13 MB, not a million Python objects.
    """

    def __init__(self) -> None:
        self._offsets = np.zeros(0, dtype=np.int64)
        self._lengths = np.zeros(0, dtype=np.int32)
        self._states = np.zeros(0, dtype=np.uint8)

    def state(self, position: int) -> int:
        return int(self._states[position]) if position < len(self._states) else _STATE_NONE

    def lines(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Offsets and lengths of rows ``start..stop`` (length 0: no line), padded."""
        offsets = np.zeros(stop - start, dtype=np.int64)
        lengths = np.zeros(stop - start, dtype=np.int64)
        known = max(0, min(stop, len(self._states)) - start)
        offsets[:known] = self._offsets[start:start + known]
        lengths[:known] = self._lengths[start:start + known]
        return offsets, lengths

    def count_ok(self, start: int, stop: int) -> int:
        return int(np.count_nonzero(self._states[start:stop] == _STATE_OK))

    def rows_recorded(self) -> int:
        return int(np.count_nonzero(self._states))

    def set(self, position: int, offset: int, length: int, ok: bool) -> None:
        self._reserve(position + 1)
        self._offsets[position] = offset
        self._lengths[position] = length
        self._states[position] = _STATE_OK if ok else _STATE_ERROR

    def set_many(self, positions: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
                 ok: np.ndarray) -> None:
        if not len(positions):
            return
        # A row journaled twice (an error, then a retry) keeps its latest line:
        # keep each position's last occurrence, since numpy does not promise
        # which of repeated fancy-index assignments wins.
        reversed_positions = positions[::-1]
        _, first_in_reversed = np.unique(reversed_positions, return_index=True)
        last = len(positions) - 1 - first_in_reversed
        self._reserve(int(positions.max()) + 1)
        chosen = positions[last]
        self._offsets[chosen] = offsets[last]
        self._lengths[chosen] = lengths[last]
        self._states[chosen] = np.where(ok[last], _STATE_OK, _STATE_ERROR)

    def _reserve(self, size: int) -> None:
        if size <= len(self._states):
            return
        capacity = max(size, 2 * len(self._states), 1024)
        for name in ("_offsets", "_lengths", "_states"):
            old = getattr(self, name)
            grown = np.zeros(capacity, dtype=old.dtype)
            grown[: len(old)] = old
            setattr(self, name, grown)


def verify_checkpoint(path: Path, fingerprint: str | None) -> None:
    """Without locking or changing anything (for ``validate``): an existing file at
    ``path`` is a batcher checkpoint, of the job with ``fingerprint`` unless None
    (``--fresh`` replaces any checkpoint, but only a checkpoint)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"{path}: cannot open the checkpoint ({exc.strerror})") from None
    try:
        if _holds_no_rows(fd):
            return
        _line, header = _read_header(fd, path)
        if fingerprint is not None:
            _check_fingerprint(header, fingerprint, path)
    finally:
        os.close(fd)


def _read_header(fd: int, path: Path) -> tuple[bytes, dict[str, Any]]:
    """The first line and its header; a file that is no checkpoint is never touched."""
    line = _read_first_line(fd, _MAX_HEADER)
    header: Any = None
    if line is not None and line.startswith(_HEADER_PREFIX):
        with contextlib.suppress(orjson.JSONDecodeError):
            header = orjson.loads(line)
    if line is None or not isinstance(header, dict) \
            or header.get("batcher_checkpoint") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: not a batcher checkpoint, so batcher will not overwrite it "
            "(not even with --fresh); move it away or point output.checkpoint elsewhere")
    return line, header


def _check_fingerprint(header: dict[str, Any], fingerprint: str, path: Path) -> None:
    if header.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path}: the checkpoint was made by a different job (the input, model, "
            "prompt or params changed); run with --fresh to discard it and start over")


def _holds_no_rows(fd: int) -> bool:
    """Empty, or only a header torn by a kill or a full disk: nothing was recorded."""
    head = os.pread(fd, len(_HEADER_PREFIX) + 1, 0)
    if not head:
        return True
    if b"\n" in os.pread(fd, 4096, 0):
        return False
    return _HEADER_PREFIX.startswith(head[: len(_HEADER_PREFIX)])


def _read_first_line(fd: int, limit: int) -> bytes | None:
    """The first line, or None when there is none within ``limit`` bytes."""
    data = b""
    while b"\n" not in data:
        chunk = os.pread(fd, 4096, len(data))
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
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointError(
            f"{path}: another batcher run of this job is in progress (lock {lock_path.name} "
            "is held); wait for it to finish") from None
    return fd


# -- reading from another process ---------------------------------------------------------------


def read_journal(path: Path) -> tuple[str, Iterator[dict[str, Any]]]:
    """The fingerprint and the row records of a checkpoint, in the order written,
    for a reader beside a run that may still be appending (``batcher status``).

    The file is opened read-only and no lock is taken, so the run is not
    disturbed; a last line still being written (or torn by a kill) is left
    out. Raises ``CheckpointError`` when the file is not a checkpoint.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint yet (the job has not run)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror})") from None
    header_line = _read_first_line(fd, _MAX_HEADER)
    header: Any = None
    if header_line is not None:
        with contextlib.suppress(orjson.JSONDecodeError):
            header = orjson.loads(header_line)
    if not isinstance(header, dict) or header.get("batcher_checkpoint") != FORMAT_VERSION:
        os.close(fd)
        raise CheckpointError(f"{path}: not a batcher checkpoint")
    assert header_line is not None
    return str(header.get("fingerprint")), _records(path, fd, len(header_line) + 1)


def _records(path: Path, fd: int, offset: int) -> Iterator[dict[str, Any]]:
    try:
        pending = b""
        while chunk := os.pread(fd, _READ_CHUNK, offset):
            offset += len(chunk)
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()  # no newline yet: still being written, or torn
            for line in lines:
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError:
                    raise CheckpointError(f"{path}: corrupt line near byte "
                                          f"{offset - len(pending)}") from None
    finally:
        os.close(fd)


def run_in_progress(path: Path) -> bool | None:
    """Whether a run holds this checkpoint's lock, read from ``/proc/locks``
    without touching the lock (None where that file does not exist)."""
    try:
        info = lock_path_for(path).stat()
        table = Path("/proc/locks").read_text(encoding="ascii")
    except FileNotFoundError:
        return False if Path("/proc/locks").exists() else None
    except OSError:
        return None
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    return any(fields[1] == "FLOCK" and fields[5] == device
               for fields in (line.split() for line in table.splitlines()) if len(fields) > 5)
