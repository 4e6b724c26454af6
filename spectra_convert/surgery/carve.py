"""Carving: a dense FFN cut into a shared expert plus E routed experts made of the parent's own neurons.

Why (docs/ARCHITECTURE.md, carving): copies of one FFN give the router nothing to decide and cost E times the
memory; carved experts own disjoint slices of the parent's intermediate neurons, so the dense FFN is exactly
``shared + sum of all routed experts`` and a token that runs k of E slices runs a fraction of the FFN. What
decides quality is which neurons share a slice (neurons that fire together should be in the same expert, so a
token's mass lands in few experts) and which neurons are always on (the shared expert).

Per layer, on the calibration tokens' FFN inputs ``x [N, H]``:

1. ``intermediate_activations``: ``a = act(x Wg^T) * (x Wu^T)`` (gated) or ``act(x Wu^T + b)`` (gpt2) ``[N, I]``.
2. ``contributions``: ``|a_tj| * ||d_j||``, neuron j's share of the output (``d_j`` its down-projection column).
3. ``plan_carve``: the ``S`` neurons most often among a token's top contributors form the shared expert; the rest
   are grouped into E equal experts by balanced k-means on their co-activation patterns (``balanced_kmeans``).
4. ``carve_tensors``: the fused expert tensors in ``SpectraExperts`` layout, plus the shared expert.
5. ``oracle_mass``: per token, the norm of each routed expert's contribution to the FFN output — the k largest are
   the experts that "would have fired"; routers are fitted to predict them.
6. ``refit_scales``: least-squares per-expert output scales so that the sum over the k oracle experts best
   reproduces the dense output (the runtime's ``expert_scale``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUPINGS = ("coactivation", "random")


@dataclass
class CarvePlan:
    """Which neurons go where: ``shared [S]`` and ``groups [E, m]`` index the parent's intermediate neurons."""

    shared: torch.Tensor
    groups: torch.Tensor

    @property
    def experts(self) -> int:
        return int(self.groups.shape[0])


def shared_size(intermediate: int, experts: int, fraction: float) -> int:
    """Shared neurons for ``fraction`` of ``intermediate``, rounded so the rest splits into ``experts`` equal parts."""
    shared = round(intermediate * fraction)
    shared += (intermediate - shared) % experts
    if shared >= intermediate or (intermediate - shared) // experts < 1:
        raise ValueError(f"shared fraction {fraction} leaves no neurons for {experts} experts of {intermediate}")
    return shared


@torch.no_grad()
def intermediate_activations(dense: dict[str, torch.Tensor], inputs: torch.Tensor, act_fn) -> torch.Tensor:
    """The parent FFN's intermediate activation ``[N, I]`` for inputs ``[N, H]`` (what the down projection reads)."""
    x = inputs.float()
    if "gate_up" in dense:
        gate, up = F.linear(x, dense["gate_up"].float()).chunk(2, dim=-1)
        return act_fn(gate) * up
    return act_fn(F.linear(x, dense["up"].float(), dense["up_bias"].float()))


@torch.no_grad()
def contributions(acts: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``|a_tj| * ||d_j||``: how much neuron j adds to token t's output (its activation alone ignores that the
    down projection weighs neurons very differently)."""
    return acts.abs() * down.float().norm(dim=0)


@torch.no_grad()
def balanced_kmeans(features: torch.Tensor, k: int, *, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Partition the rows of ``features [n, F]`` into ``k`` clusters of exactly ``n / k`` rows by cosine k-means
    whose assignment step has capacities: rows are placed in order of regret (how much they lose if denied their
    best centroid), each in its most similar cluster that still has room. Returns ``[k, n/k]`` sorted indices.

    The features are one column per calibration token (``F`` = 32768 in a default carve), so both passes over
    them are matrix products: the similarities, and the centroids as ``onehot [k, n] @ points`` (an ``index_add_``
    of the rows took 54 of a 307 s carve; docs/ARCHITECTURE.md, "Time of a carve"). A fixed assignment fixes the
    centroids, so an unchanged assignment ends the loop."""
    n = features.shape[0]
    if n % k:
        raise ValueError(f"{n} rows do not split into {k} equal clusters")
    size = n // k
    points = F.normalize(features.float(), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(n, generator=generator)[:k]]
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        sims = points @ centroids.T
        ranked = sims.topk(min(2, k), dim=1).values
        regret = ranked[:, 0] - ranked[:, -1]
        preferences = torch.argsort(sims, dim=1, descending=True).tolist()
        fill = [0] * k
        previous = assign.clone()
        for row in torch.argsort(regret, descending=True).tolist():
            for cluster in preferences[row]:
                if fill[cluster] < size:
                    fill[cluster] += 1
                    assign[row] = cluster
                    break
        if torch.equal(assign, previous):
            break
        onehot = torch.zeros(k, n).scatter_(0, assign.unsqueeze(0), 1.0)
        centroids = F.normalize(onehot @ points, dim=-1)
    return torch.stack([torch.nonzero(assign == c).flatten() for c in range(k)])


@torch.no_grad()
def plan_carve(contrib: torch.Tensor, experts: int, shared_fraction: float, *, grouping: str = "coactivation",
               active_fraction: float = 0.25, seed: int = 0) -> CarvePlan:
    """Shared neurons and routed groups from the contributions ``[N, I]`` of the calibration tokens.

    A neuron is *active* for a token when it is among that token's top ``active_fraction`` contributors; the
    most frequently active neurons form the shared expert. The others are clustered on their per-token
    contribution patterns (``coactivation``), so that the neurons one token needs sit in few experts, or dealt
    out by a seeded permutation (``random``, the LLaMA-MoE baseline).
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    tokens, inter = contrib.shape
    n_shared = shared_size(inter, experts, shared_fraction)
    top = max(1, round(inter * active_fraction))
    active = torch.zeros_like(contrib, dtype=torch.bool)
    active.scatter_(1, contrib.topk(top, dim=1, sorted=False).indices, True)
    frequency = active.float().mean(0) + 1e-6 * contrib.mean(0) / contrib.mean(0).max().clamp(min=1e-12)
    ranked = torch.argsort(frequency, descending=True)
    shared, rest = ranked[:n_shared].sort().values, ranked[n_shared:]
    if grouping == "random":
        generator = torch.Generator().manual_seed(seed)
        groups = rest[torch.randperm(rest.numel(), generator=generator)].view(experts, -1).sort(dim=1).values
        return CarvePlan(shared, groups)
    patterns = contrib[:, rest].T  # [n_rest, N]: when each neuron contributes
    patterns = patterns / patterns.mean(dim=1, keepdim=True).clamp(min=1e-12)
    local = balanced_kmeans(patterns, experts, seed=seed)
    return CarvePlan(shared, rest[local].sort(dim=1).values)


def _slice(dense: dict[str, torch.Tensor], neurons: torch.Tensor, *, with_output_bias: bool) -> dict[str, torch.Tensor]:
    """One expert made of ``neurons`` of the dense FFN, in ``SpectraExperts`` layout (no expert axis)."""
    if "gate_up" in dense:
        inter = dense["gate_up"].shape[0] // 2
        return {"gate_up": torch.cat([dense["gate_up"][neurons], dense["gate_up"][neurons + inter]]),
                "down": dense["down"][:, neurons]}
    bias = dense["down_bias"] if with_output_bias else torch.zeros_like(dense["down_bias"])
    return {"up": dense["up"][neurons], "up_bias": dense["up_bias"][neurons], "down": dense["down"][:, neurons],
            "down_bias": bias}


def carve_tensors(dense: dict[str, torch.Tensor], plan: CarvePlan) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(routed [E, ...], shared [1, ...])`` tensors. The output bias (gpt2) lives in the shared expert only, so
    the sum over experts counts it once."""
    routed = [_slice(dense, group, with_output_bias=False) for group in plan.groups]
    stacked = {name: torch.stack([r[name] for r in routed]).contiguous() for name in routed[0]}
    shared = {name: t.unsqueeze(0).contiguous() for name, t in _slice(dense, plan.shared, with_output_bias=True).items()}
    return stacked, shared


@torch.no_grad()
def expert_outputs(acts: torch.Tensor, down: torch.Tensor, plan: CarvePlan) -> torch.Tensor:
    """Each routed expert's contribution to the FFN output ``[N, E, H]`` (output bias excluded)."""
    down = down.float()
    return torch.stack([acts[:, g] @ down[:, g].T for g in plan.groups], dim=1)


@torch.no_grad()
def oracle_mass(acts: torch.Tensor, down: torch.Tensor, plan: CarvePlan) -> torch.Tensor:
    """``[N, E]``: the norm of each routed expert's contribution to each token's output; its top-k is the oracle.
    One expert at a time: ``expert_outputs`` whole is E x N x H floats (2.4 GB for 131072 SmolLM2 tokens)."""
    down = down.float()
    return torch.stack([(acts[:, g] @ down[:, g].T).norm(dim=-1) for g in plan.groups], dim=1)


@torch.no_grad()
def refit_scales(outputs: torch.Tensor, selected: torch.Tensor, *, ridge: float = 1e-3) -> torch.Tensor:
    """Per-expert scales ``[E]`` minimising ``sum_t ||sum_{e in sel_t} y_te - sum_{e in sel_t} s_e y_te||^2``
    -- i.e. the dense routed output (all experts) approximated by the scaled selected experts -- with a ridge
    pull towards 1. ``outputs [N, E, H]``, ``selected [N, k]``."""
    tokens, experts, _ = outputs.shape
    mask = torch.zeros(tokens, experts, dtype=outputs.dtype).scatter_(1, selected, 1.0)
    target = outputs.sum(dim=1)  # [N, H]: what all routed experts together give (the dense FFN minus shared)
    gram_t = torch.einsum("teh,tfh->tef", outputs, outputs)  # [N, E, E]
    gram = torch.einsum("te,tef,tf->ef", mask, gram_t, mask)
    rhs = torch.einsum("te,teh,th->e", mask, outputs, target)
    lam = ridge * float(gram.diagonal().mean().clamp(min=1e-12))
    eye = torch.eye(experts, dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, rhs + lam * torch.ones(experts, dtype=gram.dtype))


#: Default rank of the skipped-experts estimate (``SkippedExpertsEstimate`` in the runtime). Measured on
#: SmolLM2-135M, 8 routed + 12.5% shared, top-4, 32768 calibration tokens, ppl ratio on unseen changelog text
#: (docs/CARVING.md): none 2.43x; rank 64 as ``upcycle`` fits it 1.80x (+2.8% of the parent FFN's multiply-adds);
#: exploratory fits at rank 32 / 64 / 128: 1.98x / 1.88x / 1.79x (+1.4% / +2.8% / +5.6%) -- a fifth expert's
#: neurons (top-5, +11%) give 1.74x, so a low rank is where the estimate pays most.
SKIPPED_ESTIMATE_RANK = 64
#: Ridge of the estimate, relative to the mean input energy (0.1 beat 1.0 and 0.01 on unseen text).
SKIPPED_ESTIMATE_RIDGE = 0.1


def skipped_output(outputs: torch.Tensor, selected: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[N, H]``: what all routed experts give minus what the selected ones give at their scales -- the part of
    the FFN output a carved block drops. ``outputs [N, E, H]``, ``selected [N, k]``, ``scale [E]``."""
    kept = torch.zeros(outputs.shape[:2], dtype=outputs.dtype).scatter_(1, selected, 1.0) * scale.to(outputs.dtype)
    return outputs.sum(dim=1) - torch.einsum("te,teh->th", kept, outputs)


@torch.no_grad()
def skipped_output_of(acts: torch.Tensor, down: torch.Tensor, plan: CarvePlan, selected: torch.Tensor,
                      scale: torch.Tensor) -> torch.Tensor:
    """``skipped_output(expert_outputs(acts, down, plan), selected, scale)`` without holding every expert's output:
    each neuron's activation weighted by its expert's ``1 - kept * scale`` for the token, through the down
    projection in one product (``[N, I_routed]`` instead of ``[N, E, H]``)."""
    kept = torch.zeros(acts.shape[0], plan.experts, dtype=acts.dtype).scatter_(1, selected, 1.0) * scale.to(acts.dtype)
    neurons = plan.groups.reshape(-1)
    expert_of_neuron = torch.arange(plan.experts).repeat_interleave(plan.groups.shape[1])
    return ((1.0 - kept)[:, expert_of_neuron] * acts[:, neurons]) @ down.float()[:, neurons].T


def _moments(x: torch.Tensor, y: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, sum x, sum y, xᵀx, xᵀy)``: what a ridge regression of ``y`` on ``x`` needs of the rows, additive over
    row sets (a fit on all rows and one without a held-out part share the products)."""
    return x.shape[0], x.sum(0), y.sum(0), x.T @ x, x.T @ y


def _reduced_rank_ridge(moments: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], rank: int,
                        ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(in_weight [H, r], out_weight [H_out, r], out_bias [H_out])``: the ridge regression of ``y`` on ``x``
    (centred; the intercept is not shrunk and sits outside the rank) projected on the top-``rank`` principal
    directions of its fitted values -- the optimal rank-r fit of the same regression. Takes the rows'
    ``_moments`` (float64: centring them, ``xᵀx - n m mᵀ``, loses nothing at this precision)."""
    rows, sum_x, sum_y, xx, xy = moments
    mean_x, mean_y = sum_x / rows, sum_y / rows
    gram = xx - rows * torch.outer(mean_x, mean_x)
    cross = xy - rows * torch.outer(mean_x, mean_y)
    full = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype),
                              cross)  # [H, H_out]
    directions = torch.linalg.eigh(full.T @ gram @ full).eigenvectors[:, -rank:]  # [H_out, r]
    latent = full @ directions  # [H, r]
    return latent, directions, mean_y - (mean_x @ latent) @ directions.T


@torch.no_grad()
def fit_skipped_estimate(inputs: torch.Tensor, skipped: torch.Tensor, rank: int, *,
                         ridge: float = SKIPPED_ESTIMATE_RIDGE, holdout: torch.Tensor | None = None,
                         ) -> tuple[dict[str, torch.Tensor], float]:
    """Reduced-rank ridge regression ``skipped ~ (x A) B + b`` of a carved layer's dropped output on its FFN input.

    Returns the runtime's tensors (``in_weight [r, H]``, ``out_weight [H, r]``, ``out_bias [H]``) fitted on all
    tokens, and the share of the dropped output's energy that a fit on the other tokens explains on the
    ``holdout`` rows (a boolean ``[N]`` mask; NaN without one).
    """
    x, y = inputs.double(), skipped.double()
    rank = min(rank, y.shape[1])
    explained = float("nan")
    every = _moments(x, y)
    if holdout is not None and bool(holdout.any()) and bool((~holdout).any()):
        x_held, y_held = x[holdout], y[holdout]
        held = _moments(x_held, y_held)
        latent, directions, bias = _reduced_rank_ridge(tuple(a - b for a, b in zip(every, held)), rank, ridge)
        error = y_held - (x_held @ latent) @ directions.T - bias
        explained = 1.0 - float(error.square().sum() / y_held.square().sum().clamp(min=1e-30))
    latent, directions, bias = _reduced_rank_ridge(every, rank, ridge)
    tensors = {"in_weight": latent.T.float().contiguous(), "out_weight": directions.float().contiguous(),
               "out_bias": bias.float().contiguous()}
    return tensors, explained
