"""The one table of option constraints: the type, range and choices of every value a verb takes.

Why one table: the click shells (``commands/``) and the recipe and study-plan loaders (``recipes.py``,
``study/plan.py``) check values against the same rules before any work starts, so ``run --dry-run`` refuses
exactly what a real run would refuse (``steps: fifty`` used to pass a dry run, then crash a real one after a
2.7 GB upcycle), with the same one-line message naming the option. Keys are the library functions' keyword
arguments (what a recipe writes); the CLI names the flag instead.

Choices come from the library's own tuples (``upcycle.METHODS`` ...), named as ``"module:ATTRIBUTE"`` and read
the first time they are needed: a method added to the library is offered by the CLI and accepted by recipes
with no edit here, and ``spectra-convert --help`` still imports no torch. Choices match case-insensitively.

This module imports only the standard library, ``errors`` and ``dtypes`` (click only inside ``Checked``'s
users), so every floor of the package may use it.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .dtypes import SPELLINGS, dtype_name
from .errors import UserError


@dataclass(frozen=True)
class Rule:
    """What one value must be. ``kind``: int | float | choice | dtype | path | strings."""

    kind: str
    min: float | None = None  # value >= min
    above: float | None = None  # value > above
    max: float | None = None  # value <= max
    choices: str | tuple[str, ...] | None = None  # a tuple, or "module:ATTRIBUTE" naming the library's own
    optional: bool = False  # None accepted (the library's default applies)
    extra: tuple[str, ...] = ()  # dtype: other accepted words (validate's "auto")

    def allowed(self) -> tuple[str, ...]:
        """The choices (``choice``) or dtype spellings (``dtype``) in help order."""
        if self.kind == "dtype":
            return SPELLINGS + self.extra
        return resolve_choices(self.choices) if self.choices is not None else ()


_INT, _FLOAT = "int", "float"
_POSITIVE = Rule(_INT, min=1)
_SEED = Rule(_INT, min=0)
_INPUT = Rule("path", optional=True)

#: verb -> keyword argument -> rule. Every numeric or choice option of the verbs' click shells is here (tested).
RULES: dict[str, dict[str, Rule]] = {
    "upcycle": {
        "experts": Rule(_INT, min=2),
        "top_k": _POSITIVE,
        "method": Rule("choice", choices="spectra_convert.surgery.upcycle:METHODS"),
        "noise": Rule(_FLOAT, min=0),
        "drop_ratio": Rule(_FLOAT, min=0, max=1),
        "shared_fraction": Rule(_FLOAT, above=0, max=0.99, optional=True),
        "carve_grouping": Rule("choice", choices="spectra_convert.surgery.carve:GROUPINGS"),
        "carve_refit": Rule("choice", choices="spectra_convert.surgery.carve_upcycle:REFITS"),
        "router_steps": Rule(_INT, min=0),
        "skipped_estimate_rank": Rule(_INT, min=0, optional=True),
        "carve_bias": Rule("choice", choices="spectra_convert.modeling.configuration_spectra:CARVE_BIAS_RULES",
                           optional=True),
        "router_dim": _POSITIVE,
        "router_init": Rule("choice", choices="spectra_convert.surgery.upcycle:ROUTER_INITS"),
        "calibration": _INPUT,
        "calibration_tokens": _POSITIVE,
        "dtype": Rule("dtype", optional=True),
        "seed": _SEED,
    },
    "reroute": {
        "router_init": Rule("choice", choices="spectra_convert.surgery.reroute:INIT_METHODS"),
        "calibration": _INPUT,
        "calibration_tokens": _POSITIVE,
        "router_dim": _POSITIVE,
        "seed": _SEED,
    },
    "finetune": {
        "data": Rule("path"),
        "mode": Rule("choice", choices="spectra_convert.finetune.modes:MODES"),
        "routers": Rule("choice", choices="spectra_convert.finetune.modes:ROUTER_TRAINING"),
        "steps": _POSITIVE,
        "seq_len": Rule(_INT, min=2),
        "batch_size": _POSITIVE,
        "grad_accum": _POSITIVE,
        "lr_router": Rule(_FLOAT, above=0),
        "lr": Rule(_FLOAT, above=0),
        "lr_schedule": Rule("choice", choices="spectra_convert.finetune.schedule:SCHEDULES"),
        "lr_decay_steps": Rule(_INT, min=1, optional=True),
        "lr_decay_start": Rule(_INT, min=0),
        "lora_r": _POSITIVE,
        "lora_alpha": _POSITIVE,
        "target_modules": Rule("strings", optional=True),
        "eval_data": _INPUT,
        "save_every": Rule(_INT, min=0),
        "seed": _SEED,
        "log_every": _POSITIVE,
        "max_grad_norm": Rule(_FLOAT, min=0),
        "max_records": Rule(_INT, min=1, optional=True),
        "recalibration_tokens": _POSITIVE,
        "distill_weight": Rule(_FLOAT, above=0, max=1),
    },
    "validate": {
        "data": Rule("path"),
        "max_cv": Rule(_FLOAT, min=0, optional=True),
        "max_ppl_ratio": Rule(_FLOAT, above=0, optional=True),
        "max_tokens": Rule(_INT, min=1, optional=True),
        "max_length": Rule(_INT, min=2),
        "batch_tokens": _POSITIVE,
        "dtype": Rule("dtype", optional=True, extra=("auto",)),
        "seed": _SEED,
    },
}

#: verb -> relations between values, checked once every value is known (defaults filled in):
#: ("at_most", a, b): a <= b;  ("needs", a, b, value): when a is set (truthy), b must equal value
#: (value None: b must be set).
RELATIONS: dict[str, list[tuple[Any, ...]]] = {
    "upcycle": [("at_most", "top_k", "experts")],
    "finetune": [("needs", "merge", "mode", "lora"), ("needs", "target_modules", "mode", "lora"),
                 ("needs", "distill_gguf_file", "distill_from", None)],
    "validate": [("needs", "max_ppl_ratio", "parent", None)],
}

_KIND_WORDS = {_INT: "an integer", _FLOAT: "a number", "path": "a path", "strings": "a name or a list of names"}


def resolve_choices(choices: str | tuple[str, ...] | Mapping[str, Any]) -> tuple[str, ...]:
    """A rule's choices: the tuple itself, or the library attribute ``"module:ATTRIBUTE"`` names (a tuple, or
    a mapping whose keys are the choices)."""
    if isinstance(choices, str):
        module, _, attribute = choices.partition(":")
        choices = getattr(importlib.import_module(module), attribute)
    return tuple(choices)


def check(rule: Rule, value: Any, label: str) -> Any:
    """``value`` checked against ``rule`` and normalised (numbers from strings, the canonical spelling of a
    choice or dtype); a one-line ``UserError`` starting with ``label`` (``--steps``, ``r.yaml: finetune.steps``)
    otherwise."""
    if value is None:
        if rule.optional:
            return None
        raise UserError(f"{label} is required")
    kind = rule.kind
    if kind in (_INT, _FLOAT):
        number = _number(value, kind, label)
        if rule.min is not None and number < rule.min:
            raise UserError(f"{label} must be at least {_show(rule.min)}, got {_show(number)}")
        if rule.above is not None and number <= rule.above:
            raise UserError(f"{label} must be greater than {_show(rule.above)}, got {_show(number)}")
        if rule.max is not None and number > rule.max:
            raise UserError(f"{label} must be at most {_show(rule.max)}, got {_show(number)}")
        return number
    if kind == "dtype":
        return dtype_name(value, label, extra=rule.extra)
    if kind == "choice":
        allowed = rule.allowed()
        by_lower = {choice.lower(): choice for choice in allowed}
        if isinstance(value, str) and value.strip().lower() in by_lower:
            return by_lower[value.strip().lower()]
        raise UserError(f"{label} {value!r}: expected one of {', '.join(allowed)}")
    if kind == "path":
        if isinstance(value, (str, os.PathLike)) and str(value):
            return value
        raise UserError(f"{label} must be {_KIND_WORDS[kind]}, got {value!r}")
    if kind == "strings":
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(item, str) and item for item in items):
            return list(items)
        raise UserError(f"{label} must be {_KIND_WORDS[kind]}, got {value!r}")
    raise ValueError(f"unknown rule kind {kind!r}")


def _number(value: Any, kind: str, label: str) -> int | float:
    """An int (``kind`` int) or finite float from a number or its text; bools and other types are refused
    (YAML reads ``yes`` as True and ``5e-5`` as text: the first is an error, the second a number)."""
    word = _KIND_WORDS[kind]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{label} must be {word}, got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value.strip()) if kind == _INT else float(value.strip())
        except ValueError:
            raise UserError(f"{label} must be {word}, got {value!r}") from None
    if kind == _INT:
        if isinstance(value, float):
            raise UserError(f"{label} must be {word}, got {value!r}")
        return value
    if not math.isfinite(value):
        raise UserError(f"{label} must be a finite number, got {value!r}")
    return float(value)


def _show(number: float) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


def check_values(verb: str, values: Mapping[str, Any], label: Any, *, defaults: Mapping[str, Any] = ()) -> dict[str, Any]:
    """Every value of ``values`` that has a rule for ``verb``, checked and normalised, then the verb's
    relations on ``{**defaults, **values}``. ``label(key)`` names a key in messages. Returns the new mapping
    (keys without a rule are passed through)."""
    rules = RULES.get(verb, {})
    checked = {key: check(rules[key], value, label(key)) if key in rules else value for key, value in values.items()}
    merged = {**dict(defaults), **checked}
    for relation in RELATIONS.get(verb, ()):
        if relation[0] == "at_most":
            _, a, b = relation
            if merged.get(a) is not None and merged.get(b) is not None and merged[a] > merged[b]:
                raise UserError(f"{label(a)} ({merged[a]}) must be at most {label(b)} ({merged[b]})")
        else:
            _, a, b, wanted = relation
            if merged.get(a) and (merged.get(b) is None if wanted is None else merged.get(b) != wanted):
                need = f"{label(b)}" if wanted is None else f"{label(b)} {wanted}"
                raise UserError(f"{label(a)} needs {need}")
    return checked
