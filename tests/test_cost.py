"""Prices, per-row cost, the budget stop and the dry run's token count (issue 14)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import TEST_KEY, job_dict, prompts_csv, write_job
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price

from batcher.cli import main
from batcher.limits.budget import Budget
from batcher.mock_server import FaultRule, MockServer
from batcher.pricing import NoPrice, Price, Usage, resolve_price
from batcher.tokens import counter_for

ENV = {"BATCHER_TEST_KEY": TEST_KEY}


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), env=ENV)


def _job(tmp_path: Path, server: MockServer, rows: int = 12, **overrides: Any) -> Path:
    data = job_dict(server.base_url, prompts_csv(tmp_path, rows), tmp_path / "out.csv",
                    **overrides)
    return write_job(tmp_path / "job.yaml", data)


def _checkpoint_records(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [json.loads(line) for line in lines]


# -- prices and per-row cost -------------------------------------------------------------------


def test_row_cost_is_the_price_sources_figure_for_the_reported_usage(
        tmp_path: Path, make_mock: Callable[..., MockServer]) -> None:
    server = make_mock(api_key=TEST_KEY, cached_tokens=6, reasoning_tokens=3)
    result = _cli("run", str(_job(tmp_path, server)), "-q")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "out.csv")
    assert (frame["cached_tokens"] == 6).all() and (frame["reasoning_tokens"] == 3).all()
    rows = frame[["prompt_tokens", "completion_tokens", "cost_usd"]].to_dict("records")
    for row in rows:
        prompt, completion = int(row["prompt_tokens"]), int(row["completion_tokens"])
        expected = calc_price(GenaiUsage(input_tokens=prompt, cache_read_tokens=6,
                                         output_tokens=completion, output_reasoning_tokens=3),
                              "gpt-4o-mini").total_price
        assert row["cost_usd"] == pytest.approx(float(expected), rel=1e-9)
        uncached = calc_price(GenaiUsage(input_tokens=prompt, output_tokens=completion),
                              "gpt-4o-mini").total_price
        assert row["cost_usd"] < float(uncached)  # the cached tokens cost the cached price
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["cost"]["usd"] == pytest.approx(frame["cost_usd"].sum(), abs=1e-6)
    assert summary["tokens"]["cached"] == 6 * len(frame)
    assert summary["tokens"]["reasoning"] == 3 * len(frame)


def test_a_pricing_block_prices_a_custom_model(
        tmp_path: Path, make_mock: Callable[..., MockServer]) -> None:
    server = make_mock(api_key=TEST_KEY, cached_tokens=4)
    job = _job(tmp_path, server, model="acme-finetune-7b",
               pricing={"input": 2.0, "cached_input": 0.5, "output": 8.0})
    assert _cli("run", str(job), "-q").exit_code == 0
    frame = pd.read_csv(tmp_path / "out.csv")
    expected = ((frame["prompt_tokens"] - 4) * 2.0 + 4 * 0.5
                + frame["completion_tokens"] * 8.0) / 1e6
    assert frame["cost_usd"].to_numpy() == pytest.approx(expected.to_numpy(), rel=1e-9)


def test_an_unknown_price_leaves_the_cost_empty_and_the_summary_says_why(
        tmp_path: Path, make_mock: Callable[..., MockServer]) -> None:
    server = make_mock(api_key=TEST_KEY)
    result = _cli("run", str(_job(tmp_path, server, model="acme-finetune-7b")), "-q", "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["cost"]["usd"] is None and summary["cost"]["this_run_usd"] is None
    assert "no price for model 'acme-finetune-7b'" in summary["cost"]["note"]
    assert "pricing:" in summary["cost"]["note"]
    assert pd.read_csv(tmp_path / "out.csv")["cost_usd"].isna().all()


def test_the_endpoint_url_picks_the_provider_and_batch_rates_are_cheaper() -> None:
    azure = resolve_price("gpt-4o-mini", base_url="https://acme.openai.azure.com")
    assert isinstance(azure, Price) and "Azure" in azure.source
    standard = resolve_price("gpt-4o-mini", base_url="https://api.openai.com/v1")
    batch = resolve_price("gpt-4o-mini", base_url="https://api.openai.com/v1", batch=True)
    assert isinstance(standard, Price) and isinstance(batch, Price)
    assert batch.input < standard.input and batch.output < standard.output
    usage = Usage(1_000_000, 1_000_000)
    listed = calc_price(GenaiUsage(input_tokens=1_000_000, output_tokens=1_000_000),
                        "gpt-4o-mini", provider_id="openai",
                        price_context={"processing": "batch"}).total_price
    assert batch.cost(usage) == pytest.approx(float(listed))
    assert isinstance(resolve_price("llama-local", base_url="http://127.0.0.1:8080/v1"), NoPrice)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"pricing": {"input": 1.0}}, "pricing: needs both input and output"),
    ({"pricing": {"provider": "openai", "input": 1.0, "output": 2.0}}, "either pricing.provider"),
    ({"pricing": {"input": 1.0, "output": 2.0, "batch_discount": 1.5}},
     "pricing.batch_discount: must be less than 1"),
    ({"limits": {"max_cost_usd": 1.0}, "params": {"max_tokens": None}},
     "needs params.max_tokens"),
    ({"limits": {"max_cost_usd": -1}}, "limits.max_cost_usd: must be a positive number"),
    ({"limits": {"max_cost_usd": 1.0}, "model": "acme-finetune-7b"},
     "limits.max_cost_usd: cannot keep to a budget without a price"),
])
def test_bad_pricing_and_budget_settings_are_one_line_errors_and_send_nothing(
        tmp_path: Path, make_mock: Callable[..., MockServer], overrides: dict[str, Any],
        message: str) -> None:
    server = make_mock(api_key=TEST_KEY)
    result = _cli("run", str(_job(tmp_path, server, **overrides)))
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert server.stats.snapshot()["requests_total"] == 0


# -- the budget --------------------------------------------------------------------------------


def test_a_budget_stop_with_many_requests_in_flight_never_exceeds_it_and_a_raise_resumes(
        tmp_path: Path, make_mock: Callable[..., MockServer]) -> None:
    server = make_mock(api_key=TEST_KEY, latency_s=0.1)
    price = resolve_price("gpt-4o-mini")
    assert isinstance(price, Price)
    budget = 0.0006  # roughly 40 of the 150 rows at the mock's usage
    overrides: dict[str, Any] = {"limits": {"concurrency": 32, "max_cost_usd": budget},
                                 "params": {"max_tokens": 64}}
    job = _job(tmp_path, server, rows=150, **overrides)
    stopped = _cli("run", str(job), "-q")
    assert stopped.exit_code == 3, stopped.output
    assert "budget reached" in stopped.stderr and "limits.max_cost_usd" in stopped.stderr
    assert "run the same command again" in stopped.stderr
    assert not (tmp_path / "out.csv").exists()
    records = _checkpoint_records(tmp_path / "out.ckpt")
    spent = sum(record["cost_usd"] for record in records)
    assert 10 < len(records) < 150
    assert spent <= budget
    # Every answer the server gave is in the checkpoint: none was lost to the stop.
    assert sum(server.stats.snapshot()["ok_prompts"].values()) == len(records)

    again = _cli("run", str(job), "-q")  # the same budget: already spent, nothing sent
    assert again.exit_code == 3
    assert sum(server.stats.snapshot()["ok_prompts"].values()) == len(records)

    overrides["limits"]["max_cost_usd"] = 1.0
    finished = _cli("run", str(_job(tmp_path, server, rows=150, **overrides)), "-q")
    assert finished.exit_code == 0, finished.output
    assert set(server.stats.snapshot()["ok_prompts"].values()) == {1}  # nothing resent
    assert len(pd.read_csv(tmp_path / "out.csv")) == 150


def test_a_token_budget_counts_what_earlier_runs_used(
        tmp_path: Path, make_mock: Callable[..., MockServer]) -> None:
    server = make_mock(api_key=TEST_KEY, latency_s=0.02)
    limits = {"concurrency": 8, "max_total_tokens": 1500}
    stopped = _cli("run", str(_job(tmp_path, server, rows=60, limits=limits)), "-q")
    assert stopped.exit_code == 3 and "limits.max_total_tokens" in stopped.stderr
    used = sum(record["total_tokens"] for record in _checkpoint_records(tmp_path / "out.ckpt"))
    assert 0 < used <= 1500


def test_budget_reservations_wait_for_requests_in_flight_then_stop() -> None:
    async def scenario() -> None:
        budget = Budget(1.0, None, spent_usd=0.2)
        first = await budget.reserve(0.5, 10)
        assert first is not None
        waiting = asyncio.ensure_future(budget.reserve(0.5, 10))  # 0.2 + 0.5 + 0.5 > 1
        await asyncio.sleep(0)
        assert not waiting.done()
        budget.settle(first, 0.1, 10)  # used less than reserved: room for the next
        second = await waiting
        assert second is not None and budget.spent_usd == pytest.approx(0.3)
        budget.settle(second, 0.5, 10)
        assert await budget.reserve(0.5, 10) is None  # nothing in flight, does not fit
        assert budget.reached and budget.spent_usd == pytest.approx(0.8)

    asyncio.run(scenario())


# -- the dry run -------------------------------------------------------------------------------


def test_the_dry_run_counts_openai_prompts_with_the_real_tokenizer(
        tmp_path: Path, make_mock: Callable[..., MockServer]) -> None:
    server = make_mock(api_key=TEST_KEY)
    result = _cli("run", str(_job(tmp_path, server, rows=5)), "--dry-run")
    assert result.exit_code == 0
    counter = counter_for("gpt-4o-mini")
    assert counter.exact
    expected = sum(counter.count([{"role": "user", "content": f"Prompt number {i}: say "
                                   "something."}]) for i in range(5))
    assert f"{expected:,} prompt tokens to send (counted with the o200k_base tokenizer)" in (
        result.stdout)
    assert "cost: at most $" in result.stdout and "genai-prices" in result.stdout
    assert server.stats.snapshot()["requests_total"] == 0


def test_the_dry_run_labels_an_estimate_and_an_unknown_price(
        tmp_path: Path, make_mock: Callable[..., MockServer]) -> None:
    server = make_mock(api_key=TEST_KEY)
    result = _cli("run", str(_job(tmp_path, server, rows=5, model="acme-finetune-7b")),
                  "--dry-run")
    assert result.exit_code == 0
    assert "estimated as characters / 4" in result.stdout
    assert "cost unknown: genai-prices" in result.stdout


def test_batch_mode_rows_cost_the_batch_price(
        tmp_path: Path, make_mock: Callable[..., MockServer]) -> None:
    server = make_mock(api_key=TEST_KEY)
    job = _job(tmp_path, server, rows=6, mode="batch", batch={"poll_interval_s": 0.05})
    dry = _cli("run", str(job), "--dry-run")
    assert "Batch API price" in dry.stdout and "mode batch: 6 requests in 1 batch file" in (
        dry.stdout)
    done = _cli("run", str(job), "-q", "--wait")
    assert done.exit_code == 0, done.output
    frame = pd.read_csv(tmp_path / "out.csv")
    for row in frame[["prompt_tokens", "completion_tokens", "cost_usd"]].to_dict("records"):
        listed = calc_price(GenaiUsage(input_tokens=int(row["prompt_tokens"]),
                                       output_tokens=int(row["completion_tokens"])),
                            "gpt-4o-mini", price_context={"processing": "batch"}).total_price
        assert row["cost_usd"] == pytest.approx(float(listed), rel=1e-9)
    assert frame["finished_at"].notna().all()
    budget = _cli("run", str(_job(tmp_path, server, rows=6, mode="batch",
                                  limits={"max_cost_usd": 1.0})), "--fresh")
    assert budget.exit_code == 2 and "online requests only" in budget.stderr


def test_requests_without_an_answer_count_their_worst_case_against_the_budget(
        tmp_path: Path, make_mock: Callable[..., MockServer]) -> None:
    server = make_mock(api_key=TEST_KEY, faults=[FaultRule("drop", rate=1.0)])
    job = _job(tmp_path, server, rows=20, model="acme-finetune-7b",
               pricing={"input": 1.0, "output": 1.0},  # USD per million: $1e-6 a token
               limits={"concurrency": 4, "max_cost_usd": 0.001},
               retry={"max_attempts": 1})
    result = _cli("run", str(job), "-q")
    assert result.exit_code == 3, result.output  # a dropped request may have been billed
    body = len(json.dumps({"model": "acme-finetune-7b", "messages": [
        {"role": "user", "content": "Prompt number 10: say something."}],
        "temperature": 0, "max_tokens": 64}, separators=(",", ":")))
    most = int(0.001 / ((body + 64) * 1e-6))
    assert 0 < server.stats.snapshot()["requests_total"] <= most


def test_the_readme_documents_every_key_of_the_run_summary(
        tmp_path: Path, make_mock: Callable[..., MockServer]) -> None:
    server = make_mock(api_key=TEST_KEY)
    result = _cli("run", str(_job(tmp_path, server, rows=3)), "-q", "--json")
    assert result.exit_code == 0

    def keys(data: dict[str, Any], prefix: str = "") -> set[str]:
        found: set[str] = set()
        for key, value in data.items():
            name = prefix + key
            leaf = not isinstance(value, dict) or key == "errors_by_class"  # a map of classes
            found |= {name} if leaf else keys(value, name + ".")
        return found

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Run summary", 1)[1].split("\n## ", 1)[0]
    documented = {key for line in table.splitlines() if line.startswith("| `")
                  for key in re.findall(r"`([\w.]+)`", line.split(" | ")[0])}
    assert documented == keys(json.loads(result.stdout))
