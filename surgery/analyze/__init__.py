"""``surgery analyze``: SVD analysis of weights and task vectors, one tensor at a time.

Entry points (each returns a :class:`~surgery.core.result.Result`): :func:`spectrum`,
:func:`subspace`, :func:`gain`, :func:`interference`. The analyses themselves live in ``spectra.py``,
``subspaces.py``, ``gains.py`` and ``interferences.py``; ``linalg.py`` holds the linear algebra, ``plot.py`` the
figures (called by the command layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint
    from ..core.progress import Progress
    from ..core.result import Result


def _open(location: "str | Checkpoint | None"):
    from ..checkpoint import Checkpoint, open_checkpoint

    if location is None or isinstance(location, Checkpoint):
        return location
    return open_checkpoint(location)


def spectrum(location: "str | Checkpoint", *, base: "str | Checkpoint | None" = None, energy: float = 0.9,
             top: int = 8, keep_spectra: bool = False, device: str = "cpu",
             progress: "Progress | None" = None, executor: Any = None) -> "Result":
    """Per 2-D tensor σ_max, ‖W‖_F, stable / effective / energy rank and the top singular values
    (of the task vector ``location − base`` when ``base`` is given); see :func:`.spectra.analyze_spectrum`.
    ``executor`` (:mod:`surgery.core.executor`) says where the per-tensor SVDs run (None: here)."""
    from ..core.result import Result
    from .common import check_energy, check_top
    from .spectra import analyze_spectrum

    check_energy(energy)
    check_top(top)
    return Result(analyze_spectrum(_open(location), base=_open(base), energy=energy, top=top, device=device,
                                   keep_spectra=keep_spectra, progress=progress, executor=executor))


def subspace(a: "str | Checkpoint", b: "str | Checkpoint", *, base: "str | Checkpoint", rank: int | None = None,
             energy: float | None = None, frozen_fraction: float | None = None, text: str | Path | None = None,
             mrr: float = 0.1, trr: float = 0.8, device: str = "cpu", progress: "Progress | None" = None) -> "Result":
    """Overlap of two task vectors' top singular subspaces, their leakage into the base's, and
    suggested frozen ranks (by per-block importance on ``text`` when given); see
    :func:`.subspaces.analyze_subspace`."""
    from ..core.errors import UsageError
    from ..core.result import Result
    from .subspaces import analyze_subspace, check_options, importance_from_text

    check_options(rank, energy, (mrr + trr) / 2 if frozen_fraction is None else frozen_fraction, mrr, trr)
    if text is not None and not Path(text).is_file():
        raise UsageError(f"`text` {text}: no such file; give a plain-text file to compute activations on.")
    base_ckpt, ca, cb = _open(base), _open(a), _open(b)
    importance = None
    if text is not None:
        from ..eval.perplexity import read_text

        importance = importance_from_text(base_ckpt, read_text(text), device=device)
    return Result(analyze_subspace(base_ckpt, ca, cb, rank=rank, energy=energy, frozen_fraction=frozen_fraction,
                                   importance=importance, mrr=mrr, trr=trr, device=device, progress=progress))


def gain(location: "str | Checkpoint", *, vs: "str | Checkpoint | None" = None, tolerance: float = 0.1,
         expect_exponent: float = 0.0, ignore_types: list[str] | None = None, exact: bool = False,
         fail_on_drift: bool = False, device: str = "cpu", progress: "Progress | None" = None,
         executor: Any = None) -> "Result":
    """σ_max, RMS and σ_max/RMS per matrix; with ``vs``, σ_max ratios and implied width
    exponents against a proxy. ``passed`` is False when ``fail_on_drift`` and a pair drifts;
    see :func:`.gains.analyze_gain`. ``executor`` (:mod:`surgery.core.executor`) says where the
    per-tensor work runs (None: here)."""
    from ..core.errors import UsageError
    from ..core.result import Result
    from .common import TYPE_ORDER
    from .gains import analyze_gain

    if vs is None and fail_on_drift:
        raise UsageError("`fail_on_drift` needs `vs`: drift is measured against a proxy checkpoint.")
    ignore_types = list(ignore_types or [])
    unknown = [t for t in ignore_types if t not in TYPE_ORDER]
    if unknown:
        raise UsageError(f"`ignore`: unknown sublayer type {','.join(unknown)}; choose from {', '.join(TYPE_ORDER)}.")
    report = analyze_gain(_open(location), vs=_open(vs), tolerance=tolerance, expect_exponent=expect_exponent,
                          ignore_types=ignore_types, exact=exact, device=device, progress=progress,
                          executor=executor)
    return Result(report, passed=report.get("within_tolerance", True) or not fail_on_drift)


def interference(models: "list[str | Checkpoint]", *, base: "str | Checkpoint", energy: float = 0.9,
                 device: str = "cpu", progress: "Progress | None" = None) -> "Result":
    """Per tensor and per layer: task-vector cosines, sign conflicts, subspace overlap, effective
    rank and relative size of two or more fine-tunes of ``base``; see
    :func:`.interferences.analyze_interference`."""
    from ..core.result import Result
    from .interferences import analyze_interference

    return Result(analyze_interference(_open(base), [_open(m) for m in models], energy=energy, device=device,
                                       progress=progress))
