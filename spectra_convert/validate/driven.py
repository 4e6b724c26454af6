"""Baseline routers driving the experts: the perplexity a model has when a baseline, not SPECTRA, picks experts.

Routing metrics of the baselines come from SPECTRA's captured router inputs (baselines.py). Perplexity cannot:
it depends on which experts actually run, in every layer, with every later layer seeing the hidden states the
earlier choices produced. Here each baseline's rule is wrapped as a gate module (``DrivenGate``, the router
call contract ``(logits, weights, selected)``) and put at every SPECTRA router's place for one forward over
the texts; NLL is summed per text. For copied experts the choice barely matters; for carved experts (each
expert a different slice of the parent's neurons) it is the comparison that matters.

Choices (also in the report's baselines note):

* Weights: softmax over the selected experts' gate logits (they sum to 1, as SPECTRA's do); hash routing,
  which has no gate, weights its k experts equally.
* Expert choice is decided per forward batch over its real tokens (it is not per-token; that is its known
  weakness): a token an expert did not pick gets weight 0 for it, a token no expert picked gets no FFN output.
  A block that sums its experts with fixed scales (``expert_scale``, the carved combine rule) ignores router
  weights, so a weight of 0 cannot switch an expert off there: expert choice gets no perplexity (nan) then.
* Fitted routers (loss-free-bias, lpr) keep what they fitted on half of the texts; every router, SPECTRA
  included, is scored on the other half (``eval half``), so all rows share one token set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..router import metrics as M
from ..router.find import is_router
from .collect import Batch, _forward, _nll, plan_batches


@dataclass
class DriveState:
    """What a rule needs besides hidden states: this forward's token ids, and which tokens are padding."""

    context: Any = None  # the model's RoutingContext (its token_mask is set during forward)
    input_ids: torch.Tensor | None = None  # [B, T] of the current batch


Rule = Callable[[torch.Tensor, DriveState], tuple[torch.Tensor, torch.Tensor]]


class DrivenGate(nn.Module):
    """A routing rule ``h [N, H] -> (selected [N, k'], weights [N, k'])`` in a router's place."""

    def __init__(self, rule: Rule | nn.Module, num_experts: int, state: DriveState):
        super().__init__()
        self.rule = rule
        self.num_experts = num_experts
        self.__dict__["state"] = state  # shared by every gate of the model, not a submodule
        self.captured: list[torch.Tensor] | None = None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = hidden_states.reshape(-1, hidden_states.shape[-1])
        if isinstance(self.rule, nn.Module):  # an LPR router: already the full contract
            logits, weights, selected = self.rule(h)
        else:
            selected, weights = self.rule(h, self.state)
            logits = h.new_zeros(h.shape[0], self.num_experts)
        if self.captured is not None:
            self.captured.append(selected.detach())
        return logits, weights.to(hidden_states.dtype), selected


def _topk_rule(gate: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> Rule:
    def rule(h: torch.Tensor, state: DriveState) -> tuple[torch.Tensor, torch.Tensor]:
        logits = h.float() @ gate.to(h.device).T
        rank = logits if bias is None else torch.softmax(logits, dim=-1) + bias.to(h.device)
        selected = torch.topk(rank, k, dim=-1).indices
        return selected, torch.softmax(logits.gather(1, selected), dim=-1)

    return rule


def _expert_choice_rule(gate: torch.Tensor, k: int) -> Rule:
    def rule(h: torch.Tensor, state: DriveState) -> tuple[torch.Tensor, torch.Tensor]:
        logits = h.float() @ gate.to(h.device).T
        n, e = logits.shape
        probs = torch.softmax(logits, dim=-1)
        mask = getattr(state.context, "token_mask", None)
        real = mask.reshape(-1).to(h.device) if mask is not None and mask.numel() == n else torch.ones(n, dtype=torch.bool, device=h.device)
        capacity = max(1, min(int(real.sum()), int(round(int(real.sum()) * k / e))))
        chosen = torch.topk(probs.masked_fill(~real.unsqueeze(-1), -1.0), capacity, dim=0).indices  # [C, E]
        picked = torch.zeros((n, e), dtype=torch.bool, device=h.device)
        picked[chosen, torch.arange(e, device=h.device).expand_as(chosen)] = True
        weights = torch.where(picked, probs, torch.zeros_like(probs))
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
        return torch.arange(e, device=h.device).expand(n, e), weights

    return rule


def _hash_rule(table: np.ndarray, k: int) -> Rule:
    experts = torch.as_tensor(np.argsort(-table, axis=1)[:, :k].copy())

    def rule(h: torch.Tensor, state: DriveState) -> tuple[torch.Tensor, torch.Tensor]:
        ids = state.input_ids.reshape(-1).clamp(max=experts.shape[0] - 1)
        selected = experts[ids.cpu()].to(h.device)
        return selected, torch.full(selected.shape, 1.0 / k, device=h.device)

    return rule


def baseline_gates(name: str, fitted: Sequence[dict[str, Any]], *, num_experts: int, top_k: int, max_token_id: int,
                   seed: int, state: DriveState) -> list[DrivenGate]:
    """One ``DrivenGate`` per layer for baseline ``name``, from run_baselines' fitted routings."""
    gates = []
    for layer in fitted:
        routing = layer[name]
        gate = torch.as_tensor(routing.gate).float() if routing.gate is not None else None
        if name == "lpr":
            rule: Rule | nn.Module = routing.state["router"]
        elif name in ("switch-top1", "switch-top2"):
            rule = _topk_rule(gate, min(int(name[-1]), num_experts))
        elif name == "loss-free-bias":
            rule = _topk_rule(gate, top_k, routing.state["bias"])
        elif name == "expert-choice":
            rule = _expert_choice_rule(gate, top_k)
        elif name == "hash":
            rule = _hash_rule(np.random.default_rng(seed).random((max_token_id + 1, num_experts)), top_k)
        else:
            raise ValueError(f"no driven form for baseline {name!r}")
        gates.append(DrivenGate(rule, num_experts, state))
    return gates


@contextmanager
def routers_replaced(model: nn.Module, gates: Sequence[nn.Module]) -> Iterator[None]:
    """Put ``gates`` (layer order) where the model's SPECTRA routers sit, and put the routers back after."""
    places = []
    for name, module in model.named_modules():
        if is_router(module):
            owner, _, attr = name.rpartition(".")
            places.append((int(getattr(module, "layer_idx", len(places))), model.get_submodule(owner), attr, module))
    places.sort(key=lambda item: item[0])
    if len(places) != len(gates):
        raise ValueError(f"{len(gates)} gates for {len(places)} routers")
    try:
        for (_, owner, attr, _), gate in zip(places, gates):
            setattr(owner, attr, gate)
        yield
    finally:
        for _, owner, attr, router in places:
            setattr(owner, attr, router)


@dataclass
class DrivenPass:
    """Per-text NLL sums and target counts, and (when captured) each layer's selected experts of real tokens."""

    nll: np.ndarray  # [S]
    count: np.ndarray  # [S]
    selected: list[np.ndarray] = field(default_factory=list)  # per layer [N, k], row-major over batches

    def perplexity(self, texts: np.ndarray | None = None) -> float:
        keep = slice(None) if texts is None else texts
        return M.perplexity(float(self.nll[keep].sum()), int(self.count[keep].sum()))


@torch.inference_mode()
def driven_pass(model: nn.Module, seqs: Sequence[Sequence[int]], pad_id: int, gates: Sequence[DrivenGate] | None,
                *, batch_tokens: int = 2048, capture: bool = False,
                on_batch: Callable[[int], None] | None = None) -> DrivenPass:
    """One forward over ``seqs`` with ``gates`` in the routers' places (``None``: the model's own routers)."""
    gates = list(gates or [])
    state = gates[0].__dict__["state"] if gates else DriveState()
    state.context = model.__dict__.get("routing_context")
    nll, count = np.zeros(len(seqs)), np.zeros(len(seqs), dtype=np.int64)
    parts: list[list[np.ndarray]] = [[] for _ in gates]
    row_offset = 0
    replaced = routers_replaced(model, gates) if gates else _nothing()
    with replaced:
        for batch in plan_batches(seqs, pad_id, batch_tokens=batch_tokens):
            for gate in gates:
                gate.captured = [] if capture else None
            state.input_ids = batch.input_ids
            out = _forward(model, batch, router_records=False)
            for row in range(batch.input_ids.shape[0]):
                one = Batch(batch.input_ids[row:row + 1], batch.attention_mask[row:row + 1],
                            batch.position_ids[row:row + 1])
                total, n = _nll(out.logits[row:row + 1], one)
                nll[row_offset + row], count[row_offset + row] = total, n
            flat = batch.attention_mask.reshape(-1).bool()
            for index, gate in enumerate(gates):
                if capture and gate.captured:
                    parts[index].append(gate.captured[-1][flat.to(gate.captured[-1].device)].cpu().numpy())
                gate.captured = None
            row_offset += batch.input_ids.shape[0]
            del out
            if on_batch is not None:
                on_batch(int(flat.sum()))
    state.input_ids = None
    selected = [np.concatenate(p) for p in parts] if capture and gates else []
    return DrivenPass(nll, count, selected)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def eval_half_texts(seq_ids: np.ndarray, evaluate: np.ndarray) -> np.ndarray:
    """Indices of the texts whose tokens are in the evaluate split."""
    return np.unique(seq_ids[evaluate])


def baseline_perplexity(model: nn.Module, seqs: Sequence[Sequence[int]], pad_id: int, fitted: Sequence[dict[str, Any]],
                        names: Sequence[str], *, texts: np.ndarray, num_experts: int, top_k: int, seed: int,
                        batch_tokens: int = 2048, progress: Callable[[str, int], Callable[[int], None]] | None = None
                        ) -> dict[str, float]:
    """``{"SPECTRA": ppl, baseline: ppl}`` on the texts ``texts`` (indices into ``seqs``), each router driving."""
    chosen = [list(seqs[i]) for i in texts]
    max_id = int(max(max(s) for s in seqs))
    n_tokens = sum(len(s) for s in chosen)
    out: dict[str, float] = {}
    fixed_scales = any(getattr(m, "expert_scale", None) is not None for m in model.modules())
    for name in ("SPECTRA", *names):
        if name == "expert-choice" and fixed_scales:
            out[name] = math.nan
            continue
        tick = progress(f"perplexity, {name} routing (eval half)", n_tokens) if progress is not None else None
        gates = None
        if name != "SPECTRA":
            gates = baseline_gates(name, fitted, num_experts=num_experts, top_k=top_k, max_token_id=max_id, seed=seed,
                                   state=DriveState())
        out[name] = driven_pass(model, chosen, pad_id, gates, batch_tokens=batch_tokens, on_batch=tick).perplexity()
    return out
