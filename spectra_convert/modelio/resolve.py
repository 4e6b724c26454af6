"""Resolving MODEL to a local folder: the folder itself, or a snapshot from the Hugging Face Hub cache.

The only place the converters touch the Hub for reading; every failure is one line that says what to pass
instead (a local folder), never a network traceback (docs/ARCHITECTURE.md, "Model folders and files").
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


# ---------------------------------------------------------------------------------------------------------------
# Resolving MODEL and reading its config
# ---------------------------------------------------------------------------------------------------------------


def _looks_like_hub_id(model: str) -> bool:
    return bool(_HUB_ID.fullmatch(model)) and ".." not in model and not model.startswith(".")


def resolve_model_dir(model: str, *, allow_patterns: list[str] | None = None, download: bool = True,
                      what: str = "") -> Path:
    """A local model folder for ``model``: the folder itself, or a Hub snapshot in the HF cache.

    A path that exists must be a folder. A missing path that looks like a Hub id (``org/name``) is fetched with
    ``huggingface_hub.snapshot_download``; any failure to reach the Hub (offline, no network) is one line that
    tells the user to pass a local folder instead. ``download=False`` (validate) only looks in the local
    cache. ``what`` names the argument in errors (e.g. ``--parent``).
    """
    label = f"{what} {model}" if what else str(model)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{label}: not a folder; pass a model folder (the one that holds config.json) or a "
                            "Hugging Face Hub id")
        return path.resolve()
    if not _looks_like_hub_id(model):
        raise UserError(f"{label}: no such folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    patterns = allow_patterns or ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    if not download:
        try:
            return Path(snapshot_download(model, allow_patterns=patterns, local_files_only=True)).resolve()
        except Exception:  # any failure means "not available offline"
            raise UserError(f"{label}: not a local folder and not in the local Hugging Face cache; download it "
                            "first or pass a local folder") from None
    try:
        return Path(snapshot_download(model, allow_patterns=patterns)).resolve()
    except RepositoryNotFoundError:
        raise UserError(f"{label}: no such local folder and no such model on the Hugging Face Hub") from None
    except Exception as exc:  # any network/offline/cache failure: the fix is the same
        raise UserError(
            f"{label}: no such local folder, and cannot download {model!r} from the Hugging Face Hub (offline?): "
            f"pass a local model folder ({type(exc).__name__})"
        ) from None

