"""``spectra-convert study`` (issue 8 items 2-4): plan schema and bad input, resume, and one end-to-end study
with two variants on a tiny dense llama (random weights: orchestration and bookkeeping, not quality)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from spectra_convert.cli import main
from spectra_convert.errors import UserError
from spectra_convert.study import load_plan, parse_plan, read_results, run_study
from spectra_convert.study.dynamics import overlap_from_cooccurrence
from spectra_convert.router import metrics as M
from tests.study_helpers import FIXTURES, build_dense_llama

RECIPES = Path(__file__).parents[1] / "recipes"
TRAIN, EVAL = FIXTURES / "train.jsonl", FIXTURES / "mixed_eval.jsonl"

TINY_PLAN = {
    "name": "tiny", "seed": 0,
    "convert": {"experts": 4, "top_k": 2, "router_dim": 16, "calibration_tokens": 512},
    "finetune": {"steps": 4, "seq_len": 64, "batch_size": 2, "log_every": 2, "save_every": 2, "lr_router": 0.001},
    "validate": {"max_tokens": 768, "nmi": True, "baselines": True},
    "variants": [{"name": "full"}, {"name": "no-repulsion", "spectra": {"repulsion": 0.0}}],
}


def _parse(data: dict, tmp_path: Path):
    return parse_plan(data, tmp_path / "plan.yaml")


def _bad(data: dict, tmp_path: Path, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        _parse(data, tmp_path)
    assert "\n" not in str(info.value)


# -- plan schema ------------------------------------------------------------------------------------------------


def test_shipped_plans_parse() -> None:
    cpu = load_plan(RECIPES / "study-smollm2-cpu.yaml")
    assert [v.name for v in cpu.variants] == ["full", "no-gru", "no-projector", "no-repulsion", "no-ortho", "in-batch",
                                              "lpr"]
    assert cpu.variants[-1].router == "lpr"
    assert cpu.convert["experts"] == 4 and cpu.finetune["steps"] <= 20 and cpu.validate["max_tokens"] <= 4096
    assert len({v.conversion_key() for v in cpu.variants}) == 3  # full (+ runtime variants), no-gru, no-projector
    full = load_plan(RECIPES / "study-gpt2-medium-a100.yaml")
    assert full.convert["experts"] == 8 and full.convert["top_k"] == 2
    names = [v.name for v in full.variants]
    for seed_variant in ("full", "no-expression", "no-gru", "no-speciality-penalty", "no-ortho", "simple-router"):
        assert seed_variant in names
    assert "temperature=0.05" in names and "sinkhorn-sinkhorn_iters=3" in names


def test_sweeps_expand_and_runtime_variants_share_a_conversion(tmp_path: Path) -> None:
    plan = _parse({**TINY_PLAN, "variants": [
        {"name": "full"}, {"name": "no-gru", "spectra": {"use_gru": False}},
        {"name": "temperature", "sweep": {"temperature": [0.05, 0.2]}},
        {"name": "grid", "spectra": {"balance_mode": "in_batch"}, "sweep": {"sinkhorn_iters": [1, 5], "repulsion": [0.0]}},
    ]}, tmp_path)
    names = [v.name for v in plan.variants]
    assert names == ["full", "no-gru", "temperature=0.05", "temperature=0.2", "grid-sinkhorn_iters=1,repulsion=0.0",
                     "grid-sinkhorn_iters=5,repulsion=0.0"]
    by_name = {v.name: v for v in plan.variants}
    assert by_name["grid-sinkhorn_iters=5,repulsion=0.0"].spectra == {"balance_mode": "in_batch", "sinkhorn_iters": 5,
                                                                      "repulsion": 0.0}
    keys = {v.name: v.conversion_key() for v in plan.variants}
    assert keys["full"] == keys["temperature=0.05"] == keys["grid-sinkhorn_iters=1,repulsion=0.0"]
    assert keys["no-gru"] != keys["full"]
    assert by_name["temperature=0.2"].finetune == TINY_PLAN["finetune"]


def test_unknown_variant_field_names_the_field_and_the_allowed_ones(tmp_path: Path) -> None:
    bad = {**TINY_PLAN, "variants": [{"name": "full"}, {"name": "x", "spectr": {"repulsion": 0}}]}
    _bad(bad, tmp_path, r"variant 'x': unknown key 'spectr'; allowed keys: name, description, spectra, convert, "
                        r"finetune, sweep")
    _bad({**TINY_PLAN, "variants": [{"name": "x", "spectra": {"repulson": 0}}]}, tmp_path,
         r"variant 'x'\.spectra: unknown spectra field 'repulson'; allowed fields: .*repulsion")
    _bad({**TINY_PLAN, "variants": [{"name": "x", "sweep": {"temperature": 0.1}}]}, tmp_path,
         r"sweep\.temperature must be a non-empty list")
    _bad({**TINY_PLAN, "variants": [{"name": "x", "finetune": {"step": 3}}]}, tmp_path,
         r"variant 'x'\.finetune: unknown key 'step'; allowed keys: .*steps")
    _bad({**TINY_PLAN, "variants": [{"name": "a"}, {"name": "a"}]}, tmp_path, "'a' appears twice")
    _bad({**TINY_PLAN, "variants": [{"name": "../evil"}]}, tmp_path, "name must be")
    _bad({**TINY_PLAN, "variants": []}, tmp_path, "variants must be a non-empty list")
    _bad({**TINY_PLAN, "sweeps": []}, tmp_path, r"unknown key 'sweeps'; allowed keys: name, description, seed")
    _bad({**TINY_PLAN, "validate": {"max_cv": 0.1}}, tmp_path, r"validate: unknown key 'max_cv'")
    _bad({**TINY_PLAN, "convert": {"experts": 4, "spectra": {"top_k": 1}}}, tmp_path, "set top_k with the convert key")
    _bad({**TINY_PLAN, "finetune": {"mode": "lora"}}, tmp_path, "use mode router or set merge: true")


def test_cooccurrence_overlap_matches_validate_metric() -> None:
    rng = np.random.default_rng(0)
    selected = np.stack([rng.choice(6, size=2, replace=False) for _ in range(300)])
    assignment = M.assignment_matrix(selected, 6)
    co = assignment.T.astype(float) @ assignment.astype(float)
    assert overlap_from_cooccurrence(co) == pytest.approx(M.expert_overlap(assignment), abs=1e-12)


# -- bad input before any work ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dense_llama(tmp_path_factory.mktemp("dense") / "tiny-llama")


def _write_plan(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_eval_without_domain_is_refused_when_plan_asks_for_nmi(tmp_path: Path, dense: Path) -> None:
    no_domain = tmp_path / "eval.jsonl"
    no_domain.write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n"
                                 for line in EVAL.read_text().splitlines()[:10]))
    plan = _write_plan(tmp_path / "plan.yaml", TINY_PLAN)
    with pytest.raises(UserError, match=r"the plan asks for domain NMI \(validate.nmi: true\) but no record has a "
                                        r"'domain' field"):
        run_study(str(dense), TRAIN, no_domain, plan, tmp_path / "study")
    assert not (tmp_path / "study").exists()


def test_cli_unknown_variant_field_is_one_line_exit_2(tmp_path: Path, dense: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    plan = _write_plan(tmp_path / "plan.yaml", {**TINY_PLAN, "variants": [{"name": "v", "ablate": "gru"}]})
    with pytest.raises(SystemExit) as info:
        main(["study", str(dense), "--data", str(TRAIN), "--eval", str(EVAL), "--plan", str(plan),
              "-o", str(tmp_path / "study")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "'ablate'" in err and "allowed keys" in err and "\n" not in err


def test_foreign_folder_is_never_deleted(tmp_path: Path, dense: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    plan = _write_plan(tmp_path / "plan.yaml", TINY_PLAN)
    for force in (False, True):
        with pytest.raises(UserError, match="not a study folder"):
            run_study(str(dense), TRAIN, EVAL, plan, out, force=force)
    assert (out / "thesis.tex").read_text() == "keep me"


# -- end to end ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, dense: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("study")
    plan = _write_plan(root / "plan.yaml", TINY_PLAN)
    result = run_study(str(dense), TRAIN, EVAL, plan, root / "out")
    assert result.ran == ["full", "no-repulsion"] and result.skipped == []
    return root / "out", plan


def test_study_results_summary_and_plots(study: tuple[Path, Path]) -> None:
    out, _ = study
    rows = read_results(out)
    assert [r["variant"] for r in rows] == ["full", "no-repulsion"]
    full, derived = rows
    assert not full["derived"] and derived["derived"] and derived["conversion"] == "full"
    assert derived["spectra"] == {"repulsion": 0.0}
    assert full["tokens"] == derived["tokens"] == 768  # the same eval tokens for every variant
    for row in rows:
        m = row["metrics"]
        assert 0.0 <= m["routing_consistency"] <= 1.0 and 0.0 <= m["expert_overlap"] <= 1.0
        assert m["perplexity"] > 1 and math.isfinite(m["cv"]) and m["domain_nmi"] is not None
        assert [d["step"] for d in row["dynamics"]] == [2, 4]
        for d in row["dynamics"]:
            assert d["routing_entropy"] > 0 and 0 < d["expert_overlap"] < 1 and 0 < d["gram_orthogonality"] <= 1
        assert row["finetune"]["steps"] == 4 and row["batch_invariance_agree"] is True
    assert set(full["baselines"]) >= {"switch-top2", "expert-choice", "hash"} and derived["baselines"] == {}
    # the derived variant really routes with its knob and a re-calibrated bias
    config = json.loads((out / "variants/no-repulsion/validate/report.json").read_text())
    assert config["model"].endswith("variants/no-repulsion/finetuned")
    summary = (out / "summary.md").read_text()
    header = ("| Variant | Expert Overlap | Gram Ortho | Load Balance CV | Routing Consistency | Sequential Consistency "
              "| Perplexity |")
    assert header in summary
    assert "| full |" in summary and "| no-repulsion |" in summary and "baseline: hash (full experts)" in summary
    for name in ("dynamics-cv", "dynamics-entropy", "dynamics-gram", "dynamics-overlap", "balance-vs-specialisation"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert not (out / "conversions").exists() and not (out / "variants/full/finetuned").exists()  # models cleaned


def test_dir_with_other_plan_needs_force_same_plan_needs_resume(study: tuple[Path, Path], tmp_path: Path,
                                                                dense: Path) -> None:
    out, plan = study
    other = _write_plan(tmp_path / "other.yaml", {**TINY_PLAN, "seed": 1})
    with pytest.raises(UserError, match=r"holds a study with a different plan or inputs \(plan\.seed: 0 then, 1 now\); "
                                        r"pass --force"):
        run_study(str(dense), TRAIN, EVAL, other, out)
    with pytest.raises(UserError, match=r"already holds this study \(2 of 2 variants done\); pass --resume"):
        run_study(str(dense), TRAIN, EVAL, plan, out)
    again = run_study(str(dense), TRAIN, EVAL, plan, out, resume=True)
    assert again.ran == [] and again.skipped == ["full", "no-repulsion"]


def test_killed_study_resumes_where_it_stopped(study: tuple[Path, Path], tmp_path: Path, dense: Path) -> None:
    out, plan = study
    copy = tmp_path / "killed"
    shutil.copytree(out, copy)
    lines = (copy / "results.jsonl").read_text().splitlines()
    # killed while the second variant ran: its line torn mid-write, its folder half-done
    (copy / "results.jsonl").write_text(lines[0] + "\n" + lines[1][:40])
    shutil.rmtree(copy / "variants" / "no-repulsion")
    (copy / "summary.md").unlink()
    resumed = run_study(str(dense), TRAIN, EVAL, plan, copy, resume=True)
    assert resumed.ran == ["no-repulsion"] and resumed.skipped == ["full"]
    rows = read_results(copy)
    assert [r["variant"] for r in rows] == ["full", "no-repulsion"]
    first, again = json.loads(lines[1])["metrics"], rows[1]["metrics"]
    for key, value in first.items():  # same tokens, same seed: the re-run variant reproduces its numbers
        assert again[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    assert (copy / "summary.md").is_file()
    forced = run_study(str(dense), TRAIN, EVAL, plan, copy, force=True)
    assert forced.ran == ["full", "no-repulsion"]
