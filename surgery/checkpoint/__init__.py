"""Checkpoint layer: lazy validated reading, streaming atomic writing, Hub pull/push."""

from .format import DTYPES, TensorInfo, parse_header
from .reader import Checkpoint, matrix_like, open_checkpoint, open_local
from .roles import TensorRole, role_of

__all__ = ["DTYPES", "TensorInfo", "parse_header", "Checkpoint", "open_checkpoint", "open_local",
           "matrix_like", "TensorRole", "role_of"]
