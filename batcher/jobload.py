"""Loading a job: from a YAML file, or plain data from the Python API, to a ``Job``.

Before pydantic sees the data, it is refused when it is too big (YAML aliases
can make a small file stand for billions of values) or holds a literal API
key, and its paths are resolved against the job file's folder. pydantic's
report becomes one line naming the key and what it must be
(``limits.requests_per_minute: must be a positive number``); the key itself
is never echoed when it looks secret.

A little over 300 lines, kept whole: every check a job file passes before
pydantic, and the translation of pydantic's report after it, are one step a
reader follows top to bottom.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml
from pydantic import BaseModel, ValidationError

from batcher.config import Job
from batcher.errors import ConfigError
from batcher.redact import SECRET_QUERY_PARAMS

_SECRET_KEY_NAME = re.compile(r"(api[_-]?key|secret|password|token|authorization)$", re.I)
_SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{16,}|Bearer\s+\S{16,})")


def load_job(path: Path, *, require_output: bool = True) -> Job:
    """Read, check and resolve a job file. Raises ``ConfigError`` naming the key."""
    return job_from_dict(read_job_file(path), base_dir=path.parent, source=str(path),
                         require_output=require_output)


def read_job_file(path: Path) -> dict[str, Any]:
    """A job file's keys as plain data, not yet checked (``name`` defaults to the
    file's stem). Raises ``ConfigError`` when it is no YAML mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read job file ({exc.__class__.__name__})") from None
    except ValueError:  # a NUL byte in the path
        raise ConfigError(f"{path!r}: the job file's path contains a NUL byte") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply to be a job file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}: {where}malformed YAML: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: job file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of keys (name, input, prompt, ...)")
    data.setdefault("name", path.stem)
    return data


def job_from_dict(data: dict[str, Any], *, base_dir: Path, source: str,
                  require_output: bool, schema_dir: Path | None = None) -> Job:
    """Validate a job given as plain data (from YAML or from the Python API).

    Relative paths resolve against ``base_dir``; ``output.schema``'s against
    ``schema_dir`` when given."""
    _refuse_oversized(data, source)
    refuse_literal_secrets(data, source)
    data = _resolve_paths(data, base_dir, source, schema_dir or base_dir)
    try:
        job = Job.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None
    if require_output and job.output is None:
        raise ConfigError(f"{source}: output: is required (output.path: where results go)")
    return job


MAX_JOB_VALUES = 100_000
"""A job file is a few dozen values; YAML aliases (``*name``) can make a small file
stand for billions (an alias bomb), which every walk over the data would expand."""


def _refuse_oversized(data: Any, source: str) -> None:
    """Count the values ``data`` stands for, each shared container once (linear in
    the file, however its aliases nest), and refuse a job too big or self-referring."""
    sizes: dict[int, int] = {}
    pending: set[int] = set()

    def size(value: Any) -> int:
        if not isinstance(value, dict | list):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in pending:
            raise ConfigError(f"{source}: a YAML alias refers to itself; a job file cannot "
                              "contain itself")
        pending.add(key)
        children = value.values() if isinstance(value, dict) else value
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_JOB_VALUES:
                raise ConfigError(f"{source}: the job stands for more than "
                                  f"{MAX_JOB_VALUES:,} values once its YAML aliases (*name) "
                                  "are expanded; a job file is a few dozen")
        pending.discard(key)
        sizes[key] = total
        return total

    try:
        size(data)
    except RecursionError:
        raise ConfigError(f"{source}: the job is nested too deeply to be a job") from None


def refuse_literal_secrets(data: Any, source: str) -> None:
    """A key written into a job file ends up in git and backups: refuse it."""
    for dotted, key, value in _walk(data, ""):
        if isinstance(value, str) and value and _holds_secret(key, value):
            raise ConfigError(
                f"{source}: {dotted}: looks like a literal API key; keep keys out of job "
                "files: export it in an environment variable and name that variable in "
                "endpoint.api_key_env")


def _holds_secret(key: str, value: str) -> bool:
    if key.endswith("_env"):
        # A variable's name, unless a key was pasted where the name belongs.
        return _looks_like_key(value) or bool(_SECRET_VALUE.search(value))
    if _SECRET_KEY_NAME.search(key) or _SECRET_VALUE.search(value):
        return True
    if "://" in value:  # a URL: a password, or a key-like query parameter
        parts = urlsplit(value)
        try:
            password = parts.password
        except ValueError:
            password = None
        secret_params = {name for name, _ in parse_qsl(parts.query)} & SECRET_QUERY_PARAMS
        return bool(password or secret_params)
    return False


def _looks_like_key(name: str) -> bool:
    """Environment variable names are words (OPENAI_API_KEY); keys are long
    runs of letters and digits without separators."""
    has_digit = any(char.isdigit() for char in name)
    has_alpha = any(char.isalpha() for char in name)
    return len(name) >= 20 and "_" not in name and has_digit and has_alpha


def _walk(data: Any, prefix: str) -> Iterator[tuple[str, str, Any]]:
    if isinstance(data, dict):
        for key, value in data.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            yield dotted, str(key), value
            yield from _walk(value, dotted)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _walk(value, f"{prefix}[{index}]")


def _resolve_paths(data: dict[str, Any], base_dir: Path, source: str,
                   schema_dir: Path) -> dict[str, Any]:
    resolved = dict(data)
    for section, keys in (("input", ("path",)), ("output", ("path", "checkpoint"))):
        block = resolved.get(section)
        if not isinstance(block, dict):
            continue
        block = dict(block)
        for key in keys:
            value = block.get(key)
            if isinstance(value, str | Path) and "\x00" in str(value):
                raise ConfigError(f"{source}: {section}.{key}: the path contains a NUL byte")
            if isinstance(value, str) and value:
                path = base_dir / Path(value).expanduser()
                # What batcher writes keeps its own name: a link there is refused, not followed.
                block[key] = (path.resolve() if section == "input"
                              else path.parent.resolve() / path.name)
            elif value is not None and not isinstance(value, Path):
                block[key] = value  # left for validation to reject with the key's name
        if "schema" in block:
            block["schema"] = _schema_value(block["schema"], schema_dir, source)
        resolved[section] = block
    return resolved


def _schema_value(value: Any, base_dir: Path, source: str) -> Any:
    """``output.schema`` as a dict: given inline, as a pydantic model class, or as the
    path of a JSON file (relative to the job file)."""
    if isinstance(value, type) and issubclass(value, BaseModel):
        return value.model_json_schema()
    if not isinstance(value, str | Path):
        return value  # a dict, or a wrong type for validation to name
    if "\x00" in str(value):
        raise ConfigError(f"{source}: output.schema: the path contains a NUL byte")
    path = (base_dir / Path(value).expanduser()).resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: output.schema: {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: output.schema: {path}: cannot read it "
                          f"({exc.__class__.__name__})") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: output.schema: {path}: not valid JSON ({exc.msg} at line "
                          f"{exc.lineno} column {exc.colno})") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{source}: output.schema: {path}: must hold a JSON object "
                          "(a JSON Schema)")
    return schema


_NAMED_MESSAGE = re.compile(r"^[A-Za-z_][\w.\[\]]*: ")
_MESSAGES: dict[str, str] = {
    "missing": "is required",
    "extra_forbidden": "unknown key",
    "greater_than": "must be a positive number",
    "greater_than_equal": "must be zero or more",
    "less_than": "must be less than 1 (a fraction: 0.5 is half off)",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "bool_type": "must be true or false",
    "dict_type": "must be a mapping of keys",
    "model_type": "must be a mapping of keys",
    "model_attributes_type": "must be a mapping of keys",
    "path_type": "must be a file path",
    "is_instance_of": "must be a file path",
    "finite_number": "must be a finite number",
}


def _allowed_keys(parent: list[str]) -> list[str]:
    model: type[BaseModel] = Job
    for part in parent:
        annotation = model.model_fields[part].annotation
        candidates = [arg for arg in (*getattr(annotation, "__args__", ()), annotation)
                      if isinstance(arg, type) and issubclass(arg, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return [field.alias or name for name, field in model.model_fields.items()]


def describe_validation_error(exc: ValidationError) -> str:
    """Turn pydantic's report into one line that names the key and the fix.

    An unknown key comes first, with the key it was probably meant to be: a
    misspelt key (``modle:``) also makes the real one missing, and "model: is
    required" alone would hide the cause. The guess prefers a key reported
    missing beside it (``modle`` is ``model``, not ``mode``)."""
    errors = exc.errors(include_url=False)
    errors.sort(key=lambda error: error["type"] != "extra_forbidden")  # stable: order kept
    missing = {_location(error) for error in errors if error["type"] == "missing"}
    first = errors[0]
    loc = list(_location(first))
    kind = first["type"]
    key = ".".join(loc)
    explained = 0
    if kind == "value_error":
        message = str(first.get("ctx", {}).get("error", first["msg"]))
        # A model-level check names its own sub-key ("path: must ..."): join, don't repeat.
        if _NAMED_MESSAGE.match(message):
            text = f"{key}.{message}" if key else message
        else:
            text = f"{key}: {message}" if key else message
    else:
        message = _MESSAGES.get(kind, first["msg"].lower())
        if kind == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            guess = _meant(loc[-1], allowed, {path[-1] for path in missing
                                               if list(path[:-1]) == loc[:-1]})
            if guess is not None:
                message += f"; did you mean {guess}?"
                explained = (*loc[:-1], guess) in missing  # its "is required" is this one
            message += f" (allowed here: {', '.join(allowed)})"
        text = f"{key}: {message}" if key else message
    more = len(errors) - 1 - explained
    if more:
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return text


def _location(error: Any) -> tuple[str, ...]:
    loc = [str(part) for part in error["loc"] if not str(part).startswith("function-")]
    # Union branches add the branch type to the location: drop those noise parts.
    return tuple(part for part in loc if part not in {"str", "int", "float", "MockSpec", "bool"})


def _meant(unknown: str, allowed: list[str], missing: set[str]) -> str | None:
    """The allowed key ``unknown`` was most likely meant to be, if any is close."""
    for candidates in (sorted(missing), allowed):
        close = difflib.get_close_matches(unknown, candidates, n=1, cutoff=0.6)
        if close:
            return close[0]
    return None

