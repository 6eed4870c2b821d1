"""``surgery eval``: perplexity with transformers forward passes (``perplexity.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.result import Result


def ppl(checkpoint: Any, *, text: str | Path | None = None, sentences: bool = False, max_sentences: int | None = None,
        stride: int | None = None, **kwargs: Any) -> "Result":
    """``surgery eval ppl``: :func:`.perplexity.perplexity` as a Result.

    Raises:
        UsageError: ``stride`` with ``sentences``, ``max_sentences`` without it.
    """
    from ..core.errors import UsageError
    from ..core.result import Result
    from .perplexity import perplexity

    if stride is not None and sentences:
        raise UsageError("`stride` applies to corpus perplexity only; drop it or drop `sentences`.")
    if max_sentences is not None and not sentences:
        raise UsageError("`max_sentences` applies to `sentences` mode only.")
    return Result(perplexity(checkpoint, text=text, sentences=sentences, max_sentences=max_sentences, stride=stride,
                             **kwargs))
