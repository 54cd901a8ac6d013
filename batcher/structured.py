"""Answers as data: a JSON Schema for the replies, and the check every reply passes.

A job's ``output.schema`` says what each reply must be: a JSON object whose
top-level properties become typed result columns. This module owns the
schema's journey on the wire and back:

* :meth:`ReplySchema.response_format` is what the request asks for, in the
  server's dialect (:class:`SchemaMode`): OpenAI's ``json_schema`` (strict
  when the schema qualifies), llama-cpp-python's ``json_object`` with a
  ``schema`` (grammar-constrained), or nothing at all, with
  :meth:`ReplySchema.instruction` appended to the prompt instead.
* :meth:`ReplySchema.check` turns one choice (its text, ``finish_reason`` and
  ``refusal``) into the parsed values or a :class:`ReplyProblem` with its
  kind and a one-line message: where the JSON broke, which schema rule
  failed at which path, a cut-off, a refusal. It is pure, so the realtime
  pipeline and the Batch API mode share it.

The schema is validated with ``jsonschema`` (the reference implementation of
the spec, every draft through 2020-12, local ``$ref``/``$defs`` as pydantic
writes them, and errors that carry both the instance's and the schema's
path), built by :mod:`batcher.schema_guard` so that its patterns run in
linear time and its references never leave the schema.

A little over 300 lines, kept whole: what a request asks for in each
dialect and the check every reply passes must agree on the same schema.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from jsonschema import exceptions as schema_exceptions

from batcher import schema_guard
from batcher.schema_guard import SchemaError as SchemaError  # its home before schema_guard

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_FENCE = re.compile(r"\A```[A-Za-z0-9_-]*[ \t]*\n(?P<body>.*?)\n?```\Z", re.DOTALL)
_MESSAGE_CHARS = 160
DEFAULT_NAME = "reply"


class SchemaMode(StrEnum):
    """How the schema reaches the server (``output.schema_mode``)."""

    JSON_SCHEMA = "json_schema"  # OpenAI, Azure, vLLM, llama.cpp's llama-server
    JSON_OBJECT = "json_object"  # llama-cpp-python's server: {"type": "json_object", "schema"}
    PROMPT = "prompt"  # no structured output: the schema goes into the prompt


class ProblemKind(StrEnum):
    """Why a reply is not usable data."""

    NOT_JSON = "not_json"  # empty, prose, or broken JSON
    TRUNCATED = "truncated"  # cut off by max_tokens (finish_reason length) mid-JSON
    SCHEMA = "schema"  # valid JSON that breaks a rule of the schema
    REFUSAL = "refusal"  # the model or the service's content filter declined

    @property
    def retryable(self) -> bool:
        """A refusal is the model's answer: asking again costs money and gets the same."""
        return self is not ProblemKind.REFUSAL


@dataclass(frozen=True, slots=True)
class ReplyProblem:
    kind: ProblemKind
    message: str  # one line, for the results' ``error`` column

    @property
    def retryable(self) -> bool:
        return self.kind.retryable

    @property
    def signature(self) -> str:
        """What makes two failed rows fail "the same way" (the failure streak)."""
        return f"invalid reply: {self.kind.value}"


@dataclass(frozen=True, slots=True)
class ParsedReply:
    values: dict[str, Any]


class ReplySchema:
    """A checked JSON Schema for replies, ready to send and to validate against.

    >>> schema = ReplySchema({"type": "object", "properties": {"label": {"type": "string"}},
    ...                       "required": ["label"], "additionalProperties": False})
    >>> schema.check('{"label": "positive"}', "stop", None)
    ParsedReply(values={'label': 'positive'})
    >>> schema.check('{"label": 3}', "stop", None).kind
    <ProblemKind.SCHEMA: 'schema'>
    """

    def __init__(self, schema: Mapping[str, Any], mode: SchemaMode = SchemaMode.JSON_SCHEMA
                 ) -> None:
        self.schema: dict[str, Any] = dict(schema)
        self.mode = mode
        self._validator = _compile(self.schema)
        self.properties: dict[str, Any] = _top_properties(self.schema)
        self.name = _wire_name(self.schema.get("title"))
        self.strict_problem = _strict_problem(self.schema)

    @property
    def strict(self) -> bool:
        """Whether OpenAI's strict mode accepts the schema as it is (see ``strict_problem``)."""
        return self.strict_problem is None

    def resolve(self, node: Any) -> Any:
        """``node`` with a local ``$ref`` (``#/$defs/Name``) followed, as often as needed."""
        seen = 0
        while isinstance(node, dict) and isinstance(node.get("$ref"), str):
            node = schema_guard.pointer(self.schema, node["$ref"])
            seen += 1
            if seen > 32:
                raise SchemaError("$ref: references loop")
        return node

    # -- the request -----------------------------------------------------------------------

    def response_format(self) -> dict[str, Any] | None:
        """The request's ``response_format`` in this schema's dialect (None: prompt mode)."""
        if self.mode is SchemaMode.JSON_SCHEMA:
            return {"type": "json_schema",
                    "json_schema": {"name": self.name, "schema": self.schema,
                                    "strict": self.strict}}
        if self.mode is SchemaMode.JSON_OBJECT:
            return {"type": "json_object", "schema": self.schema}
        return None

    def instruction(self) -> str | None:
        """Text appended to each user message in prompt mode (None in the other modes)."""
        if self.mode is not SchemaMode.PROMPT:
            return None
        text = orjson.dumps(self.schema, option=orjson.OPT_INDENT_2).decode()
        return ("\n\nAnswer with one JSON object and nothing else (no prose, no code fence). "
                f"It must conform to this JSON Schema:\n```json\n{text}\n```")

    def request_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The job's params with this schema's ``response_format`` added, unless the job
        sets its own (which then wins; replies are validated all the same)."""
        wanted = self.response_format()
        if wanted is None or "response_format" in params:
            return dict(params)
        return {**params, "response_format": wanted}

    # -- the reply -------------------------------------------------------------------------

    def check(self, reply: str | None, finish_reason: str | None,
              refusal: str | None) -> ParsedReply | ReplyProblem:
        """One choice as data, or what is wrong with it. Pure: no I/O, no state."""
        if refusal:
            return ReplyProblem(ProblemKind.REFUSAL, f"the model refused: {_short(refusal)}")
        if finish_reason == "content_filter":
            return ReplyProblem(ProblemKind.REFUSAL, "the service's content filter withheld "
                                "the reply (finish_reason content_filter)")
        if reply is None or not reply.strip():
            kind = ProblemKind.TRUNCATED if finish_reason == "length" else ProblemKind.NOT_JSON
            return ReplyProblem(kind, "the reply is empty" + _cut_note(finish_reason))
        try:
            value = orjson.loads(json_text(reply))
        except orjson.JSONDecodeError as exc:
            where = f"line {exc.lineno} column {exc.colno} (char {exc.pos})"
            if finish_reason == "length":
                return ReplyProblem(ProblemKind.TRUNCATED, "the reply was cut off by max_tokens "
                                    f"(finish_reason length) inside its JSON, at {where}; "
                                    "raise params.max_tokens")
            return ReplyProblem(ProblemKind.NOT_JSON,
                                f"the reply is not valid JSON: {exc.msg} at {where}")
        try:
            error = schema_exceptions.best_match(self._validator.iter_errors(value))
        except schema_guard.Unfollowable as exc:  # only a schema changed after its checks
            return ReplyProblem(ProblemKind.SCHEMA, "the schema cannot be applied: a "
                                f"reference in it cannot be followed ({_short(str(exc))}); "
                                "batcher fetches nothing")
        if error is not None:
            return ReplyProblem(ProblemKind.SCHEMA, _describe(error))
        assert isinstance(value, dict)  # the top level is checked to be an object schema
        return ParsedReply(value)

    def check_choices(self, choices: Sequence[tuple[str | None, str | None, str | None]]
                      ) -> tuple[int, ParsedReply] | ReplyProblem:
        """The first choice (``reply``, ``finish_reason``, ``refusal``) that is valid data,
        with its index; or, when none is, the first choice's problem."""
        problems: list[ReplyProblem] = []
        for index, (reply, finish_reason, refusal) in enumerate(choices):
            verdict = self.check(reply, finish_reason, refusal)
            if isinstance(verdict, ParsedReply):
                return index, verdict
            problems.append(verdict)
        if not problems:
            return ReplyProblem(ProblemKind.NOT_JSON, "the response has no choices")
        if len(problems) == 1:
            return problems[0]
        first = problems[0]
        return ReplyProblem(first.kind, f"none of the {len(problems)} choices is valid; "
                            f"the first: {first.message}")

    def values(self, reply: str | None) -> dict[str, Any] | None:
        """The parsed object of a reply that already passed :meth:`check` (None otherwise)."""
        if reply is None:
            return None
        try:
            value = orjson.loads(json_text(reply))
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None


def json_text(reply: str) -> str:
    """The JSON in a reply: the text itself, or the inside of one Markdown code fence
    around it (models asked for JSON in the prompt like to fence it)."""
    text = reply.strip()
    match = _FENCE.match(text)
    return match.group("body") if match else text


def _compile(schema: dict[str, Any]) -> Any:
    cls = schema_guard.draft(schema)
    try:
        cls.check_schema(schema)
    except schema_exceptions.SchemaError as exc:
        where = _dotted(exc.absolute_path) or "the top level"
        raise SchemaError(f"not a valid JSON Schema at {where}: {_short(exc.message)}") from None
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict) \
            or not schema["properties"]:
        raise SchemaError('the top level must be {"type": "object", "properties": {...}}: '
                          "each property becomes a result column")
    schema_guard.check(cls, schema)
    return schema_guard.validator(cls, schema)


def _top_properties(schema: dict[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = schema["properties"]
    for name in properties:
        if not name:
            raise SchemaError("properties: a property has an empty name, which cannot name "
                              "a column")
    return properties


def _wire_name(title: Any) -> str:
    """OpenAI's ``json_schema.name``: a-z, A-Z, 0-9, _ and -, 64 at most."""
    if not isinstance(title, str):
        return DEFAULT_NAME
    name = _NAME_CHARS.sub("_", title).strip("_")[:64]
    return name or DEFAULT_NAME


def _strict_problem(schema: dict[str, Any]) -> str | None:
    """Why OpenAI's strict mode would refuse the schema, or None when it qualifies:
    every object must set ``additionalProperties: false`` and require every property."""
    for where, node in _subschemas(schema, "$"):
        if node.get("type") != "object" and "properties" not in node:
            continue
        if node.get("additionalProperties") is not False:
            return f"{where} does not set additionalProperties: false"
        required = node.get("required", [])
        missing = [name for name in node.get("properties", {}) if name not in required]
        if missing:
            return f"{where}.{missing[0]} is not listed in required"
    return None


def _subschemas(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object inside ``node``, with a readable place for messages."""
    if not isinstance(node, dict):
        return
    yield where, node
    for name, child in (node.get("properties") or {}).items():
        yield from _subschemas(child, f"{where}.{name}")
    for key in ("$defs", "definitions"):
        for name, child in (node.get(key) or {}).items():
            yield from _subschemas(child, f"#/{key}/{name}")
    if isinstance(node.get("items"), dict):
        yield from _subschemas(node["items"], f"{where}[]")
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for index, child in enumerate(node.get(key) or []):
            yield from _subschemas(child, f"{where}({key}[{index}])")


def _describe(error: schema_exceptions.ValidationError) -> str:
    rule = _dotted(error.schema_path) or "the top level"
    return (f"reply does not match the schema at {error.json_path}: {_short(error.message)} "
            f"(schema rule {rule})")


def _dotted(path: Any) -> str:
    return ".".join(str(part) for part in path)


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _MESSAGE_CHARS else flat[: _MESSAGE_CHARS - 1] + "…"


def _cut_note(finish_reason: str | None) -> str:
    return " (cut off by max_tokens: finish_reason length)" if finish_reason == "length" else ""
