"""Loading a dense parent model with transformers, from a folder or a GGUF file, ready to be written out again.

A GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf and is not serializable") and has
``config.architectures = None``: the quantizer state is dropped and the architecture set, so its dequantised
tensors and config can be written into a converted folder (docs/ARCHITECTURE.md, "Model folders and files").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UserError


def load_dense_parent(model_dir: Path, gguf_file: str | None, dtype: torch.dtype, config: Any = None):
    """The dense model and tokenizer. GGUF weights are dequantised; its quantizer state is dropped (see above).
    ``config``: the parent config already read (saves transformers a second parse of a GGUF file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **gguf)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, config=config, **gguf)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load the dense model from {model_dir}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    if gguf_file:  # a GGUF-loaded model refuses save_pretrained; we only keep its dequantised tensors
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    return model, tokenizer
