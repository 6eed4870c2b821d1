"""CI validation of a checkpoint (``surgery check``): integrity, config consistency,
closeness to a reference, sha256 manifest. Every check yields a verdict with numbers."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint.format import TensorInfo
from .checkpoint.reader import Checkpoint, hash_file, read_into
from .core.errors import InputError, UsageError
from .core.executor import map_items
from .core.formats import MAX_JSON_BYTES, parse_json, read_text
from .core.progress import Progress
from .core.result import Result

# Tensors are read in blocks of at most this many bytes (integrity) or elements (--against),
# so peak memory is a few blocks whatever the model or tensor size.
READ_BLOCK_BYTES = 32 * 1024 * 1024
COMPARE_BLOCK_ELEMENTS = 1024 * 1024

# Non-finite values by bit pattern, so the integrity check needs numpy only (no torch):
# code -> (unsigned view, exponent mask, mantissa mask). All-ones exponent: Inf when the
# mantissa is zero, NaN otherwise. float8_e4m3fn has no Inf; its NaN is S.1111.111.
_FLOAT_BITS = {
    "F64": ("<u8", 0x7FF0000000000000, 0x000FFFFFFFFFFFFF),
    "F32": ("<u4", 0x7F800000, 0x007FFFFF),
    "F16": ("<u2", 0x7C00, 0x03FF),
    "BF16": ("<u2", 0x7F80, 0x007F),
    "F8_E5M2": ("u1", 0x7C, 0x03),
    "F8_E4M3": ("u1", 0x7F, 0x7F),
}


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


def nonfinite_counts(info: TensorInfo, buf: Any = None) -> tuple[int, int]:
    """(NaN count, Inf count) of one stored floating tensor, read in blocks and tested by
    bit pattern (numpy only). ``buf``: an optional reusable uint8 numpy buffer."""
    import numpy as np

    view, exp, man = _FLOAT_BITS[info.st_dtype]
    width = np.dtype(view).itemsize
    step = max(width, READ_BLOCK_BYTES - READ_BLOCK_BYTES % width)
    if buf is None or len(buf) < min(step, info.nbytes):
        buf = np.empty(min(step, info.nbytes), dtype=np.uint8)
    nan = inf = 0
    exp_t, man_t = np.array(exp, dtype=view), np.array(man, dtype=view)
    for start in range(0, info.nbytes, step):
        n = min(step, info.nbytes - start)
        block = buf[:n]
        read_into(info, start, block)
        x = block.view(view)
        special = (x & exp_t) == exp_t
        if not special.any():
            continue
        if info.st_dtype == "F8_E4M3":
            nan += int(special.sum())
            continue
        frac = (x & man_t) != 0
        nan += int((special & frac).sum())
        inf += int((special & ~frac).sum())
    return nan, inf


def _integrity_failure(ckpt: Checkpoint, name: str) -> dict[str, Any] | None:
    """Read one tensor in blocks; its NaN/Inf counts when it holds any (None when it is sound)."""
    import numpy as np

    info = ckpt.info(name)
    if info.st_dtype in _FLOAT_BITS and info.nbytes:
        nan, inf = nonfinite_counts(info)
        return {"tensor": name, "file": info.file.name, "nan": nan, "inf": inf} if nan or inf else None
    if info.nbytes:  # integer tensors: readable is all there is to check
        buf = np.empty(min(READ_BLOCK_BYTES, info.nbytes), dtype=np.uint8)
        for start in range(0, info.nbytes, READ_BLOCK_BYTES):
            n = min(READ_BLOCK_BYTES, info.nbytes - start)
            read_into(info, start, buf[:n])
    return None


def check_integrity(ckpt: Checkpoint, progress: Progress | None = None, executor: Any = None) -> CheckResult:
    """Every tensor readable; no NaN or Inf in any floating tensor (read in blocks, no torch)."""
    found = map_items(functools.partial(_integrity_failure, ckpt), ckpt.names, "integrity", progress,
                      executor=executor, weights=[ckpt.info(n).nbytes for n in ckpt.names])
    failures = [f for f in found if f is not None]
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
    import torch
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


def compare_blocks(ckpt: Checkpoint, ref: Checkpoint, name: str, atol: float, rtol: float,
                   max_elements: int = COMPARE_BLOCK_ELEMENTS) -> tuple[float, int]:
    """(max |a − b|, entries outside ``atol + rtol·|b|``) of one tensor, in float64 row blocks
    (NaN anywhere: max is NaN and those entries count as outside)."""
    import torch

    from .core.engine import row_ranges

    info = ckpt.info(name)
    if len(info.shape) < 1 or info.shape[0] == 0:
        blocks = [(ckpt.get(name, dtype=torch.float64), ref.get(name, dtype=torch.float64))]
    else:
        blocks = ((ckpt.get_rows(name, s, t, dtype=torch.float64), ref.get_rows(name, s, t, dtype=torch.float64))
                  for s, t in row_ranges(0, info.shape[0], info.numel // info.shape[0], max_elements))
    worst, violations = 0.0, 0
    for ta, tb in blocks:
        diff = (ta - tb).abs_()
        if not diff.numel():
            continue
        nan = torch.isnan(diff)
        if bool(nan.any()):
            worst = float("nan")
        elif worst == worst:
            worst = max(worst, float(diff.max()))
        violations += int(((diff > atol + rtol * tb.abs_()) | nan).sum())
        del ta, tb, diff, nan
    return worst, violations


def _compare(ckpt: Checkpoint, ref: Checkpoint, atol: float, rtol: float,
             name: str) -> tuple[float | None, dict[str, Any] | None]:
    """One tensor against the reference: (max |diff|, or None for a shape mismatch; the failure or None)."""
    a, b = ckpt.info(name), ref.info(name)
    if a.shape != b.shape:
        return None, {"tensor": name, "problem": "shape", "shape": list(a.shape), "expected": list(b.shape)}
    m, bad = compare_blocks(ckpt, ref, name, atol, rtol)
    return m, ({"tensor": name, "problem": "tolerance", "max_abs_diff": m, "violations": bad} if bad else None)


def check_against(ckpt: Checkpoint, ref: Checkpoint, atol: float, rtol: float = 0.0,
                  progress: Progress | None = None, executor: Any = None) -> CheckResult:
    """Every tensor within ``atol + rtol·|ref|`` of the reference; names and shapes equal.
    Streams in row blocks: peak memory is a few blocks, whatever the tensor sizes."""
    failures, worst, worst_name = [], 0.0, None
    for n in sorted(set(ckpt.names) ^ set(ref.names)):
        failures.append({"tensor": n, "problem": "only in " + ("checkpoint" if n in ckpt else "reference")})
    common = [n for n in ckpt.names if n in ref]
    compared = map_items(functools.partial(_compare, ckpt, ref, atol, rtol), common, "compare", progress,
                         executor=executor, weights=[ckpt.info(n).nbytes + ref.info(n).nbytes for n in common])
    for name, (m, failure) in zip(common, compared):
        if m is not None and (m > worst or m != m):
            worst, worst_name = m, name
        if failure is not None:
            failures.append(failure)
    detail = (f"all {len(common)} tensors within atol={atol} (max |diff| {worst:.3g} in {worst_name!r})" if not failures
              else f"{len(failures)} tensor(s) outside tolerance or missing; first {failures[0]['tensor']!r} ({failures[0]['problem']})")
    return CheckResult("against", not failures, detail,
                       {"atol": atol, "rtol": rtol, "max_abs_diff": worst, "worst_tensor": worst_name, "compared": len(common)},
                       failures)


def read_manifest(path: Path) -> dict[str, str]:
    """A manifest in ``sha256sum`` format (``HASH  FILE`` lines) or JSON ``{file: hash}``,
    read through the validating readers (size, UTF-8, nesting) and checked line by line."""
    text = read_text(path, what="manifest", max_bytes=MAX_JSON_BYTES)
    if text.lstrip().startswith("{"):
        data = parse_json(text, path=path, what="manifest", expect=dict)
        bad = next((k for k, v in data.items() if not isinstance(v, str) or len(v) != 64 or not _is_hex(v)), None)
        if bad is not None:
            raise InputError(f"manifest {path} gives {bad!r} the value {str(data[bad])[:70]!r}, not a sha256 "
                             f"(64 hex digits).", path=path)
        return {str(k): str(v).lower() for k, v in data.items()}
    out = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or len(parts[0]) != 64 or not _is_hex(parts[0]):
            raise InputError(f"manifest {path} line {i} is not 'SHA256  FILE'.", path=path)
        out[parts[1].strip().lstrip("*")] = parts[0].lower()
    return out


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in s)


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
               progress: Progress | None = None, executor: Any = None) -> dict[str, Any]:
    """Run the selected checks and return ``{"passed": bool, "checks": [...]}``."""
    results: list[CheckResult] = []
    if integrity:
        results.append(check_integrity(ckpt, progress, executor))
    if config:
        results.append(check_config(ckpt))
    if against is not None:
        results.append(check_against(ckpt, against, atol, rtol, progress, executor))
    if manifest is not None:
        results.append(check_manifest(ckpt, manifest))
    return {"checkpoint": ckpt.label, "passed": all(r.passed for r in results), "checks": [asdict(r) for r in results]}


def check(location: str | Path | Checkpoint, *, integrity: bool = True, config: bool = False,
          against: str | Path | Checkpoint | None = None, atol: float = 0.0, rtol: float = 0.0,
          manifest: Path | None = None, write_manifest_to: Path | None = None, force: bool = False,
          progress: Progress | None = None, executor: Any = None) -> Result:
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
        executor: Where the per-tensor checks run (:mod:`surgery.core.executor`; None: here).

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
                             manifest=manifest, progress=progress, executor=executor))
    return Result(report, passed=report["passed"])
