"""validate: library function, CLI gate, report files, baselines, parent comparison and bad inputs.

Structural tests use tiny random-weight SPECTRA models (llama and mixtral parents; their weights are random
and say nothing about quality) with a real BPE tokenizer trained here on the project's real-text fixture
corpus. The slow test upcycles the real SmolLM2-135M-Instruct and validates it on the same corpus.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from spectra_convert.cli import main
from spectra_convert.errors import ThresholdFailed, UserError
from spectra_convert.validate import collect
from spectra_convert.validate.api import validate
from tests.conftest import FIXTURES, tiny_parent_config

CORPUS = FIXTURES / "corpus"
HELDOUT = CORPUS / "heldout.jsonl"
TINY = dict(max_tokens=1200, max_length=96, batch_tokens=512)


# --------------------------------------------------------------------------------------------------------------
# Fixtures: a real tokenizer and tiny SPECTRA folders
# --------------------------------------------------------------------------------------------------------------


def _train_tokenizer(folder: Path, vocab_size: int = 320) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (CORPUS / "train.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("tok")
    return folder, _train_tokenizer(folder)


def _spectra_folder(folder: Path, tokenizer_dir: Path, vocab: int, parent_type: str = "llama", **knobs) -> Path:
    from spectra_convert.modeling.configuration_spectra import SpectraConfig
    from spectra_convert.modeling.modeling_spectra import SpectraForCausalLM

    torch.manual_seed(0)
    text = tiny_parent_config(parent_type, vocab_size=vocab, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    config = SpectraConfig(text_config=text.to_dict(), spectra={"num_experts": 4, "top_k": 2, "router_dim": 16,
                                                                **knobs})
    SpectraForCausalLM(config).save_pretrained(folder)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, folder / item.name)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer_dir) -> Path:
    tok, vocab = tokenizer_dir
    return _spectra_folder(tmp_path_factory.mktemp("spectra") / "tiny-spectra", tok, vocab)


@pytest.fixture(scope="module")
def tiny_report(tiny_model, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reports") / "report"
    return validate(tiny_model, HELDOUT, baselines=True, report_dir=out, **TINY)


# --------------------------------------------------------------------------------------------------------------
# Report content
# --------------------------------------------------------------------------------------------------------------


def test_report_files_and_schema(tiny_report):
    out = Path(tiny_report["report_dir"])
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "load_heatmap.png", "gram_worst_layer.png", "cv_per_layer.png",
            "domain_expert.png"} <= names
    for png in names - {"report.json", "report.md"}:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "report.json").read_text())
    for key in ("model", "data", "tokens", "summary", "layers", "baselines", "batch_invariance", "parent"):
        assert key in saved
    assert saved["tokens"] == tiny_report["tokens"] == 1200
    assert len(saved["layers"]) == 2
    for key in ("cv", "maxvio", "gini", "min_max", "expert_entropy", "expert_entropy_norm", "collapse_rate",
                "expert_overlap", "seq_consistency", "topk_overlap", "domain_nmi", "routing_entropy",
                "gram_orthogonality", "gram_offdiag"):
        assert saved["layers"][0][key] is not None, key
    # every real token fills top_k slots in every layer
    assert all(sum(row["loads"]) == 1200 * 2 for row in saved["layers"])
    assert 0 <= saved["summary"]["routing_entropy"] <= math.log(4) + 1e-9
    assert saved["domain_expert"]["domains"] == ["code", "docs", "legal"]
    md = (out / "report.md").read_text()
    assert "| SPECTRA |" in md and "| expert-choice |" in md and "batch invariance: agree" in md


def test_loads_and_perplexity_match_a_text_by_text_run(tiny_model, tiny_report):
    """Batching, padding and masking must not change what is measured: rerun every text alone, unpadded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spectra_convert.textdata import load_texts

    model = AutoModelForCausalLM.from_pretrained(tiny_model, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = collect.tokenize_texts(tok, load_texts(HELDOUT), max_length=TINY["max_length"],
                                   max_tokens=TINY["max_tokens"])
    loads = np.zeros((2, 4))
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in texts.ids:
            x = torch.tensor([ids])
            records = []
            hooks = [r.register_forward_hook(lambda m, a, o: records.append(o[2])) for r in model.routers()]
            out = model(input_ids=x, use_cache=False)
            for h in hooks:
                h.remove()
            for layer, selected in enumerate(records):
                loads[layer] += np.bincount(selected.reshape(-1).numpy(), minlength=4)
            logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
            nll -= float(logp.gather(1, x[0, 1:, None]).sum())
            count += len(ids) - 1
    assert [row["loads"] for row in tiny_report["layers"]] == loads.astype(int).tolist()
    assert tiny_report["summary"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_batch_invariance_is_reported_and_holds(tiny_report):
    inv = tiny_report["batch_invariance"]
    assert inv["texts"] == 4 and inv["layers"] == 2
    assert inv["comparisons"] == inv["tokens"] * 2 > 0
    assert inv["disagree_right_padding"] == 0 and inv["disagree_left_padding"] == 0 and inv["agree"] is True


def test_batch_invariance_detects_batch_dependent_routing(tiny_model, tmp_path):
    """The paper-literal in-batch Sinkhorn makes routing depend on batch-mates: the check must say so."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spectra_convert.textdata import load_texts

    model = AutoModelForCausalLM.from_pretrained(tiny_model, trust_remote_code=True).eval()
    for router in model.routers():
        router.balance_mode = "in_batch"
    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = collect.tokenize_texts(tok, load_texts(HELDOUT)[:4], max_length=96)
    result = collect.batch_invariance(model, texts.ids, collect.pad_id_of(tok))
    assert result["agree"] is False
    assert result["disagree_right_padding"] > 0


def test_baselines_are_on_the_same_tokens(tiny_report):
    base = tiny_report["baselines"]
    assert set(base) == {"switch-top1", "switch-top2", "expert-choice", "hash", "loss-free-bias", "lpr"}
    rows = tiny_report["baseline_layers"]
    n = tiny_report["tokens"]
    for name in ("switch-top1", "switch-top2", "expert-choice", "hash"):
        assert all(r["tokens"] == n for r in rows[name])
    # expert choice gives every expert exactly N*k/E tokens: perfectly balanced by construction
    assert base["expert-choice"]["cv"] == pytest.approx(0.0)
    assert base["expert-choice"]["cv_worst"] == pytest.approx(0.0)
    assert 0.0 <= base["expert-choice"]["dropped"] < 1.0
    # top-1 routers put one token in each expert set: no two experts share a token
    assert base["switch-top1"]["expert_overlap"] == 0.0
    assert base["switch-top2"]["expert_overlap"] > 0.0
    # loss-free-bias is scored only on texts it was not fitted on
    assert 0 < rows["loss-free-bias"][0]["tokens"] < n
    assert math.isnan(base["hash"]["gram_orthogonality"])
    # the same linear gate serves switch, expert choice and loss-free bias
    assert base["switch-top1"]["gram_orthogonality"] == pytest.approx(base["expert-choice"]["gram_orthogonality"])


def test_lpr_row_and_baseline_perplexity(tiny_report):
    """The lpr row is fitted on half the texts and scored on the rest; every router, SPECTRA included, has a
    perplexity with its own choices driving the experts on that same half."""
    row, n = tiny_report["baselines"]["lpr"], tiny_report["tokens"]
    assert 0 < min(r["tokens"] for r in tiny_report["baseline_layers"]["lpr"]) < n
    assert 0 <= row["cv"] < 3 and 0 <= row["gini"] <= 1 and 0 <= row["min_max"] <= 1
    assert 0 <= row["seq_consistency"] <= 1 and 0 <= row["domain_nmi"] <= 1
    assert 0 < row["gram_orthogonality"] <= 1 and row["routing_entropy"] > 0
    for name, values in tiny_report["baselines"].items():
        assert math.isfinite(values["perplexity_eval_half"]) and values["perplexity_eval_half"] > 1, name
    assert math.isfinite(tiny_report["summary"]["perplexity_eval_half"])
    assert tiny_report["baselines_eval_half"]["tokens"] == row["tokens"]
    markdown = (Path(tiny_report["report_dir"]) / "report.md").read_text()
    assert "| lpr |" in markdown and "ppl (eval half)" in markdown


def test_hash_baseline_is_a_function_of_the_token_id():
    from spectra_convert.validate.baselines import hash_routing

    ids = np.array([5, 9, 5, 9, 7])
    routing = hash_routing(ids, 8, 2, seed=3)
    assert (routing.assignment[0] == routing.assignment[2]).all()
    assert routing.assignment.sum(axis=1).tolist() == [2] * 5
    assert (hash_routing(ids, 8, 2, seed=3).top1 == routing.top1).all()


def test_loss_free_bias_balances_a_skewed_gate():
    """A gate that prefers expert 0 for every token: switch collapses onto it, the fitted bias undoes that."""
    from spectra_convert.router import metrics as M
    from spectra_convert.validate.baselines import loss_free_bias, switch

    generator = torch.Generator().manual_seed(0)
    logits = 0.5 * torch.randn(4000, 8, generator=generator) + torch.tensor([3.0] + [0.0] * 7)
    gate = torch.eye(8)
    skewed = switch(logits, 2, gate)
    assert skewed.assignment[:, 0].all()  # expert 0 is in every token's top-2
    fitted = loss_free_bias(logits, 2, gate, np.arange(2000), np.arange(2000, 4000))
    assert len(fitted.token_index) == 2000
    assert M.load_cv(skewed.assignment.sum(0)) > 1.0
    assert M.load_cv(fitted.assignment.sum(0)) < 0.15


# --------------------------------------------------------------------------------------------------------------
# CLI gate
# --------------------------------------------------------------------------------------------------------------


def _run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop output of earlier steps
    with pytest.raises(SystemExit) as info:
        main(args)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


def test_cli_gate_fails_with_one_line_and_still_writes_report(tiny_model, tmp_path, capsys):
    out = tmp_path / "r"
    code, stdout, stderr = _run_cli(["validate", str(tiny_model), "--data", str(HELDOUT), "--max-cv", "0",
                                     "--report-dir", str(out), "--max-tokens", "300", "--max-length", "64"], capsys)
    assert code == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "exceeds --max-cv 0" in errors[0]
    assert "Traceback" not in stderr
    assert "SPECTRA" in stdout
    saved = json.loads((out / "report.json").read_text())
    assert saved["thresholds"]["passed"] is False and saved["tokens"] == 300


def test_cli_gate_passes(tiny_model, tmp_path, capsys):
    code, stdout, stderr = _run_cli(["validate", str(tiny_model), "--data", str(HELDOUT), "--max-cv", "100",
                                     "--report-dir", str(tmp_path / "r"), "--max-tokens", "200",
                                     "--max-length", "64"], capsys)
    assert code == 0, stderr
    assert "thresholds: passed" in stderr


def test_default_report_dir_is_not_inside_the_model(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = validate(tiny_model, HELDOUT, max_tokens=100, max_length=50)
    assert Path(report["report_dir"]) == tmp_path / "validation-tiny-spectra"
    assert not (tiny_model / "validation").exists()


def test_existing_report_dir_needs_force(tiny_model, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    with pytest.raises(UserError, match="--force"):
        validate(tiny_model, HELDOUT, report_dir=out, max_tokens=100, max_length=50)
    assert (out / "old.txt").exists()
    validate(tiny_model, HELDOUT, report_dir=out, max_tokens=100, max_length=50, force=True)
    assert not (out / "old.txt").exists() and (out / "report.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temporary folders left behind


# --------------------------------------------------------------------------------------------------------------
# Parent comparison
# --------------------------------------------------------------------------------------------------------------


def test_parent_perplexity_and_ratio(tiny_model, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    _, vocab = tokenizer_dir
    torch.manual_seed(1)
    dense = AutoModelForCausalLM.from_config(tiny_parent_config("llama", vocab_size=vocab, pad_token_id=0))
    dense.save_pretrained(tmp_path / "dense")
    report = validate(tiny_model, HELDOUT, parent=tmp_path / "dense", report_dir=tmp_path / "r", max_tokens=300,
                      max_length=64, max_ppl_ratio=100.0)
    parent = report["parent"]
    assert parent["perplexity"] > 1 and math.isfinite(parent["perplexity"])
    assert parent["ppl_ratio"] == pytest.approx(report["summary"]["perplexity"] / parent["perplexity"])
    assert parent["topk_agreement"] is None  # a dense parent has no gate to agree with
    with pytest.raises(ThresholdFailed, match="perplexity ratio"):
        validate(tiny_model, HELDOUT, parent=tmp_path / "dense", report_dir=tmp_path / "r2", max_tokens=300,
                 max_length=64, max_ppl_ratio=1e-6)
    assert (tmp_path / "r2" / "report.json").exists()


def test_rerouted_model_reports_agreement_with_the_original_gate(tokenizer_dir, tmp_path):
    """A tiny mixtral parent and a SPECTRA model holding its experts: gate agreement is measured per layer."""
    from transformers import AutoModelForCausalLM

    from spectra_convert.modeling.configuration_spectra import SpectraConfig
    from spectra_convert.modeling.modeling_spectra import SpectraForCausalLM

    tok, vocab = tokenizer_dir
    torch.manual_seed(2)
    text = tiny_parent_config("mixtral", vocab_size=vocab, pad_token_id=0)
    moe = AutoModelForCausalLM.from_config(text)
    moe.save_pretrained(tmp_path / "mixtral")
    spectra = SpectraForCausalLM(SpectraConfig(text_config=text.to_dict(),
                                               spectra={"num_experts": 4, "top_k": 2, "router_dim": 16}))
    missing = spectra.load_state_dict(moe.state_dict(), strict=False)
    assert all(".mlp.gate." in key for key in missing.missing_keys)  # only the gates are new
    spectra.save_pretrained(tmp_path / "rerouted")
    for item in tok.iterdir():
        shutil.copy(item, tmp_path / "rerouted" / item.name)
    report = validate(tmp_path / "rerouted", HELDOUT, parent=tmp_path / "mixtral", report_dir=tmp_path / "r",
                      max_tokens=300, max_length=64)
    parent = report["parent"]
    assert len(parent["layers"]) == 2
    assert 0.0 <= parent["topk_agreement"] <= 1.0
    assert 0.0 <= parent["routing_consistency"] <= parent["topk_agreement"] + 1e-9
    assert parent["model_type"] == "mixtral"
    # recompute independently, text by text without padding: the mixtral gate's own router logits -> top-2
    # against the SPECTRA routers' selected experts
    from transformers import AutoTokenizer

    from spectra_convert.textdata import load_texts
    from spectra_convert.router import metrics as M

    old_model = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    new_model = AutoModelForCausalLM.from_pretrained(tmp_path / "rerouted", trust_remote_code=True).eval()
    texts = collect.tokenize_texts(AutoTokenizer.from_pretrained(tmp_path / "rerouted"), load_texts(HELDOUT),
                                   max_length=64, max_tokens=300)
    old_sel, new_sel = [[], []], [[], []]
    with torch.no_grad():
        for ids in texts.ids:
            x = torch.tensor([ids])
            for layer, logits in enumerate(old_model(input_ids=x, output_router_logits=True).router_logits):
                old_sel[layer].append(torch.topk(logits, 2, dim=-1).indices)
            got = []
            hooks = [r.register_forward_hook(lambda m, a, o: got.append(o[2])) for r in new_model.routers()]
            new_model(input_ids=x, use_cache=False)
            for h in hooks:
                h.remove()
            for layer, selected in enumerate(got):
                new_sel[layer].append(selected)
    expected = np.mean([M.topk_agreement(torch.cat(n).numpy(), torch.cat(o).numpy())
                        for n, o in zip(new_sel, old_sel)])
    assert parent["topk_agreement"] == pytest.approx(expected)


# --------------------------------------------------------------------------------------------------------------
# Bad inputs: one line each, before any model work where possible
# --------------------------------------------------------------------------------------------------------------


def _bad_jsonl(tmp_path: Path, lines: list[str], name: str) -> Path:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_data_files(tiny_model, tmp_path):
    good = HELDOUT.read_text().splitlines()[0]
    cases = [
        (tmp_path / "missing.jsonl", "no such file"),
        (_bad_jsonl(tmp_path, [good, "{not json"], "notjson"), ":2: not valid JSON"),
        (_bad_jsonl(tmp_path, [good, good, json.dumps({"body": "x"})], "notext"), ":3: missing the 'text' field"),
    ]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases.append((empty, "no documents"))
    for path, message in cases:
        with pytest.raises(UserError, match=message):
            validate(tiny_model, path, report_dir=tmp_path / "r")
        assert not (tmp_path / "r").exists()


def test_non_spectra_model_is_a_clear_error(tokenizer_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _, vocab = tokenizer_dir
    AutoModelForCausalLM.from_config(tiny_parent_config("llama", vocab_size=vocab)).save_pretrained(tmp_path / "d")
    with pytest.raises(UserError, match="no SPECTRA routers.*spectra-convert upcycle.*spectra-convert reroute"):
        validate(tmp_path / "d", HELDOUT, report_dir=tmp_path / "r")
    code, _, stderr = _run_cli(["validate", str(tmp_path / "d"), "--data", str(HELDOUT),
                                "--report-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and stderr.strip().count("\n") == 0 and stderr.startswith("error: ") and "upcycle" in stderr


def test_missing_model_and_option_errors(tiny_model, tmp_path, capsys):
    with pytest.raises(UserError, match="no such folder"):
        validate(tmp_path / "nope", HELDOUT, report_dir=tmp_path / "r")
    with pytest.raises(UserError, match="needs --parent"):
        validate(tiny_model, HELDOUT, max_ppl_ratio=1.1, report_dir=tmp_path / "r")
    with pytest.raises(UserError, match="--max-cv"):
        validate(tiny_model, HELDOUT, max_cv=-1.0, report_dir=tmp_path / "r")
    code, _, stderr = _run_cli(["validate", str(tiny_model), "--data", str(HELDOUT), "--max-ppl-ratio", "1.1",
                                "--report-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "needs --parent" in stderr


def test_report_dir_not_writable(tiny_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="not writable"):
        validate(tiny_model, HELDOUT, report_dir=blocker / "report")
    with pytest.raises(UserError, match="not a folder"):
        validate(tiny_model, HELDOUT, report_dir=blocker)


def test_report_dir_permission_denied(tiny_model, tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(UserError, match="not writable"):
            validate(tiny_model, HELDOUT, report_dir=locked / "report")
    finally:
        locked.chmod(0o700)


# --------------------------------------------------------------------------------------------------------------
# Real model
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_upcycled_8x_top2(upcycled_smollm2, smollm2_gguf, tmp_path):
    report = validate(upcycled_smollm2, CORPUS / "mixed_eval.jsonl", parent=smollm2_gguf, baselines=True,
                      report_dir=tmp_path / "report", max_tokens=2048, max_length=256)
    summary, parent = report["summary"], report["parent"]
    assert report["num_layers"] == 30 and report["num_experts"] == 8 and report["top_k"] == 2
    # copy-upcycling with 1% noise keeps the dense model's predictions: perplexity within a few percent
    assert 0.9 < parent["ppl_ratio"] < 1.1
    assert 1 < parent["perplexity"] < 200
    assert report["batch_invariance"]["agree"] is True
    assert summary["collapse_rate"] == 0
    # Balanced before any training, on text that includes a domain calibration never saw, and far better
    # balanced than a linear switch gate over the same experts.
    assert summary["cv_worst"] < 0.25, summary
    assert summary["cv"] < 0.5 * report["baselines"]["switch-top2"]["cv"], (summary, report["baselines"])
    assert set(report["baselines"]) == {"switch-top1", "switch-top2", "expert-choice", "hash", "loss-free-bias", "lpr"}
    assert report["baselines"]["expert-choice"]["cv"] == pytest.approx(0.0)
    assert report["domain_expert"]["domains"] == ["changelog", "code", "docs", "legal"]
    print(json.dumps({"summary": summary, "parent": {k: parent[k] for k in ("perplexity", "ppl_ratio")},
                      "baselines": report["baselines"]}, indent=1, default=str))


def test_token_cap_keeps_every_domain_of_a_domain_sorted_file(tokenizer_dir):
    """mixed_eval.jsonl is sorted by domain: a cap in file order would keep only the first domains."""
    from transformers import AutoTokenizer

    from spectra_convert.textdata import load_texts

    records = load_texts(CORPUS / "mixed_eval.jsonl")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir[0])
    texts = collect.tokenize_texts(tok, records, max_length=64, max_tokens=500)
    assert sum(len(ids) for ids in texts.ids) == 500
    assert set(texts.domains) == {r.domain for r in records} == {"code", "docs", "legal", "changelog"}
    assert texts.domains[:4] == ["code", "docs", "legal", "changelog"]  # round-robin in file order of domains


def test_loss_free_bias_split_alternates_texts_within_each_domain():
    from spectra_convert.validate.baselines import split_fit_eval

    seq_ids = np.array([0, 0, 1, 1, 2, 3, 3, 4, 5])
    domains = np.array(["a", "a", "b", "b", "a", "b", "b", "a", "b"])
    fit, evaluate = split_fit_eval(seq_ids, domains)
    # texts of a: 0, 2, 4 -> fit 0, 4 / evaluate 2; texts of b: 1, 3, 5 -> fit 1, 5 / evaluate 3
    assert sorted(set(seq_ids[fit])) == [0, 1, 4, 5] and sorted(set(seq_ids[evaluate])) == [2, 3]
    fit, evaluate = split_fit_eval(np.zeros(6, dtype=int))
    assert fit.tolist() == [0, 1, 2] and evaluate.tolist() == [3, 4, 5]
