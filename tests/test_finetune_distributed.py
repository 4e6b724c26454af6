"""finetune under ``accelerate launch`` with two CPU processes (gloo): both ranks end with the same routers.

Launch line (documented in recipes/accelerate/cpu-2proc.yaml):
``accelerate launch --config_file recipes/accelerate/cpu-2proc.yaml -m spectra_convert finetune ...``.
The tiny model has random weights: this checks rank agreement and plumbing, not quality.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.finetune_helpers import build_tiny_model, write_corpus

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = REPO / ".venv" / "bin" / "accelerate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_agree_on_router_weights(tmp_path):
    build_tiny_model(tmp_path / "model")
    write_corpus(tmp_path / "train.jsonl")
    out = tmp_path / "out"
    cmd = [str(ACCELERATE), "launch", "--config_file", str(REPO / "recipes/accelerate/cpu-2proc.yaml"),
           "--main_process_port", str(_free_port()), "-m", "spectra_convert", "finetune", str(tmp_path / "model"),
           "--data", str(tmp_path / "train.jsonl"), "-o", str(out), "--mode", "router", "--steps", "4",
           "--seq-len", "64", "--batch-size", "2", "--grad-accum", "2", "--save-every", "2", "--log-every", "2",
           "--lr-router", "1e-2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["world_size"] == 2
    digests = summary["rank_router_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # parameters and dual biases identical on both ranks

    before = load_file(str(tmp_path / "model" / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(".mlp.gate." in k for k in changed)


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_accelerate_recipes_parse(recipe):
    """Every shipped accelerate config loads with accelerate's own loader and names its launch line."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(recipe))
    assert config.num_processes >= 2
    assert "-m spectra_convert finetune" in recipe.read_text()
    if "a100x8" in recipe.name:
        assert config.num_processes == 8 and config.mixed_precision == "bf16"
