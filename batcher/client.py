"""HTTP to an OpenAI-compatible server: the only module that speaks aiohttp.

Every failure of the transport (refused or reset connection, a timeout, a
body cut short) is translated here, at one boundary, into a classified
``ApiError``; nothing above this module sees an aiohttp exception.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

import aiohttp

from batcher.errors import ApiError, ConfigError, Verdict
from batcher.redact import Redactor
from batcher.wire import Completion, classify_error, one_line, parse_completion


@dataclass(frozen=True)
class Endpoint:
    """Where requests go and what they carry; ``headers`` may hold the key."""

    url: str
    headers: dict[str, str]
    timeout_s: float


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
        self._proxy: str | None = None

    async def __aenter__(self) -> Self:
        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300,
                                         enable_cleanup_closed=True)
        # Proxies from the environment are looked up once here, not per request:
        # aiohttp's trust_env would consult the environment and ~/.netrc through the
        # thread pool on every request (a third of the client's CPU at full speed),
        # and netrc credentials would clash with the key's Authorization header.
        self._proxy = proxy_for(self._endpoint.url)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._endpoint.timeout_s),
            headers={"Content-Type": "application/json", **self._endpoint.headers},
            raise_for_status=False,
            trust_env=False,
        )
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, body: bytes) -> Response:
        """Send one chat-completion request; raise ``ApiError`` on any failure."""
        assert self._session is not None, "use ChatClient as an async context manager"
        started = time.perf_counter()
        try:
            # No redirects: aiohttp drops only Authorization on a cross-host redirect,
            # so a key in api-key or X-Api-Key would follow it to another host.
            async with self._session.post(self._endpoint.url, data=body, proxy=self._proxy,
                                          allow_redirects=False) as response:
                payload = await response.read()
                status = response.status
                headers = {key.lower(): value for key, value in response.headers.items()}
        except TimeoutError:
            raise ApiError(Verdict.RETRY, f"request timed out after {self._endpoint.timeout_s:g} s"
                           ) from None
        except aiohttp.ClientError as exc:
            reason = self._redactor.clean(one_line(str(exc) or exc.__class__.__name__))
            raise ApiError(Verdict.RETRY, f"connection error: {reason}") from None
        except ValueError as exc:  # yarl/aiohttp reject the URL or a proxy URL from the env
            reason = self._redactor.clean(one_line(str(exc)))
            raise ConfigError(f"cannot build the request (check endpoint.base_url and the "
                              f"HTTP_PROXY/HTTPS_PROXY variables): {reason}") from None
        latency = time.perf_counter() - started
        try:
            if status != 200:
                raise classify_error(status, payload, headers)
            return Response(parse_completion(payload), latency, headers)
        except ApiError as error:
            error.message = self._redactor.clean(error.message)
            raise


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
