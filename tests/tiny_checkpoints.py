"""Tiny random-weight checkpoints of real MoE architectures, written exactly as transformers writes them.

Structural tests only: the weights are random. The tokenizer is a real byte-level BPE trained on Python
standard-library sources (real text on this machine), sized to the tiny config's vocabulary.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

TOKENIZER_VOCAB = 384
_TOKENIZER_SOURCES = ("textwrap.py", "shlex.py", "fnmatch.py")


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """A real byte-level BPE tokenizer (``PreTrainedTokenizerFast``) trained on stdlib sources."""
    from tests.bpe import train_byte_bpe

    eos = "<|endoftext|>"
    return train_byte_bpe(vocab_size, _TOKENIZER_SOURCES, eos=eos, bos=eos, pad=eos)


def tiny_moe_config(model_type: str, **overrides):
    """Tiny config of a real MoE architecture (2 layers, 4 experts, top-2), vocab matching the tokenizer."""
    from tests.conftest import tiny_parent_config

    settings = dict(vocab_size=TOKENIZER_VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                    tie_word_embeddings=False)
    settings.update(overrides)
    return tiny_parent_config(model_type, **settings)


def save_tiny_moe(model_type: str, folder: Path, *, seed: int = 0, max_shard_size: str = "200KB", **overrides):
    """Save a tiny random MoE model + tokenizer with ``save_pretrained`` (sharded); returns the model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(model_type, **overrides)).eval()
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    build_tokenizer().save_pretrained(folder)
    return model


def folder_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest), plus each file's mode and mtime."""
    sums = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            stat = path.stat()
            sums[str(path.relative_to(folder))] = (
                f"{hashlib.sha256(path.read_bytes()).hexdigest()} {stat.st_mode:o} {stat.st_mtime_ns}"
            )
    return sums
