"""The notebook story, in a real Jupyter kernel (ipykernel) with its event loop running.

The kernel is started from a kernelspec written for this test that names
this very interpreter, so it imports the batcher under test, whatever other
kernels the machine has.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import MakeMock, wait_until

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.blocking.client import BlockingKernelClient  # noqa: E402
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

from batcher.mock_server import MockServer, reply_for  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
KERNEL = "batcher-test"

# Run first, before the example's own cells: where the kernel runs and how.
PROBE = """
import asyncio, sys
asyncio.get_running_loop()  # raises if Jupyter's event loop were not running here
print("prefix:", sys.prefix)
"""


@pytest.fixture
def kernel_manager(tmp_path: Path) -> KernelManager:
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "batcher test", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def cell_text(cell: Any) -> tuple[str, str]:
    """(stdout + displayed text, stderr) of an executed cell."""
    shown: list[str] = []
    errors: list[str] = []
    for output in cell.outputs:
        if output.output_type == "stream":
            (errors if output.name == "stderr" else shown).append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            shown.append(output.data.get("text/plain", ""))
    return "".join(shown), "".join(errors)


def test_quickstart_notebook_runs_end_to_end(kernel_manager: KernelManager) -> None:
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(PROBE, id="probe"))
    client = nbclient.NotebookClient(notebook, km=kernel_manager, timeout=60,
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()
    cells = {cell.get("id"): cell for cell in notebook.cells}

    shown, _ = cell_text(cells["probe"])
    assert f"prefix: {sys.prefix}" in shown  # the interpreter under test, loop running

    reviews = pd.read_csv(REPO / "sample_data" / "reviews.csv").head(20)
    first = reviews.iloc[0]
    prompt = f"Product: {first['product']}\nRating: {first['rating']}/5\n\n{first['text']}"
    shown, stderr = cell_text(cells["run"])
    assert reply_for(prompt)[:24] in shown  # "[simulated] <digest>": the first row's reply
    assert "ok" in shown
    assert "replies are simulated" in stderr
    assert "batcher: 20 rows: 20 ok, 0 errors; 20 sent, 0 reused from the checkpoint" in stderr

    shown, _ = cell_text(cells["summary"])
    for expected in ("'rows': 20", "'ok': 20", "'errors': 0", "'cost_usd': ",
                     "'simulated': True"):
        assert expected in shown

    shown, _ = cell_text(cells["checkpoint"])
    assert "first call sent 8 requests" in shown
    assert "second call took 8 rows from the checkpoint and sent 12" in shown

    shown, _ = cell_text(cells["async"])
    assert reply_for("Write a haiku about tea.")[:24] in shown
    assert reply_for("Name three prime numbers.")[:24] in shown


class Kernel:
    """Send code to a live kernel and collect what the cell printed and raised."""

    def __init__(self, client: BlockingKernelClient) -> None:
        self.client = client

    def start(self, code: str) -> str:
        msg_id: str = self.client.execute(code)
        return msg_id

    def finish(self, msg_id: str, timeout: float = 60) -> dict[str, Any]:
        outcome: dict[str, Any] = {"stdout": "", "stderr": "", "error": None}
        while True:
            message = self.client.get_iopub_msg(timeout=timeout)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                outcome[content["name"]] += content["text"]
            elif kind == "error":
                outcome["error"] = (content["ename"], content["evalue"])
            elif kind == "status" and content["execution_state"] == "idle":
                return outcome

    def run(self, code: str) -> dict[str, Any]:
        return self.finish(self.start(code))


@pytest.fixture
def kernel(kernel_manager: KernelManager, tmp_path: Path) -> Iterator[Kernel]:
    kernel_manager.start_kernel(cwd=str(tmp_path))
    client = kernel_manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        yield Kernel(client)
    finally:
        client.stop_channels()
        kernel_manager.shutdown_kernel(now=True)


def test_kernel_interrupt_stops_gracefully_and_the_same_cell_resumes(
        kernel: Kernel, kernel_manager: KernelManager, make_mock: MakeMock, tmp_path: Path) -> None:
    server: MockServer = make_mock(latency_s=0.05)
    prompts = [f"Prompt number {i}" for i in range(40)]
    setup = kernel.run(f"""
import batcher, pandas as pd
frame = pd.DataFrame({{"text": {prompts!r}}})
def call():
    return batcher.run_dataframe(frame, model="gpt-4o-mini", prompt_column="text",
                                 base_url={server.base_url!r}, concurrency=2,
                                 checkpoint="batch.ckpt")
""")
    assert setup["error"] is None, setup

    # The kernel's stop button sends SIGINT; the cell is blocked in the sync call.
    running = kernel.start("out = call()")
    wait_until(lambda: sum(server.stats.snapshot()["ok_prompts"].values()) >= 5, timeout=30,
               what="the run to get going", interval=0.01)
    kernel_manager.interrupt_kernel()
    interrupted = kernel.finish(running)
    assert interrupted["error"] is not None
    name, message = interrupted["error"]
    assert name == "KeyboardInterrupt" and "resume" in message and "batch.ckpt" in message
    assert (tmp_path / "batch.ckpt").exists()
    done_first = len(server.stats.snapshot()["prompts"])
    assert done_first < 40

    # The kernel is alive and its loop free; running the same cell again resumes.
    resumed = kernel.run("""
out = call()
print(len(out), sorted(set(out["status"])), out.attrs["batcher"]["from_checkpoint"],
      out.attrs["batcher"]["requests"])
""")
    assert resumed["error"] is None, resumed
    assert f"40 ['ok'] {done_first} {40 - done_first}" in resumed["stdout"]
    assert server.stats.snapshot()["prompts"] == dict.fromkeys(prompts, 1)  # none sent twice
