"""Issue 9: the key goes to the server and nowhere else; files and terminals
are not led astray. One test (or a few) per finding, over real sockets where
the finding involves the network."""

from __future__ import annotations

import base64
import csv
import json
import os
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import yaml
from click.testing import CliRunner, Result
from conftest import job_dict, prompts_csv, write_csv, write_job
from security_servers import (
    LoggingProxy,
    ServerThread,
    echoing_server,
    not_http_server,
    self_signed_certificate,
    tls_front,
)

import batcher
from batcher.cli import main
from batcher.errors import ConfigError
from batcher.jobload import job_from_dict
from batcher.jobs import endpoint_for
from batcher.mock_server import MockConfig, MockServer
from batcher.redact import Redactor, printable

# A key with every character that URL encoding changes, and no sk- prefix (that shape
# is masked by pattern anyway, which would hide a missing encoding).
KEY = "Qx7+kEy/with=odd+chars/0123456789"
KEY_FORMS = [KEY, quote(KEY, safe=""), quote(KEY), quote_plus(KEY),
             quote(KEY, safe="").lower(), base64.b64encode(KEY.encode()).decode()]
ENV = {"BATCHER_TEST_KEY": KEY}
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def _no_proxy_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def servers() -> Iterator[ServerThread]:
    with ServerThread() as thread:
        yield thread


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """The command in-process; a traceback (any exception but SystemExit) fails the test."""
    result = CliRunner().invoke(main, list(args), env={**ENV, **(env or {})})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def key_free(*texts: str | bytes | bytearray) -> bool:
    joined = "\n".join(t if isinstance(t, str) else t.decode("latin-1") for t in texts)
    return not any(form in joined for form in KEY_FORMS)


def files_text(folder: Path) -> str:
    return "\n".join(path.read_bytes().decode("latin-1") for path in sorted(folder.iterdir())
                     if path.is_file() and path.suffix in (".csv", ".ckpt", ".jsonl"))


def job_file(tmp_path: Path, base_url: str, rows: int = 3, **overrides: Any) -> Path:
    source = tmp_path / "prompts.csv"
    if not source.exists():
        prompts_csv(tmp_path, rows)
    return write_job(tmp_path / "job.yaml",
                     job_dict(base_url, source, tmp_path / "out.csv", **overrides))


# == 1. the key never reaches a proxy ========================================================

@pytest.mark.parametrize(("auth", "mode"), [
    (None, "online"), ({"header": "api-key"}, "online"), ({"query": "api_key"}, "online"),
    (None, "batch"), ({"header": "api-key"}, "batch"),
], ids=["bearer", "api-key", "query", "batch-bearer", "batch-api-key"])
def test_1_an_https_proxy_sees_a_connect_without_the_key(
        tmp_path: Path, servers: ServerThread, auth: dict[str, str] | None, mode: str) -> None:
    """HTTPS through a logging CONNECT proxy to the mock behind a TLS front with a
    certificate made here; in batch mode the uploads, polls and downloads too. In a
    subprocess: aiohttp builds its TLS context when it is imported, so trusting the
    test certificate needs SSL_CERT_FILE before that."""
    cert_file, tls = self_signed_certificate(tmp_path)
    with MockServer(MockConfig(api_key=KEY)) as mock:
        front = tls_front(servers, tls, mock.port)
        proxy = LoggingProxy(servers)
        overrides: dict[str, Any] = {"endpoint": {"auth": auth} if auth else {}}
        if mode == "batch":
            overrides |= {"mode": "batch", "batch": {"poll_interval_s": 0.05}}
        job = job_file(tmp_path, f"https://127.0.0.1:{front}/v1", **overrides)
        env = {name: value for name, value in os.environ.items()
               if name.upper() not in PROXY_VARIABLES and name != "SSL_CERT_DIR"}
        env |= {**ENV, "HTTPS_PROXY": proxy.url, "SSL_CERT_FILE": str(cert_file)}
        command = [sys.executable, "-m", "batcher", "run", "-q", str(job)]
        run = subprocess.run([*command, "--wait"] if mode == "batch" else command,
                             capture_output=True, text=True, env=env, timeout=120, check=False)
        assert run.returncode == 0, run.stderr
        statuses = mock.stats.snapshot()["by_status"]
        assert set(statuses) == {200}, statuses  # the key arrived, every time
    assert proxy.heads and all(head.startswith(f"CONNECT 127.0.0.1:{front} ".encode())
                               for head in proxy.heads)
    assert key_free(proxy.received), proxy.heads


def test_1_a_plain_http_proxy_on_this_machine_forwards_and_a_remote_one_is_refused(
        tmp_path: Path, servers: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    with MockServer(MockConfig(api_key=KEY)) as mock:
        proxy = LoggingProxy(servers)
        job = job_file(tmp_path, mock.base_url)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        assert cli("run", "-q", str(job)).exit_code == 0
        assert proxy.heads[0].startswith(f"POST {mock.base_url}/chat/completions ".encode())
        # 4. A proxy elsewhere would receive the key in clear: refused before sending.
        monkeypatch.setenv("HTTP_PROXY", "http://user:pw@proxy.example.com:3128")
        refused = cli("run", "-q", "--fresh", str(job))
        assert refused.exit_code == 2
        assert "HTTP_PROXY" in refused.stderr and "pw" not in refused.stderr


# == 2, 5. every encoding of the key is masked, before anything is cut to length ===========

@pytest.mark.parametrize("status", [400, 302])
def test_2_a_url_echoed_percent_encoded_never_carries_the_key(
        tmp_path: Path, servers: ServerThread, status: int) -> None:
    port = echoing_server(servers, status, "you asked for ")
    job = job_file(tmp_path, f"http://127.0.0.1:{port}/v1",
                   endpoint={"auth": {"query": "api_key"}}, retry={"max_attempts": 1})
    result = cli("run", "-q", str(job))
    assert result.exit_code == 1, result.output
    text = files_text(tmp_path)
    assert "you asked for" in text or "redirects to" in text
    assert key_free(text, result.stdout, result.stderr)


def test_2_an_aiohttp_error_quoting_the_url_never_carries_the_key(
        tmp_path: Path, servers: ServerThread) -> None:
    port = not_http_server(servers)
    job = job_file(tmp_path, f"http://127.0.0.1:{port}/v1",
                   endpoint={"auth": {"query": "api_key"}}, retry={"max_attempts": 1})
    result = cli("run", "-q", str(job))
    assert result.exit_code == 1, result.output
    text = files_text(tmp_path)
    assert "connection error" in text and "api_key=***" in text  # the URL is there, masked
    assert key_free(text, result.stdout, result.stderr)


def test_2_a_connection_error_naming_the_url_is_masked() -> None:
    redactor = Redactor([KEY])
    for form in KEY_FORMS:
        assert redactor.clean(f"Cannot connect: http://h/v1?api_key={form}&x=1") == \
            "Cannot connect: http://h/v1?api_key=***&x=1"


def test_5_a_key_cut_by_the_length_limit_is_still_masked(
        tmp_path: Path, servers: ServerThread) -> None:
    port = echoing_server(servers, 400, "x" * 255 + " ")  # the key straddles the cut
    job = job_file(tmp_path, f"http://127.0.0.1:{port}/v1",
                   endpoint={"auth": {"query": "api_key"}}, retry={"max_attempts": 1})
    assert cli("run", "-q", str(job)).exit_code == 1
    text = files_text(tmp_path)
    assert "x" * 200 in text  # the message is there, cut
    assert quote(KEY, safe="")[:8] not in text


# == 3. a proxy's password never shows ======================================================

@pytest.mark.parametrize(("scheme", "status"), [("https", 407), ("http", 502), ("https", 502)])
def test_3_a_proxy_password_never_reaches_results_or_stderr(
        tmp_path: Path, servers: ServerThread, monkeypatch: pytest.MonkeyPatch, scheme: str,
        status: int) -> None:
    password = "pr0xy+pass/word=x"
    proxy = LoggingProxy(servers, refuse=status)
    monkeypatch.setenv(f"{scheme.upper()}_PROXY",
                       f"http://alice:{quote(password, safe='')}@127.0.0.1:{proxy.port}")
    job = job_file(tmp_path, f"{scheme}://127.0.0.1:9/v1", retry={"max_attempts": 1})
    result = cli("run", "-q", str(job))
    assert result.exit_code in (1, 3), result.output
    assert b"Proxy-Authorization: Basic" in proxy.heads[0]  # the proxy did get it
    text = "\n".join([files_text(tmp_path), result.stdout, result.stderr])
    assert str(status) in text
    secrets = [password, quote(password, safe=""), quote_plus(password),
               base64.b64encode(f"alice:{password}".encode()).decode()]
    assert not any(secret in text for secret in secrets), text


# == 6. the results file's mode =============================================================

def test_6_results_follow_the_umask_and_keep_an_existing_mode(tmp_path: Path) -> None:
    with MockServer() as mock:
        job = job_file(tmp_path, mock.base_url)
        old = os.umask(0o077)
        try:
            assert cli("run", "-q", str(job)).exit_code == 0
        finally:
            os.umask(old)
        results = tmp_path / "out.csv"
        assert stat.S_IMODE(results.stat().st_mode) == 0o600
        results.chmod(0o640)
        assert cli("run", "-q", "--fresh", str(job)).exit_code == 0
        assert stat.S_IMODE(results.stat().st_mode) == 0o640


# == 7. the mock keeps no secrets, and the built-in mock gets no key ========================

def test_7_mock_stats_keep_only_that_a_key_was_present() -> None:
    with MockServer(MockConfig(api_key=KEY)) as mock:
        for url, headers in ((f"{mock.base_url}/chat/completions",
                              {"Authorization": f"Bearer {KEY}"}),
                             (f"{mock.base_url}/chat/completions?api_key={quote(KEY, safe='')}",
                              {})):
            body = json.dumps({"model": "m", "messages": [{"role": "user",
                                                           "content": "private prompt"}]})
            request = urllib.request.Request(url, body.encode(), method="POST",
                                             headers={"Content-Type": "application/json",
                                                      **headers})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
        with urllib.request.urlopen(f"{mock.root_url}/_mock/stats", timeout=10) as response:
            served = response.read().decode()
        snapshot = json.dumps(mock.stats.snapshot())
    assert json.loads(served)["requests_total"] == 2
    assert "private prompt" not in served
    assert key_free(served, snapshot)
    assert '"authorization": "Bearer ***"' in snapshot and "api_key=***" in snapshot


def test_7_the_built_in_mock_is_sent_no_key(tmp_path: Path) -> None:
    data = job_dict("unused", prompts_csv(tmp_path, 1), tmp_path / "out.csv")
    data["endpoint"] = {"mock": {"latency_s": 0}, "api_key_env": "BATCHER_TEST_KEY"}
    job = job_from_dict(data, base_dir=tmp_path, source="job", require_output=True)
    with endpoint_for(job, ENV) as (endpoint, _redactor):
        assert key_free(endpoint.url, json.dumps(endpoint.headers))
    result = cli("run", "-q", str(write_job(tmp_path / "job.yaml", data)))
    assert result.exit_code == 0, result.output


# == 8. an alias bomb ========================================================================

def test_8_a_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nname: x\nparams: {laughs: *a9}\n")
    for command in ("validate", "run"):
        result = cli(command, str(bomb))
        assert result.exit_code == 2
        assert "aliases" in result.stderr and "Traceback" not in result.output


# == 9. --fresh never deletes a file that is no checkpoint ==================================

def test_9_fresh_refuses_to_replace_a_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    precious = write_csv(tmp_path / "precious.ckpt", ["id", "value"], [["1", "keep me"]])
    before = precious.read_bytes()
    with MockServer() as mock:
        job = job_file(tmp_path, mock.base_url, output={"path": str(tmp_path / "out.csv"),
                                                        "checkpoint": str(precious)})
        result = cli("run", "--fresh", "-q", str(job))
        assert mock.stats.snapshot()["requests_total"] == 0
    assert result.exit_code == 2
    assert "not a batcher checkpoint" in result.stderr
    assert precious.read_bytes() == before


def test_9_and_15_validate_and_dry_run_see_what_run_would_stop_on(tmp_path: Path) -> None:
    with MockServer() as mock:
        job = job_file(tmp_path, mock.base_url)
        checkpoint = tmp_path / "out.ckpt"
        checkpoint.write_text('{"batcher_checkpoint":1,"fingerprint":"another job"}\n')
        checkpoint.chmod(0o600)
        foreign = cli("validate", str(job))
        assert foreign.exit_code == 2 and "older batcher" in foreign.stderr
        assert cli("validate", str(job)).exit_code == 2
        checkpoint.write_text("id,text\n1,a data file\n")
        fresh = cli("run", "--dry-run", "--fresh", str(job))
        assert fresh.exit_code == 0
        assert "a run would stop" in fresh.stdout and "not a batcher checkpoint" in fresh.stdout
        assert mock.stats.snapshot()["requests_total"] == 0
    assert checkpoint.read_text() == "id,text\n1,a data file\n"


# == 10. links and loose modes ===============================================================

@pytest.mark.parametrize("which", ["out.csv", "out.ckpt", "out.ckpt.lock"])
def test_10_a_symlinked_results_checkpoint_or_lock_is_refused(tmp_path: Path,
                                                               which: str) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("not yours to write\n")
    (tmp_path / which).symlink_to(target)
    with MockServer() as mock:
        job = job_file(tmp_path, mock.base_url)
        for command in ("validate", "run"):
            result = cli(command, str(job))
            assert result.exit_code == 2, result.output
            assert "symbolic link" in result.stderr
        assert mock.stats.snapshot()["requests_total"] == 0
    assert target.read_text() == "not yours to write\n"


def test_10_checkpoint_and_lock_are_private_and_loose_ones_are_refused_or_narrowed(
        tmp_path: Path) -> None:
    with MockServer() as mock:
        job = job_file(tmp_path, mock.base_url)
        old = os.umask(0)
        try:
            assert cli("run", "-q", str(job)).exit_code == 0
        finally:
            os.umask(old)
        checkpoint, lock = tmp_path / "out.ckpt", tmp_path / "out.ckpt.lock"
        assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o600
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        checkpoint.chmod(0o644)  # ours, readable by others (copied with umask 022)
        assert cli("run", "-q", str(job)).exit_code == 0
        assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o600
        checkpoint.chmod(0o666)  # anyone could have written it
        refused = cli("run", "-q", str(job))
        assert refused.exit_code == 2 and "other users may write" in refused.stderr
        if os.geteuid() == 0:  # only root can hand a file to another user
            checkpoint.chmod(0o600)
            os.chown(checkpoint, 65534, 65534)
            foreign = cli("run", "-q", str(job))
            assert foreign.exit_code == 2 and "another user" in foreign.stderr


# == 11. terminal controls ===================================================================

def test_11_control_characters_from_a_server_never_reach_the_terminal(
        tmp_path: Path, servers: ServerThread) -> None:
    port = echoing_server(servers, 401, "\x1b]0;pwned\x07\x1b[2J\x1b[1;1H\x9bbad key\x00 at ")
    job = job_file(tmp_path, f"http://127.0.0.1:{port}/v1", retry={"max_attempts": 1})
    result = cli("run", str(job))
    assert result.exit_code == 3
    assert "bad key" in result.stderr
    shown = result.stdout + result.stderr
    assert not any(char in shown for char in "\x1b\x07\x9b\x00"), repr(shown)


def test_11_printable_keeps_text_and_drops_controls() -> None:
    assert printable("ok\tyes\n\x1b[31mred\x1b[0m \x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\"
                     " \x85\x7f\x08end") == "ok\tyes\nred link end"


# == 12. CSV formula escaping ================================================================

@pytest.mark.parametrize("escape", [True, False])
def test_12_csv_formula_escaping(tmp_path: Path, escape: bool) -> None:
    cells = ["=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)", "\tx", "\rx", "plain", "a=b"]
    source = write_csv(tmp_path / "in.csv", ["id", "text"],
                       [[f"r{i}", cell] for i, cell in enumerate(cells)])
    with MockServer() as mock:
        job = write_job(tmp_path / "job.yaml", job_dict(
            mock.base_url, source, tmp_path / "out.csv",
            output={"path": str(tmp_path / "out.csv"), "csv_escape_formulas": escape}))
        assert cli("run", "-q", str(job)).exit_code == 0
    with (tmp_path / "out.csv").open(newline="") as handle:
        written = [row["text"] for row in csv.DictReader(handle)]
    expected = [f"'{cell}" for cell in cells[:6]] + cells[6:] if escape else cells
    assert written == expected


# == 13. clean exit 2, never a traceback ====================================================

def test_13_a_huge_format_spec_is_caught_by_validate_and_run(tmp_path: Path) -> None:
    with MockServer() as mock:
        job = job_file(tmp_path, mock.base_url,
                       prompt={"column": None, "template": "{text!r:>1000000000000}"})
        for command in ("validate", "run"):
            result = cli(command, str(job))
            assert result.exit_code == 2, result.output
            assert "prompt.template" in result.stderr and "format spec" in result.stderr
        assert mock.stats.snapshot()["requests_total"] == 0


def test_13_a_nul_byte_in_a_path_is_a_clean_error(tmp_path: Path) -> None:
    data = job_dict("http://127.0.0.1:9/v1", tmp_path / "in.csv", tmp_path / "out.csv")
    data["input"]["path"] = "in\x00.csv"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(data))
    for command in ("validate", "run"):
        result = cli(command, str(job))
        assert result.exit_code == 2
        assert "input.path" in result.stderr and "NUL" in result.stderr
    with pytest.raises(ConfigError, match="NUL byte"):  # the job file's own path, from Python
        batcher.run(tmp_path / "job\x00.yaml")


# == 14. a capped response body =============================================================

def test_14_a_runaway_reply_is_a_row_error_that_says_why(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "in.csv", ["id", "text"],
                       [["a", "fine"], ["b", "[[fault:huge]] sixteen megabytes"]])
    with MockServer() as mock:
        job = write_job(tmp_path / "job.yaml",
                        job_dict(mock.base_url, source, tmp_path / "out.csv"))
        assert cli("run", "-q", str(job)).exit_code == 1
    with (tmp_path / "out.csv").open(newline="") as handle:
        rows = {row["id"]: row for row in csv.DictReader(handle)}
    assert rows["a"]["status"] == "ok"
    assert rows["b"]["status"] == "error"
    assert "larger than endpoint.max_response_bytes (8,388,608 bytes)" in rows["b"]["error"]


# == 15. validate checks what run checks ====================================================

@pytest.mark.parametrize(("base_url", "env", "expected"), [
    ("http://127.0.0.1:9/v1", {"BATCHER_TEST_KEY": ""}, "BATCHER_TEST_KEY is not set"),
    ("http://api.example.com/v1", {}, "plain http://"),
    ("http://127.0.0.1:9/v1", {"HTTP_PROXY": "http://proxy.example.com:3128"}, "HTTP_PROXY"),
    ("https://api.example.com/v1", {"HTTPS_PROXY": "http://proxy:port"}, "not a valid proxy"),
])
def test_15_validate_refuses_what_run_refuses(tmp_path: Path, base_url: str,
                                              env: dict[str, str], expected: str) -> None:
    job = job_file(tmp_path, base_url)
    for command in ("validate", "run"):
        result = cli(command, str(job), env=env)
        assert result.exit_code == 2, result.output
        assert expected in result.stderr
