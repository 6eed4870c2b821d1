"""Validated readers for every small file a user hands us: JSON, YAML and plain text.

Every config, index, adapter config, recipe, state, manifest and text file is read through
these functions, so hostile bytes end in one :class:`~surgery.core.errors.InputError` line
naming the file (and the field), never in a traceback:

- size: a file larger than its limit is refused before it is read;
- encoding: strict UTF-8 (a leading BOM is allowed); the error gives the byte offset;
- nesting: at most :data:`MAX_DEPTH` levels (deep nesting would otherwise exhaust the
  parser's recursion);
- YAML: ``safe_load`` only (no tags that build objects), and at most :data:`MAX_NODES`
  values after alias expansion (a "billion laughs" document is refused, not expanded);
- strings: no lone surrogates (``"\\ud800"`` is valid JSON syntax but not text; it would
  crash every later print or write);
- shape: ``expect=dict`` (or ``list``) refuses a document of another type, and
  :func:`field` reads one typed, range-checked field, naming it on failure.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from .errors import InputError

MAX_DEPTH = 64
MAX_NODES = 1_000_000
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_TEXT_BYTES = 256 * 1024 * 1024

_MISSING = object()


def _where(path: str | os.PathLike | None, what: str) -> str:
    return f"{what} {path}" if path is not None else what


def check_text(s: str, *, path: str | os.PathLike | None, what: str, error: type[InputError] = InputError) -> str:
    """``s`` unchanged if it is encodable text (no lone surrogates), else a one-line error."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{_where(path, what)} holds the string {s[:40]!r}, which has a lone surrogate "
                    f"({s[exc.start]!r}) and is not text; fix the file.", path=path) from None
    return s


def text_safe(obj: Any) -> Any:
    """``obj`` with every string made encodable: a lone surrogate (what Python makes of a
    path's non-UTF-8 bytes) is written as its escape (``\\udcff``), so records, cards and
    metadata that mention such a path can still be written as UTF-8."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
            return obj
        except UnicodeEncodeError:
            return obj.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(obj, dict):
        return {text_safe(k): text_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(text_safe(v) for v in obj)
    return obj


def check_tree(obj: Any, *, path: str | os.PathLike | None, what: str, max_depth: int = MAX_DEPTH,
               max_nodes: int = MAX_NODES, error: type[InputError] = InputError) -> Any:
    """Walk a parsed document without recursion: depth, node count, keys and strings.

    Raises:
        InputError (or ``error``): too deep, too many values, or a string that is not text.
    """
    stack: list[tuple[Any, int]] = [(obj, 1)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise error(f"{_where(path, what)} holds more than {max_nodes} values (after expanding aliases); "
                        f"it is not a file surgery reads.", path=path)
        if isinstance(node, str):
            check_text(node, path=path, what=what, error=error)
        elif isinstance(node, (dict, list)):
            if depth > max_depth:
                raise error(f"{_where(path, what)} nests deeper than {max_depth} levels; it is not a file surgery reads.",
                            path=path)
            if isinstance(node, dict):
                for k, v in node.items():
                    if isinstance(k, str):
                        check_text(k, path=path, what=what, error=error)
                    stack.append((v, depth + 1))
            else:
                stack.extend((v, depth + 1) for v in node)
    return obj


def _expect(obj: Any, expect: type | None, *, path, what, error) -> Any:
    if expect is not None and not isinstance(obj, expect):
        kind = {dict: "a JSON object / mapping", list: "a list"}.get(expect, expect.__name__)
        got = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(obj), "a number")
        raise error(f"{_where(path, what)} holds {got}, not {kind}.", path=path)
    return obj


def read_bytes(path: str | os.PathLike, *, what: str = "file", max_bytes: int = MAX_TEXT_BYTES,
               error: type[InputError] = InputError) -> bytes:
    """The bytes of ``path``, refusing a missing, unreadable or oversized file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise error(f"{what} {p} is {size} bytes, above the {max_bytes}-byte limit for such a file.", path=p)
        with open(p, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise error(f"{what} {p} does not exist.", path=p) from exc
    except IsADirectoryError as exc:
        raise error(f"{what} {p} is a folder, not a file.", path=p) from exc
    except OSError as exc:
        raise error(f"{what} {p} cannot be read: {exc.strerror or exc}.", path=p) from exc
    if len(data) > max_bytes:
        raise error(f"{what} {p} is above the {max_bytes}-byte limit for such a file.", path=p)
    return data


def decode_text(data: bytes, *, path: str | os.PathLike | None, what: str,
                error: type[InputError] = InputError) -> str:
    """Strict UTF-8 (an optional BOM is dropped)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{_where(path, what)} is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset "
                    f"{exc.start}); save it as UTF-8.", path=path) from None


def read_text(path: str | os.PathLike, *, what: str = "text file", max_bytes: int = MAX_TEXT_BYTES,
              error: type[InputError] = InputError) -> str:
    """A UTF-8 text file (size-limited, strictly decoded)."""
    return decode_text(read_bytes(path, what=what, max_bytes=max_bytes, error=error), path=path, what=what, error=error)


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def parse_json(data: bytes | str, *, path: str | os.PathLike | None = None, what: str = "JSON file",
               expect: type | None = None, max_depth: int = MAX_DEPTH, allow_nan: bool = True,
               error: type[InputError] = InputError, walk: bool = True) -> Any:
    """Parse JSON text with the checks of this module.

    Args:
        data: The document (bytes are decoded as strict UTF-8).
        path, what: Named in errors (``config.json /x/config.json ...``).
        expect: ``dict`` or ``list``: the type the document must have.
        max_depth: Deepest nesting allowed.
        allow_nan: Accept the non-standard ``NaN`` / ``Infinity`` tokens (transformers writes them).
        walk: Check depth and strings after parsing (callers that validate every field
            themselves may skip it).

    Raises:
        InputError (or ``error``): on any problem, naming the file.
    """
    text = decode_text(data, path=path, what=what, error=error) if isinstance(data, (bytes, bytearray)) else data
    try:
        obj = json.loads(text, parse_constant=None if allow_nan else _no_constant)
    except RecursionError:
        raise error(f"{_where(path, what)} nests too deeply to parse; it is not a file surgery reads.",
                    path=path) from None
    except ValueError as exc:
        raise error(f"{_where(path, what)} is not valid JSON ({exc}).", path=path) from None
    if walk:
        check_tree(obj, path=path, what=what, max_depth=max_depth, error=error)
    return _expect(obj, expect, path=path, what=what, error=error)


def read_json(path: str | os.PathLike, *, what: str = "JSON file", expect: type | None = dict,
              max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH, allow_nan: bool = True,
              error: type[InputError] = InputError) -> Any:
    """Read and validate a JSON file (see :func:`parse_json`); by default it must hold an object."""
    data = read_bytes(path, what=what, max_bytes=max_bytes, error=error)
    return parse_json(data, path=path, what=what, expect=expect, max_depth=max_depth, allow_nan=allow_nan, error=error)


def parse_yaml(text: str, *, path: str | os.PathLike | None = None, what: str = "YAML file",
               expect: type | None = dict, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES,
               error: type[InputError] = InputError) -> Any:
    """``yaml.safe_load`` with the checks of this module (no object-building tags, bounded
    depth and size after alias expansion)."""
    import yaml

    try:
        obj = yaml.safe_load(text)
    except RecursionError:
        raise error(f"{_where(path, what)} nests too deeply to parse; it is not a file surgery reads.",
                    path=path) from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise error(f"{_where(path, what)} is not valid YAML ({detail}).", path=path) from None
    except (ValueError, TypeError, OverflowError) as exc:  # constructors of safe tags (dates, numbers)
        raise error(f"{_where(path, what)} holds a value YAML cannot build ({exc}).", path=path) from None
    check_tree(obj, path=path, what=what, max_depth=max_depth, max_nodes=max_nodes, error=error)
    return _expect(obj, expect, path=path, what=what, error=error)


def read_yaml(path: str | os.PathLike, *, what: str = "YAML file", expect: type | None = dict,
              max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES,
              error: type[InputError] = InputError) -> Any:
    """Read and validate a YAML file (JSON is YAML, so this reads both)."""
    text = read_text(path, what=what, max_bytes=max_bytes, error=error)
    return parse_yaml(text, path=path, what=what, expect=expect, max_depth=max_depth, max_nodes=max_nodes, error=error)


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
             list: "a list", type(None): "null"}
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(names.get(x, x.__name__) for x in ts)


def field(doc: dict, key: str, kind: type | tuple[type, ...], *, path: str | os.PathLike | None, what: str,
          default: Any = _MISSING, minimum: float | None = None, maximum: float | None = None,
          exclusive_minimum: bool = False, check: Callable[[Any], str | None] | None = None,
          error: type[InputError] = InputError) -> Any:
    """One typed field of a parsed document, range-checked, named on failure.

    ``int`` fields refuse booleans and floats; ``float`` fields accept integers and refuse
    NaN and infinities. ``check(value)`` may return a problem sentence.
    """
    if key not in doc or (doc[key] is None and default is not _MISSING):
        if default is _MISSING:
            raise error(f"{_where(path, what)} has no `{key}` field.", path=path)
        return default
    value = doc[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = False
    for k in kinds:
        if k is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = True
            if not math.isfinite(value):
                raise error(f"{_where(path, what)} has `{key}` = {value!r}; it must be a finite number.", path=path)
        elif k is int and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        elif k not in (int, float) and isinstance(value, k):
            ok = True
        if ok:
            break
    if not ok:
        raise error(f"{_where(path, what)} has `{key}` = {value!r}; it must be {_type_name(kind)}.", path=path)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if minimum is not None and (value < minimum or (exclusive_minimum and value == minimum)):
            bound = f"greater than {minimum:g}" if exclusive_minimum else f"at least {minimum:g}"
            raise error(f"{_where(path, what)} has `{key}` = {value!r}; it must be {bound}.", path=path)
        if maximum is not None and value > maximum:
            raise error(f"{_where(path, what)} has `{key}` = {value!r}; it must be at most {maximum:g}.", path=path)
    if check is not None:
        problem = check(value)
        if problem:
            raise error(f"{_where(path, what)} has `{key}` = {value!r}: {problem}.", path=path)
    return value
