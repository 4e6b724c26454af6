"""Baseline routers on the same experts and the same tokens, so SPECTRA's numbers are read against them.

Every baseline routes the router inputs (the FFN input hidden states) that ``collect`` captured from the
SPECTRA model itself, so all rows of the table see identical tokens in identical layers. Only the routing
decision differs. Perplexity is the exception: it needs the experts to run on each router's own choices, so
driven.py puts every baseline in the routers' places for one more forward (``perplexity_eval_half``).

**The linear gate.** Switch top-1/top-2, expert choice and loss-free-bias need a linear gate ``W [E, H]``.
We derive it from the model's own router rather than from a random init: SPECTRA scores a token by
``normalize(P [h; r]) · μ_j``; keeping only the hidden-state block of the projector gives the linear gate
``W = μ P[:, :H]`` (``μ[:, :H]`` when the projector is ablated). The baselines therefore share SPECTRA's
expert geometry and differ only in what SPECTRA adds on top: the GRU state, normalisation, OSR repulsion and
the dual bias. Gram orthogonality of a baseline is measured on these gate rows.

Routers (k = the model's top-k unless named):

* ``switch-top1`` / ``switch-top2`` — ``topk(softmax(h W^T))`` (Fedus et al. 2021).
* ``expert-choice`` — each expert takes its ``N k / E`` highest-affinity tokens (Zhou et al. 2022); a token
  can get 0..E experts (its share of tokens with none is ``dropped``).
* ``hash`` — a fixed random hash of the token id picks k distinct experts (Roller et al. 2021).
* ``loss-free-bias`` — switch gate plus a per-expert bias moved by ``u · sign(mean load − load)`` after each
  mini-batch (Wang et al. 2024, used by DeepSeek-V3). The bias is fitted on every other text (even-indexed
  sequences of each domain) and the metrics are measured on the others, so it is scored on text it never
  saw; alternating texts within each domain rather than splitting the token stream in two halves keeps a
  file sorted by domain from fitting on one domain and scoring on another.
* ``lpr`` — Latent Prototype Routing (seed 004, lpr.py): its own encoder and unit-sphere prototypes (not the
  linear gate), fitted on the same fit texts as loss-free-bias with LPR's regularisers (diversity, alignment,
  KL) and its EMA prototype update, then scored on the other texts. There is no task loss in a fit on
  captured inputs; the study's ``lpr`` variant trains it with the LM loss too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..router import metrics as M
from .collect import Collection

BASELINES = ("switch-top1", "switch-top2", "expert-choice", "hash", "loss-free-bias", "lpr")

#: DeepSeek's loss-free balancing update rate u and how many mini-batch updates the bias gets.
LFB_RATE = 1e-3
LFB_STEPS = 3000
LFB_BATCH = 512


@dataclass
class BaselineRouting:
    """One baseline's routing of one layer, over ``token_index`` (a subset for loss-free-bias)."""

    assignment: np.ndarray  # [n, E] bool
    top1: np.ndarray  # [n] int (-1 = no expert)
    token_index: np.ndarray  # [n] positions in the collection
    gate: np.ndarray | None  # [E, H] gate rows (None for hash)
    routing_entropy: float = math.nan
    dropped: float = 0.0
    #: What driving the experts with this router needs besides the gate (``bias`` for loss-free-bias, the fitted
    #: ``router`` module for lpr); see driven.py.
    state: dict[str, Any] = field(default_factory=dict)


def linear_gate(router: Any) -> torch.Tensor:
    """``W [E, H]``: the hidden-state part of the router's score (see the module docstring)."""
    with torch.no_grad():
        mu = router.unit_expert_vectors().float().cpu()
        hidden = int(router.hidden_size)
        if getattr(router, "use_projector", True) and hasattr(router, "projector"):
            return mu @ router.projector.detach().float().cpu()[:, :hidden]
        return mu[:, :hidden].clone()


def _entropy(logits: torch.Tensor) -> float:
    log_p = torch.log_softmax(logits, dim=-1)
    return float(-(log_p.exp() * log_p).sum(-1).mean()) if logits.shape[0] else math.nan


def _topk_routing(logits: torch.Tensor, k: int, index: np.ndarray, gate: torch.Tensor) -> BaselineRouting:
    selected = torch.topk(logits, k, dim=-1).indices.numpy()
    e = logits.shape[1]
    return BaselineRouting(M.assignment_matrix(selected, e), selected[:, 0], index, gate.numpy(), _entropy(logits))


def switch(logits: torch.Tensor, k: int, gate: torch.Tensor) -> BaselineRouting:
    """Switch/GShard top-k: the k highest gate logits (softmax is monotone, so logits rank the same)."""
    return _topk_routing(logits, k, np.arange(logits.shape[0]), gate)


def expert_choice(logits: torch.Tensor, k: int, gate: torch.Tensor) -> BaselineRouting:
    """Each expert picks its ``round(N k / E)`` tokens with the highest softmax affinity."""
    n, e = logits.shape
    probs = torch.softmax(logits, dim=-1)
    capacity = max(1, min(n, int(round(n * k / e))))
    chosen = torch.topk(probs, capacity, dim=0).indices  # [C, E]
    assignment = torch.zeros((n, e), dtype=torch.bool)
    assignment[chosen, torch.arange(e).expand_as(chosen)] = True
    masked = probs.masked_fill(~assignment, -1.0)
    top1 = torch.where(assignment.any(-1), masked.argmax(-1), torch.full((n,), -1)).numpy()
    routing = BaselineRouting(assignment.numpy(), top1, np.arange(n), gate.numpy(), _entropy(logits))
    routing.dropped = float((~assignment.any(-1)).float().mean())
    return routing


def hash_routing(token_ids: np.ndarray, num_experts: int, k: int, seed: int = 0) -> BaselineRouting:
    """k distinct experts per token id from a fixed random table (row i depends only on seed and i)."""
    table = np.random.default_rng(seed).random((int(token_ids.max()) + 1, num_experts))
    selected = np.argsort(-table, axis=1)[:, :k][token_ids]
    return BaselineRouting(M.assignment_matrix(selected, num_experts), selected[:, 0], np.arange(len(token_ids)),
                           None)


def loss_free_bias(
    logits: torch.Tensor, k: int, gate: torch.Tensor, fit: np.ndarray, evaluate: np.ndarray,
    *, rate: float = LFB_RATE, steps: int = LFB_STEPS, batch: int = LFB_BATCH,
) -> BaselineRouting:
    """Switch top-k on ``softmax(logits) + b``, b fitted on ``fit`` tokens by sign-of-load updates."""
    probs = torch.softmax(logits, dim=-1)
    e = probs.shape[1]
    bias = torch.zeros(e)
    fit_probs = probs[torch.as_tensor(fit)]
    n_fit = fit_probs.shape[0]
    for step in range(steps if n_fit else 0):
        start = (step * batch) % n_fit
        chunk = fit_probs[start:start + batch]
        chosen = torch.topk(chunk + bias, k, dim=-1).indices
        loads = torch.bincount(chosen.reshape(-1), minlength=e).float()
        bias += rate * torch.sign(loads.mean() - loads)
    eval_probs = probs[torch.as_tensor(evaluate)]
    selected = torch.topk(eval_probs + bias, k, dim=-1).indices.numpy()
    return BaselineRouting(M.assignment_matrix(selected, e), selected[:, 0], evaluate, gate.numpy(),
                           _entropy(logits[torch.as_tensor(evaluate)]), state={"bias": bias})


def lpr(inputs: torch.Tensor, num_experts: int, k: int, fit: np.ndarray, evaluate: np.ndarray, *, seed: int = 0
        ) -> BaselineRouting:
    """Latent Prototype Routing (lpr.py) fitted on the ``fit`` tokens' router inputs, scored on ``evaluate``.

    Fitted like loss-free-bias, on every other text of each domain, so it is scored on text it never saw. Its
    "gate rows" (for Gram orthogonality) are the unit prototypes in its latent space.
    """
    from .lpr import fit_lpr

    router = fit_lpr(inputs[torch.as_tensor(fit)], num_experts, k, seed=seed)
    with torch.no_grad():
        logits, _, selected = router(inputs[torch.as_tensor(evaluate)].float())
    chosen = selected.numpy()
    return BaselineRouting(M.assignment_matrix(chosen, num_experts), chosen[:, 0], evaluate,
                           router.prototypes.detach().numpy().copy(), _entropy(logits), state={"router": router})


def split_fit_eval(seq_ids: np.ndarray, domains: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token positions of texts to fit on and texts to evaluate on, alternating texts within each domain.

    Alternating within a domain (not over the whole stream) keeps both halves' domain mix equal even when
    texts arrive round-robin over domains. A single text is split into halves.
    """
    texts, first = np.unique(seq_ids, return_index=True)
    text_domain = domains[first] if domains is not None else np.zeros(len(texts), dtype=int)
    rank = np.zeros(len(texts), dtype=int)
    seen: dict[object, int] = {}
    for position in np.argsort(first, kind="stable"):
        key = text_domain[position]
        rank[position] = seen.get(key, 0)
        seen[key] = rank[position] + 1
    text_of_token = np.searchsorted(texts, seq_ids)
    fit = np.nonzero(rank[text_of_token] % 2 == 0)[0]
    evaluate = np.nonzero(rank[text_of_token] % 2 == 1)[0]
    if evaluate.size == 0:
        half = len(seq_ids) // 2
        fit, evaluate = np.arange(half), np.arange(half, len(seq_ids))
    return fit, evaluate


def route_layer(
    inputs: torch.Tensor, router: Any, token_ids: np.ndarray, seq_ids: np.ndarray, top_k: int, *, seed: int = 0,
    domains: np.ndarray | None = None,
) -> dict[str, BaselineRouting]:
    """Every baseline's routing of one layer's captured router inputs ``[N, H]``."""
    gate = linear_gate(router)
    logits = inputs.float() @ gate.T
    e = gate.shape[0]
    fit, evaluate = split_fit_eval(seq_ids, domains)
    return {
        "switch-top1": switch(logits, 1, gate),
        "switch-top2": switch(logits, min(2, e), gate),
        "expert-choice": expert_choice(logits, top_k, gate),
        "hash": hash_routing(token_ids, e, top_k, seed=seed),
        "loss-free-bias": loss_free_bias(logits, top_k, gate, fit, evaluate),
        "lpr": lpr(inputs, e, top_k, fit, evaluate, seed=seed),
    }


def layer_metrics(routing: BaselineRouting, collection: Collection) -> dict[str, float]:
    """Metrics of one baseline on one layer, over the tokens it routed."""
    index = routing.token_index
    domains = collection.domains[index] if collection.domains is not None else None
    out = M.routing_metrics(routing.assignment, routing.top1, collection.seq_ids[index], domains)
    out["routing_entropy"] = routing.routing_entropy
    if routing.gate is not None:
        out["gram_orthogonality"] = M.gram_orthogonality(routing.gate)
        out["gram_offdiag"] = M.mean_abs_off_diagonal(routing.gate)
    else:
        out["gram_orthogonality"] = out["gram_offdiag"] = math.nan
    out["dropped"] = routing.dropped
    out["tokens"] = float(len(index))
    return out


def run_baselines(collection: Collection, routers: list[Any], *, seed: int = 0
                  ) -> tuple[dict[str, list[dict[str, float]]], list[dict[str, BaselineRouting]]]:
    """``({baseline: [per-layer metrics]}, [per-layer {baseline: routing}])`` on the captured router inputs.

    The routings carry what driven.py needs to let each baseline drive the experts (baseline perplexity)."""
    if any(layer.inputs is None for layer in collection.layers):
        raise ValueError("baselines need router inputs: collect with capture_inputs=True")
    per_layer: dict[str, list[dict[str, float]]] = {name: [] for name in BASELINES}
    fitted: list[dict[str, BaselineRouting]] = []
    for layer, router in zip(collection.layers, routers):
        routings = route_layer(layer.inputs, router, collection.token_ids, collection.seq_ids, collection.top_k,
                               seed=seed, domains=collection.domains)
        for name, routing in routings.items():
            per_layer[name].append(layer_metrics(routing, collection))
        fitted.append(routings)
    return per_layer, fitted
