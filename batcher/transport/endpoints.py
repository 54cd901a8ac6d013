"""From the job's ``endpoint`` section to a URL and headers, key included.

The key is read from the environment variable the job names, here and
nowhere else; it is handed on only inside ``Endpoint.headers`` and to the
``Redactor`` that scrubs it from every message. The built-in mock
(``endpoint.mock``) never gets the job's key: it gets a key made up for the
run (``mock_key``), so the prompts a batch-mode run uploads to it are served
to this run only.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from urllib.parse import quote, urlencode, urlsplit

from batcher.config import AuthSpec, EndpointSpec
from batcher.errors import ConfigError
from batcher.redact import Redactor, proxy_secrets, redact_url
from batcher.transport.client import Endpoint, proxy_for

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def missing_key(spec: EndpointSpec, environ: Mapping[str, str] | None = None) -> str | None:
    """What a run would say of the job's unset key, or None when it is set (or not needed)."""
    environ = os.environ if environ is None else environ
    if spec.api_key_env is None or spec.mock is not None or environ.get(spec.api_key_env,
                                                                         "").strip():
        return None
    return _unset(spec.api_key_env)


def _unset(variable: str) -> str:
    return (f"endpoint.api_key_env: environment variable {variable} is not set "
            f"(export {variable}=... before running)")


def resolve_endpoint(spec: EndpointSpec, *, base_url: str | None = None,
                     environ: Mapping[str, str] | None = None,
                     mock_key: str | None = None,
                     require_key: bool = True) -> tuple[Endpoint, Redactor]:
    """The endpoint to call and a redactor that knows its secret.

    ``base_url`` overrides the spec's (used when batcher starts its own mock
    server on a port it picks); ``mock_key`` is the key of that server, sent
    instead of the job's. Without ``require_key`` an unset key leaves the
    endpoint without one (a dry run sends nothing); every other check stands.
    """
    environ = os.environ if environ is None else environ
    root = (base_url or spec.base_url or "").rstrip("/")
    proxy = proxy_for(root)
    key: str | None = mock_key if spec.mock is not None else None
    if spec.api_key_env is not None and spec.mock is None:
        key = environ.get(spec.api_key_env, "").strip()
        if not key and require_key:
            raise ConfigError(_unset(spec.api_key_env))
        if not spec.allow_insecure_http:
            _refuse_plain_http(root, proxy)
    if spec.azure is not None:
        path = f"{root}/openai/deployments/{quote(spec.azure.deployment, safe='')}/chat/completions"
        query: dict[str, str] = {"api-version": spec.azure.api_version}
    else:
        path = f"{root}/chat/completions"
        query = {}
    headers = dict(spec.headers)
    if key:
        auth = spec.auth or AuthSpec(header="api-key" if spec.azure is not None else None)
        if auth.query is not None:
            query[auth.query] = key
        elif auth.header is not None:
            headers[auth.header] = key
        else:
            headers["Authorization"] = f"Bearer {key}"
    url = f"{path}?{urlencode(query)}" if query else path
    key_query = {name: value for name, value in query.items() if name != "api-version"}
    endpoint = Endpoint(url=url, headers=headers, timeout_s=spec.timeout_s,
                        max_response_bytes=spec.max_response_bytes, base_url=root,
                        query=key_query, proxy=proxy)
    return endpoint, Redactor(([key] if key else []) + proxy_secrets(proxy))


def _refuse_plain_http(root: str, proxy: str | None) -> None:
    """No key in clear over the network: not to the server, not to a proxy in between."""
    if not is_safe_for_secrets(root):
        raise ConfigError(
            f"endpoint.base_url: {redact_url(root)} is plain http:// to a host other than "
            "this machine, so the key would cross the network unencrypted; use https:// "
            "or set endpoint.allow_insecure_http: true")
    # Plain http through a proxy hands the proxy the whole request, key included.
    if urlsplit(root).scheme == "http" and proxy is not None and not is_local(proxy):
        raise ConfigError(
            f"endpoint.base_url: {redact_url(root)} is plain http:// and HTTP_PROXY (or "
            f"ALL_PROXY) sends it through {redact_url(proxy)}, a host other than this "
            "machine, so the key would cross the network unencrypted; add the host to "
            "NO_PROXY, use https://, or set endpoint.allow_insecure_http: true")


def is_safe_for_secrets(url: str) -> bool:
    """HTTPS anywhere, or plain HTTP to this machine only."""
    return urlsplit(url).scheme == "https" or is_local(url)


def is_local(url: str) -> bool:
    """The URL's host is this machine (a loopback name or address)."""
    host = (urlsplit(url).hostname or "").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
