"""The matrix's shared parts: one mock server and one local Ray for every cell, and
each (shape, engine) run once however many cells read it.

Both are package-scoped, so they are gone before ``tests/test_ray.py`` starts
a Ray of its own in the same process (Ray allows one per process).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_KEY

from batcher.mock_server import MockConfig, MockServer

from .engines import Outcome, run_engine
from .shapes import Shape


@pytest.fixture(scope="package")
def server() -> Iterator[MockServer]:
    with MockServer(MockConfig(api_key=TEST_KEY)) as started:
        yield started


@pytest.fixture(scope="package")
def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A local Ray with 2 CPUs; ``batcher run --ray`` in this process joins it. Its
    workers inherit this process's environment as it is now: the key is set first."""
    ray = pytest.importorskip("ray")
    folder = tmp_path_factory.mktemp("ray")
    saved = {name: os.environ.get(name) for name in ("RAY_TMPDIR", "BATCHER_TEST_KEY")}
    os.environ.update({"RAY_TMPDIR": str(folder), "BATCHER_TEST_KEY": TEST_KEY})
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


class Runs:
    """Each (shape, engine) run once, on first use, in a folder of its own."""

    def __init__(self, server: MockServer, root: Path) -> None:
        self._server = server
        self._root = root
        self._done: dict[tuple[str, str], Outcome | BaseException] = {}

    def get(self, shape: Shape, engine: str) -> Outcome:
        key = (shape.name, engine)
        if key not in self._done:
            try:
                self._done[key] = run_engine(engine, shape, self._server,
                                             self._root / shape.name / engine)
            except BaseException as error:  # every aspect of this cell fails the same way
                self._done[key] = error
                raise
        done = self._done[key]
        if isinstance(done, BaseException):
            raise RuntimeError(f"the {engine} run of {shape.name} failed: {done!r}")
        return done


@pytest.fixture(scope="package")
def runs(server: MockServer, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(server, tmp_path_factory.mktemp("matrix"))
