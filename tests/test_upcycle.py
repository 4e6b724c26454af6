"""Upcycle (issue 4): dense -> SPECTRA MoE on real SmolLM2 weights and a tiny gpt2; bad inputs via the CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from spectra_convert.surgery.upcycle import upcycle
from tests.finetune_helpers import build_tokenizer


def tree_checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spectra_convert", *args], capture_output=True, text=True, timeout=900)


def load_dense(gguf: Path):
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A tiny random gpt2 (structure only) with a real BPE tokenizer trained on stdlib sources."""
    path = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    tokenizer = build_tokenizer(vocab_size=320)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_copy_noise_zero_equals_dense_logits(smollm2_gguf, tmp_path) -> None:
    before = tree_checksums(smollm2_gguf.parent)
    out = tmp_path / "moe"
    result = upcycle(str(smollm2_gguf.parent), out, experts=4, top_k=2, noise=0.0, gguf_file=smollm2_gguf.name,
                     calibration_tokens=512)
    assert tree_checksums(smollm2_gguf.parent) == before, "input folder modified"
    assert result.layers == 30 and len(result.layer_cv) == 30
    dense = load_dense(smollm2_gguf)
    moe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(0, dense.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, dense(ids).logits, atol=2e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "spectra" and "AutoModelForCausalLM" in config["auto_map"]
    assert config["spectra"]["num_experts"] == 4 and config["spectra"]["source"] == "upcycled"
    for name in ("configuration_spectra.py", "modeling_spectra.py", "tokenizer.json", "generation_config.json",
                 "README.md", "model.safetensors.index.json"):
        assert (out / name).exists(), name


@pytest.mark.slow
def test_upcycled_model_is_balanced_and_generates(upcycled_smollm2) -> None:
    from transformers import AutoTokenizer

    from spectra_convert.modeling.configuration_spectra import SpectraConfig

    model = AutoModelForCausalLM.from_pretrained(upcycled_smollm2, trust_remote_code=True).eval()
    config = SpectraConfig.from_pretrained(upcycled_smollm2)
    tokenizer = AutoTokenizer.from_pretrained(upcycled_smollm2, config=config)
    prompt = tokenizer("def fibonacci(n):", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 12
    assert len(model.routers()) == 30
    assert any(float(r.dual_bias.abs().sum()) > 0 for r in model.routers()), "bias was not calibrated"


def test_tiny_gpt2_copy_noise_zero_matches_dense(tiny_gpt2_dir, tmp_path) -> None:
    out = tmp_path / "gpt2-moe"
    corpus = Path(__file__).parent / "fixtures" / "corpus" / "train.jsonl"
    upcycle(str(tiny_gpt2_dir), out, experts=4, top_k=2, noise=0.0, calibration=str(corpus), calibration_tokens=512,
            router_dim=16)
    dense = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    moe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(0, dense.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, dense(ids).logits, atol=1e-5)
    assert moe.transformer.h[0].mlp.experts.up_bias.shape == (4, 128)


def test_copies_are_written_with_the_copy_sequence_balance_unless_overridden(tiny_gpt2_dir, tmp_path) -> None:
    """Copied experts: balance is all routing decides, so copies route with the stronger per-sequence term
    (COPY_SEQUENCE_BALANCE, measured in bench/balance.py); an explicit override still wins."""
    from spectra_convert.surgery.upcycle import COPY_SEQUENCE_BALANCE

    corpus = str(Path(__file__).parent / "fixtures" / "corpus" / "train.jsonl")
    upcycle(str(tiny_gpt2_dir), tmp_path / "a", experts=4, top_k=2, calibration=corpus, calibration_tokens=256,
            router_dim=8)
    upcycle(str(tiny_gpt2_dir), tmp_path / "b", experts=4, top_k=2, calibration=corpus, calibration_tokens=256,
            router_dim=8, spectra_overrides={"sequence_balance": 0.5})
    assert COPY_SEQUENCE_BALANCE == 2.0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["spectra"]["sequence_balance"] == 2.0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["spectra"]["sequence_balance"] == 0.5


def test_noise_makes_experts_differ(tiny_gpt2_dir, tmp_path) -> None:
    out = tmp_path / "noisy"
    upcycle(str(tiny_gpt2_dir), out, experts=4, top_k=2, noise=0.05, calibration_tokens=512, router_dim=16,
            calibration=str(Path(__file__).parent / "fixtures" / "corpus" / "train.jsonl"))
    moe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    up = moe.transformer.h[0].mlp.experts.up_proj
    assert not torch.equal(up[0], up[1])
    relative = float((up[0] - up[1]).std() / up[0].std())
    assert 0.03 < relative < 0.1


@pytest.mark.parametrize(
    "args,message",
    [
        (["/nonexistent/model"], "no such"),
        (["{tmp}"], "config.json"),
        (["{gpt2}", "--experts", "1"], "--experts"),
        (["{gpt2}", "--top-k", "5", "--experts", "4"], "--top-k"),
        (["{gpt2}", "--calibration", "/nonexistent.jsonl"], "nonexistent.jsonl"),
        (["{gpt2}", "--calibration", "{empty}"], "no documents"),
        (["{gpt2}", "--out-inside"], "inside"),
        (["{gpt2}", "--out-exists"], "--force"),
        (["{mixtral}"], "reroute"),
    ],
)
def test_bad_inputs_one_line_error(args, message, tiny_gpt2_dir, tmp_path) -> None:
    from tests.conftest import tiny_parent_config

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    mixtral = tmp_path / "mixtral"
    AutoModelForCausalLM.from_config(tiny_parent_config("mixtral")).save_pretrained(mixtral)
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path, gpt2=tiny_gpt2_dir, empty=empty, mixtral=mixtral) for a in args]
    if "--out-inside" in args:
        args.remove("--out-inside")
        out = tiny_gpt2_dir / "inside"
    if "--out-exists" in args:
        args.remove("--out-exists")
        out.mkdir()
    result = cli("upcycle", *args, "-o", str(out), "--calibration-tokens", "256", "--router-dim", "8")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-1500:]


@pytest.mark.slow
def test_gguf_file_is_parsed_once_per_upcycle_and_library_restored(smollm2_gguf: Path) -> None:
    """config, tokenizer and weights of a GGUF parent share one gguf.GGUFReader inside ``parsed_once``
    (transformers' legacy path parses it once per load otherwise); outside it the library is untouched."""
    import gguf

    from spectra_convert.modelio.config import read_parent_config
    from spectra_convert.modelio.gguf_once import parsed_once
    from spectra_convert.modelio.parent import load_dense_parent

    original = gguf.GGUFReader
    parsed: list[str] = []

    class CountingReader(original):  # type: ignore[misc, valid-type]
        def __init__(self, path, mode="r"):
            parsed.append(str(path))
            super().__init__(path, mode)

    gguf.GGUFReader = CountingReader
    try:
        with parsed_once():
            config = read_parent_config(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
            model, tokenizer = load_dense_parent(smollm2_gguf.parent, smollm2_gguf.name, torch.float32, config=config)
        assert len(parsed) == 1 and gguf.GGUFReader is CountingReader
        assert model.config.num_hidden_layers == config.num_hidden_layers and tokenizer("def f(): pass").input_ids
        read_parent_config(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
        assert len(parsed) == 2  # outside the block: a fresh parse, as transformers does
    finally:
        gguf.GGUFReader = original


@pytest.mark.slow
def test_shared_gguf_reader_reads_the_same_bytes_without_memmap_slices(smollm2_gguf: Path) -> None:
    """The reader ``parsed_once`` builds holds a plain read-only ndarray view of the file: the same fields,
    values and tensor bytes as the library's own reader (only the Python-level memmap hooks are gone)."""
    import gguf
    import numpy as np

    from spectra_convert.modelio.gguf_once import parsed_once

    library = gguf.GGUFReader(smollm2_gguf)
    with parsed_once():
        shared = gguf.GGUFReader(smollm2_gguf)
    assert type(shared.data) is np.ndarray and not shared.data.flags.writeable
    assert isinstance(library.data, np.memmap)
    assert list(shared.fields) == list(library.fields)
    tokens_a, tokens_b = library.fields["tokenizer.ggml.tokens"], shared.fields["tokenizer.ggml.tokens"]
    assert tokens_a.data == tokens_b.data
    assert all(bytes(tokens_a.parts[i]) == bytes(tokens_b.parts[i]) for i in tokens_a.data)
    assert [t.name for t in shared.tensors] == [t.name for t in library.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(library.tensors, shared.tensors))


def test_cli_asks_torch_for_huge_pages_before_torch_loads() -> None:
    """The CLI sets THP_MEM_ALLOC_ENABLE before torch's allocator reads it (at torch's first allocation);
    a value the user exported is kept."""
    import os
    import subprocess
    import sys

    code = ("import os, sys, spectra_convert.cli; assert 'torch' not in sys.modules; "
            "print(os.environ['THP_MEM_ALLOC_ENABLE'])")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert default.stdout.strip() == "1"
    chosen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**env, "THP_MEM_ALLOC_ENABLE": "0"})
    assert chosen.stdout.strip() == "0"


def test_experts_are_the_dense_ffn_plus_the_seeds_noise_with_recycled_buffers(tmp_path, monkeypatch) -> None:
    """Every expert = dense FFN + noise x std, the noise exactly the seed's draws — also once written noise
    buffers are recycled for later layers (one tensor per shard here, so recycling starts at layer 0)."""
    from spectra_convert.surgery import upcycle as upcycle_module
    from spectra_convert.surgery.noise import NoiseAhead
    from tests.conftest import tiny_parent_config

    parent = tmp_path / "llama"
    tokenizer = build_tokenizer(vocab_size=320)
    torch.manual_seed(0)
    config = tiny_parent_config("llama", vocab_size=len(tokenizer), num_hidden_layers=12)
    dense = AutoModelForCausalLM.from_config(config)
    dense.save_pretrained(parent)
    tokenizer.save_pretrained(parent)
    reused: list[int] = []
    take_buffer = NoiseAhead._buffer
    monkeypatch.setattr(NoiseAhead, "_buffer", lambda self, n: reused.append(bool(self._free.get(n))) or take_buffer(self, n))
    monkeypatch.setattr(upcycle_module, "SHARD_BYTES", 1)
    experts, noise, seed = 4, 0.05, 11
    upcycle(str(parent), tmp_path / "moe", experts=experts, top_k=2, noise=noise, seed=seed, router_dim=8,
            calibration=str(Path(__file__).parent / "fixtures" / "corpus" / "train.jsonl"), calibration_tokens=256)
    assert sum(reused) >= 4, "later layers must draw into recycled buffers"
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", trust_remote_code=True)
    inter, hidden = config.intermediate_size, config.hidden_size
    sizes = [[experts * 2 * inter * hidden, experts * hidden * inter]] * config.num_hidden_layers
    with NoiseAhead(sizes, seed, workers=1) as expected_noise:  # no recycling here
        for i, layer in enumerate(dense.model.layers):
            drawn_gate_up, drawn_down = expected_noise.take(i)
            gate_up = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).detach()
            down = layer.mlp.down_proj.weight.detach()
            got = moe.model.layers[i].mlp.experts
            for weight, drawn, out in ((gate_up, drawn_gate_up, got.gate_up_proj), (down, drawn_down, got.down_proj)):
                expected = drawn.view(experts, *weight.shape) * (float(weight.std()) * noise) + weight
                assert torch.allclose(out.detach(), expected, atol=1e-7, rtol=0), i


def test_failure_after_the_builder_started_stops_it_and_leaves_nothing(tiny_gpt2_dir, tmp_path) -> None:
    """The parent's weights are fine but its tokenizer file is corrupt: loading fails only after the expert
    builder (started from the files) may have queued every expert and be waiting for the non-FFN tensors.
    One-line error, no hang, no output, no temp folder."""
    import shutil

    parent = tmp_path / "bad-tokenizer"
    shutil.copytree(tiny_gpt2_dir, parent)
    (parent / "tokenizer.json").write_text("{ not json")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "spectra_convert", "upcycle", str(parent), "-o", str(out),
                             "--router-dim", "8", "--calibration-tokens", "256"],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot load the dense model" in errors[0], result.stderr[-1500:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-tokenizer"]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2-sliding"])
def test_capture_stops_after_the_last_router_input_with_the_full_forwards_values(model_type: str) -> None:
    """``capture_ffn_inputs`` (the parent run layer by layer, ``surgery.layerwise``) ends at the last layer's FFN
    input; every layer's captured input equals, to the bit, what the FFN sees in a complete forward of the same
    batches -- also when layers differ in their masks (qwen2 with sliding-window layers above the first) -- and
    the layers are left as they were."""
    from spectra_convert.modeling.modeling_spectra import decoder_layers
    from spectra_convert.surgery.upcycle import capture_ffn_inputs
    from tests.conftest import tiny_parent_config

    torch.manual_seed(0)
    if model_type == "qwen2-sliding":
        config = tiny_parent_config("qwen2", num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                                    max_window_layers=1)
        assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    else:
        config = tiny_parent_config(model_type, num_hidden_layers=3)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    layers = decoder_layers(model)
    batches = torch.randint(0, 128, (5, 16))
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    ran_last_ffn: list[bool] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0].clone()))
             for i, layer in enumerate(layers)]
    with torch.no_grad():
        for start in range(0, 5, 2):
            model(input_ids=batches[start : start + 2], use_cache=False)
    for hook in hooks:
        hook.remove()
    probe = layers[-1].mlp.register_forward_hook(lambda *_: ran_last_ffn.append(True))
    wrapped = layers[1].forward  # an instance-level forward (as accelerate's hooks install) must survive
    layers[1].forward = lambda *args, **kwargs: wrapped(*args, **kwargs)
    own_forward = layers[1].forward
    captured = capture_ffn_inputs(model, layers, batches, batch_size=2)
    probe.remove()
    assert layers[1].forward is own_forward
    del layers[1].forward
    assert not ran_last_ffn  # the last FFN itself never ran
    assert sorted(captured) == list(range(len(layers)))
    for i in range(len(layers)):
        torch.testing.assert_close(captured[i], torch.cat(seen[i]).float(), rtol=0, atol=0)
    assert not any("forward" in vars(layer) for layer in layers)  # the pass-throughs are gone


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_layer_by_layer_hands_on_each_ffns_intermediate_activations_from_the_forward_that_runs(model_type: str) -> None:
    """With ``output_projection``, ``layerwise_ffn_inputs`` hands each layer's FFN intermediate activations (the
    down projection's input, copied from the forward that makes the next layer's inputs) with its FFN inputs: what
    ``surgery.carve.intermediate_activations`` computes from those inputs, within float rounding (other GEMM shapes),
    and ``None`` for the last layer, whose FFN never runs."""
    from transformers.activations import ACT2FN

    from spectra_convert.modelio.adapters import ADAPTERS
    from spectra_convert.modeling.modeling_spectra import decoder_layers
    from spectra_convert.surgery.carve import intermediate_activations
    from spectra_convert.surgery.layerwise import layerwise_ffn_inputs
    from tests.conftest import tiny_parent_config

    torch.manual_seed(0)
    config = tiny_parent_config(model_type, num_hidden_layers=3)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    adapter = ADAPTERS[model_type]
    down = adapter.projections["down"]
    handed: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    layerwise_ffn_inputs(model, decoder_layers(model), torch.randint(0, 128, (5, 16)), batch_size=2,
                         on_layer=lambda i, inputs, activations: handed.__setitem__(i, (inputs, activations)),
                         output_projection=lambda layer: getattr(layer.mlp, down))
    assert sorted(handed) == [0, 1, 2] and handed[2][1] is None
    state = model.state_dict()
    for i in (0, 1):
        inputs, activations = handed[i]
        dense = adapter.ffn_tensors(state.__getitem__, i)
        expected = intermediate_activations(dense, inputs.reshape(-1, inputs.shape[-1]), ACT2FN[adapter.activation(config)])
        assert activations.shape == expected.shape
        torch.testing.assert_close(activations, expected, rtol=1e-5, atol=1e-6)
