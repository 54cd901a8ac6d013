"""`mode: batch` reads and keys its input once per run, whatever the cycle does.

The run is given an input reader that counts the passes over the file (an
``InputReader`` subclass, handed in through ``Prepared.reader``) and talks to
the mock's Files and Batches API over loopback. A run that plans, submits,
polls and collects reads the input twice: the one keyed pass and the results
write (a run whose results are up to date reads it once). A round of lines a
batch left unfinished is taken from its shard file, not from the input.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
from conftest import ENV, TEST_KEY, MakeMock, job_dict, write_csv, write_job

from batcher.batch.cycle import BatchRun
from batcher.io.inputs import InputReader
from batcher.jobload import load_job
from batcher.jobs import check_job, endpoint_for
from batcher.mock_server import MockServer, reply_for
from batcher.online.runner import RunOptions, RunReport, Runtime
from batcher.store.checkpoint import Checkpoint

PROMPTS = [f"Prompt number {i}" for i in range(12)]


class CountingReader(InputReader):
    """Counts the passes over the input file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads = 0

    def batches(self) -> Iterator[pa.RecordBatch]:
        self.reads += 1
        yield from super().batches()


def batch_job(folder: Path, server: MockServer, prompts: list[str]) -> Path:
    source = write_csv(folder / "in.csv", ["id", "text"],
                       [[f"r{i:03d}", text] for i, text in enumerate(prompts)])
    job = job_dict(server.base_url, source, folder / "out.csv", mode="batch",
                   batch={"poll_interval_s": 0.05, "max_requests_per_file": 5})
    return write_job(folder / "job.yaml", job)


def run_counted(job_path: Path, said: list[str], *, wait: bool) -> tuple[RunReport, int]:
    """One invocation of the batch cycle; its report and how often it read the input."""
    job = load_job(job_path)
    assert job.output is not None
    reader = CountingReader(job.input.path)
    prepared = dataclasses.replace(check_job(job, environ=ENV), reader=reader)
    options = RunOptions(progress=False, handle_signals=False, wait=wait)
    with endpoint_for(job, ENV) as (endpoint, redactor), Checkpoint(
            job.output.checkpoint_path) as checkpoint:
        run = BatchRun(prepared, endpoint, redactor, checkpoint, options, Runtime(),
                       say=said.append)
        report = asyncio.run(run.execute())
    return report, reader.reads


def replies(folder: Path) -> list[str]:
    return list(pd.read_csv(folder / "out.csv")["reply"])


def test_a_whole_cycle_reads_the_input_once_and_once_more_to_write(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY)
    said: list[str] = []
    report, reads = run_counted(batch_job(tmp_path, server, PROMPTS), said, wait=True)
    assert "planned 3 batch files with 12 requests" in said
    assert report.failed_rows == 0 and report.rows == 12
    assert reads == 2, "one keyed pass, one pass to write the results"
    assert replies(tmp_path) == [reply_for(text) for text in PROMPTS]


def test_unfinished_lines_go_again_from_their_shard_file_not_the_input(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY)
    prompts = [*PROMPTS[:4], "[[batch:slow*1]] late one", "[[batch:slow*1]] late two"]
    said: list[str] = []
    report, reads = run_counted(batch_job(tmp_path, server, prompts), said, wait=True)
    assert "planned 1 batch file with 2 requests" in said, said
    assert server.stats.snapshot()["counters"]["batches_created"] == 3
    assert report.failed_rows == 0
    assert reads == 2
    assert replies(tmp_path) == [reply_for(text) for text in prompts]


def test_submitting_and_collecting_in_two_runs_key_the_input_once_each(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY, batch_phase_s=0.2)
    job = batch_job(tmp_path, server, PROMPTS)
    said: list[str] = []
    submitted, reads = run_counted(job, said, wait=False)
    assert submitted.pending is not None and reads == 1
    collected, reads = run_counted(job, said, wait=True)
    assert collected.pending is None and collected.failed_rows == 0
    assert reads == 2
    assert collected.stats.reused == 0, "answers collected now were sent by this cycle"
    again, reads = run_counted(job, said, wait=True)  # nothing to do: the results stand
    assert again.stats.reused == 12 and not again.results_rewritten and reads == 1
    assert server.stats.snapshot()["counters"]["batches_created"] == 3
