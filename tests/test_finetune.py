"""finetune: what trains in each mode, saving/reloading, resume after SIGKILL, and one-line user errors.

Models here are tiny random-weight SPECTRA models (llama parent) with a real BPE tokenizer trained on stdlib
sources; they test structure, not quality (the SmolLM2 demonstration is bench/finetune_demo.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.finetune_helpers import STDLIB, build_tiny_model, folder_weights, write_corpus
from spectra_convert.finetune import finetune
from spectra_convert.finetune.data import block_indices, pack, split_validation
from spectra_convert.router.loads import gram_orthogonality, load_cv

REPO = Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
FAST = dict(steps=4, seq_len=64, batch_size=4, save_every=0, log_every=2)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    build_tiny_model(root / "model")
    write_corpus(root / "train.jsonl")
    return root


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([PY, "-m", "spectra_convert", *args], capture_output=True, text=True, env=full_env,
                          cwd=REPO, **kw)


# -- data and metrics ------------------------------------------------------------------------------------------


def test_data_order_is_a_pure_function_of_seed_and_step():
    kw = dict(n_blocks=10, batch_size=3, grad_accum=2, world_size=2, seed=7)
    first = [block_indices(s, m, r, **kw).tolist() for s in range(4) for m in range(2) for r in range(2)]
    again = [block_indices(s, m, r, **kw).tolist() for s in range(4) for m in range(2) for r in range(2)]
    assert first == again
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:10]) == list(range(10))  # the first epoch is a permutation of all blocks
    assert flat[:10] != list(range(10))
    other_seed = [block_indices(0, 0, 0, **{**kw, "seed": 8}).tolist()]
    assert other_seed[0] != first[0]


def test_pack_blocks_and_validation_split(work):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "model")
    texts = [(STDLIB / "bisect.py").read_text()]
    blocks = pack(texts, tok, 32)
    assert blocks.shape[1] == 32 and blocks.shape[0] >= 2
    assert blocks.reshape(-1)[-1].item() != -1
    split = split_validation(blocks)
    assert split.validation.shape[0] >= 1
    assert split.train.shape[0] + split.validation.shape[0] == blocks.shape[0]
    from spectra_convert.errors import UserError

    with pytest.raises(UserError, match="fewer than one block"):
        pack(["import os"], tok, 512)


def test_recalibration_blocks_span_the_whole_training_set():
    from spectra_convert.finetune.api import recalibration_blocks

    blocks = torch.arange(2000 * 64).view(2000, 64)
    picked = recalibration_blocks(blocks)
    rows = (picked[:, 0] // 64).tolist()
    assert len(rows) == 65536 // 64 and rows[0] == 0 and rows[-1] == 1999  # first to last, not a prefix
    assert rows == sorted(set(rows))
    assert recalibration_blocks(blocks[:5]).shape[0] == 5  # never more than there is
    assert recalibration_blocks(blocks[:25]).shape[0] == 25  # all of a small training set


def test_metrics():
    assert load_cv(torch.tensor([5.0, 5.0, 5.0, 5.0])) == 0.0
    assert abs(load_cv(torch.tensor([0.0, 10.0])) - 1.0) < 1e-12
    assert abs(gram_orthogonality(torch.eye(4)) - 1.0) < 1e-12
    assert gram_orthogonality(torch.ones(4, 3)) < 0.5


# -- router mode -----------------------------------------------------------------------------------------------


def test_router_mode_changes_only_router_tensors(work):
    out = work / "router-out"
    log = work / "router-log.jsonl"
    result = finetune(work / "model", work / "train.jsonl", out, mode="router", log_file=log, lr_router=1e-2, **FAST)
    before, after = folder_weights(work / "model"), folder_weights(out)
    assert set(before) == set(after)
    router_keys = [k for k in before if ".mlp.gate." in k]
    assert router_keys
    for key in before:
        if key in router_keys:
            continue
        assert torch.equal(before[key], after[key]), f"{key} changed in router mode"
    changed = [k for k in router_keys if not torch.equal(before[k], after[k])]
    assert any(k.endswith("expert_vectors") for k in changed)
    assert any(k.endswith("dual_bias") for k in changed)  # EMA of Sinkhorn potentials ran
    assert any("gru" in k for k in changed)
    summary = json.loads((out / "finetune.json").read_text())
    assert len(summary["losses"]) == 4 and summary["final_loss"] == result.final_loss
    assert summary["eval_before"]["perplexity"] > 1 and len(summary["eval_after"]["load_cv"]) == 2
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "load_cv", "gram_orthogonality", "tokens_per_s"} <= set(records[0])
    assert records[0]["aux_loss"] > 0  # router entropy + orthogonality terms are in the loss
    assert (out / "modeling_spectra.py").is_file() and (out / "tokenizer.json").is_file()
    assert not (work / "router-out.partial").exists()


# -- LoRA mode -------------------------------------------------------------------------------------------------

_FRESH_LOAD = """
import sys
sys.modules["spectra_convert"] = None  # the folder must load without the converter installed
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
ids = torch.arange(3, 35).view(2, 16)
with torch.no_grad():
    logits = model(input_ids=ids, use_cache=False).logits
save_file({"logits": logits.contiguous()}, sys.argv[2])
print(type(model).__module__)
"""


def test_lora_adapter_reloads_and_merged_folder_loads_with_remote_code(work):
    from peft import PeftModel

    from spectra_convert.finetune.modes import rebind_router_context
    from spectra_convert.modeling.modeling_spectra import SpectraForCausalLM

    adapter, merged = work / "lora-adapter", work / "lora-merged"
    kw = dict(mode="lora", lr=1e-2, lr_router=1e-2, lora_r=4, lora_alpha=8, **FAST)
    a = finetune(work / "model", work / "train.jsonl", adapter, **kw)
    m = finetune(work / "model", work / "train.jsonl", merged, merge=True, **kw)
    assert a.final_loss == m.final_loss  # same seed, same training

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "model"  # the base's folder name, never this machine's path
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_A" in k and "self_attn" in k for k in saved)
    assert any("mlp.experts" in k and "lora_B" in k for k in saved)
    assert any(k.endswith("mlp.gate.dual_bias") for k in saved) and any("mlp.gate.gru" in k for k in saved)

    # adapter reload: base + adapter, merged in memory, must match the merged folder (loaded in a fresh
    # process through trust_remote_code, with spectra_convert made unimportable)
    base = SpectraForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, adapter)
    rebind_router_context(reloaded)
    reloaded.eval()
    ids = torch.arange(3, 35).view(2, 16)
    with torch.no_grad():
        adapter_logits = reloaded(input_ids=ids, use_cache=False).logits
    script = work / "fresh_load.py"
    script.write_text(_FRESH_LOAD)
    proc = subprocess.run([PY, str(script), str(merged), str(work / "merged_logits.safetensors")],
                          capture_output=True, text=True, cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "transformers_modules" in proc.stdout
    merged_logits = load_file(str(work / "merged_logits.safetensors"))["logits"]
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)

    base_logits = SpectraForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()(
        input_ids=ids, use_cache=False).logits.detach()
    assert (merged_logits - base_logits).abs().max() > 1e-4  # training changed something

    before, after = folder_weights(work / "model"), folder_weights(merged)
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(before["model.layers.0.mlp.experts.down_proj"], after["model.layers.0.mlp.experts.down_proj"])
    assert not torch.equal(before["model.layers.0.mlp.gate.expert_vectors"], after["model.layers.0.mlp.gate.expert_vectors"])


# -- resume after SIGKILL --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_final_loss(work):
    common = ["finetune", str(work / "model"), "--data", str(work / "train.jsonl"), "--mode", "router",
              "--steps", "16", "--seq-len", "64", "--batch-size", "4", "--save-every", "2", "--log-every", "4",
              "--lr-router", "1e-2", "--seed", "3"]
    straight = work / "straight"
    proc = _cli(*common, "-o", str(straight))
    assert proc.returncode == 0, proc.stderr[-2000:]

    killed = work / "killed"
    partial = work / "killed.partial"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runner = subprocess.Popen([PY, "-m", "spectra_convert", *common, "-o", str(killed)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    reached = None
    while time.monotonic() < deadline and runner.poll() is None:
        steps = [int(p.name.split("-")[1]) for p in partial.glob("step-*")] if partial.exists() else []
        if steps and max(steps) >= 4:
            reached = max(steps)
            os.kill(runner.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    runner.wait()
    assert reached is not None and runner.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not killed.exists()

    resumed = _cli(*common, "-o", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    a = json.loads((straight / "finetune.json").read_text())
    b = json.loads((killed / "finetune.json").read_text())
    assert b["resumed_from_step"] is not None and b["resumed_from_step"] >= 4
    assert abs(a["final_loss"] - b["final_loss"]) <= 1e-6
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-6)
    wa, wb = folder_weights(straight), folder_weights(killed)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=0)


def test_kept_checkpoint_dir_extends_a_finished_run_exactly(work):
    """A finished run with --checkpoint-dir, resumed with more steps, equals one longer run (bench/carve.py's LoRA
    curve evaluates one run this way); OUT.partial is still removed when no folder is given."""
    kw = dict(mode="router", seq_len=64, batch_size=4, log_every=2, lr_router=1e-2, seed=3, save_every=3, force=True)
    data = work / "train.jsonl"
    straight = finetune(work / "model", data, work / "ext-straight", steps=6, **kw)
    assert not (work / "ext-straight.partial").exists()
    ckpt = work / "ext-ckpt"
    first = finetune(work / "model", data, work / "ext-a", steps=4, checkpoint_dir=ckpt, **kw)
    assert first.resumed_from_step is None and (ckpt / "step-00000004").is_dir()
    longer = finetune(work / "model", data, work / "ext-b", steps=6, checkpoint_dir=ckpt, resume=True, **kw)
    assert longer.resumed_from_step == 4 and (ckpt / "step-00000006").is_dir()
    assert longer.losses == pytest.approx(straight.losses, abs=1e-6)
    wa, wb = folder_weights(work / "ext-straight"), folder_weights(work / "ext-b")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=0)


def test_a_decaying_schedule_decays_and_extends_in_segments_exactly(work):
    """--lr-schedule cosine: the logged rate follows the half cosine over --lr-decay-steps, the run differs from a
    constant-rate one, segments with a fixed decay length equal one run, and a resume under another decay length is
    refused (the schedule is part of the run config)."""
    import math

    from spectra_convert.errors import UserError

    kw = dict(mode="router", seq_len=64, batch_size=4, log_every=1, lr_router=1e-2, seed=3, save_every=3, force=True)
    data = work / "train.jsonl"
    cosine = dict(lr_schedule="cosine", lr_decay_steps=6)
    log = work / "cos-log.jsonl"
    log.unlink(missing_ok=True)
    straight = finetune(work / "model", data, work / "cos-straight", steps=6, log_file=log, **kw, **cosine)
    rates = [json.loads(line)["lr"][0] for line in log.read_text().splitlines()]
    assert rates == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)], rel=1e-9)
    constant = finetune(work / "model", data, work / "cos-constant", steps=6, **kw)
    assert constant.losses[0] == pytest.approx(straight.losses[0], abs=1e-7)  # the same first step
    assert constant.losses[-1] != pytest.approx(straight.losses[-1], abs=1e-7)  # then the rates differ

    ckpt = work / "cos-ckpt"
    finetune(work / "model", data, work / "cos-a", steps=4, checkpoint_dir=ckpt, **kw, **cosine)
    with pytest.raises(UserError, match="different config"):
        finetune(work / "model", data, work / "cos-x", steps=6, checkpoint_dir=ckpt, resume=True, **kw,
                 lr_schedule="cosine", lr_decay_steps=8)
    longer = finetune(work / "model", data, work / "cos-b", steps=6, checkpoint_dir=ckpt, resume=True, **kw, **cosine)
    assert longer.resumed_from_step == 4
    assert longer.losses == pytest.approx(straight.losses, abs=1e-6)
    wa, wb = folder_weights(work / "cos-straight"), folder_weights(work / "cos-b")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=0)


def test_schedule_factors():
    from spectra_convert.errors import UserError
    from spectra_convert.finetune.schedule import lr_factor, resolve_decay_steps

    assert [lr_factor("linear", s, 4) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert lr_factor("cosine", 0, 10) == 1.0 and lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("constant", 99, None) == 1.0
    assert [lr_factor("linear", s, 6, decay_start=2) for s in range(7)] == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(UserError, match="--lr-decay-start 7 must be"):
        resolve_decay_steps("cosine", 7, 7, decay_start=7)
    with pytest.raises(UserError, match="need a decaying"):
        resolve_decay_steps("constant", None, 7, decay_start=2)
    assert resolve_decay_steps("cosine", None, 7) == 7 and resolve_decay_steps("constant", None, 7) is None
    with pytest.raises(UserError, match="below --steps"):
        resolve_decay_steps("linear", 3, 7)
    with pytest.raises(UserError, match="need a decaying"):
        resolve_decay_steps("constant", 3, 7)
    with pytest.raises(UserError, match="expected one of constant, cosine, linear"):
        resolve_decay_steps("step", None, 7)


# -- bad input: one line on stderr, non-zero exit --------------------------------------------------------------


def _one_line_error(capsys, argv: list[str]) -> str:
    from spectra_convert.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_bad_inputs_are_one_line_errors(work, capsys, tmp_path):
    from tests.conftest import tiny_parent_config

    base = ["finetune", str(work / "model"), "--data", str(work / "train.jsonl"), "--steps", "1", "--seq-len", "64"]

    dense = tmp_path / "dense"
    dense.mkdir()
    tiny_parent_config("llama").save_pretrained(dense)
    msg = _one_line_error(capsys, ["finetune", str(dense), "--data", str(work / "train.jsonl"), "-o",
                                   str(tmp_path / "o1"), "--mode", "router"])
    assert "no SPECTRA routers" in msg

    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": (STDLIB / "bisect.py").read_text().splitlines()[0]}) + "\n")
    msg = _one_line_error(capsys, ["finetune", str(work / "model"), "--data", str(short), "-o", str(tmp_path / "o2"),
                                   "--mode", "router", "--seq-len", "256"])
    assert "fewer than one block" in msg

    msg = _one_line_error(capsys, [*base, "-o", str(tmp_path / "o6"), "--mode", "router", "--lr-schedule", "cosine",
                                   "--lr-decay-steps", "0"])
    assert "--lr-decay-steps" in msg
    msg = _one_line_error(capsys, [*base, "-o", str(tmp_path / "o7"), "--mode", "router", "--lr-schedule", "step"])
    assert "--lr-schedule 'step': expected one of" in msg and "cosine" in msg
    msg = _one_line_error(capsys, [*base, "-o", str(tmp_path / "o8"), "--mode", "router", "--lr-schedule", "cosine",
                                   "--steps", "4", "--lr-decay-steps", "2"])
    assert "below --steps" in msg

    msg = _one_line_error(capsys, [*base, "-o", str(tmp_path / "o3"), "--mode", "adapter"])
    assert "--mode 'adapter': expected one of" in msg and "router" in msg

    msg = _one_line_error(capsys, [*base, "-o", str(tmp_path / "o4"), "--mode", "lora", "--target-modules", "wq,wk"])
    assert "match nothing" in msg and "q_proj" in msg and "mlp.experts.gate_up_proj" in msg

    existing = tmp_path / "exists"
    existing.mkdir()
    msg = _one_line_error(capsys, [*base, "-o", str(existing), "--mode", "router"])
    assert "exists" in msg and "--force" in msg

    ckpt = tmp_path / "ckpt"
    from spectra_convert.cli import main

    main([*base, "-o", str(tmp_path / "o5"), "--mode", "router", "--steps", "2", "--save-every", "1",
          "--checkpoint-dir", str(ckpt)])
    assert (ckpt / "step-00000002").is_dir() and not (ckpt / "step-00000001").exists()  # a kept folder ends at the last step
    capsys.readouterr()
    msg = _one_line_error(capsys, ["finetune", str(work / "model"), "--data", str(work / "train.jsonl"),
                                   "--seq-len", "32", "--steps", "4", "-o", str(tmp_path / "o6"), "--mode", "router",
                                   "--checkpoint-dir", str(ckpt), "--resume"])
    assert "different config" in msg and "seq_len" in msg
