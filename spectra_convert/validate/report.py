"""The validation report: ``report.json`` (machine-readable), ``report.md`` (tables) and PNG plots.

The report folder is written atomically — everything goes to a temporary sibling folder that is renamed into
place at the end — so a crash never leaves half a report, and an existing report is only replaced with
``force``. The default folder is ``./validation-<model-name>/``: validate never writes into the model folder
it reads. Writability is checked before the (long) model run, not after it.

JSON schema (top level): ``model``, ``data``, ``tokens``, ``texts``, ``num_layers``, ``num_experts``,
``top_k``, ``summary`` {metric: value}, ``layers`` [{layer, cv, maxvio, gini, min_max, expert_entropy,
expert_entropy_norm, collapse_rate, expert_overlap, seq_consistency, topk_overlap, domain_nmi, routing_entropy,
gram_orthogonality, gram_offdiag, loads}], ``baselines`` {name: {metric: value, perplexity_eval_half}},
``baselines_eval_half`` {texts, tokens} (with ``summary.perplexity_eval_half``: every router driving the experts
on the texts the fitted baselines did not see), ``batch_invariance`` {...}, ``parent`` {...} or null,
``thresholds`` {...}, ``domain_expert`` {...} or null. ``nan`` is ``null``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

#: Columns of the router comparison table: (report key, header).
TABLE_COLUMNS = (
    ("cv", "CV mean"),
    ("cv_worst", "CV worst"),
    ("maxvio", "MaxVio"),
    ("gini", "Gini"),
    ("min_max", "min/max"),
    ("expert_entropy_norm", "entropy/logE"),
    ("collapse_rate", "collapse"),
    ("expert_overlap", "overlap"),
    ("seq_consistency", "seq. cons."),
    ("topk_overlap", "top-k overlap"),
    ("domain_nmi", "domain NMI"),
    ("gram_orthogonality", "Gram ortho"),
    ("routing_entropy", "routing H"),
)


# --------------------------------------------------------------------------------------------------------------
# Folder
# --------------------------------------------------------------------------------------------------------------


def default_report_dir(model: str | Path) -> Path:
    """``./validation-<model-name>`` in the working directory (never inside the model folder)."""
    name = Path(str(model).rstrip("/\\")).name or "model"
    if "/" in str(model) and not Path(model).exists():  # a Hub id: owner/name
        name = str(model).replace("/", "--")
    return Path.cwd() / f"validation-{name}"


def check_report_dir(report_dir: Path, *, force: bool) -> Path:
    """Fail early (one line) when the report cannot be written there; returns the absolute path."""
    report_dir = Path(report_dir).expanduser().absolute()
    if report_dir.exists():
        if not report_dir.is_dir():
            raise UserError(f"report dir {report_dir} exists and is not a folder")
        if any(report_dir.iterdir()) and not force:
            raise UserError(f"report dir {report_dir} already exists and is not empty; pass --force to replace it "
                            "or choose another --report-dir")
    parent = report_dir.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"report dir {report_dir} is not writable ({probe} is a file, not a folder)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"report dir {report_dir} is not writable ({probe}: permission denied)")
    if report_dir.exists() and not os.access(report_dir, os.W_OK | os.X_OK):
        raise UserError(f"report dir {report_dir} is not writable (permission denied)")
    return report_dir


def write_report(report: dict[str, Any], report_dir: Path, *, gram: np.ndarray | None, force: bool) -> list[Path]:
    """Write report.json, report.md and the PNGs into ``report_dir`` atomically; returns the file paths."""
    report_dir = check_report_dir(report_dir, force=force)
    try:
        report_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{report_dir.name}.tmp-", dir=report_dir.parent))
    except OSError as exc:
        raise UserError(f"report dir {report_dir} is not writable ({exc.strerror or exc})") from None
    try:
        (tmp / "report.json").write_text(json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n")
        (tmp / "report.md").write_text(to_markdown(report))
        write_plots(report, tmp, gram=gram)
        os.chmod(tmp, 0o755)
        _swap_into_place(tmp, report_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(report_dir.iterdir())


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays unwrapped, nan/inf -> None, paths -> str."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------------------------
# Tables (shared by the terminal summary and report.md)
# --------------------------------------------------------------------------------------------------------------


def router_rows(report: dict[str, Any]) -> list[list[Any]]:
    """One row per router: SPECTRA first, then each baseline, columns as ``TABLE_COLUMNS`` (+ perplexity)."""
    rows = []
    spectra = dict(report["summary"])
    rows.append(["SPECTRA", *[spectra.get(key) for key, _ in TABLE_COLUMNS], spectra.get("perplexity"),
                 spectra.get("perplexity_eval_half")])
    for name, values in (report.get("baselines") or {}).items():
        rows.append([name, *[values.get(key) for key, _ in TABLE_COLUMNS], values.get("perplexity"),
                     values.get("perplexity_eval_half")])
    return rows


def router_columns() -> list[str]:
    return ["router", *[header for _, header in TABLE_COLUMNS], "perplexity", "ppl (eval half)"]


def metric_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The router table transposed (one row per metric, one column per router): fits a terminal."""
    rows = router_rows(report)
    columns = ["metric", *[str(row[0]) for row in rows]]
    headers = router_columns()[1:]
    return columns, [[header, *[fmt(row[i + 1]) for row in rows]] for i, header in enumerate(headers)]


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def check_lines(report: dict[str, Any]) -> list[str]:
    """Human lines for the parent comparison, batch invariance and thresholds."""
    lines = []
    parent = report.get("parent")
    if parent:
        lines.append(f"parent perplexity {fmt(parent.get('perplexity'))}, SPECTRA {fmt(report['summary'].get('perplexity'))}"
                     f", ratio {fmt(parent.get('ppl_ratio'))} ({parent.get('path')})")
        if parent.get("topk_agreement") is not None:
            lines.append(f"top-k agreement with the original gate {fmt(parent['topk_agreement'])}, same expert set "
                         f"{fmt(parent.get('routing_consistency'))}")
    carve = report.get("carve")
    if carve:
        estimate = (f" (+{carve['skipped_estimate_share']:.1%} of its FFN multiply-adds in the rank-"
                    f"{carve['skipped_estimate_rank']} skipped-experts estimate)") if carve.get("skipped_estimate_share") else ""
        lines.append(f"carved experts: {carve['active_ffn_fraction']:.1%} of the parent's FFN neurons active per token"
                     f"{estimate}, oracle top-k recall {fmt(carve['oracle_recall'])}")
    inv = report.get("batch_invariance")
    if inv:
        verdict = "agree" if inv.get("agree") else "DISAGREE"
        lines.append(f"batch invariance: {verdict} — {inv['texts']} texts, {inv['comparisons']} token-layer choices; "
                     f"{inv['disagree_right_padding']} differ with right padding, {inv['disagree_left_padding']} "
                     "with left padding")
    if report.get("baselines"):
        lines.append(report.get("baselines_note", ""))
    thresholds = report.get("thresholds") or {}
    for failure in thresholds.get("failures", []):
        lines.append(f"FAILED: {failure}")
    if thresholds.get("checked") and not thresholds.get("failures"):
        lines.append("thresholds: passed (" + ", ".join(thresholds["checked"]) + ")")
    return [line for line in lines if line]


def _md_table(columns: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


LAYER_COLUMNS = ("cv", "maxvio", "gini", "min_max", "expert_entropy_norm", "collapse_rate", "expert_overlap",
                 "seq_consistency", "topk_overlap", "domain_nmi", "routing_entropy", "gram_orthogonality",
                 "gram_offdiag")


def to_markdown(report: dict[str, Any]) -> str:
    parts = [
        f"# SPECTRA validation: {Path(str(report['model'])).name}",
        "",
        f"- model: `{report['model']}`",
        f"- data: `{report['data']}` — {report['texts']} texts, {report['tokens']} tokens",
        f"- {report['num_layers']} MoE layers, {report['num_experts']} experts, top-{report['top_k']}",
        "",
        "## Routers on the same tokens",
        "",
        _md_table(router_columns(), router_rows(report)),
        "",
        "CV, MaxVio, Gini, min/max, entropy, collapse, overlap, consistency and NMI are means over layers; "
        "`CV worst` is the worst layer. Definitions: docs/ARCHITECTURE.md (Metrics) in the spectra-convert repository.",
        "",
        *[f"- {line}" for line in check_lines(report)],
        "",
        "## Per layer (SPECTRA)",
        "",
        _md_table(["layer", *LAYER_COLUMNS], [[row["layer"], *[row.get(c) for c in LAYER_COLUMNS]]
                                              for row in report["layers"]]),
        "",
        "## Plots",
        "",
        *[f"![{png}]({png})" for png in report.get("plots", [])],
        "",
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------


def plot_names(report: dict[str, Any]) -> list[str]:
    names = ["load_heatmap.png", "gram_worst_layer.png", "cv_per_layer.png"]
    if report.get("domain_expert"):
        names.append("domain_expert.png")
    return names


def write_plots(report: dict[str, Any], folder: Path, *, gram: np.ndarray | None) -> None:
    """The PNGs named by ``plot_names`` (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    layers = report["layers"]
    loads = np.array([row["loads"] for row in layers], dtype=float)
    shares = loads / np.clip(loads.sum(axis=1, keepdims=True), 1e-9, None)

    fig, ax = plt.subplots(figsize=(max(4, 0.5 * loads.shape[1] + 2), max(3, 0.25 * len(layers) + 1.5)))
    im = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(row["layer"]) for row in layers])
    ax.set_title(f"Load share per expert (equal = {1 / loads.shape[1]:.3f})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(folder / "load_heatmap.png", dpi=100)
    plt.close(fig)

    worst = report["summary"].get("gram_worst_layer")
    fig, ax = plt.subplots(figsize=(4.5, 4))
    if gram is not None:
        im = ax.imshow(gram, cmap="coolwarm", vmin=-1, vmax=1)
        fig.colorbar(im, ax=ax)
    ax.set_title(f"Gram of expert vectors, layer {worst} (least orthogonal)", fontsize=9)
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    fig.tight_layout()
    fig.savefig(folder / "gram_worst_layer.png", dpi=100)
    plt.close(fig)

    cvs = [row["cv"] for row in layers]
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(layers) + 2), 3))
    ax.bar(range(len(layers)), cvs, color="tab:blue")
    ax.set_xticks(range(len(layers)), [str(row["layer"]) for row in layers])
    max_cv = (report.get("thresholds") or {}).get("max_cv")
    if max_cv is not None:
        ax.axhline(max_cv, color="tab:red", linestyle="--", label=f"--max-cv {max_cv}")
        ax.legend()
    ax.set_xlabel("layer")
    ax.set_ylabel("load CV")
    ax.set_title("Load CV per layer")
    fig.tight_layout()
    fig.savefig(folder / "cv_per_layer.png", dpi=100)
    plt.close(fig)

    dom = report.get("domain_expert")
    if dom:
        matrix = np.array(dom["shares"], dtype=float)
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * matrix.shape[1] + 2), max(2.5, 0.4 * matrix.shape[0] + 1.5)))
        im = ax.imshow(matrix, aspect="auto", cmap="magma", vmin=0)
        ax.set_yticks(range(len(dom["domains"])), dom["domains"])
        ax.set_xlabel("top-1 expert")
        ax.set_title(f"Top-1 share per domain, layer {dom['layer']} (highest NMI)", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(folder / "domain_expert.png", dpi=100)
        plt.close(fig)
