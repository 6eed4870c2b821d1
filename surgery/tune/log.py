"""The trial log of a tuning run: JSON lines, rewritten atomically after every trial, so an
interrupted run resumes from it (``surgery tune ... --resume LOG``).

The first line records the setup (inputs, probes and their split, windows, objective, seed,
methods, groups); a resumed run must have the same setup, since its trials are replayed
from the log by their keys. Every other line is one evaluated candidate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import CorruptCheckpointError, InputError, UsageError
from ..core.formats import parse_json, read_text
from ..core.output import write_file

LOG_FORMAT = "surgery-tune-log"
LOG_VERSION = 1
MAX_LOG_BYTES = 256 * 2**20


def _numbers(d: Any) -> bool:
    """A probe → log-perplexity mapping whose values are numbers (inf allowed: a collapsed merge)."""
    return isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                                       for k, v in d.items())


def read_log(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(setup, trials) of a log file.

    Raises:
        InputError: The file cannot be read; CorruptCheckpointError when it is not a tune log.
    """
    p = Path(path)
    hint = "pass the log an earlier `surgery tune` run wrote (OUT.tune.jsonl, or OUT/trials.jsonl)"
    try:
        text = read_text(p, what="tune log", max_bytes=MAX_LOG_BYTES)
    except CorruptCheckpointError:
        raise
    except InputError as exc:
        raise InputError(f"{exc.message.rstrip('.')}; {hint}.", path=p) from None
    docs = [parse_json(line, path=p, what=f"tune log line {i}", error=CorruptCheckpointError)
            for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not docs or not isinstance(docs[0], dict) or docs[0].get("format") != LOG_FORMAT:
        raise CorruptCheckpointError(f"{p} is not a surgery tune log (no {LOG_FORMAT!r} header line); {hint}.",
                                     path=p)
    if docs[0].get("version") != LOG_VERSION:
        raise CorruptCheckpointError(f"{p} is a tune log of version {docs[0].get('version')!r}; this surgery reads "
                                     f"version {LOG_VERSION}.", path=p)
    if not isinstance(docs[0].get("setup"), dict):
        raise CorruptCheckpointError(f"{p} has a damaged header line (no setup object); the log cannot be resumed.",
                                     path=p)
    trials = docs[1:]
    for t in trials:
        if not (isinstance(t, dict) and isinstance(t.get("key"), str) and isinstance(t.get("method"), str)
                and isinstance(t.get("settings"), dict) and _numbers(t.get("nll"))):
            raise CorruptCheckpointError(f"{p} has a damaged trial line; the log cannot be resumed.", path=p)
    return docs[0]["setup"], trials


def check_setup(saved: dict[str, Any], current: dict[str, Any], path: str | Path) -> None:
    """Refuse to resume a log made with another setup, naming the first difference."""
    for k in sorted(set(saved) | set(current)):
        if saved.get(k) != current.get(k):
            raise UsageError(f"the tune log {path} was made with another {k} ({saved.get(k)!r}, now "
                             f"{current.get(k)!r}); resume with the same settings or start a new run.", path=path)


def log_text(setup: dict[str, Any], trials: list[dict[str, Any]]) -> str:
    head = {"format": LOG_FORMAT, "version": LOG_VERSION, "setup": setup}
    return "\n".join(json.dumps(d, sort_keys=True) for d in [head, *trials]) + "\n"


def write_log(path: str | Path, setup: dict[str, Any], trials: list[dict[str, Any]], inputs: list[Path]) -> None:
    """Rewrite the whole log atomically (a crash leaves the previous complete version)."""
    write_file(path, log_text(setup, trials), force=True, inputs=inputs)
