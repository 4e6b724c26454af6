"""Latent Prototype Routing (LPR, seed 004 §2.4): the competitor baseline, on the same experts as SPECTRA.

``R(x) = D(E(x), P)``: a small non-linear encoder ``E`` maps a token's FFN input into a low-dimensional latent,
expert prototypes ``P`` live on the unit hypersphere, a measurement ``D`` scores the latent against every
prototype and the top-k prototypes are the token's experts. Training adds three regularisers (diversity,
stop-gradient alignment, KL of the variational latent to N(0, I)) and an EMA pull of each prototype towards
the latents assigned to it.

The module has the SPECTRA router's call contract ``(router_logits [N,E], routing_weights [N,k],
selected_experts [N,k])``, so it can sit at ``mlp.gate`` and drive the experts (baseline perplexity, the
study's trained ``lpr`` variant). Routing is per token: the latent, the prototypes and the scores of a token
depend only on that token's hidden state, and at inference the variational latent is its mean (no sampling),
so a token's experts never change with its batch-mates or padding.

Where the paper is vague, these are the choices made (each repeated where it is implemented):

* **Norm** in ``z = SiLU(Norm(x)) W1 + b1``: RMSNorm without a learnable scale (the models we route are
  llama-likes whose own norms are RMSNorm; a scale in front of the learned ``W1`` adds little, and without it
  ``SiLU(Norm(x))`` is parameter-free, so a fit on captured inputs computes it once instead of every step);
  the variational head is a second linear map on the same ``SiLU(Norm(x))`` giving ``log σ²``.
* **log σ² starts at -4** (zero weights, bias -4): with the N(0, I) prior's σ = 1 from step one, sampling noise
  would be larger than the latent means (~0.5) and training-time routing would start random. The KL term
  then moves σ towards 1 at the paper's small weight.
* **Diversity regulariser** ``||K K^T - I||_F^2``: the equation is written on the encoded-token matrix
  ``K [B, d]`` ("promotes mutual orthogonality across tokens") while the heading speaks of prototypes; the
  default follows the equation (``diversity_on="tokens"``) on *unit-normalised* latents and is divided by
  ``B^2`` so its size does not grow with the batch; ``"prototypes"`` applies it to ``P [E, d]`` instead.
* **Alignment** ``||StopGrad(Z) - softmax(S) P||^2``: the mean over tokens of the squared L2 distance; with the
  cosine metric ``Z`` is unit-normalised (prototypes are on the sphere, so unnormalised latents could never
  be matched). ``S`` here is scored from the detached latent too: the paper stops gradients "through the
  token encoder", and ``S`` would otherwise carry one back into it. Gradient reaches only the prototypes.
* **EMA** ``μ_e ← λ μ_e + (1-λ) E_{z∈B_e}[z]``: ``hard`` uses the tokens whose top-k contains ``e``, ``soft``
  all tokens weighted by ``softmax(S)[:, e]``; an expert with no token keeps its prototype; prototypes are
  re-projected onto the unit sphere afterwards (Table 8's "unit ball constraint"), as after every optimiser
  step. λ = 0.9 (Table 8's EMA decay). Table 8 turns EMA off for its headline runs; it is on here by default
  because the brief of this baseline asks for it (``ema_decay=0`` turns it off).
* **Routing weights**: ``softmax`` of the selected experts' scores (over the k selected, like the SPECTRA
  router and Mixtral), scores divided by ``temperature`` (1.0 = the paper's plain ``softmax(S)``).
* **Metrics** (§2.4.1): ``cosine`` (default), ``gaussian`` kernel ``exp(-||z-p||²/2σ²)``, ``multihead`` dot
  product (heads split the latent; with no per-head projections, the mean over heads of ``q_h·k_h/√d_h`` is
  a scaled dot product); with the variational encoder, the distribution distances between the token's
  ``N(μ, σ²)`` and a per-expert ``N(p, σ_e²)`` (learned ``log σ_e²``): ``wasserstein`` (2-Wasserstein²),
  ``kl`` (KL(token ‖ expert)), ``hellinger`` (the diagonal multivariate form: the product over dimensions
  of the paper's 1-D Bhattacharyya term), ``mahalanobis`` (``Σ (μ-p)²/σ_e²``, Table 7 names it without a
  formula). Scores of distances are their negatives. JS divergence is left out: Gaussians have no closed
  form for it, and the paper's equation (23) is not one.
* **Loss weights** (Table 8): regularisation strength β_rs = 0.01, diversity 1, alignment 0.1, KL 0.01;
  latent dimension 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.modeling_spectra import single_cpu_thread

METRICS = ("cosine", "gaussian", "multihead", "wasserstein", "kl", "hellinger", "mahalanobis")
#: Metrics that compare Gaussians: they need the variational encoder and per-expert variances.
DISTRIBUTION_METRICS = ("wasserstein", "kl", "hellinger", "mahalanobis")
INITIAL_LOG_VAR = -4.0


@dataclass(frozen=True)
class LPRSettings:
    """LPR hyperparameters; defaults are seed 004's Table 8 (Qwen3MoE-LPR) where it gives one."""

    latent_dim: int = 16
    variational: bool = True
    metric: str = "cosine"
    heads: int = 4  # multihead metric only
    kernel_sigma: float = 1.0  # gaussian metric only
    temperature: float = 1.0
    ema_decay: float = 0.9  # 0 turns the EMA prototype update off
    ema_mode: str = "hard"  # hard | soft
    diversity_on: str = "tokens"  # tokens | prototypes
    reg_strength: float = 0.01  # beta_rs
    div_weight: float = 1.0
    align_weight: float = 0.1
    kl_weight: float = 0.01

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"LPR metric {self.metric!r}: expected one of {', '.join(METRICS)}")
        if self.metric in DISTRIBUTION_METRICS and not self.variational:
            raise ValueError(f"LPR metric {self.metric!r} compares Gaussians: it needs variational=True")
        if self.metric == "multihead" and self.latent_dim % self.heads:
            raise ValueError(f"latent_dim {self.latent_dim} is not divisible by heads {self.heads}")
        if self.ema_mode not in ("hard", "soft"):
            raise ValueError(f"ema_mode {self.ema_mode!r}: expected hard or soft")
        if self.diversity_on not in ("tokens", "prototypes"):
            raise ValueError(f"diversity_on {self.diversity_on!r}: expected tokens or prototypes")


@dataclass
class LPRForward:
    """One routing call's tensors, kept for the regularisers and the EMA update (training only)."""

    z: torch.Tensor  # [N, d] latent used for scoring (sampled in training)
    mu: torch.Tensor  # [N, d]
    log_var: torch.Tensor | None  # [N, d]
    scores: torch.Tensor  # [N, E]
    selected: torch.Tensor  # [N, k]


class LatentPrototypeRouter(nn.Module):
    """LPR gate: ``(router_logits [N,E], routing_weights [N,k], selected_experts [N,k])`` for ``[.., H]`` input."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, settings: LPRSettings | None = None, *,
                 seed: int = 0):
        super().__init__()
        self.settings = settings or LPRSettings()
        s = self.settings
        self.hidden_size, self.num_experts, self.top_k = int(hidden_size), int(num_experts), int(top_k)
        generator = torch.Generator().manual_seed(seed)
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.encoder = nn.Linear(hidden_size, s.latent_dim)
        bound = 1.0 / math.sqrt(hidden_size)  # nn.Linear's default range, drawn from our seeded generator
        with torch.no_grad():
            self.encoder.weight.uniform_(-bound, bound, generator=generator)
            self.encoder.bias.uniform_(-bound, bound, generator=generator)
        self.log_var = None
        if s.variational:
            self.log_var = nn.Linear(hidden_size, s.latent_dim)
            nn.init.zeros_(self.log_var.weight)
            nn.init.constant_(self.log_var.bias, INITIAL_LOG_VAR)
        # Hyperspherical init: r ~ N(0, I_d), K_i = r_i / ||r_i||.
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_experts, s.latent_dim, generator=generator), dim=-1))
        self.prototype_log_var = (nn.Parameter(torch.zeros(num_experts, s.latent_dim))
                                  if s.metric in DISTRIBUTION_METRICS else None)
        self.last: LPRForward | None = None
        self.keep_last = False  # set by trainers: keep this call's tensors for the losses / EMA

    # -- encoder and measurement --------------------------------------------------------------------------------

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """``SiLU(RMSNorm(x))``: the parameter-free first stage of the encoder."""
        return F.silu(self.norm(hidden))

    def encode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(μ [N,d], log σ² [N,d] or None)`` of ``features W + b``."""
        mu = self.encoder(features)
        return mu, (self.log_var(features) if self.log_var is not None else None)

    def latent(self, mu: torch.Tensor, log_var: torch.Tensor | None) -> torch.Tensor:
        """Reparameterised sample in training; the mean at inference (deterministic, so batch-invariant)."""
        if log_var is None or not self.training:
            return mu
        return mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)

    def similarity(self, z: torch.Tensor, log_var: torch.Tensor | None) -> torch.Tensor:
        """Scores ``S [N, E]`` (higher = closer) under ``settings.metric``."""
        s, p = self.settings, self.prototypes
        if s.metric == "cosine":
            return F.normalize(z, dim=-1) @ F.normalize(p, dim=-1).T
        if s.metric == "gaussian":
            return torch.exp(-torch.cdist(z, p).pow(2) / (2 * s.kernel_sigma ** 2))
        if s.metric == "multihead":
            head = s.latent_dim // s.heads
            per_head = torch.einsum("nhd,ehd->neh", z.view(-1, s.heads, head), p.view(-1, s.heads, head))
            return per_head.mean(-1) / math.sqrt(head)
        var = log_var.exp().unsqueeze(1)  # [N, 1, d]
        var_e = self.prototype_log_var.exp().unsqueeze(0)  # [1, E, d]
        diff2 = (z.unsqueeze(1) - p.unsqueeze(0)).pow(2)  # [N, E, d]
        if s.metric == "wasserstein":
            dist = diff2.sum(-1) + (var.sqrt() - var_e.sqrt()).pow(2).sum(-1)
        elif s.metric == "kl":
            dist = 0.5 * (torch.log(var_e / var) + (var + diff2) / var_e - 1).sum(-1)
        elif s.metric == "mahalanobis":
            dist = (diff2 / var_e).sum(-1)
        else:  # hellinger: H² = 1 - Π_d sqrt(2σσ_e / (σ² + σ_e²)) exp(-(μ-p)² / 4(σ² + σ_e²))
            total = var + var_e
            log_bc = (0.5 * torch.log(2 * (var * var_e).sqrt() / total) - diff2 / (4 * total)).sum(-1)
            dist = (1 - log_bc.exp()).clamp(min=0).sqrt()
        return -dist

    # -- routing -------------------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = hidden_states.reshape(-1, self.hidden_size).to(self.prototypes.dtype)
        logits, weights, selected = self.route_features(self.features(h))
        return logits, weights.to(hidden_states.dtype), selected

    def route_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routing from precomputed ``SiLU(RMSNorm(x))`` ``[N, H]``."""
        mu, log_var = self.encode(features)
        z = self.latent(mu, log_var)
        scores = self.similarity(z, log_var)
        logits = scores / self.settings.temperature
        selected = torch.topk(logits, self.top_k, dim=-1).indices
        weights = torch.softmax(logits.gather(1, selected), dim=-1)
        self.last = LPRForward(z, mu, log_var, scores, selected) if self.keep_last else None
        return logits, weights, selected

    # -- regularisers ---------------------------------------------------------------------------------------------

    def regularisers(self, out: LPRForward, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``div``, ``align``, ``kl`` and their weighted sum ``total`` (β_rs (β1 div + β2 align + β3 KL)).

        ``mask`` [N] keeps real tokens only (padding must not shape the clusters)."""
        s = self.settings
        z, mu, log_var = out.z, out.mu, out.log_var
        if mask is not None:
            z, mu = z[mask], mu[mask]
            log_var = log_var[mask] if log_var is not None else None
        if s.diversity_on == "tokens":
            k = F.normalize(z, dim=-1)
            eye = torch.eye(k.shape[0], device=k.device, dtype=k.dtype)
            div = (k @ k.T - eye).pow(2).sum() / max(1, k.shape[0]) ** 2
        else:
            k = F.normalize(self.prototypes, dim=-1)
            div = (k @ k.T - torch.eye(k.shape[0], device=k.device, dtype=k.dtype)).pow(2).sum()
        # Soft weights from the detached latent: no alignment gradient reaches the encoder (see module docstring).
        detached = self.similarity(z.detach(), log_var.detach() if log_var is not None else None)
        probs = torch.softmax(detached / s.temperature, dim=-1)
        aggregated = probs @ self.prototypes
        target = (F.normalize(z, dim=-1) if s.metric == "cosine" else z).detach()
        align = (target - aggregated).pow(2).sum(-1).mean()
        if log_var is not None:
            kl = (0.5 * (mu.pow(2) + log_var.exp() - log_var - 1).sum(-1)).mean()
        else:
            kl = z.new_zeros(())
        total = s.reg_strength * (s.div_weight * div + s.align_weight * align + s.kl_weight * kl)
        return {"div": div, "align": align, "kl": kl, "total": total}

    @torch.no_grad()
    def ema_update(self, out: LPRForward, mask: torch.Tensor | None = None) -> None:
        """``μ_e ← λ μ_e + (1-λ) mean of the latents assigned to e``, then back onto the unit sphere."""
        decay = self.settings.ema_decay
        if decay <= 0:
            return
        z = out.z.detach().float()
        if self.settings.metric == "cosine":
            z = F.normalize(z, dim=-1)
        if self.settings.ema_mode == "hard":
            weights = torch.zeros(z.shape[0], self.num_experts, device=z.device)
            weights.scatter_(1, out.selected, 1.0)
        else:
            weights = torch.softmax(out.scores.detach().float() / self.settings.temperature, dim=-1)
        if mask is not None:
            weights = weights * mask.unsqueeze(-1).float()
        mass = weights.sum(0)  # [E]
        means = (weights.T @ z) / mass.clamp(min=1e-9).unsqueeze(-1)
        has = (mass > 0).unsqueeze(-1)
        current = self.prototypes.data.float()
        updated = torch.where(has, decay * current + (1 - decay) * means, current)
        self.prototypes.data.copy_(updated.to(self.prototypes.dtype))
        self.project_prototypes()

    @torch.no_grad()
    def project_prototypes(self) -> None:
        """The unit-sphere constraint on the prototypes (after every EMA update and optimiser step)."""
        self.prototypes.data.copy_(F.normalize(self.prototypes.data, dim=-1))


# --------------------------------------------------------------------------------------------------------------
# Fitting on router inputs (validate --baselines)
# --------------------------------------------------------------------------------------------------------------

#: Offline fit: Adam steps over mini-batches of captured router inputs (no task loss is available there).
FIT_STEPS = 100
FIT_BATCH = 512
FIT_LR = 1e-3  # Table 8's initial learning rate


def fit_lpr(inputs: torch.Tensor, num_experts: int, top_k: int, *, settings: LPRSettings | None = None,
            steps: int = FIT_STEPS, batch: int = FIT_BATCH, lr: float = FIT_LR, seed: int = 0) -> LatentPrototypeRouter:
    """An LPR router fitted on captured router inputs ``[N, H]`` with LPR's own regularisers and EMA.

    Why no task loss: validate only has the FFN inputs of the tokens, not a differentiable path to the LM
    loss, so the fit is LPR's unsupervised part alone — the diversity and KL terms shape the encoder, the
    alignment loss and the EMA move prototypes to the latent clusters (a learned spherical k-means). The
    study's ``lpr`` variant adds the task loss. Mini-batches walk a seeded permutation of the tokens.
    """
    router = LatentPrototypeRouter(inputs.shape[1], num_experts, top_k, settings, seed=seed).float()
    router.train()
    router.keep_last = True
    with torch.no_grad():
        data = router.features(inputs.float())
    n = data.shape[0]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator) if n else torch.zeros(0, dtype=torch.long)
    optimizer = torch.optim.Adam(router.parameters(), lr=lr, betas=(0.9, 0.95))
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the variational sampling noise
    try:
        with single_cpu_thread(data):  # hundreds of tiny steps: extra threads only add sync (2-7x slower measured)
            _fit_steps(router, data, order, optimizer, steps=steps if n >= 2 else 0, batch=batch)
    finally:
        torch.random.set_rng_state(state)
    router.keep_last = False
    router.last = None
    return router.eval().requires_grad_(False)


def _fit_steps(router: LatentPrototypeRouter, data: torch.Tensor, order: torch.Tensor, optimizer: Any, *, steps: int,
               batch: int) -> None:
    n = data.shape[0]
    for step in range(steps):
        start = (step * batch) % n
        index = order[start:start + batch]
        if index.numel() < 2:
            index = order[:batch]
        router.route_features(data[index])
        losses = router.regularisers(router.last)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        router.project_prototypes()
        router.ema_update(router.last)

