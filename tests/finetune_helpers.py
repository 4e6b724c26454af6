"""Builders for the finetune tests: a real JSONL corpus from Python stdlib sources, a real BPE tokenizer trained
on them, and a tiny random-weight SPECTRA model (llama parent) saved with save_pretrained.

The model's weights are random — these tests check structure (what trains, what is saved, resume and rank
agreement), never quality.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "colorsys.py", "keyword.py",
           "heapq.py", "copy.py", "stat.py"]


def write_corpus(path: Path, names: list[str] = SOURCES, chunk: int = 1500) -> Path:
    """A JSONL of real text: stdlib sources cut into ~1500-character records."""
    with open(path, "w", encoding="utf-8") as handle:
        for name in names:
            text = (STDLIB / name).read_text(encoding="utf-8")
            for start in range(0, len(text), chunk):
                handle.write(json.dumps({"text": text[start:start + chunk], "domain": "python"}) + "\n")
    return path


def build_tokenizer(vocab_size: int = 320):
    from tests.bpe import train_byte_bpe

    return train_byte_bpe(vocab_size, SOURCES, unk="<unk>", eos="<eos>", pad="<eos>")


def build_tiny_model(path: Path, *, seed: int = 0, experts: int = 4, top_k: int = 2, hidden: int = 32,
                     layers: int = 2, router_dim: int = 16) -> Path:
    """Save a tiny random SPECTRA model (llama parent) + tokenizer to ``path``."""
    import torch

    from spectra_convert.modeling.configuration_spectra import SpectraConfig
    from spectra_convert.modeling.modeling_spectra import SpectraForCausalLM

    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    text_config = dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config = SpectraConfig(text_config=text_config,
                           spectra={"num_experts": experts, "top_k": top_k, "router_dim": router_dim})
    torch.manual_seed(seed)
    model = SpectraForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def folder_weights(folder: Path):
    """Every tensor of a model folder's safetensors shards, by name (to compare folders before/after)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
