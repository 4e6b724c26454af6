"""Routing over training steps: load CV and Gram orthogonality from the trainer's JSONL log, routing entropy
and expert overlap from a hook on the routers while the fine-tune runs.

The trainer already logs per-layer load CV and Gram orthogonality every ``log_every`` steps (``router.loads``)
and that log is reused as is. Entropy and overlap need each token's scores and selected set, which the log does
not keep; ``finetune()`` builds its model internally, so they are read the way any external tool reads SPECTRA
routing (docs/ARCHITECTURE.md, "The router contract"): a *global* module forward hook that acts on modules whose class name is ``SpectraRouter``
and reads ``selected_experts`` (third output) and the cosine scores the router records in its context. Only
training-mode forwards count (the trainer's held-out evaluations run in eval mode). Statistics are kept per
optimizer step as sufficient statistics (loads, expert co-occurrence, entropy sums), so memory does not grow
with tokens, then summed into the trainer log's windows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..router.find import is_router

def overlap_from_cooccurrence(co: np.ndarray) -> float:
    """Mean pairwise Jaccard of expert token sets from ``C = A^T A`` (``C_ii`` = tokens of i), as
    ``router.metrics.expert_overlap`` computes it from the assignment matrix A."""
    e = co.shape[0]
    if e < 2:
        return math.nan
    counts = np.diag(co)
    values = []
    for i in range(e):
        for j in range(i + 1, e):
            union = counts[i] + counts[j] - co[i, j]
            values.append(co[i, j] / union if union > 0 else 0.0)
    return float(np.mean(values))


class RoutingDynamics:
    """Context manager: per-step routing statistics of every SpectraRouter forward in training mode."""

    def __init__(self, grad_accum: int = 1):
        self.grad_accum = max(1, grad_accum)
        self.steps: list[dict[int, dict[str, Any]]] = []
        self._calls = 0
        self._first_layer: int | None = None
        self._handle = None

    def __enter__(self) -> RoutingDynamics:
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not is_router(module) or not module.training:
            return
        layer = int(module.layer_idx)
        if self._first_layer is None:
            self._first_layer = layer
        if layer == self._first_layer:
            if self._calls % self.grad_accum == 0:
                self.steps.append({})
            self._calls += 1
        if not self.steps:
            return
        with torch.no_grad():
            selected = output[2].detach()
            records = getattr(module.context, "records", None)
            mask = None
            scores = None
            if records and records[-1].get("layer") == layer:
                mask = records[-1].get("mask")
                scores = records[-1]["scores"].detach().float() / float(module.temperature)
            if scores is None:
                scores = output[0].detach().float()
            if mask is not None:
                selected, scores = selected[mask], scores[mask]
            e = int(module.num_experts)
            assign = torch.zeros(selected.shape[0], e, dtype=torch.float64, device=selected.device)
            assign.scatter_(1, selected, 1.0)
            log_p = torch.log_softmax(scores, dim=-1)
            entropy = float(-(log_p.exp() * log_p).sum())
            stats = self.steps[-1].setdefault(layer, {"co": np.zeros((e, e)), "entropy": 0.0, "tokens": 0})
            stats["co"] += (assign.T @ assign).cpu().numpy()
            stats["entropy"] += entropy
            stats["tokens"] += int(selected.shape[0])

    def windows(self, log_records: list[dict[str, Any]], total_steps: int) -> list[dict[str, Any]]:
        """Merge with the trainer log records of this run: one row per logged step, with entropy and overlap.

        The hooked steps are the last ``len(self.steps)`` steps of the run (a resumed run starts mid-way), so
        step ``i`` of the hook is global step ``total_steps - len(self.steps) + i + 1``. Logged steps from before a
        resume keep their CV and Gram orthogonality; their entropy and overlap are unknown (NaN).
        """
        offset = total_steps - len(self.steps)
        rows, start = [], offset
        for record in sorted(log_records, key=lambda r: r["step"]):
            end = int(record["step"])
            window = self.steps[max(0, start - offset):max(0, end - offset)] if end > offset else []
            start = max(start, end)
            layers = sorted({layer for step in window for layer in step})
            entropies, overlaps = [], []
            for layer in layers:
                parts = [step[layer] for step in window if layer in step]
                co = sum(p["co"] for p in parts)
                tokens = sum(p["tokens"] for p in parts)
                if tokens:
                    entropies.append(sum(p["entropy"] for p in parts) / tokens)
                    overlaps.append(overlap_from_cooccurrence(co))
            rows.append({
                "step": end,
                "cv": float(np.mean(record["load_cv"])),
                "gram_orthogonality": float(np.mean(record["gram_orthogonality"])),
                "routing_entropy": float(np.mean(entropies)) if entropies else math.nan,
                "expert_overlap": float(np.mean(overlaps)) if overlaps else math.nan,
                "loss": record.get("loss"),
            })
        return rows


def read_log(path: Path) -> list[dict[str, Any]]:
    """Trainer log records, the last one per step (a resumed run re-logs the steps after its checkpoint)."""
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]
