"""Values checked before any work (one table, ``spectra_convert/options.py``, used by the CLI and the recipe
loader) and options spelled the same in every verb (``-o/--output``, one dtype table, case-insensitive choices
built from the library's own tuples)."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from spectra_convert.dtypes import SPELLINGS, dtype_name
from spectra_convert.errors import UserError
from spectra_convert.options import RULES, check, resolve_choices
from spectra_convert.recipes import parse_recipe
from tests.conftest import FIXTURES, REPO

VERBS = ("upcycle", "reroute", "finetune", "validate")
TRAIN = FIXTURES / "corpus" / "train.jsonl"


def command_of(verb: str) -> click.Command:
    from spectra_convert.cli import COMMANDS

    return importlib.import_module(f"spectra_convert.commands.{COMMANDS[verb]}").command


def parse(verb: str, args: list[str]) -> dict:
    """What click hands the verb for ``args`` (real parsing and conversion, the verb itself does not run)."""
    return command_of(verb).make_context(verb, list(args)).params


@pytest.mark.parametrize("verb", VERBS)
def test_every_typed_option_of_a_verb_is_checked_by_the_table(verb: str) -> None:
    """No verb keeps a private int/float/choice option: each is typed by its row in ``options.RULES``, and each
    row names a real argument of the library function recipes call (so the table cannot drift from either)."""
    from spectra_convert.commands import _Checked

    for param in command_of(verb).params:
        if not isinstance(param, click.Option) or param.is_flag:
            continue
        if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType, click.Choice)):
            pytest.fail(f"{verb} {param.opts}: typed outside spectra_convert/options.py RULES[{verb!r}]")
        if isinstance(param.type, _Checked):
            assert param.type.rule is RULES[verb][param.name], (verb, param.name)
    from spectra_convert.recipes import _stage_functions

    arguments = inspect.signature(_stage_functions()[verb]).parameters
    for key in RULES[verb]:
        assert key in arguments, f"RULES[{verb!r}][{key!r}] is no argument of {verb}()"


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["upcycle", "M", "-o", "OUT", "--calibration-tokens", "0"], "--calibration-tokens must be at least 1, got 0"),
    (["finetune", "M", "--data", "D", "-o", "OUT", "--mode", "router", "--lr-router", "-1"],
     "--lr-router must be greater than 0, got -1"),
])
def test_cli_refuses_a_bad_value_in_one_line_before_any_work(args: list[str], message: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "spectra_convert", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"error: {message}" or done.stderr.strip().startswith(f"error: {message}")
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("verb, option, value, message", [
    ("upcycle", "--experts", "1", "--experts must be at least 2, got 1"),
    ("upcycle", "--noise", "-0.5", "--noise must be at least 0, got -0.5"),
    ("upcycle", "--router-dim", "0", "--router-dim must be at least 1, got 0"),
    ("upcycle", "--dtype", "int8", "--dtype 'int8': expected one of fp32, float32, bf16"),
    ("upcycle", "--method", "clone", "--method 'clone': expected one of copy"),
    ("reroute", "--calibration-tokens", "-3", "--calibration-tokens must be at least 1, got -3"),
    ("reroute", "--router-init", "random", "--router-init 'random': expected one of orthogonal"),
    ("finetune", "--lr", "0", "--lr must be greater than 0, got 0"),
    ("finetune", "--seq-len", "1", "--seq-len must be at least 2, got 1"),
    ("finetune", "--batch-size", "2.5", "--batch-size must be an integer, got '2.5'"),
    ("finetune", "--max-grad-norm", "-1", "--max-grad-norm must be at least 0"),
    ("finetune", "--recalibration-tokens", "0", "--recalibration-tokens must be at least 1"),
    ("validate", "--max-tokens", "0", "--max-tokens must be at least 1, got 0"),
    ("validate", "--max-ppl-ratio", "0", "--max-ppl-ratio must be greater than 0"),
    ("validate", "--dtype", "float8", "--dtype 'float8': expected one of fp32"),
    ("validate", "--max-cv", "nan", "--max-cv must be a finite number, got nan"),
    ("finetune", "--steps", "fifty", "--steps must be an integer, got 'fifty'"),
])
def test_every_numeric_and_choice_option_is_checked(verb: str, option: str, value: str, message: str) -> None:
    base = {"upcycle": ["M", "-o", "O"], "reroute": ["M", "-o", "O"], "validate": ["M", "--data", "D"],
            "finetune": ["M", "--data", "D", "-o", "O", "--mode", "router"]}[verb]
    with pytest.raises(UserError) as info:
        parse(verb, [*base, option, value])
    assert str(info.value).startswith(message)


def _recipe(tmp_path: Path, **stages) -> Path:
    data = {"model": "m", "upcycle": {"experts": 8}, "finetune": {"data": str(TRAIN), "mode": "router"}}
    for stage, block in stages.items():
        data[stage] = {**data.get(stage, {}), **block}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("stage, key, value, flag, cli_value", [
    ("finetune", "steps", "fifty", "--steps", "fifty"),
    ("finetune", "lr_router", -1, "--lr-router", "-1"),
    ("finetune", "seq_len", True, "--seq-len", None),  # YAML `yes`: a bool is no integer
    ("upcycle", "calibration_tokens", 0, "--calibration-tokens", "0"),
    ("upcycle", "top_k", 9, None, None),  # relation: top_k <= experts (8)
    ("upcycle", "dtype", "int4", "--dtype", "int4"),
    ("finetune", "merge", True, None, None),  # relation: merge needs mode lora
])
def test_recipe_values_are_refused_at_load_time_as_the_cli_refuses_them(tmp_path, stage, key, value, flag,
                                                                         cli_value) -> None:
    path = _recipe(tmp_path, **{stage: {key: value}})
    with pytest.raises(UserError) as recipe_error:
        parse_recipe(yaml.safe_load(path.read_text()), path)
    assert f"{stage}.{key}" in str(recipe_error.value) and "\n" not in str(recipe_error.value)
    if flag is not None and cli_value is not None:  # the CLI says the same, naming the flag
        base = ["M", "-o", "O"] if stage == "upcycle" else ["M", "--data", "D", "-o", "O", "--mode", "router"]
        with pytest.raises(UserError) as cli_error:
            parse(stage, [*base, flag, cli_value])
        assert str(cli_error.value).replace(flag, "") == str(recipe_error.value).split(f"{stage}.{key}", 1)[1]


@pytest.mark.slow
def test_dry_run_refuses_what_the_real_run_would(tmp_path: Path) -> None:
    """`steps: fifty` passed `run --dry-run` and crashed the real run after the upcycle; now both refuse it
    before anything is written."""
    path = _recipe(tmp_path, finetune={"steps": "fifty"})
    for extra in (["--dry-run"], []):
        done = subprocess.run([sys.executable, "-m", "spectra_convert", "run", str(path), "-o",
                               str(tmp_path / "out"), *extra], capture_output=True, text=True, timeout=300,
                              env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == f"error: {path}: finetune.steps must be an integer, got 'fifty'"
        assert not (tmp_path / "out").exists()


def test_recipe_inputs_and_spectra_values_are_checked_at_load_time(tmp_path: Path) -> None:
    missing = _recipe(tmp_path, finetune={"eval_data": "no-such.jsonl"})
    with pytest.raises(UserError, match=r"finetune\.eval_data: .*no-such\.jsonl does not exist"):
        parse_recipe(yaml.safe_load(missing.read_text()), missing)
    bad_knob = _recipe(tmp_path, upcycle={"spectra": {"balance_mode": "batch"}})
    with pytest.raises(UserError, match=r"spectra\.balance_mode must be one of"):
        parse_recipe(yaml.safe_load(bad_knob.read_text()), bad_knob)


def test_numbers_written_as_text_are_read_like_the_cli_reads_them() -> None:
    """PyYAML reads `5e-5` as a string; the CLI reads every value from text: both give the number."""
    assert check(RULES["finetune"]["lr_router"], "5e-5", "x") == 5e-5
    assert check(RULES["finetune"]["steps"], "50", "x") == 50
    with pytest.raises(UserError, match="x must be an integer, got 50.5"):
        check(RULES["finetune"]["steps"], 50.5, "x")


# -- one spelling everywhere -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling, canonical", [("fp32", "float32"), ("FLOAT32", "float32"), ("bf16", "bfloat16"),
                                                 ("BFloat16", "bfloat16"), ("fp16", "float16"),
                                                 ("float16", "float16"), ("torch.bfloat16", "bfloat16")])
def test_one_dtype_table_accepts_both_spellings_in_any_case(spelling: str, canonical: str) -> None:
    import torch

    from spectra_convert.dtypes import torch_dtype

    assert dtype_name(spelling) == canonical and torch_dtype(spelling) == getattr(torch, canonical)
    assert parse("upcycle", ["M", "-o", "O", "--dtype", spelling])["dtype"] == canonical
    assert parse("validate", ["M", "--data", "D", "--dtype", spelling])["dtype"] == canonical
    path_rule = RULES["upcycle"]["dtype"]
    assert check(path_rule, spelling, "upcycle.dtype") == canonical  # what a recipe gets
    assert parse("validate", ["M", "--data", "D", "--dtype", "AUTO"])["dtype"] == "auto"


def test_choices_come_from_the_library_tuples_and_match_any_case() -> None:
    from spectra_convert.finetune.modes import MODES
    from spectra_convert.surgery import reroute, upcycle

    assert resolve_choices(RULES["upcycle"]["method"].choices) == upcycle.METHODS
    from spectra_convert.surgery import carve

    assert resolve_choices(RULES["upcycle"]["carve_grouping"].choices) == carve.GROUPINGS
    assert resolve_choices(RULES["reroute"]["router_init"].choices) == reroute.INIT_METHODS
    assert resolve_choices(RULES["finetune"]["mode"].choices) == tuple(MODES)
    params = parse("finetune", ["M", "--data", "D", "-o", "O", "--mode", "LORA"])
    assert params["mode"] == "lora"
    assert parse("upcycle", ["M", "-o", "O", "--method", "Carve", "--carve-grouping", "RANDOM"])["carve_grouping"] == "random"


@pytest.mark.parametrize("verb", ["upcycle", "reroute", "finetune", "run", "study"])
def test_every_verb_that_writes_a_folder_takes_o_and_output_and_still_the_old_out(verb: str) -> None:
    command = command_of(verb)
    output = next(p for p in command.params if "--output" in getattr(p, "opts", []))
    assert {"-o", "--output", "--out"} <= set(output.opts)
    help_text = command.get_help(click.Context(command, info_name=verb))
    assert "-o, --output" in help_text and "--out " not in help_text and "--out," not in help_text


@pytest.mark.slow
def test_help_shows_choices_and_dtype_spellings() -> None:
    done = subprocess.run([sys.executable, "-m", "spectra_convert", "upcycle", "--help"], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "[" + "|".join(SPELLINGS) + "]" in done.stdout
    from spectra_convert.surgery.upcycle import METHODS

    assert "--method [" + "|".join(METHODS) + "]" in done.stdout


def test_existing_recipes_and_readme_use_spellings_that_parse() -> None:
    """The shipped recipes still load (their dtype names included) and the README's commands use -o."""
    for recipe in (REPO / "recipes").glob("*.yaml"):
        if recipe.name.startswith("study-"):
            continue
        parse_recipe(yaml.safe_load(recipe.read_text()), recipe)
    readme = (REPO / "README.md").read_text()
    assert " --out " not in readme
