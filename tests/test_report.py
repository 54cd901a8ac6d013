"""``batcher report``: one self-contained HTML file, checked as text and in a real browser."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from conftest import TEST_KEY, job_dict, write_csv, write_job

import batcher
from batcher.cli import main
from batcher.mock_server import MockServer

PLOTS = ["Throughput over time", "Latency of answered rows", "Tokens per row", "Errors by class"]


@pytest.fixture
def finished_job(tmp_path: Path, make_mock: Callable[..., MockServer]) -> Path:
    """A finished run with two failed rows, a rate limit and cached tokens."""
    server = make_mock(api_key=TEST_KEY, latency_s=0.02, cached_tokens=3)
    rows = [[f"row{i:03d}", ("[[fault:400]] " if i in (7, 21) else "")
             + f"Prompt {i}: " + "tell me more " * (i % 13 + 1)] for i in range(40)]
    prompts = write_csv(tmp_path / "prompts.csv", ["id", "text"], rows)
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts, tmp_path / "out.parquet",
        limits={"concurrency": 4, "requests_per_minute": 1200}))
    result = CliRunner().invoke(main, ["run", str(job), "-q"], env={"BATCHER_TEST_KEY": TEST_KEY})
    assert result.exit_code == 1, result.output
    return job


def test_the_report_holds_totals_plots_errors_and_top_rows(finished_job: Path) -> None:
    result = CliRunner().invoke(main, ["report", str(finished_job)])
    assert result.exit_code == 0, result.output
    page_path = finished_job.parent / "out.report.html"
    assert f"report: {page_path}" in result.stdout
    page = page_path.read_text(encoding="utf-8")
    assert "<th>Rows</th><td>40 (38 ok, 2 error)</td>" in page
    assert re.search(r"<th>Cost</th><td>\$0\.\d{4}</td>", page)
    assert "114 cached" in page  # 38 answered rows, 3 cached tokens each
    assert "of a 1,200 limit" in page
    for title in PLOTS:
        assert f"<h2>{title}</h2>" in page
    assert page.count("src='data:image/png;base64,") == len(PLOTS)
    assert "<td>HTTP 400 invalid_request_error</td>" in page
    assert "Slowest 10 rows" in page and "Most expensive 10 rows" in page
    # Self-contained: no script, no stylesheet or image from anywhere else.
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)


def test_a_notebook_gets_the_same_figures_from_the_python_api(finished_job: Path,
                                                              tmp_path: Path) -> None:
    report = batcher.report(finished_job.parent / "out.parquet", tmp_path / "mine.html")
    assert list(report.figures) == PLOTS
    assert all(figure.axes for figure in report.figures.values())
    assert (tmp_path / "mine.html").read_text(encoding="utf-8").count("data:image/png") == 4


def test_a_missing_results_file_is_a_one_line_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nothing.csv")])
    assert result.exit_code == 2
    assert "results file not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- in a real browser ------------------------------------------------------------------------


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def test_the_report_opens_in_headless_chromium_with_every_plot_and_no_errors(
        finished_job: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    page = batcher.report(finished_job).write(tmp_path / "report.html")
    with _headless_chromium(chromium, tmp_path / "profile") as port:
        seen = asyncio.run(_open_in_browser(port, page))
    assert seen["errors"] == []
    images = seen["images"]
    assert [image["alt"] for image in images] == PLOTS
    assert all(image["complete"] and image["naturalWidth"] > 0 for image in images), images
    screenshot = base64.b64decode(seen["screenshot"])
    assert screenshot.startswith(b"\x89PNG") and len(screenshot) > 10_000
    if target := os.environ.get("BATCHER_SCREENSHOT"):  # docs/report-screenshot.png
        Path(target).write_bytes(screenshot)


@contextlib.contextmanager
def _headless_chromium(chromium: str, profile: Path) -> Iterator[int]:
    """A headless Chromium for the test's duration; yields its DevTools port."""
    browser = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1100,900",
         "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield _devtools_port(profile)
    finally:
        browser.terminate()
        browser.wait(timeout=30)


async def _open_in_browser(port: int, page: Path) -> dict[str, Any]:
    """Load ``page`` over the DevTools protocol; return the console errors and
    exceptions it logged, its images' state and a screenshot."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as listing:
            targets = await listing.json()
        socket_url = next(target["webSocketDebuggerUrl"] for target in targets
                          if target["type"] == "page")
        async with session.ws_connect(socket_url, max_msg_size=0) as socket:
            return await _inspect(_DevTools(socket), page)


def _devtools_port(profile: Path) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if marker.exists() and (text := marker.read_text().strip()):
            return int(text.splitlines()[0])
        time.sleep(0.05)
    raise AssertionError("chromium did not open its DevTools port")


class _DevTools:
    """A minimal Chrome DevTools Protocol client: commands by id, events kept."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        await self._socket.send_json({"id": self._next_id, "method": method, "params": params})
        while True:
            message = json.loads((await self._socket.receive(timeout=30)).data)
            if message.get("id") == self._next_id:
                assert "error" not in message, message
                result: dict[str, Any] = message["result"]
                return result
            self.events.append(message)

    async def wait_for(self, method: str) -> None:
        while not any(event.get("method") == method for event in self.events):
            self.events.append(json.loads((await self._socket.receive(timeout=30)).data))


async def _inspect(tools: _DevTools, page: Path) -> dict[str, Any]:
    for domain in ("Page", "Runtime", "Log"):
        await tools.call(f"{domain}.enable")
    await tools.call("Page.navigate", url=page.as_uri())
    await tools.wait_for("Page.loadEventFired")
    images = await tools.call("Runtime.evaluate", returnByValue=True, expression=(
        "Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, "
        "naturalWidth: i.naturalWidth}))"))
    shot = await tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    errors = [event for event in tools.events
              if event.get("method") == "Runtime.exceptionThrown"
              or (event.get("method") == "Runtime.consoleAPICalled"
                  and event["params"]["type"] in ("error", "assert"))
              or (event.get("method") == "Log.entryAdded"
                  and event["params"]["entry"]["level"] == "error")]
    return {"errors": errors, "images": images["result"]["value"], "screenshot": shot["data"]}
