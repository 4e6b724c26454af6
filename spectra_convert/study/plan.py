"""The study PLAN: which variants to convert, fine-tune and validate, and on what budget.

::

    name: smollm2-cpu-ablations
    seed: 0
    convert:  {experts: 4, top_k: 2, calibration_tokens: 2048}      # upcycle() arguments shared by all variants
    finetune: {steps: 20, seq_len: 128, batch_size: 2, log_every: 2} # the short router fine-tune budget
    validate: {max_tokens: 4096, nmi: true, baselines: true}
    variants:
      - name: full                                  # the reference row (and the experts the baselines route)
      - name: no-gru
        spectra: {use_gru: false}                   # any SPECTRA_DEFAULTS knob
      - name: temperature
        sweep: {temperature: [0.05, 0.2]}           # expands to temperature=0.05 and temperature=0.2
      - name: lpr
        router: lpr                                 # the Latent Prototype Routing competitor (lpr_variant.py)
        lpr: {metric: cosine}                       # optional LPRSettings fields

Why a closed schema: a typo in a variant (``spectr:``) would otherwise silently run the reference model under
another name and the ablation table would lie. Every unknown key is a one-line ``UserError`` naming the key
and the allowed ones. The ``convert`` / ``finetune`` / ``validate`` blocks accept exactly the keyword arguments
of ``upcycle`` / ``finetune`` / ``validate`` that the study does not wire itself (read from the signatures).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..modeling.configuration_spectra import SPECTRA_DEFAULTS
from ..recipes import _read_yaml, allowed_stage_keys, check_keys, check_stage_values

PLAN_KEYS = ("name", "description", "seed", "keep_models", "convert", "finetune", "validate", "variants")
VARIANT_KEYS = ("name", "description", "spectra", "convert", "finetune", "sweep", "router", "lpr")
#: ``router`` of a variant: SPECTRA (the default) or LPR on the same conversion's experts.
ROUTERS = ("spectra", "lpr")
#: Study-only validate keys: ``nmi`` requires a ``domain`` on every eval record (balance vs specialisation).
VALIDATE_EXTRA = ("nmi",)
_FINETUNE_WIRED = {"data", "eval_data", "log_file", "launch", "launch_args"}
_VALIDATE_WIRED = {"data", "parent", "max_cv", "max_ppl_ratio"}

#: Knobs that only change how a converted model routes/trains, not its parameters: variants differing only in
#: these share one conversion (its config edited and its dual bias re-calibrated, see derive.py).
RUNTIME_KNOBS = ("temperature", "repulsion", "sinkhorn_iters", "balance_mode", "sequence_balance", "bias_ema",
                 "bias_update_rate", "router_entropy_coef", "ortho_loss_coef", "router_aux_loss_coef")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


def convert_keys() -> list[str]:
    return allowed_stage_keys("upcycle") + ["gguf_file"]


def finetune_keys() -> list[str]:
    return [k for k in allowed_stage_keys("finetune") if k not in _FINETUNE_WIRED]


def validate_keys() -> list[str]:
    return [k for k in allowed_stage_keys("validate") if k not in _VALIDATE_WIRED] + list(VALIDATE_EXTRA)


@dataclass
class Variant:
    """One row of the study: fully resolved arguments for its conversion, fine-tune and validation."""

    name: str
    spectra: dict[str, Any]  # every knob that differs from SPECTRA_DEFAULTS (plan-wide + variant)
    convert: dict[str, Any]  # upcycle() keyword arguments (without spectra)
    finetune: dict[str, Any]
    description: str = ""
    router: str = "spectra"
    lpr: dict[str, Any] = field(default_factory=dict)  # LPRSettings fields (router: lpr only)

    def conversion_key(self) -> str:
        """Variants with the same key share one upcycle run (they differ only in RUNTIME_KNOBS)."""
        shape = {k: v for k, v in self.spectra.items() if k not in RUNTIME_KNOBS}
        return json.dumps({"convert": self.convert, "spectra": shape}, sort_keys=True, default=str)

    def runtime_knobs(self) -> dict[str, Any]:
        return {k: v for k, v in self.spectra.items() if k in RUNTIME_KNOBS}


@dataclass
class Plan:
    name: str
    seed: int
    convert: dict[str, Any]
    finetune: dict[str, Any]
    validate: dict[str, Any]
    variants: list[Variant]
    keep_models: bool = False
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def wants_nmi(self) -> bool:
        return bool(self.validate.get("nmi", False))

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a study folder to be resumed (the resolved plan)."""
        return json.loads(json.dumps({
            "name": self.name, "seed": self.seed, "convert": self.convert, "finetune": self.finetune,
            "validate": self.validate,
            "variants": [{"name": v.name, "spectra": v.spectra, "convert": v.convert, "finetune": v.finetune,
                          **({"router": v.router, "lpr": v.lpr} if v.router != "spectra" else {})}
                         for v in self.variants],
        }, sort_keys=True, default=str))


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping, got {value!r}")
    return dict(value)


def _check_knobs(knobs: dict[str, Any], where: str) -> None:
    for name in knobs:
        if name not in SPECTRA_DEFAULTS:
            raise UserError(f"{where}: unknown spectra field {name!r}; allowed fields: {', '.join(SPECTRA_DEFAULTS)}")
    for owned in ("num_experts", "top_k", "router_dim"):
        if owned in knobs:
            arg = {"num_experts": "experts"}.get(owned, owned)
            raise UserError(f"{where}: set {owned} with the convert key {arg!r}, not under spectra")


def _resolve_paths(block: dict[str, Any], base: Path) -> dict[str, Any]:
    if block.get("calibration"):
        path = Path(block["calibration"]).expanduser()
        block["calibration"] = str(path if path.is_absolute() else (base / path).resolve())
    return block


def _expand(entry: dict[str, Any], where: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, spectra) pairs: one, or the cartesian product of a sweep."""
    name = entry["name"]
    spectra = _mapping(entry.get("spectra"), f"{where}.spectra")
    sweep = _mapping(entry.get("sweep"), f"{where}.sweep")
    if not sweep:
        return [(name, spectra)]
    _check_knobs(sweep, f"{where}.sweep")
    for knob, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}.sweep.{knob} must be a non-empty list of values, got {values!r}")
    out = []
    for combo in itertools.product(*sweep.values()):
        suffix = ",".join(f"{k}={v}" for k, v in zip(sweep, combo))
        plain = list(sweep) == [name]  # `name: temperature, sweep: {temperature: [...]}` -> temperature=0.05
        out.append((suffix if plain else f"{name}-{suffix}", {**spectra, **dict(zip(sweep, combo))}))
    return out


def _router(entry: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """(router, LPR settings) of a variant; an LPR variant takes no SPECTRA knobs (it routes without them)."""
    from dataclasses import fields

    from ..validate.lpr import LPRSettings

    router = entry.get("router", "spectra")
    if router not in ROUTERS:
        raise UserError(f"{where}: router must be one of {', '.join(ROUTERS)}, got {router!r}")
    lpr = _mapping(entry.get("lpr"), f"{where}.lpr")
    if router != "lpr":
        if lpr:
            raise UserError(f"{where}: lpr settings need router: lpr")
        return router, {}
    for key in ("spectra", "sweep"):
        if entry.get(key):
            raise UserError(f"{where}: router lpr routes the shared conversion's experts without SPECTRA knobs; "
                            f"remove {key}")
    check_keys(f"{where}.lpr", lpr, [f.name for f in fields(LPRSettings)])
    try:
        LPRSettings(**lpr)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}.lpr: {exc}") from None
    return router, lpr


def parse_plan(data: Any, path: Path) -> Plan:
    """Validate a loaded plan mapping; relative calibration paths are resolved against the plan's folder."""
    where = str(path)
    if not isinstance(data, dict):
        raise UserError(f"{where}: a plan is a YAML mapping of keys ({', '.join(PLAN_KEYS)})")
    check_keys(where, data, PLAN_KEYS)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{where}: seed must be an integer, got {seed!r}")
    base = path.resolve().parent
    convert = _resolve_paths(_mapping(data.get("convert"), f"{where}: convert"), base)
    check_keys(f"{where}: convert", convert, convert_keys())
    convert = check_stage_values("upcycle", convert, f"{where}: convert")
    plan_spectra = _mapping(convert.pop("spectra", None), f"{where}: convert.spectra")
    _check_knobs(plan_spectra, f"{where}: convert.spectra")
    finetune = _mapping(data.get("finetune"), f"{where}: finetune")
    check_keys(f"{where}: finetune", finetune, finetune_keys())
    finetune = check_stage_values("finetune", finetune, f"{where}: finetune")
    validate = _mapping(data.get("validate"), f"{where}: validate")
    check_keys(f"{where}: validate", validate, validate_keys())
    validate = check_stage_values("validate", validate, f"{where}: validate")
    entries = data.get("variants")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{where}: variants must be a non-empty list (each with at least a name)")
    variants: list[Variant] = []
    for index, entry in enumerate(entries):
        vwhere = f"{where}: variants[{index}]"
        if not isinstance(entry, dict):
            raise UserError(f"{vwhere} must be a mapping with a name, got {entry!r}")
        label = entry.get("name", index)
        vwhere = f"{where}: variant {label!r}"
        check_keys(vwhere, entry, VARIANT_KEYS)
        if not isinstance(entry.get("name"), str) or not _NAME.match(entry["name"]):
            raise UserError(f"{vwhere}: name must be a non-empty string of letters, digits and ._=+- (it names a folder)")
        spectra = _mapping(entry.get("spectra"), f"{vwhere}.spectra")
        _check_knobs(spectra, f"{vwhere}.spectra")
        vconvert = _resolve_paths(_mapping(entry.get("convert"), f"{vwhere}.convert"), base)
        check_keys(f"{vwhere}.convert", vconvert, [k for k in convert_keys() if k != "spectra"])
        vconvert = check_stage_values("upcycle", vconvert, f"{vwhere}.convert")
        vfinetune = _mapping(entry.get("finetune"), f"{vwhere}.finetune")
        check_keys(f"{vwhere}.finetune", vfinetune, finetune_keys())
        vfinetune = check_stage_values("finetune", vfinetune, f"{vwhere}.finetune")
        merged_ft = {**finetune, **vfinetune}
        if merged_ft.get("mode", "router") == "lora" and not merged_ft.get("merge"):
            raise UserError(f"{vwhere}: finetune mode lora writes an adapter folder, which validate cannot route; "
                            "use mode router or set merge: true")
        router, lpr = _router(entry, vwhere)
        for name, knobs in _expand(entry, vwhere):
            variants.append(Variant(name=name, spectra={**plan_spectra, **knobs}, convert={**convert, **vconvert},
                                    finetune={**finetune, **vfinetune}, description=str(entry.get("description", "")),
                                    router=router, lpr=lpr))
    names = [v.name for v in variants]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"{where}: variant name {duplicate!r} appears twice; names must be unique")
    return Plan(name=str(data.get("name") or path.stem), seed=seed, convert=convert, finetune=finetune,
                validate=validate, variants=variants, keep_models=bool(data.get("keep_models", False)),
                description=str(data.get("description", "")), raw=data)


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    return parse_plan(_read_yaml(path), path)
