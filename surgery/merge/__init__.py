"""surgery.merge: merge methods as pure tensor functions, the method registry, the
continual-merge state, mergekit-style recipes and the streaming entry point :func:`merge`."""

from .recipe import MergeRequest, ModelEntry, load_recipe
from .registry import METHODS, MethodSpec, get_method
from .run import MergeOptions, MergeResult, merge

__all__ = ["METHODS", "MergeOptions", "MergeRequest", "MergeResult", "MethodSpec", "ModelEntry", "get_method",
           "load_recipe", "merge"]
