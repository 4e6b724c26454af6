"""Routers fitted to predict carved experts: the oracle, a ridge-fitted linear gate, and the SPECTRA router.

Why (docs/ARCHITECTURE.md, carving): a carved expert is a slice of the parent's neurons, so for every token
there is a right answer -- the k slices that carry most of the token's FFN output (``oracle_topk`` of the
activation mass). Routing quality is recall of that answer on text the fit never saw; balance is a constraint
on it, set afterwards by the dual bias.

``fit_spectra_router`` fits the runtime's router in two steps:

1. closed form: a ridge regression from the router's features ``[h ; r]`` (FFN input and GRU state) to the
   per-token standardised oracle mass, written into the first E rows of the projector with the expert vectors
   set to the matching unit vectors. Cosine scoring divides all of a token's scores by the same ``||P [h;r]||``,
   so its top-k is exactly the ridge gate's;
2. gradient steps on projector and expert vectors (GRU frozen: its states are computed once) with a listwise
   loss -- softmax cross-entropy against the oracle's top-k set -- which optimises the ranking, not the masses.

Imports only torch and the runtime (``spectra_convert.modeling``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modeling.modeling_spectra import SpectraRouter, single_cpu_thread


def oracle_topk(mass: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k]``: the k experts with the largest activation mass per token (ties broken by index)."""
    return mass.topk(k, dim=-1).indices


def topk_recall(selected: torch.Tensor, oracle: torch.Tensor) -> float:
    """Mean share of each token's oracle experts that ``selected`` also picks (1.0 = oracle routing)."""
    hits = (oracle.unsqueeze(-1) == selected.unsqueeze(-2)).any(-1).float()
    return float(hits.mean())


def standardised(mass: torch.Tensor) -> torch.Tensor:
    """Per-token mass relative to the token's mean over experts (removes the token's overall FFN magnitude,
    which says nothing about which experts to pick)."""
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
    """The baseline router: a ridge-fitted linear map of the FFN input to the standardised oracle mass."""

    def __init__(self, inputs: torch.Tensor, mass: torch.Tensor, ridge: float = 1e-2):
        self.weight, self.bias = ridge_fit(inputs.reshape(-1, inputs.shape[-1]), standardised(mass), ridge)

    def scores(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.reshape(-1, inputs.shape[-1]).float() @ self.weight.T + self.bias

    def select(self, inputs: torch.Tensor, k: int) -> torch.Tensor:
        return self.scores(inputs).topk(k, dim=-1).indices


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
    return -router.osr_cost(z @ router.unit_expert_vectors().T) / router.temperature


@torch.no_grad()
def _closed_form(router: SpectraRouter, features: torch.Tensor, target: torch.Tensor, ridge: float) -> None:
    """Ridge gate written into the projector's first E rows; expert vectors = the matching unit vectors."""
    if not router.use_projector or router.num_experts > router.router_dim:
        return  # no projector to write into: the gradient steps start from the current vectors
    weight, _ = ridge_fit(features, target, ridge)
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


def fit_spectra_router(router: SpectraRouter, inputs: torch.Tensor, mass: torch.Tensor, *, steps: int = 60,
                       lr: float = 3e-3, batch_tokens: int = 4096, ridge: float = 1e-2, seed: int = 0) -> None:
    """Fit ``router`` so its top-k (before the dual bias) matches the oracle top-k of ``mass [N, E]`` on the
    calibration FFN inputs ``inputs [B, T, H]``. The dual bias is left at zero: calibrate it afterwards."""
    features = router_features(router, inputs)
    target = standardised(mass)
    _closed_form(router, features, target, ridge)
    if steps <= 0:
        return
    oracle = torch.zeros_like(target).scatter_(1, oracle_topk(mass, router.top_k), 1.0 / router.top_k)
    params = [router.expert_vectors] + ([router.projector] if router.use_projector else [])
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randperm(features.shape[0], generator=generator)[:batch_tokens]
            logits = _scores(router, features[rows])
            loss = -(oracle[rows] * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    router.zero_grad(set_to_none=True)


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
