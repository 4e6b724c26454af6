"""Dual-bias calibration on hard top-k loads, and the calibration text it runs on.

Why this exists (docs/ARCHITECTURE.md, "How a router is fitted"; measured on SmolLM2): a random gate gives
per-layer load CV 0.28-1.46; k-means prototypes 0.09-0.56; Sinkhorn's soft duals as a bias 0.24-0.48. Only a
bias corrected on the HARD top-k loads of calibration text balances the model before any training.
``calibrate_bias`` works on one router and the inputs captured for its layer, so converters can stream layer
by layer; ``router.recalibrate.recalibrate_model_bias`` re-corrects every router of a whole model (after
fine-tuning).

Public API (used by upcycle, reroute, finetune and study; prototypes are ``prototypes``' job):
``calibration_batches``  calibration text packed into token blocks (shuffled, every domain represented)
``calibrate_bias``       Sinkhorn-potential start, then hard-load correction of ``dual_bias``; returns the CV
``topk_agreement``       share of (token, slot) choices shared with an old linear gate's top-k
"""

from __future__ import annotations

import torch

from ..modeling.modeling_spectra import SpectraRouter, sinkhorn


@torch.no_grad()
def calibrate_bias(router: SpectraRouter, inputs: torch.Tensor, *, steps: int = 400, rate: float = 0.5) -> float:
    """Set ``dual_bias`` so the hard top-k loads on ``inputs`` are balanced; returns the achieved load CV.

    Start from Sinkhorn's column potentials (the soft balance), then correct on hard loads with a decaying
    step, keeping the best bias seen. The logits do not depend on the bias, so they are computed once.
    """
    return calibrate_bias_on_scores(router, router.selection_scores(inputs), seq_len=inputs.shape[1], steps=steps,
                                    rate=rate)


@torch.no_grad()
def calibrate_bias_on_scores(router: SpectraRouter, logits: torch.Tensor, *, seq_len: int, steps: int = 400,
                             rate: float = 0.5) -> float:
    """``calibrate_bias`` given the selection scores ``[N, E]`` of whole sequences of ``seq_len`` tokens already
    computed (E floats a token instead of the hidden size: what lets ``recalibrate.recalibrate_model_bias`` use
    tens of thousands of tokens). Every correction step selects through ``router.select``: with the
    per-sequence correction on, a token's choice depends on the bias through its sequence's earlier choices."""
    k, experts = router.top_k, router.num_experts
    sequences = logits.view(-1, seq_len, experts)
    # Sinkhorn's column potentials are the soft-balance start; 2048 tokens estimate them well enough.
    sample = logits[torch.randperm(logits.shape[0], generator=torch.Generator().manual_seed(0))[:2048]]
    _, potentials = sinkhorn(sample, k, router.sinkhorn_iters)
    bias = potentials.clone()
    best_bias, best_cv = bias.clone(), float("inf")
    scale = float(logits.std().clamp(min=1e-3))
    for step in range(steps):
        selected = router.select(sequences, bias)
        loads = torch.bincount(selected.reshape(-1), minlength=experts).float()
        cv = float(loads.std(unbiased=False) / loads.mean())
        if cv < best_cv:
            best_cv, best_bias = cv, bias.clone()
        if cv == 0.0:
            break
        step_size = rate * scale * (1.0 - step / steps) + 1e-3 * scale
        bias += step_size * (loads.mean() - loads) / loads.mean()
        bias -= bias.mean()
    router.dual_bias.copy_(best_bias.to(router.dual_bias.dtype))
    return best_cv


@torch.no_grad()
def topk_agreement(router: SpectraRouter, inputs: torch.Tensor, gate_weight: torch.Tensor, top_k: int) -> float:
    """Mean share of each token's old-gate top-k experts that the SPECTRA router also selects."""
    flat = inputs.reshape(-1, inputs.shape[-1]).float()
    old = torch.topk(flat @ gate_weight.float().T, top_k, dim=-1).indices
    new = router.select(router.selection_scores(inputs).view(*inputs.shape[:2], -1)).reshape(-1, router.top_k)
    shared = (old.unsqueeze(-1) == new.unsqueeze(-2)).any(-1).float().sum(-1)
    return float((shared / top_k).mean())


#: Tokens per calibration sequence (``calibration_batches``).
CALIBRATION_SEQ_LEN = 256


def calibration_batches(tokenizer, texts: list[str], *, seq_len: int = CALIBRATION_SEQ_LEN, max_tokens: int = 8192,
                        seed: int = 0) -> torch.Tensor:
    """Pack calibration texts into ``[B, seq_len]`` token blocks (shuffled, EOS-separated, <= max_tokens).

    Texts are shuffled with ``seed`` so every domain of a mixed corpus is represented even when
    ``max_tokens`` keeps only part of it — calibrating on one domain does not balance the others.
    """
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    budget = max(seq_len, (max_tokens // seq_len) * seq_len)
    for index in order:
        ids = tokenizer(texts[index], add_special_tokens=False)["input_ids"]
        stream.extend(ids + ([eos] if eos is not None else []))
        if len(stream) >= budget:
            break
    blocks = len(stream) // seq_len
    if blocks == 0:
        raise ValueError(f"calibration text has only {len(stream)} tokens; need at least {seq_len}")
    blocks = min(blocks, budget // seq_len)
    return torch.tensor(stream[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)
