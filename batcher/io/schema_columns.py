"""The typed result columns a reply schema adds: one per top-level property.

The column types come from the schema, not from the replies, so every row
(errors too, as nulls) and every batch has the same columns and types, and a
results file with no valid reply at all is still typed:

=============================  ==================================  =======================
schema                         Parquet / JSONL (Arrow)              CSV
=============================  ==================================  =======================
``string``                     string                               text
``string`` with ``enum``       dictionary (a pandas category)       text
``number`` / ``integer``       float64 / int64 (pandas ``Int64``)   number
``boolean``                    bool (pandas ``boolean``)            true / false
object with fixed properties   struct                               JSON text
array of a typed item          list                                 JSON text
anything else (unions, open    JSON text                            JSON text
objects, tuples, ``{}``)
=============================  ==================================  =======================

``["x", "null"]`` and ``anyOf: [{x}, {"type": "null"}]`` are the type ``x``
(every column is nullable). An object is a struct only when its keys are
fixed (``additionalProperties: false``), so no key a reply may carry is
dropped; otherwise it is kept whole as JSON text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa

from batcher.structured import ReplySchema

_SCALARS: dict[str, pa.DataType] = {
    "string": pa.string(),
    "number": pa.float64(),
    "integer": pa.int64(),
    "boolean": pa.bool_(),
}
_PANDAS_DTYPES = {"integer": "Int64", "boolean": "boolean", "number": "float64"}
_MAX_DEPTH = 16  # deeper (or recursive) structures are kept as JSON text


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one schema node is stored: ``kind`` is a scalar type name, ``category``,
    ``struct``, ``list`` or ``json``."""

    kind: str
    categories: tuple[str, ...] = ()
    fields: tuple[tuple[str, _Plan], ...] = ()
    item: _Plan | None = None


_JSON = _Plan("json")


@dataclass(frozen=True, slots=True)
class SchemaColumn:
    name: str  # the column's name (prefix included)
    key: str  # the property in the reply
    plan: _Plan


class SchemaColumns:
    """The columns of one schema: objects and arrays are Arrow structs and lists
    where the schema fixes their shape (the CSV writer turns them into JSON text)."""

    def __init__(self, schema: ReplySchema, prefix: str = "") -> None:
        self._schema = schema
        self.columns = [SchemaColumn(prefix + key, key, _plan(schema, node, 0))
                        for key, node in schema.properties.items()]

    @property
    def names(self) -> list[str]:
        return [column.name for column in self.columns]

    def fields(self) -> list[pa.Field]:
        return [pa.field(column.name, self._arrow_type(column.plan)) for column in self.columns]

    def arrays(self, rows: Sequence[dict[str, Any] | None]) -> list[pa.Array]:
        """One array per column from the rows' parsed values (None: an error row)."""
        arrays = []
        for column, field in zip(self.columns, self.fields(), strict=True):
            convert = self._converter(column.plan)
            values = [None if row is None else convert(row.get(column.key)) for row in rows]
            if column.plan.kind == "category":
                arrays.append(_categorical(values, column.plan.categories))
            else:
                arrays.append(pa.array(values, type=field.type))
        return arrays

    def values_of(self, reply: str | None) -> dict[str, Any] | None:
        return self._schema.values(reply)

    def pandas_dtypes(self) -> dict[str, str | tuple[str, ...]]:
        """The pandas dtype of each scalar column by name (``Int64``, ``boolean``,
        ``float64``), or for an enum the categories, every value in the schema's order."""
        dtypes: dict[str, str | tuple[str, ...]] = {}
        for column in self.columns:
            plan = column.plan
            if plan.kind == "category":
                dtypes[column.name] = plan.categories
            elif plan.kind in _PANDAS_DTYPES:
                dtypes[column.name] = _PANDAS_DTYPES[plan.kind]
        return dtypes

    def _arrow_type(self, plan: _Plan) -> pa.DataType:
        if plan.kind in _SCALARS:
            return _SCALARS[plan.kind]
        if plan.kind == "category":
            return pa.dictionary(pa.int32(), pa.string())
        if plan.kind == "struct":
            return pa.struct([pa.field(name, self._arrow_type(child))
                              for name, child in plan.fields])
        if plan.kind == "list":
            assert plan.item is not None
            return pa.list_(self._arrow_type(plan.item))
        return pa.string()  # JSON text

    def _converter(self, plan: _Plan) -> Callable[[Any], Any]:
        if plan.kind == "integer":
            return lambda value: None if value is None else int(value)
        if plan.kind == "number":
            return lambda value: None if value is None else float(value)
        if plan.kind in ("string", "boolean", "category"):
            return lambda value: value
        if plan.kind == "struct":
            children = [(name, self._converter(child)) for name, child in plan.fields]
            return lambda value: None if value is None else {
                name: convert(value.get(name)) for name, convert in children}
        if plan.kind == "list":
            assert plan.item is not None
            convert_item = self._converter(plan.item)
            return lambda value: None if value is None else [convert_item(item)
                                                              for item in value]
        return _json_text


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _categorical(values: list[Any], categories: tuple[str, ...]) -> pa.Array:
    """A dictionary array whose dictionary is every enum value, in the schema's order."""
    lookup = {category: index for index, category in enumerate(categories)}
    indices = pa.array([None if value is None else lookup[value] for value in values],
                       type=pa.int32())
    return pa.DictionaryArray.from_arrays(indices, pa.array(categories, type=pa.string()))


def _plan(schema: ReplySchema, node: Any, depth: int) -> _Plan:
    node = schema.resolve(node)
    if not isinstance(node, dict) or depth > _MAX_DEPTH:
        return _JSON
    branches = node.get("anyOf") or node.get("oneOf")
    if isinstance(branches, list) and not {"type", "enum", "const", "properties"} & node.keys():
        typed = [branch for branch in (schema.resolve(b) for b in branches)
                 if not (isinstance(branch, dict) and branch.get("type") == "null")]
        return _plan(schema, typed[0], depth) if len(typed) == 1 else _JSON
    kinds = _types(node)
    if "enum" in node or "const" in node:
        allowed = node["enum"] if "enum" in node else [node["const"]]
        strings = [value for value in allowed if value is not None]
        if strings and all(isinstance(value, str) for value in strings):
            # A category at the top; inside a struct or list, plain text.
            return (_Plan("category", categories=tuple(dict.fromkeys(strings))) if depth == 0
                    else _Plan("string"))
        return _JSON
    if len(kinds) != 1:
        return _JSON
    kind = kinds[0]
    if kind in _SCALARS:
        return _Plan(kind)
    if kind == "object":
        properties = node.get("properties")
        if (node.get("additionalProperties") is False and isinstance(properties, dict)
                and properties and not node.get("patternProperties")):
            return _Plan("struct", fields=tuple((name, _plan(schema, child, depth + 1))
                                                for name, child in properties.items()))
        return _JSON
    if kind == "array" and isinstance(node.get("items"), dict) and "prefixItems" not in node:
        return _Plan("list", item=_plan(schema, node["items"], depth + 1))
    return _JSON


def _types(node: dict[str, Any]) -> list[str]:
    """The node's non-null types (``["integer", "null"]`` is an integer column)."""
    declared = node.get("type")
    if isinstance(declared, str):
        declared = [declared]
    if not isinstance(declared, list):
        return []
    kinds = [kind for kind in declared if kind != "null"]
    # JSON Schema's integers are numbers too: a column of both is a float column.
    if set(kinds) == {"integer", "number"}:
        return ["number"]
    return kinds
