"""Every merge method, in one explicit table (no registration by import side effect).

Adding a method: write ``surgery/merge/methods/<name>.py`` exporting ``METHODS`` (see
:mod:`surgery.merge.method` and docs/merge-methods.md), add the module to ``_MODULES``
below, and add a test of its tensor function against an independent computation.
"""

from __future__ import annotations

from ..core.errors import UsageError
from .method import Method, check_declaration
from .methods import (arcee_fusion, breadcrumbs, continual, dare, della, dop, isotropic, karcher, linear, model_stock,
                      multislerp, nearswap, nuslerp, opcm, passthrough, ram, sce, slerp, task_arithmetic, ties, tsv, wudi)

_MODULES = (linear, task_arithmetic, ties, dare, breadcrumbs, della, sce, ram, slerp, nuslerp, multislerp, karcher,
            model_stock, nearswap, arcee_fusion, passthrough, tsv, isotropic, wudi, opcm, continual, dop)

METHODS: dict[str, Method] = {m.name: m for mod in _MODULES for m in mod.METHODS}

for _m in METHODS.values():
    check_declaration(_m)


def get_method(name: str) -> Method:
    """The declaration of ``name``; UsageError listing the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}.") from None


def batch_methods() -> list[str]:
    return [n for n, m in METHODS.items() if m.kind == "batch"]


def continual_methods() -> list[str]:
    return [n for n, m in METHODS.items() if m.kind == "continual"]
