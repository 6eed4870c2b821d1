"""Checkpoint layer: lazy validated reading, streaming atomic writing, Hub pull/push.

Importing it does not import torch: commands that do no tensor math (inspect, check
--sha256, push, pull) stay fast; reading a tensor imports torch then.
"""

from .format import DTYPES, TensorInfo, parse_header
from .reader import Checkpoint, matrix_like, open_checkpoint, open_local
from .roles import TensorRole, role_of

__all__ = ["DTYPES", "TensorInfo", "parse_header", "Checkpoint", "open_checkpoint", "open_local",
           "matrix_like", "TensorRole", "role_of"]
