"""A row's identity: its request, not its place in a file.

A row's key is a 128-bit hash of its id and of everything that shapes what
is sent for it: the rendered messages, the model, the params, the reply
schema and its mode (``output.schema``), and the kind
of endpoint where that changes what answers (an Azure deployment, the
built-in mock server). The input file's bytes, its other columns, the
limits, retries, timeouts and the endpoint's URL are not part of it, so a
changed input re-sends only the rows whose request changed, and tuning a
job re-sends nothing.

A row's id is its ``input.id_column`` value, or its position when the job
names no id column (then appending rows is safe, but inserting or deleting
rows in the middle changes the ids of the rows after them).

Besides its key, a row has a *request hash* (what is sent, without the id:
identical requests share it), used only for ``duplicates: share``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import orjson

from batcher.config import Job
from batcher.io.inputscan import hash_strings
from batcher.prompts import Prompts

KEY_VERSION = 1
KEY_BYTES = 16


def request_identity(job: Job) -> dict[str, Any]:
    """What every request of the job shares, besides the user message."""
    endpoint = job.endpoint
    kind: dict[str, Any]
    if endpoint.mock is not None:
        kind = {"kind": "mock", "seed": endpoint.mock.seed}
    elif endpoint.azure is not None:
        kind = {"kind": "azure", "deployment": endpoint.azure.deployment}
    else:
        kind = {"kind": "chat"}
    identity = {"v": KEY_VERSION, "model": job.model, "params": job.params,
                "system": job.prompt.system, "endpoint": kind}
    schema = job.output.reply_schema if job.output is not None else None
    if schema is not None:  # only when set, so jobs without one keep their keys
        identity["schema"] = [schema.mode.value, schema.schema]
    return identity


def shared_digest(job: Job) -> bytes:
    """A hash of :func:`request_identity`: jobs that differ in it share no row keys."""
    return hashlib.blake2b(orjson.dumps(request_identity(job), option=orjson.OPT_SORT_KEYS),
                           digest_size=KEY_BYTES).digest()


class RowKeys:
    """Makes the keys of a job's rows, a batch at a time, without a Python
    hash call per row.

    Each half of a key is the XOR of a keyed 64-bit SipHash of the row's
    user message and another of its id (vectorized: one C pass per batch and
    column), with SipHash keys drawn from :func:`shared_digest`, so the
    model, params, system message and endpoint kind are in every key. The
    four hash functions are independent, so two rows' keys agree only when
    both their messages and their ids do (or by a 2**-128 accident). The
    message halves alone are the row's request hash.
    """

    def __init__(self, job: Job) -> None:
        digest = hashlib.blake2b(shared_digest(job), digest_size=32).hexdigest()
        self._salts = [digest[start:start + 16] for start in range(0, 64, 16)]

    def keys(self, ids: list[str], prompts: Prompts) -> np.ndarray:
        """One key per row, as an ``(n, 16)`` array of bytes."""
        text_high, text_low = self._request_halves(prompts)
        high = text_high ^ hash_strings(ids, self._salts[2])
        low = text_low ^ hash_strings(ids, self._salts[3])
        return _as_bytes(high, low)

    def request_hashes(self, prompts: Prompts) -> np.ndarray:
        """What each row sends, without its id: identical requests hash alike."""
        return _as_bytes(*self._request_halves(prompts))

    def _request_halves(self, prompts: Prompts) -> tuple[np.ndarray, np.ndarray]:
        texts = [text or "" for text in prompts.texts]
        if prompts.problems:  # no request: the problem stands in ("" is never a prompt)
            for offset, problem in prompts.problems.items():
                texts[offset] = f"\x00{problem}"
        return hash_strings(texts, self._salts[0]), hash_strings(texts, self._salts[1])


def _as_bytes(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    return np.stack([high, low], axis=1).astype(">u8").view(np.uint8).reshape(-1, KEY_BYTES)


def split(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 16)`` key bytes as two ``uint64`` halves, the index's sort order."""
    halves = np.ascontiguousarray(keys).view(">u8").reshape(-1, 2).astype(np.uint64)
    return halves[:, 0], halves[:, 1]
