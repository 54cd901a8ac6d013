"""Budgets against a hostile or careless world (issue 20, items 9-11): every
component of a price is paid for, a server's usage is not believed when it
cannot be right, and requests that got no answer are not forgotten by the
next run. Each test talks HTTP over loopback to the mock server or to a tiny
aiohttp server of its own."""

from __future__ import annotations

import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from conftest import MakeMock, cli, job_dict, one_error_line, prompts_csv, read_journal, write_job
from security_servers import ServerThread

from batcher.mock_server import FaultRule, MockServer


def _job(tmp_path: Path, base_url: str, rows: int, **overrides: Any) -> Path:
    data = job_dict(base_url, prompts_csv(tmp_path, rows), tmp_path / "out.csv", **overrides)
    return write_job(tmp_path / "job.yaml", data)


def _requests(server: MockServer) -> int:
    return int(server.stats.snapshot()["requests_total"])


def _worst_case_body(model: str, row: int, max_tokens: int = 64) -> int:
    """The request body's length in bytes: the budget's bound on its prompt tokens."""
    return len(orjson.dumps({"model": model, "messages": [
        {"role": "user", "content": f"Prompt number {row}: say something."}],
        "temperature": 0, "max_tokens": max_tokens}))


# -- item 9 ------------------------------------------------------------------------------------


def test_item9_a_per_request_fee_is_priced_in_estimate_reservation_and_cost(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key="sk-test-0123456789abcdefSECRET")
    # Perplexity's sonar: $1 per million tokens each way, and $12 per thousand requests.
    job = _job(tmp_path, server.base_url, 300, model="sonar",
               pricing={"provider": "perplexity"},
               limits={"concurrency": 8, "max_cost_usd": 0.05})

    dry = cli("run", str(job), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    at_most = re.search(r"cost: at most \$([\d,.]+) at .*\$12 per thousand requests", dry.stdout)
    assert at_most, dry.stdout
    assert float(at_most.group(1).replace(",", "")) >= 300 * 0.012  # $3.60 in fees alone

    run = cli("run", str(job), "-q")
    assert run.returncode == 3, run.stderr
    assert "budget reached before the next request" in run.stderr
    # Each request reserves its fee too: $0.05 pays for four $0.012 fees, not 270 requests.
    assert 0 < _requests(server) <= int(0.05 // 0.012)
    records = read_journal(tmp_path / "out.ckpt")[1]
    assert records and all(record["cost_usd"] >= 0.012 for record in records), records

    # A price with a component no reply reports: the budget cannot hold, so it is refused.
    refusals: list[tuple[str, str, dict[str, Any], str]] = [
        ("gpt-audio", "openai", {}, "output audio tokens"),
        ("sonar-deep-research", "perplexity", {}, "output citation tokens"),
        ("gpt-4o-mini", "openai", {"web_search_options": {}}, "web searches")]
    for model, provider, params, component in refusals:
        refused = cli("run", str(_job(tmp_path, server.base_url, 3, model=model,
                                      pricing={"provider": provider},
                                      params={"max_tokens": 64, **params},
                                      limits={"max_cost_usd": 1.0})), "-q")
        assert refused.returncode == 2, refused
        line = one_error_line(refused.stderr)
        assert "limits.max_cost_usd: cannot keep to a budget" in line and component in line
    assert _requests(server) <= int(0.05 // 0.012)  # nothing more was sent


# -- item 10 -----------------------------------------------------------------------------------


class _LyingServer(ServerThread):
    """An OpenAI-compatible server whose answers carry usage that cannot be right."""

    USAGES = (
        {"prompt_tokens": -1_000_000, "completion_tokens": -5, "total_tokens": -1_000_005},
        {"prompt_tokens": 10**12, "completion_tokens": 10**12, "total_tokens": 2 * 10**12},
        {"prompt_tokens": 9, "completion_tokens": 10**9, "total_tokens": 10**9 + 9},
        {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14,
         "prompt_tokens_details": {"cached_tokens": 10**6}},
    )

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0
        self.port = 0

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        usage = self.USAGES[self.requests % len(self.USAGES)]
        self.requests += 1
        return web.json_response({
            "id": "chatcmpl-lie", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "fine"}}],
            "usage": usage})

    def __enter__(self) -> _LyingServer:
        super().__enter__()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self.port = self.serve_app(app)
        return self


@pytest.fixture
def lying_server() -> Iterator[_LyingServer]:
    with _LyingServer() as server:
        yield server


def test_item10_negative_or_absurd_usage_is_priced_at_the_worst_case(
        tmp_path: Path, lying_server: _LyingServer) -> None:
    budget = 0.001
    job = _job(tmp_path, f"http://127.0.0.1:{lying_server.port}/v1", 20,
               model="acme-finetune-7b", pricing={"input": 1.0, "output": 1.0},  # $1e-6/token
               limits={"concurrency": 4, "max_cost_usd": budget})
    run = cli("run", str(job), "-q")
    assert run.returncode == 3, run  # the budget is reached, not extended by negative costs
    worst = (_worst_case_body("acme-finetune-7b", 10) + 64) * 1e-6
    assert 0 < lying_server.requests <= int(budget // worst)
    records = read_journal(tmp_path / "out.ckpt")[1]
    assert records
    for record in records:  # usage that cannot be right is no usage: nothing is made up
        assert record["status"] == "ok"
        assert record["cost_usd"] is None and record["prompt_tokens"] is None, record
        assert record["completion_tokens"] is None and record["cached_tokens"] is None

    # Their worst case stays spent for the next run too: nothing more is sent.
    sent = lying_server.requests
    again = cli("run", str(job), "-q")
    assert again.returncode == 3 and "budget reached" in again.stderr, again
    assert lying_server.requests == sent


# -- item 11 -----------------------------------------------------------------------------------


def test_item11_a_timed_out_request_counts_against_the_next_runs_budget(
        tmp_path: Path, make_mock: MakeMock) -> None:
    # The first three requests stall far beyond the client's timeout, then all is well.
    server = make_mock(api_key="sk-test-0123456789abcdefSECRET", stall_s=10.0,
                       faults=[FaultRule("stall", first_n=3)])
    worst = (_worst_case_body("acme-finetune-7b", 5) + 64) * 1e-6
    budget = round(3.5 * worst, 8)  # room for three requests' worst case, not four

    def job(limit: float) -> Path:
        return _job(tmp_path, server.base_url, 8, model="acme-finetune-7b",
                    pricing={"input": 1.0, "output": 1.0},
                    endpoint={"timeout_s": 0.3},
                    limits={"concurrency": 4, "max_cost_usd": limit},
                    retry={"max_attempts": 1})

    first = cli("run", str(job(budget)), "-q")
    assert first.returncode == 3, first
    assert _requests(server) == 3  # all three timed out: they may have been billed

    # The next run under the same budget knows: nothing is sent again.
    second = cli("run", str(job(budget)), "-q")
    assert second.returncode == 3, second
    line = one_error_line(second.stderr)
    assert "3 requests sent by earlier runs without a usable answer" in line
    assert _requests(server) == 3
    ledger = tmp_path / "out.ckpt.unsettled"  # beside the checkpoint, as private as it
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600

    # Room for one more worst case: an answer for a timed-out request settles it,
    # which frees room for the next.
    third = cli("run", str(job(round(budget + worst, 8))), "-q")
    assert third.returncode in (0, 3), third
    assert _requests(server) - 3 >= 2
