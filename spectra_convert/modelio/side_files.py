"""Everything in an output folder besides the weights: the parent's side files (tokenizer, generation
config, chat templates, licence), the shipped SPECTRA runtime and ``config.json`` with its ``auto_map``.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

from .checkpoint import INDEX_NAME

AUTO_MAP = {"AutoConfig": "configuration_spectra.SpectraConfig", "AutoModelForCausalLM": "modeling_spectra.SpectraForCausalLM"}
#: The SPECTRA runtime shipped verbatim in every output folder, and where the package keeps it.
RUNTIME_FILES = ("configuration_spectra.py", "modeling_spectra.py")
RUNTIME_DIR = Path(__file__).resolve().parent.parent / "modeling"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt", ".onnx", ".npz")
_NOT_COPIED = {"config.json", "README.md", INDEX_NAME, "pytorch_model.bin.index.json"}
_SIDE_DIRS = ("additional_chat_templates",)


def copy_side_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy tokenizer files, generation config, chat templates, licence... (not weights, config.json, code,
    or the parent's README, which the model card replaces). Returns the names copied."""
    copied = []
    for path in sorted(Path(src_dir).iterdir()):
        name = path.name
        if name.startswith(".") or name in _NOT_COPIED:
            continue
        if path.is_dir():
            if name in _SIDE_DIRS:
                shutil.copytree(path, Path(dst_dir) / name)
                copied.append(name + "/")
            continue
        if path.suffix in _WEIGHT_SUFFIXES or path.suffix == ".py" or name.endswith(".index.json"):
            continue
        shutil.copyfile(path, Path(dst_dir) / name)
        copied.append(name)
    return copied


def write_runtime_files(dst_dir: Path) -> None:
    """Ship the SPECTRA runtime (``configuration_spectra.py``, ``modeling_spectra.py``) inside the folder."""
    for name in RUNTIME_FILES:
        shutil.copyfile(RUNTIME_DIR / name, Path(dst_dir) / name)


def write_spectra_config(dst_dir: Path, spectra_config: Any) -> Path:
    """Write ``config.json`` with ``auto_map`` and ``architectures`` so transformers finds the shipped code."""
    config = copy.deepcopy(spectra_config)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["SpectraForCausalLM"]
    path = Path(dst_dir) / "config.json"
    config.to_json_file(path, use_diff=True)
    return path
