"""``validate(...)``: measure a SPECTRA model's routing on held-out text and write the report.

The order of work is chosen so that every cheap check runs before the expensive model pass: arguments,
data file, report folder and model type fail first with one line each. Thresholds are checked last, after
the report is written, so a failing CI gate still leaves the evidence behind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ThresholdFailed, UserError
from ..modeling.configuration_spectra import active_ffn_fraction, skipped_estimate_share
from ..textdata import domains_of, load_texts
from ..router import metrics as M
from ..router.find import find_routers
from .collect import (
    Collection,
    batch_invariance,
    collect_routing,
    load_parent_model,
    load_spectra_model,
    mean_routing_entropy,
    pad_id_of,
    parent_pass,
    tokenize_texts,
)
from . import DEFAULT_MAX_LENGTH, DEFAULT_MAX_TOKENS
from .report import check_report_dir, default_report_dir, plot_names, write_report

INVARIANCE_TEXTS = 4
BASELINES_NOTE = ("baselines route the same captured router inputs with a linear gate W = mu P[:, :H] (the hidden-"
                  "state part of the model's own router); loss-free-bias and lpr (latent prototype routing, fitted "
                  "with its own regularisers + EMA) are fitted on every other text of each domain and scored on the "
                  "rest; 'ppl (eval half)' is each router driving the experts in every layer, on those rest texts")


def validate(
    model: str | Path,
    data: str | Path,
    *,
    parent: str | Path | None = None,
    baselines: bool = False,
    max_cv: float | None = None,
    max_ppl_ratio: float | None = None,
    report_dir: str | Path | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_tokens: int = 2048,
    device: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    seed: int = 0,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> dict[str, Any]:
    """Validate ``model`` on ``data``; returns the report dict (also written to ``report_dir``).

    Raises ``UserError`` for bad input and ``ThresholdFailed`` (after writing the report; the report is on
    the exception as ``.report``) when the worst layer's CV exceeds ``max_cv`` or the perplexity ratio to
    ``parent`` exceeds ``max_ppl_ratio``. ``progress(description, total_tokens)`` may return a per-batch
    callback taking the number of tokens done.
    """
    if max_ppl_ratio is not None and parent is None:
        raise UserError("--max-ppl-ratio needs --parent (the model whose perplexity is the reference)")
    for name, value in (("--max-cv", max_cv), ("--max-ppl-ratio", max_ppl_ratio)):
        if value is not None and not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
            raise UserError(f"{name} must be a non-negative number, got {value!r}")
    records = load_texts(data)
    domains_of(records)  # a file where only some records have a domain is an error, not a smaller sample
    out_dir = check_report_dir(Path(report_dir) if report_dir is not None else default_report_dir(model), force=force)

    spectra, tokenizer = load_spectra_model(model, device=device, dtype=dtype)
    texts = tokenize_texts(tokenizer, records, max_length=max_length, max_tokens=max_tokens)
    pad_id = pad_id_of(tokenizer)
    n_tokens = sum(len(ids) for ids in texts.ids)
    routers = find_routers(spectra)

    collection = collect_routing(spectra, texts, pad_id, batch_tokens=batch_tokens, capture_inputs=baselines,
                                 on_batch=_tick(progress, "routing held-out text", n_tokens))
    report = base_report(collection, model=model, data=data, n_texts=len(texts.ids))
    carve_report(report, spectra.config.spectra, collection)
    report["batch_invariance"] = batch_invariance(spectra, texts.ids[:INVARIANCE_TEXTS], pad_id)

    if baselines:
        from .baselines import run_baselines

        per_layer, fitted = run_baselines(collection, routers, seed=seed)
        report["baselines"] = {name: summarize(rows) for name, rows in per_layer.items()}
        report["baseline_layers"] = per_layer
        report["baselines_note"] = BASELINES_NOTE
        add_baseline_perplexity(report, spectra, texts, pad_id, collection, fitted, seed=seed,
                                batch_tokens=batch_tokens, progress=progress)

    if parent is not None:
        report["parent"] = compare_parent(spectra, collection, texts, pad_id, parent, device=device, dtype=dtype,
                                          batch_tokens=batch_tokens, progress=progress, n_tokens=n_tokens)
        if report.get("carve"):  # a carved model is judged by its perplexity next to the parent's: in the card
            report["summary"]["parent_perplexity"] = report["parent"]["perplexity"]
            report["summary"]["ppl_ratio"] = report["parent"]["ppl_ratio"]
    del spectra

    failures, checked = thresholds(report, max_cv=max_cv, max_ppl_ratio=max_ppl_ratio)
    report["thresholds"] = {"max_cv": max_cv, "max_ppl_ratio": max_ppl_ratio, "checked": checked,
                            "failures": failures, "passed": not failures}
    report["plots"] = plot_names(report)
    worst = report["summary"]["gram_worst_layer"]
    gram = M.gram_matrix(collection.expert_vectors[_layer_position(collection, worst)])
    write_report(report, out_dir, gram=gram, force=force)
    report["report_dir"] = str(out_dir)
    if failures:
        exc = ThresholdFailed(f"{failures[0]}; report in {out_dir}")
        exc.report = report  # type: ignore[attr-defined]
        raise exc
    return report


def add_baseline_perplexity(report: dict[str, Any], spectra: Any, texts: Any, pad_id: int, collection: Collection,
                            fitted: list[dict[str, Any]], *, seed: int, batch_tokens: int, progress: Any) -> None:
    """Each baseline (and SPECTRA) driving the experts on the evaluate half of the texts: ``perplexity_eval_half``.

    On the evaluate half because the fitted baselines have seen the other half; SPECTRA's own number on the same
    texts goes into ``summary.perplexity_eval_half`` so every row of the table shares one token set."""
    from .baselines import split_fit_eval
    from .driven import baseline_perplexity, eval_half_texts

    _, evaluate = split_fit_eval(collection.seq_ids, collection.domains)
    chosen = eval_half_texts(collection.seq_ids, evaluate)
    ppl = baseline_perplexity(spectra, texts.ids, pad_id, fitted, list(report["baselines"]), texts=chosen,
                              num_experts=collection.num_experts, top_k=collection.top_k, seed=seed,
                              batch_tokens=batch_tokens, progress=progress)
    report["summary"]["perplexity_eval_half"] = ppl.pop("SPECTRA")
    for name, value in ppl.items():
        report["baselines"][name]["perplexity_eval_half"] = value
    report["baselines_eval_half"] = {"texts": int(len(chosen)), "tokens": int(sum(len(texts.ids[i]) for i in chosen))}


def _tick(progress: Callable[[str, int], Callable[[int], None]] | None, what: str, total: int):
    return progress(what, total) if progress is not None else None


def _layer_position(collection: Collection, layer: int) -> int:
    return next(i for i, cap in enumerate(collection.layers) if cap.layer == layer)


# --------------------------------------------------------------------------------------------------------------
# SPECTRA metrics
# --------------------------------------------------------------------------------------------------------------


def layer_rows(collection: Collection) -> list[dict[str, Any]]:
    """Per-layer SPECTRA metrics (every metric of docs/ARCHITECTURE.md, "Metrics", that is defined per layer)."""
    rows = []
    for position, cap in enumerate(collection.layers):
        assignment = M.assignment_matrix(cap.selected, collection.num_experts)
        row: dict[str, Any] = {"layer": cap.layer}
        row.update(M.routing_metrics(assignment, cap.selected[:, 0], collection.seq_ids, collection.domains))
        row["routing_entropy"] = mean_routing_entropy(cap)
        vectors = collection.expert_vectors[position]
        row["gram_orthogonality"] = M.gram_orthogonality(vectors)
        row["gram_offdiag"] = M.mean_abs_off_diagonal(vectors)
        row["loads"] = assignment.sum(axis=0).astype(int).tolist()
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over layers of every numeric metric, plus the worst layer's CV (the --max-cv quantity)."""
    out: dict[str, Any] = {}
    keys = [k for k in rows[0] if k not in ("layer", "loads")]
    for key in keys:
        values = [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
        out[key] = float(np.mean(values)) if values else math.nan
    cvs = [(float(r["cv"]), i) for i, r in enumerate(rows) if math.isfinite(float(r["cv"]))]
    worst_cv, worst_index = max(cvs) if cvs else (math.nan, 0)
    out["cv_worst"] = worst_cv
    out["cv_worst_layer"] = rows[worst_index].get("layer", worst_index)
    return out


def base_report(collection: Collection, *, model: str | Path, data: str | Path, n_texts: int) -> dict[str, Any]:
    rows = layer_rows(collection)
    summary = summarize(rows)
    ortho = [(r["gram_orthogonality"], r["layer"]) for r in rows]
    summary["gram_worst_layer"] = min(ortho)[1]
    summary["perplexity"] = M.perplexity(collection.nll_sum, collection.nll_count)
    report: dict[str, Any] = {
        "model": str(model),
        "data": str(data),
        "tokens": collection.num_tokens,
        "texts": n_texts,
        "num_layers": len(rows),
        "num_experts": collection.num_experts,
        "top_k": collection.top_k,
        "summary": summary,
        "layers": rows,
        "baselines": {},
        "batch_invariance": None,
        "parent": None,
        "domain_expert": domain_expert(collection, rows),
    }
    return report


def carve_report(report: dict[str, Any], knobs: dict[str, Any], collection: Collection) -> None:
    """For carved models (``expert_combine: sum``): the active FFN fraction and the routers' oracle top-k recall
    (per layer and mean) go into the summary, so the model card states them."""
    if knobs.get("expert_combine") != "sum" or collection.oracle_recall is None:
        return
    fraction = active_ffn_fraction(knobs)
    recall = collection.oracle_recall
    report["carve"] = {"active_ffn_fraction": fraction, "oracle_recall": float(np.mean(recall)),
                       "skipped_estimate_share": skipped_estimate_share(knobs),
                       "skipped_estimate_rank": int(knobs.get("skipped_estimate_rank") or 0)}
    report["summary"]["active_ffn_fraction"] = fraction
    report["summary"]["oracle_recall"] = float(np.mean(recall))
    for row, value in zip(report["layers"], recall):
        row["oracle_recall"] = value


def domain_expert(collection: Collection, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Top-1 share per domain at the layer with the highest domain NMI (the domain x expert heatmap)."""
    if collection.domains is None:
        return None
    nmis = [(r["domain_nmi"] if math.isfinite(r["domain_nmi"]) else -1.0, i) for i, r in enumerate(rows)]
    position = max(nmis)[1]
    top1 = collection.layers[position].selected[:, 0]
    names = sorted(set(collection.domains.tolist()))
    shares = []
    for name in names:
        chosen = top1[collection.domains == name]
        counts = np.bincount(chosen, minlength=collection.num_experts).astype(float)
        shares.append((counts / max(1.0, counts.sum())).tolist())
    return {"layer": rows[position]["layer"], "domains": names, "shares": shares,
            "tokens": {name: int((collection.domains == name).sum()) for name in names}}


# --------------------------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------------------------


def compare_parent(
    spectra: Any, collection: Collection, texts: Any, pad_id: int, parent: str | Path, *, device: str | None,
    dtype: str | None, batch_tokens: int, progress: Any, n_tokens: int,
) -> dict[str, Any]:
    """Parent perplexity on the same token ids, the ratio, and for MoE parents the original gates' agreement."""
    model = load_parent_model(parent, device=device, dtype=dtype)
    vocab = int(model.config.get_text_config().vocab_size)
    top_id = int(max(max(ids) for ids in texts.ids))
    if top_id >= vocab:
        raise UserError(f"--parent {parent}: its vocabulary ({vocab} tokens) does not cover the model's tokenizer "
                        f"(token id {top_id}); the parent must share the model's tokenizer")
    rerouted = spectra.config.spectra.get("source") == "rerouted"
    gate_k = int(getattr(model.config.get_text_config(), "num_experts_per_tok", 0) or 0) if rerouted else 0
    nll_sum, nll_count, gate_selected = parent_pass(model, texts, pad_id, batch_tokens=batch_tokens,
                                                    gate_top_k=gate_k or None,
                                                    on_batch=_tick(progress, "parent perplexity", n_tokens))
    ppl = M.perplexity(nll_sum, nll_count)
    own = M.perplexity(collection.nll_sum, collection.nll_count)
    out: dict[str, Any] = {"path": str(parent), "model_type": getattr(model.config, "model_type", None),
                           "perplexity": ppl, "ppl_ratio": own / ppl if ppl and math.isfinite(ppl) else math.nan,
                           "topk_agreement": None, "routing_consistency": None, "layers": None}
    if gate_selected:
        if len(gate_selected) != len(collection.layers):
            raise UserError(f"--parent {parent}: {len(gate_selected)} MoE gates but the model has "
                            f"{len(collection.layers)} SPECTRA routers; pass the MoE model this one was rerouted from")
        layers = []
        for cap, old in zip(collection.layers, gate_selected):
            same_k = old.shape[1] == cap.selected.shape[1]
            layers.append({"layer": cap.layer, "topk_agreement": M.topk_agreement(cap.selected, old),
                           "routing_consistency": M.routing_consistency(cap.selected, old) if same_k else math.nan})
        out["layers"] = layers
        out["topk_agreement"] = float(np.mean([r["topk_agreement"] for r in layers]))
        consistency = [r["routing_consistency"] for r in layers if math.isfinite(r["routing_consistency"])]
        out["routing_consistency"] = float(np.mean(consistency)) if consistency else math.nan
    return out


# --------------------------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------------------------


def thresholds(report: dict[str, Any], *, max_cv: float | None, max_ppl_ratio: float | None
               ) -> tuple[list[str], list[str]]:
    """(failure lines, names of the checks that ran)."""
    failures, checked = [], []
    summary = report["summary"]
    if max_cv is not None:
        checked.append(f"worst-layer CV <= {max_cv:g}")
        worst = summary["cv_worst"]
        if not (math.isfinite(worst) and worst <= max_cv):
            failures.append(f"worst-layer load CV {worst:.4g} (layer {summary['cv_worst_layer']}) exceeds "
                            f"--max-cv {max_cv:g}")
    if max_ppl_ratio is not None:
        checked.append(f"perplexity ratio <= {max_ppl_ratio:g}")
        ratio = (report.get("parent") or {}).get("ppl_ratio", math.nan)
        if not (ratio is not None and math.isfinite(ratio) and ratio <= max_ppl_ratio):
            failures.append(f"perplexity ratio to the parent {ratio:.4g} exceeds --max-ppl-ratio {max_ppl_ratio:g}")
    return failures, checked
