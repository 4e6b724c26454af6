"""``run_study``: convert / fine-tune / validate every variant of a plan on the same tokens with the same seed.

Layout of the study folder ``DIR``::

    plan.json                 resolved plan + input fingerprints; a different plan is refused without --force
    results.jsonl             one line per finished variant, appended (and fsynced) as each finishes
    conversions/<variant>/    one upcycle per distinct parameter shape (named after its first variant)
    variants/<name>/model/    a derived variant: runtime knobs edited, dual bias re-calibrated (derive.py)
    variants/<name>/finetuned/, train-log.jsonl, dynamics.jsonl, validate/
    summary.md, plots/*.png   written at the end from results.jsonl

Resume (``--resume``): variants already in ``results.jsonl`` are skipped; inside the interrupted variant every
finished stage folder (all written atomically) is reused and the fine-tune continues from its checkpoint.
Why one process, sequential: variants must see identical tokens and seeds, and the CPU plan must fit 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..recipes import resolve_model
from .dynamics import RoutingDynamics, read_log
from .plan import Plan, Variant, load_plan

PLAN_FILE = "plan.json"
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.md"
#: validate() summary keys copied into each result line (Table 2 columns and the scatter's axes).
METRIC_KEYS = ("expert_overlap", "gram_orthogonality", "gram_offdiag", "cv", "cv_worst", "maxvio", "gini", "min_max",
               "seq_consistency", "topk_overlap", "domain_nmi", "routing_entropy", "expert_entropy_norm",
               "collapse_rate", "perplexity")


@dataclass
class StudyResult:
    out: Path
    results: list[dict[str, Any]]
    ran: list[str]
    skipped: list[str]
    summary: Path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def read_results(out: Path) -> list[dict[str, Any]]:
    """Finished variants; a torn last line (killed mid-write) is ignored, it is simply re-run."""
    path = out / RESULTS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _append_result(out: Path, row: dict[str, Any]) -> None:
    path = out / RESULTS_FILE
    data = path.read_bytes() if path.is_file() else b""
    with open(path, "ab") as handle:
        if data and not data.endswith(b"\n"):  # drop a torn line's tail onto its own line
            handle.write(b"\n")
        handle.write((json.dumps(_jsonable(row), allow_nan=False) + "\n").encode())
        handle.flush()
        os.fsync(handle.fileno())


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _jsonable(value.item())
    return value


def _prepare_dir(out: Path, fingerprint: dict[str, Any], *, resume: bool, force: bool) -> None:
    """Create DIR, or check it holds this very study; --force restarts (only a study folder is ever removed)."""
    plan_file = out / PLAN_FILE
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not plan_file.is_file():
            raise UserError(f"{out} exists and is not a study folder (no {PLAN_FILE}); choose another -o")
        old = json.loads(plan_file.read_text())
        if force:
            shutil.rmtree(out)
        elif old != fingerprint:
            raise UserError(f"{out} holds a study with a different plan or inputs ({_difference(old, fingerprint)}); "
                            "pass --force to start over or choose another -o")
        elif not resume:
            done = len(read_results(out))
            raise UserError(f"{out} already holds this study ({done} of {len(fingerprint['plan']['variants'])} "
                            "variants done); pass --resume to continue or --force to start over")
    out.mkdir(parents=True, exist_ok=True)
    if not plan_file.is_file():
        tmp = plan_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(fingerprint, indent=2) + "\n")
        os.replace(tmp, plan_file)


def _difference(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _difference(old.get(key), new.get(key), f"{prefix}{key}.")
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return _difference(a, b, f"{prefix}{i}.")
    return f"{prefix.rstrip('.')}: {json.dumps(old, default=str)[:60]} then, {json.dumps(new, default=str)[:60]} now"


def check_eval_domains(eval_data: Path, plan: Plan) -> None:
    """The balance-vs-specialisation scatter needs a domain on every eval record when the plan asks for NMI."""
    from ..textdata import domains_of, load_texts

    records = load_texts(eval_data)
    if plan.wants_nmi and domains_of(records) is None:
        raise UserError(f"--eval {eval_data}: the plan asks for domain NMI (validate.nmi: true) but no record has a "
                        "'domain' field; add a domain to every record or set nmi: false")


def routing_consistency(before: str | Path, after: str | Path, eval_data: Path, *, max_tokens: int | None,
                        max_length: int, batch_tokens: int, device: str | None, dtype: str | None) -> float:
    """Share of eval tokens whose selected expert set is the same before and after the fine-tune (mean over
    layers), routed on exactly the token ids validate uses."""
    import gc

    import numpy as np

    from ..textdata import load_texts
    from ..router import metrics as M
    from ..validate.collect import collect_routing, load_spectra_model, pad_id_of, tokenize_texts

    records = load_texts(eval_data)
    selected = []
    for folder in (before, after):
        model, tokenizer = load_spectra_model(folder, device=device, dtype=dtype)
        texts = tokenize_texts(tokenizer, records, max_length=max_length, max_tokens=max_tokens)
        collection = collect_routing(model, texts, pad_id_of(tokenizer), batch_tokens=batch_tokens)
        selected.append([layer.selected for layer in collection.layers])
        del model, collection
        gc.collect()
    return float(np.mean([M.routing_consistency(a, b) for a, b in zip(*selected)]))


def _conversion_dirs(plan: Plan, out: Path) -> dict[str, Path]:
    """Conversion key -> folder, named after the first variant that needs it (stable across resumes)."""
    dirs: dict[str, Path] = {}
    for variant in plan.variants:
        dirs.setdefault(variant.conversion_key(), out / "conversions" / variant.name)
    return dirs


def run_variant(variant: Variant, plan: Plan, *, model_path: str, gguf_file: str | None, data: Path, eval_data: Path,
                out: Path, base: Path, baselines: bool) -> dict[str, Any]:
    """Convert (or derive), fine-tune, validate one variant; every stage is skipped when its folder exists."""
    from ..console import err_console
    from ..surgery.upcycle import upcycle
    from ..validate import DEFAULT_MAX_LENGTH, DEFAULT_MAX_TOKENS
    from ..validate.api import validate
    from .derive import derive_variant

    started = time.perf_counter()
    vdir = out / "variants" / variant.name
    vdir.mkdir(parents=True, exist_ok=True)
    convert = {k: v for k, v in variant.convert.items() if k != "gguf_file"}
    if not base.exists():
        err_console.print(f"[bold]{variant.name}[/bold]: upcycle -> {base}", highlight=False)
        shape = {k: v for k, v in variant.spectra.items() if k not in variant.runtime_knobs()}
        upcycle(model_path, base, gguf_file=gguf_file, seed=plan.seed, spectra_overrides=shape or None, **convert)
    model_dir = base
    runtime = variant.runtime_knobs()
    if runtime:
        model_dir = vdir / "model"
        if not model_dir.exists():
            err_console.print(f"[bold]{variant.name}[/bold]: {runtime} + bias re-calibration -> {model_dir}",
                              highlight=False)
            derive_variant(base, model_dir, runtime, calibration=convert.get("calibration"),
                           calibration_tokens=int(convert.get("calibration_tokens", 8192)), seed=plan.seed)

    ft = dict(variant.finetune)
    steps = int(ft.get("steps", 100))
    final, dynamics, ft_summary = model_dir, [], None
    if steps > 0:
        from ..finetune.api import finetune

        final = vdir / "finetuned"
        log_file = vdir / "train-log.jsonl"
        dyn = RoutingDynamics(grad_accum=int(ft.get("grad_accum", 1)))
        if not final.exists():
            err_console.print(f"[bold]{variant.name}[/bold]: router fine-tune ({steps} steps) -> {final}",
                              highlight=False)
            with dyn:
                finetune(model_dir, data, final, seed=plan.seed, resume=True, log_file=log_file, **ft)
        dynamics = dyn.windows(read_log(log_file), steps)
        summary_file = final / "finetune.json"
        if summary_file.is_file():
            s = json.loads(summary_file.read_text())
            ft_summary = {"steps": s.get("steps"), "final_loss": s.get("final_loss"),
                          "ppl_before": (s.get("eval_before") or {}).get("perplexity"),
                          "ppl_after": (s.get("eval_after") or {}).get("perplexity")}

    opts = {k: v for k, v in plan.validate.items() if k not in ("nmi", "baselines")}
    report_dir = vdir / "validate"
    if (report_dir / "report.json").is_file():
        report = json.loads((report_dir / "report.json").read_text())
    else:
        err_console.print(f"[bold]{variant.name}[/bold]: validate -> {report_dir}", highlight=False)
        report = validate(final, eval_data, report_dir=report_dir, seed=plan.seed, baselines=baselines, force=True,
                          **opts)
    consistency = None
    if steps > 0:
        consistency = routing_consistency(
            model_dir, final, eval_data, max_tokens=opts.get("max_tokens", DEFAULT_MAX_TOKENS),
            max_length=opts.get("max_length", DEFAULT_MAX_LENGTH), batch_tokens=opts.get("batch_tokens", 2048),
            device=opts.get("device"), dtype=opts.get("dtype"))
    summary = report.get("summary", {})
    metrics = {key: summary.get(key) for key in METRIC_KEYS}
    metrics["routing_consistency"] = consistency
    row = {
        "variant": variant.name, "description": variant.description, "spectra": variant.spectra,
        "conversion": base.name, "derived": bool(runtime), "metrics": metrics, "finetune": ft_summary,
        "dynamics": dynamics, "tokens": report.get("tokens"),
        "batch_invariance_agree": (report.get("batch_invariance") or {}).get("agree"),
        "baselines": report.get("baselines") or {}, "seconds": round(time.perf_counter() - started, 1),
    }
    if not plan.keep_models:
        for folder in (vdir / "model", vdir / "finetuned"):
            shutil.rmtree(folder, ignore_errors=True)
    return row


def run_lpr(variant: Variant, plan: Plan, *, model_path: str, gguf_file: str | None, data: Path, eval_data: Path,
            base: Path) -> dict[str, Any]:
    """An LPR variant (lpr_variant.py) on its conversion, upcycled first when no earlier variant made it."""
    from ..surgery.upcycle import upcycle
    from .lpr_variant import run_lpr_variant

    if not base.exists():
        convert = {k: v for k, v in variant.convert.items() if k != "gguf_file"}
        shape = {k: v for k, v in variant.spectra.items() if k not in variant.runtime_knobs()}
        upcycle(model_path, base, gguf_file=gguf_file, seed=plan.seed, spectra_overrides=shape or None, **convert)
    return run_lpr_variant(variant, plan, base=base, data=data, eval_data=eval_data, metric_keys=METRIC_KEYS)


def run_study(model: str, data: str | Path, eval_data: str | Path, plan: str | Path | Plan, out: str | Path, *,
              resume: bool = False, force: bool = False, gguf_file: str | None = None) -> StudyResult:
    """Run every variant of ``plan`` (see plan.py) and write ``DIR/results.jsonl``, ``summary.md`` and plots."""
    from ..console import err_console
    from ..textdata import load_texts
    from .summary import write_summary

    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    data, eval_data, out = Path(data), Path(eval_data), Path(out).expanduser().absolute()
    load_texts(data)  # bad training text fails now, not after the first conversion
    check_eval_domains(eval_data, plan)
    model_path, gguf = resolve_model(model, gguf_file or plan.convert.get("gguf_file"))
    fingerprint = {"plan": plan.fingerprint(), "model": str(model), "gguf_file": gguf,
                   "data_sha256": _sha256(data), "eval_sha256": _sha256(eval_data)}
    _prepare_dir(out, fingerprint, resume=resume, force=force)

    done = {row["variant"] for row in read_results(out)}
    bases = _conversion_dirs(plan, out)
    ran, skipped = [], []
    for index, variant in enumerate(plan.variants):
        if variant.name in done:
            skipped.append(variant.name)
            continue
        err_console.print(f"[bold]variant {index + 1}/{len(plan.variants)}: {variant.name}[/bold]", highlight=False)
        base = bases[variant.conversion_key()]
        if variant.router == "lpr":
            row = run_lpr(variant, plan, model_path=model_path, gguf_file=gguf, data=data, eval_data=eval_data,
                          base=base)
        else:
            row = run_variant(variant, plan, model_path=model_path, gguf_file=gguf, data=data, eval_data=eval_data,
                              out=out, base=base, baselines=bool(plan.validate.get("baselines")) and index == 0)
        _append_result(out, row)
        ran.append(variant.name)
    order = {v.name: i for i, v in enumerate(plan.variants)}
    results = sorted(read_results(out), key=lambda r: order.get(r["variant"], len(order)))
    summary = write_summary(out, plan, results)
    if not plan.keep_models:
        shutil.rmtree(out / "conversions", ignore_errors=True)
    return StudyResult(out=out, results=results, ran=ran, skipped=skipped, summary=summary)
