"""Keep the API key out of everything batcher prints or stores.

The key is read once from the environment; every piece of text that could
carry it (a server's error body, an exception, a URL with a query-string
key) passes through ``Redactor.clean`` before it reaches a log line, an
error message, the checkpoint or the results, and before any cut to length.

A secret travels in more shapes than its own: percent-encoded in a URL, any
character either way and in any mix (``quote``, ``quote_plus``, either case of
hex digit, or the half-decoded form a URL library normalises a proxy's
password to: ``Pr0xy+Pass%2Fw0rd``), base64 inside a Basic ``Authorization``
header, and a proxy's ``user:password`` both as written in ``HTTPS_PROXY`` and
decoded. ``Redactor`` masks every one of them, and anything shaped like an
OpenAI key.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters that gateways use for keys; their values are masked in any URL shown.
SECRET_QUERY_PARAMS = frozenset({"api_key", "api-key", "apikey", "key", "token", "access_token",
                                 "sig", "signature"})
_SK_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-]{8,}")
_MIN_SECRET = 4  # shorter strings are too common in text to mask
# What a terminal would act on rather than show: escape sequences (CSI such as a screen
# clear, OSC such as a title change, and the two-byte kind), then any other C0 control
# but tab and newline, DEL, and the C1 controls (U+0080-U+009F, 8-bit CSI among them).
_TERMINAL_CONTROLS = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[ -~]?"
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def encodings(secret: str) -> set[str]:
    """The fixed forms of ``secret`` (as is, %-decoded, base64); each character of the
    first two may also appear %-encoded, which :func:`_spelled_any_way` matches."""
    forms = {secret, base64.b64encode(secret.encode()).decode()}
    decoded = unquote(secret)  # a proxy password is written %-encoded in HTTPS_PROXY
    if decoded != secret:
        forms |= encodings(decoded)
    return {form for form in forms if len(form) >= _MIN_SECRET}


def _spelled_any_way(form: str) -> str:
    """A pattern for ``form`` with each character as it is or %-encoded (a space also
    as ``+``), in any mix: a URL library re-encodes some characters and not others."""
    parts = []
    for char in form:
        spellings = [re.escape(char), re.escape(quote(char, safe=""))]
        if char == " ":
            spellings.append(r"\+")
        parts.append(spellings[0] if len(set(spellings)) == 1
                     else "(?:" + "|".join(dict.fromkeys(spellings)) + ")")
    return "".join(parts)


def proxy_secrets(proxy_url: str | None) -> list[str]:
    """The credentials in a proxy URL (``http://user:password@host:port``)."""
    if not proxy_url:
        return []
    try:
        parts = urlsplit(proxy_url)
    except ValueError:
        return []
    if "@" not in parts.netloc:
        return []
    userinfo = parts.netloc.rsplit("@", 1)[0]
    secrets = [userinfo, unquote(userinfo)]
    if parts.password:
        secrets.append(parts.password)
    return secrets


class Redactor:
    """Replaces known secrets, in every encoding (and anything shaped like an
    OpenAI key), with ``***``."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        forms: set[str] = set()
        for secret in secrets or []:
            if len(secret) >= _MIN_SECRET:
                forms |= encodings(secret)
        # Longest first, so a secret that contains another is masked whole; case-blind,
        # so %2f and %2F are both caught (masking a case variant of a key costs nothing).
        alternatives = "|".join(_spelled_any_way(form)
                                for form in sorted(forms, key=len, reverse=True))
        self._pattern = re.compile(alternatives, re.IGNORECASE) if alternatives else None

    def __repr__(self) -> str:
        return "Redactor(...)"  # it holds the secrets it masks

    def clean(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        return mask_key_shapes(text)


def mask_key_shapes(text: str) -> str:
    """``text`` with anything shaped like an OpenAI key (``sk-...``) masked: what text from
    a server gets where no redactor knows the run's own secrets."""
    return _SK_PATTERN.sub(MASK, text)


def printable(text: str) -> str:
    """``text`` with every terminal control removed: what batcher prints passes here, so
    a server's error text cannot retitle, clear or rewrite the user's terminal."""
    return _TERMINAL_CONTROLS.sub("", text)


def redact_url(url: str, secret_params: Iterable[str] = ()) -> str:
    """A URL safe to print: userinfo and the values of key-like query parameters (and of
    ``secret_params``) masked."""
    secret = SECRET_QUERY_PARAMS | {name.lower() for name in secret_params}
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, MASK if k.lower() in secret else v) for k, v in pairs], safe="*"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
