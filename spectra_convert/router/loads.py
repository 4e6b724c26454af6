"""Router load statistics while a model runs (training): per-layer hard top-k loads (-> load CV) and Gram
orthogonality of the expert vectors.

Loads are read the way every external tool reads SPECTRA routing (docs/ARCHITECTURE.md, "The router
contract"): a forward hook on each router found by ``find_routers`` takes ``selected_experts`` (the third item
of its output). Definitions are ``metrics``' (docs/ARCHITECTURE.md, "Metrics").
"""

from __future__ import annotations

import torch
from torch import nn

from . import metrics
from .find import find_routers


def load_cv(loads: torch.Tensor) -> float:
    """Coefficient of variation (population std / mean) of one layer's per-expert loads."""
    return metrics.load_cv(loads.detach().double().cpu().numpy())


def calibration_cv_row(layer_cv: list[float]) -> list[str]:
    """The converters' summary row for the per-layer load CV on the calibration tokens. Labelled in-sample: the
    dual bias is corrected on those very tokens until their hard loads balance (often exactly, CV 0), so the row
    says nothing about unseen text, which ``validate`` measures."""
    return ["load CV on the calibration tokens, mean / worst (in-sample: the dual bias is fitted to them; "
            "`validate` measures unseen text)", f"{sum(layer_cv) / len(layer_cv):.4f} / {max(layer_cv):.4f}"]


def gram_orthogonality(expert_vectors: torch.Tensor) -> float:
    """1 - ||G - I||_F / (E sqrt 2) for the normalised expert vectors (1 = orthogonal), as validate reports it."""
    return metrics.gram_orthogonality(expert_vectors.detach().double().cpu().numpy())


class RouterMonitor:
    """Accumulates per-layer expert loads from router forward hooks until ``reset()``."""

    def __init__(self, model: nn.Module):
        self.routers = find_routers(model)
        self.num_experts = self.routers[0].num_experts if self.routers else 0
        self.layers = sorted({r.layer_idx for r in self.routers})
        self.loads = torch.zeros(len(self.layers), self.num_experts, dtype=torch.float64)
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, module: nn.Module, inputs, output) -> None:
        selected = output[2].detach().reshape(-1).cpu()
        self.loads[self._row[module.layer_idx]] += torch.bincount(selected, minlength=self.num_experts).double()

    def reset(self) -> None:
        self.loads.zero_()

    def cvs(self, loads: torch.Tensor | None = None) -> list[float]:
        loads = self.loads if loads is None else loads
        return [load_cv(row) for row in loads]

    def gram_orthogonality(self) -> list[float]:
        """Per layer, of the router that is active (PEFT keeps a frozen original beside the trained copy)."""
        active = {}
        for router in self.routers:  # later modules (PEFT's trained copy) win over the original
            active[router.layer_idx] = router
        return [gram_orthogonality(active[layer].expert_vectors) for layer in self.layers]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
