"""What every upcycle method (copy, drop, carve) builds the same way: the output's SpectraConfig, the result
record, the router inputs captured from the parent, the generation config. It lives apart from ``upcycle`` so
that ``carve_upcycle`` (the carve branch ``upcycle`` dispatches to) can use it without importing ``upcycle``
back: the layout test forbids import circles (docs/ARCHITECTURE.md, "Layers")."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..console import progress
from ..errors import UserError
from .layerwise import layerwise_ffn_inputs

#: output shard size. Shards are streamed (``ShardWriter(streamed=True)``), so memory does not grow with it; a
#: test sets it tiny to make every tensor its own shard.
SHARD_BYTES = 256 * 1024**2

@dataclass
class UpcycleResult:
    output: Path
    experts: int
    top_k: int
    layers: int
    params_total: int
    params_active: int
    output_bytes: int
    layer_cv: list[float] = field(default_factory=list)
    active_ffn_fraction: float | None = None  # carve: share of the parent's FFN neurons a token runs
    calibration_recall: float | None = None  # carve: mean oracle top-k recall of the routers on calibration text


def capture_ffn_inputs(model, layers, batches: torch.Tensor, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Every layer's FFN input ``[B, T, H]`` (float32) over the calibration blocks, all held at once (a copy's
    8192 tokens; a carve fits each layer as its inputs appear instead). The parent runs layer by layer
    (``surgery.layerwise``) without its LM head and stops at the last layer's FFN input, as reroute's does."""
    captured: dict[int, torch.Tensor] = {}
    with progress() as bar:
        task = bar.add_task("capturing router inputs (layer by layer)", total=len(layers))
        layerwise_ffn_inputs(model, layers, batches, batch_size=batch_size, on_layer=captured.__setitem__,
                             on_progress=lambda _: bar.advance(task))
    return captured


def build_spectra_config(text_config: Any, adapter: Any, overrides: dict, *, experts: int, top_k: int, router_dim: int,
                    method: str, out_dtype: torch.dtype) -> Any:
    """The output's SpectraConfig: the parent's text config plus the routing knobs (one-line error if invalid)."""
    from ..modeling.configuration_spectra import SpectraConfig

    try:
        spectra_config = SpectraConfig(
            text_config=text_config.to_dict(),
            spectra={**overrides, "num_experts": experts, "top_k": top_k, "router_dim": router_dim,
                     "expert_kind": adapter.expert_kind, "source": "upcycled",
                     "intermediate_size": overrides.get("intermediate_size")},
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    spectra_config.dtype = str(out_dtype).removeprefix("torch.")
    return spectra_config


def router_param_count(config: Any) -> int:
    from ..modeling.modeling_spectra import SpectraRouter

    return sum(p.numel() for p in SpectraRouter(config.text_config.hidden_size, config.spectra, 0).parameters())


def write_generation_config(dense, out_dir: Path) -> None:
    generation_config = getattr(dense, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)
