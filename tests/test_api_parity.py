"""The sync and async faces of the Python API are one definition each."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

import batcher

PAIRS = [(batcher.run, batcher.arun), (batcher.run_dataframe, batcher.arun_dataframe)]


@pytest.mark.parametrize(("sync", "async_"), PAIRS, ids=lambda f: f.__name__)
def test_sync_and_async_signatures_match(sync: Callable[..., Any],
                                         async_: Callable[..., Any]) -> None:
    assert inspect.iscoroutinefunction(async_) and not inspect.iscoroutinefunction(sync)
    assert inspect.signature(sync) == inspect.signature(async_)
    assert sync.__name__ == async_.__name__.removeprefix("a")
    assert sync.__doc__ == async_.__doc__ and "``" in (sync.__doc__ or "")
    assert sync.__module__ == async_.__module__
