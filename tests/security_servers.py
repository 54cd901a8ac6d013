"""Real servers on 127.0.0.1 for the security tests: a proxy that logs every byte
it receives, a TLS front for the mock server, and a server that echoes the
request target back in its errors and redirects.

All run on one asyncio loop in a background thread, started and stopped by
``ServerThread`` (a context manager).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

import orjson
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ServerThread:
    """An event loop in a thread, serving any number of handlers on 127.0.0.1."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._servers: list[asyncio.Server] = []
        self._runners: list[web.AppRunner] = []

    def __enter__(self) -> ServerThread:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        async def close() -> None:
            for runner in self._runners:
                await runner.cleanup()
            for server in self._servers:
                server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def serve(self, handler: Handler, tls: ssl.SSLContext | None = None) -> int:
        """Start serving ``handler``; returns the port."""
        async def start() -> int:
            server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
            self._servers.append(server)
            return int(server.sockets[0].getsockname()[1])

        return asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10)

    def serve_app(self, app: web.Application) -> int:
        """Start serving an aiohttp ``app``; returns the port. Cleaned up on exit."""
        async def start() -> int:
            runner = web.AppRunner(app, handle_signals=False)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self._runners.append(runner)
            return int(runner.addresses[0][1])

        return asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                log: bytearray | None = None) -> None:
    try:
        while chunk := await reader.read(1 << 16):
            if log is not None:
                log.extend(chunk)
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                 port: int, first: bytes, log: bytearray | None) -> None:
    upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
    upstream_writer.write(first)
    await asyncio.gather(_pipe(client_reader, upstream_writer, log),
                         _pipe(upstream_reader, client_writer))


class LoggingProxy:
    """An HTTP proxy (CONNECT tunnels and absolute-form forwarding) that records
    every byte a client sends it. With ``refuse`` set, it answers every request
    with that status instead (407 asks for credentials)."""

    def __init__(self, servers: ServerThread, refuse: int | None = None) -> None:
        self.received = bytearray()
        self.heads: list[bytes] = []
        self._refuse = refuse
        self.port = servers.serve(self._handle)
        self.url = f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        self.received.extend(head)
        self.heads.append(head)
        method, target = head.split(b" ", 2)[:2]
        if self._refuse is not None:
            writer.write(b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\nConnection: close\r\n"
                         b"Proxy-Authenticate: Basic realm=\"test\"\r\n\r\n" % self._refuse)
            await writer.drain()
            writer.close()
            return
        if method == b"CONNECT":
            port = int(target.rsplit(b":", 1)[1])
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await _relay(reader, writer, port, b"", self.received)
        else:  # http://host:port/path: the target server takes the absolute form as it is
            port = int(target.split(b"/")[2].rsplit(b":", 1)[1])
            await _relay(reader, writer, port, head, self.received)


def self_signed_certificate(folder: Path) -> tuple[Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 and localhost; returns its PEM file (to trust)
    and a server context that presents it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "batcher test server")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file = folder / "test-cert.pem"
    key_file = folder / "test-key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return cert_file, context


def tls_front(servers: ServerThread, tls: ssl.SSLContext, port: int) -> int:
    """Terminate TLS and pass the plain bytes on to ``port``; returns the TLS port."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _relay(reader, writer, port, b"", None)

    return servers.serve(handle, tls)


def echoing_server(servers: ServerThread, status: int, message: str = "") -> int:
    """Answers every request with ``status``: a JSON error whose message is
    ``message`` followed by the request target exactly as received (percent-
    encoding and all), and for a 3xx a ``Location`` that carries it too."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                target = head.split(b" ", 2)[1].decode("latin-1")
                body = orjson.dumps({"error": {"message": f"{message}{target}",
                                               "type": "invalid_request_error"}})
                location = f"Location: http://elsewhere.invalid{target}\r\n" \
                    if 300 <= status < 400 else ""
                writer.write(f"HTTP/1.1 {status} Echo\r\nContent-Type: application/json\r\n"
                             f"{location}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return servers.serve(handle)


def not_http_server(servers: ServerThread) -> int:
    """Answers every request with a line that is not HTTP: aiohttp's error for it
    quotes the request URL, query string and all."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    return servers.serve(handle)
