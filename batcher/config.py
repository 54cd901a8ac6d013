"""The job's settings: one pydantic model per section of a job file.

Every later layer receives a ``Job`` whose values are already known good,
so nothing downstream re-checks types or ranges. Reading a job file and
turning pydantic's report into one line are ``batcher.jobload``'s.

Longer than most modules because it is the reference for every key a job
takes: each section's model with the checks that tie its keys together, read
best side by side.
"""

from __future__ import annotations

import re
import string
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from batcher.records import OPTIONAL_COLUMNS, RESULT_COLUMNS
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
    # A download (a batch's output or error file) larger than this is refused, and an
    # upload or a download taking longer than this in all is stopped: a server cannot
    # fill the disk or drip a file forever. 2 GB is ten times the largest input file.
    max_download_bytes: PositiveInt = 2_000_000_000
    transfer_timeout_s: PositiveFloat = 3600.0

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
                raise ValueError(f"output.path: must not be the input file "
                                 f"({self.output.path} is the input {self.input.path})")
            if self.output.checkpoint_path.resolve() in (
                self.input.path.resolve(), self.output.path.resolve()
            ):
                raise ValueError(f"output.checkpoint: must differ from the input and results "
                                 f"files ({self.output.checkpoint_path} is the input "
                                 f"{self.input.path} or the results {self.output.path})")
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
