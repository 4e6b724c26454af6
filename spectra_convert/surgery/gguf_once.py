"""Parse a GGUF file once while transformers loads its config, tokenizer and weights.

Why: for architectures on transformers' legacy GGUF path (llama among them in transformers 5.x), each of
``AutoConfig``, ``AutoTokenizer`` and ``AutoModelForCausalLM.from_pretrained(gguf_file=...)`` builds its own
``gguf.GGUFReader`` — which walks every metadata field, a 49k-token vocabulary included, as numpy views —
and the weight-name mapping rebuilds ``gguf``'s tensor-name table once per module. On SmolLM2-135M that is
about 10 s of a 37 s upcycle, for a file that never changes during the load.

``parsed_once()`` makes ``gguf.GGUFReader`` return one reader per (file, mode, size, mtime) and memoises
``gguf.get_tensor_name_map`` for the duration of the block only, then restores both, so code outside the
block (the user's own) sees the library untouched. transformers imports both names at call time
(``from gguf import ...`` inside its functions), which is what makes the substitution visible to it.
Readers are opened read-only (``mode='r'``) and never mutated by transformers, so sharing one is safe.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def parsed_once() -> Iterator[None]:
    """Within the block, repeated GGUF parses of the same unchanged file reuse the first one."""
    try:
        import gguf
    except ImportError:  # transformers raises its own clear error when gguf is missing
        yield
        return
    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str, int, int], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        if mode != "r":
            return original_reader(path, mode)
        stat = os.stat(path)
        key = (os.path.realpath(path), mode, stat.st_size, stat.st_mtime_ns)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map
