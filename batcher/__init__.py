"""batcher: run large batches of prompts through OpenAI-compatible chat APIs.

The names in ``__all__`` are the promised Python API; everything else is
internal and may change.

>>> import batcher                                         # doctest: +SKIP
>>> out = batcher.run_dataframe(df, model="gpt-4o-mini", prompt_column="text",
...                             base_url="https://api.openai.com/v1",
...                             api_key_env="OPENAI_API_KEY")
>>> result = batcher.run("jobs/demo.yaml")                 # a job file, as the CLI runs it
"""

from __future__ import annotations

__version__ = "0.1.0"

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
    UserError,
)
from batcher.records import RESULT_COLUMNS

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
    "Summary",
    "UserError",
    "__version__",
    "arun",
    "arun_dataframe",
    "report",
    "run",
    "run_dataframe",
]
