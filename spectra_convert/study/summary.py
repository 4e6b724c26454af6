"""``summary.md``: the seed-003 Table 2 layout (variant x overlap, Gram orthogonality, CV, routing consistency,
sequential consistency, perplexity), plus baseline routers on the reference variant's experts, and the plots.

Numbers come only from ``results.jsonl``, so the summary can be rebuilt at any time from a (partial) study.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .plan import Plan

#: (metrics key, header, format) — Table 2's columns in its order, then the extra columns.
TABLE = (
    ("expert_overlap", "Expert Overlap", "pct"),
    ("gram_orthogonality", "Gram Ortho", "f3"),
    ("cv", "Load Balance CV", "f3"),
    ("routing_consistency", "Routing Consistency", "pct"),
    ("seq_consistency", "Sequential Consistency", "pct"),
    ("perplexity", "Perplexity", "f2"),
    ("domain_nmi", "Domain NMI", "f3"),
    ("cv_worst", "CV worst layer", "f3"),
)


def fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    return f"{value:.{kind[1]}f}"


def _knobs(spectra: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(spectra.items())) or "defaults"


def _router_knobs(result: dict[str, Any]) -> str:
    if result.get("router") == "lpr":
        lpr = result.get("lpr") or {}
        return "LPR router: " + ", ".join(f"{k}={lpr[k]}" for k in ("metric", "latent_dim", "variational", "ema_decay")
                                          if k in lpr)
    return _knobs(result.get("spectra") or {})


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """Variant rows, then one row per baseline router (measured on the first variant's experts)."""
    rows = []
    for result in results:
        metrics = result.get("metrics") or {}
        rows.append([result["variant"]] + [fmt(metrics.get(key), kind) for key, _, kind in TABLE])
    for result in results:
        for name, metrics in (result.get("baselines") or {}).items():
            cells = []
            for key, _, kind in TABLE:
                if key == "perplexity":  # each baseline driving the experts, on the eval half of the texts
                    cells.append(f"{fmt(metrics.get('perplexity_eval_half'), kind)} (eval half)"
                                 if metrics.get("perplexity_eval_half") is not None else "—")
                else:
                    cells.append("—" if key == "routing_consistency" else fmt(metrics.get(key), kind))
            rows.append([f"baseline: {name} ({result['variant']} experts)"] + cells)
    return rows


def markdown_table(results: list[dict[str, Any]]) -> str:
    header = "| Variant | " + " | ".join(h for _, h, _ in TABLE) + " |"
    rule = "|" + "---|" * (len(TABLE) + 1)
    return "\n".join([header, rule] + ["| " + " | ".join(row) + " |" for row in table_rows(results)])


def write_summary(out: Path, plan: Plan, results: list[dict[str, Any]]) -> Path:
    """Write ``summary.md`` and ``plots/*.png``; returns the summary path."""
    from .plots import write_plots

    plots = write_plots(out / "plots", results)
    finished = {r["variant"] for r in results}
    pending = [v.name for v in plan.variants if v.name not in finished]
    lines = [f"# Study: {plan.name}", ""]
    if plan.description:
        lines += [plan.description, ""]
    ft = plan.finetune
    lines += [
        f"Seed {plan.seed}. Every variant was upcycled with {_knobs(plan.convert)}, its routers fine-tuned for "
        f"{ft.get('steps', 100)} steps ({_knobs({k: v for k, v in ft.items() if k != 'steps'})}) on the same "
        f"training blocks, and validated on the same {results[0].get('tokens') if results else '?'} eval tokens.",
        "",
        "Routing consistency = share of eval tokens whose selected expert set is unchanged by the fine-tune "
        "(converted vs fine-tuned model). Baseline rows route the first variant's captured router inputs with "
        "other routers (validate --baselines, no fine-tune); their perplexity is each baseline driving the experts "
        "on the eval half of the texts (the fitted baselines were fitted on the other half). A `router: lpr` "
        "variant is Latent Prototype Routing (seed 004) on the shared conversion's experts, fitted on the same "
        "calibration text and fine-tuned on the same blocks, steps and seed with its own losses.",
        "",
        markdown_table(results),
        "",
        "## Variants",
        "",
        "| Variant | knobs | shared conversion | fine-tune ppl before → after | batch-invariant | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        f = r.get("finetune") or {}
        ppl = f"{fmt(f.get('ppl_before'), 'f2')} → {fmt(f.get('ppl_after'), 'f2')}" if f else "—"
        derived = f"{r['conversion']}{' (+ re-calibrated bias)' if r.get('derived') else ''}"
        lines.append(f"| {r['variant']} | {_router_knobs(r)} | {derived} | {ppl} | "
                     f"{r.get('batch_invariance_agree')} | {r.get('seconds')} |")
    if pending:
        lines += ["", f"Not finished yet: {', '.join(pending)} (run again with --resume)."]
    lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    path = out / "summary.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
