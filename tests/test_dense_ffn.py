"""FFN weights read straight from checkpoint files equal the loaded model's, for every dense architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import tiny_parent_config
from transformers import AutoModelForCausalLM

from spectra_convert.modelio.adapters import DENSE_TYPES, adapter_for
from spectra_convert.modelio.dense_ffn import ffn_getter
from spectra_convert.modelio.gguf_once import parsed_once


def assert_same_ffns(getter, model, adapter) -> None:
    state = model.state_dict()
    for i in range(adapter.num_layers(model.config)):
        from_files = adapter.ffn_tensors(getter, i)
        from_model = adapter.ffn_tensors(state.__getitem__, i)
        assert from_files.keys() == from_model.keys()
        for name in from_model:
            assert from_files[name].dtype == torch.float32
            assert torch.equal(from_files[name], from_model[name].float()), (i, name)


@pytest.mark.parametrize("model_type", DENSE_TYPES)
def test_safetensors_ffns_equal_the_loaded_model(model_type: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = tiny_parent_config(model_type)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="100KB")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    getter = ffn_getter(tmp_path, None, adapter_for(config))
    assert getter is not None
    assert_same_ffns(getter, model, adapter_for(config))


def test_hub_style_gpt2_keys_without_the_base_prefix(tmp_path: Path) -> None:
    """gpt2 / gpt2-medium on the Hub store ``h.0.mlp.c_fc.weight``, not ``transformer.h.0...``."""
    torch.manual_seed(0)
    config = tiny_parent_config("gpt2")
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in weights.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_ffns(ffn_getter(tmp_path, None, adapter_for(config)), model, adapter_for(config))


def test_missing_ffn_tensor_means_no_early_reader(tmp_path: Path) -> None:
    """A checkpoint whose FFN keys do not resolve is left to the model load (upcycle builds from the model)."""
    torch.manual_seed(0)
    config = tiny_parent_config("llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k.replace("gate_proj", "w1"): v for k, v in weights.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    assert ffn_getter(tmp_path, None, adapter_for(config)) is None


@pytest.mark.slow
def test_gguf_ffns_equal_the_dequantised_model(smollm2_gguf: Path) -> None:
    from spectra_convert.modelio.config import read_parent_config
    from spectra_convert.modelio.parent import load_dense_parent

    with parsed_once():
        config = read_parent_config(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
        getter = ffn_getter(smollm2_gguf.parent, smollm2_gguf.name, adapter_for(config))
        model, _ = load_dense_parent(smollm2_gguf.parent, smollm2_gguf.name, torch.float32, config=config)
    assert getter is not None
    assert_same_ffns(getter, model, adapter_for(config))


@pytest.mark.parametrize("model_type", DENSE_TYPES)
def test_config_from_files_gives_transformers_layout(model_type: str, tmp_path: Path) -> None:
    """Noise and experts start from config.json alone (before transformers is imported): same layer count and
    FFN shapes as transformers' config of the same folder."""
    from transformers import AutoConfig

    from spectra_convert.modelio.dense_ffn import config_from_files

    tiny_parent_config(model_type, num_hidden_layers=3).save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    from_files = config_from_files(tmp_path, None)
    adapter = adapter_for(loaded)
    assert adapter_for(from_files) is adapter
    assert adapter.num_layers(from_files) == adapter.num_layers(loaded) == 3
    assert adapter.ffn_shapes(from_files) == adapter.ffn_shapes(loaded)


def test_config_from_files_leaves_class_defaults_to_transformers(tmp_path: Path) -> None:
    import json

    from spectra_convert.modelio.dense_ffn import config_from_files

    tiny_parent_config("llama").save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["intermediate_size"]  # LlamaConfig would fill in its default: only transformers knows it
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert config_from_files(tmp_path, None) is None


def test_config_from_files_reads_gguf_metadata(smollm2_gguf: Path) -> None:
    from spectra_convert.modelio.config import read_parent_config
    from spectra_convert.modelio.dense_ffn import config_from_files

    with parsed_once():
        from_files = config_from_files(smollm2_gguf.parent, smollm2_gguf.name)
        loaded = read_parent_config(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    adapter = adapter_for(loaded)
    assert from_files.model_type == loaded.model_type == "llama"
    assert adapter.num_layers(from_files) == adapter.num_layers(loaded) == 30
    assert adapter.ffn_shapes(from_files) == adapter.ffn_shapes(loaded) == {"gate_up": (3072, 576), "down": (576, 1536)}


def test_gpt2_config_with_both_names_of_a_size_is_left_to_transformers(tmp_path: Path) -> None:
    """gpt2's ``hidden_size`` is an alias of ``n_embd``: with both in config.json only transformers knows which
    one it keeps, so the early read declines; upcycle's layout check turns any disagreement into one line."""
    import json
    from types import SimpleNamespace

    from transformers import AutoConfig

    from spectra_convert.errors import UserError
    from spectra_convert.modelio.dense_ffn import config_from_files
    from spectra_convert.surgery.upcycle import _check_same_layout

    tiny_parent_config("gpt2").save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["hidden_size"] = 2 * raw["n_embd"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert config_from_files(tmp_path, None) is None
    loaded = AutoConfig.from_pretrained(tmp_path)
    adapter = adapter_for(loaded)
    wrong = SimpleNamespace(model_type="gpt2", num_hidden_layers=2, hidden_size=raw["n_embd"], intermediate_size=128,
                            n_inner=128)
    with pytest.raises(UserError, match="check its config.json"):
        _check_same_layout(adapter, wrong, loaded)
