"""Checks that come before the expensive work: ``push`` asks the Hub about the token before hashing
gigabytes; ``upcycle`` / ``reroute`` / ``finetune`` compare the expected output size with the free disk space
before writing, and refuse in one line that gives both numbers.

The "too big" cases are real: a parent whose config.json describes a model far larger than the disk (nothing is
read beyond it before the check), and checkpoints whose weight files are sparse files larger than the free
space (they take no disk; their size is what the check reads).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spectra_convert.errors import UserError
from tests.fakehub import FakeHub

TOKEN = "hf_preflight_token"


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _assert_space_error(message: str) -> None:
    assert "not enough free disk space" in message, message
    numbers = [int(n) for n in re.findall(r"\((\d+) bytes\)", message)]
    assert len(numbers) == 2 and numbers[0] > numbers[1], message  # needed > free, both stated


def test_push_checks_the_token_before_hashing(monkeypatch, tmp_path: Path) -> None:
    """A wrong or missing token fails before a single byte is hashed (the manifest is never computed)."""
    from spectra_convert import hub
    from spectra_convert.modeling.configuration_spectra import SpectraConfig
    from spectra_convert.modeling.modeling_spectra import SpectraForCausalLM
    from spectra_convert.modelcard import write_model_card
    from tests.conftest import tiny_parent_config

    folder = tmp_path / "model"
    config = SpectraConfig(text_config=tiny_parent_config("llama").to_dict(),
                           spectra={"num_experts": 4, "top_k": 2, "router_dim": 16})
    SpectraForCausalLM(config).save_pretrained(folder)
    write_model_card(folder, base_model=None)
    hashed: list[int] = []
    real = hub.manifest
    monkeypatch.setattr(hub, "manifest", lambda *a, **k: hashed.append(1) or real(*a, **k))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the fake speaks classic LFS (read at import)
    with FakeHub(token=TOKEN) as fake:
        monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
        with pytest.raises(UserError, match=r"authentication failed \(HTTP 401\)") as info:
            hub.push(folder, "me/tiny", endpoint=fake.endpoint)
        assert "hf_wrong_token" not in str(info.value)
        assert [r.path for r in fake.requests] == ["/api/whoami-v2"]
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
        with pytest.raises(UserError, match="no Hugging Face token found"):
            hub.push(folder, "me/tiny", endpoint=fake.endpoint)
        assert hashed == []
        monkeypatch.setenv("HF_TOKEN", TOKEN)  # the right token: hashed once, then committed
        hub.push(folder, "me/tiny", endpoint=fake.endpoint)
    assert hashed == [1] and len(fake.commits) == 1


@pytest.mark.slow
def test_upcycle_refuses_an_output_larger_than_the_free_disk_in_one_line(tmp_path: Path) -> None:
    """A real llama config.json of a 70B-sized parent, upcycled to 64 experts: ~14 TB of experts."""
    parent = tmp_path / "big-llama"
    parent.mkdir()
    (parent / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192,
        "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": 32000}))
    out = tmp_path / "big-64x"
    done = subprocess.run([sys.executable, "-m", "spectra_convert", "upcycle", str(parent), "-o", str(out),
                           "--experts", "64", "--top-k", "2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    _assert_space_error(done.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big-llama"]  # nothing written, no temp folder


def test_reroute_refuses_when_the_rewritten_shards_do_not_fit(tmp_path: Path) -> None:
    from spectra_convert.modelio.checkpoint import CheckpointReader
    from spectra_convert.surgery.reroute import reroute
    from tests.tiny_checkpoints import save_tiny_moe

    parent = tmp_path / "mixtral"
    save_tiny_moe("mixtral", parent)
    reader = CheckpointReader(parent)
    gate_shard = next(s for s in reader.shards if any(k.endswith("gate.weight") for k in reader.keys_in(s)))
    os.truncate(gate_shard, _free(tmp_path) + 2**30)  # sparse: the header stays valid, no block is allocated
    with pytest.raises(UserError) as info:
        reroute(str(parent), tmp_path / "out", calibration_tokens=256, router_dim=16)
    _assert_space_error(str(info.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixtral"]


def test_finetune_refuses_a_full_model_output_that_does_not_fit(tmp_path: Path) -> None:
    from spectra_convert.finetune import finetune
    from tests.finetune_helpers import build_tiny_model, write_corpus

    model = build_tiny_model(tmp_path / "model")
    data = write_corpus(tmp_path / "train.jsonl", names=["textwrap.py"])
    weights = next(model.glob("*.safetensors"))
    os.truncate(weights, _free(tmp_path) + 2**30)
    with pytest.raises(UserError) as info:
        finetune(model, data, tmp_path / "out", mode="router", steps=1, seq_len=64)
    _assert_space_error(str(info.value))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
