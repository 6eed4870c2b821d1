"""surgery.merge: merge methods as pure tensor functions, the method registry, the
continual-merge state, mergekit-style recipes and the streaming entry point :func:`merge`."""

from .recipe import MergeRequest, ModelEntry, load_recipe
from .registry import METHODS, MethodSpec, get_method
from .run import MergeOptions, merge

__all__ = ["METHODS", "MergeOptions", "MergeRequest", "MethodSpec", "ModelEntry", "get_method",
           "load_recipe", "merge"]
