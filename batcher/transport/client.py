"""HTTP to an OpenAI-compatible server: the only module that speaks aiohttp.

Every failure of the transport (refused or reset connection, a timeout, a
body cut short) is translated here, at one boundary, into a classified
``ApiError``; nothing above this module sees an aiohttp exception.

Longer than most modules because the chat client and the Files/Batches client
share that one boundary (the translation of failures, the capped read, the
proxy's refusal): split, the boundary would be two.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import orjson

from batcher.errors import ApiError, ConfigError, Verdict
from batcher.io.safefiles import open_private
from batcher.redact import MASK, Redactor, redact_url
from batcher.transport.batchwire import Batch, Page, parse_batch, parse_page, safe_id
from batcher.transport.failures import MAX_LABEL_CHARS, classify_error, one_line, server_text
from batcher.transport.wire import Completion, parse_completion


@dataclass(frozen=True)
class Endpoint:
    """Where requests go and what they carry; ``headers`` may hold the key.

    ``proxy`` is the proxy URL from the environment (looked up once, when the
    endpoint is resolved), or None.
    """

    url: str
    headers: dict[str, str]
    timeout_s: float
    max_response_bytes: int
    base_url: str = ""
    """The API root (``https://api.openai.com/v1``): files and batches live under it."""
    query: dict[str, str] = field(default_factory=dict)
    """Query parameters every request carries (a key sent as ``auth.query``)."""
    proxy: str | None = None

    def __repr__(self) -> str:
        # The key may be in a header, in the URL's query or in ``query``, and a proxy's
        # password in ``proxy``: repr() (a traceback, a log, a notebook) shows none of them.
        url = redact_url(self.url, secret_params=self.query.keys())
        proxy = None if self.proxy is None else redact_url(self.proxy)
        return (f"Endpoint(url={url!r}, headers={dict.fromkeys(self.headers, MASK)!r}, "
                f"timeout_s={self.timeout_s!r}, max_response_bytes={self.max_response_bytes!r}, "
                f"base_url={redact_url(self.base_url)!r}, "
                f"query={dict.fromkeys(self.query, MASK)!r}, proxy={proxy!r})")

    def resource(self, path: str, **params: str) -> str:
        """The URL of ``path`` under the API root, with the endpoint's query parameters."""
        query = {**params, **self.query}
        url = f"{self.base_url}/{path}"
        return f"{url}?{urlencode(query)}" if query else url


@dataclass(slots=True)
class Response:
    completion: Completion
    latency_s: float
    headers: dict[str, str]


class ChatClient:
    """One keep-alive connection pool for the whole run."""

    def __init__(self, endpoint: Endpoint, redactor: Redactor, max_connections: int) -> None:
        self._endpoint = endpoint
        self._redactor = redactor
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        # Sent with each request, never as session defaults: aiohttp copies a session's
        # default headers into the CONNECT it sends an HTTPS proxy (Authorization as
        # Proxy-Authorization, any other header as it is), and the key is for the origin only.
        self._headers = {"Content-Type": "application/json", **endpoint.headers}

    async def __aenter__(self) -> Self:
        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300,
                                         enable_cleanup_closed=True)
        # Proxies from the environment are looked up once (Endpoint.proxy), not per request:
        # aiohttp's trust_env would consult the environment and ~/.netrc through the
        # thread pool on every request (a third of the client's CPU at full speed),
        # and netrc credentials would clash with the key's Authorization header.
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._endpoint.timeout_s),
            raise_for_status=False,
            trust_env=False,
        )
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    @property
    def redactor(self) -> Redactor:
        return self._redactor

    @property
    def proxy(self) -> str | None:
        return self._endpoint.proxy

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use ChatClient as an async context manager"
        return self._session

    async def send(self, body: bytes) -> Response:
        """Send one chat-completion request; raise ``ApiError`` on any failure."""
        assert self._session is not None, "use ChatClient as an async context manager"
        started = time.perf_counter()
        try:
            # No redirects: aiohttp drops only Authorization on a cross-host redirect,
            # so a key in api-key or X-Api-Key would follow it to another host.
            with _transport_errors("request", self._endpoint.timeout_s, self._redactor):
                async with self._session.post(self._endpoint.url, data=body,
                                              headers=self._headers, proxy=self._endpoint.proxy,
                                              allow_redirects=False) as response:
                    payload = await self._read_capped(response)
                    status = response.status
                    headers = {key.lower(): value for key, value in response.headers.items()}
        except ValueError as exc:  # yarl/aiohttp reject the URL or a proxy URL from the env
            reason = one_line(self._redactor.clean(str(exc)))
            raise ConfigError(f"cannot build the request (check endpoint.base_url and the "
                              f"HTTP_PROXY/HTTPS_PROXY variables): {reason}") from None
        latency = time.perf_counter() - started
        clean = self._redactor.clean
        if status != 200:
            raise classify_error(status, payload, headers, url=self._endpoint.url, clean=clean)
        return Response(parse_completion(payload, clean=clean), latency, headers)

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        """The body, read no further than ``max_response_bytes``: a runaway reply is a
        row error, not a run's worth of memory."""
        limit = self._endpoint.max_response_bytes
        declared = response.content_length
        if declared is None or declared <= limit:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_chunked(1 << 16):
                size += len(chunk)
                if size > limit:
                    break
                chunks.append(chunk)
            else:
                return b"".join(chunks)
        response.close()  # the rest is never read: drop the connection
        raise ApiError(Verdict.ROW_ERROR,
                       f"HTTP {response.status}: the response body is larger than "
                       f"endpoint.max_response_bytes ({limit:,} bytes); it was not read",
                       status=response.status)


_JSON = {"Content-Type": "application/json"}
_CHUNK = 1 << 20


class BatchClient:
    """The Files and Batches API over a ``ChatClient``'s session (one per run).

    Every call raises a classified ``ApiError`` on failure, exactly as a chat
    request does; the caller retries it through ``batcher.limits.retry``. What the
    server answers is checked where it arrives (``batcher.transport.batchwire``): ids
    of a safe shape only, quoted again in every URL. No answer is read past a cap and no call runs
    without end: a JSON answer is held to ``endpoint.max_response_bytes`` and
    ``endpoint.timeout_s`` in all; an upload or a download streams from and to
    disk, at most ``max_download_bytes``, ``endpoint.timeout_s`` between two
    reads and ``transfer_timeout_s`` in all.
    """

    def __init__(self, client: ChatClient, *, max_download_bytes: int,
                 transfer_timeout_s: float) -> None:
        self._client = client
        self._max_download_bytes = max_download_bytes
        self._transfer_timeout_s = transfer_timeout_s

    @property
    def _clean(self) -> Callable[[str], str]:
        return self._client.redactor.clean

    async def upload(self, path: Path) -> str:
        """``POST /files`` with ``purpose=batch``; returns the file id."""
        with path.open("rb") as handle:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", handle, filename=path.name,
                           content_type="application/jsonl")
            data = await self._call("POST", "files", data=form, transfer=True)
        file_id = data.get("id")
        if file_id is None:
            raise ApiError(Verdict.RETRY, "the upload's answer names no file id", status=200)
        return safe_id(file_id, "the uploaded file the id", self._clean)

    def parse(self, raw: Any) -> Batch:
        """A batch object met in the list, checked as any other answer."""
        return parse_batch(raw, clean=self._clean)

    async def create(self, file_id: str, window: str, metadata: dict[str, str]) -> Batch:
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                "completion_window": window, "metadata": metadata}
        answer = await self._call("POST", "batches", data=orjson.dumps(body), headers=_JSON)
        return parse_batch(answer, clean=self._clean, status="validating")

    async def retrieve(self, batch_id: str) -> Batch:
        answer = await self._call("GET", f"batches/{_segment(batch_id)}")
        return parse_batch(answer, clean=self._clean)

    async def cancel(self, batch_id: str) -> Batch:
        answer = await self._call("POST", f"batches/{_segment(batch_id)}/cancel")
        return parse_batch(answer, clean=self._clean, status="cancelling")

    async def list(self, after: str | None, limit: int = 100) -> Page:
        params = {"limit": str(limit)} | ({"after": after} if after else {})
        return parse_page(await self._call("GET", "batches", params=params), clean=self._clean)

    async def download(self, file_id: str, dest: Path) -> None:
        """Stream a file's content to ``dest`` (whole or not at all)."""
        temp = dest.with_name(f".{dest.name}.part")
        try:
            # 0600 and never through a link: the answers are as private as the checkpoint.
            with os.fdopen(open_private(temp, "download", os.O_WRONLY | os.O_TRUNC), "wb"
                           ) as handle:
                await self._call("GET", f"files/{_segment(file_id)}/content", sink=handle,
                                 transfer=True)
            temp.replace(dest)
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()

    async def _call(self, method: str, path: str, *, data: Any = None,
                    headers: dict[str, str] | None = None, params: dict[str, str] | None = None,
                    sink: IO[bytes] | None = None, transfer: bool = False) -> dict[str, Any]:
        what = f"{method} {path}"
        if not transfer:
            return await self._exchange(method, path, data=data, headers=headers,
                                        params=params, sink=sink, transfer=False)
        total = self._transfer_timeout_s
        try:
            async with asyncio.timeout(total):
                return await self._exchange(method, path, data=data, headers=headers,
                                            params=params, sink=sink, transfer=True)
        except TimeoutError:  # the total; a stall between two reads is an ApiError already
            raise ApiError(Verdict.RETRY, f"{what} took longer than batch.transfer_timeout_s "
                           f"({total:g} s) and was stopped") from None

    async def _exchange(self, method: str, path: str, *, data: Any,
                        headers: dict[str, str] | None, params: dict[str, str] | None,
                        sink: IO[bytes] | None, transfer: bool) -> dict[str, Any]:
        client = self._client
        session = client.session
        timeout_s = client.endpoint.timeout_s
        timeout = (aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
                   if transfer else aiohttp.ClientTimeout(total=timeout_s))
        url = client.endpoint.resource(path, **(params or {}))
        # The key's headers per request, never as session defaults (see ChatClient).
        with _transport_errors(f"{method} {path}", timeout_s, client.redactor):
            async with session.request(method, url, data=data,
                                       headers={**client.endpoint.headers, **(headers or {})},
                                       proxy=client.proxy, timeout=timeout,
                                       allow_redirects=False) as response:
                status = response.status
                response_headers = {key.lower(): value
                                    for key, value in response.headers.items()}
                if status == 200 and sink is not None:
                    await self._save_capped(response, sink, f"{method} {path}")
                    return {}
                payload = await client._read_capped(response)
        clean = client.redactor.clean
        if status != 200:
            raise classify_error(status, payload, response_headers, clean=clean)
        try:
            parsed = orjson.loads(payload)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ApiError(Verdict.RETRY, clean(f"{method} {path}: HTTP 200 with a body that is "
                                                "not a JSON object"), status=200)
        return parsed

    async def _save_capped(self, response: aiohttp.ClientResponse, sink: IO[bytes],
                           what: str) -> None:
        """Stream the body to ``sink``, no further than ``max_download_bytes``: a
        runaway file is refused, not a full disk."""
        limit = self._max_download_bytes
        declared = response.content_length
        size = 0
        if declared is None or declared <= limit:
            async for chunk in response.content.iter_chunked(_CHUNK):
                size += len(chunk)
                if size > limit:
                    break
                sink.write(chunk)
            else:
                return
        response.close()  # the rest is never read: drop the connection
        raise ApiError(Verdict.ROW_ERROR,
                       f"{what}: the file is larger than batch.max_download_bytes "
                       f"({limit:,} bytes); it was not kept (raise batch.max_download_bytes "
                       "if the batch's answers are that large)", status=200)


def _segment(resource_id: str) -> str:
    """An id as one URL path segment (ids are checked on arrival; this is the second lock)."""
    return quote(resource_id, safe="")


@contextlib.contextmanager
def _transport_errors(what: str, timeout_s: float, redactor: Redactor) -> Iterator[None]:
    """A timeout or a connection failure as a retryable ``ApiError`` whose reason
    carries no secret (aiohttp's texts may quote the URL, a query key included)."""
    try:
        yield
    except TimeoutError:
        raise ApiError(Verdict.RETRY, f"{what} timed out after {timeout_s:g} s") from None
    except aiohttp.ClientHttpProxyError as exc:  # the proxy's answer to our CONNECT
        # Named by host and port only: aiohttp's text quotes the proxy URL with its
        # credentials, half-decoded.
        proxy = redactor.clean(str(exc.request_info.real_url.with_user(None).with_path("")))
        if exc.status == 407:  # it will refuse every request alike: a bad key, in effect
            raise ApiError(
                Verdict.ABORT,
                f"the proxy {proxy} refused batcher's proxy credentials (HTTP 407 to "
                "CONNECT): fix the user and password in HTTPS_PROXY (or ALL_PROXY), "
                "%-encoding special characters, or add the host to NO_PROXY",
                status=407) from None
        reason = server_text(exc.message, redactor.clean, MAX_LABEL_CHARS)
        raise ApiError(Verdict.RETRY, f"connection error: the proxy {proxy} answered "
                                      f"HTTP {exc.status} ({reason}) to CONNECT") from None
    except aiohttp.ClientError as exc:
        reason = one_line(redactor.clean(str(exc) or exc.__class__.__name__))
        raise ApiError(Verdict.RETRY, f"connection error: {reason}") from None


def proxy_for(url: str) -> str | None:
    """The proxy ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` name for ``url``, unless
    ``NO_PROXY`` exempts its host (the same rules as urllib and aiohttp's trust_env)."""
    parts = urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy is None:
        return None
    try:
        split = urlsplit(proxy)
        valid = bool(split.hostname) and (split.port is None or split.port > 0)
    except ValueError:  # a port that is not a number: an unescaped character before it
        valid = False
    if not valid:  # never echo it: a proxy URL may carry credentials
        raise ConfigError(f"the {parts.scheme.upper()}_PROXY (or ALL_PROXY) environment "
                          "variable is not a valid proxy URL like http://user:password@host:port "
                          "(%-encode special characters in the password)")
    return proxy
