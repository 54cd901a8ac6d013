"""Rows keyed by their request (issue 11): a rerun over a changed input sends
exactly the rows whose request is new, and the results hold one row per
input id with the right answer. Every test counts requests at the mock."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import TEST_KEY, job_dict, write_csv, write_job

import batcher
from batcher.cli import main
from batcher.mock_server import MockServer, reply_for

CONCURRENCY = 4


def rows(count: int, start: int = 0) -> list[list[str]]:
    return [[f"id{i:03d}", f"Question {i}: what is {i} plus {i}?"] for i in range(start, count)]


class Job:
    """A job file over a CSV in ``folder``, run in-process through the CLI."""

    def __init__(self, folder: Path, server: MockServer, data: list[list[str]],
                 **overrides: Any) -> None:
        self.folder, self.server = folder, server
        self.input = folder / "in.csv"
        self.output = folder / "out.csv"
        self.spec = job_dict(server.base_url, self.input, self.output,
                             limits={"concurrency": CONCURRENCY}, **overrides)
        self.path = folder / "job.yaml"
        self.write(data)

    def write(self, data: list[list[str]], **changes: Any) -> None:
        write_csv(self.input, ["id", "text"], data)
        for key, value in changes.items():
            self.spec[key] = {**self.spec[key], **value} if isinstance(value, dict) else value
        write_job(self.path, self.spec)

    def run(self, *args: str) -> tuple[Counter[str], str]:
        """Run it; the prompts sent (counted at the mock) and what stderr said."""
        before = Counter(self.server.stats.snapshot()["prompts"])
        result = CliRunner().invoke(main, ["run", str(self.path), "-q", *args],
                                    env={"BATCHER_TEST_KEY": TEST_KEY})
        assert result.exit_code == 0, result.output + result.stderr
        return Counter(self.server.stats.snapshot()["prompts"]) - before, result.stderr

    def results(self) -> list[dict[str, str]]:
        with self.output.open(encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle))


def check_results(job: Job, data: list[list[str]]) -> list[dict[str, str]]:
    """Exactly one row per input row, in input order, each with its own answer."""
    found = job.results()
    assert [row["id"] for row in found] == [row_id for row_id, _text in data]
    for row, (_row_id, text) in zip(found, data, strict=True):
        assert row["text"] == text and row["status"] == "ok"
        assert row["reply"] == reply_for(text)
    return found


def sources(found: list[dict[str, str]]) -> Counter[str]:
    return Counter(row["source"] for row in found)


@pytest.fixture
def server(make_mock: Any) -> MockServer:
    started: MockServer = make_mock(api_key=TEST_KEY)
    return started


def test_appended_rows_alone_are_sent(tmp_path: Path, server: MockServer) -> None:
    data = rows(30)
    job = Job(tmp_path, server, data)
    sent, _ = job.run()
    assert sum(sent.values()) == 30
    first = {row["id"]: row for row in check_results(job, data)}

    data = rows(31)
    job.write(data)
    sent, stderr = job.run()
    assert sent == Counter({data[30][1]: 1})
    assert "1 sent, 30 reused from the checkpoint" in stderr
    found = check_results(job, data)
    assert sources(found) == Counter({"reused": 30, "sent": 1})
    for row in found[:30]:  # the stored answer, usage and latency, as first received
        for column in ("reply", "total_tokens", "latency_s", "attempts"):
            assert row[column] == first[row["id"]][column]


def test_an_edited_row_is_sent_again_and_gets_its_new_answer(tmp_path: Path,
                                                             server: MockServer) -> None:
    data = rows(20)
    job = Job(tmp_path, server, data)
    job.run()
    data[7] = [data[7][0], "Question 7, reworded: what is seven plus seven?"]
    job.write(data)
    sent, _ = job.run()
    assert sent == Counter({data[7][1]: 1})
    found = check_results(job, data)
    assert found[7]["source"] == "sent" and sources(found)["reused"] == 19


def test_deleted_rows_leave_the_results_and_their_answers_stay_stored(
        tmp_path: Path, server: MockServer) -> None:
    data = rows(20)
    job = Job(tmp_path, server, data)
    job.run()
    fewer = [row for index, row in enumerate(data) if index not in (3, 11)]
    job.write(fewer)
    sent, _ = job.run()
    assert not sent
    check_results(job, fewer)
    job.write(data)  # they come back: answered from the store, not sent
    sent, _ = job.run()
    assert not sent
    assert sources(check_results(job, data)) == Counter({"reused": 20})


def test_reordered_rows_send_nothing_and_keep_their_answers(tmp_path: Path,
                                                          server: MockServer) -> None:
    data = rows(25)
    job = Job(tmp_path, server, data)
    job.run()
    shuffled = data[:]
    random.Random(3).shuffle(shuffled)
    job.write(shuffled)
    sent, _ = job.run()
    assert not sent
    check_results(job, shuffled)


def test_a_model_change_resends_every_row_and_changing_back_sends_none(
        tmp_path: Path, server: MockServer) -> None:
    data = rows(15)
    job = Job(tmp_path, server, data)
    job.run()
    job.write(data, model="gpt-4o")
    sent, _ = job.run()
    assert sent == Counter({text: 1 for _row_id, text in data})
    assert sources(check_results(job, data)) == Counter({"sent": 15})
    job.write(data, model="gpt-4o-mini")
    sent, _ = job.run()
    assert not sent


def test_a_template_or_param_change_resends_exactly_the_changed_requests(
        tmp_path: Path, server: MockServer) -> None:
    data = rows(10)
    job = Job(tmp_path, server, data)
    job.run()
    job.write(data, params={"temperature": 0.5})
    sent, _ = job.run()
    assert sum(sent.values()) == 10
    # A template that renders two rows differently re-sends those two only.
    notes = {2: " Show your work.", 4: " Answer in words."}
    write_csv(job.input, ["id", "text", "note"],
              [[row_id, text, notes.get(index, "")] for index, (row_id, text) in enumerate(data)])
    job.spec["prompt"] = {"template": "{text}{note}", "missing": "empty"}
    write_job(job.path, job.spec)
    sent, _ = job.run()
    assert sent == Counter({data[2][1] + notes[2]: 1, data[4][1] + notes[4]: 1})
    found = job.results()
    assert [row["source"] for row in found].count("sent") == 2
    assert found[2]["reply"] == reply_for(data[2][1] + notes[2])


def test_changing_limits_retry_timeout_or_url_sends_nothing(
        tmp_path: Path, server: MockServer, make_mock: Any) -> None:
    data = rows(12)
    job = Job(tmp_path, server, data)
    job.run()
    other: MockServer = make_mock(api_key=TEST_KEY)
    job.write(data, limits={"concurrency": 2, "requests_per_minute": 6000},
              retry={"max_attempts": 2}, endpoint={"timeout_s": 30,
                                                   "base_url": other.base_url})
    sent, _ = job.run()
    assert not sent and other.stats.snapshot()["requests_total"] == 0
    check_results(job, data)


def test_duplicate_prompts_are_each_sent_unless_the_job_shares_them(
        tmp_path: Path, server: MockServer) -> None:
    same = "Say the word 'echo'."
    data = [*rows(6), ["dup-a", same], ["dup-b", same], ["dup-c", same]]
    job = Job(tmp_path, server, data)
    sent, _ = job.run()
    assert sent[same] == 3 and sum(sent.values()) == 9

    (tmp_path / "share").mkdir()
    shared = Job(tmp_path / "share", server, data, duplicates="share")
    dry = CliRunner().invoke(main, ["run", str(shared.path), "--dry-run"],
                             env={"BATCHER_TEST_KEY": TEST_KEY})
    assert "7 to send, 0 reused from the checkpoint, 2 sharing" in dry.output
    sent, stderr = shared.run()
    assert sent[same] == 1 and sum(sent.values()) == 7
    assert "7 sent, 2 shared with identical rows" in stderr
    found = check_results(shared, data)
    assert [row["source"] for row in found[6:]] == ["sent", "shared", "shared"]
    # The shared answers are stored under each row's own key: a rerun sends nothing.
    sent, stderr = shared.run()
    assert not sent and "0 sent, 9 reused from the checkpoint" in stderr


def test_dry_run_counts_what_would_be_sent_and_reused(tmp_path: Path,
                                                      server: MockServer) -> None:
    data = rows(30)
    job = Job(tmp_path, server, data)
    job.run()
    job.write(rows(31))
    result = CliRunner().invoke(main, ["run", str(job.path), "--dry-run"],
                                env={"BATCHER_TEST_KEY": TEST_KEY})
    assert result.exit_code == 0
    assert "31 rows (1 to send, 30 reused from the checkpoint)" in result.output
    assert "at most 64 completion tokens" in result.output  # max_tokens 64, one row


@pytest.mark.parametrize("keep", ["checkpoint", "session"])
def test_a_dataframe_that_grew_sends_only_its_new_rows(tmp_path: Path, server: MockServer,
                                                        keep: str) -> None:
    settings: dict[str, Any] = {"model": "gpt-4o-mini", "prompt_column": "text",
                                "base_url": server.base_url, "api_key": TEST_KEY,
                                "progress": False}
    if keep == "checkpoint":
        settings["checkpoint"] = tmp_path / "frame.ckpt"
    frame = pd.DataFrame({"text": [text for _row_id, text in rows(10)]})
    batcher.run_dataframe(frame, **settings)
    before = Counter(server.stats.snapshot()["prompts"])
    grown = pd.DataFrame({"text": [text for _row_id, text in rows(13)]})
    out = batcher.run_dataframe(grown, **settings)
    sent = Counter(server.stats.snapshot()["prompts"]) - before
    assert sent == Counter({text: 1 for _row_id, text in rows(13, start=10)})
    assert list(out["reply"]) == [reply_for(text) for text in grown["text"]]
    assert list(out["source"]) == ["reused"] * 10 + ["sent"] * 3
    assert out.attrs["batcher"]["from_checkpoint"] == 10 and out.attrs["batcher"]["sent"] == 3


def test_sigkill_in_a_rerun_over_a_changed_input_resends_only_in_flight(
        tmp_path: Path, make_mock: Any) -> None:
    server: MockServer = make_mock(api_key=TEST_KEY, latency_s=0.03)
    data = rows(60)
    job = Job(tmp_path, server, data)
    job.run()
    changed = [*rows(120)]
    for index in (5, 17, 33):
        changed[index] = [changed[index][0], f"Edited question {index}."]
    job.write(changed)
    before = Counter(server.stats.snapshot()["prompts"])
    checkpoint = tmp_path / "out.ckpt"
    lines_before = checkpoint.read_bytes().count(b"\n")
    process = subprocess.Popen([sys.executable, "-m", "batcher", "run", str(job.path), "-q"],
                               env={**os.environ, "BATCHER_TEST_KEY": TEST_KEY},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while checkpoint.read_bytes().count(b"\n") < lines_before + 25:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the rerun made no progress"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not job.output.with_name(".out.csv.tmp").exists()

    job.run()
    found = check_results(job, changed)
    sent = Counter(server.stats.snapshot()["prompts"]) - before
    new = {text for _row_id, text in changed} - {text for _row_id, text in data}
    assert set(sent) == new  # unchanged rows were never sent, by either run
    resent = sum(count - 1 for count in sent.values())
    assert resent <= CONCURRENCY, resent  # only what was in flight at the kill
    assert sources(found)["reused"] >= 57
