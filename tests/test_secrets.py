"""The key never leaks: not echoed back by the server, not in a proxy URL, not to
another host over plain http or through a redirect, and a literal key in a job
file is refused without being printed."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from aiohttp import web
from conftest import (
    MakeMock,
    cli,
    cli_env,
    job_dict,
    one_error_line,
    prompts_csv,
    run_job,
    write_csv,
    write_job,
)

from batcher.errors import BatcherError, RunAborted
from batcher.jobload import load_job
from batcher.jobs import dry_run
from batcher.mock_server import MockServer

SECRET = "Zq7Yt9wLmNpQ4242SECRETkey"  # not sk-shaped: only real redaction can hide it
SPECIAL_SECRET = "Zq7+Yt/9w=SECRET key&42"


def secret_forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote_plus(secret), secret[: len(secret) // 2 + 4]}


def assert_nowhere(secret: str, folder: Path, *texts: str) -> None:
    """The secret (or its URL-encoded forms) appears in no text and no file."""
    forms = secret_forms(secret)
    for text in texts:
        for form in forms:
            assert form not in text, f"{form!r} leaked in output: {text[:500]}"
    for path in folder.rglob("*"):
        if path.is_file():
            content = path.read_bytes().decode("utf-8", "replace")
            for form in forms:
                assert form not in content, f"{form!r} leaked into {path.name}"


@pytest.mark.parametrize("auth", [None, {"header": "api-key"}, {"query": "api_key"}])
def test_an_echoed_key_never_leaks(tmp_path: Path, make_mock: MakeMock,
                                   auth: dict[str, str] | None) -> None:
    server: MockServer = make_mock(api_key=SECRET, echo_key_in_errors=True)
    endpoint: dict[str, Any] = {"auth": auth} if auth else {}
    source = write_csv(tmp_path / "in.csv", ["id", "text"], [
        ["a", "fine"], ["b", "[[fault:400]] echo"], ["c", "[[fault:422]] echo"],
        ["d", "[[fault:500*1]] echo once"], ["e", "[[fault:detail_500*1]] once"],
        ["f", "[[fault:context]] echo"], ["g", "[[fault:404]] echo"]])
    job = write_job(tmp_path / "job.yaml", job_dict(server.base_url, source,
                                                    tmp_path / "faults.csv", endpoint=endpoint))
    faults = cli("run", str(job), env=cli_env(key=SECRET))  # with progress output
    assert faults.returncode == 1, faults.stderr
    assert "***" in (tmp_path / "faults.csv").read_text()  # echoed, and masked

    # A 401 that echoes the key, and a key the server does not know (its 401 echoes
    # the key that was sent): both stop the run, and neither message shows the key.
    other: MockServer = make_mock(api_key="some-other-key-entirely", echo_key_in_errors=True)
    aborts = {
        "401 echo": job_dict(server.base_url, write_csv(
            tmp_path / "in401.csv", ["id", "text"], [["a", "[[fault:401]] echo"], ["b", "x"]]),
            tmp_path / "r401.csv", endpoint=endpoint, limits={"concurrency": 1}),
        "wrong key": job_dict(other.base_url, source, tmp_path / "wrong.csv",
                              endpoint=endpoint),
    }
    messages = []
    for name, job_data in aborts.items():
        path = write_job(tmp_path / f"{name.replace(' ', '-')}.yaml", job_data)
        with pytest.raises(RunAborted) as caught:
            run_job(path, environ={"BATCHER_TEST_KEY": SECRET})
        messages.append(str(caught.value))
        assert "***" in messages[-1] and "\n" not in messages[-1], messages[-1]
    assert_nowhere(SECRET, tmp_path, faults.stdout, faults.stderr, *messages)


def test_a_key_in_the_query_string_with_url_special_characters_never_leaks(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server: MockServer = make_mock(api_key=SPECIAL_SECRET, echo_key_in_errors=True)
    source = write_csv(tmp_path / "in.csv", ["id", "text"],
                       [["a", "fine"], ["b", "[[fault:400]] echo"]])
    endpoint = {"auth": {"query": "api_key"}, "timeout_s": 1}
    good = write_job(tmp_path / "good.yaml", job_dict(server.base_url, source,
                                                      tmp_path / "good.csv", endpoint=endpoint))
    dead = write_job(tmp_path / "dead.yaml", job_dict(
        "http://127.0.0.1:9/v1", source, tmp_path / "dead.csv", endpoint=endpoint,
        retry={"max_attempts": 1}))
    env = cli_env(key=SPECIAL_SECRET)
    first, second = cli("run", str(good), env=env), cli("run", str(dead), env=env)
    assert first.returncode == 1, first.stderr  # the key worked: one ok row, one 400
    assert "ok" in (tmp_path / "good.csv").read_text()
    assert second.returncode == 1, second.stderr
    assert_nowhere(SPECIAL_SECRET, tmp_path, first.stdout, first.stderr, second.stdout,
                   second.stderr)


def test_a_proxy_url_carrying_the_key_never_leaks(tmp_path: Path, make_mock: MakeMock) -> None:
    server: MockServer = make_mock(api_key=SECRET)
    proxy = f"http://user:{SECRET}@127.0.0.1:9"  # nothing listens there: every request fails
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 3), tmp_path / "out.csv",
        retry={"max_attempts": 2}))
    env = cli_env({"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "ALL_PROXY": proxy}, key=SECRET)
    result = cli("run", str(job), env=env)
    assert result.returncode in (1, 3), result.stderr
    assert "Traceback" not in result.stderr
    assert_nowhere(SECRET, tmp_path, result.stdout, result.stderr)


def test_a_malformed_proxy_url_is_a_clean_error(tmp_path: Path, make_mock: MakeMock) -> None:
    server: MockServer = make_mock(api_key=SPECIAL_SECRET)
    proxy = f"http://user:{SPECIAL_SECRET}@127.0.0.1:9"
    job = write_job(tmp_path / "job.yaml", job_dict(
        server.base_url, prompts_csv(tmp_path, 3), tmp_path / "out.csv"))
    env = cli_env({"HTTP_PROXY": proxy}, key=SPECIAL_SECRET)
    result = cli("run", str(job), env=env)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result.stderr
    one_error_line(result.stderr)
    assert_nowhere(SPECIAL_SECRET, tmp_path, result.stdout, result.stderr)


LITERAL_KEYS: dict[str, tuple[str, Any]] = {
    "endpoint.api_key": ("endpoint.api_key", "sk-proj-" + "A1b2C3d4" * 4),
    "params.api_key": ("params.api_key", SECRET),
    "authorization header": ("endpoint.headers.Authorization", f"Bearer {SECRET}"),
    "api-key header": ("endpoint.headers.api-key", SECRET),
    "key in api_key_env": ("endpoint.api_key_env", "sk-" + "Zx9" * 8),
    "key in the system prompt": ("prompt.system", "use sk-live-" + "Q7w8E9r0" * 3),
}


@pytest.mark.parametrize("case", list(LITERAL_KEYS))
def test_a_literal_key_in_the_job_is_refused_without_printing_it(
        tmp_path: Path, mock_server: MockServer, case: str) -> None:
    dotted, value = LITERAL_KEYS[case]
    job = job_dict(mock_server.base_url, prompts_csv(tmp_path, 2), tmp_path / "out.csv")
    *sections, leaf = dotted.split(".")
    node = job
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = value
    job_path = write_job(tmp_path / "job.yaml", job)
    with pytest.raises(BatcherError) as caught:
        load_job(job_path)
    message = str(caught.value)
    assert caught.value.exit_code == 2
    assert dotted in message and "environment variable" in message, message
    secret = value.split()[-1]
    assert secret not in message and secret[:12] not in message, message
    assert mock_server.stats.snapshot()["requests_total"] == 0


def test_a_literal_key_is_refused_on_the_command_line_too(tmp_path: Path) -> None:
    job = job_dict("https://api.openai.com/v1", prompts_csv(tmp_path, 2), tmp_path / "out.csv")
    job["endpoint"]["api_key"] = "sk-proj-" + "A1b2C3d4" * 4
    result = cli("run", str(write_job(tmp_path / "job.yaml", job)), "--dry-run")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "endpoint.api_key" in line and "A1b2C3d4" not in line


def test_a_key_pasted_as_the_variable_name_is_not_printed(tmp_path: Path) -> None:
    pasted = "d41d8cd98f00b204e9800998ecf8427e"
    job = job_dict("https://api.openai.com/v1", prompts_csv(tmp_path, 2), tmp_path / "out.csv",
                   endpoint={"api_key_env": pasted})
    with pytest.raises(BatcherError) as caught:
        dry_run(load_job(write_job(tmp_path / "job.yaml", job)), environ={})
    assert caught.value.exit_code == 2
    assert pasted not in str(caught.value)


@pytest.mark.parametrize("base_url", [
    f"https://bob:{SECRET}@api.example.com/v1",
    f"https://api.example.com/v1?api_key={SECRET}",
])
def test_a_literal_key_in_the_base_url_is_refused(tmp_path: Path, base_url: str) -> None:
    job = job_dict(base_url, prompts_csv(tmp_path, 2), tmp_path / "out.csv")
    with pytest.raises(BatcherError) as caught:
        load_job(write_job(tmp_path / "job.yaml", job))
    assert "environment variable" in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.fixture
def guard_proxy(make_mock: MakeMock) -> MockServer:
    """A loopback 'proxy' for plain-http traffic: anything a run tries to send to
    another host lands here instead of leaving the machine."""
    return make_mock()


INSECURE_URLS = ["http://api.example.com/v1", "http://localhost.example.com/v1",
                 "http://127.0.0.1.nip.io/v1", "http://0.0.0.0:9/v1",
                 "http://bob:hunter2@api.example.com/v1"]


def test_the_key_never_goes_over_plain_http_to_another_host(
        tmp_path: Path, guard_proxy: MockServer, monkeypatch: pytest.MonkeyPatch) -> None:
    source = prompts_csv(tmp_path, 3)
    proxy = guard_proxy.root_url
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for i, url in enumerate(INSECURE_URLS):
        job = write_job(tmp_path / f"job{i}.yaml", job_dict(url, source, tmp_path / f"o{i}.csv"))
        with pytest.raises(BatcherError) as caught:
            run_job(job, environ={"BATCHER_TEST_KEY": SECRET})
        message = str(caught.value)
        assert caught.value.exit_code == 2, message
        if "@" in url:  # a password in the URL is refused as a literal secret first
            assert "looks like a literal API key" in message, message
        else:
            assert "plain http://" in message and "allow_insecure_http" in message, message
        assert "hunter2" not in message and "\n" not in message
    assert guard_proxy.stats.snapshot()["requests_total"] == 0  # refused before connecting
    assert_nowhere(SECRET, tmp_path)

    # The same through the command line (with the guard proxy in its environment too).
    env = cli_env({"HTTP_PROXY": proxy, "ALL_PROXY": proxy}, key=SECRET)
    result = cli("run", str(tmp_path / "job0.yaml"), "-q", env=env)
    assert result.returncode == 2
    assert "plain http://" in one_error_line(result.stderr)
    assert guard_proxy.stats.snapshot()["requests_total"] == 0
    assert_nowhere(SECRET, tmp_path, result.stdout, result.stderr)


def test_allow_insecure_http_and_loopback_lift_the_refusal(tmp_path: Path) -> None:
    """Checked with a dry run, which sends nothing anywhere."""
    source = prompts_csv(tmp_path, 3)
    urls = {"http://api.example.com/v1": {"allow_insecure_http": True},
            "http://127.0.0.2:9/v1": {}, "http://[::1]:9/v1": {}, "http://localhost:9/v1": {},
            "http://LOCALHOST:9/v1": {}, "https://api.example.com/v1": {}}
    for i, (url, extra) in enumerate(urls.items()):
        job = write_job(tmp_path / f"job{i}.yaml",
                        job_dict(url, source, tmp_path / f"out{i}.csv", endpoint=extra))
        estimate = dry_run(load_job(job), environ={"BATCHER_TEST_KEY": SECRET})
        assert estimate.rows == 3, url
    result = cli("run", str(tmp_path / "job0.yaml"), "--dry-run", env=cli_env(key=SECRET))
    assert result.returncode == 0 and "nothing sent" in result.stdout, result.stderr


class RedirectingServer:
    """A loopback endpoint that answers every chat request with a 307 to ``target``."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(self.target)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._redirect)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def __enter__(self) -> RedirectingServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.mark.parametrize("auth", [
    None,
    {"query": "api_key"},
    {"header": "api-key"},
    {"header": "X-Api-Key"},
])
def test_a_redirect_to_another_origin_never_carries_the_key(
        tmp_path: Path, make_mock: MakeMock, auth: dict[str, str] | None) -> None:
    elsewhere: MockServer = make_mock()  # "another host": a different origin
    with RedirectingServer(elsewhere.base_url + "/chat/completions") as endpoint:
        job = write_job(tmp_path / "job.yaml", job_dict(
            f"http://127.0.0.1:{endpoint.port}/v1", prompts_csv(tmp_path, 2),
            tmp_path / "out.csv", endpoint={"auth": auth} if auth else {},
            retry={"max_attempts": 1}))
        with contextlib.suppress(BatcherError):
            run_job(job, environ={"BATCHER_TEST_KEY": SECRET})
    stats = elsewhere.stats.snapshot()
    for headers in stats["headers_seen"]:
        assert not any(SECRET in value for value in headers.values()), headers
    assert not any(SECRET in path for path in stats["paths_seen"])

