"""Architecture adapters, checked against what transformers 5 really writes and computes.

Tiny random-weight configs of real architectures (structural tests: weights are random)."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_parent_config
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from spectra_convert.errors import UserError
from spectra_convert.modeling.configuration_spectra import DENSE_PARENTS, MOE_PARENTS
from spectra_convert.modeling.modeling_spectra import SpectraExperts
from spectra_convert.modelio.adapters import ADAPTERS, DENSE_TYPES, MOE_TYPES, MoeAdapter, adapter_for


def test_registry_covers_every_runtime_parent() -> None:
    assert set(DENSE_TYPES) == set(DENSE_PARENTS)
    assert set(MOE_TYPES) == set(MOE_PARENTS)
    assert all(ADAPTERS[t].is_moe for t in MOE_TYPES) and not any(ADAPTERS[t].is_moe for t in DENSE_TYPES)


def test_unsupported_architecture_is_one_line_listing_supported() -> None:
    with pytest.raises(UserError) as info:
        adapter_for(AutoConfig.for_model("bert"))
    message = str(info.value)
    assert "\n" not in message and "unsupported architecture 'bert'" in message
    for name in ("gpt2", "llama", "mixtral", "qwen2_moe", "olmoe"):
        assert name in message


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_moe_on_disk_names_match_save_pretrained(model_type: str, tmp_path) -> None:
    config = tiny_parent_config(model_type)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    adapter = adapter_for(config)
    assert isinstance(adapter, MoeAdapter)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for i in range(config.num_hidden_layers):
            assert adapter.gate_key(i) in keys
            assert tuple(f.get_slice(adapter.gate_key(i)).get_shape()) == (4, config.hidden_size)
            assert adapter.router_prefix(i) + "weight" == adapter.gate_key(i)
            for e in range(adapter.num_experts(config)):
                for role in ("gate", "up", "down"):
                    assert adapter.expert_key(i, e, role) in keys
    # qwen2_moe's shared_expert_gate is a different tensor from the router and is not what gate_key names
    gates = {adapter.gate_key(i) for i in range(config.num_hidden_layers)}
    assert not any("shared_expert_gate" in g for g in gates)
    assert adapter.num_experts(config) == 4 and adapter.top_k(config) == 2


def test_mixtral_module_keys_map_legacy_names() -> None:
    adapter = ADAPTERS["mixtral"]
    assert adapter.to_module_key("model.layers.3.block_sparse_moe.gate.weight") == "model.layers.3.mlp.gate.weight"
    assert adapter.mlp_prefix(3) == "model.layers.3.mlp."


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt2"])
def test_dense_ffn_as_one_expert_equals_parent_ffn(model_type: str) -> None:
    """ffn_tensors() in SpectraExperts layout computes exactly the parent's FFN (gpt2 Conv1D transposed)."""
    torch.manual_seed(0)
    config = tiny_parent_config(model_type)
    model = AutoModelForCausalLM.from_config(config).eval()
    adapter = adapter_for(config)
    state = model.state_dict()
    tensors = adapter.ffn_tensors(state.__getitem__, 1)
    inter, hidden = adapter.intermediate_size(config), config.hidden_size
    expert = SpectraExperts(1, hidden, inter, adapter.expert_kind, adapter.activation(config))
    names = {"gate_up": "gate_up_proj", "down": "down_proj", "up": "up_proj", "up_bias": "up_bias", "down_bias": "down_bias"}
    with torch.no_grad():
        for name, tensor in tensors.items():
            getattr(expert, names[name]).copy_(tensor.unsqueeze(0))
        layers = model.transformer.h if model_type == "gpt2" else model.model.layers
        x = torch.randn(5, hidden)
        assert torch.allclose(expert.expert(0, x), layers[1].mlp(x), atol=1e-6)
    assert all(k.startswith(adapter.mlp_prefix(1)) for k in state if ".1.mlp." in k)
    assert {name: tuple(t.shape) for name, t in tensors.items()} == adapter.ffn_shapes(config)
    if model_type == "gpt2":
        assert tensors["up"].shape == (inter, hidden) and tensors["down"].shape == (hidden, inter)
    else:
        assert tensors["gate_up"].shape == (2 * inter, hidden) and tensors["down"].shape == (hidden, inter)
