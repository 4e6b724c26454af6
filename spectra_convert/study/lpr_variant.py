"""The study's ``router: lpr`` variant: Latent Prototype Routing trained on the same budget as SPECTRA's routers.

What makes the comparison fair, stage by stage:

* **Experts**: the variant routes the shared conversion's experts (the ``full`` variant's upcycle: same parent,
  same experts, same seed); LPR gates replace the SPECTRA routers at ``mlp.gate``.
* **Initialisation**: SPECTRA's routers are initialised from the conversion's calibration text (k-means
  prototypes, a calibrated bias); LPR gets the same text: each layer's gate is fitted (``fit_lpr``: its own
  regularisers + EMA, no task loss) on the router inputs of the conversion's calibration blocks (same text,
  same ``calibration_tokens``, same seed).
* **Fine-tune**: the SPECTRA variants' router fine-tune budget, read from the same plan block: the same
  training blocks (``pack`` + ``split_validation`` of ``--data``, as ``finetune`` does without eval data), the
  same data order (``block_indices`` with the plan seed), steps, batch size, gradient accumulation, learning
  rate (``lr_router``), AdamW without weight decay, gradient clipping. Only the gates train; the loss is the
  LM loss plus LPR's regularisers ``β_rs (div + 0.1 align + 0.01 KL)`` (mean over layers), and after every
  optimiser step the prototypes are re-projected on the sphere and EMA-updated from the step's assignments.
* **Measurement**: the same eval tokens as validate (``tokenize_texts`` with the plan's ``max_tokens`` and
  ``max_length``), the LPR gates driving the experts (driven.py), validate's metrics and summary per layer,
  perplexity from that forward, routing consistency between the fitted-only and the fine-tuned gates, and
  batch invariance (the first texts routed alone and batched with right padding).

An LPR model is not a SPECTRA folder (the shipped runtime has no LPR router), so nothing is saved: the
variant's row in ``results.jsonl`` is its output.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..router import metrics as M
from ..validate.driven import DrivenGate, DriveState, driven_pass, routers_replaced
from ..validate.lpr import LatentPrototypeRouter, LPRSettings, fit_lpr

INVARIANCE_TEXTS = 4


def _router_inputs(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Every SPECTRA router's input ``[N, H]`` over ``blocks`` (the routers routing, as at conversion)."""
    from ..router.find import find_routers

    routers = find_routers(model)
    parts: list[list[torch.Tensor]] = [[] for _ in routers]
    hooks = [r.register_forward_pre_hook(lambda m, args, i=i: parts[i].append(
        args[0].detach().float().reshape(-1, args[0].shape[-1]))) for i, r in enumerate(routers)]
    try:
        with torch.inference_mode():
            for start in range(0, blocks.shape[0], batch_size):
                model(input_ids=blocks[start:start + batch_size], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(p) for p in parts]


def _measure(model: torch.nn.Module, gates: list[DrivenGate], texts: Any, pad_id: int, batch_tokens: int
             ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """validate's summary metrics of the LPR-driven model on ``texts``, and each layer's selections."""
    from ..validate.api import summarize

    run = driven_pass(model, texts.ids, pad_id, gates, batch_tokens=batch_tokens, capture=True)
    lengths = [len(s) for s in texts.ids]
    seq_ids = np.repeat(np.arange(len(lengths)), lengths)
    domains = np.asarray(texts.domains, dtype=object)[seq_ids] if texts.domains is not None else None
    rows = []
    for position, selected in enumerate(run.selected):
        e = gates[position].num_experts
        row: dict[str, Any] = {"layer": position}
        row.update(M.routing_metrics(M.assignment_matrix(selected, e), selected[:, 0], seq_ids, domains))
        prototypes = gates[position].rule.prototypes.detach().float().numpy()
        row["gram_orthogonality"] = M.gram_orthogonality(prototypes)
        row["gram_offdiag"] = M.mean_abs_off_diagonal(prototypes)
        rows.append(row)
    summary = summarize(rows)
    summary["perplexity"] = run.perplexity()
    return summary, run.selected


def _batch_invariant(model: torch.nn.Module, gates: list[DrivenGate], seqs: list[list[int]], pad_id: int) -> bool:
    """Texts cut to different lengths, routed alone and then together (right padding): same experts?"""
    sample = [list(s[: max(2, 96 - 16 * i)]) for i, s in enumerate(seqs[:INVARIANCE_TEXTS])]
    alone = [driven_pass(model, [s], pad_id, gates, capture=True).selected for s in sample]
    together = driven_pass(model, sample, pad_id, gates, batch_tokens=10 ** 9, capture=True).selected
    offsets = np.cumsum([0] + [len(s) for s in sample])
    for text, layers in enumerate(alone):
        for layer, got in enumerate(layers):
            both = together[layer][offsets[text]:offsets[text + 1]]
            if not np.array_equal(np.sort(got, axis=-1), np.sort(both, axis=-1)):
                return False
    return True


def _val_perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    """Token-weighted held-out perplexity on the fine-tune's validation blocks (as finetune's evaluate)."""
    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start:start + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                         reduction="sum"))
            tokens += ids[:, 1:].numel()
    return math.exp(nll / tokens)


def _train(model: torch.nn.Module, routers: list[LatentPrototypeRouter], train_blocks: torch.Tensor,
           ft: dict[str, Any], seed: int) -> list[float]:
    """The router fine-tune loop on LPR gates (see the module docstring); returns per-step losses."""
    from ..console import progress
    from ..finetune.data import block_indices

    steps, batch_size = int(ft.get("steps", 100)), int(ft.get("batch_size", 4))
    grad_accum, clip = int(ft.get("grad_accum", 1)), float(ft.get("max_grad_norm", 1.0))
    params = [p for r in routers for p in r.parameters()]
    optimizer = torch.optim.AdamW(params, lr=float(ft.get("lr_router", 5e-5)), weight_decay=0.0)
    torch.manual_seed(seed)
    for r in routers:
        r.train().requires_grad_(True)
        r.keep_last = True
    losses = []
    with progress() as bar:
        task = bar.add_task("lpr fine-tuning", total=steps)
        for step in range(steps):
            total = 0.0
            for micro in range(grad_accum):
                idx = block_indices(step, micro, 0, n_blocks=train_blocks.shape[0], batch_size=batch_size,
                                    grad_accum=grad_accum, world_size=1, seed=seed)
                ids = train_blocks[idx]
                out = model(input_ids=ids, labels=ids, use_cache=False)
                reg = torch.stack([r.regularisers(r.last)["total"] for r in routers]).mean()
                loss = (out.loss + reg) / grad_accum
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for r in routers:
                r.project_prototypes()
                r.ema_update(r.last)
            losses.append(total)
            bar.update(task, completed=step + 1, description=f"lpr fine-tuning loss {total:.4f}")
    for r in routers:
        r.keep_last, r.last = False, None
        r.eval().requires_grad_(False)
    return losses


def run_lpr_variant(variant: Any, plan: Any, *, base: Path, data: Path, eval_data: Path, metric_keys: tuple[str, ...]
                    ) -> dict[str, Any]:
    """Fit, fine-tune and measure LPR gates on the conversion ``base``; returns the variant's result row."""
    from ..console import err_console
    from ..finetune.data import pack, read_texts, split_validation
    from ..router.calibrate import calibration_batches
    from ..textdata import default_calibration_path, load_texts
    from ..validate import DEFAULT_MAX_LENGTH, DEFAULT_MAX_TOKENS
    from ..validate.collect import load_spectra_model, pad_id_of, tokenize_texts

    started = time.perf_counter()
    opts = plan.validate
    model, tokenizer = load_spectra_model(base, device="cpu")
    model.requires_grad_(False)
    convert, ft = variant.convert, dict(variant.finetune)
    calibration = [r.text for r in load_texts(convert.get("calibration") or default_calibration_path())]
    blocks = calibration_batches(tokenizer, calibration, max_tokens=int(convert.get("calibration_tokens", 8192)),
                                 seed=plan.seed)
    err_console.print(f"[bold]{variant.name}[/bold]: LPR gates fitted on {blocks.numel()} calibration tokens",
                      highlight=False)
    top_k = int(model.config.spectra["top_k"])
    num_experts = int(model.config.spectra["num_experts"])
    settings = LPRSettings(**variant.lpr)
    routers = [fit_lpr(inputs, num_experts, top_k, settings=settings, seed=plan.seed)
               for inputs in _router_inputs(model, blocks)]
    state = DriveState()
    gates = [DrivenGate(r, num_experts, state) for r in routers]

    records = load_texts(eval_data)
    texts = tokenize_texts(tokenizer, records, max_length=int(opts.get("max_length", DEFAULT_MAX_LENGTH)),
                           max_tokens=opts.get("max_tokens", DEFAULT_MAX_TOKENS))
    pad_id, batch_tokens = pad_id_of(tokenizer), int(opts.get("batch_tokens", 2048))
    split = split_validation(pack(read_texts(data, max_records=ft.get("max_records")), tokenizer,
                                  int(ft.get("seq_len", 512))), source=str(data))
    eval_batch = max(1, int(ft.get("batch_size", 4)))
    steps = int(ft.get("steps", 100))
    before, selected_before = _measure(model, gates, texts, pad_id, batch_tokens)  # driven_pass swaps the gates in
    with routers_replaced(model, gates):
        ppl_before = _val_perplexity(model, split.validation, eval_batch)
        losses = _train(model, routers, split.train, ft, plan.seed) if steps > 0 else []
        ppl_after = _val_perplexity(model, split.validation, eval_batch)
    after, selected_after = _measure(model, gates, texts, pad_id, batch_tokens)
    invariant = _batch_invariant(model, gates, texts.ids, pad_id)
    metrics = {key: after.get(key) for key in metric_keys}
    metrics["routing_consistency"] = (float(np.mean([M.routing_consistency(a, b)
                                                     for a, b in zip(selected_before, selected_after)]))
                                      if steps > 0 else None)
    return {
        "variant": variant.name, "description": variant.description, "spectra": {}, "router": "lpr",
        "lpr": {**vars(settings)}, "conversion": base.name, "derived": False, "metrics": metrics,
        "metrics_fitted_only": {key: before.get(key) for key in metric_keys},
        "finetune": {"steps": len(losses), "final_loss": losses[-1] if losses else None, "ppl_before": ppl_before,
                     "ppl_after": ppl_after},
        "dynamics": [], "tokens": int(sum(len(s) for s in texts.ids)), "batch_invariance_agree": invariant,
        "baselines": {}, "seconds": round(time.perf_counter() - started, 1),
    }
