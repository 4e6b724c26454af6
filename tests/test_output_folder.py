"""The output folders as a user reads them: the model card's own load snippet runs as written (no interactive
trust_remote_code prompt, no "model of type ``" warning), no local absolute path in a card or adapter config,
files with the user's umask, and LoRA adapters with our card (how to load, merge, publish) that ``push``
publishes when their base is on the Hub and refuses, with a ``--merge`` hint, when it is not.

Tiny random-weight llama-parent models (structure only; their outputs say nothing about quality).
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
import yaml

from spectra_convert.errors import UserError
from tests.conftest import _BLOCK_PACKAGE
from tests.fakehub import FakeHub
from tests.finetune_helpers import build_tiny_model, write_corpus
from tests.study_helpers import build_dense_llama

TOKEN = "hf_output_folder_token"
PEFT_TEMPLATE_MARK = "[More Information Needed]"  # what PEFT's blank README template is full of


def python_block(card: str, heading: str) -> str:
    section = card.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def fresh_python(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """``script`` in a fresh ``python -I`` where spectra_convert is not importable, stdin closed (an
    interactive prompt would fail or show up in the output)."""
    return subprocess.run([sys.executable, "-I", "-c", _BLOCK_PACKAGE + script], cwd=cwd, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("output-folder")


@pytest.fixture(scope="module")
def upcycled(root: Path) -> Path:
    from spectra_convert.surgery.upcycle import upcycle

    dense = build_dense_llama(root / "tiny-llama")
    out = root / "tiny-4x"
    upcycle(str(dense), out, experts=4, top_k=2, router_dim=16, calibration_tokens=256)
    return out


@pytest.fixture(scope="module")
def finetuned(root: Path) -> dict[str, Path]:
    """A LoRA adapter and a router-mode full model fine-tuned from the local folder ``root/model``."""
    from spectra_convert.finetune import finetune

    build_tiny_model(root / "model")
    data = write_corpus(root / "train.jsonl")
    fast = dict(steps=2, seq_len=64, batch_size=4, save_every=0, log_every=1, recalibration_tokens=256)
    finetune(root / "model", data, root / "adapter", mode="lora", lora_r=4, lora_alpha=8, **fast)
    finetune(root / "model", data, root / "routers", mode="router", **fast)
    return {"adapter": root / "adapter", "routers": root / "routers", "base": root / "model"}


@pytest.mark.slow  # a fresh process
def test_the_model_cards_snippet_runs_as_written_without_a_prompt_or_warning(upcycled: Path) -> None:
    card = (upcycled / "README.md").read_text()
    snippet = python_block(card, "## How to load and generate").replace('"OWNER/NAME"', repr(str(upcycled)))
    assert "AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)" in snippet
    done = fresh_python(snippet, upcycled.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "custom code" not in output and "[y/N]" not in output  # no trust_remote_code prompt
    assert "model of type" not in output  # no config fallback warning
    assert done.stdout.strip()  # it generated and printed text
    tokenizer_config = json.loads((upcycled / "tokenizer_config.json").read_text())
    assert tokenizer_config.get("tokenizer_class")  # the tokenizer names its class


def test_no_local_absolute_path_in_a_card_or_adapter_config(upcycled: Path, finetuned: dict[str, Path],
                                                            root: Path) -> None:
    card = (upcycled / "README.md").read_text()
    assert str(root) not in card
    assert next(line for line in card.splitlines() if line.startswith("# ")).startswith("# tiny-llama — SPECTRA")
    assert "base_model" not in yaml.safe_load(card.split("---")[1])  # a local parent is not a Hub base model
    for folder in (finetuned["adapter"], finetuned["routers"]):
        for name in ("README.md", "adapter_config.json", "config.json"):
            if (folder / name).is_file():
                assert str(root) not in (folder / name).read_text(), folder / name
    adapter_config = json.loads((finetuned["adapter"] / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "model"


def test_output_files_get_the_users_umask(finetuned: dict[str, Path], tmp_path: Path) -> None:
    """safetensors' save_file writes 0600 through a temp file; the atomic folder gives every file 0666 - umask."""
    import torch
    from safetensors.torch import save_file

    from spectra_convert.modelio.outdir import atomic_output_dir

    for folder in (finetuned["adapter"], finetuned["routers"]):
        for path in folder.iterdir():
            assert path.stat().st_mode & 0o777 == 0o666 & ~_umask(), path
    parent_shard = tmp_path / "parent.safetensors"  # an input's file, hard-linked in as reroute does
    save_file({"w": torch.ones(4)}, str(parent_shard))
    previous = os.umask(0o027)
    try:
        with atomic_output_dir(tmp_path / "out", force=False, inputs=[parent_shard]) as tmp:
            save_file({"w": torch.zeros(4)}, str(tmp / "model.safetensors"))
            (tmp / "sub").mkdir()
            os.link(parent_shard, tmp / "linked.safetensors")
    finally:
        os.umask(previous)
    assert parent_shard.stat().st_mode & 0o777 == 0o600  # the input is never changed
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "out" / "sub").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@pytest.mark.slow  # a fresh process
def test_adapter_card_is_ours_and_its_load_snippet_works(finetuned: dict[str, Path], root: Path) -> None:
    card = (finetuned["adapter"] / "README.md").read_text()
    assert PEFT_TEMPLATE_MARK not in card
    assert "PeftModel.from_pretrained(base, adapter_id)" in card and "AutoPeftModelForCausalLM" in card
    assert "--merge" in card and "spectra-convert push" in card
    assert "## Fine-tuning" in card and "--mode lora" in card
    snippet = python_block(card, "## How to load").replace('"OWNER/NAME"', repr(str(finetuned["adapter"])))
    snippet = snippet.replace("# model = AutoPeftModelForCausalLM", "model = AutoPeftModelForCausalLM")
    snippet += "ids = tokenizer('def main():', return_tensors='pt')\nprint(model(**ids).logits.shape)\n"
    done = fresh_python(snippet, root)  # base_id "model" and adapter_config's base resolve from root
    assert done.returncode == 0, done.stderr[-2000:]
    assert "custom code" not in done.stdout + done.stderr
    full_card = (finetuned["routers"] / "README.md").read_text()
    assert "## Fine-tuning" in full_card and "Fine-tuned from `model`" in full_card


def test_a_router_fine_tune_is_a_publishable_folder(finetuned: dict[str, Path]) -> None:
    from spectra_convert.hub import check_model_folder

    names = {p.name for p in check_model_folder(finetuned["routers"])}
    assert {"README.md", "config.json", "modeling_spectra.py"} <= names


@pytest.mark.slow  # a fresh process
def test_push_refuses_an_adapter_whose_base_is_not_on_the_hub(finetuned: dict[str, Path], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["OMP_NUM_THREADS"] = "1"  # as every CLI test: no thread note on stderr if the box is busy (cpu_threads.py)
    with FakeHub(token=TOKEN) as hub:
        env.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1")
        done = subprocess.run([sys.executable, "-m", "spectra_convert", "push", str(finetuned["adapter"]), "--repo",
                               "me/adapter"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip()
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in done.stderr
    assert "LoRA adapter for 'model'" in error and "--merge" in error
    assert hub.requests == []


def test_push_publishes_an_adapter_of_a_hub_base_with_a_card_naming_it(finetuned: dict[str, Path], tmp_path: Path,
                                                                       monkeypatch) -> None:
    """What finetune writes when MODEL is a Hub id (``model_label`` keeps the id) is published as is."""
    from spectra_convert.hub import push
    from spectra_convert.modelcard import finetune_facts, model_label, write_adapter_card

    adapter = Path(shutil.copytree(finetuned["adapter"], tmp_path / "adapter"))
    assert model_label("me/tiny-base") == "me/tiny-base"
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "me/tiny-base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    summary = json.loads((adapter / "finetune.json").read_text())
    write_adapter_card(adapter, base_model="me/tiny-base", on_hub=True, facts=finetune_facts("me/tiny-base", summary))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the fake speaks classic LFS (read at import)
    with FakeHub(token=TOKEN) as hub:
        result = push(adapter, "me/tiny-lora", endpoint=hub.endpoint)
        files = hub.files("me/tiny-lora")
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    front = yaml.safe_load(files["README.md"].decode().split("---")[1])
    assert front["base_model"] == "me/tiny-base" and front["library_name"] == "peft"
    assert hub.commits[0].summary == "Upload SPECTRA LoRA adapter for me/tiny-base with spectra-convert"
    assert result.total_bytes == sum(len(files[e["path"]]) for e in result.files)
    broken = Path(shutil.copytree(adapter, tmp_path / "broken"))
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="adapter weights adapter_model.safetensors missing"):
        push(broken, "me/tiny-lora", dry_run=tmp_path / "dry")
