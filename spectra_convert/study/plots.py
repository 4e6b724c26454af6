"""Study plots (matplotlib, Agg): routing over training steps per variant, and balance vs specialisation.

* ``dynamics-cv.png``, ``dynamics-entropy.png``, ``dynamics-gram.png``, ``dynamics-overlap.png``: the layer mean
  of load CV / routing entropy / Gram orthogonality / expert overlap on the training batches at each logged
  step, one line per variant (from ``results.jsonl`` ``dynamics``).
* ``balance-vs-specialisation.png``: held-out load CV (x, lower = more balanced) against domain NMI (y, higher
  = more specialised), one point per variant and per baseline router.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

DYNAMICS = (("cv", "load CV (mean over layers)", "dynamics-cv.png"),
            ("routing_entropy", "routing entropy (nats)", "dynamics-entropy.png"),
            ("gram_orthogonality", "Gram orthogonality", "dynamics-gram.png"),
            ("expert_overlap", "expert overlap (Jaccard)", "dynamics-overlap.png"))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def write_plots(folder: Path, results: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label, name in DYNAMICS:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        drawn = 0
        for result in results:
            points = [(d["step"], d.get(key)) for d in result.get("dynamics") or [] if _finite(d.get(key))]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=result["variant"])
                drawn += 1
        ax.set_xlabel("fine-tune step")
        ax.set_ylabel(label)
        ax.set_title(f"{label} on training batches")
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no fine-tune steps logged", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(folder / name)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for result in results:
        m = result.get("metrics") or {}
        if _finite(m.get("cv")) and _finite(m.get("domain_nmi")):
            ax.scatter(m["cv"], m["domain_nmi"], color="tab:blue")
            ax.annotate(result["variant"], (m["cv"], m["domain_nmi"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        for base, bm in (result.get("baselines") or {}).items():
            if _finite(bm.get("cv")) and _finite(bm.get("domain_nmi")):
                ax.scatter(bm["cv"], bm["domain_nmi"], color="tab:gray", marker="x")
                ax.annotate(base, (bm["cv"], bm["domain_nmi"]), fontsize=7, color="tab:gray", xytext=(3, -9),
                            textcoords="offset points")
    ax.set_xlabel("held-out load CV (lower = more balanced)")
    ax.set_ylabel("domain NMI (higher = more specialised)")
    ax.set_title("balance vs specialisation (blue: variants, grey: baseline routers)")
    fig.tight_layout()
    fig.savefig(folder / "balance-vs-specialisation.png", dpi=110)
    plt.close(fig)
    written.append(folder / "balance-vs-specialisation.png")
    return written
