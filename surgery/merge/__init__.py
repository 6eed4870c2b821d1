"""``surgery merge``: merge methods as modules (``methods/``) behind one interface
(``method.py``) and one table (``registry.py``); parameters resolved per tensor (``params.py``);
mergekit-style recipes (``recipe.py``) with slices (``layout.py``), tokenizer alignment
(``vocab.py``) and model+lora inputs (``inputs.py``); the header-only plan (``plan.py``), its
streaming execution (``batch.py``), the continual runner (``stepwise.py``) and its resumable
state (``state.py``); the entry point :func:`merge` (``run.py``)."""

from .method import Batch, Continual, Param, StepContext, TensorContext
from .recipe import MergeRequest, ModelEntry, ModelRef, SliceSource, SliceSpec, TokenizerSpec, TokenSpec, load_recipe
from .registry import METHODS, get_method
from .run import MergeOptions, merge

__all__ = ["METHODS", "Batch", "Continual", "MergeOptions", "MergeRequest", "ModelEntry", "ModelRef", "Param",
           "SliceSource", "SliceSpec", "StepContext", "TensorContext", "TokenSpec", "TokenizerSpec", "get_method",
           "load_recipe", "merge"]
