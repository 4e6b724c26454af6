"""The one table of dtype names every verb, recipe and loader accepts.

Users write ``fp32``, ``float32``, ``BF16``... interchangeably; every place that takes a dtype (``upcycle
--dtype``, ``validate --dtype``, recipes, model loading) goes through ``dtype_name`` so the same spellings work
everywhere. This module imports nothing heavy: the CLI builds its ``--dtype`` choices from it before torch loads
(``torch_dtype`` imports torch only when a real dtype object is needed).
"""

from __future__ import annotations

from typing import Any

from .errors import UserError

#: canonical names (torch attribute names), in the order help texts list them
CANONICAL = ("float32", "bfloat16", "float16")
#: every accepted spelling (lower case) -> canonical name
ALIASES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}
#: the spellings shown to users (help, error messages): short and long name of each
SPELLINGS = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


def dtype_name(value: Any, option: str = "--dtype", *, extra: tuple[str, ...] = ()) -> str:
    """The canonical name of ``value`` (any spelling, any case, or a ``torch.dtype``); ``extra`` lists other
    accepted words (e.g. ``auto``), returned lower-cased. One-line ``UserError`` naming ``option`` otherwise."""
    text = str(value).removeprefix("torch.").strip().lower()
    if text in ALIASES:
        return ALIASES[text]
    if text in extra:
        return text
    raise UserError(f"{option} {value!r}: expected one of {', '.join(SPELLINGS + extra)}")


def torch_dtype(value: Any, option: str = "--dtype") -> Any:
    """The ``torch.dtype`` for any accepted spelling (imports torch)."""
    import torch

    return getattr(torch, dtype_name(value, option))
