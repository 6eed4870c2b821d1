"""``surgery merge``: merge methods as modules (``methods/``) behind one interface
(``method.py``) and one table (``registry.py``); parameters resolved per tensor (``params.py``);
mergekit-style recipes (``recipe.py``); the batch plan (``batch.py``), the continual runner
(``stepwise.py``) and its resumable state (``state.py``); the entry point :func:`merge` (``run.py``)."""

from .method import Batch, Continual, Param, StepContext, TensorContext
from .recipe import MergeRequest, ModelEntry, load_recipe
from .registry import METHODS, get_method
from .run import MergeOptions, merge

__all__ = ["METHODS", "Batch", "Continual", "MergeOptions", "MergeRequest", "ModelEntry", "Param", "StepContext",
           "TensorContext", "get_method", "load_recipe", "merge"]
