"""What a reply schema may make batcher do: check a reply in linear time, fetch nothing.

A job's ``output.schema`` is applied to every reply, so a careless (or hostile)
schema must cost nothing. :mod:`batcher.structured` builds its validator here:

* **Patterns** (``pattern``, the keys of ``patternProperties``, and the
  property names ``additionalProperties`` sets against them) are matched
  with RE2, in time linear in the text. jsonschema's own check uses Python's
  backtracking ``re``, which takes ages on ``^(a+)+$`` against 64 a's and a
  ``b``, holding the interpreter so that not even SIGTERM gets through. RE2
  has no backreferences and no lookaround, so a pattern that needs one is
  refused when the job is loaded, with its place in the schema: a verdict
  that depends on how busy the machine is (a time-bounded backtracking
  fallback) would make the same reply pass on one run and fail on the next.
  ``unevaluatedProperties`` beside ``patternProperties`` is refused too:
  jsonschema matches those patterns itself, with ``re``.
* **uniqueItems** is decided by hashing each item once. jsonschema compares
  every pair of items that cannot be sorted (objects), so a server's reply
  of 8,000 small objects took a minute, and a few megabytes would take days.
* **References** stay inside the schema: ``$ref``, ``$dynamicRef`` and
  ``$recursiveRef`` must be fragments (``#/$defs/Name``, ``#anchor``) that
  point at something; an ``$id`` below the top (it would move the base the
  references under it resolve against) and a ``$schema`` that names no
  draft jsonschema knows are refused. The validator's registry retrieves
  nothing, so a reference these checks did not see fails the reply's check
  (:data:`Unfollowable`) instead of reaching the network or the disk.

RE2 (``google-re2``) and ``referencing`` are imported here only.

>>> schema = {"type": "object", "properties": {"word": {"pattern": "^(a+)+$"}}}
>>> cls = draft(schema)
>>> check(cls, schema)  # RE2 runs it: nothing to refuse
>>> [e.message for e in validator(cls, schema).iter_errors({"word": "a" * 64 + "b"})
...  ] == [f"{'a' * 64 + 'b'!r} does not match '^(a+)+$'"]  # at once, where re takes ages
True

Just over 300 lines, kept whole: everything a schema may make batcher do (match
patterns, compare items, follow references) is guarded here, so a reviewer
reads the whole guard in one place.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any

import re2
from jsonschema import validators
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator
from referencing import Registry
from referencing.exceptions import NoSuchResource, Unresolvable

__all__ = ["SchemaError", "Unfollowable", "check", "draft", "pointer", "validator"]

Unfollowable = Unresolvable
"""Raised from inside a reply's check by a reference the validator cannot follow."""

_DRAFTS: tuple[type[Validator], ...] = (
    validators.Draft202012Validator, validators.Draft201909Validator,
    validators.Draft7Validator, validators.Draft6Validator, validators.Draft4Validator,
    validators.Draft3Validator)
_ID_KEYWORD: dict[type[Validator], str] = {validators.Draft4Validator: "id",
                                            validators.Draft3Validator: "id"}
_REFERENCES = ("$ref", "$dynamicRef", "$recursiveRef")
# Keywords whose value is a map from names to schemas: the names are not keywords.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions",
                          "dependentSchemas", "dependencies"})
# Keywords whose value is data, not schema: a {"$ref": ...} in them is a value.
_DATA = frozenset({"const", "enum", "default", "examples"})
# ECMA-262's \uXXXX and \u{X...}, which RE2 writes \x{...}; an escaped backslash is skipped.
_UNICODE_ESCAPE = re.compile(r"\\(?:(\\)|u\{([0-9A-Fa-f]{1,6})\}|u([0-9A-Fa-f]{4}))")


class SchemaError(ValueError):
    """The schema itself is unusable; the message names the place (config adds the key)."""


def draft(schema: Mapping[str, Any]) -> type[Validator]:
    """The validator class of the schema's ``$schema`` (2020-12 without one); a draft
    jsonschema does not ship is refused, never fetched."""
    if "$schema" not in schema:
        return validators.Draft202012Validator
    uri = schema["$schema"]
    for cls in _DRAFTS:
        if isinstance(uri, str) and uri.rstrip("#") == _uri(cls):
            return cls
    known = ", ".join(_uri(cls) for cls in _DRAFTS[:3])
    raise SchemaError(f"$schema: {uri!r} is not a JSON Schema draft batcher knows, and "
                      f"batcher never fetches a meta-schema; use one of {known} (or an "
                      "older draft), or leave $schema out for 2020-12")


def check(cls: type[Validator], schema: Mapping[str, Any]) -> None:
    """Refuse what could make a reply's check slow or reach outside the schema (see the
    module's docstring). ``schema`` has passed ``cls.check_schema``."""
    id_keyword = _ID_KEYWORD.get(cls, "$id")
    unevaluated: str | None = None
    has_pattern_properties = False
    for where, node in _schemas(schema, ""):
        for keyword in _REFERENCES:
            ref = node.get(keyword)
            if isinstance(ref, str):
                pointer(schema, ref, _at(where, keyword))
        node_id = node.get(id_keyword)
        if where and isinstance(node_id, str) and not node_id.startswith("#"):
            raise SchemaError(f"{_at(where, id_keyword)}: {node_id!r} would make the "
                              "references under it resolve against another document; "
                              "batcher resolves them inside this schema only: remove it")
        if isinstance(node.get("pattern"), str):
            _compiled(node["pattern"], _at(where, "pattern"))
        if isinstance(node.get("patternProperties"), dict):
            has_pattern_properties = True
            for pattern in node["patternProperties"]:
                _compiled(pattern, _at(where, f"patternProperties.{pattern}"))
        if "unevaluatedProperties" in node and unevaluated is None:
            unevaluated = _at(where, "unevaluatedProperties")
    if unevaluated is not None and has_pattern_properties:
        raise SchemaError(f"{unevaluated}: not supported in a schema that also has "
                          "patternProperties (batcher matches patterns in linear time, which "
                          "jsonschema's unevaluatedProperties does not); use "
                          "additionalProperties instead")


def validator(cls: type[Validator], schema: Mapping[str, Any]) -> Validator:
    """A validator of ``cls``'s draft whose patterns run on RE2 and whose references
    resolve inside ``schema`` (and jsonschema's bundled meta-schemas) only."""
    return _linear(cls)(schema, registry=_NOTHING_REMOTE)


def pointer(schema: Mapping[str, Any], ref: str, where: str = "$ref") -> Any:
    """The node a local reference points at: a JSON pointer (``#/$defs/Name``) or an
    anchor (``#name``: ``$anchor``, ``$dynamicAnchor``, or a draft-7 ``$id: "#name"``)."""
    if not ref.startswith("#"):
        raise SchemaError(f"{where}: {ref!r} is outside the schema; batcher follows only "
                          "references inside it (#/$defs/Name, #anchor) and never fetches "
                          "one: copy what it names under $defs")
    fragment = ref[1:]
    if fragment and not fragment.startswith("/"):
        for _place, node in _schemas(schema, ""):
            if fragment in (node.get("$anchor"), node.get("$dynamicAnchor")) \
                    or ref in (node.get("$id"), node.get("id")):
                return node
        raise SchemaError(f"{where}: {ref!r} points at nothing in the schema")
    target: Any = schema
    for part in fragment.split("/")[1:]:
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and key in target:
            target = target[key]
        elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
            target = target[int(key)]
        else:
            raise SchemaError(f"{where}: {ref!r} points at nothing in the schema")
    return target


# -- the pieces --------------------------------------------------------------------------


def _uri(cls: type[Validator]) -> str:
    meta = cls.META_SCHEMA
    return str(meta.get("$id", meta.get("id"))).rstrip("#")


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _schemas(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object in ``node`` (unknown keywords included, data left out), with
    its dotted place."""
    if isinstance(node, list):
        for index, child in enumerate(node):
            yield from _schemas(child, _at(where, str(index)))
        return
    if not isinstance(node, dict):
        return
    yield where, node
    for key, child in node.items():
        if key in _DATA:
            continue
        if key in _SCHEMA_MAPS and isinstance(child, dict):
            for name, subschema in child.items():
                yield from _schemas(subschema, _at(where, f"{key}.{name}"))
        else:
            yield from _schemas(child, _at(where, key))


def _no_retrieval(uri: str) -> Any:
    """What the registry does with a URI it does not hold: nothing (no HTTP, no file)."""
    raise NoSuchResource(ref=uri)  # type: ignore[call-arg]  # an attrs field mypy misses


_NOTHING_REMOTE: Registry[Any] = Registry(retrieve=_no_retrieval)  # type: ignore[call-arg]

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the error is ours to report, in one line, not RE2's on stderr


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> Any:
    """RE2's compiled ``pattern`` (ECMA-262's ``\\u`` escapes translated)."""
    def translate(match: re.Match[str]) -> str:
        if match.group(1):
            return match.group(0)
        return f"\\x{{{match.group(2) or match.group(3)}}}"

    return re2.compile(_UNICODE_ESCAPE.sub(translate, pattern), options=_OPTIONS)


def _compiled(pattern: str, where: str) -> Any:
    try:
        return _regex(pattern)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(
            exc.args[0], bytes) else str(exc)
        raise SchemaError(f"{where}: {pattern!r} cannot be matched in time linear in the "
                          "reply: batcher matches patterns with RE2, which has no "
                          f"backreferences and no lookaround (RE2 says: {reason}); rewrite "
                          "it without them") from None


def _search(pattern: str, text: str) -> bool:
    return _regex(pattern).search(text) is not None


# -- the keywords that match patterns (on RE2) or compare items (by hash) ----------------
# Each mirrors jsonschema's own (jsonschema/_keywords.py), messages included. ``validator``
# is Any: ``descend`` belongs to jsonschema's validator classes, not to its Validator protocol.


def _pattern(validator: Any, pattern: str, instance: Any,
             schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: Mapping[str, Any], instance: Any,
                        schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, additional: Any, instance: Any,
                           schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    extras = [key for key in instance if key not in properties
              and not any(_search(pattern, key) for pattern in patterns)]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        joined = ", ".join(repr(extra) for extra in sorted(extras, key=str))
        if patterns:
            verb = "does" if len(extras) == 1 else "do"
            regexes = ", ".join(repr(pattern) for pattern in sorted(patterns))
            yield ValidationError(f"{joined} {verb} not match any of the regexes: {regexes}")
        else:
            verb = "was" if len(extras) == 1 else "were"
            yield ValidationError(f"Additional properties are not allowed ({joined} {verb} "
                                  "unexpected)")


def _unique_items(validator: Any, unique: Any, instance: Any,
                  schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[Any] = set()
    for item in instance:
        key = _identity(item)
        if key in seen:
            yield ValidationError(f"{instance!r} has non-unique elements")
            return
        seen.add(key)


def _identity(value: Any) -> Any:
    """A hashable stand-in for a JSON value, equal where jsonschema's ``equal`` is: 1 and
    1.0 alike, true and 1 not, objects whatever their keys' order."""
    if isinstance(value, bool) or value is None:
        return ("const", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list):
        return ("array", tuple(_identity(item) for item in value))
    if isinstance(value, dict):
        return ("object", frozenset((key, _identity(item)) for key, item in value.items()))
    return ("other", repr(value))  # parsed JSON holds nothing else


@functools.cache
def _linear(cls: type[Validator]) -> type[Validator]:
    linear: type[Validator] = validators.extend(  # type: ignore[no-untyped-call]  # no stub
        cls, {"pattern": _pattern, "patternProperties": _pattern_properties,
              "additionalProperties": _additional_properties, "uniqueItems": _unique_items})
    return linear
