"""The model card (README.md) of a converted folder.

The card is what a Hub visitor reads before running custom code, so it states plainly what was done to which
base model, how to load it (``trust_remote_code=True`` is required: the runtime ships as ``.py`` files), every
routing knob, and — when ``validate`` wrote a report into ``<model>/validation/`` — the measured numbers and
plots. It never claims numbers that were not measured: without a report the card says so.

The YAML front matter carries the Hub metadata (``base_model``, ``library_name``, ``pipeline_tag``, tags) so the
model is listed under its base model and under the mixture-of-experts tag.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

#: Folder inside a model folder where ``validate --report-dir`` output is picked up from.
VALIDATION_DIR = "validation"
REPORT_NAME = "report.json"

# A Hub model id: "name" or "owner/name" (letters, digits, -, _, .). Local paths are not base models.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def render_model_card(
    config: Mapping[str, Any] | Any,
    *,
    base_model: str | None,
    report: Mapping[str, Any] | None,
    plots: Sequence[str] = (),
    finetuned: Mapping[str, Any] | None = None,
) -> str:
    """Return the README.md text for a SPECTRA model.

    ``config`` is the ``config.json`` dict or a ``SpectraConfig``; ``report`` a validate report (a ``summary``
    mapping metric -> value and optionally a ``layers`` list of per-layer dicts); ``plots`` are paths relative
    to the model folder (they are embedded as images, so they must be uploaded with the card). ``finetuned``:
    ``finetune_facts`` of a fine-tuned model (what it was trained from, how, and what changed).
    """
    cfg = _as_dict(config)
    knobs = dict(cfg.get("spectra") or {})
    text_config = dict(cfg.get("text_config") or {})
    source = knobs.get("source", "upcycled")
    if source not in ("upcycled", "rerouted"):
        raise UserError(f"config.json: spectra.source must be 'upcycled' or 'rerouted', got {source!r}")
    hub_base = base_model if base_model and _is_hub_id(base_model) else None
    base_model = model_label(base_model) if base_model else None  # never a local absolute path

    front: dict[str, Any] = {}
    if hub_base:
        front["base_model"] = hub_base
    front["library_name"] = "transformers"
    front["pipeline_tag"] = "text-generation"
    front["tags"] = ["mixture-of-experts", "spectra", source]
    header = "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n"

    parts = [header, _intro(knobs, text_config, base_model, source), _finetune_section(finetuned), _usage(knobs),
             _config_section(knobs, text_config)]
    parts.append(_validation_section(report, plots))
    parts.append(_routing_section(knobs))
    return "\n".join(p.rstrip("\n") + "\n" for p in parts if p)


def write_model_card(model_dir: Path | str, *, base_model: str | None,
                     finetuned: Mapping[str, Any] | None = None) -> Path:
    """Render the card from ``model_dir/config.json`` (+ ``validation/report.json`` and ``validation/*.png``
    when present) and write ``model_dir/README.md`` atomically. Returns the README path.

    Called by the converters right after writing a folder, and again after ``validate`` wrote a report there.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{config_path}: missing; cannot write a model card without the model's config") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None

    report, plots = load_validation(model_dir)
    text = render_model_card(config, base_model=base_model, report=report, plots=plots, finetuned=finetuned)
    return _write_card(model_dir, text)


def _write_card(model_dir: Path, text: str) -> Path:
    target = model_dir / "README.md"
    tmp = model_dir / f".README.md.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return target


def model_label(model: str | Path) -> str:
    """How a card or adapter config names a model: its Hub id when it came from the Hub, else its folder's
    name — never a local absolute path (it means nothing on the Hub and leaks the user's directory layout)."""
    text = str(model).rstrip("/")
    if _is_hub_id(text):
        return text
    return Path(text).expanduser().resolve().name or text


def card_base_model(model_dir: Path | str) -> str | None:
    """The ``base_model`` (a Hub id) in the front matter of ``model_dir/README.md``, if any: a fine-tune of a
    converted folder carries its original parent forward."""
    card = Path(model_dir) / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        return None
    try:
        front = yaml.safe_load(text[4:text.index("\n---\n", 4)])
    except yaml.YAMLError:
        return None
    base = front.get("base_model") if isinstance(front, dict) else None
    return base if isinstance(base, str) and _HUB_ID.match(base) else None


def finetune_facts(model: str | Path, summary: Mapping[str, Any]) -> dict[str, Any]:
    """What a fine-tuned card states: the model it was trained from (``model_label``) and ``finetune.json``'s
    mode, steps and held-out numbers before -> after."""
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    return {"from": model_label(model), "mode": summary.get("mode"), "merged": bool(summary.get("merged")),
            "steps": summary.get("steps"),
            "perplexity": (before.get("perplexity"), after.get("perplexity")),
            "mean_cv": (before.get("mean_cv"), after.get("mean_cv"))}


def write_adapter_card(adapter_dir: Path | str, *, base_model: str, on_hub: bool, facts: Mapping[str, Any]) -> Path:
    """The README of a LoRA adapter folder (replacing PEFT's blank template): which base model it needs, how to
    load it (PeftModel / AutoPeftModelForCausalLM, trust_remote_code for the SPECTRA runtime), merge it and
    publish it. ``base_model``: the base's ``model_label``; the card's Hub ``base_model`` when ``on_hub`` (the
    base was loaded from the Hub, not from a local folder)."""
    hub_base = base_model if on_hub and _HUB_ID.match(base_model) else None
    front: dict[str, Any] = {}
    if hub_base:
        front["base_model"] = hub_base
    front.update(library_name="peft", pipeline_tag="text-generation",
                 tags=["mixture-of-experts", "spectra", "lora", "peft"])
    header = "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n"
    where = (f"the Hub repository `{hub_base}`" if hub_base else
             f"the local SPECTRA model folder `{base_model}` (not on the Hub: load it from its folder, or push it "
             "first and point `base_model_name_or_path` in `adapter_config.json` at its Hub id)")
    text = "\n".join([
        header,
        f"# {base_model} — LoRA adapter (SPECTRA mixture of experts)\n",
        f"A LoRA adapter, with fully trained SPECTRA routers, for {where}. It was trained with "
        "`spectra-convert finetune --mode lora` and holds only the adapter and router tensors: the base model "
        "is needed to use it. Its routing code ships with the base model, so `trust_remote_code=True` is "
        "required.\n",
        _finetune_section(facts),
        "## How to load\n",
        "```python\n"
        "from peft import AutoPeftModelForCausalLM, PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'base_id = "{base_model}"  # the base model (Hub id or local folder)\n'
        'adapter_id = "OWNER/NAME"  # this repository, or the local adapter folder\n'
        "base = AutoModelForCausalLM.from_pretrained(base_id, trust_remote_code=True)\n"
        "model = PeftModel.from_pretrained(base, adapter_id)\n"
        "# or in one call (reads base_model_name_or_path from adapter_config.json):\n"
        "# model = AutoPeftModelForCausalLM.from_pretrained(adapter_id, trust_remote_code=True)\n"
        "tokenizer = AutoTokenizer.from_pretrained(base_id, trust_remote_code=True)\n"
        "```\n",
        "## Merge and publish\n",
        "`model.merge_and_unload()` gives a plain SPECTRA model; `spectra-convert finetune --mode lora --merge` "
        "writes one as a full model folder, which `spectra-convert push` publishes with its model card. "
        "`spectra-convert push` publishes this adapter folder itself when its base model is a Hub repository.\n",
    ])
    return _write_card(Path(adapter_dir), text)


def load_validation(model_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The validate report and plot paths (relative, posix) found in ``model_dir/validation``, if any."""
    folder = model_dir / VALIDATION_DIR
    report = None
    report_path = folder / REPORT_NAME
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{report_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(report, dict):
            raise UserError(f"{report_path}: expected a JSON object with a 'summary' mapping")
    plots = sorted(p.relative_to(model_dir).as_posix() for p in folder.glob("*.png")) if folder.is_dir() else []
    return report, plots


# -- sections -------------------------------------------------------------------------------------------------


def _intro(knobs: dict, text_config: dict, base_model: str | None, source: str) -> str:
    experts, top_k = knobs.get("num_experts", "?"), knobs.get("top_k", "?")
    parent = text_config.get("model_type", "unknown")
    layers = text_config.get("num_hidden_layers", text_config.get("n_layer", "?"))
    base = f"`{base_model}`" if base_model else f"a `{parent}` model"
    title = f"# {base_model.rstrip('/').split('/')[-1] if base_model else 'SPECTRA'} — SPECTRA mixture of experts"
    if knobs.get("expert_combine") == "sum":
        shared, width = knobs.get("shared_intermediate_size") or 0, knobs.get("intermediate_size") or 0
        total = shared + (experts * width if isinstance(experts, int) else 0)
        active = f" ({(shared + top_k * width) / total:.0%} of them per token)" if total and isinstance(top_k, int) else ""
        what = (
            f"This model is {base} **carved** into a mixture of experts: the feed-forward neurons of each of its "
            f"{layers} layers were split into an always-on shared expert of {shared} neurons and {experts} routed "
            f"experts of {width} neurons each; a SPECTRA router fitted to predict which slices would fire sends "
            f"every token to {top_k} of them, and their outputs are summed{active}. All experts on reproduce the "
            "parent exactly; fewer run less of it — the validation section states the perplexity next to the parent's."
        )
        rank = knobs.get("skipped_estimate_rank") or 0
        if rank and isinstance(top_k, int) and isinstance(experts, int) and top_k < experts:
            what += (f" Each block also adds a rank-{rank} linear estimate of what the {experts - top_k} unselected "
                     "experts would have contributed, fitted on the calibration text (a few percent of the FFN's "
                     "compute).")
        if knobs.get("carve_bias") == "balance":
            what += " The routers' bias evens out the experts' loads, trading a little perplexity for balance."
        elif knobs.get("carve_bias") == "recall":
            what += (" The routers' bias balances the experts' loads only as far as it keeps picking the slices "
                     "that fire (the load can be uneven).")
    elif source == "upcycled":
        what = (
            f"This model is {base} **upcycled** into a mixture of experts: the feed-forward block of each of its "
            f"{layers} layers was turned into {experts} experts, and every token is sent to {top_k} of them by a "
            "SPECTRA router."
        )
    else:
        what = (
            f"This model is {base} **rerouted**: its experts are kept byte for byte and only the router of each of "
            f"its {layers} layers was replaced by a SPECTRA router ({experts} experts, top-{top_k})."
        )
    return (
        f"{title}\n\n{what} It was produced with "
        "`spectra-convert` and loads with plain `transformers`: the routing code ships in "
        "this repository (`modeling_spectra.py`, `configuration_spectra.py`), so `trust_remote_code=True` is "
        "required — read those two files before running them."
    )


def _finetune_section(facts: Mapping[str, Any] | None) -> str:
    if not facts:
        return ""
    ppl, cv = facts.get("perplexity") or (None, None), facts.get("mean_cv") or (None, None)
    what = "the SPECTRA routers only"
    if facts.get("mode") == "lora":
        what = "LoRA adapters, merged into the weights, and routers" if facts.get("merged") else "LoRA adapters and routers"
    return ("## Fine-tuning\n\n"
            f"Fine-tuned from `{facts.get('from')}` with `spectra-convert finetune --mode {facts.get('mode')}` "
            f"({what}) for {facts.get('steps')} steps. Held-out, before -> after:\n\n"
            + _table(("metric", "before", "after"), [("perplexity", *ppl), ("mean load CV", *cv)]))


def _usage(knobs: dict) -> str:
    if knobs.get("balance_mode", "dual_bias") == "dual_bias":
        note = (
            "Routing is per token and causal, so batched, padded and cached generation give the same tokens as "
            "one-sequence, uncached generation."
        )
    else:
        note = (
            "This model routes with `balance_mode: in_batch` (paper-literal Sinkhorn across the batch): a "
            "token's experts depend on the other tokens in the batch, so outputs change with batch composition "
            "and cached one-token decoding does not match a full forward. Use it for analysis, not serving."
        )
    return (
        "## How to load and generate\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model_id = "OWNER/NAME"  # this repository, or the local folder it was written to\n'
        "tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)\n"
        "model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True)\n\n"
        'inputs = tokenizer("The capital of France is", return_tensors="pt")\n'
        "output = model.generate(**inputs, max_new_tokens=32)\n"
        "print(tokenizer.decode(output[0], skip_special_tokens=True))\n"
        "```\n\n"
        f"{note} Pass `output_router_logits=True` to get each layer's router logits. The tokenizer needs "
        "`trust_remote_code=True` too: `AutoTokenizer` reads `config.json` first, and this config's class ships "
        "as code in the repository (without the flag transformers asks interactively). On CPU, with `numba` "
        "installed (`pip install numba`), the routers run their GRU recurrence as compiled code (prefill routing "
        "several times faster) and a float32 decoding step runs each SwiGLU MoE block as one compiled call; without "
        "it the same equations run in PyTorch's own ops."
    )


def _config_section(knobs: dict, text_config: dict) -> str:
    parent_rows = [
        ("parent architecture", text_config.get("model_type")),
        ("layers", text_config.get("num_hidden_layers", text_config.get("n_layer"))),
        ("hidden size", text_config.get("hidden_size", text_config.get("n_embd"))),
        ("vocabulary", text_config.get("vocab_size")),
    ]
    rows = [(k, v) for k, v in parent_rows if v is not None] + [(f"spectra.{k}", v) for k, v in sorted(knobs.items())]
    return "## SPECTRA configuration\n\n" + _table(("setting", "value"), rows)


def _validation_section(report: Mapping[str, Any] | None, plots: Sequence[str]) -> str:
    lines = ["## Validation"]
    summary = (report or {}).get("summary") if isinstance(report, Mapping) else None
    scalars = [(k, v) for k, v in (summary or {}).items() if _is_scalar(v)] if isinstance(summary, Mapping) else []
    if not scalars and not plots:
        lines.append(
            "No validation report was written into this folder. Run `spectra-convert validate MODEL --data FILE "
            "--report-dir MODEL/validation` to measure load balance, specialisation and perplexity on held-out text."
        )
        return "\n\n".join(lines)
    if scalars:
        lines.append("Measured by `spectra-convert validate` on held-out text.")
        lines.append(_table(("metric", "value"), scalars))
    layers = (report or {}).get("layers")
    if isinstance(layers, list) and layers and all(isinstance(row, Mapping) for row in layers):
        columns = [c for c in layers[0] if all(_is_scalar(row.get(c)) for row in layers)]
        if columns:
            lines.append("### Per layer")
            lines.append(_table(columns, [[row.get(c) for c in columns] for row in layers]))
    for plot in plots:
        name = Path(plot).stem.replace("_", " ").replace("-", " ")
        lines.append(f"![{name}]({plot})")
    return "\n\n".join(lines)


def _routing_section(knobs: dict) -> str:
    return (
        "## How SPECTRA routes\n\n"
        "For each token the router updates a GRU state over the sequence, projects the token's hidden state and "
        "that state into an expression vector, and scores it by cosine similarity against one unit vector per "
        f"expert (temperature {knobs.get('temperature')}). A repulsive cost (λ = {knobs.get('repulsion')}) "
        "penalises experts whose vectors are similar. Balance comes from Sinkhorn: in "
        f"`{knobs.get('balance_mode')}` mode its column potentials are kept as a per-layer bias that steers which "
        f"{knobs.get('top_k')} experts are selected, while the mixing weights are a softmax of the selected "
        "experts' scores. The bias was calibrated on text; balance on text from other domains can be worse — "
        "the validation section above reports what was measured."
    )


# -- helpers --------------------------------------------------------------------------------------------------


def _as_dict(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"expected a config dict or a SpectraConfig, got {type(config).__name__}")


def _is_hub_id(value: str) -> bool:
    value = str(value)
    return bool(_HUB_ID.match(value)) and not Path(value).expanduser().exists()


def _is_scalar(value: object) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _fmt(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "—"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "| " + " | ".join(str(c) for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join([head, rule, *body])
