"""Running the app: in a background thread for tests, or in the foreground for the CLI.

:class:`MockServer` gives the server its own thread and event loop, so a
synchronous test, or a client running its own loop, can talk to it over real
loopback HTTP. :func:`serve_forever` is the blocking ``batcher mock-server``.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from .app import build_app
from .config import MockConfig, check_loopback
from .stats import MockStats

_GRACE_S = 2.0
"""How long stopping waits for in-flight replies before cancelling them."""
_STOP_TIMEOUT_S = 10.0


def _bind_host(host: str) -> str:
    # "localhost" may resolve to both ::1 and 127.0.0.1, and port 0 would then
    # give each its own port; bind one address so the URL is unambiguous.
    return "127.0.0.1" if host == "localhost" else host


def _root_url(host: str, port: int) -> str:
    bound = _bind_host(host)
    return f"http://[{bound}]:{port}" if ":" in bound else f"http://{bound}:{port}"


async def _serve(
    config: MockConfig, stats: MockStats, on_bound: Callable[[int], None], stop: asyncio.Event
) -> None:
    """Serve until ``stop`` is set, then shut down, waking stalled handlers first."""
    check_loopback(config.host)
    runner = web.AppRunner(build_app(config, stats), access_log=None, shutdown_timeout=_GRACE_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, _bind_host(config.host), config.port)
        await site.start()
        on_bound(runner.addresses[0][1])
        await stop.wait()
    finally:
        await runner.cleanup()


class MockServer:
    """The mock server on a daemon thread with its own event loop.

    >>> with MockServer(MockConfig()) as srv:          # doctest: +SKIP
    ...     client = openai.OpenAI(base_url=srv.base_url, api_key="sk-test")
    """

    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config if config is not None else MockConfig()
        self.stats = MockStats()
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("MockServer is not running; call start() first")
        return self._port

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT``: for Azure-style clients and ``/_mock/*``."""
        return _root_url(self.config.host, self.port)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``: what an OpenAI client takes as ``base_url``."""
        return self.root_url + "/v1"

    def start(self) -> MockServer:
        """Start serving; returns once the port is bound (or raises why it could not be)."""
        if self._thread is not None:
            raise RuntimeError("MockServer is already started")
        check_loopback(self.config.host)
        bound = threading.Event()

        def on_bound(port: int) -> None:
            self._port = port
            bound.set()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await _serve(self.config, self.stats, on_bound, self._stop)

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # handed to the thread that calls start()/stop()
                self._error = exc
            finally:
                bound.set()

        self._thread = threading.Thread(target=run, name="batcher-mock-server", daemon=True)
        self._thread.start()
        bound.wait()
        if self._port is None:
            self._thread.join()
            error = self._error
            self._thread = self._loop = self._stop = self._error = None
            raise RuntimeError("mock server failed to start") from error
        return self

    def stop(self) -> None:
        """Stop serving: stalled requests are dropped, other in-flight replies get a short grace."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if thread.is_alive() and loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        thread.join(_STOP_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(f"mock server did not stop within {_STOP_TIMEOUT_S:g}s")
        self._thread = self._loop = self._stop = None
        self._port = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("mock server crashed") from error

    def __enter__(self) -> MockServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve_forever(config: MockConfig) -> None:
    """Serve in the foreground until Ctrl-C or SIGTERM (the ``batcher mock-server`` command).

    Prints one line with the base URL once the port is bound.
    """
    check_loopback(config.host)

    def announce(port: int) -> None:
        url = _root_url(config.host, port) + "/v1"
        print(f"mock server listening on {url} (replies are simulated)", flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or Windows: Ctrl-C still raises KeyboardInterrupt
            handled.append(sig)
        try:
            await _serve(config, MockStats(), announce, stop)
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    asyncio.run(main())
