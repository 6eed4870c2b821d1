"""TokenFormer Pattention reference and parameter-token growth.

- :mod:`.pattention`: the Pattention layer and its three normalisations.
- :mod:`.model`: config, checkpoint layout and a reference LM forward.
- :mod:`.growth`: tile / gram / zero / random growth as tensor functions.
- :mod:`.run`: :func:`grow`, the streaming entry point behind ``surgery grow``.
- :mod:`.fixture`: tiny seeded TokenFormer checkpoints for tests and examples.
"""

from .growth import INITS, exact_for
from .pattention import NORM_TYPES, nonlinear_norm, pattention
from .run import grow

__all__ = ["INITS", "NORM_TYPES", "exact_for", "grow", "nonlinear_norm", "pattention"]
