"""A job given as keyword arguments (``run_dataframe(..., model=..., prompt_column=...)``,
``run_dataset(...)``): the names every Python face takes, and the job file's
shape they become, so a keyword is validated exactly as its YAML key.

>>> job_data({"model": "m", "prompt_column": "text", "concurrency": 4}, "f(...)",
...          name="frame")
{'name': 'frame', 'prompt': {'column': 'text'}, 'model': 'm', 'limits': {'concurrency': 4}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batcher.errors import ConfigError

#: Each keyword's place in a job file: a top-level key, or a section and a key.
KEYWORDS: dict[str, str | tuple[str, str]] = {
    "model": "model",
    "params": "params",
    "prompt_column": ("prompt", "column"),
    "template": ("prompt", "template"),
    "system": ("prompt", "system"),
    "base_url": ("endpoint", "base_url"),
    "api_key_env": ("endpoint", "api_key_env"),
    "timeout_s": ("endpoint", "timeout_s"),
    "concurrency": ("limits", "concurrency"),
    "requests_per_minute": ("limits", "requests_per_minute"),
    "tokens_per_minute": ("limits", "tokens_per_minute"),
    "max_attempts": ("retry", "max_attempts"),
    "invalid_reply_retries": ("retry", "invalid_reply_retries"),
    "schema": ("output", "schema"),
    "schema_mode": ("output", "schema_mode"),
    "schema_prefix": ("output", "schema_prefix"),
}


def job_data(settings: Mapping[str, Any], source: str, *, name: str) -> dict[str, Any]:
    """``settings`` in the job file's shape, not yet validated. A keyword set to None
    is left out (the job's default stays); an unknown one is refused, naming the
    ones there are."""
    data: dict[str, Any] = {"name": name, "prompt": {}}  # every job has a prompt to check
    for keyword, value in settings.items():
        place = KEYWORDS.get(keyword)
        if place is None:
            raise ConfigError(f"{source}: {keyword}: unknown setting (settings: "
                              f"{', '.join(KEYWORDS)})")
        if value is None:
            continue
        if isinstance(place, str):
            data[place] = value
        else:
            section, key = place
            data.setdefault(section, {})[key] = value
    return data
