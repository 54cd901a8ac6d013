"""Every way of sending the key, every URL shape, and real-world response quirks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import (
    TEST_KEY,
    MakeMock,
    cell,
    cli,
    cli_env,
    job_dict,
    prompts_csv,
    run_job,
    write_csv,
    write_job,
)

from batcher.errors import RunAborted
from batcher.mock_server import MockServer, reply_for
from batcher.mock_server.stats import PRESENT


@pytest.mark.parametrize(("auth", "where"), [
    # The mock requires TEST_KEY (a wrong one is a 401), and its stats keep only that
    # a key was there.
    (None, ("authorization", f"Bearer {PRESENT}")),
    ({"header": "api-key"}, ("api-key", PRESENT)),
    ({"header": "X-Api-Key"}, ("x-api-key", PRESENT)),
])
def test_key_in_a_header(tmp_path: Path, make_mock: MakeMock, auth: dict[str, str] | None,
                         where: tuple[str, str]) -> None:
    server: MockServer = make_mock(api_key=TEST_KEY)
    endpoint: dict[str, Any] = {"headers": {"OpenAI-Organization": "org-test",
                                            "HTTP-Referer": "https://example.org/batcher"}}
    if auth:
        endpoint["auth"] = auth
    report = run_job(job_dict(server.base_url, prompts_csv(tmp_path, 3), tmp_path / "o.csv",
                              endpoint=endpoint), tmp_path)
    assert report.exit_code == 0
    headers = server.stats.snapshot()["headers_seen"][-1]
    assert headers[where[0]] == where[1]
    assert headers["openai-organization"] == "org-test"
    assert headers["http-referer"] == "https://example.org/batcher"
    if auth:
        assert "authorization" not in headers


def test_key_as_query_parameter_is_redacted_everywhere(tmp_path: Path, make_mock: MakeMock) -> None:
    server: MockServer = make_mock(api_key=TEST_KEY, echo_key_in_errors=True)
    source = write_csv(tmp_path / "in.csv", ["id", "text"],
                       [["a", "fine"], ["b", "[[fault:400]] echoes the key"]])
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, source, tmp_path / "out.csv", endpoint={"auth": {"query": "api_key"}}))
    result = cli("run", str(job))
    assert result.returncode == 1, result.stderr
    assert f"api_key={PRESENT}" in server.stats.snapshot()["paths_seen"][-1]
    # Unreachable server: the connection error names the URL, with the key masked.
    dead = write_job(tmp_path / "dead.yaml", job_dict(
        "http://127.0.0.1:9/v1", source, tmp_path / "dead.csv",
        endpoint={"auth": {"query": "api_key"}, "timeout_s": 1},
        retry={"max_attempts": 1}))
    unreachable = cli("run", str(dead))
    assert unreachable.returncode == 1
    texts = [result.stdout, result.stderr, unreachable.stdout, unreachable.stderr,
             (tmp_path / "out.csv").read_text(), (tmp_path / "out.ckpt").read_text(),
             (tmp_path / "dead.csv").read_text()]
    assert all(TEST_KEY not in text for text in texts)
    assert "connection error" in (tmp_path / "dead.csv").read_text()


def test_azure_deployment_url_and_api_key_header(tmp_path: Path, make_mock: MakeMock) -> None:
    server: MockServer = make_mock(api_key=TEST_KEY)
    report = run_job(job_dict(server.root_url, prompts_csv(tmp_path, 2), tmp_path / "o.csv",
                              endpoint={"azure": {"deployment": "gpt4o-prod",
                                                  "api_version": "2024-10-21"}}), tmp_path)
    assert report.exit_code == 0
    stats = server.stats.snapshot()
    assert stats["paths_seen"][-1] == (
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21")
    assert stats["headers_seen"][-1]["api-key"] == PRESENT


def test_azure_v1_url(tmp_path: Path, make_mock: MakeMock) -> None:
    server: MockServer = make_mock(api_key=TEST_KEY)
    report = run_job(job_dict(f"{server.root_url}/openai/v1", prompts_csv(tmp_path, 2),
                              tmp_path / "o.csv", endpoint={"auth": {"header": "api-key"}}),
                     tmp_path)
    assert report.exit_code == 0
    assert server.stats.snapshot()["paths_seen"][-1] == "/openai/v1/chat/completions"


def test_real_world_response_shapes(tmp_path: Path, make_mock: MakeMock) -> None:
    server: MockServer = make_mock(api_key=TEST_KEY, fault_retry_after_s=0.01)
    rows = {
        "loading": "[[fault:llama_loading*2]] model still loading",
        "azure429": "[[fault:azure_429*1]] azure throttled",
        "html502": "[[fault:502_html*1]] proxy page",
        "detail": "[[fault:detail_500*1]] python server error",
        "empty": "[[fault:empty_choices*1]] no choices",
        "err200": "[[fault:error_200*1]] error in a 200",
        "nousage": "[[fault:no_usage]] no usage",
        "refusal": "[[fault:null_content_refusal]] refuse",
        "filter": "[[fault:content_filter]] filtered",
        "length": "[[fault:length]] cut short",
        "azfilter": "[[fault:azure_filter]] azure filter",
        "context": "[[fault:context]] too long",
    }
    source = write_csv(tmp_path / "in.csv", ["id", "text"], [[k, v] for k, v in rows.items()])
    report = run_job(job_dict(server.base_url, source, tmp_path / "out.parquet",
                              retry={"max_attempts": 4}), tmp_path)
    assert report.exit_code == 1
    frame = pd.read_parquet(tmp_path / "out.parquet").set_index("id")
    for retried in ("loading", "azure429", "html502", "detail", "empty", "err200"):
        assert cell(frame, retried, "status") == "ok", cell(frame, retried, "error")
        assert cell(frame, retried, "reply") == reply_for(rows[retried])
    assert cell(frame, "loading", "attempts") == 3
    assert cell(frame, "nousage", "status") == "ok"
    assert pd.isna(cell(frame, "nousage", "prompt_tokens"))
    assert cell(frame, "refusal", "status") == "ok" and pd.isna(cell(frame, "refusal", "reply"))
    assert isinstance(cell(frame, "refusal", "refusal"), str)
    assert cell(frame, "filter", "finish_reason") == "content_filter"
    assert cell(frame, "length", "finish_reason") == "length"
    for failed in ("azfilter", "context"):
        assert cell(frame, failed, "status") == "error" and cell(frame, failed, "attempts") == 1
    assert "content_filter" in cell(frame, "azfilter", "error")
    assert "context_length_exceeded" in cell(frame, "context", "error")


def test_vllm_style_unauthorized_aborts(tmp_path: Path, make_mock: MakeMock) -> None:
    server: MockServer = make_mock()
    source = write_csv(tmp_path / "in.csv", ["id", "text"],
                       [[f"r{i}", f"[[fault:vllm_401]] {i}"] for i in range(100)])
    with pytest.raises(RunAborted, match="HTTP 401"):
        run_job(job_dict(server.base_url, source, tmp_path / "o.csv"), tmp_path)
    assert server.stats.snapshot()["requests_total"] <= 12


def test_openai_sdk_parses_what_the_mock_sends(make_mock: MakeMock) -> None:
    openai = pytest.importorskip("openai")
    server: MockServer = make_mock(api_key=TEST_KEY)
    client = openai.OpenAI(base_url=server.base_url, api_key=TEST_KEY, max_retries=0)
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}],
        max_tokens=50)
    assert completion.choices[0].message.content == reply_for("hello there")
    assert completion.usage is not None and completion.usage.total_tokens > 0


def test_requests_go_through_the_proxy_from_the_environment(tmp_path: Path,
                                                            make_mock: MakeMock) -> None:
    proxy: MockServer = make_mock(api_key=TEST_KEY)  # answers whatever it is asked to forward
    job = write_job(tmp_path / "job.yaml", job_dict(
        "http://127.0.0.2:9/v1", prompts_csv(tmp_path, 4), tmp_path / "out.csv",
        retry={"max_attempts": 1}))
    env = {"HTTP_PROXY": proxy.root_url, "NO_PROXY": "", "no_proxy": ""}
    result = cli("run", str(job), "-q", env=cli_env(env))
    assert result.returncode == 0, result.stderr
    assert proxy.stats.snapshot()["requests_total"] == 4
    bypassed = cli("run", str(job), "-q", "--fresh",
                       env=cli_env({**env, "NO_PROXY": "127.0.0.2", "no_proxy": "127.0.0.2"}))
    assert bypassed.returncode == 1  # straight to 127.0.0.2:9, where nothing listens
    assert proxy.stats.snapshot()["requests_total"] == 4
