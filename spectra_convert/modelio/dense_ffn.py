"""A dense parent's FFN weights read straight from its checkpoint files, without building the model.

Why: upcycled experts depend only on the dense FFN weights, the noise and the method — not on the model object,
the tokenizer or the routers. Reading the FFNs from the files lets upcycle build and write the experts on a
background thread while the main thread is still importing transformers' modeling code, loading the parent
and capturing router inputs (docs/ARCHITECTURE.md, "Conversions"). The values are exactly those the loaded
model holds (float32): the tests compare them tensor by tensor with ``model.state_dict()`` for every dense architecture and the real
SmolLM2 GGUF.

``config_from_files`` reads the few config values the experts' shapes need (layer count, hidden and
intermediate size) from ``config.json`` or the GGUF metadata, so the noise workers and the builder can start
before transformers is even imported (its config import alone is ~2 s of a ~8 s upcycle on 2 cores).

``ffn_getter`` returns ``None`` when a checkpoint cannot be read this way (e.g. a GGUF of a non-gated
architecture, whose tensors transformers reshapes on load); upcycle then builds from the loaded model instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from .adapters import ADAPTERS, GGUF_ARCHS, DenseAdapter
from .checkpoint import CheckpointReader
from .config import read_raw_config

Getter = Callable[[str], torch.Tensor]

#: module-name -> GGUF tensor-name pieces for the gated (llama-family) FFNs; no permutation applies to FFNs
_GGUF_FFN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")


def ffn_getter(model_dir: Path, gguf_file: str | None, adapter: DenseAdapter) -> Getter | None:
    """A function mapping the parent's module keys (``adapter.ffn_tensors`` asks for them) to float32 tensors
    read from the checkpoint, or ``None`` if this checkpoint needs the model to be built first. Call it inside
    ``GgufParses.active()`` so a GGUF file is parsed once for this and for transformers."""
    getter = _gguf_getter(Path(model_dir) / gguf_file, adapter) if gguf_file else _safetensors_getter(Path(model_dir))
    if getter is None:
        return None
    try:  # probe layer 0: every key the experts need must resolve
        adapter.ffn_tensors(getter, 0)
    except KeyError:
        return None
    return getter


def _safetensors_getter(model_dir: Path) -> Getter:
    reader = CheckpointReader(model_dir)

    def get(name: str) -> torch.Tensor:
        # Older Hub checkpoints (gpt2, gpt2-medium) store keys without the base-model prefix transformers adds.
        for key in (name, name.split(".", 1)[1] if "." in name else name):
            if key in reader:
                return reader.get(key).float()
        raise KeyError(name)

    return get


def _gguf_getter(path: Path, adapter: DenseAdapter) -> Getter | None:
    if adapter.expert_kind != "gated":  # gpt2-style GGUF tensors are transposed/split by transformers on load
        return None
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}

    def get(name: str) -> torch.Tensor:
        match = _GGUF_FFN.match(name)
        tensor = tensors.get(f"blk.{match.group(1)}.ffn_{match.group(2)}.weight") if match else None
        if tensor is None:
            raise KeyError(name)
        return torch.from_numpy(np.copy(gguf.dequantize(tensor.data, tensor.tensor_type))).float()

    return get


def config_from_files(model_dir: Path, gguf_file: str | None) -> SimpleNamespace | None:
    """``model_type``, ``num_hidden_layers``, ``hidden_size`` and ``intermediate_size`` (also as gpt2's
    ``n_inner``) of the parent, read without transformers; enough for ``DenseAdapter.num_layers`` and
    ``ffn_shapes``. ``None`` when a value is not written in the files (then only the transformers config, with
    its class defaults, knows it). A folder that is not a supported model gets ``read_raw_config``'s one-line
    errors; a GGUF file is read inside the caller's ``GgufParses.active()`` (parsed once for everything)."""
    if gguf_file:
        return _gguf_config(Path(model_dir) / gguf_file)
    raw = read_raw_config(Path(model_dir))
    adapter = ADAPTERS[raw["model_type"]]
    if adapter.is_moe:
        return SimpleNamespace(model_type=raw["model_type"])  # enough to refuse it
    if adapter.expert_kind == "mlp":  # gpt2 names
        if {"hidden_size", "num_hidden_layers"} & raw.keys():  # aliases transformers may resolve either way
            return None
        layers, hidden = raw.get("n_layer"), raw.get("n_embd")
        inter = raw.get("n_inner") or (4 * hidden if isinstance(hidden, int) else None)
    else:
        layers, hidden, inter = raw.get("num_hidden_layers"), raw.get("hidden_size"), raw.get("intermediate_size")
    return _layout(raw["model_type"], layers, hidden, inter)


def _layout(model_type: str, layers: object, hidden: object, inter: object) -> SimpleNamespace | None:
    """The config view ``config_from_files`` returns, or ``None`` unless all three sizes are positive ints."""
    if not all(isinstance(v, int) and v > 0 for v in (layers, hidden, inter)):
        return None
    return SimpleNamespace(model_type=model_type, num_hidden_layers=layers, hidden_size=hidden,
                           intermediate_size=inter, n_inner=inter)


def _gguf_config(path: Path) -> SimpleNamespace | None:
    try:
        import gguf

        fields = gguf.GGUFReader(path).fields
        arch = fields["general.architecture"].contents()
        values = [fields[f"{arch}.{key}"].contents() for key in ("block_count", "embedding_length", "feed_forward_length")]
    except Exception:  # any unreadable file: transformers' loader gives the user its own clear error later
        return None
    return _layout(GGUF_ARCHS[arch], *values) if arch in GGUF_ARCHS else None
