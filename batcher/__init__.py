"""batcher: run large batches of prompts through OpenAI-compatible chat APIs.

The names in ``__all__`` are the promised Python API; everything else is
internal and may change.

>>> import batcher                                         # doctest: +SKIP
>>> out = batcher.run_dataframe(df, model="gpt-4o-mini", prompt_column="text",
...                             base_url="https://api.openai.com/v1",
...                             api_key_env="OPENAI_API_KEY")
>>> result = batcher.run("jobs/demo.yaml")                 # a job file, as the CLI runs it

Importing the package is cheap: each public name is loaded from its module on
first use (PEP 562), so ``import batcher.errors`` or the mock server does not
pay for pandas, pyarrow and aiohttp.
"""

from __future__ import annotations

# Imported under private names: every public name of this module is in __all__.
import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

if _typing.TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads these
    from batcher.api import (
        JobSource,
        Report,
        Result,
        Summary,
        arun,
        arun_dataframe,
        report,
        run,
        run_dataframe,
    )
    from batcher.errors import (
        BatcherError,
        BudgetReached,
        CheckpointError,
        ConfigError,
        DataError,
        Interrupted,
        OutputError,
        RunAborted,
        RunInProgress,
        UserError,
    )
    from batcher.records import RESULT_COLUMNS

_SOURCES = {
    "batcher.api": ("JobSource", "Report", "Result", "Summary", "arun", "arun_dataframe",
                    "report", "run", "run_dataframe"),
    "batcher.errors": ("BatcherError", "BudgetReached", "CheckpointError", "ConfigError",
                       "DataError", "Interrupted", "OutputError", "RunAborted", "RunInProgress",
                       "UserError"),
    "batcher.records": ("RESULT_COLUMNS",),
}
_LAZY = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = [
    "RESULT_COLUMNS",
    "BatcherError",
    "BudgetReached",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Interrupted",
    "JobSource",
    "OutputError",
    "Report",
    "Result",
    "RunAborted",
    "RunInProgress",
    "Summary",
    "UserError",
    "__version__",
    "arun",
    "arun_dataframe",
    "report",
    "run",
    "run_dataframe",
]


if not _typing.TYPE_CHECKING:  # hidden from type checkers, so a misspelt name stays an error there

    def __getattr__(name: str) -> _typing.Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'batcher' has no attribute {name!r}")
        value = getattr(_importlib.import_module(module), name)
        globals()[name] = value  # cached: the next access is a plain module attribute
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
