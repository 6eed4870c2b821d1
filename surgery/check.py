"""CI validation of a checkpoint (``surgery check``): integrity, config consistency,
closeness to a reference, sha256 manifest. Every check yields a verdict with numbers."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint.reader import Checkpoint, hash_file
from .core.errors import InputError, UsageError
from .core.progress import Progress, track
from .core.result import Result


# Buffers (not parameters) that some checkpoints carry and transformers ignores on load.
BUFFER_SUFFIXES = ("position_ids", "inv_freq", "masked_bias", "attn.bias")


@dataclass
class CheckResult:
    """One check's verdict."""

    name: str
    passed: bool
    detail: str
    numbers: dict[str, Any] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)


def check_integrity(ckpt: Checkpoint, progress: Progress | None = None) -> CheckResult:
    """Every tensor readable; no NaN or Inf in any floating tensor."""
    failures = []
    for name in track(ckpt.names, "integrity", progress):
        info = ckpt.info(name)
        t = ckpt.get_raw(name)
        if info.dtype.is_floating_point and t.numel():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                nan = int(torch.isnan(t).sum())
                inf = int(torch.isinf(t).sum())
                failures.append({"tensor": name, "file": info.file.name, "nan": nan, "inf": inf})
        del t
    detail = ("all tensors readable and finite" if not failures else
              f"{len(failures)} tensor(s) hold NaN or Inf, first {failures[0]['tensor']!r} "
              f"({failures[0]['nan']} NaN, {failures[0]['inf']} Inf)")
    return CheckResult("integrity", not failures, detail, {"tensors": len(ckpt.names)}, failures)


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter shapes the transformers architecture named in ``config`` would have.

    The model is built on the meta device, so no memory is used for weights.

    Raises:
        UsageError: The config names no architecture transformers knows.
    """
    import transformers

    arch = (config.get("architectures") or [None])[0]
    cfg = transformers.AutoConfig.for_model(**config) if "model_type" in config else None
    if cfg is None:
        raise UsageError("config.json has no model_type, so its shapes cannot be derived.")
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        model = cls(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_config(ckpt: Checkpoint) -> CheckResult:
    """Tensor shapes agree with config.json (via the transformers architecture it names)."""
    cfg = ckpt.config
    if cfg is None:
        return CheckResult("config", False, f"{ckpt.label} has no config.json to check against")
    try:
        expected = expected_shapes(cfg)
    except Exception as exc:  # an unknown architecture is a failed check, not a crash
        return CheckResult("config", False, f"cannot build the architecture from config.json: {type(exc).__name__}: {exc}")
    # Checkpoints store names with or without the base-model prefix ("bert.", "model."): match both ways.
    def candidates(name: str) -> list[str]:
        out = [name]
        if "." in name:
            out.append(name.split(".", 1)[1])
        return out

    exp_lookup: dict[str, tuple[int, ...]] = {}
    for k, v in expected.items():
        for c in candidates(k):
            exp_lookup.setdefault(c, v)
    failures, matched, ignored = [], 0, []
    used: set[str] = set()
    for name in ckpt.names:
        shape = ckpt.info(name).shape
        key = next((c for c in candidates(name) if c in exp_lookup), None)
        if key is None and name.endswith(BUFFER_SUFFIXES):
            ignored.append(name)  # non-persistent buffers older checkpoints saved; loaders drop them
            continue
        if key is None:
            failures.append({"tensor": name, "problem": "unexpected", "shape": list(shape)})
            continue
        used.add(key)
        matched += 1
        if tuple(exp_lookup[key]) != tuple(shape):
            failures.append({"tensor": name, "problem": "shape", "shape": list(shape), "expected": list(exp_lookup[key])})
    tied = bool(cfg.get("tie_word_embeddings", True))
    missing = []
    for k in expected:
        if not any(c in used for c in candidates(k)):
            if tied and ("lm_head" in k or "decoder.weight" in k):
                continue
            if k.endswith(BUFFER_SUFFIXES):
                continue
            missing.append(k)
    failures += [{"tensor": k, "problem": "missing", "expected": list(expected[k])} for k in missing]
    detail = (f"{matched} tensors match the shapes of {(cfg.get('architectures') or ['?'])[0]}" if not failures else
              f"{len(failures)} problem(s): first {failures[0]['problem']} {failures[0]['tensor']!r}")
    return CheckResult("config", not failures, detail,
                       {"matched": matched, "expected": len(expected), "ignored_buffers": ignored}, failures)


def check_against(ckpt: Checkpoint, ref: Checkpoint, atol: float, rtol: float = 0.0,
                  progress: Progress | None = None) -> CheckResult:
    """Every tensor within ``atol + rtol·|ref|`` of the reference; names and shapes equal."""
    failures, worst, worst_name = [], 0.0, None
    for n in sorted(set(ckpt.names) ^ set(ref.names)):
        failures.append({"tensor": n, "problem": "only in " + ("checkpoint" if n in ckpt else "reference")})
    common = [n for n in ckpt.names if n in ref]
    for name in track(common, "compare", progress):
        a, b = ckpt.info(name), ref.info(name)
        if a.shape != b.shape:
            failures.append({"tensor": name, "problem": "shape", "shape": list(a.shape), "expected": list(b.shape)})
            continue
        ta, tb = ckpt.get(name, dtype=torch.float64), ref.get(name, dtype=torch.float64)
        diff = (ta - tb).abs()
        m = float(diff.max()) if diff.numel() else 0.0
        bad = diff > atol + rtol * tb.abs()
        if diff.numel() and bool(torch.isnan(diff).any()):
            bad = bad | torch.isnan(diff)
            m = float("nan")
        if m > worst or m != m:
            worst, worst_name = m, name
        if bool(bad.any()):
            failures.append({"tensor": name, "problem": "tolerance", "max_abs_diff": m, "violations": int(bad.sum())})
        del ta, tb, diff
    detail = (f"all {len(common)} tensors within atol={atol} (max |diff| {worst:.3g} in {worst_name!r})" if not failures
              else f"{len(failures)} tensor(s) outside tolerance or missing; first {failures[0]['tensor']!r} ({failures[0]['problem']})")
    return CheckResult("against", not failures, detail,
                       {"atol": atol, "rtol": rtol, "max_abs_diff": worst, "worst_tensor": worst_name, "compared": len(common)},
                       failures)


def read_manifest(path: Path) -> dict[str, str]:
    """A manifest in ``sha256sum`` format (``HASH  FILE`` lines) or JSON ``{file: hash}``."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InputError(f"manifest {path} cannot be read: {exc.strerror}.", path=path) from exc
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"manifest {path} is not valid JSON ({exc}).", path=path) from exc
        return {str(k): str(v).lower() for k, v in data.items()}
    out = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise InputError(f"manifest {path} line {i} is not 'SHA256  FILE'.", path=path)
        out[parts[1].strip().lstrip("*")] = parts[0].lower()
    return out


def check_manifest(ckpt: Checkpoint, manifest: Path) -> CheckResult:
    """Files listed in a sha256 manifest exist in the checkpoint folder and match."""
    wanted = read_manifest(manifest)
    failures = []
    for fname, sha in sorted(wanted.items()):
        p = ckpt.root / fname
        if Path(fname).is_absolute() or ".." in Path(fname).parts:
            failures.append({"file": fname, "problem": "path outside the checkpoint"})
        elif not p.is_file():
            failures.append({"file": fname, "problem": "missing"})
        else:
            got = hash_file(p)
            if got != sha:
                failures.append({"file": fname, "problem": "sha256", "expected": sha, "actual": got})
    detail = (f"{len(wanted)} file(s) match the manifest" if not failures
              else f"{len(failures)} file(s) differ from the manifest; first {failures[0]['file']} ({failures[0]['problem']})")
    return CheckResult("sha256", not failures, detail, {"files": len(wanted)}, failures)


def write_manifest(ckpt: Checkpoint) -> str:
    """A sha256sum-format manifest of the checkpoint's safetensors files."""
    return "".join(f"{hash_file(f)}  {f.name}\n" for f in ckpt.files)


def run_checks(ckpt: Checkpoint, *, integrity: bool = True, config: bool = False, against: Checkpoint | None = None,
               atol: float = 0.0, rtol: float = 0.0, manifest: Path | None = None,
               progress: Progress | None = None) -> dict[str, Any]:
    """Run the selected checks and return ``{"passed": bool, "checks": [...]}``."""
    results: list[CheckResult] = []
    if integrity:
        results.append(check_integrity(ckpt, progress))
    if config:
        results.append(check_config(ckpt))
    if against is not None:
        results.append(check_against(ckpt, against, atol, rtol, progress))
    if manifest is not None:
        results.append(check_manifest(ckpt, manifest))
    return {"checkpoint": ckpt.label, "passed": all(r.passed for r in results), "checks": [asdict(r) for r in results]}


def check(location: str | Path | Checkpoint, *, integrity: bool = True, config: bool = False,
          against: str | Path | Checkpoint | None = None, atol: float = 0.0, rtol: float = 0.0,
          manifest: Path | None = None, write_manifest_to: Path | None = None, force: bool = False,
          progress: Progress | None = None) -> Result:
    """``surgery check``: validate a checkpoint for CI.

    Args:
        location: The checkpoint (folder, file, index or Hub id).
        integrity: Read every tensor; none may hold NaN or Inf.
        config: Shapes must agree with config.json's architecture.
        against: A reference checkpoint every tensor must be within ``atol + rtol·|ref|`` of.
        atol, rtol: Tolerances for ``against``.
        manifest: A sha256 manifest the files must match.
        write_manifest_to: First write a sha256 manifest of the files here (atomically; never
            over the checkpoint or the reference).
        force: Replace an existing ``write_manifest_to`` file.
        progress: Progress sink.

    Returns:
        A Result whose report lists each check with its numbers; ``passed`` is their verdict.

    Raises:
        UsageError: negative or NaN tolerances, tolerances without ``against``.
    """
    from .checkpoint.reader import open_checkpoint
    from .core.output import write_file

    for key, value in (("atol", atol), ("rtol", rtol)):
        if not (value >= 0) or value == float("inf"):
            raise UsageError(f"`{key}` must be a finite non-negative number, got {value}.")
    if (atol or rtol) and against is None:
        raise UsageError("`atol`/`rtol` only apply with `against` (a reference checkpoint).")
    ckpt = location if isinstance(location, Checkpoint) else open_checkpoint(location)
    ref = against if isinstance(against, Checkpoint) or against is None else open_checkpoint(against)
    report: dict[str, Any] = {}
    if write_manifest_to is not None:
        read = ckpt.input_paths() + (ref.input_paths() if ref is not None else []) + ([manifest] if manifest else [])
        written = write_file(write_manifest_to, write_manifest(ckpt), force=force, inputs=read)
        report["manifest_written"] = str(written)
    report.update(run_checks(ckpt, integrity=integrity, config=config, against=ref, atol=atol, rtol=rtol,
                             manifest=manifest, progress=progress))
    return Result(report, passed=report["passed"])
