"""The job file: loaded and validated once, at the edge.

Every later layer receives a ``Job`` whose values are already known good,
so nothing downstream re-checks types or ranges. Validation messages name
the key and say what it must be (``limits.requests_per_minute: must be a
positive number``); the key itself is never echoed when it looks secret.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from batcher.errors import ConfigError
from batcher.records import OPTIONAL_COLUMNS, RESULT_COLUMNS
from batcher.redact import SECRET_QUERY_PARAMS
from batcher.structured import ReplySchema, SchemaError, SchemaMode

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeInt = Annotated[int, Field(ge=0)]

_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
INPUT_SUFFIXES = (".csv", ".parquet", ".jsonl")
# Compressed text inputs are read as they are; Parquet compresses inside the file.
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}
CSV_DELIMITERS = (",", ";", "\t", "|")
OUTPUT_SUFFIXES = (".csv", ".parquet", ".jsonl")
# Request fields batcher owns: a job may not override them through params.
RESERVED_PARAMS = frozenset({"model", "messages", "stream", "stream_options"})


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class InputSpec(_Spec):
    path: Path
    id_column: str | None = Field(default=None, min_length=1)
    # CSV only; None: sniffed from the header line among CSV_DELIMITERS.
    delimiter: str | None = None

    @model_validator(mode="after")
    def _known_format(self) -> InputSpec:
        input_format(self.path)  # raises ValueError naming the suffixes it takes
        if self.delimiter is not None and (len(self.delimiter) != 1
                                           or self.delimiter in "\"\r\n"):
            raise ValueError("delimiter: must be one character (not a quote or a line break), "
                             "e.g. ';'")
        return self


def input_format(path: Path) -> tuple[str, str | None]:
    """The input's format (csv, parquet, jsonl) and its compression codec, from its name:
    ``reviews.csv.gz`` is gzip-compressed CSV."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    compression = COMPRESSION_SUFFIXES.get(suffixes[-1]) if suffixes else None
    if compression is not None:
        suffixes.pop()
    kind = suffixes[-1] if suffixes else ""
    if kind not in INPUT_SUFFIXES or (compression is not None and kind == ".parquet"):
        compressed = "/".join(COMPRESSION_SUFFIXES)
        raise ValueError(f"path: must end in {', '.join(INPUT_SUFFIXES)} (.csv and .jsonl may "
                         f"be compressed: {compressed})")
    return kind.lstrip("."), compression


class PromptSpec(_Spec):
    column: str | None = None
    template: str | None = None
    system: str | None = None
    # A null, NaN or blank cell in a column the prompt reads: the row is not sent and
    # is an input error ("error"), or the cell renders as empty text ("empty").
    missing: Literal["error", "empty"] = "error"

    @model_validator(mode="after")
    def _one_source(self) -> PromptSpec:
        if (self.column is None) == (self.template is None):
            raise ValueError("set exactly one of prompt.column and prompt.template")
        if self.template is not None:
            template_fields(self.template)  # raises ValueError on a malformed template
        return self

    def columns(self) -> list[str]:
        """The input columns the prompt reads."""
        if self.column is not None:
            return [self.column]
        assert self.template is not None
        return template_fields(self.template)


class MockSpec(_Spec):
    """Run against the built-in mock server, started in-process (demos only)."""

    latency_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.02
    seed: int = 0


class AuthSpec(_Spec):
    """How the key travels: ``Authorization: Bearer`` unless one of these is set."""

    header: str | None = None  # e.g. api-key (Azure), X-Api-Key
    query: str | None = None  # e.g. api_key, for gateways that take the key in the URL

    @model_validator(mode="after")
    def _one_way(self) -> AuthSpec:
        if self.header is not None and self.query is not None:
            raise ValueError("set at most one of auth.header and auth.query")
        for name in (self.header, self.query):
            if name is not None and not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"'{name}' is not a valid header or parameter name")
        return self


class AzureSpec(_Spec):
    """Azure OpenAI's classic URL shape: the deployment in the path, a dated api-version."""

    deployment: str = Field(min_length=1)
    api_version: str = Field(min_length=1)


class EndpointSpec(_Spec):
    base_url: str | None = None
    api_key_env: str | None = None
    auth: AuthSpec | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    azure: AzureSpec | None = None
    timeout_s: PositiveFloat = 120.0
    # 8 MiB: 16 times the text of a 128k-token reply, yet 32 connections at the cap
    # hold no more than 256 MiB. Jobs asking for n > 1 or many logprobs may raise it.
    max_response_bytes: PositiveInt = 8 << 20
    allow_insecure_http: bool = False
    mock: MockSpec | None = None

    @model_validator(mode="after")
    def _one_target(self) -> EndpointSpec:
        if (self.base_url is None) == (self.mock is None):
            raise ValueError("set exactly one of endpoint.base_url and endpoint.mock")
        if self.base_url is not None and not re.match(r"https?://[^/\s]+", self.base_url):
            raise ValueError("base_url: must start with http:// or https:// and name a host")
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*",
                                                             self.api_key_env):
            raise ValueError("api_key_env: must be the name of an environment variable, "
                             "not the key itself")
        if self.auth is not None and self.api_key_env is None:
            raise ValueError("auth: says how to send a key, so endpoint.api_key_env must "
                             "name the variable that holds it")
        for name in self.headers:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"headers: '{name}' is not a valid header name")
        if self.azure is not None and self.mock is not None:
            raise ValueError("azure: cannot be combined with endpoint.mock")
        return self


class LimitsSpec(_Spec):
    concurrency: PositiveInt = 32
    requests_per_minute: PositiveFloat | None = None
    tokens_per_minute: PositiveFloat | None = None
    # A budget: the run stops (exit 3) before it could spend more.
    max_cost_usd: PositiveFloat | None = None
    max_total_tokens: PositiveInt | None = None


NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class PricingSpec(_Spec):
    """Prices for a model the price data does not know (USD per million tokens),
    or the provider to look the model up under."""

    input: NonNegativeFloat | None = None
    cached_input: NonNegativeFloat | None = None
    output: NonNegativeFloat | None = None
    batch_discount: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0
    provider: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _complete(self) -> PricingSpec:
        rates = (self.input, self.cached_input, self.output)
        if self.provider is not None and any(rate is not None for rate in rates):
            raise ValueError("set either pricing.provider (look the model up there) or prices "
                             "(input, output), not both")
        if any(rate is not None for rate in rates) and (self.input is None
                                                         or self.output is None):
            raise ValueError("pricing: needs both input and output (USD per million tokens)")
        if self.provider is None and self.input is None:
            raise ValueError("pricing: set input and output (USD per million tokens), or "
                             "provider")
        return self


class RetrySpec(_Spec):
    max_attempts: PositiveInt = 6
    base_delay_s: PositiveFloat = 0.5
    max_delay_s: PositiveFloat = 60.0
    # Rows in a row failing the same way: the input is not at fault row by row.
    stop_after_identical_failures: PositiveInt = 20
    # With output.schema: a reply that is not valid JSON, breaks the schema or was cut
    # off is asked again this many times before the row fails.
    invalid_reply_retries: NonNegativeInt = 2


class BatchSpec(_Spec):
    """``mode: batch``: the provider's Batch API (half price, answers within the window).

    The file limits are OpenAI's (50,000 requests, 200 MB); other services
    set their own. ``fallback: online`` finishes rows the batch failed or
    left unanswered (and, with ``deadline_h``, every row of a batch not done
    by then) with ordinary requests in the same run.
    """

    max_requests_per_file: PositiveInt = 50_000
    max_bytes_per_file: PositiveInt = 200 * 1000 * 1000
    completion_window: str = Field(default="24h", min_length=1)
    poll_interval_s: PositiveFloat = 60.0
    deadline_h: PositiveFloat | None = None
    fallback: Literal["online", "none"] = "none"

    @model_validator(mode="after")
    def _deadline_needs_fallback(self) -> BatchSpec:
        if self.deadline_h is not None and self.fallback != "online":
            raise ValueError("deadline_h: rows of a batch not done by the deadline are sent "
                             "online, so set batch.fallback: online too")
        return self


class OutputSpec(_Spec):
    path: Path
    checkpoint: Path | None = None
    # Prefix CSV cells starting with = + - @ (or tab, CR) with ' so a spreadsheet shows
    # them as text instead of running them as formulas. Off by default: see the README.
    csv_escape_formulas: bool = False
    # A JSON Schema for the replies (a path to a .json file is loaded at the edge).
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    schema_mode: Literal["json_schema", "json_object", "prompt"] = "json_schema"
    schema_prefix: str = ""

    @model_validator(mode="after")
    def _known_format(self) -> OutputSpec:
        if self.path.suffix.lower() not in OUTPUT_SUFFIXES:
            raise ValueError(f"path: must end in {', '.join(OUTPUT_SUFFIXES)}")
        if self.schema_ is not None:
            try:
                schema = self.reply_schema
            except SchemaError as exc:
                raise ValueError(f"schema: {exc}") from None
            assert schema is not None
            taken = [self.schema_prefix + name for name in schema.properties
                     if self.schema_prefix + name in (*RESULT_COLUMNS, *OPTIONAL_COLUMNS)]
            if taken:
                raise ValueError(f"schema: property '{taken[0][len(self.schema_prefix):]}' "
                                 f"would be the column '{taken[0]}', a result column's name; "
                                 "set output.schema_prefix (e.g. 'reply_') or rename it")
        elif self.schema_mode != "json_schema" or self.schema_prefix:
            key = "schema_mode" if self.schema_mode != "json_schema" else "schema_prefix"
            raise ValueError(f"{key}: only means something with output.schema")
        return self

    @cached_property
    def reply_schema(self) -> ReplySchema | None:
        """The compiled schema (None when the job sets none)."""
        if self.schema_ is None:
            return None
        return ReplySchema(self.schema_, SchemaMode(self.schema_mode))

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint or self.path.with_suffix(".ckpt")


class Job(_Spec):
    name: str
    input: InputSpec
    prompt: PromptSpec
    model: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    endpoint: EndpointSpec
    limits: LimitsSpec = LimitsSpec()
    retry: RetrySpec = RetrySpec()
    output: OutputSpec | None = None
    mode: Literal["online", "batch"] = "online"
    batch: BatchSpec = BatchSpec()
    pricing: PricingSpec | None = None
    # Identical requests under different ids: each sent (default; with sampling
    # each row gets its own answer) or sent once with the answer shared.
    duplicates: Literal["each", "share"] = "each"

    @model_validator(mode="after")
    def _consistent(self) -> Job:
        reserved = sorted(RESERVED_PARAMS & self.params.keys())
        if reserved:
            raise ValueError(f"params.{reserved[0]}: is set by batcher and cannot be overridden")
        if self.output is not None:
            if self.output.path.resolve() == self.input.path.resolve():
                raise ValueError("output.path: must not be the input file")
            if self.output.checkpoint_path.resolve() in (
                self.input.path.resolve(), self.output.path.resolve()
            ):
                raise ValueError("output.checkpoint: must differ from the input and results files")
        if self.mode == "batch" and self.endpoint.azure is not None:
            raise ValueError("mode: batch needs an OpenAI-style base_url (for Azure, its "
                             "/openai/v1 API), not endpoint.azure")
        budget = (self.limits.max_cost_usd, self.limits.max_total_tokens)
        if any(limit is not None for limit in budget) and self.mode == "batch":
            raise ValueError("limits: a budget (max_cost_usd, max_total_tokens) holds for "
                             "online requests only; a batch is billed whole once submitted "
                             "(see its cost with --dry-run)")
        if any(limit is not None for limit in budget) and self.max_output_tokens is None:
            raise ValueError("limits: a budget (max_cost_usd, max_total_tokens) needs "
                             "params.max_tokens (or max_completion_tokens), so the most a "
                             "request can cost is known before it is sent")
        return self

    @cached_property
    def request_params(self) -> dict[str, Any]:
        """``params`` as sent: with the reply schema's ``response_format`` added, unless
        ``params`` sets one."""
        schema = self.output.reply_schema if self.output is not None else None
        return self.params if schema is None else schema.request_params(self.params)

    @property
    def choices(self) -> int:
        """Choices asked per request (``params.n``; 1 unless set)."""
        value = self.params.get("n")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1

    @property
    def max_output_tokens(self) -> int | None:
        """The output cap the server reserves against TPM, when the job sets one."""
        for key in ("max_completion_tokens", "max_tokens"):
            value = self.params.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None


_MAX_FORMAT_WIDTH = 10_000


def template_fields(template: str) -> list[str]:
    """The column names a ``{column}`` template reads, in order, without repeats."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"template: {exc} (write a literal brace as {{{{ or }}}})") from None
    for _literal, name, spec, _conversion in parsed:
        if name is None:
            continue
        if not name or not re.fullmatch(r"[^.\[\]]+", name):
            raise ValueError(f"template: {{{name}}} must name a column, like {{body}}")
        if spec and ("{" in spec or any(int(digits) > _MAX_FORMAT_WIDTH
                                        for digits in re.findall(r"\d+", spec))):
            # {text:>1000000000000} would pad every prompt to a terabyte (or fail trying).
            raise ValueError(f"template: {{{name}:{spec}}}: a format spec may not nest fields "
                             f"or ask for a width or precision above {_MAX_FORMAT_WIDTH:,}")
        if name not in names:
            names.append(name)
    return names


# --- loading -----------------------------------------------------------------------------

_SECRET_KEY_NAME = re.compile(r"(api[_-]?key|secret|password|token|authorization)$", re.I)
_SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{16,}|Bearer\s+\S{16,})")


def load_job(path: Path, *, require_output: bool = True) -> Job:
    """Read, check and resolve a job file. Raises ``ConfigError`` naming the key."""
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
    return job_from_dict(data, base_dir=path.parent, source=str(path),
                         require_output=require_output)


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
    """Turn pydantic's report into one line that names the key and the fix."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = [str(part) for part in first["loc"] if not str(part).startswith("function-")]
    # Union branches add the branch type to the location: drop those noise parts.
    loc = [part for part in loc if part not in {"str", "int", "float", "MockSpec", "bool"}]
    kind = first["type"]
    key = ".".join(loc)
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
            message += f" (allowed here: {', '.join(_allowed_keys(loc[:-1]))})"
        text = f"{key}: {message}" if key else message
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return text

