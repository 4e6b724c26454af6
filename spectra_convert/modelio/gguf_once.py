"""Parse a GGUF file once while transformers loads its config, tokenizer and weights.

Why: for architectures on transformers' legacy GGUF path (llama among them in transformers 5.x), each of
``AutoConfig``, ``AutoTokenizer`` and ``AutoModelForCausalLM.from_pretrained(gguf_file=...)`` builds its own
``gguf.GGUFReader`` — which walks every metadata field, a 49k-token vocabulary included, as numpy views —
and the weight-name mapping rebuilds ``gguf``'s tensor-name table once per module. On SmolLM2-135M that is
about 10 s of a 37 s upcycle, for a file that never changes during the load.

The reader it builds also keeps its file map as a plain ``numpy.ndarray`` view instead of a ``numpy.memmap``:
every slice of a memmap runs ``memmap.__array_finalize__`` in Python, and parsing a 49k-token vocabulary
takes about a million slices (SmolLM2: reader 1.94 s -> 0.65 s, the vocabulary's values twice as fast to
read). The bytes, the mapping and its read-only flag are the same (the view keeps the memmap alive).

``GgufParses().active()`` makes ``gguf.GGUFReader`` return one reader per (file, mode, size, mtime) and
memoises ``gguf.get_tensor_name_map`` for the duration of the block only, then restores both, so code outside the
block (the user's own) sees the library untouched. transformers imports both names at call time
(``from gguf import ...`` inside its functions), which is what makes the substitution visible to it.
Readers are opened read-only (``mode='r'``) and never mutated by transformers, so sharing one is safe.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


class GgufParses:
    """Remembers the GGUF readers built while ``active()``; reuse them across several ``with`` blocks (upcycle
    reads the config before it checks OUT, and the tokenizer + weights after)."""

    def __init__(self) -> None:
        self._readers: dict[tuple[str, str, int, int], Any] = {}
        self._name_maps: dict[tuple[Any, ...], Any] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block, repeated GGUF parses of the same unchanged file reuse the first one."""
        try:
            import gguf
        except ImportError:  # transformers raises its own clear error when gguf is missing
            yield
            return
        original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map

        def shared_reader(path: Any, mode: str = "r") -> Any:
            if mode != "r":
                return original_reader(path, mode)
            stat = os.stat(path)
            key = (os.path.realpath(path), mode, stat.st_size, stat.st_mtime_ns)
            if key not in self._readers:
                self._readers[key] = _plain_view_reader(original_reader)(path, mode)
            return self._readers[key]

        def shared_name_map(*args: Any) -> Any:
            if args not in self._name_maps:
                self._name_maps[args] = original_name_map(*args)
            return self._name_maps[args]

        gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, shared_name_map
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map


def _plain_view_reader(reader_class: type) -> type:
    """``reader_class`` whose ``data`` (the file's memmap) is stored as a plain ndarray view of it."""
    import numpy as np

    class PlainViewReader(reader_class):  # type: ignore[misc, valid-type]
        def __setattr__(self, name: str, value: Any) -> None:
            if name == "data" and isinstance(value, np.memmap):
                value = value.view(np.ndarray)
            super().__setattr__(name, value)

    return PlainViewReader


@contextlib.contextmanager
def parsed_once() -> Iterator[None]:
    """One-block form of ``GgufParses().active()``."""
    with GgufParses().active():
        yield
