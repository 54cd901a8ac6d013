"""The journal: append, reopen, torn lines, fingerprints, the lock."""

from __future__ import annotations

from pathlib import Path

import pytest

from batcher.checkpoint import Checkpoint
from batcher.errors import CheckpointError
from batcher.records import RowResult


def ok(reply: str) -> RowResult:
    return RowResult(reply, "stop", 3, 2, 5, "ok", None, 1, 0.01)


def test_rows_survive_reopen_and_latest_line_wins(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    with Checkpoint(path, "fp") as checkpoint:
        checkpoint.append(0, ok("zero"))
        checkpoint.append(2, RowResult.failed("HTTP 500", 6))
        checkpoint.append(2, ok("two, second try"))
    with Checkpoint(path, "fp") as checkpoint:
        assert checkpoint.is_done(0) and checkpoint.is_done(2) and not checkpoint.is_done(1)
        results = checkpoint.read(0, 4)
        assert [r["reply"] if r else None for r in results] == [
            "zero", None, "two, second try", None]
        assert checkpoint.rows_recorded == 2


def test_error_rows_are_recorded_but_not_done(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    with Checkpoint(path, "fp") as checkpoint:
        checkpoint.append(0, RowResult.failed("HTTP 400", 1))
    with Checkpoint(path, "fp") as checkpoint:
        assert checkpoint.read(0, 1)[0] is not None and not checkpoint.is_done(0)


def test_torn_last_line_is_cut_and_appends_stay_clean(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    with Checkpoint(path, "fp") as checkpoint:
        checkpoint.append(0, ok("zero"))
        checkpoint.append(1, ok("one"))
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # a kill in the middle of writing row 1
    with Checkpoint(path, "fp") as checkpoint:
        assert checkpoint.is_done(0) and not checkpoint.is_done(1)
        checkpoint.append(1, ok("one again"))
    with Checkpoint(path, "fp") as checkpoint:
        assert [r["reply"] for r in checkpoint.read(0, 2) if r] == ["zero", "one again"]


def test_a_different_job_is_refused_and_fresh_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    with Checkpoint(path, "fp-one") as checkpoint:
        checkpoint.append(0, ok("zero"))
    with pytest.raises(CheckpointError, match=r"different job.*--fresh"):
        Checkpoint(path, "fp-two")
    with Checkpoint(path, "fp-two", fresh=True) as checkpoint:
        assert not checkpoint.is_done(0)


def test_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    path.write_text("hello\n")
    with pytest.raises(CheckpointError, match="not a batcher checkpoint"):
        Checkpoint(path, "fp")


def test_second_open_is_locked_out_until_the_first_closes(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    first = Checkpoint(path, "fp")
    with pytest.raises(CheckpointError, match="another batcher run"):
        Checkpoint(path, "fp")
    first.close()
    Checkpoint(path, "fp").close()


def test_reopen_indexes_many_rows_and_keeps_each_rows_latest_line(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    positions = [5, 0, 123_456, 7, 5, 99, 0]
    with Checkpoint(path, "fp") as checkpoint:
        for step, position in enumerate(positions):
            result = ok(f"{position}-{step}") if step != 6 else RowResult.failed("HTTP 500", 6)
            checkpoint.append(position, result)
    with Checkpoint(path, "fp") as checkpoint:
        assert checkpoint.rows_recorded == 5
        assert [checkpoint.is_done(p) for p in (0, 5, 7, 99, 123_456, 1)] == [
            False, True, True, True, True, False]
        latest = checkpoint.read(0, 6)
        assert latest[5] is not None and latest[5]["reply"] == "5-4"
        assert latest[0] is not None and latest[0]["error"] == "HTTP 500"
        assert checkpoint.read(123_450, 123_460)[6] is not None  # past the others' span
        assert checkpoint.count_done(0, 123_457) == 4


def test_a_corrupt_line_in_the_middle_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "job.ckpt"
    with Checkpoint(path, "fp") as checkpoint:
        checkpoint.append(0, ok("zero"))
        checkpoint.append(1, ok("one"))
    lines = path.read_bytes().split(b"\n")
    lines[1] = b"garbage that is long enough to fill the head window of a line...."
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(CheckpointError, match="corrupt line at byte"):
        Checkpoint(path, "fp")
