"""batcher: run large batches of prompts through OpenAI-compatible chat APIs."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
