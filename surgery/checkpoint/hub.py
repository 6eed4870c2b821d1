"""Hugging Face Hub pull and push through ``huggingface_hub`` (its cache, token and
``HF_HUB_OFFLINE`` handling). Tokens are never logged or put into messages."""

from __future__ import annotations

import re
from pathlib import Path

from ..core.errors import HubError, UsageError

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# Only what a safetensors checkpoint needs: never pickles.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja", "README.md"]


def looks_like_repo_id(text: str) -> bool:
    """True for ``org/name`` or ``org/name@revision``."""
    return bool(_REPO_RE.match(text))


def pull(repo_id: str, revision: str | None = None) -> Path:
    """Resolve a Hub model repository to a local snapshot folder.

    Honours ``HF_HUB_OFFLINE`` (served from the cache) and huggingface_hub's usual token
    lookup. Only safetensors, JSON and tokenizer files are fetched.

    Raises:
        HubError: The repository or revision cannot be had (offline and not cached, missing, private).
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as exc:  # huggingface_hub raises many types; all mean "cannot have it"
        rev = f" at revision {revision}" if revision else ""
        raise HubError(
            f"Hub repository {repo_id}{rev} could not be fetched ({type(exc).__name__}: {_scrub(str(exc))}); "
            f"check the id, your token, or unset HF_HUB_OFFLINE.", path=repo_id) from exc


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None) -> str:
    """Upload a checkpoint folder to a Hub model repository in one commit.

    Creates the repository (and branch) if needed.

    Returns:
        The URL of the commit.

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
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=commit_message or f"Upload {folder.name} with surgery")
    except Exception as exc:
        raise HubError(f"pushing {folder} to {repo_id} failed ({type(exc).__name__}: {_scrub(str(exc))}).",
                       path=folder) from exc
    return str(getattr(info, "commit_url", info))


def _scrub(text: str) -> str:
    """Remove anything that looks like a token from a message."""
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text).splitlines()[0][:300] if text else ""
