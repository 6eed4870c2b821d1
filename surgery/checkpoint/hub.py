"""Hugging Face Hub pull, header-only reading and push through ``huggingface_hub`` (its
cache, token and ``HF_HUB_OFFLINE`` handling). Tokens are never logged or put into messages.
Nothing here imports torch."""

from __future__ import annotations

import fnmatch
import os
import re
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..core.errors import CorruptCheckpointError, HubError, UsageError
from ..core.progress import Progress, ensure

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# What a safetensors checkpoint needs: weights, index, config, generation and tokenizer files.
ALLOW_PATTERNS = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "tokenizer.model", "*.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                  "chat_template.json", "preprocessor_config.json"]
# Never fetched, whatever --include says: pickles and other frameworks' weights.
NEVER_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.h5", "*.msgpack", "*.onnx",
                  "*.gguf", "*.ot", "*.joblib"]
# A safetensors header larger than this is refused before it is fetched (as for local files).
MAX_HEADER_BYTES = 100_000_000
FIRST_RANGE = 64 * 1024


def looks_like_repo_id(text: str) -> bool:
    """True for ``org/name`` or ``org/name@revision``."""
    return bool(_REPO_RE.match(text))


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks huggingface_hub to use the local cache only."""
    import sys

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    constants = sys.modules.get("huggingface_hub.constants")  # read once at its import
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _fix_hint() -> str:
    if offline():
        return "HF_HUB_OFFLINE is set, so only the local cache was searched: unset it to download."
    return "check the id and revision, and your token (HF_TOKEN or `hf auth login`) for private repositories."


def _hub_error(what: str, repo_id: str, revision: str | None, exc: BaseException) -> HubError:
    rev = f" at revision {revision}" if revision else ""
    return HubError(f"Hub repository {repo_id}{rev} {what} ({type(exc).__name__}: {_scrub(str(exc))}); "
                    f"{_fix_hint()}", path=repo_id)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(Path(name).name, p) for p in patterns)


def select_files(names: list[str], include: list[str] | None = None, exclude: list[str] | None = None) -> list[str]:
    """The repository files ``pull`` fetches: those matching ``include`` (default: the
    checkpoint files of :data:`ALLOW_PATTERNS`), minus ``exclude``, never pickles."""
    allow = list(include) if include else ALLOW_PATTERNS
    return sorted(n for n in names if _matches(n, allow) and not _matches(n, list(exclude or []))
                  and not _matches(n, NEVER_PATTERNS))


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub's own progress bars off for the call (ours go through Progress)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            enable_progress_bars()


def _bytes_bar(progress: Progress, counter: list[int]):
    """A tqdm class that forwards byte counts to ``progress`` and prints nothing."""
    from tqdm.auto import tqdm

    class Bar(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            step = int(n or 0)
            counter[0] += step
            progress.advance(step)
            return None

    return Bar


def pull(repo_id: str, revision: str | None = None) -> Path:
    """Resolve a Hub model repository to a local snapshot folder (checkpoint files only).

    Honours ``HF_HUB_OFFLINE`` (served from the cache) and huggingface_hub's usual token
    lookup.

    Raises:
        HubError: The repository or revision cannot be had (offline and not cached, missing, private).
    """
    from huggingface_hub import snapshot_download

    try:
        with _quiet_hub():
            return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                          ignore_patterns=NEVER_PATTERNS))
    except Exception as exc:  # huggingface_hub raises many types; all mean "cannot have it"
        raise _hub_error("could not be fetched", repo_id, revision, exc) from exc


def pull_files(repo_id: str, revision: str | None = None, *, include: list[str] | None = None,
               exclude: list[str] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Download a repository's checkpoint files into the Hugging Face cache, with progress
    in bytes. Offline (``HF_HUB_OFFLINE``), the cached snapshot is used.

    Returns:
        ``repo_id``, ``revision`` (the commit), ``snapshot`` (the cache folder), ``files``
        (name and size of each file fetched or found in the cache), ``total_bytes``.

    Raises:
        HubError: The repository, revision or files cannot be had.
        UsageError: The patterns select no file.
    """
    from huggingface_hub import HfApi, hf_hub_download

    progress = ensure(progress)
    if offline():
        snapshot = pull(repo_id, revision)
        files = [{"name": str(p.relative_to(snapshot)), "bytes": p.stat().st_size}
                 for p in sorted(snapshot.rglob("*")) if p.is_file()]
        chosen = set(select_files([f["name"] for f in files], include, exclude))
        files = [f for f in files if f["name"] in chosen]
        return {"repo_id": repo_id, "revision": snapshot.name, "snapshot": str(snapshot), "files": files,
                "total_bytes": sum(f["bytes"] for f in files)}
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:
        raise _hub_error("could not be found", repo_id, revision, exc) from exc
    sizes = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
    names = select_files(list(sizes), include, exclude)
    if not names:
        raise UsageError(f"Hub repository {repo_id} has no file matching the patterns "
                         f"({', '.join(include or ALLOW_PATTERNS)}"
                         + (f", minus {', '.join(exclude)}" if exclude else "") + "); pickles are never fetched.",
                         path=repo_id)
    commit = info.sha or revision
    total = sum(sizes[n] for n in names)
    progress.start(total, f"pulling {repo_id}")
    snapshot: Path | None = None
    try:
        with _quiet_hub():
            for name in names:
                counter = [0]
                try:
                    local = hf_hub_download(repo_id, name, revision=commit, tqdm_class=_bytes_bar(progress, counter))
                except Exception as exc:
                    raise _hub_error(f"file {name} could not be downloaded", repo_id, revision, exc) from exc
                if counter[0] < sizes[name]:  # served from the cache: no bytes went through the bar
                    progress.advance(sizes[name] - counter[0])
                snapshot = Path(local).parents[len(Path(name).parts) - 1]
    finally:
        progress.close()
    return {"repo_id": repo_id, "revision": commit, "snapshot": str(snapshot),
            "files": [{"name": n, "bytes": sizes[n]} for n in names], "total_bytes": total}


# ------------------------------------------------------------------------------ header-only reading

def _range(url: str, start: int, stop: int, headers: dict[str, str]) -> bytes:
    """Bytes ``[start, stop)`` of a Hub file through an HTTP range request (redirects
    followed). A server that ignores the range is read only as far as needed, never whole."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    h = dict(headers)
    h["Range"] = f"bytes={start}-{stop - 1}"
    with get_session().stream("GET", url, headers=h, follow_redirects=True) as r:
        if r.status_code >= 400:
            r.read()  # the error body, for the message
        hf_raise_for_status(r)
        skip = start if r.status_code == 200 else 0  # 200: the body starts at byte 0
        want = skip + (stop - start)
        buf = bytearray()
        for chunk in r.iter_bytes():
            buf += chunk
            if len(buf) >= want:
                break
    return bytes(buf[skip:want])


def fetch_headers(repo_id: str, revision: str | None, folder: Path) -> dict[str, Any]:
    """Mirror a Hub checkpoint's safetensors *headers* into ``folder`` without its weights.

    Each safetensors file becomes a sparse local file of the remote size holding only the
    remote header bytes (fetched with HTTP range requests: the 8-byte length, then the
    JSON), so the local header validation applies unchanged and no tensor data is
    downloaded; ``config.json`` and the shard index are fetched whole (they are small).
    What the folder holds must only be inspected: its tensor bytes are zeros.

    Returns:
        ``revision`` (commit), ``header_bytes`` fetched, ``files`` (name and remote size).

    Raises:
        HubError: The repository cannot be read or holds no safetensors files.
        CorruptCheckpointError: A remote header declares an impossible length.
    """
    import json

    from huggingface_hub import HfApi, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:
        raise _hub_error("could not be found", repo_id, revision, exc) from exc
    sizes = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
    commit = info.sha or revision
    small = [n for n in ("config.json", "model.safetensors.index.json") if n in sizes]
    for name in small:
        try:
            with _quiet_hub():
                src = hf_hub_download(repo_id, name, revision=commit)
        except Exception as exc:
            raise _hub_error(f"file {name} could not be downloaded", repo_id, revision, exc) from exc
        (folder / name).write_bytes(Path(src).read_bytes())
    if "model.safetensors.index.json" in sizes:
        try:
            wm = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(wm.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise CorruptCheckpointError(f"{repo_id}: model.safetensors.index.json is not a valid index ({exc}).",
                                         path=repo_id) from exc
    elif "model.safetensors" in sizes:
        shards = ["model.safetensors"]
    else:
        shards = sorted(n for n in sizes if n.endswith(".safetensors") and "/" not in n)[:1]
    if not shards:
        raise HubError(f"Hub repository {repo_id} holds no safetensors weights at its top level; "
                       f"surgery reads safetensors checkpoints only.", path=repo_id)
    headers = build_hf_headers()
    fetched = 0
    for shard in shards:
        if "/" in shard or shard not in sizes:
            raise CorruptCheckpointError(f"{repo_id}: the index names shard {shard!r}, which the repository does "
                                         f"not hold at its top level.", path=repo_id)
        size = sizes[shard]
        url = hf_hub_url(repo_id, shard, revision=commit)
        try:
            first = _range(url, 0, min(size, FIRST_RANGE), headers)
            if len(first) < 8:
                raise CorruptCheckpointError(f"{repo_id}/{shard} is not a safetensors file: it has {size} bytes.",
                                             path=f"{repo_id}/{shard}")
            (hlen,) = struct.unpack("<Q", first[:8])
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise CorruptCheckpointError(
                    f"{repo_id}/{shard} declares a {hlen}-byte header in a {size}-byte file: it is corrupt or not "
                    f"safetensors.", path=f"{repo_id}/{shard}")
            fetched += len(first)
            data = first[:8 + hlen]
            if len(data) < 8 + hlen:  # a header longer than the first range: fetch the rest of it
                rest = _range(url, len(data), 8 + hlen, headers)
                fetched += len(rest)
                data += rest
        except (CorruptCheckpointError, HubError):
            raise
        except Exception as exc:
            raise _hub_error(f"file {shard} could not be read", repo_id, revision, exc) from exc
        local = folder / shard
        with open(local, "wb") as fh:
            fh.truncate(size)  # sparse: the tensor bytes take no space and are never read
            fh.write(data[:8 + hlen])
    return {"revision": commit, "header_bytes": fetched, "files": [{"name": s, "bytes": sizes[s]} for s in shards]}


# ------------------------------------------------------------------------------ push

def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None, include: list[str] | None = None,
         exclude: list[str] | None = None, create_pr: bool = False) -> str:
    """Upload a checkpoint folder to a Hub model repository in one commit.

    Creates the repository (and, unless ``create_pr``, the branch ``revision``) if needed.

    Args:
        include, exclude: Glob patterns of the files to upload / leave out.
        create_pr: Open a pull request (against ``revision`` or main) instead of committing.

    Returns:
        The URL of the commit (or of the pull request).

    Raises:
        UsageError: ``folder`` is not a folder.
        HubError: The Hub refused or could not be reached.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; push uploads a checkpoint folder.", path=folder)
    api = HfApi(token=token)
    try:
        # private=False would force a public repo even where the organisation defaults to private
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with _quiet_hub():
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                     commit_message=commit_message or f"Upload {folder.name} with surgery",
                                     allow_patterns=include or None, ignore_patterns=exclude or None,
                                     create_pr=create_pr or None)
    except Exception as exc:
        raise HubError(f"pushing {folder} to {repo_id} failed ({type(exc).__name__}: {_scrub(str(exc))}).",
                       path=folder) from exc
    url = getattr(info, "pr_url", None) if create_pr else None
    return str(url or getattr(info, "commit_url", info))


def _scrub(text: str) -> str:
    """Remove anything that looks like a token from a message."""
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text).splitlines()[0][:300] if text else ""
