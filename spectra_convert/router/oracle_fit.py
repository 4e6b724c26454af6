"""Routers fitted to predict carved experts: the oracle, a ridge-fitted linear gate, and the SPECTRA router.

Why (docs/ARCHITECTURE.md, carving): a carved expert is a slice of the parent's neurons, so for every token
there is a right answer -- the k slices that carry most of the token's FFN output (``oracle_topk`` of the
activation mass). Routing quality is recall of that answer on text the fit never saw; balance is a constraint
on it, set afterwards by the dual bias.

A carved layer's router is fitted in three steps:

1. closed form (``fit_spectra_router``): a ridge regression from the router's features ``[h ; r]`` (FFN input
   and GRU state) to the per-token standardised oracle mass, written into the first E rows of the projector with
   the expert vectors set to the matching unit vectors, its intercept on a GRU unit made constant
   (``constant_state_unit``). Cosine scoring divides all of a token's scores by the same ``||P [h;r]||``, so its
   top-k is exactly the ridge gate's;
2. gradient steps on projector and expert vectors (GRU frozen: its states are computed once) with a listwise
   loss -- softmax cross-entropy against the oracle's top-k set -- which optimises the ranking, not the masses;
   as many as improve oracle recall on a held-out part of the calibration sequences;
3. ``calibrate_carved_bias``: the balancing dual bias, whole (``carve_bias="balance"``, the default) or at the
   strongest share held-out recall allows (``"recall"``).

Imports torch, the runtime (``spectra_convert.modeling``) and ``router.loads``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modeling.configuration_spectra import SPECTRA_DEFAULTS
from ..modeling.modeling_spectra import SpectraRouter, run_experts, single_cpu_thread
from .loads import load_cv


def oracle_topk(mass: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k]``: the k experts with the largest activation mass per token (ties broken by index)."""
    return mass.topk(k, dim=-1).indices


def topk_recall(selected: torch.Tensor, oracle: torch.Tensor) -> float:
    """Mean share of each token's oracle experts that ``selected`` also picks (1.0 = oracle routing)."""
    hits = (oracle.unsqueeze(-1) == selected.unsqueeze(-2)).any(-1).float()
    return float(hits.mean())


def selection_cv(selected: torch.Tensor, experts: int) -> float:
    """Load CV (``loads.load_cv``) of the hard expert loads of a selection ``[N, k]`` (0 = perfectly balanced)."""
    return load_cv(torch.bincount(selected.reshape(-1), minlength=experts))


def standardised(mass: torch.Tensor) -> torch.Tensor:
    """Per-token mass relative to the token's mean over experts (removes the token's overall FFN magnitude,
    which says nothing about which experts to pick).

    Tried and not kept (2026-12-06, SmolLM2 carved 8 + shared, ``bench/carve.py`` on unseen changelog text, the
    same carve side by side): the centred log mass as the ridge target raised held-out oracle recall (top-4
    0.738 -> 0.743 for the SPECTRA router, 0.754 -> 0.766 for the linear gate; top-6 0.846 -> 0.848 and
    0.851 -> 0.860) but not perplexity: top-4 1.956x -> 1.943x and 1.797x -> 1.816x the parent's, top-6
    1.305x -> 1.320x and 1.279x -> 1.292x. The mass ratio weights the large experts, whose misses cost most."""
    mass = mass.float()
    return mass / mass.mean(dim=-1, keepdim=True).clamp(min=1e-12)


def ridge_fit(features: torch.Tensor, target: torch.Tensor, ridge: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``[E, F]`` and intercept ``[E]`` of ``target ~ features W^T + c`` (ridge relative to the feature
    variance, so one value works at any scale)."""
    x = features.float()
    mean_x, mean_y = x.mean(0), target.float().mean(0)
    xc, yc = x - mean_x, target.float() - mean_y
    gram = xc.T @ xc
    lam = ridge * float(gram.diagonal().mean().clamp(min=1e-12))
    weight = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0]), xc.T @ yc).T
    return weight, mean_y - weight @ mean_x


class LinearGate:
    """The baseline router: a ridge-fitted linear map of the FFN input to the standardised oracle mass.

    ``balance_loads`` adds a hard-load balancing bias fitted by the loop that fits the SPECTRA router's dual bias
    (``calibrate.calibrate_bias_on_scores``): a carved model's router pays recall for even loads, so "better than
    the linear gate" is only a fair comparison when the gate is made to pay the same (docs/CARVING.md)."""

    def __init__(self, inputs: torch.Tensor, mass: torch.Tensor, ridge: float = 1e-2):
        self.weight, self.bias = ridge_fit(inputs.reshape(-1, inputs.shape[-1]), standardised(mass), ridge)
        self.load_bias: torch.Tensor | None = None  # set by ``balance_loads``

    def scores(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.reshape(-1, inputs.shape[-1]).float() @ self.weight.T + self.bias

    def select(self, inputs: torch.Tensor, k: int) -> torch.Tensor:
        scores = self.scores(inputs)
        return (scores if self.load_bias is None else scores + self.load_bias).topk(k, dim=-1).indices

    @torch.no_grad()
    def balance_loads(self, inputs: torch.Tensor, k: int) -> float:
        """Fit ``load_bias`` so the gate's hard top-``k`` loads on ``inputs [B, T, H]`` are even; returns the
        achieved calibration load CV."""
        from .calibrate import calibrate_bias_on_scores

        loads = _PlainTopK(k, self.weight.shape[0])
        cv = calibrate_bias_on_scores(loads, self.scores(inputs), seq_len=inputs.shape[1])
        self.load_bias = loads.dual_bias
        return cv


class _PlainTopK:
    """What ``calibrate_bias_on_scores`` reads of a router, for a plain top-k of scores plus a bias (no
    per-sequence term): lets the linear gate's balancing bias come from the same loop as the router's."""

    sinkhorn_iters = SPECTRA_DEFAULTS["sinkhorn_iters"]  # what a SPECTRA router runs unless configured otherwise

    def __init__(self, top_k: int, num_experts: int):
        self.top_k, self.num_experts = top_k, num_experts
        self.dual_bias = torch.zeros(num_experts)

    def select(self, logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.topk(logits.float() + bias.float(), self.top_k, dim=-1).indices


@torch.no_grad()
def router_features(router: SpectraRouter, inputs: torch.Tensor) -> torch.Tensor:
    """``[N, H (+d)]``: the FFN input and, with a GRU, the router's sequential state (what the projector reads)."""
    h = inputs.float().to(router.expert_vectors.dtype)
    if not router.use_gru:
        return h.reshape(-1, h.shape[-1]).float()
    r, _ = router.sequential_state(h, None, None)
    return torch.cat([h, r], dim=-1).reshape(-1, h.shape[-1] + router.router_dim).float()


def _scores(router: SpectraRouter, features: torch.Tensor) -> torch.Tensor:
    """Selection logits ``-C/tau`` of precomputed features (what ``SpectraRouter._route`` computes from them)."""
    projected = features @ router.projector.T if router.use_projector else features
    z = F.normalize(projected, dim=-1)
    return router.selection_logits(z @ router.unit_expert_vectors().T)


#: Pre-activation that saturates a GRU gate: sigmoid(-20) ~ 2e-9 and tanh(20) == 1.0 in float32 and bfloat16.
_SATURATE = 20.0


@torch.no_grad()
def constant_state_unit(router: SpectraRouter) -> int | None:
    """Make the GRU's last state unit the constant 1 and return its index (``None`` without a GRU).

    The projector has no bias, and the ridge gate's intercept decides a lot: measured on SmolLM2 carved 8 + shared
    (unseen text, layers 2/10/18/26) dropping it cost 0.05-0.18 top-1 recall and 0.05-0.12 top-4 recall. With the
    update gate shut (``z = sigmoid(-20)``) and the candidate saturated (``n = tanh(20)``, no input or recurrent
    weights) the unit is 1 from the first token on, so the projector column that reads it is the intercept, with
    no change to the runtime. Saturated gates pass no gradient, so fine-tuning keeps it constant; the other
    units see it as one more constant input.
    """
    if not router.use_gru:
        return None
    gru, d = router.gru, router.router_dim
    unit = d - 1
    rows = [unit, d + unit, 2 * d + unit]  # reset, update, candidate rows of the stacked GRU weights
    for weight in (gru.weight_ih_l0, gru.weight_hh_l0):
        weight[rows] = 0.0
    gru.bias_ih_l0[rows] = torch.tensor([0.0, -_SATURATE, _SATURATE], dtype=gru.bias_ih_l0.dtype)
    gru.bias_hh_l0[rows] = 0.0
    return unit


@torch.no_grad()
def _closed_form(router: SpectraRouter, features: torch.Tensor, target: torch.Tensor, ridge: float) -> None:
    """Ridge gate written into the projector's first E rows, its intercept into the constant GRU unit's column
    (``constant_state_unit``); expert vectors = the matching unit vectors, dual bias zero."""
    if not router.use_projector or router.num_experts > router.router_dim:
        return  # no projector to write into: the gradient steps start from the current vectors
    weight, intercept = ridge_fit(features, target, ridge)
    unit = _constant_column(router, features)
    if unit is not None:
        weight[:, unit] += intercept
    projector = router.projector.float().clone()
    norm = weight.norm(dim=1, keepdim=True).mean().clamp(min=1e-12)
    rows = weight / norm  # unit scale on average: the other rows keep their orthogonal init scale
    rest = projector[router.num_experts:]
    # keep the remaining rows orthogonal to the gate rows: they then only rescale the expression vector
    basis, _ = torch.linalg.qr(rows.T)
    rest = rest - (rest @ basis) @ basis.T
    router.projector.copy_(torch.cat([rows, rest]).to(router.projector.dtype))
    vectors = torch.zeros_like(router.expert_vectors)
    vectors[:, : router.num_experts] = torch.eye(router.num_experts)
    router.expert_vectors.copy_(vectors)
    router.dual_bias.zero_()


def _constant_column(router: SpectraRouter, features: torch.Tensor) -> int | None:
    """Column of ``features`` that is the constant GRU unit, if the router has one (see ``constant_state_unit``)."""
    if not router.use_gru:
        return None
    column = router.hidden_size + router.router_dim - 1
    return column if bool(((features[:, column] - 1.0).abs() < 1e-6).all()) else None


def holdout_split(sequences: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit, held_out)`` sequence indices: the last ``fraction`` of the (already shuffled) calibration blocks,
    at least one, or none when there are fewer than two blocks (then everything is fitted and nothing chosen)."""
    held = min(sequences - 1, max(1, round(sequences * fraction))) if sequences >= 2 and fraction > 0 else 0
    order = torch.arange(sequences)
    return order[: sequences - held], order[sequences - held:]


def _rows(split: torch.Tensor, steps: int) -> torch.Tensor:
    """Flat token rows of the sequences ``split`` in a ``[B * steps, ...]`` tensor."""
    return (split.unsqueeze(1) * steps + torch.arange(steps)).reshape(-1)


def heldout_token_mask(sequences: int, steps: int, fraction: float = 0.125) -> torch.Tensor:
    """``[sequences * steps]`` booleans: the flat token rows of ``holdout_split``'s held-out sequences (what the
    router's fit holds out, so the carve's other fits can report on the same tokens)."""
    mask = torch.zeros(sequences * steps, dtype=torch.bool)
    mask[_rows(holdout_split(sequences, fraction)[1], steps)] = True
    return mask


@torch.no_grad()
def _score_recall(router: SpectraRouter, features: torch.Tensor, oracle: torch.Tensor) -> float:
    return topk_recall(_scores(router, features).topk(router.top_k, dim=-1).indices, oracle)


def _listwise_steps(router: SpectraRouter, features: torch.Tensor, oracle: torch.Tensor, steps: int, *, lr: float,
                    batch_tokens: int, seed: int, every: int = 0, score=None) -> tuple[int, float]:
    """Adam steps on projector and expert vectors (GRU frozen: ``features`` precomputed) with a listwise loss --
    softmax cross-entropy against the oracle's top-k set ``oracle [N, E]``, which optimises the ranking, not
    the masses. With ``score``, every ``every`` steps the held-out recall is taken and the best parameters (the
    start included) are restored at the end; returns ``(best step, its recall)``."""
    params = [router.expert_vectors] + ([router.projector] if router.use_projector else [])
    best_step, best = 0, score() if score else float("nan")
    kept = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for step in range(1, steps + 1):
            rows = torch.randperm(features.shape[0], generator=generator)[:batch_tokens]
            logits = _scores(router, features[rows])
            loss = -(oracle[rows] * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if score and (step % every == 0 or step == steps):
                recall = score()
                if recall > best:
                    best_step, best, kept = step, recall, [p.detach().clone() for p in params]
    router.zero_grad(set_to_none=True)
    if score:
        with torch.no_grad():
            for param, value in zip(params, kept):
                param.copy_(value)
    return best_step, best


#: Ridge strength of a carved router's closed-form fit (relative to the mean feature energy). 0.1 until the
#: fourteenth session (2026-12-06); measured on SmolLM2-135M carved 8 + 5/12 shared, unseen changelog text in
#: ``bench/carve.py``'s blocks (docs/CARVING.md, "The router fit's ridge strength and its listwise steps"): top-5 1.239x at
#: 0.1, 1.223-1.228x at 0.01, 1.227x at 0.001 (no listwise steps); top-2 1.661x at 0.01, 1.670x at 0.001.
ROUTER_RIDGE = 1e-2
#: Listwise gradient steps after a carved router's ridge fit (``upcycle --router-steps``). 60 until the fourteenth
#: session (2026-12-06): the steps raise held-out oracle recall (and the held-out share of the oracle's output
#: mass), but on unseen text they cost perplexity at top-5 (SmolLM2-135M 8 + 5/12 shared, ridge 0.01, ``bench/carve.py`` blocks:
#: 1.223-1.228x without, 1.244x with; 131k calibration tokens: 1.203x without, 1.220x with) and gained within the
#: run-to-run noise at top-2 (1.661x without, 1.652x with; docs/CARVING.md, "The router fit's ridge strength and its
#: listwise steps"). 0: the ridge gate alone, as the router's closed form writes it.
ROUTER_STEPS = 0


def fit_spectra_router(router: SpectraRouter, inputs: torch.Tensor, mass: torch.Tensor, *, steps: int = ROUTER_STEPS,
                       lr: float = 3e-3, batch_tokens: int = 4096, ridge: float = ROUTER_RIDGE, seed: int = 0,
                       holdout: float = 0.125, eval_every: int = 10) -> dict[str, float]:
    """Fit ``router`` so its top-k (before the dual bias) matches the oracle top-k of ``mass [N, E]`` on the
    calibration FFN inputs ``inputs [B, T, H]``: the ridge gate (``_closed_form``), then listwise gradient steps.
    The dual bias is left at zero: calibrate it afterwards (``calibrate_carved_bias``).

    How many steps to run is chosen on the last ``holdout`` of the sequences: fitted on the rest, the step
    count (0, the ridge gate alone, included) with the best held-out recall wins, and the router is then refitted
    on every sequence with that many steps, so the steps can only help on text the fit did not see. Returns the
    held-out recall of the ridge start and of the chosen step count, and that count (``nan`` recalls and all
    ``steps`` without a held-out split).
    """
    if router.use_projector and router.num_experts <= router.router_dim:
        constant_state_unit(router)
    features = router_features(router, inputs)
    target = standardised(mass)
    oracle_idx = oracle_topk(mass, router.top_k)
    oracle = torch.zeros(mass.shape).scatter_(1, oracle_idx, 1.0 / router.top_k)
    fit, held = holdout_split(inputs.shape[0], holdout)
    options = {"lr": lr, "batch_tokens": batch_tokens, "seed": seed}
    start = best = float("nan")
    chosen = steps
    initial = router.projector.detach().clone() if router.use_projector else None
    if held.numel():
        fit_rows, held_rows = _rows(fit, inputs.shape[1]), _rows(held, inputs.shape[1])
        _closed_form(router, features[fit_rows], target[fit_rows], ridge)
        score = lambda: _score_recall(router, features[held_rows], oracle_idx[held_rows])  # noqa: E731
        start = score()
        chosen, best = _listwise_steps(router, features[fit_rows], oracle[fit_rows], steps, every=eval_every,
                                       score=score, **options) if steps > 0 else (0, start)
    if initial is not None:
        with torch.no_grad():
            router.projector.copy_(initial)  # the refit starts where the held-out fit started
    _closed_form(router, features, target, ridge)
    if chosen > 0:
        _listwise_steps(router, features, oracle, chosen, **options)
    return {"heldout_recall_ridge": start, "heldout_recall_fitted": best, "router_steps": float(chosen)}


#: Bias strengths tried by ``calibrate_carved_bias`` (share of the balancing bias applied).
BIAS_STRENGTHS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


@torch.no_grad()
def calibrate_carved_bias(router: SpectraRouter, inputs: torch.Tensor, mass: torch.Tensor, *, holdout: float = 0.125,
                          tolerance: float = 0.002, rule: str = "recall") -> dict:
    """Dual bias of a carved router: the hard-load balancing bias (``calibrate_bias``), whole (``rule="balance"``)
    or scaled by the strongest share whose held-out oracle recall (last ``holdout`` of the sequences) is within
    ``tolerance`` of the best (``rule="recall"``). The knob ``carve_bias`` holds the rule a model was carved with.

    Why not full balance: the oracle itself is unbalanced on carved experts (measured on SmolLM2 8 + shared,
    unseen changelog text, layers 2/10/18/26: oracle load CV 0.34-1.0 at top-1, 0.21-0.38 at top-4), so equal
    hard loads run experts the token does not need: the full bias cost 0.02-0.13 top-1 and 0.01-0.05 top-4
    recall on unseen text, below the ridge gate. Under ``recall`` the bias is as strong as held-out recall
    allows. Why ``balance`` is nevertheless the carve's default (docs/CARVING.md, 2026-12-05): with the
    skipped-experts estimate the full bias costs 6% perplexity on unseen text (1.80x -> 1.91x the parent at
    top-4) and brings the load CV on four unseen domains from 0.263 to 0.144. Returns the chosen strength, its
    held-out recall and load CV, the calibration CV of the full balancing bias, and the curve
    ``[(strength, recall, cv)]``.
    """
    return calibrate_carved_bias_on_scores(router, router.selection_scores(inputs), mass, inputs.shape[1],
                                           holdout=holdout, tolerance=tolerance, rule=rule)


@torch.no_grad()
def calibrate_carved_bias_on_scores(router: SpectraRouter, logits: torch.Tensor, mass: torch.Tensor, steps: int, *,
                                    holdout: float = 0.125, tolerance: float = 0.002, rule: str = "recall") -> dict:
    """``calibrate_carved_bias`` given the selection scores ``[B * steps, E]`` of ``B`` whole sequences of
    ``steps`` tokens (sequence-major rows, as ``mass``): what lets a fine-tuned model's closing re-correction
    (``recalibrate_model_bias``) keep E floats a token instead of the hidden states."""
    from .calibrate import calibrate_bias_on_scores

    fit, held = holdout_split(logits.shape[0] // steps, holdout)
    balanced_cv = calibrate_bias_on_scores(router, logits, seq_len=steps)
    balancing = router.dual_bias.float().clone()
    if held.numel() == 0:
        return {"bias_strength": 1.0, "heldout_recall": float("nan"), "heldout_cv": float("nan"),
                "calibration_cv": balanced_cv}
    held_rows = _rows(held, steps)
    oracle = oracle_topk(mass[held_rows], router.top_k)
    curve = []
    for strength in BIAS_STRENGTHS:
        selected = (logits[held_rows] + strength * balancing).topk(router.top_k, dim=-1).indices
        curve.append((strength, topk_recall(selected, oracle), selection_cv(selected, router.num_experts)))
    if rule == "balance":
        strength, recall, cv = curve[-1]  # BIAS_STRENGTHS ends at 1.0: the whole balancing bias
    else:
        best = max(recall for _, recall, _ in curve)
        strength, recall, cv = max((c for c in curve if c[1] >= best - tolerance), key=lambda c: c[0])
    router.dual_bias.copy_((strength * balancing).to(router.dual_bias.dtype))
    return {"bias_strength": strength, "heldout_recall": recall, "heldout_cv": cv, "calibration_cv": balanced_cv,
            "curve": curve}


@torch.no_grad()
def router_selection(router: SpectraRouter, inputs: torch.Tensor) -> torch.Tensor:
    """``[N, k]``: what the router selects for ``inputs [B, T, H]`` (eval mode, dual bias and sequence term
    included), i.e. what the model will run."""
    was_training = router.training
    router.eval()
    try:
        with single_cpu_thread(inputs):
            _, _, selected = router(inputs.to(router.expert_vectors.dtype))
    finally:
        router.train(was_training)
    return selected


@torch.no_grad()
def block_oracle_mass(experts: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``[N, E]`` activation mass of every routed expert of a carved block (``SpectraExperts``) on ``hidden
    [N, H]``: the norm of each expert's unscaled contribution to the FFN output."""
    return torch.stack([experts.expert(e, hidden).norm(dim=-1) for e in range(experts.num_experts)], dim=-1).float()


@torch.no_grad()
def oracle_mass_via_forward(experts: torch.nn.Module, hidden: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``block_oracle_mass`` through the experts' own forward, one expert at a time (every token sent to expert
    e with weight 1, called as the block calls them, ``run_experts``): whatever wraps the fused tensors -- PEFT's
    LoRA during fine-tuning -- counts, as it does when the model runs."""
    ones = hidden.new_ones(hidden.shape[0], 1)
    return torch.stack([run_experts(experts, hidden, torch.full_like(ones, e, dtype=torch.long), ones).norm(dim=-1)
                        for e in range(num_experts)], dim=-1).float()


def carved_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE blocks of ``model`` that combine carved experts by sum (found by their ``expert_scale``)."""
    return [m for m in model.modules() if getattr(m, "expert_scale", None) is not None and hasattr(m, "gate")]


class OracleTap:
    """Forward hooks on the routers of carved blocks: after each batch, ``take(mask)`` adds every router's oracle
    top-k hits on that batch's real tokens; ``recall()`` is the per-layer mean. Used by validate and bench."""

    def __init__(self, model: torch.nn.Module):
        self.blocks = carved_blocks(model)
        self.hits = [0.0] * len(self.blocks)
        self.counts = [0] * len(self.blocks)
        self._handles: list = []
        self._calls: dict[int, torch.Tensor] = {}

    def __enter__(self) -> OracleTap:
        for index, block in enumerate(self.blocks):
            self._handles.append(block.gate.register_forward_hook(lambda m, a, o, i=index: self._hook(i, a, o)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def _hook(self, index: int, args: tuple, output: tuple) -> None:
        hidden = args[0].reshape(-1, args[0].shape[-1])
        selected = output[2]
        oracle = oracle_topk(block_oracle_mass(self.blocks[index].experts, hidden), selected.shape[-1])
        self._calls[index] = (oracle.unsqueeze(-1) == selected.unsqueeze(-2)).any(-1).float().mean(-1)

    def take(self, mask: torch.Tensor | None = None) -> None:
        for index, hits in self._calls.items():
            if mask is not None:
                hits = hits[mask.reshape(-1).bool().to(hits.device)]
            self.hits[index] += float(hits.sum())
            self.counts[index] += int(hits.numel())
        self._calls.clear()

    def recall(self) -> list[float]:
        return [h / max(c, 1) for h, c in zip(self.hits, self.counts)]


@torch.no_grad()
def model_oracle_recall(model: torch.nn.Module, blocks: torch.Tensor, *, batch_size: int = 4) -> list[float]:
    """Per carved layer, the oracle top-k recall of the routers over the token blocks ``[B, T]`` (no padding):
    every router's selection is compared with the k largest-mass experts of the same FFN input."""
    was_training = model.training
    model.eval()
    try:
        with OracleTap(model) as tap:
            for start in range(0, blocks.shape[0], batch_size):
                model(input_ids=blocks[start : start + batch_size], use_cache=False)
                tap.take()
    finally:
        model.train(was_training)
    return tap.recall()
