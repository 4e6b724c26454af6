"""Reading a parent model's config: ``config.json`` checked without transformers, or the full
``PretrainedConfig`` (also from a GGUF file), with one-line errors for folders that are not a supported model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from .adapters import adapter_for


def read_raw_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` as a dict, checked to be a supported parent — without importing transformers (reroute
    reads it to start copying shards while the heavy imports still run)."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise UserError(f"{model_dir}: not a model folder (no config.json)")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_path}: not a valid JSON config ({_first_line(exc)})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise UserError(f"{config_path}: no 'model_type' field; not a transformers model config")
    model_type = raw["model_type"]
    if model_type == "spectra":
        raise UserError(f"{model_dir} is already a SPECTRA model; convert its parent model instead")
    adapter_for(raw)  # a one-line error listing the supported architectures
    return raw


def read_parent_config(model_dir: Path, gguf_file: str | None = None) -> Any:
    """The parent's ``PretrainedConfig``; one-line errors for a folder that is not a (supported) model."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if gguf_file:
        try:
            return AutoConfig.from_pretrained(model_dir, gguf_file=gguf_file)
        except Exception as exc:  # gguf parsing errors come in many types
            raise UserError(f"{model_dir / gguf_file}: cannot read a model config from this GGUF file ({_first_line(exc)})") from None
    raw = read_raw_config(model_dir)
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{model_dir / 'config.json'}: cannot build a {raw['model_type']} config ({_first_line(exc)})") from None


def stored_dtype(model_dir: Path) -> Any:
    """The torch dtype a model folder's ``config.json`` says its weights are stored in (float32 if unsaid), so a
    tool that loads the model in float32 writes it back as it found it."""
    import torch

    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

