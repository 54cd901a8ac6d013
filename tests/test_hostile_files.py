"""Issue 20, items 5-8: on a shared machine, batcher's files, its input and its
prompts stay the user's. Each test runs the real parts: the command line, the
mock server over loopback, a real local Ray, a real ``batcher mock-server``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pandas as pd
import pytest
from conftest import (
    TEST_KEY,
    MakeMock,
    cli,
    cli_env,
    job_dict,
    one_error_line,
    prompt_text,
    prompts_csv,
    ray_processes,
    write_job,
)

from batcher.errors import OutputError
from batcher.store.answers import AnswerWriter

pytestmark = pytest.mark.timeout(300)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common umask: what batcher makes private, it makes so itself."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def victim_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A folder of the user's that a planted link points at, and the file in it."""
    folder = tmp_path / "victim"
    folder.mkdir()
    keep = folder / "keep.txt"
    keep.write_text("the user's own file\n")
    return folder, keep


def batch_job(folder: Path, base_url: str, rows: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_job(folder / "job.yaml", job_dict(
        base_url, prompts_csv(folder, rows), folder / "out.csv", mode="batch",
        batch={"poll_interval_s": 0.05}))


# == 5. every file batcher makes follows the checkpoint's rules ==============================

def test_item5_the_batch_work_folder_and_shards_are_private_and_symlinks_refused(
        tmp_path: Path, make_mock: MakeMock, umask_022: None) -> None:
    # Batches that stay open keep the work folder and its files on disk to look at.
    slow = make_mock(api_key=TEST_KEY, batch_phase_s=120)
    job = batch_job(tmp_path / "private", slow.base_url)
    submitted = cli("run", str(job), "-q")
    assert submitted.returncode == 0, submitted.stderr
    folder = tmp_path / "private" / "out.ckpt.batch"
    files = sorted(entry.name for entry in folder.iterdir())
    assert "state.json" in files and any(name.startswith("shard-") for name in files), files
    assert mode_of(folder) == 0o700
    assert {name: mode_of(folder / name) for name in files} == dict.fromkeys(files, 0o600)

    # A work folder planted as a link: batcher would write the prompts into the link's
    # target and, when the cycle ends, empty it.
    fast = make_mock(api_key=TEST_KEY)
    victim, keep = victim_folder(tmp_path)
    job = batch_job(tmp_path / "linked", fast.base_url)
    (tmp_path / "linked" / "out.ckpt.batch").symlink_to(victim, target_is_directory=True)
    for command in (("validate", str(job)), ("run", str(job), "-q", "--wait")):
        refused = cli(*command)
        assert refused.returncode == 2, refused.stderr
        line = one_error_line(refused.stderr)
        assert "out.ckpt.batch" in line and "symbolic link" in line, line
    assert sorted(victim.iterdir()) == [keep] and keep.read_text() == "the user's own file\n"
    assert fast.stats.requests_total == 0

    # A work folder others may write: they could swap a shard before it is uploaded.
    job = batch_job(tmp_path / "shared", fast.base_url)
    shared = tmp_path / "shared" / "out.ckpt.batch"
    shared.mkdir()
    shared.chmod(0o777)
    refused = cli("run", str(job), "-q", "--wait")
    assert refused.returncode == 2, refused.stderr
    line = one_error_line(refused.stderr)
    assert "out.ckpt.batch" in line and "other users may write" in line, line
    assert fast.stats.requests_total == 0

    # One of ours that others may only read (an older batcher's) is narrowed, and the
    # cycle runs to its end.
    job = batch_job(tmp_path / "readable", fast.base_url)
    readable = tmp_path / "readable" / "out.ckpt.batch"
    readable.mkdir()
    readable.chmod(0o755)
    done = cli("run", str(job), "-q", "--wait")
    assert done.returncode == 0, done.stderr
    assert not readable.exists()  # the cycle is over: the work folder is gone
    assert len(pd.read_csv(tmp_path / "readable" / "out.csv")) == 4


def test_item5_the_report_summary_and_stamp_are_private_and_never_written_through_links(
        tmp_path: Path, make_mock: MakeMock, umask_022: None) -> None:
    server = make_mock(api_key=TEST_KEY)
    victim, keep = victim_folder(tmp_path)
    job = write_job(tmp_path / "job.yaml", job_dict(server.base_url, prompts_csv(tmp_path, 3),
                                                    tmp_path / "out.csv"))
    # A link planted where the results stamp goes (beside the checkpoint).
    (tmp_path / "out.ckpt.written").symlink_to(keep)
    ran = cli("run", str(job), "-q")
    assert ran.returncode == 0, ran.stderr
    assert keep.read_text() == "the user's own file\n"
    summary = tmp_path / "out.summary.json"
    assert mode_of(summary) == 0o600

    stamp_run = tmp_path / "again"
    stamp_run.mkdir()
    job = write_job(stamp_run / "job.yaml", job_dict(server.base_url, prompts_csv(stamp_run, 3),
                                                     stamp_run / "out.csv"))
    assert cli("run", str(job), "-q").returncode == 0
    assert mode_of(stamp_run / "out.ckpt.written") == 0o600
    assert mode_of(stamp_run / "out.ckpt") == 0o600

    reported = cli("report", str(tmp_path / "out.csv"))
    assert reported.returncode == 0, reported.stderr
    assert mode_of(tmp_path / "out.report.html") == 0o600
    link = tmp_path / "link.html"
    link.symlink_to(keep)
    refused = cli("report", str(tmp_path / "out.csv"), "-o", str(link))
    assert refused.returncode == 2, refused.stderr
    line = one_error_line(refused.stderr)
    assert "link.html" in line and "symbolic link" in line, line
    assert keep.read_text() == "the user's own file\n"
    assert sorted(victim.iterdir()) == [keep]  # no temp file left behind either


def test_item5_ray_journals_are_private_and_their_folder_is_checked(
        tmp_path: Path, umask_022: None) -> None:
    writer = AnswerWriter(tmp_path / "out.ckpt.ray", "worker")
    writer.close()
    assert mode_of(tmp_path / "out.ckpt.ray") == 0o700
    assert mode_of(writer.path) == 0o600
    victim, keep = victim_folder(tmp_path)
    (tmp_path / "linked.ckpt.ray").symlink_to(victim, target_is_directory=True)
    with pytest.raises(OutputError, match="symbolic link"):
        AnswerWriter(tmp_path / "linked.ckpt.ray", "worker")
    shared = tmp_path / "shared.ckpt.ray"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(OutputError, match="other users may write"):
        AnswerWriter(shared, "worker")
    assert sorted(victim.iterdir()) == [keep] and not list(shared.iterdir())


# == 6. no output, results folder or checkpoint is, or holds, the input ======================

def refused_naming(command: tuple[str, ...], *paths: Path) -> None:
    ran = cli(*command)
    assert ran.returncode == 2, (command, ran.stdout, ran.stderr)
    line = one_error_line(ran.stderr)
    for path in paths:
        assert str(path) in line, (command, line)


def test_item6_an_output_that_is_the_input_is_refused_in_every_mode(
        tmp_path: Path, make_mock: MakeMock) -> None:
    server = make_mock(api_key=TEST_KEY)
    # --ray writes results.parquet/ for output.path results.csv: here, the input.
    source = tmp_path / "prompts.parquet"
    pd.DataFrame({"id": ["a", "b"], "text": ["one", "two"]}).to_parquet(source)
    before = source.read_bytes()
    for mode in ("online", "batch"):
        job = write_job(tmp_path / f"{mode}.yaml", job_dict(
            server.base_url, source, tmp_path / "prompts.csv", mode=mode))
        for command in (("validate", str(job)), ("run", str(job), "-q"),
                        ("run", str(job), "--dry-run")):
            refused_naming(command, source)
    refused_naming(("run", str(tmp_path / "online.yaml"), "--ray", "-q"), source)
    assert source.read_bytes() == before

    # On Ray, input.path may be a folder: the results folder must not be it.
    folder = tmp_path / "lake.parquet"
    folder.mkdir()
    part = folder / "part-0.parquet"
    pd.DataFrame({"id": ["a"], "text": ["one"]}).to_parquet(part)
    job = write_job(tmp_path / "lake.yaml", job_dict(server.base_url, folder,
                                                     tmp_path / "lake.csv"))
    refused_naming(("run", str(job), "--ray", "-q"), folder, part)
    assert part.exists()

    # An input inside the batch work folder, which the end of a cycle empties.
    inside = tmp_path / "out.ckpt.batch"
    inside.mkdir(mode=0o700)
    held = prompts_csv(inside, 2)
    job = write_job(tmp_path / "held.yaml", job_dict(server.base_url, held,
                                                     tmp_path / "out.csv", mode="batch"))
    for held_command in (("validate", str(job)), ("run", str(job), "-q", "--wait")):
        refused_naming(held_command, tmp_path / "out.ckpt.batch", held)
    assert held.exists()

    # The results or the checkpoint named as the input itself.
    plain = prompts_csv(tmp_path, 2, "plain.csv")
    for output in ({"path": str(plain)},
                   {"path": str(tmp_path / "res.csv"), "checkpoint": str(plain)}):
        job = write_job(tmp_path / "same.yaml", job_dict(server.base_url, plain, plain,
                                                         output=output))
        for command in (("validate", str(job)), ("run", str(job), "-q")):
            refused_naming(command, plain)
    assert server.stats.requests_total == 0


# == 7. --ray without an address starts a private local Ray ==================================

class RecordingListener:
    """A TCP port that records every connection: stands in for another user's cluster.
    On this machine's address as Ray sees it (Ray turns 127.0.0.1 into that)."""

    def __init__(self, host: str) -> None:
        self._socket = socket.create_server((host, 0))
        self.address = f"{host}:{self._socket.getsockname()[1]}"
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                peer, _ = self._socket.accept()
            except OSError:
                return
            self.connections += 1
            peer.close()

    def close(self) -> None:
        self._socket.close()


def wait_for(process: subprocess.Popen[str], listener: RecordingListener,
             timeout: float) -> None:
    """Until the process ends or something connects to the listener."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and not listener.connections:
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_item7_ray_without_an_address_never_joins_another_users_cluster(
        tmp_path: Path, make_mock: MakeMock) -> None:
    ray = pytest.importorskip("ray")
    server = make_mock(api_key=TEST_KEY)
    rows = 12
    source = tmp_path / "prompts.parquet"
    pd.DataFrame({"id": [f"row{i}" for i in range(rows)],
                  "text": [prompt_text(i) for i in range(rows)]}).to_parquet(source)
    output = tmp_path / "results.parquet"
    job = write_job(tmp_path / "job.yaml", job_dict(server.base_url, source, output))
    # Ray's default temp folder, made writable by all as Ray makes it, holding the
    # address file another user planted.
    marker = tempfile.mkdtemp(prefix="bray", dir="/tmp")  # Ray's socket paths must be short
    shared = Path(marker) / "ray"
    shared.mkdir()
    shared.chmod(0o777)
    other = RecordingListener(ray.util.get_node_ip_address())
    (shared / "ray_current_cluster").write_text(other.address)
    env = cli_env({"RAY_TMPDIR": marker})
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "batcher", "run", str(job), "--ray", "-q", "--workers", "1"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for(process, other, timeout=240)
        joined = other.connections
        if process.poll() is None:
            process.kill()
        _out, err = process.communicate()
        assert not joined, "batcher joined the cluster named in Ray's shared temp folder"
        assert process.returncode == 0, err
        results = pd.read_parquet(output)
        assert len(results) == rows and (results["status"] == "ok").all()
        assert server.stats.requests_total == rows
        # The local Ray kept its session out of the shared folder, and its own is gone.
        assert sorted(path.name for path in shared.iterdir()) == ["ray_current_cluster"]
        assert sorted(path.name for path in Path(marker).iterdir()) == ["ray"]

        # A cluster the user names is joined: the address goes to Ray as given.
        named = subprocess.Popen([*command, "--ray-address", other.address],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            wait_for(named, other, timeout=120)
            assert other.connections, "the named address was not used"
        finally:
            named.kill()
            named.communicate()
    finally:
        other.close()
        if process.poll() is None:
            process.kill()
            process.communicate()
        for pid in ray_processes(marker):  # what our Ray left behind, if anything
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(marker, ignore_errors=True)


# == 8. the mock server's Files API serves a file to its key only ============================

ALICE = "sk-alice-0123456789abcdef"
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
BOB = "sk-bob-0123456789abcdef"


def test_item8_the_mock_servers_files_are_served_only_to_the_key_that_uploaded_them(
        tmp_path: Path) -> None:
    # The command as a user starts it, without --api-key-env: any key is accepted.
    process = subprocess.Popen([sys.executable, "-m", "batcher", "mock-server", "--port", "0"],
                               env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        base_url = line.split(" on ", 1)[1].split()[0]
        alice = openai.OpenAI(base_url=base_url, api_key=ALICE, max_retries=0)
        bob = openai.OpenAI(base_url=base_url, api_key=BOB, max_retries=0)
        prompts = (b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", '
                   b'"body": {"model": "m", "messages": [{"role": "user", '
                   b'"content": "a private prompt"}]}}\n')
        uploaded = alice.files.create(file=("prompts.jsonl", prompts), purpose="batch")
        batch = alice.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h", metadata={"job": "secret-job"})

        # Anyone else on the machine: no key at all...
        for path in (f"files/{uploaded.id}/content", f"files/{uploaded.id}", "batches",
                     f"batches/{batch.id}"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                DIRECT.open(f"{base_url}/{path}", timeout=10)
            assert refused.value.code == 401
            assert b"private prompt" not in refused.value.read()
        # ...or a key of their own: the file and batch do not exist for them.
        with pytest.raises(openai.NotFoundError):
            bob.files.content(uploaded.id)
        with pytest.raises(openai.NotFoundError):
            bob.files.retrieve(uploaded.id)
        with pytest.raises(openai.NotFoundError):
            bob.batches.retrieve(batch.id)
        with pytest.raises(openai.BadRequestError):
            bob.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
        assert bob.batches.list().data == []
        with pytest.raises(openai.NotFoundError):
            bob.batches.cancel(batch.id)

        # The key that uploaded them sees all of it, results included.
        assert alice.files.content(uploaded.id).content == prompts
        assert [listed.id for listed in alice.batches.list().data] == [batch.id]
        done = alice.batches.retrieve(batch.id)
        assert done.status == "completed" and done.output_file_id is not None
        with pytest.raises(openai.NotFoundError):
            bob.files.content(done.output_file_id)
        assert b"custom_id" in alice.files.content(done.output_file_id).content
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)

    # A batch-mode job on the built-in mock (endpoint.mock) still runs: batcher gives the
    # mock it starts a key made up for the run.
    data = job_dict("unused", prompts_csv(tmp_path, 3), tmp_path / "out.csv", mode="batch",
                    batch={"poll_interval_s": 0.05})
    data["endpoint"] = {"mock": {"latency_s": 0}}
    ran = cli("run", str(write_job(tmp_path / "job.yaml", data)), "-q", "--wait")
    assert ran.returncode == 0, ran.stderr
    assert (pd.read_csv(tmp_path / "out.csv")["status"] == "ok").all()
