"""``reroute``: same experts (same bytes), new calibrated SPECTRA routers, inputs untouched, clear errors.

Tiny random-weight sharded Mixtral / Qwen2-MoE checkpoints written by real ``save_pretrained`` (structural
tests: the weights are random, so only behaviour — not quality — is checked). Calibration text is the shipped
real-text corpus (stdlib sources, man pages, copyright files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from spectra_convert.modelio.adapters import ADAPTERS
from spectra_convert.modelio.config import read_parent_config
from spectra_convert.modelio.safetensors_files import read_header
from spectra_convert.surgery.reroute import reroute
from spectra_convert.surgery.streaming import stream_ffn_inputs
from tests.conftest import REPO, run_without_package, tiny_parent_config
from tests.tiny_checkpoints import build_tokenizer, folder_checksums, save_tiny_moe

MOE_TYPES = ["mixtral", "qwen2_moe"]
SMALL = {"calibration_tokens": 512, "router_dim": 16}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    folders = {}
    for model_type in MOE_TYPES:
        save_tiny_moe(model_type, root / model_type, max_shard_size="50KB")
        folders[model_type] = root / model_type
    return folders


@pytest.fixture(scope="module")
def rerouted(sources, tmp_path_factory) -> dict[str, tuple[Path, Path, object, dict]]:
    root = tmp_path_factory.mktemp("rerouted")
    results = {}
    for model_type, src in sources.items():
        before = folder_checksums(src)
        result = reroute(str(src), root / model_type, seed=0, **SMALL)
        results[model_type] = (src, root / model_type, result, before)
    return results


def _tensors(folder: Path) -> dict[str, tuple[Path, object]]:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    headers = {f: read_header(folder / f)[0] for f in set(weight_map.values())}
    return {name: (folder / f, headers[f][name]) for name, f in weight_map.items()}


# -- what is kept, what is replaced --------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_experts_keep_names_and_bytes_and_gateless_shards_are_hard_links(rerouted, model_type: str) -> None:
    src, out, result, _ = rerouted[model_type]
    adapter = ADAPTERS[model_type]
    before, after = _tensors(src), _tensors(out)
    gates = {adapter.gate_key(i) for i in range(2)}
    assert gates <= set(before) and not gates & set(after)
    kept = set(before) - gates
    assert kept <= set(after)
    experts = [n for n in kept if ".experts." in n]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down), unfused as on disk
    for name in kept:
        (src_file, a), (out_file, b) = before[name], after[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        with open(src_file, "rb") as f, open(out_file, "rb") as g:
            f.seek(a.start)
            g.seek(b.start)
            assert f.read(a.nbytes) == g.read(b.nbytes), name
    src_shards = {os.stat(p).st_ino: p for p in src.glob("model-*.safetensors")}
    gate_shards = {before[g][0] for g in gates}
    linked = [p for p in out.glob("model-*.safetensors") if os.stat(p).st_ino in src_shards]
    assert len(linked) == len(src_shards) - len(gate_shards) >= 1
    assert result.shards_linked == len(linked) and result.shards_rewritten == len(gate_shards)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_inputs_unchanged(rerouted, model_type: str) -> None:
    src, _, _, before = rerouted[model_type]
    assert folder_checksums(src) == before


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_routers_config_and_calibration(rerouted, model_type: str) -> None:
    src, out, result, _ = rerouted[model_type]
    adapter = ADAPTERS[model_type]
    after = _tensors(out)
    for i in range(2):
        prefix = adapter.router_prefix(i)
        assert {prefix + n for n in ("expert_vectors", "projector", "dual_bias", "gru.weight_ih_l0")} <= set(after)
        # routers live in the shard their layer's gate was in
        assert after[prefix + "expert_vectors"][0].name in {p.name for p in out.glob("model-*")}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "spectra" and config["architectures"] == ["SpectraForCausalLM"]
    assert config["spectra"]["num_experts"] == 4 and config["spectra"]["top_k"] == 2
    assert config["spectra"]["source"] == "rerouted" and config["spectra"]["router_dim"] == 16
    assert config["text_config"]["model_type"] == model_type
    for name in ("configuration_spectra.py", "modeling_spectra.py", "tokenizer.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert sorted(result.layer_cv) == [0, 1] and max(result.layer_cv.values()) < 0.1
    assert all(0.0 <= a <= 1.0 for a in result.layer_agreement.values())
    assert result.params_active < result.params_total
    assert not list(out.parent.glob(".*tmp*"))


def test_result_loads_and_generates_without_the_package(rerouted) -> None:
    src, out, _, _ = rerouted["mixtral"]
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model, info = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True,
                                                           output_loading_info=True)
        assert not any(info.values()), info
        assert type(model).__name__ == "SpectraForCausalLM"
        routers = [m for m in model.modules() if type(m).__name__ == "SpectraRouter"]
        assert len(routers) == 2
        parent = AutoModelForCausalLM.from_pretrained({str(src)!r})
        for mine, theirs in zip(model.model.layers, parent.model.layers):
            assert torch.equal(mine.mlp.experts.gate_up_proj, theirs.mlp.experts.gate_up_proj)
            assert torch.equal(mine.mlp.experts.down_proj, theirs.mlp.experts.down_proj)
        ids = torch.tensor([[5, 17, 33, 64]])
        cached = model.generate(ids, max_new_tokens=6, do_sample=False)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
        assert cached.shape == (1, 10) and torch.equal(cached, uncached)
        print("OK")
        """
    )
    result = run_without_package(script, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_qwen2_moe_loads_with_routers_from_the_file(rerouted) -> None:
    from transformers import AutoModelForCausalLM

    _, out, _, _ = rerouted["qwen2_moe"]
    model, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not any(info.values()), info
    after = _tensors(out)
    path, _ = after["model.layers.1.mlp.gate.dual_bias"]
    with safe_open(path, "pt") as f:
        stored = f.get_tensor("model.layers.1.mlp.gate.dual_bias")
    assert torch.equal(model.model.layers[1].mlp.gate.dual_bias, stored) and stored.abs().sum() > 0
    out_ids = model.generate(torch.tensor([[3, 9, 27]]), max_new_tokens=4, do_sample=False)
    assert out_ids.shape[1] > 3


# -- streaming -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_streamed_ffn_inputs_equal_full_forward(sources, model_type: str) -> None:
    from transformers import AutoModelForCausalLM

    src = sources[model_type]
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(1, 300, (3, 19), generator=torch.Generator().manual_seed(1))
    full: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: full.__setitem__(i, a[0].float()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    streamed: dict[int, torch.Tensor] = {}
    stream_ffn_inputs(src, read_parent_config(src), [ids[:2], ids[2:]], on_layer=streamed.__setitem__)
    assert sorted(streamed) == sorted(full) == [0, 1]
    for i in full:
        assert streamed[i].shape == full[i].shape
        assert torch.allclose(streamed[i], full[i], atol=1e-5), (streamed[i] - full[i]).abs().max()


# -- router init variants ----------------------------------------------------------------------------------------


@pytest.mark.slow  # the distillation loop (150 router steps per layer) dominates; minutes on a loaded 2-core box
def test_distill_agrees_with_old_gate_more_than_kmeans(sources, tmp_path: Path) -> None:
    src = sources["qwen2_moe"]
    kmeans = reroute(str(src), tmp_path / "k", router_init="kmeans", **SMALL)
    distill = reroute(str(src), tmp_path / "d", router_init="distill", **SMALL)
    mean = lambda r: sum(r.layer_agreement.values()) / len(r.layer_agreement)  # noqa: E731
    assert mean(distill) > mean(kmeans)
    with safe_open(tmp_path / "k" / _tensors(tmp_path / "k")["model.layers.0.mlp.gate.expert_vectors"][0].name, "pt") as f:
        a = f.get_tensor("model.layers.0.mlp.gate.expert_vectors")
    with safe_open(tmp_path / "d" / _tensors(tmp_path / "d")["model.layers.0.mlp.gate.expert_vectors"][0].name, "pt") as f:
        b = f.get_tensor("model.layers.0.mlp.gate.expert_vectors")
    assert not torch.equal(a, b)


# -- the CLI: success, --force, and bad inputs --------------------------------------------------------------------


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "spectra_convert", "reroute", *args], capture_output=True,
                          text=True, env=env, cwd=cwd or REPO, timeout=300)


def test_cli_success_then_refuses_then_force(sources, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [str(sources["mixtral"]), "-o", str(out), "--calibration-tokens", "256", "--router-dim", "8"]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "top-k agreement" in first.stdout and "calibration CV" in first.stdout
    again = _cli(*args)
    assert again.returncode != 0 and again.stderr.strip() == f"error: {out} exists; pass --force to overwrite"
    (out / "marker").write_text("old")
    forced = _cli(*args, "--force", "--router-init", "kmeans")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert not (out / "marker").exists() and json.loads((out / "config.json").read_text())["spectra"]["router_dim"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _bad_input(case: str, sources: dict[str, Path], tmp: Path) -> tuple[list[str], str]:
    """(CLI args, expected message fragment) for one bad input."""
    mixtral = sources["mixtral"]
    out = str(tmp / "out")
    if case == "missing folder":
        return [str(tmp / "nope"), "-o", out], "no such folder"
    if case == "not a model folder":
        (tmp / "empty").mkdir()
        return [str(tmp / "empty"), "-o", out], "not a model folder (no config.json)"
    if case == "corrupt safetensors":
        folder = _copy_folder(mixtral, tmp / "m")
        shard = sorted(folder.glob("model-*.safetensors"))[-1]
        shard.write_bytes(shard.read_bytes()[:-64])
        return [str(folder), "-o", out], f"{shard.name}: corrupt or truncated safetensors file"
    if case == "unsupported architecture":
        (tmp / "bert").mkdir()
        (tmp / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
        return [str(tmp / "bert"), "-o", out], "unsupported architecture 'bert'; supported:"
    if case == "top-k > experts":
        folder = _copy_folder(mixtral, tmp / "m")
        _edit_config(folder, num_experts_per_tok=5)
        return [str(folder), "-o", out], "top-k (5) must be between 1 and the number of experts (4)"
    if case == "experts < 2":
        folder = _copy_folder(mixtral, tmp / "m")
        _edit_config(folder, num_local_experts=1, num_experts_per_tok=1)
        return [str(folder), "-o", out], "rerouting needs at least 2"
    if case == "OUT inside MODEL":
        return [str(mixtral), "-o", str(mixtral / "sub")], "is inside the input"
    if case == "unreadable calibration":
        (tmp / "cal.txt").write_bytes(b"\xff\xfe\xfa not utf-8 \x80")
        return [str(mixtral), "-o", out, "--calibration", str(tmp / "cal.txt")], "not UTF-8"
    if case == "empty calibration":
        (tmp / "cal.jsonl").write_text("")
        return [str(mixtral), "-o", out, "--calibration", str(tmp / "cal.jsonl")], "no documents"
    if case == "dense model":
        from transformers import AutoModelForCausalLM

        config = tiny_parent_config("llama", vocab_size=384)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "llama")
        build_tokenizer().save_pretrained(tmp / "llama")
        return [str(tmp / "llama"), "-o", out], "is a dense model (llama); use `spectra-convert upcycle`"
    if case == "hub id offline":
        return ["someorg/some-moe-model", "-o", out], "cannot download 'someorg/some-moe-model' from the Hugging Face Hub (offline?): pass a local model folder"
    raise AssertionError(case)


BAD_INPUTS = ["missing folder", "not a model folder", "corrupt safetensors", "unsupported architecture",
              "top-k > experts", "experts < 2", "OUT inside MODEL", "unreadable calibration", "empty calibration",
              "dense model", "hub id offline"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_cli_bad_input_is_one_line_error(sources, tmp_path: Path, case: str) -> None:
    before = folder_checksums(sources["mixtral"])
    args, expected = _bad_input(case, sources, tmp_path)
    result = _cli(*args, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert folder_checksums(sources["mixtral"]) == before


def test_shard_copy_can_start_before_torch_is_imported() -> None:
    """reroute queues its shard copies before the heavy imports (the copy overlaps them): the modules that
    phase needs must not pull in torch or transformers."""
    import subprocess
    import sys

    code = ("import sys, spectra_convert.cli, spectra_convert.surgery.reroute, spectra_convert.textdata; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from spectra_convert.router import prototypes
    from spectra_convert.surgery import reroute

    assert reroute.INIT_METHODS == prototypes.INIT_METHODS
