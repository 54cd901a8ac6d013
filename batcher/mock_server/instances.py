"""Structured replies: a JSON value in a JSON Schema's shape, and ways to break one.

The mock answers a request that asks for structured output, through
``response_format`` (``json_schema``, or ``json_object`` with or without a
``schema``) or, like a model that follows instructions, through a JSON
Schema in a ```` ```json ```` fence in the prompt, with a value that conforms
to the schema. The value is drawn from a RNG seeded by the server's seed,
the prompt and the choice's index, so the same request always gets the same
answer.

The generator covers what replies are made of: objects, arrays, strings,
numbers and integers within their bounds, booleans, null, ``enum``,
``const``, ``anyOf``/``oneOf``/``allOf`` and local ``$ref``. It is written
for the mock alone and shares nothing with batcher's own schema code, so a
misreading of the spec in one is caught by the other.
"""

from __future__ import annotations

import json
import math
import random
import re
from typing import Any

_PROMPT_SCHEMA = re.compile(r"JSON Schema:\s*```json\s*\n(?P<schema>.*?)\n```", re.DOTALL)
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
_MAX_DEPTH = 8


def schema_in_prompt(prompt: str) -> dict[str, Any] | None:
    """A JSON Schema the prompt asks the answer to follow, if it carries one."""
    match = _PROMPT_SCHEMA.search(prompt)
    if match is None:
        return None
    try:
        schema = json.loads(match.group("schema"))
    except ValueError:
        return None
    return schema if isinstance(schema, dict) else None


def rng_for(seed: int, prompt: str, choice: int) -> random.Random:
    return random.Random(f"{seed}\x00{choice}\x00{prompt}")


def instance_for(schema: dict[str, Any], rng: random.Random) -> Any:
    """A value that conforms to ``schema`` (for the constructs listed above)."""
    return _Generator(schema, rng).value(schema, 0)


def violate(value: Any, schema: dict[str, Any]) -> Any:
    """A copy of a conforming object that breaks the schema: its first property gets a
    value of the wrong type (a list, or a string where a list is due)."""
    if not isinstance(value, dict) or not value:
        return ["not", "an", "object"]
    broken = dict(value)
    first = next(iter(broken))
    broken[first] = "wrong type" if isinstance(broken[first], list) else ["wrong", "type"]
    return broken


class _Generator:
    def __init__(self, root: dict[str, Any], rng: random.Random) -> None:
        self._root = root
        self._rng = rng

    def value(self, node: Any, depth: int) -> Any:
        node = self._resolve(node)
        if not isinstance(node, dict) or depth > _MAX_DEPTH:
            return None
        if "const" in node:
            return node["const"]
        if isinstance(node.get("enum"), list) and node["enum"]:
            return self._rng.choice(node["enum"])
        for key in ("anyOf", "oneOf"):
            branches = node.get(key)
            if isinstance(branches, list) and branches:
                # Prefer a branch that is not null, so columns get values.
                typed = [b for b in branches if self._resolve(b).get("type") != "null"]
                return self.value(self._rng.choice(typed or branches), depth)
        if isinstance(node.get("allOf"), list) and node["allOf"]:
            merged: dict[str, Any] = {}
            for part in node["allOf"]:
                merged.update(self._resolve(part))
            return self.value({**merged, **{k: v for k, v in node.items() if k != "allOf"}},
                              depth)
        kind = node.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"] or ["null"]
            kind = kinds[0]
        if kind is None:
            kind = "object" if "properties" in node else "string"
        return self._typed(kind, node, depth)

    def _typed(self, kind: str, node: dict[str, Any], depth: int) -> Any:
        rng = self._rng
        if kind == "object":
            properties = node.get("properties") or {}
            return {name: self.value(child, depth + 1) for name, child in properties.items()}
        if kind == "array":
            low = int(node.get("minItems", 1))
            high = max(low, int(node.get("maxItems", low + 2)))
            items = node.get("items", {})
            return [self.value(items, depth + 1) for _ in range(rng.randint(low, high))]
        if kind == "string":
            return self._string(node)
        if kind in ("number", "integer"):
            bottom, top = _bounds(node)
            if kind == "integer":
                return rng.randint(math.ceil(bottom), max(math.ceil(bottom), math.floor(top)))
            return round(rng.uniform(bottom, top), 2) if top - bottom >= 0.01 else bottom
        if kind == "boolean":
            return rng.random() < 0.5
        return None

    def _string(self, node: dict[str, Any]) -> str:
        rng = self._rng
        fmt = node.get("format")
        if fmt == "date":
            return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        if fmt == "date-time":
            return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T12:00:00Z"
        if fmt == "email":
            return f"{rng.choice(_WORDS)}@example.com"
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))
        low = int(node.get("minLength", 0))
        high = int(node.get("maxLength", max(low, len(text))))
        text = text.ljust(low, "x")
        return text[:high]

    def _resolve(self, node: Any) -> Any:
        for _ in range(32):
            if not (isinstance(node, dict) and isinstance(node.get("$ref"), str)):
                break
            node = self._pointer(node["$ref"])
        return node if isinstance(node, dict) else {}

    def _pointer(self, ref: str) -> Any:
        node: Any = self._root
        if not ref.startswith("#"):
            return {}
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part, {}) if isinstance(node, dict) else {}
        return node


def _bounds(node: dict[str, Any]) -> tuple[float, float]:
    low = float(node.get("minimum", node.get("exclusiveMinimum", 0)))
    high = float(node.get("maximum", node.get("exclusiveMaximum", low + 100)))
    if "exclusiveMinimum" in node and "minimum" not in node:
        low += 0.01 if high - low > 0.02 else 0
    if "exclusiveMaximum" in node and "maximum" not in node:
        high -= 0.01 if high - low > 0.02 else 0
    return low, max(low, high)
