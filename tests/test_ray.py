"""batcher on Ray (issue 16): ``batcher run JOB --ray`` and ``run_dataset`` on a local
Ray with 2 CPUs and 2 workers, against the mock server.

One Ray session serves the module (starting Ray costs seconds on two cores):
in-process runs find it started and join it. The workers inherit this
process's environment as it was when Ray started, so the keys they read are
set before that. The kill test runs ``batcher`` as a process of its own,
which starts a Ray of its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import (
    TEST_KEY,
    MakeMock,
    cli,
    cli_env,
    job_dict,
    prompt_text,
    ray_processes,
    run_job,
    wait_until,
    write_job,
)

ray = pytest.importorskip("ray")

from batcher.errors import DataError  # noqa: E402
from batcher.jobload import load_job  # noqa: E402
from batcher.mock_server import MockConfig, MockServer, reply_for  # noqa: E402
from batcher.raydata import journal_folder, run_dataset, run_job_on_ray  # noqa: E402
from batcher.store.answers import JOURNAL_GLOB  # noqa: E402 - after the skip when Ray is missing

pytestmark = pytest.mark.timeout(300)

WRONG_KEY_ENV = "BATCHER_RAY_WRONG_KEY"
RPM = 3000
WORKERS = 2
CONCURRENCY = 8


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    folder = tmp_path_factory.mktemp("ray")
    saved = {name: os.environ.get(name) for name in
             ("RAY_TMPDIR", "BATCHER_TEST_KEY", WRONG_KEY_ENV)}
    os.environ.update({"RAY_TMPDIR": str(folder), "BATCHER_TEST_KEY": TEST_KEY,
                       WRONG_KEY_ENV: "sk-wrong-0123456789abcdef"})
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(folder),
             logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def parquet_input(folder: Path, rows: int) -> Path:
    path = folder / "prompts.parquet"
    pd.DataFrame({"id": [f"row{i:04d}" for i in range(rows)],
                  "text": [prompt_text(i) for i in range(rows)]}).to_parquet(path)
    return path


def results_of(folder: Path) -> pd.DataFrame:
    return pd.read_parquet(folder).sort_values("id").reset_index(drop=True)


class Sampler:
    """Polls the mock's request count, to tell when sending started and ended."""

    def __init__(self, server: MockServer) -> None:
        self._server = server
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self._server.stats.requests_total))
            time.sleep(0.005)

    def rate_per_minute(self, skip: int, upto: int) -> float:
        """Requests per minute between the ``skip``-th and the ``upto``-th request."""
        start = next(moment for moment, count in self.samples if count >= skip)
        end = next(moment for moment, count in self.samples if count >= upto)
        return (upto - skip) * 60 / (end - start)


@pytest.fixture(scope="module")
def paced_run(ray_session: None, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[dict[str, Any]]:
    """One job with an RPM limit, run on Ray with 2 workers; what the server saw."""
    folder = tmp_path_factory.mktemp("paced")
    rows = 1000
    source = parquet_input(folder, rows)
    # The limit over 2 s windows: far shorter than a minute, and long enough that this
    # process's own stalls (the mock runs here, beside the driver) do not decide the test.
    server = MockServer(MockConfig(api_key=TEST_KEY, latency_s=0.05, requests_per_minute=RPM,
                                   window_s=2.0))
    server.start()
    try:
        job = write_job(folder / "job.yaml", job_dict(
            server.base_url, source, folder / "out" / "results.parquet",
            limits={"concurrency": CONCURRENCY, "requests_per_minute": RPM}))
        with Sampler(server) as sampler:
            ran = cli("run", str(job), "--ray", "--workers", str(WORKERS), "-q")
        yield {"ran": ran, "stats": server.stats.snapshot(), "sampler": sampler,
               "rows": rows, "job": job, "folder": folder, "source": source}
    finally:
        server.stop()


def test_the_cluster_stays_within_the_rate_limit_and_uses_it(paced_run: dict[str, Any]) -> None:
    ran = paced_run["ran"]
    assert ran.returncode == 0, ran.stderr
    stats = paced_run["stats"]
    assert stats["by_status"] == {200: paced_run["rows"]}, stats["by_status"]  # no 429
    # The pace once both workers send: from the 100th to the last-but-100th request.
    rate = paced_run["sampler"].rate_per_minute(100, paced_run["rows"] - 100)
    assert rate >= 0.9 * RPM, rate
    assert rate <= RPM * 1.01, rate
    journals = list(journal_folder_of(paced_run["job"]).glob(JOURNAL_GLOB))
    lines = [path.read_bytes().count(b"\n") for path in journals]
    assert sum(lines) == paced_run["rows"]
    assert len([count for count in lines if count]) == WORKERS, lines  # both workers sent


def journal_folder_of(job: Path) -> Path:
    return journal_folder(load_job(job))


def test_results_equal_a_run_on_one_machine(paced_run: dict[str, Any], make_mock: MakeMock
                                            ) -> None:
    folder: Path = paced_run["folder"]
    server = make_mock(api_key=TEST_KEY)
    single = folder / "single" / "results.parquet"
    run_job(job_dict(server.base_url, paced_run["source"], single), folder)
    on_one = pd.read_parquet(single).sort_values("id").reset_index(drop=True)
    on_ray = results_of(folder / "out" / "results.parquet")
    assert len(on_ray) == paced_run["rows"]
    assert list(on_ray.columns) == list(on_one.columns)
    compared = [name for name in on_one.columns if name not in ("latency_s", "finished_at")]
    assert on_ray["finished_at"].notna().all()
    pd.testing.assert_frame_equal(on_ray[compared], on_one[compared], check_dtype=False)
    assert "results.parquet/" in paced_run["ran"].stdout


def test_a_second_run_sends_nothing_and_writes_the_same_rows(paced_run: dict[str, Any],
                                                             make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY)
    folder: Path = paced_run["folder"]
    job = write_job(folder / "again.yaml", job_dict(
        server.base_url, paced_run["source"], folder / "out" / "results.parquet",
        limits={"concurrency": CONCURRENCY, "requests_per_minute": RPM}))
    ran = cli("run", str(job), "--ray", "-q")
    assert ran.returncode == 0, ran.stderr
    assert server.stats.requests_total == 0
    assert f"{paced_run['rows']:,} reused from the checkpoint" in ran.stderr
    assert len(results_of(folder / "out" / "results.parquet")) == paced_run["rows"]


def test_a_bad_key_stops_the_run_with_exit_3(ray_session: None, tmp_path: Path,
                                             make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY)
    source = parquet_input(tmp_path, 400)
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, source, tmp_path / "out" / "results.parquet",
        endpoint={"api_key_env": WRONG_KEY_ENV}, limits={"concurrency": CONCURRENCY}))
    ran = cli("run", str(job), "--ray", "--workers", str(WORKERS), "-q",
              env=cli_env({WRONG_KEY_ENV: "sk-wrong-0123456789abcdef"}))
    assert ran.returncode == 3, (ran.stdout, ran.stderr)
    assert "401" in ran.stderr or "key" in ran.stderr
    assert "sk-wrong-0123456789abcdef" not in ran.stderr + ran.stdout
    assert server.stats.requests_total <= WORKERS * CONCURRENCY + 4
    assert not (tmp_path / "out" / "results.parquet").exists()


def test_run_dataset_adds_the_result_columns(ray_session: None, tmp_path: Path,
                                             make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY)
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(60)],
                          "text": [prompt_text(i) for i in range(60)]})
    dataset = ray.data.from_pandas(frame).repartition(4)
    out = run_dataset(dataset, model="gpt-4o-mini", prompt_column="text",
                      base_url=server.base_url, api_key_env="BATCHER_TEST_KEY",
                      requests_per_minute=6000, checkpoint=tmp_path / "answers")
    got = out.to_pandas()
    assert sorted(got["id"]) == sorted(frame["id"])
    assert (got["status"] == "ok").all()
    assert list(got["reply"]) == [reply_for(text) for text in got["text"]]
    assert server.stats.requests_total == 60
    again = run_dataset(dataset, model="gpt-4o-mini", prompt_column="text",
                        base_url=server.base_url, api_key_env="BATCHER_TEST_KEY",
                        checkpoint=tmp_path / "answers").to_pandas()
    assert server.stats.requests_total == 60  # answered from the journal
    assert sorted(again["reply"]) == sorted(got["reply"])


LABELS: dict[str, Any] = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["positive", "neutral", "negative"]},
                   "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                   "fine": {"type": "boolean"}},
    "required": ["label", "stars", "fine"],
    "additionalProperties": False,
}
INSTRUCTION = "It must conform to this JSON Schema"  # how prompt mode asks for the schema


def test_a_schema_job_on_ray_asks_for_the_schema_and_gets_its_columns(
        ray_session: None, tmp_path: Path, make_mock: MakeMock) -> None:
    rows = 24
    source = parquet_input(tmp_path, rows)

    def schema_job(base_url: str, results: Path) -> dict[str, Any]:
        return job_dict(base_url, source, results,
                        output={"path": str(results), "schema": LABELS, "schema_mode": "prompt"},
                        params={"temperature": 0, "max_tokens": 64, "n": 2})

    on_ray = make_mock(api_key=TEST_KEY)
    job = write_job(tmp_path / "job.yaml",
                    schema_job(on_ray.base_url, tmp_path / "ray" / "results.parquet"))
    _job, report = run_job_on_ray(job, progress=False)
    assert report.failed_rows == 0
    seen = on_ray.stats.snapshot()
    assert seen["answer_formats"] == {"prompt+schema": rows}  # the mock found the schema
    assert all(INSTRUCTION in prompt for prompt in seen["prompts"])
    single = tmp_path / "one" / "results.parquet"
    one_machine = make_mock(api_key=TEST_KEY)
    run_job(schema_job(one_machine.base_url, single), tmp_path)
    assert one_machine.stats.snapshot()["prompts"] == seen["prompts"]  # the same requests
    ray_frame = results_of(tmp_path / "ray" / "results.parquet")
    one_frame = pd.read_parquet(single).sort_values("id").reset_index(drop=True)
    assert list(ray_frame.columns) == list(one_frame.columns)
    assert list(ray_frame.columns)[-4:] == ["replies", "label", "stars", "fine"]
    assert dict(ray_frame.dtypes) == dict(one_frame.dtypes)
    assert str(ray_frame["stars"].dtype) == "Int64"
    assert isinstance(ray_frame["label"].dtype, pd.CategoricalDtype)
    assert all(len(replies) == 2 for replies in ray_frame["replies"])
    compared = [name for name in one_frame.columns
                if name not in ("latency_s", "finished_at", "replies")]
    pd.testing.assert_frame_equal(ray_frame[compared], one_frame[compared])
    assert [list(replies) for replies in ray_frame["replies"]] == [
        list(replies) for replies in one_frame["replies"]]


def test_run_dataset_takes_the_schema_keywords(ray_session: None, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY)
    frame = pd.DataFrame({"text": [prompt_text(i) for i in range(8)]})
    out = run_dataset(ray.data.from_pandas(frame), model="gpt-4o-mini", prompt_column="text",
                      base_url=server.base_url, api_key_env="BATCHER_TEST_KEY",
                      schema=LABELS, schema_mode="prompt", schema_prefix="ans_").to_pandas()
    assert (out["status"] == "ok").all()
    assert list(out.columns)[-3:] == ["ans_label", "ans_stars", "ans_fine"]
    assert out["ans_stars"].between(1, 5).all()
    assert server.stats.snapshot()["answer_formats"] == {"prompt+schema": 8}


def test_a_dataset_column_named_like_a_result_column_is_refused(ray_session: None) -> None:
    frame = pd.DataFrame({"text": ["a"], "ans_label": ["mine"]})
    with pytest.raises(DataError, match="property 'label' would be the column 'ans_label'"):
        run_dataset(ray.data.from_pandas(frame), model="m", prompt_column="text",
                    base_url="http://127.0.0.1:9", api_key_env="BATCHER_TEST_KEY",
                    schema=LABELS, schema_prefix="ans_")


def test_import_batcher_loads_no_ray() -> None:
    code = ("import sys, batcher, batcher.cli, batcher.limits.budget, batcher.store.answers; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- a driver killed mid-run ----------------------------------------------------------------


def test_a_killed_driver_resends_at_most_what_was_in_flight(ray_session: None, tmp_path: Path,
                                                             make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY, latency_s=0.2, requests_per_minute=2400,
                       window_s=1.0)
    rows = 600
    source = parquet_input(tmp_path, rows)
    output = tmp_path / "out" / "results.parquet"
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, source, output,
        limits={"concurrency": CONCURRENCY, "requests_per_minute": 2400}))
    folder = journal_folder_of(job)
    marker = tempfile.mkdtemp(prefix="bray", dir="/tmp")  # Ray's socket paths must be short
    process = subprocess.Popen(
        [sys.executable, "-m", "batcher", "run", str(job), "--ray", "-q", "--workers",
         str(WORKERS)], env=cli_env({"RAY_TMPDIR": marker}), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)

    def journaled() -> int:
        return sum(path.read_bytes().count(b"\n") for path in folder.glob(JOURNAL_GLOB))

    try:
        wait_until(lambda: journaled() >= 150, process, timeout=180, what="150 rows journaled")
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    # The workers die with their driver; wait until nothing more arrives.
    settled = -1
    while settled != server.stats.requests_total:
        settled = server.stats.requests_total
        time.sleep(2)
    for pid in ray_processes(marker):  # Ray's agents may outlive a killed driver briefly
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(marker, ignore_errors=True)
    before = server.stats.snapshot()["prompts"]
    done_before = journaled()
    assert 150 <= done_before < rows
    ran = cli("run", str(job), "--ray", "-q", "--workers", str(WORKERS))
    assert ran.returncode == 0, ran.stderr
    after = server.stats.snapshot()["prompts"]
    resent = {prompt: after[prompt] - count for prompt, count in before.items()
              if after[prompt] > count}
    # Rows journaled before the kill were never sent again; at most the requests then in
    # flight (every worker's concurrency) were.
    assert len(resent) <= WORKERS * CONCURRENCY, len(resent)
    assert sum(after.values()) - sum(before.values()) <= rows - done_before + len(resent)
    assert len(results_of(output)) == rows
    assert (results_of(output)["status"] == "ok").all()


def test_sigterm_stops_the_driver_with_exit_143_and_the_rows_kept(tmp_path: Path,
                                                                   make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY, latency_s=0.2, requests_per_minute=1200)
    rows = 400
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, parquet_input(tmp_path, rows), tmp_path / "out" / "results.parquet",
        limits={"concurrency": CONCURRENCY, "requests_per_minute": 1200}))
    folder = journal_folder_of(job)
    marker = tempfile.mkdtemp(prefix="bray", dir="/tmp")  # Ray's socket paths must be short
    process = subprocess.Popen(
        [sys.executable, "-m", "batcher", "run", str(job), "--ray", "-q"],
        env=cli_env({"RAY_TMPDIR": marker}), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)

    def journaled() -> int:
        return sum(path.read_bytes().count(b"\n") for path in folder.glob(JOURNAL_GLOB))

    try:
        wait_until(lambda: journaled() >= 20, process, timeout=180, what="20 rows journaled")
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        shutil.rmtree(marker, ignore_errors=True)
    assert process.returncode == 143, err
    assert "stopped by SIGTERM" in err and "run the same command again" in err
    assert 20 <= journaled() < rows
    assert not (tmp_path / "out" / "results.parquet").exists()
