"""Routing metrics (docs/ARCHITECTURE.md, "Metrics") as pure functions over numpy arrays.

Why pure functions: the same definitions score SPECTRA, every baseline router and any model a user brings,
so each one is pinned by a unit test on a hand-checkable input and none of them knows where its input came
from. Inputs are per-layer and over real (non-pad) tokens only:

* ``loads [E]``          — assignments (token, slot) per expert
* ``selected [N, k]``    — expert indices per token, best first (``selected[:, 0]`` is the top-1 expert)
* ``assignment [N, E]``  — bool, token t uses expert j (routers that do not give every token exactly k
                           experts, e.g. expert choice, are described this way)
* ``seq_ids [N]``        — which sequence each token belongs to (consecutive-token metrics never cross texts)

Metrics that are undefined for an input (no consecutive pairs, no tokens) return ``nan``; the report writes
them as ``null``.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
from numpy.typing import ArrayLike

# ----------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------


def expert_loads(selected: ArrayLike, num_experts: int) -> np.ndarray:
    """Assignments per expert from ``selected [N, k]`` (every slot counts once)."""
    flat = np.asarray(selected, dtype=np.int64).reshape(-1)
    flat = flat[flat >= 0]
    return np.bincount(flat, minlength=num_experts).astype(np.float64)


def assignment_matrix(selected: ArrayLike, num_experts: int) -> np.ndarray:
    """``[N, E]`` bool membership matrix of ``selected [N, k]`` (negative indices mean "no expert")."""
    sel = np.asarray(selected, dtype=np.int64)
    if sel.ndim == 1:
        sel = sel[:, None]
    out = np.zeros((sel.shape[0], num_experts), dtype=bool)
    rows = np.repeat(np.arange(sel.shape[0]), sel.shape[1])
    cols = sel.reshape(-1)
    keep = cols >= 0
    out[rows[keep], cols[keep]] = True
    return out


# ----------------------------------------------------------------------------------------------------------
# Load balance (per layer, from loads)
# ----------------------------------------------------------------------------------------------------------


def _loads(loads: ArrayLike) -> np.ndarray:
    arr = np.asarray(loads, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("loads must hold at least one expert")
    return arr


def load_cv(loads: ArrayLike) -> float:
    """Coefficient of variation std(l)/mean(l), population std: 0 for perfectly equal loads."""
    arr = _loads(loads)
    mean = arr.mean()
    return float(arr.std() / mean) if mean > 0 else math.nan


def max_vio(loads: ArrayLike) -> float:
    """MaxVio = max_j l_j / mean(l) - 1: how far the busiest expert exceeds equal capacity."""
    arr = _loads(loads)
    mean = arr.mean()
    return float(arr.max() / mean - 1.0) if mean > 0 else math.nan


def gini(loads: ArrayLike) -> float:
    """Gini = sum_i (2i - E - 1) l_(i) / (E sum l), loads sorted ascending, i = 1..E (as LPR reports it).

    0 for equal loads; (E-1)/E when one expert takes everything.
    """
    arr = np.sort(_loads(loads))
    total = arr.sum()
    if total <= 0:
        return math.nan
    n = arr.size
    ranks = np.arange(1, n + 1)
    return float(((2 * ranks - n - 1) * arr).sum() / (n * total))


def min_max_ratio(loads: ArrayLike) -> float:
    """min l / max l: 1 for equal loads, 0 when any expert is unused (LPR reports this)."""
    arr = _loads(loads)
    top = arr.max()
    return float(arr.min() / top) if top > 0 else math.nan


def expert_entropy(loads: ArrayLike) -> float:
    """Entropy -sum p_j log p_j (nats) of the load distribution p = l / sum l; log E when balanced."""
    arr = _loads(loads)
    total = arr.sum()
    if total <= 0:
        return math.nan
    p = arr[arr > 0] / total
    return float(-(p * np.log(p)).sum())


def normalized_expert_entropy(loads: ArrayLike) -> float:
    """Expert entropy divided by log E: 1 for balanced loads, 0 for total collapse."""
    arr = _loads(loads)
    if arr.size < 2:
        return math.nan
    return expert_entropy(arr) / math.log(arr.size)


def collapse_rate(loads: ArrayLike) -> float:
    """Share of experts whose load share p_j is below 0.1/E (effectively unused)."""
    arr = _loads(loads)
    total = arr.sum()
    if total <= 0:
        return math.nan
    p = arr / total
    return float((p < 0.1 / arr.size).mean())


def balance_metrics(loads: ArrayLike) -> dict[str, float]:
    """Every load-balance metric of one layer, by report key."""
    return {
        "cv": load_cv(loads),
        "maxvio": max_vio(loads),
        "gini": gini(loads),
        "min_max": min_max_ratio(loads),
        "expert_entropy": expert_entropy(loads),
        "expert_entropy_norm": normalized_expert_entropy(loads),
        "collapse_rate": collapse_rate(loads),
    }


# ----------------------------------------------------------------------------------------------------------
# Scores and router geometry
# ----------------------------------------------------------------------------------------------------------


def routing_entropy(scores: ArrayLike, temperature: float = 1.0) -> float:
    """Mean over tokens of the entropy (nats) of softmax(S_t / tau) over all experts."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0:
        return math.nan
    z = s / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-(np.exp(log_p) * log_p).sum(axis=1).mean())


def gram_matrix(vectors: ArrayLike) -> np.ndarray:
    """Gram matrix of the row-normalised ``vectors [E, d]`` (cosine similarities between experts)."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = v / np.where(norms > 0, norms, 1.0)
    return v @ v.T


def gram_orthogonality(vectors: ArrayLike) -> float:
    """1 - ||G - I||_F / (E sqrt 2) on normalised expert vectors (as SPECTRA reports it): 1 for orthonormal vectors."""
    g = gram_matrix(vectors)
    e = g.shape[0]
    return float(1.0 - np.linalg.norm(g - np.eye(e)) / (e * math.sqrt(2.0)))


def mean_abs_off_diagonal(vectors: ArrayLike) -> float:
    """Mean |G_ij| over i != j: 0 for orthogonal expert vectors, 1 for identical ones."""
    g = gram_matrix(vectors)
    e = g.shape[0]
    if e < 2:
        return math.nan
    off = ~np.eye(e, dtype=bool)
    return float(np.abs(g[off]).mean())


# ----------------------------------------------------------------------------------------------------------
# Token sets: specialisation and consistency
# ----------------------------------------------------------------------------------------------------------


def expert_overlap(assignment: ArrayLike) -> float:
    """Mean over expert pairs of Jaccard(tokens of i, tokens of j); pairs of two unused experts count 0."""
    a = np.asarray(assignment, dtype=bool)
    e = a.shape[1]
    if e < 2:
        return math.nan
    counts = a.sum(axis=0).astype(np.float64)
    inter = a.T.astype(np.float64) @ a.astype(np.float64)
    values = []
    for i, j in combinations(range(e), 2):
        union = counts[i] + counts[j] - inter[i, j]
        values.append(inter[i, j] / union if union > 0 else 0.0)
    return float(np.mean(values))


def _consecutive_pairs(seq_ids: ArrayLike, n: int) -> np.ndarray:
    """Indices t such that tokens t and t+1 belong to the same sequence."""
    ids = np.asarray(seq_ids).reshape(-1)
    if ids.shape[0] != n:
        raise ValueError(f"seq_ids has {ids.shape[0]} entries for {n} tokens")
    return np.nonzero(ids[:-1] == ids[1:])[0]


def sequential_consistency(top1: ArrayLike, seq_ids: ArrayLike) -> float:
    """Share of consecutive token pairs (same sequence) whose top-1 expert is the same (-1 = none, never equal)."""
    t = np.asarray(top1, dtype=np.int64).reshape(-1)
    pairs = _consecutive_pairs(seq_ids, t.shape[0])
    if pairs.size == 0:
        return math.nan
    same = (t[pairs] == t[pairs + 1]) & (t[pairs] >= 0)
    return float(same.mean())


def _row_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).sum(axis=1).astype(np.float64)
    union = (a | b).sum(axis=1).astype(np.float64)
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 1.0)


def topk_overlap(assignment: ArrayLike, seq_ids: ArrayLike) -> float:
    """Mean Jaccard of consecutive tokens' selected sets (same sequence only)."""
    a = np.asarray(assignment, dtype=bool)
    pairs = _consecutive_pairs(seq_ids, a.shape[0])
    if pairs.size == 0:
        return math.nan
    return float(_row_jaccard(a[pairs], a[pairs + 1]).mean())


def routing_consistency(selected_a: ArrayLike, selected_b: ArrayLike) -> float:
    """Share of tokens whose selected SET is identical in two routings (order within the set ignored)."""
    a = np.sort(np.asarray(selected_a, dtype=np.int64), axis=-1)
    b = np.sort(np.asarray(selected_b, dtype=np.int64), axis=-1)
    if a.shape != b.shape:
        raise ValueError(f"routings differ in shape: {a.shape} vs {b.shape}")
    if a.shape[0] == 0:
        return math.nan
    return float((a == b).all(axis=-1).mean())


def topk_agreement(selected_a: ArrayLike, selected_b: ArrayLike) -> float:
    """Mean over tokens of |A ∩ B| / |B|: the share of routing B's choices that routing A also makes.

    Used for "agreement with the original gate" when a rerouted model's k may differ from the old gate's.
    """
    a = np.asarray(selected_a, dtype=np.int64)
    b = np.asarray(selected_b, dtype=np.int64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"routings cover different token counts: {a.shape[0]} vs {b.shape[0]}")
    if a.shape[0] == 0:
        return math.nan
    e = int(max(a.max(), b.max())) + 1
    ma, mb = assignment_matrix(a, e), assignment_matrix(b, e)
    return float(((ma & mb).sum(axis=1) / mb.sum(axis=1).clip(min=1)).mean())


# ----------------------------------------------------------------------------------------------------------
# Domains and language modelling
# ----------------------------------------------------------------------------------------------------------


def _entropy_of_counts(counts: np.ndarray) -> float:
    total = counts.sum()
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def domain_nmi(top1: ArrayLike, domains: ArrayLike) -> float:
    """Normalised mutual information between top-1 expert and domain label (arithmetic-mean normalisation).

    0 when experts ignore the domain, 1 when the expert identifies the domain and vice versa. As in
    scikit-learn, two constant labelings score 1 and one constant labeling scores 0.
    """
    x = np.asarray(top1).reshape(-1)
    y = np.asarray(domains).reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"top1 has {x.shape[0]} tokens but domains has {y.shape[0]}")
    if x.shape[0] == 0:
        return math.nan
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    joint = np.zeros((xi.max() + 1, yi.max() + 1))
    np.add.at(joint, (xi, yi), 1.0)
    hx, hy = _entropy_of_counts(joint.sum(1)), _entropy_of_counts(joint.sum(0))
    if joint.shape[0] == 1 and joint.shape[1] == 1:
        return 1.0
    if hx == 0.0 or hy == 0.0:
        return 0.0
    hxy = _entropy_of_counts(joint.reshape(-1))
    mi = hx + hy - hxy
    return float(max(0.0, min(1.0, mi / ((hx + hy) / 2.0))))


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(token-weighted mean NLL): ``nll_sum`` is the summed NLL (nats) of ``n_tokens`` predicted tokens."""
    if n_tokens <= 0:
        return math.nan
    return float(math.exp(nll_sum / n_tokens))


# ----------------------------------------------------------------------------------------------------------
# One layer of one router, all at once
# ----------------------------------------------------------------------------------------------------------


def routing_metrics(
    assignment: ArrayLike,
    top1: ArrayLike,
    seq_ids: ArrayLike,
    domains: ArrayLike | None = None,
) -> dict[str, float]:
    """Balance + specialisation + consistency metrics of one layer's routing (no score-based ones)."""
    a = np.asarray(assignment, dtype=bool)
    out = balance_metrics(a.sum(axis=0))
    out["expert_overlap"] = expert_overlap(a)
    out["seq_consistency"] = sequential_consistency(top1, seq_ids)
    out["topk_overlap"] = topk_overlap(a, seq_ids)
    out["domain_nmi"] = domain_nmi(top1, domains) if domains is not None else math.nan
    return out
