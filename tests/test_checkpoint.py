"""The store of answers: append, reopen, latest line wins, torn lines, old
formats, the lock."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from batcher.errors import CheckpointError
from batcher.records import RowResult
from batcher.store.checkpoint import Checkpoint


def ok(reply: str) -> RowResult:
    return RowResult(reply, "stop", 3, 2, 5, "ok", None, 1, 0.01)


def key(name: object) -> bytes:
    return hashlib.blake2b(str(name).encode(), digest_size=16).digest()


def keys(*names: object) -> np.ndarray:
    return np.frombuffer(b"".join(key(name) for name in names), dtype=np.uint8).reshape(-1, 16)


def replies(checkpoint: Checkpoint, *names: object) -> list[str | None]:
    return [record["reply"] if record else None for record in checkpoint.read(keys(*names))]


def test_answers_survive_reopen_and_latest_line_wins(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    with Checkpoint(path) as checkpoint:
        checkpoint.append([(key("a"), 0)], ok("zero"))
        checkpoint.append([(key("c"), 0)], RowResult.failed("HTTP 500", 6))
        checkpoint.append([(key("c"), 0)], ok("two, second try"))
    with Checkpoint(path) as checkpoint:
        assert checkpoint.answered(keys("a", "b", "c")).tolist() == [True, False, True]
        assert replies(checkpoint, "a", "b", "c", "d") == ["zero", None, "two, second try", None]
        assert checkpoint.rows_recorded == 2


def test_one_answer_stored_under_several_keys_in_one_write(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    with Checkpoint(path) as checkpoint:
        place = checkpoint.append([(key("a"), 0), (key("b"), 1)], ok("shared"))
        assert checkpoint.record_at(place).reply == "shared"
        assert replies(checkpoint, "b", "a") == ["shared", "shared"]
    with Checkpoint(path) as checkpoint:
        assert checkpoint.answered(keys("a", "b")).all()


def test_error_rows_are_stored_but_not_answered(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    with Checkpoint(path) as checkpoint:
        checkpoint.append([(key(0), 0)], RowResult.failed("HTTP 400", 1))
    with Checkpoint(path) as checkpoint:
        assert checkpoint.read(keys(0))[0] is not None
        assert not checkpoint.answered(keys(0))[0]


def test_answers_appended_during_a_run_do_not_change_what_it_decided(tmp_path: Path) -> None:
    with Checkpoint(tmp_path / "job.ckpt") as checkpoint:
        checkpoint.append([(key(0), 0)], ok("new"))
        assert not checkpoint.answered(keys(0))[0]  # the store as it was opened
        assert replies(checkpoint, 0) == ["new"]  # but the results see it


def test_torn_last_line_is_cut_and_appends_stay_clean(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    with Checkpoint(path) as checkpoint:
        checkpoint.append([(key(0), 0)], ok("zero"))
        checkpoint.append([(key(1), 0)], ok("one"))
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # a kill in the middle of writing row 1
    with Checkpoint(path) as checkpoint:
        assert checkpoint.answered(keys(0, 1)).tolist() == [True, False]
        checkpoint.append([(key(1), 0)], ok("one again"))
    with Checkpoint(path) as checkpoint:
        assert replies(checkpoint, 0, 1) == ["zero", "one again"]


def test_an_older_format_is_refused_with_what_to_do_and_fresh_starts_over(
        tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    path.write_bytes(b'{"batcher_checkpoint":1,"fingerprint":"abc"}\n'
                     b'{"i":0,"status":"ok","reply":"old"}\n')
    with pytest.raises(CheckpointError, match=r"older batcher.*--fresh"):
        Checkpoint(path)
    with Checkpoint(path, fresh=True) as checkpoint:
        assert checkpoint.rows_recorded == 0


def test_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    path.write_text("hello\n")
    with pytest.raises(CheckpointError, match="not a batcher checkpoint"):
        Checkpoint(path)


def test_second_open_is_locked_out_until_the_first_closes(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    first = Checkpoint(path)
    with pytest.raises(CheckpointError, match="another batcher run"):
        Checkpoint(path)
    first.close()
    Checkpoint(path).close()


def test_reopen_indexes_many_keys_and_keeps_each_keys_latest_line(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    names = [5, 0, 123_456, 7, 5, 99, 0]
    with Checkpoint(path) as checkpoint:
        for step, name in enumerate(names):
            result = ok(f"{name}-{step}") if step != 6 else RowResult.failed("HTTP 500", 6)
            checkpoint.append([(key(name), 0)], result)
        checkpoint.append([(key(f"filler-{n}"), n) for n in range(5000)], ok("filler"))
    with Checkpoint(path) as checkpoint:
        assert checkpoint.rows_recorded == 5005
        assert checkpoint.answered(keys(0, 5, 7, 99, 123_456, 1)).tolist() == [
            False, True, True, True, True, False]
        latest = checkpoint.read(keys(0, 5, 123_456))
        assert latest[1] is not None and latest[1]["reply"] == "5-4"
        assert latest[0] is not None and latest[0]["error"] == "HTTP 500"
        assert latest[2] is not None and latest[2]["reply"] == "123456-2"


def test_keys_that_share_their_first_half_are_told_apart(tmp_path: Path) -> None:
    first, second = b"\x01" * 8 + b"\x00" * 8, b"\x01" * 8 + b"\xff" * 8
    with Checkpoint(tmp_path / "job.ckpt") as checkpoint:
        checkpoint.append([(second, 0)], ok("second"))
        checkpoint.append([(first, 1)], ok("first"))
    with Checkpoint(tmp_path / "job.ckpt") as checkpoint:
        both = np.frombuffer(second + first, dtype=np.uint8).reshape(2, 16)
        assert [r["reply"] if r else None for r in checkpoint.read(both)] == ["second", "first"]


def test_a_corrupt_line_in_the_middle_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    with Checkpoint(path) as checkpoint:
        checkpoint.append([(key(0), 0)], ok("zero"))
        checkpoint.append([(key(1), 0)], ok("one"))
    lines = path.read_bytes().split(b"\n")
    lines[1] = b"garbage that is long enough to fill the head window of a line...."
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(CheckpointError, match="corrupt line at byte"):
        Checkpoint(path)


def test_a_run_that_answers_stored_keys_again_reads_its_own_lines_until_refreshed(
        tmp_path: Path) -> None:
    # 70,000 appends: more than the index gathers before sorting them into a table.
    path = tmp_path / "job.ckpt"
    with Checkpoint(path) as checkpoint:
        checkpoint.append([(key(0), 0)], RowResult.failed("HTTP 500", 6))
        checkpoint.append([(key(1), 1)], ok("one"))
    with Checkpoint(path) as checkpoint:
        checkpoint.append([(key(0), 0)], ok("zero, this run"))
        checkpoint.append([(key(1), 1)], RowResult.failed("HTTP 500", 6))
        checkpoint.append([(key(f"new-{n}"), n) for n in range(70_000)], ok("new"))
        assert checkpoint.answered(keys(0, 1, "new-5")).tolist() == [False, True, False]
        assert checkpoint.stored_before_run(keys(0, 1, 2, "new-69999")).tolist() == [
            False, False, False, False]
        latest = checkpoint.read(keys(0, 1, "new-69999", 2))
        assert [r["status"] if r else None for r in latest] == ["ok", "error", "ok", None]
        checkpoint.refresh()
        assert checkpoint.answered(keys(0, 1, "new-5")).tolist() == [True, False, True]
        assert replies(checkpoint, 0, "new-0") == ["zero, this run", "new"]
    with Checkpoint(path) as checkpoint:
        assert checkpoint.rows_recorded == 70_002
        assert checkpoint.stored_before_run(keys(0, "new-1", 2)).tolist() == [True, True, False]
